"""ANIL, BOIL and Meta-SGD against MAML++: speed at the paper's shapes, accuracy on a short run.

Each variant is its flagfile in `flags/` (`{variant}_{shape}.cfg`: the MAML++
twin of that shape plus the variant's flags), so what is measured is what a
user runs. Two parts, each optional:

1. **Speed**, side by side in one run: for every `--timing_shapes` entry,
   each variant's learner and trainer in a process of its own
   (`flagfile_timing.py`: the flagfile's meta-batch, second-order
   meta-iterations with the multi-step loss on, and evaluation steps, on
   synthetic episodes), MAML++ first, and each variant's seconds over MAML++'s
   of the same shape in the same run. The processes run one after the other,
   so no two timings share the CPU.
2. **Accuracy** on `--accuracy_shape` (default Omniglot 5-way 1-shot, real
   data, the paper's class split): the short schedule of 10 epochs × 50
   iterations, seed 0, 600 validation and 600 test tasks
   (`short_schedule.py`): test accuracy of the best validated epoch and
   served accuracy (each query alone through the exported task model), both
   with 95 % CIs over the test tasks.

It prints one JSON line per measurement, then two Markdown tables:

    python benchmarks/variants.py --out_dir=/tmp/variants --wait_idle=60
    python benchmarks/variants.py --out_dir=/tmp/v --train=false --steps=5   # speed only
    python benchmarks/variants.py --out_dir=/tmp/v --train=false --variants=maml++,anil_per_step_bn

Targets (Raghu et al., ICLR 2020, with a 4-conv network): ANIL at least 1.7×
MAML++'s speed per meta-iteration and 4× per evaluation step at Omniglot
20-way 1-shot.
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

# Each shape's MAML++ flagfile, which the variants' flagfiles extend.
MAMLPP_FLAGFILES = {
    "omniglot_20way_1shot": "flags/omniglot.cfg",
    "omniglot_5way_1shot": "flags/omniglot_5way_1shot.cfg",
    "mini_imagenet_5way_1shot": "flags/mini_imagenet_5way_1shot.cfg",
}
# Each variant: its flagfiles' prefix (none: MAML++'s own) and flags after the flagfile.
# `anil_per_step_bn` is ANIL with MAML++'s per-step batch norm, which makes the body's pass
# differ from step to step: it separates what the frozen body saves from what sharing one
# batch norm across steps saves.
VARIANTS = {
    "maml++": (None, []),
    "anil": ("anil", []),
    "boil": ("boil", []),
    "meta_sgd": ("meta_sgd", []),
    "anil_per_step_bn": ("anil", ["--per_step_bn"]),
}
DEFAULT_VARIANTS = ["maml++", "anil", "boil", "meta_sgd"]

flags.DEFINE_list("variants", DEFAULT_VARIANTS, f"Variants, from: {', '.join(VARIANTS)} "
                  "(speed-ups need maml++).")
flags.DEFINE_list("timing_shapes", ["omniglot_20way_1shot", "mini_imagenet_5way_1shot"],
                  f"Shapes to time, from: {', '.join(MAMLPP_FLAGFILES)}.")
flags.DEFINE_string("accuracy_shape", "omniglot_5way_1shot",
                    "Omniglot shape of the short real-data schedule.")
flags.DEFINE_bool("time", True, "Time each variant at --timing_shapes (a quiet machine).")
flags.DEFINE_bool("train", True, "Run (or read, if done) each variant's short schedule.")
flags.register_validator("variants", lambda v: set(v) <= set(VARIANTS),
                         message=f"--variants must be among {', '.join(VARIANTS)}")
flags.register_validator("timing_shapes", lambda v: set(v) <= set(MAMLPP_FLAGFILES),
                         message=f"--timing_shapes must be among {', '.join(MAMLPP_FLAGFILES)}")
flags.register_validator("accuracy_shape",
                         lambda v: v in MAMLPP_FLAGFILES and v.startswith("omniglot"),
                         message="--accuracy_shape must be an Omniglot shape of "
                                 f"{', '.join(MAMLPP_FLAGFILES)}")
flagfile_timing.define_driver_flags()
short_schedule.define_driver_flags()
FLAGS = flags.FLAGS


def flagfile(variant: str, shape: str) -> str:
    """The flagfile of `variant` at `shape`, relative to the repository root."""
    prefix, _ = VARIANTS[variant]
    return MAMLPP_FLAGFILES[shape] if prefix is None else f"flags/{prefix}_{shape}.cfg"


def _speedup(reference: float | None, value: float | None) -> float | None:
    """`reference / value` (how many times faster than MAML++), None where either is missing."""
    return round(reference / value, 2) if reference and value else None


def time_shape(shape: str) -> list[dict]:
    """Every variant's timing record at `shape`, with speed-ups over MAML++'s."""
    records = []
    for variant in sorted(FLAGS.variants, key=lambda v: v != "maml++"):
        extra = VARIANTS[variant][1]
        record = dict(variant=variant, shape=shape, flagfile=flagfile(variant, shape),
                      extra_flags=extra,
                      **flagfile_timing.spawn(flagfile(variant, shape), extra, FLAGS.steps,
                                              FLAGS.max_foreign_cpu, FLAGS.wait_idle))
        records.append(record)
    reference = records[0] if records and records[0]["variant"] == "maml++" else {}
    for record in records:
        record["train_speedup_vs_maml++"] = _speedup(reference.get("train_median_s"),
                                                     record.get("train_median_s"))
        record["eval_speedup_vs_maml++"] = _speedup(reference.get("eval_median_s"),
                                                    record.get("eval_median_s"))
    return records


def _flags(record: dict) -> str:
    """The record's flagfile and extra flags, as a Markdown cell."""
    return " ".join(f"`{part}`" for part in [record["flagfile"], *record["extra_flags"]])


def _cell(value, suffix: str = "") -> str:
    return "—" if value is None else f"{value}{suffix}"


def timing_table(records: list[dict]) -> str:
    """The timing records as Markdown: seconds and speed-ups over MAML++ per shape."""
    lines = ["| shape (meta-batch) | variant | s / meta-iteration | speed-up | eval s / step | "
             "speed-up | trace + first step s | peak RSS MB |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in records:
        if "error" in r:
            lines.append(f"| {r['shape']} | {r['variant']} | error | | | | | |")
            continue
        lines.append(
            f"| {r['shape']} ({r['meta_batch']}) | {r['variant']} | {_cell(r['train_median_s'])} | "
            f"{_cell(r['train_speedup_vs_maml++'], '×')} | {_cell(r['eval_median_s'])} | "
            f"{_cell(r['eval_speedup_vs_maml++'], '×')} | {r['trace_and_first_step_s']} | "
            f"{r['peak_rss_mb']} |")
    return "\n".join(lines)


def accuracy_table(records: list[dict]) -> str:
    """The short-schedule records as Markdown: reported and served accuracy with CIs."""
    lines = ["| variant | flagfile | test accuracy (best val epoch) | served accuracy | "
             "training peak RSS MB |", "|---|---|---:|---:|---:|"]
    for r in records:
        if "train_error" in r:
            lines.append(f"| {r['variant']} | {_flags(r)} | {r['train_error']} | | |")
            continue
        lines.append(f"| {r['variant']} | {_flags(r)} | "
                     f"{short_schedule.percent(r['accuracy'], r['ci95'])} "
                     f"(epoch {r['best_epoch']}) | "
                     f"{short_schedule.percent(r['served_accuracy'], r['served_ci95'])} "
                     f"({r['served_bn_stats']} statistics) | {r['train_peak_rss_mb']} |")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    """Times and trains each variant; prints JSON lines, then the tables."""
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not FLAGS.out_dir:
        raise app.UsageError("--out_dir is required")
    os.makedirs(FLAGS.out_dir, exist_ok=True)
    timings, accuracies = [], []
    if FLAGS.time:
        for shape in FLAGS.timing_shapes:
            for record in time_shape(shape):
                print(json.dumps(record), flush=True)
                timings.append(record)
    if FLAGS.train:
        shape = FLAGS.accuracy_shape
        for variant in FLAGS.variants:
            record = dict(variant=variant, shape=shape, flagfile=flagfile(variant, shape),
                          extra_flags=VARIANTS[variant][1], cpu=timing.cpu_model())
            record.update(short_schedule.train(f"{variant}_{shape}", record["flagfile"],
                                               FLAGS.out_dir, FLAGS.data_dir,
                                               VARIANTS[variant][1]))
            print(json.dumps(record), flush=True)
            accuracies.append(record)
    if timings:
        print(timing_table(timings))
    if accuracies:
        print(accuracy_table(accuracies))


if __name__ == "__main__":
    app.run(main)
