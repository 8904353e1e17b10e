"""Benchmark of one MAML++ meta-iteration at the paper's shapes, on synthetic tensors.

Prints one JSON line per case: trace + first step time, median and min seconds
per meta-iteration (train, second order unless --first_order) and per
evaluation step after warm-up, and the process's peak RSS. A benchmark, not a
test: timings on shared machines are noisy, so compare implementations side by
side in one invocation.

    python benchmarks/meta_step.py                      # all cases, both layouts
    python benchmarks/meta_step.py --cases=omniglot_5way_1shot --impl=batched
    python benchmarks/meta_step.py --jit_compile        # XLA
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # pylint: disable=g-import-not-at-top
import tensorflow as tf  # pylint: disable=g-import-not-at-top

from mamlpp_tf import LearnerConfig, MamlPlusPlus  # pylint: disable=g-import-not-at-top

# name: (n_way, k_shot, queries per class, meta-batch, image shape, filters)
CASES = {
    "omniglot_5way_1shot": (5, 1, 1, 8, (28, 28, 1), 64),
    "omniglot_20way_1shot": (20, 1, 1, 8, (28, 28, 1), 64),
    "mini_imagenet_5way_1shot": (5, 1, 15, 2, (84, 84, 3), 48),
}


def synthetic_batch(n_way: int, k_shot: int, n_query: int, tasks: int,
                    image_shape: tuple[int, int, int], seed: int = 0):
    """Random images and class-major labels of the right shapes."""
    rng = np.random.RandomState(seed)
    support_y = np.tile(np.repeat(np.arange(n_way), k_shot), (tasks, 1)).astype(np.int32)
    query_y = np.tile(np.repeat(np.arange(n_way), n_query), (tasks, 1)).astype(np.int32)
    return (tf.constant(rng.rand(tasks, n_way * k_shot, *image_shape).astype(np.float32)),
            tf.constant(support_y),
            tf.constant(rng.rand(tasks, n_way * n_query, *image_shape).astype(np.float32)),
            tf.constant(query_y))


def run_case(name: str, impl: str, steps: int, jit_compile: bool,
             first_order: bool) -> dict:
    """Times one case in this process and returns its JSON record."""
    n_way, k_shot, n_query, tasks, image_shape, filters = CASES[name]
    config = LearnerConfig(n_way=n_way, image_shape=image_shape, num_filters=filters,
                           task_impl=impl, jit_compile=jit_compile,
                           second_order=not first_order)
    learner = MamlPlusPlus(config)
    batch = synthetic_batch(n_way, k_shot, n_query, tasks, image_shape)
    start = time.perf_counter()
    learner.train_step(batch, epoch=0)["loss"].numpy()
    first = time.perf_counter() - start
    train_times = []
    for _ in range(steps):
        start = time.perf_counter()
        learner.train_step(batch, epoch=0)["loss"].numpy()
        train_times.append(time.perf_counter() - start)
    start = time.perf_counter()
    learner.eval_step(batch)["loss"].numpy()
    eval_first = time.perf_counter() - start
    eval_times = []
    for _ in range(steps):
        start = time.perf_counter()
        learner.eval_step(batch)["loss"].numpy()
        eval_times.append(time.perf_counter() - start)
    return dict(case=name, impl=impl, jit_compile=jit_compile,
                second_order=not first_order, meta_batch=tasks,
                trace_and_first_step_s=round(first, 3),
                train_median_s=round(statistics.median(train_times), 4),
                train_min_s=round(min(train_times), 4),
                train_per_task_s=round(statistics.median(train_times) / tasks, 4),
                eval_trace_and_first_s=round(eval_first, 3),
                eval_median_s=round(statistics.median(eval_times), 4),
                peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                steps=steps, device=tf.config.list_logical_devices()[-1].device_type,
                tf=tf.__version__, cpus=os.cpu_count(), machine=platform.machine())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES),
                        help="Comma-separated cases from: " + ", ".join(CASES))
    parser.add_argument("--impl", default="loop,batched",
                        help="Comma-separated task layouts: loop, batched, auto.")
    parser.add_argument("--steps", type=int, default=10,
                        help="Timed meta-iterations after the first.")
    parser.add_argument("--jit_compile", action="store_true", help="Compile with XLA.")
    parser.add_argument("--first_order", action="store_true",
                        help="First-order meta-gradients.")
    parser.add_argument("--in_process", action="store_true",
                        help="Run a single case/impl here (used by the driver; each "
                        "case otherwise runs in its own process so peak RSS is its own).")
    args = parser.parse_args()
    for name in args.cases.split(","):
        if name not in CASES:
            parser.error(f"--cases: unknown case {name!r}; choose from {list(CASES)}.")
        for impl in args.impl.split(","):
            if args.in_process:
                print(json.dumps(run_case(name, impl, args.steps, args.jit_compile,
                                          args.first_order)), flush=True)
                continue
            command = [sys.executable, __file__, "--in_process", f"--cases={name}",
                       f"--impl={impl}", f"--steps={args.steps}"]
            command += ["--jit_compile"] * args.jit_compile
            command += ["--first_order"] * args.first_order
            result = subprocess.run(command, capture_output=True, text=True, check=False)
            lines = [l for l in result.stdout.splitlines() if l.startswith("{")]
            if result.returncode or not lines:
                print(json.dumps(dict(case=name, impl=impl, error=result.stderr[-2000:])),
                      flush=True)
            else:
                print(lines[-1], flush=True)


if __name__ == "__main__":
    main()
