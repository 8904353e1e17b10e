r"""Request latency of the exported task model and meta-model, run as TF Serving would.

The TF Serving binary cannot be installed on these machines, so each
SavedModel version is loaded the way the server loads it, in a fresh process
started by this script (`--measure`): the TF1 loader into a
`tf.compat.v1.Session`, and each request answered by `Session.run` on the
signature's tensors, which is what the server does below its REST and gRPC
front ends (their JSON/proto handling and the network are not measured, nor
is request batching). That process imports neither `mamlpp_tf` nor `mamlpp_tf_export`.
Per model and request size:

* `first_request_cold_ms`: the first request of a process that loaded the
  version without warm-up;
* `warmup_ms`: replaying the version's `assets.extra/tf_serving_warmup_requests`
  as TF Serving does while it loads the version (before it serves);
* `first_request_ms`: the first request after that replay;
* per client thread count (`--threads`): `p50_ms` and `p99_ms` of the
  per-request latency and `requests_per_s`, each thread sending requests
  back to back on the one session (after `--untimed` requests per thread).

The models come from a freshly initialised learner at Omniglot's shapes
(28×28×1, 64 filters, 4 stages, 5 inner steps; untrained: latency does not
depend on the weights) written as a run directory in a temporary folder and
exported with `mamlpp_tf_export.saved_models`: the task model of a 5-way 1-shot support
set, and the 5-way and 20-way 1-shot meta-models. Requests (by default): 1
and 16 images for the task model; 1 and 8 tasks of N-way 1-shot with N
queries (one per class) for the meta-models.

One JSON line per model, request size and thread count on stdout (with the
1-minute load average when the measuring process started), then a Markdown
table on stderr.

    python benchmarks/serving_latency.py
    python benchmarks/serving_latency.py --signature=predict_encoded
    python benchmarks/serving_latency.py --cases=task_5way \
        --task_sizes=1,2,4,8,16,32,64 --threads=1
"""

from __future__ import annotations

from collections.abc import Callable
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE_SHAPE = (28, 28, 1)
# name: (model kind, N-way).
CASES = {
    "task_5way": ("task", 5),
    "meta_5way_1shot": ("meta", 5),
    "meta_20way_1shot": ("meta", 20),
}

flags.DEFINE_list("cases", list(CASES), f"Models to measure, from {list(CASES)}.")
flags.DEFINE_enum("signature", "serving_default",
                  ["serving_default", "predict_encoded"],
                  "Signature to send the requests to (float images or PNG bytes).")
flags.DEFINE_list("task_sizes", ["1", "16"], "Images per task-model request.")
flags.DEFINE_list("meta_sizes", ["1", "8"], "Tasks per meta-model request.")
flags.DEFINE_list("threads", ["1", "4"],
                  "Client thread counts of the steady-state runs.")
flags.DEFINE_float("seconds", 10.0, "Minimum timed seconds per thread count.",
                   lower_bound=0.0)
flags.DEFINE_integer("min_requests", 50, "Minimum timed requests per thread count.",
                     lower_bound=1)
flags.DEFINE_integer("untimed", 2, "Untimed requests per client thread before timing.",
                     lower_bound=0)
flags.DEFINE_string("work_dir", None, "Where the run directories and models go (kept); "
                    "default: a temporary folder, removed at the end.")
flags.DEFINE_string("measure", None,
                    "Internal: the JSON spec of one measuring process.")
FLAGS = flags.FLAGS


# ------------------------------------------------------------------ models


def build_models(work_dir: str, cases: list[str]) -> dict[str, str]:
    """Writes the run directories and exports the models of `cases`.

    Returns:
      Case name -> exported version folder.
    """
    # The measuring processes must not import the package: imported here only.
    # pylint: disable=g-import-not-at-top
    import numpy as np

    from mamlpp_tf.config import LearnerConfig, RunConfig
    from mamlpp_tf.training.run import Run
    from mamlpp_tf_export import saved_models, warmup
    from mamlpp_tf_export.preprocessing import Preprocessing
    # pylint: enable=g-import-not-at-top

    paths = {}
    for name in cases:
        kind, n_way = CASES[name]
        model_dir = os.path.join(work_dir, "runs", f"omniglot_{n_way}way")
        config = RunConfig(learner=LearnerConfig(n_way=n_way,
                                                 image_shape=IMAGE_SHAPE,
                                                 num_filters=64,
                                                 num_stages=4,
                                                 inner_steps=5,
                                                 eval_inner_steps=5),
                           dataset="omniglot",
                           k_shot=1,
                           n_query=1,
                           model_dir=model_dir)
        run = Run(config)
        if not run.dir.kept_epochs():
            run.dir.write_or_check_config(config)
            run.save_epoch(0)
            run.dir.write_history([{"epoch": 0, "accuracy": 0.0, "loss": 0.0, "ci95": 0.0}])
        export_dir = os.path.join(work_dir, "models", name)
        if kind == "meta":
            paths[name] = saved_models.export_meta_model(model_dir, export_dir)
        else:
            support = os.path.join(work_dir, f"support_{n_way}way.npz")
            _, images = warmup.sample_images(Preprocessing.for_run(config), n_way)
            np.savez(support, x=images, y=np.arange(n_way))
            paths[name] = saved_models.export_task_model(model_dir, support, export_dir)
    return paths


# --------------------------------------------------------- measuring process


def _request(info: dict, signature: str, size: int) -> dict[str, Any]:
    """Inputs of one request of `size` images (task model) or tasks (meta-model)."""
    # pylint: disable=g-import-not-at-top
    import numpy as np
    import tensorflow as tf
    # pylint: enable=g-import-not-at-top
    rng = np.random.default_rng(0)
    n_way, shape = info["n_way"], tuple(info["image_shape"])

    def images(*leading: int) -> np.ndarray:
        pixels = rng.integers(0, 256, (*leading, *shape), dtype=np.uint8)
        if signature == "predict_encoded":
            encoded = np.empty(leading, dtype=object)
            for index in np.ndindex(*leading):
                encoded[index] = tf.io.encode_png(pixels[index]).numpy()
            return encoded
        return (pixels > 127).astype(np.float32)  # Omniglot's binary images.

    suffix = "_bytes" if signature == "predict_encoded" else "s"
    if info["model"] == "task":
        return {f"image{suffix}": images(size)}
    return {
        f"support_image{suffix}": images(size, n_way),
        "support_labels": np.tile(np.arange(n_way, dtype=np.int32), (size, 1)),
        f"query_image{suffix}": images(size, n_way),
    }


def _percentile_ms(latencies: list[float], q: float) -> float:
    import numpy as np  # pylint: disable=g-import-not-at-top
    return round(float(np.percentile(latencies, q)) * 1000, 2)


def _steady(send: Callable[[], Any], threads: int, seconds: float, min_requests: int,
            untimed: int) -> dict:
    """Latency percentiles and throughput of `threads` clients sending back to back."""
    latencies: list[float] = []
    lock = threading.Lock()
    deadline = [0.0]

    def client() -> None:
        for _ in range(untimed):
            send()
        barrier.wait()
        while True:
            with lock:
                if (time.perf_counter() >= deadline[0] and
                        len(latencies) >= min_requests):
                    return
            start = time.perf_counter()
            send()
            with lock:
                latencies.append(time.perf_counter() - start)

    def start_timing() -> None:
        deadline[0] = time.perf_counter() + seconds

    barrier = threading.Barrier(threads, action=start_timing)
    workers = [threading.Thread(target=client) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    wall = time.perf_counter() - deadline[0] + seconds
    return dict(requests=len(latencies),
                p50_ms=_percentile_ms(latencies, 50),
                p99_ms=_percentile_ms(latencies, 99),
                requests_per_s=round(len(latencies) / wall, 2))


def measure(spec: dict) -> dict:
    """Loads one version as TF Serving does and times its requests (see module doc).

    Args:
      spec: `path` (version folder), `signature`, `size`, `warmup` (replay the
        warm-up file first), `threads` (empty: first request only),
        `seconds`, `min_requests`, `untimed`.
    """
    # Imported here: the parent process must not pay (or share) TF's start-up.
    # pylint: disable=g-import-not-at-top
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_log_pb2
    # pylint: enable=g-import-not-at-top
    path = spec["path"]
    with open(os.path.join(path, "assets.extra", "export_info.json")) as stream:
        info = json.load(stream)
    result = dict(loadavg_1m=round(os.getloadavg()[0], 2))
    start = time.perf_counter()
    graph = tf.Graph()
    session = tf.compat.v1.Session(graph=graph)
    with graph.as_default():
        signatures = tf.compat.v1.saved_model.loader.load(session, ["serve"],
                                                          path).signature_def
    result["load_ms"] = round((time.perf_counter() - start) * 1000, 1)

    def sender(signature: str, inputs: dict[str, Any]) -> Callable[[], Any]:
        definition = signatures[signature]
        fetches = {name: tensor.name for name, tensor in definition.outputs.items()}
        feeds = {definition.inputs[name].name: value for name, value in inputs.items()}
        return lambda: session.run(fetches, feeds)

    if spec["warmup"]:
        start = time.perf_counter()
        warmup = os.path.join(path, "assets.extra", "tf_serving_warmup_requests")
        for record in tf.data.TFRecordDataset(warmup):
            request = prediction_log_pb2.PredictionLog.FromString(
                record.numpy()).predict_log.request
            sender(request.model_spec.signature_name or "serving_default",
                   {k: tf.make_ndarray(v) for k, v in request.inputs.items()})()
        result["warmup_ms"] = round((time.perf_counter() - start) * 1000, 1)
    send = sender(spec["signature"], _request(info, spec["signature"], spec["size"]))
    start = time.perf_counter()
    send()
    result["first_request_ms"] = round((time.perf_counter() - start) * 1000, 2)
    result["steady"] = {
        threads: _steady(send, threads, spec["seconds"], spec["min_requests"],
                         spec["untimed"]) for threads in spec["threads"]
    }
    imported = sorted({"mamlpp_tf", "mamlpp_tf_export"} & set(sys.modules))
    if imported:
        raise RuntimeError(f"the measuring process imported {imported}: TF Serving "
                           "runs the SavedModel alone")
    return result


# ------------------------------------------------------------------ driver


def _run_measure(spec: dict) -> dict:
    """`measure(spec)` in a fresh process; its result."""
    process = subprocess.run(
        [sys.executable, os.path.abspath(__file__), f"--measure={json.dumps(spec)}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=3600,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
        check=False)
    if process.returncode:
        raise RuntimeError(f"measuring {spec} failed:\n{process.stderr[-3000:]}")
    return json.loads(process.stdout.strip().splitlines()[-1])


def table(lines: list[dict]) -> str:
    """The JSON lines as a Markdown table."""
    rows = [
        "| model | request | threads | p50 ms | p99 ms | p50 ms/task | requests/s | "
        "first request ms: cold / after warm-up | warm-up ms |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for line in lines:
        per_task = line.get("p50_ms_per_task", "–")
        rows.append(f"| {line['model']} | {line['request']} | {line['threads']} | "
                    f"{line['p50_ms']} | {line['p99_ms']} | {per_task} | "
                    f"{line['requests_per_s']} | {line['first_request_cold_ms']} / "
                    f"{line['first_request_ms']} | {line['warmup_ms']} |")
    return "\n".join(rows)


def main(argv: list[str]) -> None:
    """Measures serving latency per case, size and thread count and prints a table."""
    del argv
    if FLAGS.measure:
        print(json.dumps(measure(json.loads(FLAGS.measure))))
        return
    unknown = sorted(set(FLAGS.cases) - set(CASES))
    if unknown:
        raise app.UsageError(f"--cases: unknown {unknown}; choose from {list(CASES)}")
    counts = {}
    for flag in ("threads", "task_sizes", "meta_sizes"):
        counts[flag] = [int(value) for value in getattr(FLAGS, flag)]
        if not counts[flag] or min(counts[flag]) < 1:
            raise app.UsageError(
                f"--{flag}={getattr(FLAGS, flag)} must be positive counts")
    threads = counts["threads"]
    work_dir = FLAGS.work_dir or tempfile.mkdtemp(prefix="serving_latency_")
    lines = []
    try:
        paths = build_models(work_dir, FLAGS.cases)
        for name in FLAGS.cases:
            kind, _ = CASES[name]
            for size in counts[f"{kind}_sizes"]:
                spec = dict(path=paths[name], signature=FLAGS.signature, size=size,
                            seconds=FLAGS.seconds, min_requests=FLAGS.min_requests,
                            untimed=FLAGS.untimed)
                cold = _run_measure(dict(spec, warmup=False, threads=[]))
                warm = _run_measure(dict(spec, warmup=True, threads=threads))
                unit = "image" if kind == "task" else "task"
                for count in threads:
                    line = dict(model=name,
                                signature=FLAGS.signature,
                                request=f"{size} {unit}{'s' if size > 1 else ''}",
                                threads=count,
                                **warm["steady"][str(count)],
                                first_request_ms=warm["first_request_ms"],
                                first_request_cold_ms=cold["first_request_ms"],
                                warmup_ms=warm["warmup_ms"],
                                load_ms=warm["load_ms"],
                                loadavg_1m=warm["loadavg_1m"])
                    if kind == "meta":
                        line["p50_ms_per_task"] = round(line["p50_ms"] / size, 2)
                    lines.append(line)
                    print(json.dumps(line), flush=True)
    finally:
        if not FLAGS.work_dir:
            shutil.rmtree(work_dir, ignore_errors=True)
    print(table(lines), file=sys.stderr)


if __name__ == "__main__":
    # Runnable as `python benchmarks/serving_latency.py` from anywhere, installed or
    # not: the checkout's mamlpp_tf, and its export/ folder as mamlpp_tf_export.
    sys.path[:0] = [ROOT, os.path.join(ROOT, "export", "from_checkout")]
    app.run(main)
