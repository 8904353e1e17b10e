"""TF Serving warm-up requests of an exported version, and the file that holds them.

TF Serving replays a version's warm-up file (`WARMUP_PATH`) when it loads the
version, before it serves, so that no client request pays a signature's first
run. The requests have the model's real shapes and random pixels. Writing the
file needs the protos of tensorflow-serving-api (a dependency of the
package); without them `write_warmup` raises an ImportError naming the
install command.
"""

from __future__ import annotations

from collections.abc import Sequence
import os

import numpy as np
import tensorflow as tf

from mamlpp_tf_export import serving_requests
from mamlpp_tf_export.preprocessing import Preprocessing

# TF Serving's warm-up file, replayed when it loads a version; it refuses more records.
WARMUP_PATH = os.path.join("assets.extra", "tf_serving_warmup_requests")
MAX_WARMUP_RECORDS = 1000
# Batch sizes of the task model's warm-up requests: the allowed_batch_sizes of
# export/serving/batching_parameters.txt, i.e. every batch TF Serving forms with
# it (each new batch size pays its first run on CPU too; see benchmarks/README.md).
TASK_WARMUP_BATCH_SIZES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)
# A warm-up request: (signature name, inputs by name).
WarmupRequest = tuple[str, serving_requests.Inputs]


def sample_images(preprocessing: Preprocessing, count: int,
                  seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`count` PNG images of the model's size, and the float images the graph makes.

    Random pixels: warm-up requests need the shapes and code paths of real
    requests, not their content.

    Returns:
      `(png_bytes object [count], images float32 [count, H, W, C])`, the
      second being `preprocessing.decode` of the first.
    """
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (count, *preprocessing.image_shape), dtype=np.uint8)
    encoded = np.empty(count, dtype=object)
    for i, image in enumerate(pixels):
        encoded[i] = tf.io.encode_png(image).numpy()
    images = np.stack(
        [preprocessing.decode(tf.constant(png)).numpy() for png in encoded])
    return encoded, images


def task_warmup(preprocessing: Preprocessing,
                batch_sizes: tuple[int, ...]) -> list[WarmupRequest]:
    """Warm-up requests of the task model: both signatures at each of `batch_sizes`."""
    encoded, images = sample_images(preprocessing, max(batch_sizes))
    requests = []
    for size in batch_sizes:
        requests += [("serving_default", {"images": images[:size]}),
                     ("predict_encoded", {"image_bytes": encoded[:size]})]
    return requests


def meta_warmup(preprocessing: Preprocessing, n_way: int, k_shot: int,
                n_query: int) -> list[WarmupRequest]:
    """Warm-up requests of the meta-model: one N-way K-shot task per signature.

    `N·n_query` queries, the run's episode shape, in one task (as
    `mamlpp_tf_export.client` sends). More tasks need no record of their own: a task's
    computation has the same shapes whatever the request's task count.
    """
    support, queries = n_way * k_shot, n_way * n_query
    encoded, images = sample_images(preprocessing, support + queries)
    labels = np.repeat(np.arange(n_way, dtype=np.int32), k_shot)[None]
    return [
        ("serving_default",
         dict(support_images=images[None, :support],
              support_labels=labels,
              query_images=images[None, support:])),
        ("predict_encoded",
         dict(support_image_bytes=encoded[None, :support],
              support_labels=labels,
              query_image_bytes=encoded[None, support:])),
    ]


def write_warmup(path: str, model_name: str, requests: Sequence[WarmupRequest]) -> None:
    """Writes `requests` as TF Serving's warm-up file (`WARMUP_PATH` of a version).

    A TFRecord of `tensorflow.serving.PredictionLog`s, each holding a
    PredictRequest; TF Serving replays them when it loads the version, before
    it serves, so no client request pays the first run of a signature.

    Args:
      path: File to write.
      model_name: `model_spec.name` of the requests (TF Serving replays them
        on the model being loaded, whatever its name).
      requests: `(signature name, inputs)` pairs.

    Raises:
      ValueError: no request, or more than TF Serving accepts.
      ImportError: tensorflow-serving-api is not installed.
    """
    if not 1 <= len(requests) <= MAX_WARMUP_RECORDS:
        raise ValueError(f"{len(requests)} warm-up requests: TF Serving takes 1 to "
                         f"{MAX_WARMUP_RECORDS}")
    prediction_log = serving_requests.serving_api("prediction_log_pb2",
                                                  "TF Serving warm-up records")
    with tf.io.TFRecordWriter(path) as writer:
        for signature, inputs in requests:
            record = prediction_log.PredictionLog()
            record.predict_log.request.CopyFrom(
                serving_requests.grpc_request(model_name, signature, inputs))
            writer.write(record.SerializeToString())
