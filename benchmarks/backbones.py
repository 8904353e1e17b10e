"""Every built-in network on Omniglot 5-way 1-shot: accuracy, served accuracy, speed and memory.

For each `--networks` entry this runs, one after the other:
1. a timing process (`flagfile_timing.py`): the learner of the network's
   flagfile (second order, 5 inner steps, MSL on, the flagfile's meta-batch),
   its meta-iterations and evaluation steps timed on synthetic episodes of
   the Omniglot shape (steps during which other processes used the CPU are
   discarded); its peak RSS;
2. the short real-data schedule (`short_schedule.py`): `python -m
   mamlpp_tf.train` with the network's flagfile (paper class split, 10 epochs
   × 50 iterations, seed 0, 600 validation and 600 test tasks) on a prepared
   TFDS directory; its test accuracy (best validated epoch, 95 % CI over
   tasks), served accuracy (each query alone through the exported task model)
   and peak RSS.
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
import sys

from absl import app, flags

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import flagfile_timing
import short_schedule
import timing

FLAGFILES = {
    "vgg": "flags/omniglot_5way_1shot.cfg",
    "resnet12": "flags/resnet12_omniglot_5way_1shot.cfg",
    "mlp": "flags/mlp_omniglot_5way_1shot.cfg",
}

flags.DEFINE_list("networks", list(FLAGFILES), f"Networks, from: {', '.join(FLAGFILES)}.")
flags.DEFINE_list("resnet12_widths", ["8", "16", "32", "64"],
                  "ResNet-12's block widths in both the timing and the training run.")
flags.DEFINE_bool("time", True, "Time each network's meta-iterations (on a quiet machine).")
flags.DEFINE_bool("train", True, "Run (or read, if done) each network's short real-data "
                  "schedule.")
flags.register_validator("networks", lambda v: set(v) <= set(FLAGFILES),
                         message=f"--networks must be among {', '.join(FLAGFILES)}")
flagfile_timing.define_driver_flags()
short_schedule.define_driver_flags()
FLAGS = flags.FLAGS


def _network_flags(network: str) -> list[str]:
    """Flags after the network's flagfile: ResNet-12's narrower widths."""
    if network != "resnet12":
        return []
    return ["--resnet12_widths=" + ",".join(FLAGS.resnet12_widths)]


def _time(network: str) -> dict:
    """Times `network`'s flagfile in a process of its own (its peak RSS is the timing's alone)."""
    record = flagfile_timing.spawn(FLAGFILES[network], _network_flags(network), FLAGS.steps,
                                   FLAGS.max_foreign_cpu, FLAGS.wait_idle)
    if "error" in record:
        raise RuntimeError(f"timing {network} failed: {record['error']}")
    return dict(meta_batch=record["meta_batch"], task_impl=record["task_impl"],
                network_parameters=record["network_parameters"],
                first_step_s=record["trace_and_first_step_s"],
                s_per_iteration=record["train_median_s"],
                timed_iterations=record["train_samples"],
                eval_s_per_step=record["eval_median_s"],
                timing_peak_rss_mb=record["peak_rss_mb"])


def _table(records: list[dict]) -> str:
    """The records as README's Markdown table."""
    lines = ["| network | parameters | meta-batch | s/iter | eval s/step | first step s | "
             "test accuracy | served accuracy | peak RSS, timing / training (MB) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in records:
        name = r["network"] + (f" ({r['widths']})" if "widths" in r else "")
        accuracy = (short_schedule.percent(r["accuracy"], r["ci95"])
                    if "accuracy" in r else "—")
        served = (short_schedule.percent(r["served_accuracy"], r["served_ci95"])
                  if "served_accuracy" in r else "—")
        params = f"{r['network_parameters']:,}" if "network_parameters" in r else "—"
        lines.append(f"| {name} | {params} | {r.get('meta_batch', '—')} | "
                     f"{r.get('s_per_iteration', '—')} | "
                     f"{r.get('eval_s_per_step', '—')} | {r.get('first_step_s', '—')} | "
                     f"{accuracy} | {served} | {r.get('timing_peak_rss_mb', '—')} / "
                     f"{r.get('train_peak_rss_mb', '—')} |")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    """Times and trains each network; prints JSON lines, then the table."""
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not FLAGS.out_dir:
        raise app.UsageError("--out_dir is required")
    os.makedirs(FLAGS.out_dir, exist_ok=True)
    records = []
    for network in FLAGS.networks:
        record = dict(network=network, cpu=timing.cpu_model())
        if FLAGS.time:
            record.update(_time(network))
        if network == "resnet12":
            record["widths"] = "-".join(FLAGS.resnet12_widths)
        if FLAGS.train:
            record.update(short_schedule.train(network, FLAGFILES[network], FLAGS.out_dir,
                                               FLAGS.data_dir, _network_flags(network)))
        print(json.dumps(record), flush=True)
        records.append(record)
    print(_table(records))


if __name__ == "__main__":
    app.run(main)
