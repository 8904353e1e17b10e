"""The main job: meta-train, validate every epoch, keep the top-k, test the ensemble.

    python -m mamlpp_tf.train --flagfile=flags/omniglot.cfg --model_dir=runs/omniglot

Re-running the same command resumes from the last checkpoint (a kill at any
moment loses at most `--checkpoint_every` iterations); a finished run prints its
results instead of training again. SIGTERM/SIGINT end the job within seconds
in any phase, with status 128 + signal number and a line saying where it
stopped and what a resume starts from (`mamlpp_tf.training.stop_signals`).
Exit status 74: a write the storage refused (the line names the path); 69:
another worker of a multi-worker job is gone; 3: a non-finite update under
`--nan_policy=stop`; 2: bad flags or data. Each comes with one `error:` line.

Flags, data and task splits are checked before anything is written to
`--model_dir`, so a start that fails claims nothing; a directory that holds no
checkpoint (e.g. only the `config.json` of an older failed start) takes any
flags. A resume needs no `--data_dir`/`--download`: it reads them from the
run directory; given ones win (a moved data dir) and are recorded.

Progress (`mamlpp_tf.training.progress`): on a terminal, each phase's line
(an epoch, a validation, the test by the protocol and as served) and its
progress bar; in a log file (stdout not a terminal), a log line at each
phase start, one every `--log_every` iterations with the mean train loss and
accuracy (TensorBoard's train scalars), the rate and the ETA, one every
tenth of the test, and, at the end, where `results.json` went.
`--help` lists the job's flags, `--helpfull` those of every library too.

This module is the command line (flags → `RunConfig` → `loop.train`); the
job itself is `mamlpp_tf.training.loop`.
"""

from __future__ import annotations

import sys

from absl import flags, logging
import tensorflow as tf

from mamlpp_tf import cli
from mamlpp_tf import flags as run_flags
from mamlpp_tf.config import RunConfig
from mamlpp_tf.training import distribute, evaluation, loop, progress
from mamlpp_tf.training.run_dir import RunDir

# Exit status when another worker of a multi-worker job is gone (sysexits' EX_UNAVAILABLE).
WORKER_LOST = 69


def run_config() -> RunConfig:
    """The run's config from the flags; a resume reads its data location from its run.

    A run directory with progress records where its data is (`--data_dir`,
    `--download`: `RunDir.data_location`); the flags of those left out of
    the command line (and flagfiles) take the recorded values, so the same
    command resumes without them. Given ones win (a moved data dir).

    Raises:
      run_flags.FlagCombinationError: as `run_flags.run_config_from_flags`.
    """
    flag_values = run_flags.FLAGS
    recorded = RunDir(flag_values.model_dir).data_location()
    taken = {name: value for name, value in recorded.items() if not flag_values[name].present}
    shown = [_flag_text(name, value) for name, value in taken.items()
             if value != flag_values[name].default]
    if shown:
        logging.info("Resuming %s with the data location it recorded: %s (give the flags to "
                     "read the data elsewhere)", flag_values.model_dir, " ".join(shown))
    return run_flags.run_config_from_flags(defaults=taken)


def _flag_text(name: str, value) -> str:
    """A flag as a command line gives it: `--name=value`, `--name` or `--noname`."""
    if isinstance(value, bool):
        return f"--{name}" if value else f"--no{name}"
    return f"--{name}={value}"


def _train() -> str:
    config = run_config()
    tf.config.experimental.enable_op_determinism()
    try:
        results = loop.train(config, log_every=run_flags.FLAGS.log_every,
                             override_config=run_flags.FLAGS.override_config,
                             reporter=progress.reporter(terminal=sys.stdout.isatty()))
    except loop.NonFiniteUpdate as error:
        cli.print_stop_error(str(error))
        sys.exit(3)
    except distribute.WorkerLost as error:
        cli.print_stop_error(str(error))
        sys.exit(WORKER_LOST)
    return evaluation.format_results(results)


if __name__ == "__main__":
    # --help lists the main module's flags; the job's are defined in mamlpp_tf.flags.
    flags.adopt_module_key_flags(run_flags)
    flags.declare_key_flag("flagfile")
    cli.run(_train, job="the training job", output_dirs=("model_dir",))
