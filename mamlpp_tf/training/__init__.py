"""The training job's parts, from the command line down.

* `run`: `Run`, one run's pieces (config, strategy, run directory, data,
  task streams, learner, trainer), built once and handed to every phase.
* `loop`: the job itself: epochs, validation, checkpoints, resume, final test.
* `trainer`: `Trainer`, the traced, distributed meta-step and evaluation step.
* `evaluation`: the protocol: fixed tasks, 95% CI, top-k ensembles, served scores.
* `run_dir`: `RunDir`, what a run directory holds and which epochs are best.
* `distribute`: `--strategy` and the pieces a loop needs around it.
* `stop_signals`: SIGTERM/SIGINT that end the job within a bounded time.
"""
