r"""The allocation protocol: every allocator against its controls, paired over seeds.

  python -m baq.experiment.protocol --config=configs/protocol.py:channel_a4 \
    --workdir=/tmp/baq_protocol_channel_a4

`arg` is a regime, optionally with ",runlocal" (a smoke run of seconds):

  layer         SmallCNN, one bit-width per layer (5 units), weights only
  layer_a4      the same with 4-bit activations
  channel       SmallCNN, one bit-width per output channel (179 units)
  channel_a4    per channel with 4-bit activations (where bits hurt most)
  resnet8       the CIFAR ResNet-8 (10 layers) per layer, 32 px

Every regime evaluates on a test split of 80,000 images (about 3,170 of
the worst group, skin type VI: a standard error near 0.75 points at 70 %
accuracy) and selects on a validation split of 10,000; see
baq/experiment/protocol.py for the arms and what is paired.
"""

import ml_collections

from configs import default

REGIMES = ("layer", "layer_a4", "channel", "channel_a4", "resnet8")


def get_config(arg=None):
  """The protocol's config for a regime of REGIMES (and optionally "runlocal")."""
  switches = [s for s in (arg or "").split(",") if s]
  regime = [s for s in switches if s != "runlocal"]
  if len(regime) != 1 or regime[0] not in REGIMES:
    raise ValueError(f"configs/protocol.py needs one regime, got {arg!r}. "
                     f"Valid: {', '.join(REGIMES)} (optionally with ',runlocal').")
  regime = regime[0]
  runlocal = "runlocal" in switches
  c = default.get_config(",".join(filter(None, ("resnet8" if regime == "resnet8" else "",
                                                  "runlocal" if runlocal else ""))))
  c.seeds = (0, 1, 2, 3, 4)  # paired: every arm of a seed starts from that seed's float model
  if not runlocal:
    c.dataset.kwargs.update(dict(num_validation=10_000, num_test=80_000))
  c.quant.granularity = "channel" if regime.startswith("channel") else "layer"
  if regime.endswith("_a4"):
    c.quant.act_bits = 4
  c.export = "safetensors"  # the protocol evaluates; it exports nothing
  c.tensorboard = False
  c.baselines = ""

  p = c.protocol = ml_collections.ConfigDict()
  # Average-bit budgets; uniform QAT runs at the integers around each (and 8 bits).
  p.budgets = (2.5, 3.0)
  # The arms (baq.experiment.arms.ARMS), each an allocation signal feeding the
  # exact solver, or a control. Every arm trains the same total steps
  # (`steps + quant.search_steps`); a search's own steps count in that total.
  p.arms = "uniform,static,minimax,measured,probed,baq,bilevel,random,oracle"
  # The probed arm (baq.train.probe): QAT steps per probe, units probed one by
  # one up to probe_max (else clusters of channels), validation examples per group.
  p.probe_steps = 20
  p.probe_max = 32
  p.probe_per_group = 64
  # Another protocol workdir whose seeds' float models this one copies instead
  # of training them again ("" trains them): the regimes share one float model
  # per seed; refused, naming the fields, if its config trains another. A seed
  # it has not finished trains here.
  p.float_from = ""
  p.random_count = 8  # random budget-filling allocations; the best on validation is kept
  p.oracle_limit = 16  # train every maximal allocation when there are at most this many
  p.reference = "static"  # the arm every other is paired against
  # Tests in Holm's family: the arms compared with the reference, over budgets.
  p.alpha = 0.05
  # The paired test whose p-values Holm adjusts: "t" (the paired t-test) or
  # "wilcoxon" (the exact signed-rank test, which one collapsed run cannot
  # dominate; its floor is 2 / 2^seeds, so it needs about 6 seeds or more).
  p.test = "t"
  return c
