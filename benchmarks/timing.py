"""Timing on a shared machine, for the benchmark scripts: quiet steps, the CPU, synthetic episodes.

Flag-free, so that any benchmark (and the processes it spawns, which define
the training job's flags) can import it. Every timed step records how much
CPU other processes used meanwhile; steps where that exceeds a fraction of
the step's wall time are discarded and retried (`timed_steps`), and
`wait_idle` waits for a quiet machine before a process starts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import platform
import statistics
import time

import numpy as np
import psutil

_PROCESS = psutil.Process()


def busy_cpu_s() -> float:
    """CPU seconds the whole machine has spent busy, all cores (steal counts)."""
    times = psutil.cpu_times()
    # Linux accounts guest time in user time as well; idle and iowait are not busy.
    idle = sum(getattr(times, f, 0.0) for f in ("idle", "iowait", "guest", "guest_nice"))
    return sum(times) - idle


def own_cpu_s() -> float:
    """CPU seconds this process (all its threads) has used."""
    times = _PROCESS.cpu_times()
    return times.user + times.system


def timed_steps(step: Callable[[], None], steps: int, max_foreign_cpu: float) -> dict:
    """Wall and CPU time of `steps` calls that other processes left alone.

    A call during which other processes used more than `max_foreign_cpu`
    times its wall time in CPU seconds is discarded; at most `3 * steps`
    calls are made, so a busy machine yields fewer samples, not a hang.

    Returns:
      `median_s`, `min_s`, `cpu_median_s` (None without a kept call),
      `samples`, `discarded` and `foreign_cpu_frac` (other processes' CPU
      seconds over the kept calls' wall seconds).
    """
    walls, cpus, discarded, foreign_total = [], [], 0, 0.0
    for _ in range(3 * steps):
        busy, own, start = busy_cpu_s(), own_cpu_s(), time.perf_counter()
        step()
        wall = time.perf_counter() - start
        cpu = own_cpu_s() - own
        foreign = max(0.0, busy_cpu_s() - busy - cpu)
        if foreign > max_foreign_cpu * wall:
            discarded += 1
            continue
        walls.append(wall)
        cpus.append(cpu)
        foreign_total += foreign
        if len(walls) == steps:
            break
    if not walls:
        return dict(median_s=None, min_s=None, cpu_median_s=None, samples=0,
                    discarded=discarded, foreign_cpu_frac=None)
    return dict(median_s=round(statistics.median(walls), 4),
                min_s=round(min(walls), 4),
                cpu_median_s=round(statistics.median(cpus), 4),
                samples=len(walls),
                discarded=discarded,
                foreign_cpu_frac=round(foreign_total / sum(walls), 3))


def time_case(train: Callable[[], None], evaluate: Callable[[], None], steps: int,
              max_foreign_cpu: float) -> dict:
    """Times a first train step, `steps` more, a first eval step and `steps` more.

    Args:
      train: Runs one meta-iteration to completion.
      evaluate: Runs one evaluation step to completion.
      steps: Timed calls of each after its first.
      max_foreign_cpu: See `timed_steps`.

    Returns:
      `first_s`, `train` (a `timed_steps` dict), `eval_first_s`, `eval`.
    """
    start = time.perf_counter()
    train()
    first = time.perf_counter() - start
    train_times = timed_steps(train, steps, max_foreign_cpu)
    start = time.perf_counter()
    evaluate()
    eval_first = time.perf_counter() - start
    return dict(first_s=first, train=train_times, eval_first_s=eval_first,
                eval=timed_steps(evaluate, steps, max_foreign_cpu))


def cpu_model() -> str:
    """The CPU's model name (psutil does not give it)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def wait_idle(max_wait_s: float, busy_cores: float = 0.2) -> None:
    """Waits (at most `max_wait_s`) until other processes use under `busy_cores` cores."""
    deadline = time.monotonic() + max_wait_s
    while time.monotonic() < deadline:
        busy = busy_cpu_s()
        time.sleep(2.0)
        if (busy_cpu_s() - busy) / 2.0 < busy_cores:
            return


def synthetic_episodes(n_way: int, k_shot: int, n_query: int, tasks: int,
                       image_shape: Sequence[int], seed: int = 0) -> tuple[np.ndarray, ...]:
    """A meta-batch of uniform random images with class-major labels.

    Args:
      n_way: Classes per task.
      k_shot: Support images per class.
      n_query: Query images per class.
      tasks: Tasks of the meta-batch.
      image_shape: `(H, W, C)`.
      seed: Seed of the images, so every process times the same numbers.

    Returns:
      `(support_x, support_y, query_x, query_y)` as numpy arrays of shapes
      `[tasks, n_way * k_shot, H, W, C]` (float32), `[tasks, n_way * k_shot]`
      (int32), and the same with `n_query` per class for the query set.
    """
    rng = np.random.RandomState(seed)

    def labels(per_class: int) -> np.ndarray:
        return np.tile(np.repeat(np.arange(n_way), per_class), (tasks, 1)).astype(np.int32)

    support_x = rng.rand(tasks, n_way * k_shot, *image_shape).astype(np.float32)
    query_x = rng.rand(tasks, n_way * n_query, *image_shape).astype(np.float32)
    return support_x, labels(k_shot), query_x, labels(n_query)
