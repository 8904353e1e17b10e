r"""Seconds per meta-iteration and per evaluation step of the learner a training flagfile builds.

Run as its own process, it takes the training job's flags (a `--flagfile` of
`flags/`, later flags overriding it), builds the job's learner and trainer
from them exactly as `python -m mamlpp_tf.train` does, and times them on
synthetic episodes of the flags' shapes (n_way, k_shot, n_query,
meta_batch_size, the dataset's image shape):

* meta-iterations at the first epoch that is second order (derivative-order
  annealing's `first_order_epochs + 1`, or epoch 0) with the multi-step loss
  on where that epoch still anneals it, Adam included;
* evaluation steps (`eval_inner_steps` first-order inner steps, then the
  query predictions), the per-task work of validation and the final test.

It prints one JSON line: `train_median_s`, `eval_median_s`, the first
(traced) step, the samples kept and discarded for other processes' CPU use
(see `timing.timed_steps`), the network's parameters, the task layout, and
the process's peak RSS. Drivers call `spawn`, which runs the process and
reads that line, so each configuration's memory is its own:

    python benchmarks/flagfile_timing.py --flagfile=flags/anil_omniglot_20way_1shot.cfg \
        --timing_steps=10 --model_dir=/tmp/unused
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def define_driver_flags() -> None:
    """Defines a driver's timing flags: `--steps`, `--max_foreign_cpu`, `--wait_idle`."""
    from absl import flags  # pylint: disable=import-outside-toplevel

    flags.DEFINE_integer("steps", 10, "Timed meta-iterations (and eval steps) after the first.",
                         lower_bound=1)
    flags.DEFINE_float("max_foreign_cpu", 0.1, "Discard a timed step when other processes "
                       "used more CPU than this fraction of its wall time.")
    flags.DEFINE_float("wait_idle", 0.0, "Seconds to wait at most for an idle machine before "
                       "each timing process.")


def spawn(flagfile: str, extra_flags: list[str], steps: int, max_foreign_cpu: float,
          wait_idle_s: float = 0.0, timeout_s: float | None = None) -> dict:
    """Times `flagfile` (plus `extra_flags`) in a process of its own; its JSON record.

    Args:
      flagfile: A training flagfile, relative to the repository root.
      extra_flags: Job flags after it (they win), e.g. `--meta_batch_size=8`.
      steps: Timed meta-iterations and evaluation steps after the first.
      max_foreign_cpu: See `timing.timed_steps`.
      wait_idle_s: Seconds to wait at most for an idle machine before starting.
      timeout_s: Seconds the process may take.

    Returns:
      The process's record, or `{"error": ...}` with the end of its stderr.
    """
    import timing  # pylint: disable=import-outside-toplevel

    if wait_idle_s:
        timing.wait_idle(wait_idle_s)
    command = [sys.executable, os.path.abspath(__file__), f"--flagfile={flagfile}",
               *extra_flags, "--model_dir=/nonexistent/timing_only",
               f"--timing_steps={steps}", f"--timing_max_foreign_cpu={max_foreign_cpu}"]
    try:
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                                check=False, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return dict(error=f"timeout after {timeout_s} s")
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode or not lines:
        return dict(error=f"exit status {result.returncode}: {result.stderr[-2000:]}")
    return json.loads(lines[-1])


def _main(argv: list[str]) -> None:
    """Builds the flags' learner and trainer, times them, prints the JSON record."""
    del argv
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    # pylint: disable=import-outside-toplevel
    from mamlpp_tf import flags as job_flags
    from mamlpp_tf import schedules
    from mamlpp_tf.training.run import Run

    import timing

    config = job_flags.run_config_from_flags()
    learner_config = config.learner
    trainer = Run(config).trainer
    learner = trainer.learner
    epoch = max(0, learner_config.first_order_epochs + 1)
    first_step = epoch * learner_config.iterations_per_epoch

    def train_step():
        trainer.step.assign(first_step)  # Every timed step in `epoch`'s mode.
        return trainer.train_step(batch)["loss"].numpy()

    batch = tuple(tf.constant(a) for a in timing.synthetic_episodes(
        learner_config.n_way, config.k_shot, config.n_query, config.meta_batch_size,
        learner_config.image_shape))
    steps, max_foreign = FLAGS.timing_steps, FLAGS.timing_max_foreign_cpu
    timings = timing.time_case(train_step,
                               lambda: trainer.eval_step(batch)["loss"].numpy(),
                               steps, max_foreign)
    train, evaluation = timings["train"], timings["eval"]
    print(json.dumps(dict(
        n_way=learner_config.n_way, k_shot=config.k_shot, n_query=config.n_query,
        meta_batch=config.meta_batch_size, image_shape=list(learner_config.image_shape),
        backbone=learner_config.backbone, adapt=learner_config.adapt,
        inner_update=learner_config.inner_update, per_step_bn=learner_config.per_step_bn,
        task_impl=learner._task_impl(config.n_query * learner_config.n_way),  # pylint: disable=W0212
        network_parameters=sum(int(v.shape.num_elements()) for v in learner.network_variables),
        timed_epoch=epoch,
        second_order=schedules.use_second_order(epoch, learner_config.second_order,
                                                learner_config.first_order_epochs),
        msl=schedules.msl_active(epoch, learner_config.msl_epochs),
        trace_and_first_step_s=round(timings["first_s"], 2),
        train_median_s=train["median_s"], train_samples=train["samples"],
        train_discarded=train["discarded"],
        eval_trace_and_first_s=round(timings["eval_first_s"], 2),
        eval_median_s=evaluation["median_s"], eval_samples=evaluation["samples"],
        peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        cpu=timing.cpu_model())), flush=True)


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.path.insert(0, HERE)
    sys.path.insert(0, ROOT)
    from absl import app, flags

    import mamlpp_tf.flags  # noqa: F401  (defines the training job's flags)

    flags.DEFINE_integer("timing_steps", 10, "Timed meta-iterations and evaluation steps "
                         "after the first of each.", lower_bound=1)
    flags.DEFINE_float("timing_max_foreign_cpu", 0.1, "Discard a timed step when other "
                       "processes used more CPU than this fraction of its wall time.")
    FLAGS = flags.FLAGS
    app.run(_main)
