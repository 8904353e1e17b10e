r"""The fault table: signals and kills at random moments, lost workers, full disks.

    python benchmarks/faults.py --work_dir=/tmp/faults            # the table in README
    python benchmarks/faults.py --work_dir=/tmp/faults --seed=3 --sigterm=4 --sigkill=4 \
        --worker_kills=2 --disk_fills=2                           # a quick look

Injects faults into the training job on the smoke run (`flags/smoke.cfg`,
shortened by `--job_flags` so that one run takes seconds) and checks what the
job promises (README, "Reliability"):

* **SIGTERM** and **SIGKILL** at a moment drawn uniformly over an
  uninterrupted run's lifetime, so that every phase is hit: start-up, tracing,
  meta-steps, checkpoints, validation, the final test, the results write. A
  SIGTERM must end the job within `--bound_s` with status 143 and a
  "stopped by signal" line.
* **A worker killed** (SIGKILL and SIGTERM in turn) while two workers train
  under `MultiWorkerMirroredStrategy` on loopback, at a moment after the
  cluster is up (the first checkpoint; drawn over the rest of the run): the
  other worker must exit within `--worker_bound_s` with an `error:` line (or,
  after a SIGTERM, stop with the signalled one), instead of hanging. (Before
  the cluster is up, TensorFlow waits for every worker to register.)
* **A full disk**: the run directory on a tmpfs of a random size (needs root
  to mount it): exit status 74 with an `error:` line naming the path.

After each fault the run directory must be readable (every JSON file parses,
the latest checkpoint loads), and then the same command, re-run until it
finishes (all workers restarted; the tmpfs grown), must give the results of
an uninterrupted run exactly (`results.json` but for its wall time and run
directory). Faults of one kind are chained `--chain` at a time on one run
directory: each job resumes what the previous fault left. The draws come from
`--seed`, so a failure replays. Prints a Markdown table; writes every
injection to `<work_dir>/faults.json`.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STORAGE_FAILURE = 74  # mamlpp_tf.cli.STORAGE_FAILURE; this process does not import the package.

FLAGS = flags.FLAGS
flags.DEFINE_string("work_dir", None, "Where the runs go (deleted and re-created).")
flags.DEFINE_integer("seed", 0, "Seed of every draw (moments, sizes, which worker).")
flags.DEFINE_integer("sigterm", 20, "SIGTERM injections.")
flags.DEFINE_integer("sigkill", 20, "SIGKILL injections.")
flags.DEFINE_integer("worker_kills", 6, "Workers killed under multi-worker training.")
flags.DEFINE_integer("disk_fills", 5, "Runs on a tmpfs too small to finish (needs root).")
flags.DEFINE_integer("chain", 5, "Faults injected one after another into one run directory.")
flags.DEFINE_float("bound_s", 30.0, "Seconds within which a SIGTERM must end the job.")
flags.DEFINE_float("worker_bound_s", 90.0,
                   "Seconds within which the other workers must exit after one is killed.")
flags.DEFINE_list("job_flags", ["--epochs=2", "--iterations_per_epoch=12", "--val_tasks=8",
                                "--test_tasks=16", "--checkpoint_every=4"],
                  "Flags after --flagfile=flags/smoke.cfg: the smoke run, shortened.")
flags.mark_flag_as_required("work_dir")


@dataclasses.dataclass
class Injection:
    """One fault and what the job did."""
    kind: str
    chain: int
    at_s: float                       # After the start of the job it hit.
    status: int | str | None = None   # Exit status; "hung" past the bound.
    exit_s: float | None = None       # From the fault to the last process's exit.
    clean: bool = False               # Ended within the bound, as promised.
    message: str = ""                 # The job's last `error:` or "stopped" line.
    readable: bool = False            # The run directory after it.
    identical: bool | None = None     # The chain's final result (set at its end).


def _command(model_dir: str, workers: bool) -> list[str]:
    return [sys.executable, "-m", "mamlpp_tf.train", "--flagfile=flags/smoke.cfg",
            f"--model_dir={model_dir}", *FLAGS.job_flags,
            *(["--strategy=multi_worker"] if workers else [])]


def _start(model_dir: str, env: dict | None = None, log: str | None = None) -> subprocess.Popen:
    stderr = open(log, "w") if log else subprocess.DEVNULL  # pylint: disable=consider-using-with
    workers = bool(env and "TF_CONFIG" in env)
    return subprocess.Popen(_command(model_dir, workers), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=stderr, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2",
                                                    **(env or {})))


def _last_line(log: str) -> str:
    with open(log) as stream:
        lines = [line.strip() for line in stream if "error:" in line or "stopped by" in line]
    return lines[-1][-240:] if lines else ""


def _wait(processes: list[subprocess.Popen], bound_s: float) -> tuple[list, float]:
    """Waits up to `bound_s` for all; kills the rest. Returns statuses ("hung") and seconds."""
    start = time.time()
    statuses: list = [None] * len(processes)
    while time.time() - start < bound_s and None in statuses:
        for index, process in enumerate(processes):
            if statuses[index] is None and process.poll() is not None:
                statuses[index] = process.returncode
        time.sleep(0.05)
    elapsed = time.time() - start
    for index, process in enumerate(processes):
        if statuses[index] is None:
            process.kill()
            process.wait()
            statuses[index] = "hung"
    return statuses, round(elapsed, 2)


def _comparable(model_dir: str) -> dict | None:
    path = os.path.join(model_dir, "results.json")
    if not os.path.exists(path):
        return None
    with open(path) as stream:
        results = json.load(stream)
    results["config"]["model_dir"] = None
    results.pop("wall_time_s")
    return results


def _readable(model_dir: str) -> bool:
    """Every JSON file parses and the latest checkpoint (if any) loads."""
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    try:
        for path in glob.glob(os.path.join(model_dir, "**", "*.json"), recursive=True):
            with open(path) as stream:
                json.load(stream)
        latest = tf.train.latest_checkpoint(os.path.join(model_dir, "checkpoints", "latest"))
        if latest is not None:
            tf.train.load_checkpoint(latest)
    except (ValueError, OSError, tf.errors.OpError):
        return False
    return True


def _finish(model_dir: str, workers: int = 1) -> bool:
    """Re-runs the job (all its workers) until it finishes; whether it did, cleanly."""
    for _ in range(3):
        processes = _start_workers(model_dir) if workers > 1 else [_start(model_dir)]
        statuses, _ = _wait(processes, 1800)
        if statuses == [0] * len(processes):
            return True
    return False


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def _start_workers(model_dir: str, logs: list[str] | None = None) -> list[subprocess.Popen]:
    cluster = {"worker": [f"127.0.0.1:{port}" for port in _free_ports(2)]}
    return [_start(model_dir, dict(TF_CONFIG=json.dumps(dict(
        cluster=cluster, task=dict(type="worker", index=index)))),
                   log=logs[index] if logs else None) for index in range(2)]


def _wait_for_checkpoint(model_dir: str, processes: list[subprocess.Popen]) -> None:
    """Returns once the run has a latest checkpoint (or a process ended)."""
    state = os.path.join(model_dir, "checkpoints", "latest", "checkpoint")
    while not os.path.exists(state) and all(p.poll() is None for p in processes):
        time.sleep(0.02)


def _signal_chains(kind: str, count: int, lifetime: float, reference: dict,
                   rng: random.Random) -> list[Injection]:
    signum = signal.SIGTERM if kind == "SIGTERM" else signal.SIGKILL
    injections: list[Injection] = []
    chain = 0
    while len(injections) < count:
        model_dir = os.path.join(FLAGS.work_dir, f"{kind.lower()}_{chain}")
        in_chain: list[Injection] = []
        finished = False
        while len(in_chain) < min(FLAGS.chain, count - len(injections)):
            log = os.path.join(FLAGS.work_dir, "job.log")
            process = _start(model_dir, log=log)
            at = rng.uniform(0.2, lifetime)
            started = time.time()
            while time.time() - started < at and process.poll() is None:
                time.sleep(0.01)
            if process.poll() is not None:  # Finished before the fault: the chain ends.
                finished = process.returncode == 0
                break
            process.send_signal(signum)
            statuses, elapsed = _wait([process], FLAGS.bound_s)
            injection = Injection(kind, chain, round(at, 2), statuses[0], elapsed,
                                  message=_last_line(log))
            # A SIGTERM ends the job with its "stopped by signal" line, or, in the
            # instants before the job installs its handler (Python's imports) or
            # after it removes it (results written), by the default action.
            injection.clean = (statuses[0] == -signal.SIGKILL if kind == "SIGKILL" else
                               statuses[0] == -signal.SIGTERM or
                               statuses[0] == 128 + signal.SIGTERM and
                               "stopped by signal" in injection.message)
            injection.readable = _readable(model_dir)
            in_chain.append(injection)
        identical = (finished or _finish(model_dir)) and _comparable(model_dir) == reference
        for injection in in_chain:
            injection.identical = identical
        injections += in_chain
        print(f"{kind} chain {chain}: {[(i.at_s, i.status) for i in in_chain]} "
              f"identical={identical}", flush=True)
        chain += 1
    return injections


def _worker_kills(count: int, lifetime: float, reference: dict,
                  rng: random.Random) -> list[Injection]:
    injections = []
    while len(injections) < count:
        index = len(injections)
        kind = ("worker SIGKILL", "worker SIGTERM")[index % 2]
        model_dir = os.path.join(FLAGS.work_dir, f"workers_{index}")
        logs = [os.path.join(FLAGS.work_dir, f"worker{w}.log") for w in range(2)]
        processes = _start_workers(model_dir, logs)
        _wait_for_checkpoint(model_dir, processes)  # Mid-run: the cluster is up.
        at, victim = rng.uniform(0.0, lifetime), rng.randrange(2)
        started = time.time()
        while time.time() - started < at and all(p.poll() is None for p in processes):
            time.sleep(0.01)
        if any(p.poll() is not None for p in processes):  # Ended before the fault: redraw.
            _wait(processes, 1800)
            shutil.rmtree(model_dir)
            continue
        processes[victim].send_signal(signal.SIGKILL if "KILL" in kind else signal.SIGTERM)
        statuses, elapsed = _wait(processes, FLAGS.worker_bound_s)
        other = 1 - victim
        injection = Injection(kind, index, round(at, 2), statuses[other], elapsed,
                              message=_last_line(logs[other]))
        # The other exits with its error line (or both stop after a SIGTERM); a
        # SIGTERM'd worker stops with status 143.
        injection.clean = (statuses[other] in (69, 128 + signal.SIGTERM) and
                           bool(injection.message) and
                           ("KILL" in kind or statuses[victim] == 128 + signal.SIGTERM))
        injection.readable = _readable(model_dir)
        injection.identical = _finish(model_dir, workers=2) and (
            _comparable(model_dir) == reference)
        print(f"{kind} {index}: worker {victim} at {at:.1f} s -> {statuses} in {elapsed} s; "
              f"{injection.message!r}; identical={injection.identical}", flush=True)
        injections.append(injection)
    return injections


def _disk_fills(count: int, reference: dict, rng: random.Random) -> list[Injection]:
    injections = []
    for index in range(count):
        disk = os.path.join(FLAGS.work_dir, f"disk_{index}")
        os.makedirs(disk)
        size_k = rng.randrange(64, 1024)
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_k}k", "tmpfs",
                                  disk], capture_output=True, text=True, check=False)
        if mounted.returncode:
            print(f"disk fills skipped: mount needs root ({mounted.stderr.strip()})")
            return injections
        try:
            model_dir, log = os.path.join(disk, "run"), os.path.join(FLAGS.work_dir, "job.log")
            started = time.time()
            statuses, _ = _wait([_start(model_dir, log=log)], 1800)
            injection = Injection(f"disk full ({size_k} KiB)", index,
                                  round(time.time() - started, 2), statuses[0],
                                  message=_last_line(log))
            injection.clean = statuses[0] == 0 or (
                statuses[0] == STORAGE_FAILURE and
                injection.message.startswith(f"error: cannot write {model_dir}"))
            injection.readable = _readable(model_dir)
            subprocess.run(["mount", "-o", "remount,size=64m", disk], check=True)
            injection.identical = _finish(model_dir) and _comparable(model_dir) == reference
            print(f"disk {size_k} KiB: {statuses[0]} {injection.message!r} "
                  f"identical={injection.identical}", flush=True)
            injections.append(injection)
        finally:
            subprocess.run(["umount", "-l", disk], check=False)
    return injections


def _table(injections: list[Injection]) -> str:
    kinds = list(dict.fromkeys(i.kind.split(" (")[0] for i in injections))
    rows = ["| fault | injections | ended cleanly in bound | resumed identical | "
            "left a corrupt state | hangs |", "|---|---:|---:|---:|---:|---:|"]
    for kind in kinds:
        group = [i for i in injections if i.kind.split(" (")[0] == kind]
        rows.append(f"| {kind} | {len(group)} | {sum(i.clean for i in group)} | "
                    f"{sum(bool(i.identical) for i in group)} | "
                    f"{sum(not i.readable for i in group)} | "
                    f"{sum(i.status == 'hung' for i in group)} |")
    return "\n".join(rows)


def main(argv: list[str]) -> None:
    """Runs the reference, then every fault; prints the table."""
    del argv
    shutil.rmtree(FLAGS.work_dir, ignore_errors=True)
    os.makedirs(FLAGS.work_dir)
    rng = random.Random(FLAGS.seed)
    reference_dir = os.path.join(FLAGS.work_dir, "reference")
    started = time.time()
    if not _finish(reference_dir):
        raise SystemExit("the uninterrupted reference run failed")
    lifetime = time.time() - started
    reference = _comparable(reference_dir)
    print(f"reference run: {lifetime:.1f} s", flush=True)
    injections = (_signal_chains("SIGTERM", FLAGS.sigterm, lifetime, reference, rng) +
                  _signal_chains("SIGKILL", FLAGS.sigkill, lifetime, reference, rng))
    if FLAGS.worker_kills:
        workers_dir = os.path.join(FLAGS.work_dir, "workers_reference")
        processes = _start_workers(workers_dir)
        _wait_for_checkpoint(workers_dir, processes)
        started = time.time()
        if _wait(processes, 1800)[0] != [0, 0]:
            raise SystemExit("the uninterrupted two-worker reference run failed")
        worker_lifetime = time.time() - started  # From the first checkpoint to the end.
        injections += _worker_kills(FLAGS.worker_kills, worker_lifetime,
                                    _comparable(workers_dir), rng)
    injections += _disk_fills(FLAGS.disk_fills, reference, rng)
    with open(os.path.join(FLAGS.work_dir, "faults.json"), "w") as stream:
        json.dump(dict(seed=FLAGS.seed, job_flags=FLAGS.job_flags, bound_s=FLAGS.bound_s,
                       worker_bound_s=FLAGS.worker_bound_s, reference_s=round(lifetime, 1),
                       injections=[dataclasses.asdict(i) for i in injections]), stream,
                  indent=1)
    print(_table(injections))


if __name__ == "__main__":
    app.run(main)
