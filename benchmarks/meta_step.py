r"""Benchmark of one MAML++ meta-iteration at the paper's shapes, on synthetic tensors.

Times our TensorFlow code and, with --official_repo, the official PyTorch code
(AntreasAntoniou/HowToTrainYourMAMLPytorch, run by `official_step.py`) on the
same machine in the same session, so the speed-up is measured, never copied
from another machine. Every configuration runs in its own process, so its
peak RSS is its own; the driver prints one JSON line per process.

With --official_repo, each case runs in --rounds rounds; a round runs all of
our configurations (--impl x --jit_compile) and one official run, ours first
in even rounds and theirs first in odd ones, so drift in the machine's speed
hits both sides alike. Our lines of a round are printed after its official
line and compared with it. Without --official_repo no official figure and no
speed-up is printed.

Timings on a shared machine are noisy. Every timed step records how much CPU
other processes used meanwhile; steps where that exceeds --max_foreign_cpu
(a fraction of the step's wall time, in cores) are discarded and retried, up
to three times --steps in all, and --wait_idle waits for a quiet machine
before each process starts.

    python benchmarks/meta_step.py                      # all cases, both layouts
    python benchmarks/meta_step.py --cases=omniglot_5way_1shot --impl=batched
    python benchmarks/meta_step.py --jit_compile=off,on # XLA off and on
    python benchmarks/meta_step.py --impl=auto --official_repo=/path/to/official \
        --rounds=2 --wait_idle=300                      # side by side

The official code needs `pip install torch==2.13.0` (CPU build) and a checkout
of its repository; only its model code is imported (see `official_step.py`).

Keys of every line (`code` is "mamlpp_tf" or "official"; ours also carry impl,
jit_compile and compute_dtype):
  trace_and_first_step_s: the first meta-iteration, including tracing and
    graph building for ours (the official code has no trace: allocation and
    warm-up only); eval_trace_and_first_s: the same for the first eval step.
  train_median_s, train_min_s: wall seconds per meta-iteration (all
    meta_batch tasks, second order unless --first_order, 5 inner steps,
    multi-step loss on, Adam) over the kept steps; train_cpu_median_s: this
    process's CPU seconds per step (over 1 means several cores worked);
    train_per_task_s: train_median_s / meta_batch.
  train_samples, train_discarded: steps kept and steps discarded for foreign
    CPU use; foreign_cpu_frac: other processes' CPU seconds over the kept
    steps' wall seconds.
  eval_median_s: wall seconds per evaluation step (5 inner steps, first
    order, query predictions) after the first.
  peak_rss_mb: the process's peak resident memory (imports included).
  train_gflop, eval_gflop: convolution and matmul FLOPs of one step (2 per
    multiply-add), counted on our traced graph and required to equal the
    analytic count from the shapes (`mamlpp_tf/flops.py`); official lines
    carry the same count, since both codes run the same products.
  peak_gflops: the best rate of a 2048² matmul in the line's compute dtype,
    timed in the same process (our lines also give peak_gflops_float32 and
    peak_gflops_bfloat16; official lines take our float32 peak of the round).
  train_gflops, eval_gflops: FLOPs over the median; train_fraction_of_peak,
    eval_fraction_of_peak: those over peak_gflops.
  train_convolution_op_s, train_matmul_op_s, train_other_op_s (ours, with
    --profile): op seconds by kind in one profiled step, summed over threads;
    train_other_op_s_by_type: the largest op types of "other" (the
    memory-bound half: batch norm's arithmetic, pooling, activations,
    copies), seconds each, the rest under "(rest)".
Our lines measured side by side also carry: official_train_median_s,
official_eval_median_s and official_peak_rss_mb (the same round's official
line), speedup_vs_official and eval_speedup_vs_official (official median /
ours), and target_speedup (the goal: at least that speed-up per
meta-iteration, with peak_rss_mb no higher than official_peak_rss_mb).
"""

from __future__ import annotations

import datetime
import json
import os
import resource
import subprocess
import sys

from absl import app, flags
import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Runnable as `python benchmarks/meta_step.py` from anywhere, installed or not.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import timing

# name: (n_way, k_shot, queries per class, meta-batch, image shape, filters)
CASES = {
    "omniglot_5way_1shot": (5, 1, 1, 8, (28, 28, 1), 64),
    "omniglot_20way_1shot": (20, 1, 1, 8, (28, 28, 1), 64),
    "mini_imagenet_5way_1shot": (5, 1, 15, 2, (84, 84, 3), 48),
}
INNER_STEPS = 5  # the paper's, in training and evaluation alike
TARGET_SPEEDUP = 3.0  # goal per meta-iteration over the official code
_OFFICIAL_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                "official_step.py")

flags.DEFINE_list("cases", list(CASES), f"Cases, from: {', '.join(CASES)}.")
flags.DEFINE_list("impl", ["loop", "batched"], "Our task layouts: loop, batched, auto.")
flags.DEFINE_list("jit_compile", ["off"], "Our XLA settings: off, on, or off,on.")
flags.DEFINE_list("compute_dtype", ["float32"], "Our products' dtypes: float32, bfloat16 "
                  "(--compute_dtype of the main job), or both.")
flags.DEFINE_bool("profile", True, "Profile one more train step of ours: seconds in "
                  "convolutions, matmuls and other ops.")
flags.DEFINE_integer("steps", 10, "Timed meta-iterations (and eval steps) after the first.",
                     lower_bound=1)
flags.DEFINE_bool("first_order", False, "First-order meta-gradients (both codes).")
flags.DEFINE_float("max_foreign_cpu", 0.1, "Discard a timed step when other processes used "
                   "more CPU than this fraction of its wall time.")
flags.DEFINE_float("wait_idle", 0.0, "Seconds to wait at most for an idle machine before "
                   "each process.")
flags.DEFINE_float("timeout", None, "Seconds one process may take (reported as an error).")
flags.DEFINE_bool("in_process", False, "Run our configurations here (used by the driver).")
flags.DEFINE_string("official_repo", None, "Checkout of the official PyTorch code: time it "
                    "side by side with ours.")
flags.DEFINE_integer("rounds", 1, "Rounds of ours + official per case (with --official_repo).",
                     lower_bound=1)
flags.DEFINE_string("baseline_repo", None, "A checkout of another version of mamlpp_tf (e.g. "
                    "`git worktree add /tmp/base <commit>`): its configurations run in the "
                    "same rounds as ours, timed and profiled by this script, so that a change "
                    "is measured side by side.")
flags.DEFINE_string("code_dir", None, "Import mamlpp_tf from this checkout (used by the "
                    "driver for --baseline_repo).")
flags.DEFINE_bool("table", False, "After the JSON lines, print a Markdown table of the "
                  "records: speed, the profile split and memory.")
flags.register_validator("cases", lambda v: set(v) <= set(CASES),
                         f"--cases: choose from {list(CASES)}.")
flags.register_validator("impl", lambda v: set(v) <= {"loop", "batched", "auto"},
                         "--impl: choose from loop, batched, auto.")
flags.register_validator("jit_compile", lambda v: set(v) <= {"off", "on"},
                         "--jit_compile: choose from off, on.")
for _checkout_flag in ("baseline_repo", "code_dir"):
    flags.register_validator(
        _checkout_flag, lambda v: v is None or os.path.isdir(os.path.join(v, "mamlpp_tf")),
        f"--{_checkout_flag}: a checkout of this repository (a folder holding mamlpp_tf/).")
flags.register_validator("compute_dtype", lambda v: set(v) <= {"float32", "bfloat16"},
                         "--compute_dtype: choose from float32, bfloat16.")
FLAGS = flags.FLAGS


def synthetic_batch(name: str, seed: int = 0, tasks: int | None = None
                    ) -> tuple[np.ndarray, ...]:
    """Random images and class-major labels of case `name`'s shapes.

    Args:
      name: A key of `CASES`.
      seed: Seed of the images, so every process times the same numbers.
      tasks: Tasks of the meta-batch; default the case's.

    Returns:
      `(support_x, support_y, query_x, query_y)` as numpy arrays of shapes
      `[tasks, n_way * k_shot, H, W, C]`, `[tasks, n_way * k_shot]` (int32),
      and the same with queries per class for the query set.
    """
    n_way, k_shot, n_query, case_tasks, image_shape, _ = CASES[name]
    return timing.synthetic_episodes(n_way, k_shot, n_query, tasks or case_tasks, image_shape,
                                     seed)


def make_record(code: str, name: str, timings: dict, second_order: bool, **details) -> dict:
    """Assembles the JSON record of one configuration; every line comes from here.

    Args:
      code: "mamlpp_tf" (ours) or "official".
      name: The case, a key of `CASES`.
      timings: What `timing.time_case` returned.
      second_order: Whether the meta-gradients were second order.
      **details: Code-specific keys (layout, XLA, framework version...).

    Returns:
      The record, keys as in the module docstring. Peak RSS is read here, so
      call it after the timed steps.
    """
    tasks = CASES[name][3]
    train, evaluation = timings["train"], timings["eval"]
    median = train["median_s"]
    return dict(
        code=code,
        case=name,
        **details,
        second_order=second_order,
        meta_batch=tasks,
        trace_and_first_step_s=round(timings["first_s"], 3),
        train_median_s=median,
        train_min_s=train["min_s"],
        train_cpu_median_s=train["cpu_median_s"],
        train_per_task_s=None if median is None else round(median / tasks, 4),
        train_samples=train["samples"],
        train_discarded=train["discarded"],
        foreign_cpu_frac=train["foreign_cpu_frac"],
        eval_trace_and_first_s=round(timings["eval_first_s"], 3),
        eval_median_s=evaluation["median_s"],
        # ru_maxrss: psutil's memory_info() has the current RSS only, not the peak.
        peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        cpu=timing.cpu_model(),
        cpus=os.cpu_count(),
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"))


def _run_ours(name: str, impl: str, jit_compile: bool, compute_dtype: str, steps: int,
              first_order: bool, max_foreign_cpu: float) -> dict:
    """Times one configuration of our code in this process and returns its record."""
    # Imported here: official_step.py imports this module and must not load TF.
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    # pylint: disable-next=import-outside-toplevel
    from mamlpp_tf import LearnerConfig, MamlPlusPlus, Trainer

    n_way, _, _, _, image_shape, filters = CASES[name]
    learner = MamlPlusPlus(
        LearnerConfig(n_way=n_way, image_shape=image_shape, num_filters=filters,
                      inner_steps=INNER_STEPS, eval_inner_steps=INNER_STEPS, task_impl=impl,
                      jit_compile=jit_compile, second_order=not first_order,
                      compute_dtype=None if compute_dtype == "float32" else compute_dtype))
    trainer = Trainer(learner)
    batch = tuple(tf.constant(array) for array in synthetic_batch(name))

    def train():
        trainer.train_step(batch)["loss"].numpy()

    timings = timing.time_case(train, lambda: trainer.eval_step(batch)["loss"].numpy(), steps,
                               max_foreign_cpu)
    import mamlpp_tf  # pylint: disable=import-outside-toplevel

    record = make_record("mamlpp_tf", name, timings, not first_order, impl=impl,
                         jit_compile=jit_compile, compute_dtype=compute_dtype,
                         checkout="baseline" if FLAGS.code_dir else "current",
                         commit=_commit(os.path.dirname(os.path.dirname(mamlpp_tf.__file__))),
                         device=tf.config.list_logical_devices()[-1].device_type,
                         tf=tf.__version__)
    record.update(efficiency(trainer, batch, record, first_order))
    if FLAGS.profile:
        import op_profile  # pylint: disable=import-outside-toplevel
        profile = op_profile.split(op_profile.op_type_seconds(train))
        record["train_other_op_s_by_type"] = profile.pop("other_by_type")
        record.update({f"train_{kind}_op_s": value for kind, value in profile.items()})
    return record


def _commit(directory: str) -> str | None:
    """The git commit checked out in `directory` (with "+changes" if it has any), or None."""
    def git(*args):
        return subprocess.run(["git", "-C", directory, *args], capture_output=True, text=True,
                              check=False).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD")
    if not commit:
        return None
    return commit + ("+changes" if git("status", "--porcelain", "--untracked-files=no") else "")


def efficiency(trainer, batch, record: dict, first_order: bool) -> dict:
    """FLOPs of our traced steps, the measured peak, GFLOP/s and fraction of peak.

    The FLOPs come from the traced graphs (`mamlpp_tf.flops.graph_flops`) and
    must equal the analytic count from the shapes; a mismatch raises, so a
    printed figure is always the cross-checked one.
    """
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    from mamlpp_tf import flops  # pylint: disable=import-outside-toplevel

    weights = tf.constant(np.full(INNER_STEPS, 1.0 / INNER_STEPS, np.float32))
    traced = dict(
        train=trainer.train_step_function(msl=True, second_order=not first_order)
        .get_concrete_function(batch, weights),
        eval=trainer.eval_step_function().get_concrete_function(batch))
    peaks = {}
    for dtype in ("float32", "bfloat16"):
        run, flop = flops.peak_matmul(tf.as_dtype(dtype))
        best = timing.timed_steps(run, 5, FLAGS.max_foreign_cpu)["min_s"]
        peaks[dtype] = None if best is None else round(flop / best / 1e9, 1)
    keys = dict(peak_gflops=peaks[record["compute_dtype"]],
                peak_gflops_float32=peaks["float32"], peak_gflops_bfloat16=peaks["bfloat16"])
    for step, function in traced.items():
        counted = flops.graph_flops(function)
        expected = case_flops(record["case"], training=step == "train",
                              second_order=not first_order)
        if counted != expected:
            raise AssertionError(f"{step} FLOPs: traced graph {counted}, analytic {expected}")
        keys[f"{step}_gflop"] = round(counted / 1e9, 3)
        median = record[f"{step}_median_s"]
        if median:
            keys[f"{step}_gflops"] = round(counted / 1e9 / median, 1)
            if keys["peak_gflops"]:
                keys[f"{step}_fraction_of_peak"] = round(keys[f"{step}_gflops"] /
                                                         keys["peak_gflops"], 3)
    return keys


def case_flops(name: str, training: bool, second_order: bool) -> int:
    """Analytic FLOPs of one meta-iteration (or eval step) of case `name`, either code."""
    from mamlpp_tf import flops  # pylint: disable=import-outside-toplevel

    n_way, k_shot, n_query, tasks, image_shape, filters = CASES[name]
    return flops.analytic_flops(n_way=n_way, k_shot=k_shot, n_query=n_query, tasks=tasks,
                                image_shape=image_shape, filters=filters, stages=4,
                                steps=INNER_STEPS, training=training,
                                second_order=second_order)


def _spawn(command: list[str], record: dict) -> dict:
    """Runs one configuration's process; its JSON record, or `record` with an error."""
    if FLAGS.wait_idle:
        timing.wait_idle(FLAGS.wait_idle)
    common = [f"--cases={record['case']}", f"--steps={FLAGS.steps}",
              f"--max_foreign_cpu={FLAGS.max_foreign_cpu}",
              f"--first_order={FLAGS.first_order}"]
    try:
        result = subprocess.run([sys.executable] + command + common, capture_output=True,
                                text=True, check=False, timeout=FLAGS.timeout)
    except subprocess.TimeoutExpired:
        return dict(record, error=f"timeout after {FLAGS.timeout} s")
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode or not lines:
        return dict(record, error=result.stderr[-2000:])
    return json.loads(lines[-1])


def _ratio(numerator: float | None, denominator: float | None,
           digits: int = 2) -> float | None:
    return (None if numerator is None or not denominator else
            round(numerator / denominator, digits))


def compare_with_official(ours: dict, official: dict) -> dict:
    """The keys our record gains from the same round's official record.

    Args:
      ours: Our record (or an error record, whose speed-ups are then None).
      official: The official record (or an error record).

    Returns:
      official_* figures, speed-ups (official median / ours) and, where an
      official train figure exists, `target_speedup`.
    """
    official_train = official.get("train_median_s")
    keys = dict(official_train_median_s=official_train,
                official_eval_median_s=official.get("eval_median_s"),
                official_peak_rss_mb=official.get("peak_rss_mb"),
                speedup_vs_official=_ratio(official_train, ours.get("train_median_s")),
                eval_speedup_vs_official=_ratio(official.get("eval_median_s"),
                                                ours.get("eval_median_s")))
    if official_train is not None:
        keys["target_speedup"] = TARGET_SPEEDUP
    return keys


def official_efficiency(name: str, official: dict, records: list[dict]) -> dict:
    """FLOP keys of an official line: the same algorithm's count over its medians.

    The official code runs the same products as ours (second-order MAML++ at the
    same shapes), so its FLOPs are the analytic count; its peak is the float32
    peak that our processes of the same round measured.
    """
    peaks = [r["peak_gflops_float32"] for r in records if r.get("peak_gflops_float32")]
    keys = dict(peak_gflops=peaks[0]) if peaks else {}
    for step in ("train", "eval"):
        gflop = case_flops(name, training=step == "train",
                           second_order=not FLAGS.first_order) / 1e9
        keys[f"{step}_gflop"] = round(gflop, 3)
        median = official.get(f"{step}_median_s")
        if median:
            keys[f"{step}_gflops"] = round(gflop / median, 1)
            if peaks:
                keys[f"{step}_fraction_of_peak"] = round(keys[f"{step}_gflops"] / peaks[0], 3)
    return keys


def compare_with_baseline(ours: dict, baseline: dict) -> dict:
    """The keys our record gains from the same round's baseline record of its configuration.

    Args:
      ours: Our record of one configuration.
      baseline: The baseline checkout's record of the same configuration.

    Returns:
      baseline_* figures, `speedup_vs_baseline` (baseline median / ours) and
      `other_op_s_vs_baseline` (our "other" op seconds over the baseline's:
      the share of the memory-bound half that is left).
    """
    other, base_other = ours.get("train_other_op_s"), baseline.get("train_other_op_s")
    return dict(baseline_commit=baseline.get("commit"),
                baseline_train_median_s=baseline.get("train_median_s"),
                baseline_other_op_s=base_other,
                baseline_peak_rss_mb=baseline.get("peak_rss_mb"),
                baseline_trace_and_first_step_s=baseline.get("trace_and_first_step_s"),
                speedup_vs_baseline=_ratio(baseline.get("train_median_s"),
                                           ours.get("train_median_s")),
                other_op_s_vs_baseline=_ratio(other, base_other, digits=3))


def _run_round(name: str, round_index: int) -> list[dict]:
    """One round of case `name`: our configurations, and the baseline's and the official run's.

    The baseline checkout's configurations run with --baseline_repo, one
    official run with --official_repo; odd rounds run the jobs in reverse
    order, so drift in the machine's speed hits every side alike.
    """
    checkouts = [None] + ([FLAGS.baseline_repo] if FLAGS.baseline_repo else [])
    jobs = [("ours", impl, (jit == "on", dtype), code_dir) for dtype in FLAGS.compute_dtype
            for jit in FLAGS.jit_compile for impl in FLAGS.impl for code_dir in checkouts]
    if FLAGS.official_repo:
        jobs.append(("official", None, None, None))
    if round_index % 2:
        jobs.reverse()
    records = []
    for code, impl, setting, code_dir in jobs:
        if code == "official":
            records.append(_spawn([_OFFICIAL_SCRIPT, f"--official_repo={FLAGS.official_repo}"],
                                  dict(code="official", case=name)))
        else:
            jit, dtype = setting
            command = [os.path.abspath(__file__), "--in_process", f"--impl={impl}",
                       f"--jit_compile={'on' if jit else 'off'}", f"--compute_dtype={dtype}",
                       f"--profile={FLAGS.profile}"]
            if code_dir:
                command.append(f"--code_dir={os.path.abspath(code_dir)}")
            records.append(_spawn(command, dict(code="mamlpp_tf", case=name, impl=impl,
                                                jit_compile=jit, compute_dtype=dtype,
                                                checkout="baseline" if code_dir else
                                                "current")))
    official = [r for r in records if r.get("code") == "official"]
    for record in official:
        record.update(official_efficiency(name, record, records))
    baselines = {_configuration(r): r for r in records if r.get("checkout") == "baseline"}
    for record in records:
        if FLAGS.rounds > 1:
            record["round"] = round_index
        if official and record.get("code") != "official":
            record.update(compare_with_official(record, official[0]))
        if record.get("checkout") == "current" and _configuration(record) in baselines:
            record.update(compare_with_baseline(record, baselines[_configuration(record)]))
    return records


def _configuration(record: dict) -> tuple:
    return tuple(record.get(key) for key in ("case", "impl", "jit_compile", "compute_dtype"))


def _seconds(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _times(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}×"


def markdown_table(records: list[dict]) -> str:
    """The records as a Markdown table: speed, the profile split and memory.

    One row per record, in order. "other" is the memory-bound half's op
    seconds (everything but convolutions and matmuls), followed by its three
    largest op types; ratios to the official code and to the baseline come
    from the same round.
    """
    header = ("| case | code | s/iter | vs official | vs baseline | conv op-s | other op-s "
              "| other vs baseline | largest other | trace + 1st (s) | peak RSS (MB) |")
    lines = [header, "|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
    for r in records:
        if r.get("code") == "official":
            code = "official (PyTorch)"
        else:
            code = (f"mamlpp_tf {r.get('checkout', 'current')} {r.get('commit') or ''}, "
                    f"{r.get('impl')}, {r.get('compute_dtype')}"
                    + (", XLA" if r.get("jit_compile") else ""))
        largest = ", ".join(f"{kind} {value:.2f}" for kind, value in
                            list((r.get("train_other_op_s_by_type") or {}).items())[:3])
        lines.append(
            f"| {r.get('case')} | {code} | {_seconds(r.get('train_median_s'))} "
            f"| {_times(r.get('speedup_vs_official'))} | {_times(r.get('speedup_vs_baseline'))} "
            f"| {_seconds(r.get('train_convolution_op_s'), 2)} "
            f"| {_seconds(r.get('train_other_op_s'), 2)} "
            f"| {_seconds(r.get('other_op_s_vs_baseline'), 2)} | {largest or '–'} "
            f"| {_seconds(r.get('trace_and_first_step_s'), 1)} | {r.get('peak_rss_mb', '–')} |")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    """Times each `--cases` meta-step (in subprocess rounds or in-process) as JSON lines."""
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if FLAGS.code_dir:
        sys.path.insert(0, os.path.abspath(FLAGS.code_dir))
    printed = []
    for name in FLAGS.cases:
        if FLAGS.in_process:
            for dtype in FLAGS.compute_dtype:
                for jit in FLAGS.jit_compile:
                    for impl in FLAGS.impl:
                        print(json.dumps(_run_ours(name, impl, jit == "on", dtype, FLAGS.steps,
                                                   FLAGS.first_order, FLAGS.max_foreign_cpu)),
                              flush=True)
            continue
        for round_index in range(FLAGS.rounds):
            for record in _run_round(name, round_index):
                print(json.dumps(record), flush=True)
                printed.append(record)
    if FLAGS.table and printed:
        print(markdown_table(printed))


if __name__ == "__main__":
    app.run(main)
