"""Every built-in network on Omniglot 5-way 1-shot: accuracy, served accuracy, speed and memory.

For each `--networks` entry this runs, one after the other:
1. a timing process: MAML++ meta-iterations (second order, 5 inner steps, MSL
   on, the meta-batch of the network's flagfile) and evaluation steps on
   synthetic tensors of the Omniglot shape, timed as `meta_step.py` times them
   (steps during which other processes used the CPU are discarded); its peak RSS;
2. the short real-data schedule: `python -m mamlpp_tf.train` with the network's
   flagfile (paper class split, 10 epochs × 50 iterations, seed 0, 600
   validation and 600 test tasks) on a prepared TFDS directory; its test
   accuracy (best validated epoch, 95 % CI over tasks), served accuracy (each
   query alone through the exported task model) and peak RSS.
Then it prints one JSON line per network and a Markdown table. A benchmark,
not a test: the three networks take about an hour on 2 CPU cores.

    python benchmarks/backbones.py --data_dir=../shared/data/tfds --out_dir=/tmp/backbones
    python benchmarks/backbones.py --networks=mlp --out_dir=/tmp/b --train=false  # timing only

`--resnet12_widths` narrows ResNet-12 so that the schedule fits a CPU (the
flagfile's 64-128-256-512 takes tens of seconds per meta-iteration here).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from absl import app, flags

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
# pylint: disable-next=wrong-import-position
import meta_step  # noqa: E402  (its --steps, --max_foreign_cpu, --wait_idle flags apply)

FLAGFILES = {
    "vgg": "flags/omniglot_5way_1shot.cfg",
    "resnet12": "flags/resnet12_omniglot_5way_1shot.cfg",
    "mlp": "flags/mlp_omniglot_5way_1shot.cfg",
}
# The flagfiles' meta-batches: the paper's 16 for Omniglot 5-way 1-shot; ALFA's 2 for
# ResNet-12, which runs tasks one after another (no task-batched pass), so that its traced
# step grows with the tasks.
META_BATCH = {"vgg": 16, "resnet12": 2, "mlp": 16}

flags.DEFINE_list("networks", list(FLAGFILES), f"Networks, from: {', '.join(FLAGFILES)}.")
flags.DEFINE_list("resnet12_widths", ["16", "32", "64", "128"],
                  "ResNet-12's block widths in both the timing and the training run.")
flags.DEFINE_string("data_dir", os.path.join(ROOT, "..", "shared", "data", "tfds"),
                    "Prepared TFDS data dir holding omniglot/3.0.0.")
flags.DEFINE_string("out_dir", None, "Folder of the runs' directories (resumed if present).")
flags.DEFINE_bool("time", True, "Time each network's meta-iterations (on a quiet machine).")
flags.DEFINE_bool("train", True, "Run (or read, if done) each network's short real-data "
                  "schedule.")
flags.DEFINE_string("time_network", None, "Time this network here (used by the driver).")
flags.register_validator("networks", lambda v: set(v) <= set(FLAGFILES),
                         message=f"--networks must be among {', '.join(FLAGFILES)}")
FLAGS = flags.FLAGS


def _widths_flag() -> str:
    return "--resnet12_widths=" + ",".join(FLAGS.resnet12_widths)


def time_network(network: str) -> dict:
    """Times one network's meta-iterations and evaluation steps in this process."""
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    # pylint: disable-next=import-outside-toplevel
    from mamlpp_tf import LearnerConfig, MamlPlusPlus, Trainer

    learner = MamlPlusPlus(LearnerConfig(
        n_way=5, image_shape=(28, 28, 1), backbone=network,
        resnet12_widths=tuple(int(w) for w in FLAGS.resnet12_widths)))
    trainer = Trainer(learner)
    batch = tuple(tf.constant(a) for a in meta_step.synthetic_batch("omniglot_5way_1shot",
                                                                    tasks=META_BATCH[network]))
    timings = meta_step.time_case(lambda: trainer.train_step(batch, epoch=0)["loss"].numpy(),
                                  lambda: trainer.eval_step(batch)["loss"].numpy(),
                                  FLAGS.steps, FLAGS.max_foreign_cpu)
    params = sum(int(v.shape.num_elements()) for v in learner.network_variables)
    return dict(network=network, task_impl=learner._task_impl(1),  # pylint: disable=W0212
                network_parameters=params, first_step_s=round(timings["first_s"], 2),
                s_per_iteration=timings["train"]["median_s"],
                timed_iterations=timings["train"]["samples"],
                eval_s_per_step=timings["eval"]["median_s"])


def _run(command: list[str], log_path: str | None = None) -> tuple[int, float, str]:
    """Runs `command` from the repository root: `(status, peak RSS in MB, stdout)`."""
    with open(log_path or os.devnull, "w", encoding="utf-8") as log:
        process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE,
                                   stderr=log, text=True)
        stdout = process.stdout.read()
        _, status, usage = os.wait4(process.pid, 0)  # This child's own peak RSS.
    # Reaped by wait4: tell Popen so that it does not wait for the process again.
    process.returncode = os.waitstatus_to_exitcode(status)
    return process.returncode, round(usage.ru_maxrss / 1024, 1), stdout


def _time(network: str) -> dict:
    """Times `network` in a process of its own (its peak RSS is the timing's alone)."""
    if FLAGS.wait_idle:
        meta_step._wait_idle(FLAGS.wait_idle)  # pylint: disable=protected-access
    command = [sys.executable, os.path.abspath(__file__), f"--time_network={network}",
               f"--steps={FLAGS.steps}", f"--max_foreign_cpu={FLAGS.max_foreign_cpu}",
               _widths_flag()]
    status, rss, stdout = _run(command)
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    if status or not lines:
        raise RuntimeError(f"timing {network} failed with exit status {status}")
    return dict(json.loads(lines[-1]), timing_peak_rss_mb=rss)


def _train(network: str) -> dict:
    """The short real-data schedule of `network`: accuracies from its results.json.

    A run finished by an earlier invocation (its `<network>.train.json` beside
    the run directory) is read, not repeated.
    """
    model_dir = os.path.join(FLAGS.out_dir, network)
    done = model_dir + ".train.json"
    if not os.path.exists(done):
        command = [sys.executable, "-m", "mamlpp_tf.train", f"--flagfile={FLAGFILES[network]}",
                   f"--data_dir={FLAGS.data_dir}", "--nodownload", "--epochs=10",
                   "--iterations_per_epoch=50", f"--model_dir={model_dir}"]
        if network == "resnet12":
            command.append(_widths_flag())
        status, rss, _ = _run(command, log_path=model_dir + ".log")
        if status:
            return dict(train_error=f"exit status {status}; see {model_dir}.log")
        with open(done, "w", encoding="utf-8") as stream:
            json.dump(dict(train_peak_rss_mb=rss), stream)
    with open(done, encoding="utf-8") as stream:
        rss = json.load(stream)["train_peak_rss_mb"]
    with open(os.path.join(model_dir, "results.json"), encoding="utf-8") as stream:
        results = json.load(stream)
    test = results["test"]
    return dict(accuracy=round(test["accuracy"], 4), ci95=round(test["ci95"], 4),
                served_accuracy=round(test["served_accuracy"], 4),
                served_ci95=round(test["served_ci95"], 4),
                served_bn_stats=test["served_bn_stats"], best_epoch=test["best_epoch"],
                test_tasks=test["tasks"], training_wall_time_s=results["wall_time_s"],
                train_peak_rss_mb=rss)


def _table(records: list[dict]) -> str:
    """The records as README's Markdown table."""
    lines = ["| network | parameters | meta-batch | s/iter | eval s/step | first step s | "
             "test accuracy | served accuracy | peak RSS, timing / training (MB) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in records:
        name = r["network"] + (f" ({r['widths']})" if "widths" in r else "")
        accuracy = (f"{r['accuracy']:.2%} ± {r['ci95']:.2%}" if "accuracy" in r else "—")
        served = (f"{r['served_accuracy']:.2%} ± {r['served_ci95']:.2%}"
                  if "served_accuracy" in r else "—")
        params = f"{r['network_parameters']:,}" if "network_parameters" in r else "—"
        lines.append(f"| {name} | {params} | {META_BATCH[r['network']]} | "
                     f"{r.get('s_per_iteration', '—')} | "
                     f"{r.get('eval_s_per_step', '—')} | {r.get('first_step_s', '—')} | "
                     f"{accuracy} | {served} | {r.get('timing_peak_rss_mb', '—')} / "
                     f"{r.get('train_peak_rss_mb', '—')} |")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    """Times and trains each network; prints JSON lines, then the table."""
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if FLAGS.time_network:
        print(json.dumps(time_network(FLAGS.time_network)), flush=True)
        return
    if not FLAGS.out_dir:
        raise app.UsageError("--out_dir is required")
    os.makedirs(FLAGS.out_dir, exist_ok=True)
    records = []
    for network in FLAGS.networks:
        record = dict(network=network, cpu=meta_step._cpu_model())  # pylint: disable=W0212
        if FLAGS.time:
            record.update(_time(network))
        if network == "resnet12":
            record["widths"] = "-".join(FLAGS.resnet12_widths)
        if FLAGS.train:
            record.update(_train(network))
        print(json.dumps(record), flush=True)
        records.append(record)
    print(_table(records))


if __name__ == "__main__":
    app.run(main)
