"""Re-runs the test protocol on a finished or interrupted run.

    python -m mamlpp_tf.evaluate --model_dir=runs/omniglot [--data_dir=...] [--ensemble_top_k=5]
        [--served_bn_stats=rn]

Uses the run's own config (classes, tasks, network) and the epoch checkpoints
it kept: the best single validation epoch and the top-k logit ensemble, each
with mean accuracy and 95% CI over the fixed test tasks, scored both by the
protocol and as served (each query alone through its exported task model),
with the paired difference. Prints a table and writes
`<model_dir>/evaluation.json`; `results.json` is left as training wrote it.
`--served_bn_stats` scores as served with other task-model statistics than
the run's own (a serving-only swap that needs no retraining, e.g. `rn` on a
`batch` run) and writes `evaluation_served_<mode>.json`.

Progress as for the training job's test (`mamlpp_tf.training.progress`): a
line as each phase starts (the test by the protocol, then as served) and a
bar on a terminal, a line every tenth of a phase in a log file; the last line
says where the evaluation went.
"""

from __future__ import annotations

import sys

from absl import flags

from mamlpp_tf import cli, task_model
from mamlpp_tf.training import evaluation, progress

flags.DEFINE_string("model_dir", None, "Run directory written by mamlpp_tf.train.")
flags.DEFINE_string("data_dir", None, "Override the run's --data_dir (e.g. on another "
                    "machine).")
flags.DEFINE_integer("ensemble_top_k",
                     None, "Override the run's ensemble size (at most the "
                     "number of epoch checkpoints it kept).",
                     lower_bound=1)
flags.DEFINE_integer("test_tasks",
                     None,
                     "Override the number of fixed test tasks.",
                     lower_bound=1)
flags.DEFINE_enum("served_bn_stats", None, task_model.BN_STATS,
                  "Task-model statistics to score as served with, instead of the run's "
                  "own (support for batch and support runs, else the run's mode): rn pools "
                  "the support moments with each image's own.")
flags.mark_flag_as_required("model_dir")
FLAGS = flags.FLAGS


def _evaluate() -> str:
    results = evaluation.evaluate_run(FLAGS.model_dir, FLAGS.data_dir, FLAGS.ensemble_top_k,
                                      FLAGS.test_tasks, FLAGS.served_bn_stats,
                                      reporter=progress.reporter(terminal=sys.stdout.isatty()))
    return evaluation.format_results(results)


if __name__ == "__main__":
    cli.run(_evaluate, job="the evaluation", output_dirs=("model_dir",))
