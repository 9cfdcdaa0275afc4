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

from baq import launch
from baq.experiment import checks, deploy, diagnostics, job

launch.define_flags(None, config_help="Config file; default: WORKDIR/config.json.",
                    workdir_help="Directory of a train.py run.")
flags.DEFINE_bool("diagnostics", False, "Write the per-group diagnostics instead of the report.")
flags.DEFINE_string("export", None, "Comma-separated export formats (safetensors, onnx, qwix); "
                    "default: the config's `export`.")


def main(argv):
  _, workdir = launch.start(argv)
  config = checks.load_config(workdir, flags.FLAGS.config)
  if flags.FLAGS.export is not None:
    deploy.export_formats(flags.FLAGS.export)  # an unknown name fails before any work
    with config.unlocked():
      config.export = flags.FLAGS.export
  if flags.FLAGS.diagnostics:
    diagnostics.diagnose_workdir(config, workdir)
  else:
    job.report(config, workdir)


if __name__ == "__main__":
  app.run(main)
