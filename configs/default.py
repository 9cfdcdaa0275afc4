r"""Default: BAQ at 3.0 average bits on the embedded SYNTHETIC dermatology data.

The main job. Trains a float SmallCNN, then fine-tunes from it uniform 8-bit
and 3-bit QAT baselines (`steps` each) and BAQ: per-layer bit-widths
searched jointly with the weights for `quant.search_steps`, starting from the
group-aware importance allocation, under a 3.0-bit budget and a worst-group
CVaR penalty, then projected to integers and the weights trained `steps`
steps at them. It evaluates all of them (with the post-training-quantized
figures beside the fine-tuned ones), prints the table and writes
WORKDIR/report.json, WORKDIR/bit_allocation.json and the packed weights.
3 bits is where the 3-seed measurements (docs/results.md) put the regime in
which bits matter: uniform 3-bit QAT loses ~4 worst-group points to 8-bit,
4-bit ~2.

  python train.py --config=configs/default.py --workdir=/tmp/baq_default

Any field can be overridden, e.g. `--config.quant.target_bits=5.0`
`--config.penalties.cvar.weight=2.0 --config.seed=1`.
"""

import ml_collections

from baq.quant import numerics


# Over 60 lines: one commented line per config field, as big_vision's configs are.
def get_config(arg=None):
  """Returns the default config.

  `arg` holds comma-separated switches: "runlocal" shrinks it for a smoke
  run; "absmax4" is the main job as it was before the BAQ issue's
  measurements (abs-max scales, 4.0 bits against uniform 8/4, BAQ from the
  budget with the finalize_fraction schedule), which the History sections of
  docs/results.md were measured with; "resnet8" swaps the SmallCNN for the
  CIFAR-style ResNet-8 (`resnet8_cifar`, 32 px, 10 quantized layers).
  """
  switches = set(filter(None, (arg or "").split(",")))
  valid = {"runlocal", "absmax4", "resnet8"}
  if switches - valid:
    raise ValueError(f"Unknown switches {sorted(switches - valid)}. "
                     f"Valid: {', '.join(sorted(valid))}.")
  c = ml_collections.ConfigDict()
  c.seed = 0
  # Training seeds of the multi-seed drivers (baq.experiment.sweep, .pareto, the
  # studies); one run (train.py) uses `seed`.
  c.seeds = (0, 1, 2)
  # Comma-separated modules imported first, for their registrations (your own
  # regularizers, models, datasets), e.g. "my_penalties".
  c.imports = ""

  # Data: a registered dataset (baq.data.DATASETS) and its options.
  c.dataset = ml_collections.ConfigDict()
  c.dataset.name = "synthetic_derm"
  c.dataset.data_dir = ml_collections.FieldReference(None, field_type=str)  # None: ~/tensorflow_datasets
  c.dataset.kwargs = ml_collections.ConfigDict(dict(image_size=32))  # builder options
  c.dataset.train_split = "train"
  c.dataset.val_split = "validation"
  c.dataset.test_split = "test"
  c.dataset.positive_class = 1  # malignant: the positive decision for DP/EOpp/EOdds
  c.dataset.sampling = "uniform"  # or "group_balanced"
  c.dataset.flip = True  # random horizontal flips in training
  # Further training augmentation (baq/data/augment.py; each draw a function
  # of seed, step and example): random-resized crop, flips, colour jitter.
  # Off here; `augment.PAPER_RECIPE` is the fine-tuning recipe at 224 px.
  c.dataset.augment = ml_collections.ConfigDict(dict(
      random_resized_crop=False, crop_scale=(0.08, 1.0), crop_ratio=(3 / 4, 4 / 3),
      hflip=False, vflip=False, brightness=0.0, contrast=0.0, saturation=0.0))
  # Keep the images in the prepared records and read each batch when it is
  # needed (a split larger than memory trains; each host reads only its
  # rows), in `workers` grain worker processes ahead of the step (0: inline).
  c.dataset.stream = False
  c.dataset.workers = 0
  # Evaluate on the central fraction of each side, resized back (None: whole image).
  c.dataset.eval_center_crop = ml_collections.FieldReference(None, field_type=float)

  # Model: a registered model (baq.models.MODELS) and its options.
  c.model = ml_collections.ConfigDict()
  c.model.name = "small_cnn"
  c.model.kwargs = ml_collections.ConfigDict(dict(widths=(16, 32, 64), hidden=64))
  # Compute dtype of the train step (and its validation): float32 | bfloat16.
  # bfloat16 is mixed precision: parameters, bit-widths, the quantizer's
  # scales and rounding, norm statistics, softmaxes and logits stay float32.
  # The final evaluation, export and diagnostics compute in float32.
  c.model.dtype = "float32"

  # What to train. `mode` is the method under study (float | qat | baq |
  # fair_static | fair_static_qat; comma-separated for several, e.g.
  # "fair_static,fair_static_qat,baq"); `baselines` are trained too,
  # fine-tuned from the same float model, and compared in the report.
  c.mode = "baq"
  c.qat_bits = 4  # bit-width of mode=qat
  # Comma-separated baselines ("" for none): uniform<B> (B-bit QAT fine-tuned
  # from fp32, and its round-to-nearest PTQ) and any runtime's numerics of
  # baq.quant.numerics (llm_int8, nf4, fp4, dynamic_int8): fp32's weights
  # with every quantized Dense layer computing as that runtime, no training
  # (baq/experiment/runtime_baselines.py), e.g. "uniform8,uniform3,llm_int8,nf4".
  c.baselines = "uniform8,uniform3"
  # The runtimes' options, name -> {option: value}, at the runtimes' defaults
  # (baq.quant.numerics.default_options): llm_int8 threshold (outliers |x| >=
  # it; 0: none) and outlier_weights (int8 | float16); nf4/fp4 blocksize
  # (32..4096, powers of two), double_quant and compute_dtype (float16 |
  # bfloat16 | float32); dynamic_int8 per_channel and reduce_range (True only:
  # 8-bit activations are CPU-dependent in fbgemm). E.g.
  # --config.numerics_options.nf4.blocksize=128.
  c.numerics_options = ml_collections.ConfigDict(numerics.default_options())
  # Formats each method is exported to (baq.experiment.deploy.EXPORTERS):
  # safetensors (packed codes), onnx (for onnxruntime), qwix (Qwix rules: Dense
  # layers, per-channel units and absmax scales only).
  c.export = "safetensors,onnx"
  # TensorBoard events beside metrics.jsonl (WORKDIR/<run>/tensorboard/):
  # every logged scalar, each group's accuracy and the bit-width histogram.
  c.tensorboard = True
  # Fine-tuning runs trained at once, in threads, after the float model: the
  # baselines in one lane, the methods in another (baq/experiment/lanes.py).
  # "auto": 2 on a CPU backend with one device (they fill the cores one XLA
  # step leaves idle), else 1; or a number ("1": one run after another).
  # Results are identical either way.
  c.concurrent_runs = "auto"
  c.init_checkpoint = ""  # a float run's workdir to fine-tune from; "" trains one in WORKDIR/fp32

  c.batch_size = 128
  c.float_steps = 1200  # steps of the float model
  c.steps = 400  # fine-tuning steps of every quantized model (BAQ and baselines)

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 2e-3  # peak learning rate of the float model (cosine decay)
  c.optim.finetune_lr = 5e-4  # peak learning rate when fine-tuning quantized models
  c.optim.warmup_steps = 100
  c.optim.weight_decay = 1e-4
  c.optim.bits_lr = 0.05  # Adam learning rate of the bit-widths (bits/step scale)
  c.optim.grad_clip = 1.0
  # Mitigations of "Quantization disparately skews a model", usable with every
  # mode: dataset.sampling="group_balanced" resamples groups; this weights
  # each example's task loss by its group.
  c.group_weighting = "none"  # none | inverse_frequency | sqrt_inverse_frequency

  # Quantization of every Conv/Dense (per output channel, weights only).
  c.quant = ml_collections.ConfigDict()
  # diffq: pseudo-quantization noise whose scale follows the bit-width. Its
  # bit gradient keeps a curvature signal while the weights co-adapt, where
  # fracbits' first-order signal fades as the weights settle (both work).
  # fracbits' error is not monotone in b (lowest near k + 0.8 of each
  # interval; see baq/quant/parametrizations/fracbits.py).
  c.quant.parametrization = "diffq"  # diffq | diffq_ste | fracbits
  # One bit-width and one scale per layer, as FairQuant allocates; "channel"
  # gives every output channel its own (then 4-bit QAT is nearly lossless
  # for this small model, and there is little left to allocate).
  c.quant.granularity = "layer"  # layer | channel
  # mse: the clip ratio of least rounding error at each unit's bits. With
  # absmax a 2-bit layer is ternary and rounds most weights to zero, which
  # made every allocation that gives the large layer 2 bits lose to uniform
  # 3-bit (docs/results.md, "every allocation, scored"); mse makes 2 bits usable.
  c.quant.scale_method = "mse"  # absmax | percentile | learned | mse
  c.quant.symmetric = True
  c.quant.min_bits = 2
  c.quant.max_bits = 8
  # BAQ's starting bit-width; None starts every unit at the budget.
  c.quant.init_bits = ml_collections.FieldReference(None, field_type=float)
  # The last fraction of BAQ's steps trains the weights at the integer
  # allocation (bits projected onto the budget, then frozen), with the
  # quantizer that evaluation and export use.
  c.quant.finalize_fraction = 0.25
  # Or, as FracBits and DiffQ report it: search the bits for search_steps
  # steps, project them, then train the weights for `steps` steps at them
  # with a fresh optimizer and schedule, exactly as fair_static_qat trains
  # at its allocation (the search is a cost of its own; finalize_fraction is
  # then unused). None: the finalize_fraction schedule within `steps`.
  c.quant.search_steps = ml_collections.FieldReference(300, field_type=int)
  # How the searched bits become integers (baq/train/rounding.py): "nearest"
  # (an exact knapsack on the distance to them) or "measured" (a knapsack on
  # the deployed model's calibration loss of each unit at each bit-width;
  # layer units only), which minimises `rounding_loss`: worst_group | mean.
  c.quant.rounding = "nearest"
  c.quant.rounding_loss = "worst_group"
  # BAQ's start: "budget" (every unit at the budget) or "allocation" (the
  # importance allocation below, then trained).
  c.quant.init_from = "allocation"
  c.quant.target_bits = 3.0  # average-bit budget (weighted by weight count)
  c.quant.target_bytes = ml_collections.FieldReference(None, field_type=float)  # or a size budget
  c.quant.act_bits = ml_collections.FieldReference(None, field_type=int)  # activation bits, None: float
  c.quant.float_layers = ""  # regex of layer paths kept in float, e.g. "head"
  # Per-layer exceptions, big_vision style: (regex, options) pairs matched in
  # order against the layer path (first full match wins; float_layers above
  # comes first); options None keeps the layer float, a dict changes fields
  # of the spec above, e.g. (("Conv_0", {"granularity": "layer"}),).
  c.quant.rules = ()

  # Group-aware importance and the budgeted allocation (modes fair_static,
  # fair_static_qat, and baq with quant.init_from="allocation"); see
  # baq/allocation/importance.py and baq/allocation/planner.py.
  c.importance = ml_collections.ConfigDict()
  c.importance.measure = "hessian"  # grad | grad_weight | hessian | hessian_diag
  c.importance.measure_kwargs = ml_collections.ConfigDict()  # a custom measure's options
  c.importance.reducer = "max"  # max | mean | cvar | balanced | subtractive
  c.importance.reducer_kwargs = ml_collections.ConfigDict()  # e.g. alpha for cvar
  # exact on the reduced sensitivity: auto | dp | milp; FairQuant's baseline: quantile;
  # minimax: exact, the worst group's summed sensitivity over the groups unreduced (the
  # reducer then only shapes the plan's reported importance)
  c.importance.method = "auto"
  c.importance.choices = (2, 3, 4, 5, 6, 8)  # candidate bit-widths
  c.importance.calib_per_group = 128  # calibration examples per group (train split)
  c.importance.batch_size = 128
  c.importance.num_probes = 32  # Hutchinson probes per calibration batch
  c.importance.probe_chunk = 8  # probes vmapped at once (memory bound)

  # eval.py --diagnostics: per-group statistics of every model (baq/experiment/diagnostics.py).
  c.diagnostics = ml_collections.ConfigDict()
  c.diagnostics.per_group = 64  # test examples per group in the curvature batch
  c.diagnostics.num_probes = 64  # Hutchinson probes of the Hessian trace
  c.diagnostics.probe_chunk = 8
  c.diagnostics.max_iters = 100  # power iteration: cap and relative tolerance
  c.diagnostics.tol = 1e-3
  c.diagnostics.models = "all"  # or e.g. "fp32,uniform4,uniform4_ptq"

  # Penalties of the main mode: name -> {weight, hyper-parameters}; names
  # from baq.fairness.regularizers.REGULARIZERS. `bitrate` enforces the budget.
  c.penalties = ml_collections.ConfigDict()
  c.penalties.bitrate = ml_collections.ConfigDict(dict(
      weight=1.0, dual_lr=0.02, rho=1.0, equality=True))
  c.penalties.cvar = ml_collections.ConfigDict(dict(weight=1.0, alpha=0.34))

  # Devices: a ("data", "model") mesh (baq/sharding.py). Batches are split
  # over "data"; weights of at least fsdp_min_numel elements are sharded
  # FSDP-style over "model"; bit-widths, scales and small tensors replicate.
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # devices on the data axis; -1: all left over by `model`
  c.mesh.model = 1  # devices each large weight is split over
  c.mesh.fsdp_min_numel = 2**18  # smaller weights stay replicated

  c.log_every = 100
  c.eval_every = 400  # validation worst-group accuracy during training
  c.checkpoint_every = 200
  c.eval_batch_size = 500

  if "absmax4" in switches:
    c.quant.scale_method, c.quant.target_bits, c.baselines = "absmax", 4.0, "uniform8,uniform4"
    c.quant.init_from, c.quant.search_steps = "budget", None
  if "resnet8" in switches:
    c.model.name, c.model.kwargs = "resnet8_cifar", ml_collections.ConfigDict()
  if "runlocal" in switches:
    c.float_steps, c.steps = 60, 40
    if c.quant.search_steps is not None:
      c.quant.search_steps = 30
    c.log_every = c.eval_every = c.checkpoint_every = 20
    c.dataset.kwargs.update(dict(num_train=512, num_validation=128, num_test=256))
  return c
