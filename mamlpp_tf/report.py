r"""Figures and a short report of what one or more runs learned.

    python -m mamlpp_tf.report --model_dir=runs/omniglot [--model_dir=runs/maml] \
        [--out=DIR]

Writes PNG heatmaps of the learned per-step inner learning rates (LSLR) and
per-step batch-norm gamma/beta norms, the multi-step loss and meta-LR
schedules, training/validation curves and `report.md` with the test table
(single model and ensemble, 95% CI). Works on finished and interrupted runs
and never needs the dataset; several `--model_dir`s overlay their curves.
"""

from __future__ import annotations

from absl import flags

from mamlpp_tf import cli, reporting

flags.DEFINE_multi_string(
    "model_dir", None, "Run directory written by mamlpp_tf.train; "
    "repeat to compare runs.")
flags.DEFINE_string("out", None,
                    "Output directory (default: <first model_dir>/report).")
flags.mark_flag_as_required("model_dir")
FLAGS = flags.FLAGS


def _report() -> str:
    return str(reporting.write_report(FLAGS.model_dir, FLAGS.out))


if __name__ == "__main__":
    cli.run(_report, job="the report", output_dirs=("out",))
