"""Distribution strategies: equal to one device, two workers on loopback, CLI resume.

Logical CPU devices and `MultiWorkerMirroredStrategy` must be configured before
TensorFlow initialises, so the distributed runs happen in subprocesses
(tests/distributed_helper.py or the training CLI).

Tolerances. The meta-step on several replicas only adds the same per-task
gradients in another order, so float32 meta-steps agree to rounding; conv
biases feed batch norm, which removes them, so their exact meta-gradient is
zero and float32 leaves rounding noise (about 1e-9), compared with an
absolute bound. Whole CLI runs (Adam) are compared over their first epoch
only, see `_assert_matches_one_device`.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import types

import numpy as np
import pytest
import tensorflow as tf

from mamlpp_tf import tensorboard_scalars
from mamlpp_tf.training import distribute

from conftest import ROOT, TINY, comparable_results, run_job

HELPER = os.path.join(ROOT, "tests", "distributed_helper.py")
TIMEOUT_S = 420
TINY_ITERATIONS_PER_EPOCH = int(
    next(flag for flag in TINY if flag.startswith("--iterations_per_epoch=")).split("=")[1])


def _env(**extra) -> dict:
    path = os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=path, **extra)


def _assert_close(actual: np.ndarray,
                  expected: np.ndarray,
                  rtol: float,
                  atol: float = 0.0,
                  name: str = "") -> None:
    """max|actual - expected| <= atol + rtol * max|expected| over the tensor."""
    error = float(np.max(np.abs(actual - expected)))
    bound = atol + rtol * float(np.max(np.abs(expected)))
    assert error <= bound, f"{name}: max error {error:.3g} > {bound:.3g}"


# ------------------------------------------------------------------ resolve


def test_resolve_errors_name_the_flag(monkeypatch):
    with pytest.raises(ValueError, match="--strategy='tpu'"):
        distribute.resolve("tpu", 8)
    with pytest.raises(ValueError,
                       match="--cpu_replicas=2 applies to --strategy=mirrored only"):
        distribute.resolve("default", 8, cpu_replicas=2)
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(ValueError, match="needs the TF_CONFIG"):
        distribute.resolve("multi_worker", 8)
    monkeypatch.setenv("TF_CONFIG", '{"cluster": {}}')
    with pytest.raises(ValueError, match="TF_CONFIG is not valid"):
        distribute.resolve("multi_worker", 8)
    assert distribute.resolve("default", 3).num_replicas_in_sync == 1


WORKERS_ONLY = dict(worker=["a:1", "b:1"])
WITH_CHIEF = dict(chief=["c:1"], worker=["a:1"])


@pytest.mark.parametrize("jobs,task,workers", [
    (WORKERS_ONLY, ("worker", 1), 2),
    (WITH_CHIEF, ("chief", 0), 2),
    (dict(chief=["c:1"], worker=["a:1", "b:1"]), ("worker", 1), 3),
])
def test_num_workers_counts_the_chief_and_the_workers(jobs, task, workers):
    resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
        tf.train.ClusterSpec(jobs), task_type=task[0], task_id=task[1])
    strategy = types.SimpleNamespace(cluster_resolver=resolver)
    assert distribute.num_workers(strategy) == workers
    assert distribute.num_workers(tf.distribute.get_strategy()) == 1


# ------------------------------------------- mirrored meta-step == one device


# tasknorm (its support-set statistics and meta-parameters per replica): twice batch's time.
@pytest.mark.parametrize("bn_stats", ["batch", pytest.param("tasknorm", marks=pytest.mark.slow)])
def test_mirrored_meta_steps_equal_one_device(tmp_path, bn_stats):
    """3 SGD meta-steps, 4 tasks on 2 replicas vs 1 device, gradient clipping active.

    `tasknorm` covers the support-set statistics of the non-transductive modes
    (and TaskNorm's own meta-parameters).
    """
    out = str(tmp_path / "equivalence.npz")
    result = subprocess.run([sys.executable, HELPER, "equivalence", out, bn_stats],
                            cwd=ROOT,
                            env=_env(),
                            capture_output=True,
                            text=True,
                            timeout=TIMEOUT_S,
                            check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    z = np.load(out)
    assert int(z["mirrored/replicas"]) == 2 and int(z["one/replicas"]) == 1
    # The clip changes some entries of the summed gradient and leaves others:
    # clipping each replica's half would give different parameters.
    assert 0.1 < float(z["clipped_fraction"]) < 0.9
    np.testing.assert_allclose(z["mirrored/losses"], z["one/losses"], rtol=1e-6)
    for kind in ("params", "stats"):
        names = sorted(k for k in z.files if k.startswith(f"one/{kind}/"))
        assert names
        for name in names:
            # atol: conv biases ahead of batch norm hold only rounding noise (~1e-8).
            _assert_close(z[name.replace("one/", "mirrored/", 1)],
                          z[name],
                          rtol=1e-5,
                          atol=1e-7,
                          name=name)
    # Every replica applied the same update to every variable and optimizer slot.
    assert bool(z["mirrored/copies_identical"])


# -------------------------------------------------- runs against one device


def _results_table(stdout: str) -> str:
    return stdout[stdout.index("Test on"):].strip()


def _latest_params(model_dir: str) -> dict[str, np.ndarray]:
    reader = tf.train.load_checkpoint(os.path.join(model_dir, "checkpoints", "latest"))
    return {
        key: reader.get_tensor(key)
        for key in reader.get_variable_to_shape_map()
        if key.startswith(("backbone/", "lslr/"))
    }


def _train_losses(model_dir: str) -> dict[int, float]:
    """The TensorBoard training loss by iteration (a resumed run's later files win)."""
    losses = tensorboard_scalars.read_scalars(
        os.path.join(model_dir, "tensorboard", "train"), ["loss"]).get("loss", ([], []))
    return dict(zip(map(int, losses[0]), losses[1]))


def _checkpoint_files(model_dir: str) -> list[str]:
    root = os.path.join(model_dir, "checkpoints")
    return sorted(
        os.path.relpath(os.path.join(d, f), root)
        for d, _, files in os.walk(root)
        for f in files)


def _assert_matches_one_device(model_dir: str, reference_dir: str) -> None:
    """Same checkpoints, training trajectory and evaluation layout as one device.

    Replicas compute each task as one device does, but not bit for bit:
    Grappler's remapper fuses convolutions differently in one device's graph
    (with remapping off both runs agree to 1e-5 here). The TINY run is chaotic
    under Adam: a 1e-7 change of one kernel grows to 1e-4 of the loss within
    16 steps, and by the second epoch these runs differ by up to 4% in loss.
    So the trajectory is compared where rounding has not yet been amplified:
    every logged loss of the first epoch within 1e-3 relative (measured: at
    most 5e-5). A replica that skips its tasks or misses the all-reduce moves
    the first updates by whole Adam steps, far beyond that. The exact
    equivalence of meta-steps is `test_mirrored_meta_steps_equal_one_device`.
    """
    assert _checkpoint_files(model_dir) == _checkpoint_files(reference_dir)
    params, reference = _latest_params(model_dir), _latest_params(reference_dir)
    assert params.keys() == reference.keys()
    losses, reference_losses = _train_losses(model_dir), _train_losses(reference_dir)
    assert losses.keys() == reference_losses.keys() and len(losses) >= 8
    first_epoch = [step for step in reference_losses if step <= TINY_ITERATIONS_PER_EPOCH]
    assert len(first_epoch) >= 4
    for step in first_epoch:
        assert losses[step] == pytest.approx(reference_losses[step], rel=1e-3), step
    results = json.load(open(os.path.join(model_dir, "results.json")))
    expected = json.load(open(os.path.join(reference_dir, "results.json")))
    assert len(results["validation"]) == len(expected["validation"])
    assert results["test"]["tasks"] == expected["test"]["tasks"]


def test_mirrored_cli_trains_resumes_and_matches_one_device(finished_run, tmp_path):
    model_dir = str(tmp_path / "mirrored")
    flags = ("--strategy=mirrored", "--cpu_replicas=2")
    process = run_job(model_dir, *flags, wait=False)
    marker = os.path.join(model_dir, "checkpoints", "latest", "checkpoint")
    deadline = time.time() + TIMEOUT_S
    while (not os.path.exists(marker) and process.poll() is None and
           time.time() < deadline):
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert os.path.exists(marker) and not os.path.exists(
        os.path.join(model_dir, "results.json"))
    code, stdout, stderr = run_job(model_dir, *flags)
    assert code == 0, stderr[-3000:]
    assert "Resumed from" in stderr
    _assert_matches_one_device(model_dir, finished_run[0])


# ------------------------------------------------------------- multi-worker


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def _start_two_workers(tmp_path, model_dir: str) -> list[subprocess.Popen]:
    """Starts the TINY job on two workers on loopback.

    Each worker runs under tests/distributed_helper.py, which logs its file
    writes to `tmp_path/writes<index>.json`; stdout and stderr go to
    `tmp_path/worker<index>.{out,err}`.
    """
    tmp_path.mkdir(parents=True, exist_ok=True)
    cluster = {"worker": [f"127.0.0.1:{port}" for port in _free_ports(2)]}
    processes = []
    for index in range(2):
        task = json.dumps(dict(cluster=cluster, task=dict(type="worker", index=index)))
        command = [
            sys.executable, HELPER, "train",
            str(tmp_path / f"writes{index}.json"), f"--model_dir={model_dir}", *TINY,
            "--strategy=multi_worker"
        ]
        with open(tmp_path / f"worker{index}.out", "w") as out, open(
                tmp_path / f"worker{index}.err", "w") as err:
            processes.append(
                subprocess.Popen(command,
                                 cwd=ROOT,
                                 env=_env(TF_CONFIG=task),
                                 stdout=out,
                                 stderr=err))
    return processes


def _wait_all(processes: list[subprocess.Popen], timeout_s: float) -> list[int | None]:
    """Exit statuses once all have ended; None for one still running after `timeout_s` (killed)."""
    deadline = time.time() + timeout_s
    statuses = []
    for process in processes:
        try:
            statuses.append(process.wait(timeout=max(0.1, deadline - time.time())))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            statuses.append(None)
    return statuses


def _run_two_workers(tmp_path, model_dir: str) -> list[str]:
    """Runs the TINY job on two workers to its end; checks both exit 0; their stdout."""
    statuses = _wait_all(_start_two_workers(tmp_path, model_dir), TIMEOUT_S)
    for index, status in enumerate(statuses):
        stderr = (tmp_path / f"worker{index}.err").read_text()
        assert status == 0, f"worker {index}: {stderr[-3000:]}"
    return [(tmp_path / f"worker{index}.out").read_text() for index in range(2)]


@pytest.fixture(scope="module")
def two_worker_run(tmp_path_factory):
    """One uninterrupted two-worker TINY run: `(model_dir, logs_dir, stdouts)`."""
    logs = tmp_path_factory.mktemp("two_workers")
    model_dir = str(logs / "run")
    return model_dir, logs, _run_two_workers(logs, model_dir)


def test_two_workers_match_one_process_and_only_the_chief_writes(finished_run, two_worker_run):
    model_dir, tmp_path, outputs = two_worker_run
    # Both workers tested the same (chief-written) models on all tasks.
    assert _results_table(outputs[0]) == _results_table(outputs[1])
    writes = [json.load(open(tmp_path / f"writes{index}.json")) for index in range(2)]

    def inside(write: dict) -> bool:
        return write["path"].startswith(os.path.abspath(model_dir) + os.sep)

    chief = {write["kind"] for write in writes[0] if inside(write)}
    assert chief == {"checkpoint", "json", "summary"}
    # The other worker took part in every save, in a temporary directory it removed.
    assert not any(inside(write) for write in writes[1])
    temporary = [write["path"] for write in writes[1]]
    assert {write["kind"] for write in writes[1]} == {"checkpoint"}
    assert len(temporary) == sum(write["kind"] == "checkpoint" for write in writes[0])
    assert not any(os.path.exists(os.path.dirname(path)) for path in temporary)
    _assert_matches_one_device(model_dir, finished_run[0])


def _kill_one_worker(tmp_path, model_dir: str, signum: int) -> tuple[list, float]:
    """Starts two workers, sends `signum` to worker 1 after the chief's first checkpoint.

    Returns:
      Both exit statuses (None: still running 120 s after the signal) and the
      seconds from the signal to the last exit.
    """
    processes = _start_two_workers(tmp_path, model_dir)
    latest = os.path.join(model_dir, "checkpoints", "latest")
    deadline = time.time() + TIMEOUT_S
    while (tf.train.latest_checkpoint(latest) if os.path.isdir(latest) else None) is None:
        assert all(p.poll() is None for p in processes) and time.time() < deadline, (
            (tmp_path / "worker0.err").read_text()[-3000:])
        time.sleep(0.05)
    processes[1].send_signal(signum)
    sent = time.time()
    statuses = _wait_all(processes, 120)
    return statuses, time.time() - sent


def _error_lines(tmp_path, index: int) -> list[str]:
    stderr = (tmp_path / f"worker{index}.err").read_text()
    assert "Traceback" not in stderr, stderr[-3000:]
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def test_a_killed_worker_ends_the_other_with_an_error_and_a_restart_resumes_identically(
        two_worker_run, tmp_path):
    model_dir = str(tmp_path / "run")
    statuses, elapsed = _kill_one_worker(tmp_path / "killed", model_dir, signal.SIGKILL)
    assert statuses == [69, -signal.SIGKILL], statuses  # train.WORKER_LOST for the chief.
    assert elapsed < 60
    lines = _error_lines(tmp_path / "killed", 0)
    assert len(lines) == 1 and lines[0].startswith("error: lost another worker during "), lines
    assert "re-run the same command on all of them" in lines[0]
    _run_two_workers(tmp_path / "restarted", model_dir)
    assert comparable_results(model_dir) == comparable_results(two_worker_run[0])


@pytest.mark.slow
def test_a_sigterm_to_one_worker_ends_both_and_a_restart_resumes_identically(
        two_worker_run, tmp_path):
    """Before, the coordination service took SIGTERM: the signalled worker went on training."""
    model_dir = str(tmp_path / "run")
    statuses, elapsed = _kill_one_worker(tmp_path / "killed", model_dir, signal.SIGTERM)
    assert statuses[1] == 128 + signal.SIGTERM and statuses[0] in (128 + signal.SIGTERM, 69), (
        statuses)
    assert elapsed < 60
    stopped = (tmp_path / "killed" / "worker1.err").read_text()
    assert "stopped by signal 15 during" in stopped
    _run_two_workers(tmp_path / "restarted", model_dir)
    assert comparable_results(model_dir) == comparable_results(two_worker_run[0])

