"""Evaluates a trained baq experiment: flags in, one library call.

  python eval.py --workdir=/tmp/baq_default
  python eval.py --workdir=/tmp/baq_default --diagnostics
  python eval.py --workdir=/tmp/baq_default --export=onnx,safetensors
  python eval.py --config=configs/default.py --workdir=/tmp/baq_default \
    --config.baselines=uniform8,uniform3,llm_int8,nf4,dynamic_int8

Reads WORKDIR/config.json (or --config with overrides), evaluates every run
in the workdir on the test split, re-exports each method's allocation and
the formats of --export (or the config's `export`), prints the table and
writes WORKDIR/report.json; the runtimes' numerics of `config.baselines`
(the last command) need nothing trained, only fp32. With
--diagnostics it writes instead the per-group analysis of every model
(logit variance, loss, accuracy, gradient norm, Hessian trace, top
eigenvalue): WORKDIR/diagnostics.json, diagnostics.png, bits_vs_importance.png.
"""

from absl import app, flags
from ml_collections import config_flags

from baq import host
from baq.train import deploy, diagnostics, experiment, validate

config_flags.DEFINE_config_file("config", None, "Config file; default: WORKDIR/config.json.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory of a train.py run.")
flags.DEFINE_bool("diagnostics", False, "Write the per-group diagnostics instead of the report.")
flags.DEFINE_string("export", None, "Comma-separated export formats (safetensors, onnx, qwix); "
                    "default: the config's `export`.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  del argv
  host.tune_allocator()  # before JAX starts its threads
  if not flags.FLAGS["verbosity"].present:
    experiment.quiet_logging()
  config = validate.load_config(flags.FLAGS.workdir, flags.FLAGS.config)
  if flags.FLAGS.export is not None:
    deploy.export_formats(flags.FLAGS.export)  # an unknown name fails before any work
    with config.unlocked():
      config.export = flags.FLAGS.export
  if flags.FLAGS.diagnostics:
    diagnostics.diagnose_workdir(config, flags.FLAGS.workdir)
  else:
    experiment.report(config, flags.FLAGS.workdir)


if __name__ == "__main__":
  app.run(main)
