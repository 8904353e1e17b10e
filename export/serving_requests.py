"""Predict requests for the exported models through TF Serving's REST and gRPC APIs.

Both models have a `predict_encoded` signature taking PNG/JPEG bytes, so a
client sends image files as they are and needs no preprocessing (the graph
decodes and preprocesses them as training did):

* task model: `{"image_bytes": [B]}`, answering `probabilities [B, N]`,
  `class_ids [B]`, `class_names [B]`;
* meta-model: a leading task axis on every input, `{"support_image_bytes":
  [T, N·K], "support_labels": int32 [T, N·K], "query_image_bytes": [T, Q]}`,
  answering `logits`/`probabilities [T, Q, N]` and `class_ids [T, Q]`. The
  axis lets TF Serving's request batching concatenate concurrent requests;
  this client sends one task per request (`T = 1`).

REST bodies use the columnar `"inputs"` format with bytes as `{"b64": ...}`
at any depth; the answer is `{"outputs": {name: value}}`. REST needs only the
standard library and numpy: this module imports nothing else at import time,
so `python -m mamlpp_tf_export.client` runs where TensorFlow is not installed. gRPC
needs `grpcio` and the protos of `tensorflow-serving-api` (which import
TensorFlow; mamlpp_tf's set-up installs them, a client-only environment with
`pip install tensorflow-serving-api`); the gRPC functions import them when called.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
import importlib
import json
import logging
import os
import types
from typing import Any
import urllib.error
import urllib.request

import numpy as np

Inputs = Mapping[str, np.ndarray]
ENCODED_SIGNATURE = "predict_encoded"
PROTOCOLS = ("rest", "grpc")
# The support-folder layout, shared with `mamlpp_tf_export.support`.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
# The standard library's logger (absl's handler shows it in the entry points);
# absl itself would be one more import for the light client.
_LOG = logging.getLogger(__name__)
INSTALL_SERVING_API = "pip install tensorflow-serving-api"


class ServingError(RuntimeError):
    """The model server refused or failed a request; the message says why."""


def is_image_file(path: str) -> bool:
    """Whether `path` is an image a folder of images stands for: a PNG/JPEG file, not hidden."""
    name = os.path.basename(path)
    return (not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS) and
            os.path.isfile(path))


def class_folders(path: str) -> list[tuple[str, list[str]]]:
    """Lists `(class name, image paths)` of a support folder, classes sorted.

    The layout of `mamlpp_tf_export.support`: one sub-folder per class, PNG/JPEG files
    in it. Hidden entries, other files and deeper folders are skipped, with
    one warning naming every one of them (e.g. `README.txt`, `.DS_Store`).

    Raises:
      ValueError: `path` is not a folder, has no class folders, or a class
        folder holds no image.
    """
    if not os.path.isdir(path):
        raise ValueError(f"support folder {path} does not exist")
    classes, skipped = [], []
    for name in sorted(os.listdir(path)):
        folder = os.path.join(path, name)
        if name.startswith(".") or not os.path.isdir(folder):
            skipped.append(name + ("/" if os.path.isdir(folder) else ""))
            continue
        files = []
        for file in sorted(os.listdir(folder)):
            file_path = os.path.join(folder, file)
            if is_image_file(file_path):
                files.append(file_path)
            else:
                skipped.append(f"{name}/{file}" + ("/" if os.path.isdir(file_path) else ""))
        if not files:
            raise ValueError(f"class {name!r} ({folder}) has no images "
                             f"({'/'.join(IMAGE_EXTENSIONS)})")
        classes.append((name, files))
    if not classes:
        raise ValueError(f"support folder {path} has no class sub-folders")
    if skipped:
        _LOG.warning("support folder %s: skipped %d entries that are neither class "
                        "folders nor %s images in them: %s", path, len(skipped),
                        "/".join(IMAGE_EXTENSIONS), ", ".join(skipped))
    return classes


def read_files(paths: Sequence[str]) -> np.ndarray:
    """The bytes of each file, as an object array (a string tensor's numpy form)."""
    contents = np.empty(len(paths), dtype=object)
    for i, path in enumerate(paths):
        with open(path, "rb") as stream:
            contents[i] = stream.read()
    return contents


def task_inputs(image_files: Sequence[str]) -> dict[str, np.ndarray]:
    """Inputs of the task model's `predict_encoded` for some image files."""
    return {"image_bytes": read_files(image_files)}


def meta_inputs(support: str,
                query_files: Sequence[str]) -> tuple[dict[str, np.ndarray], list[str]]:
    """Inputs of the meta-model's `predict_encoded` for one task, and its class names.

    Args:
      support: A support folder, one sub-folder per class (`class_folders`).
      query_files: Images to classify.

    Returns:
      `(inputs, class names)`: inputs with a task axis of 1 (`[1, N·K]`,
      `[1, Q]`); label `i` is the `i`-th class name.

    Raises:
      ValueError: a bad support folder (see `class_folders`) or no query.
    """
    if not query_files:
        raise ValueError("the meta-model needs at least one query image")
    classes = class_folders(support)
    files = [file for _, class_files in classes for file in class_files]
    labels = [
        label for label, (_, class_files) in enumerate(classes) for _ in class_files
    ]
    inputs = {
        "support_image_bytes": read_files(files)[None],
        "support_labels": np.asarray(labels, np.int32)[None],
        "query_image_bytes": read_files(query_files)[None]
    }
    return inputs, [name for name, _ in classes]


def one_task(outputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The meta-model's answer for a one-task request, without the task axis.

    Raises:
      ServingError: the answer does not hold exactly one task.
    """
    shapes = {name: np.shape(value) for name, value in outputs.items()}
    if not shapes or any(shape[:1] != (1,) for shape in shapes.values()):
        raise ServingError("expected the meta-model's answer for one task (outputs "
                           f"[1, ...]), got shapes {shapes}")
    return {name: np.asarray(value)[0] for name, value in outputs.items()}


def rest_body(signature_name: str, inputs: Inputs) -> dict:
    """A TF Serving REST predict body in the columnar format."""
    return {
        "signature_name": signature_name,
        "inputs": {
            name: _to_json(np.asarray(value)) for name, value in inputs.items()
        }
    }


def _to_json(value: np.ndarray) -> Any:
    """Nested lists; bytes become `{"b64": ...}` objects, as TF Serving's JSON wants."""

    def encode(item: Any) -> Any:
        if isinstance(item, list):
            return [encode(element) for element in item]
        if isinstance(item, bytes):
            return {"b64": base64.b64encode(item).decode("ascii")}
        return item

    return encode(value.tolist())


def rest_url(server: str, model_name: str, version: int | None = None) -> str:
    """`http://SERVER/v1/models/NAME[/versions/N]:predict`."""
    versioned = f"/versions/{version}" if version is not None else ""
    return f"http://{server}/v1/models/{model_name}{versioned}:predict"


def rest_predict(url: str,
                 body: dict,
                 timeout_s: float = 30.0) -> dict[str, np.ndarray]:
    """POSTs `body` to a REST predict `url`; returns the outputs as arrays.

    Raises:
      ServingError: the server is unreachable or answered with an error.
    """
    request = urllib.request.Request(url,
                                     data=json.dumps(body).encode("utf-8"),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            answer = json.load(response)
    except urllib.error.HTTPError as error:
        raise ServingError(f"{url}: HTTP {error.code}: "
                           f"{error.read().decode('utf-8', 'replace')}") from None
    except (urllib.error.URLError, OSError) as error:
        raise ServingError(f"{url}: {error}") from None
    return {name: np.asarray(value) for name, value in answer["outputs"].items()}


def serving_api(module: str, purpose: str = "gRPC requests") -> types.ModuleType:
    """`tensorflow_serving.apis.<module>`, or an ImportError naming the install command.

    Args:
      module: Module of `tensorflow_serving.apis`, e.g. `"predict_pb2"`.
      purpose: What needs it, for the error message.
    """
    # The protos import TensorFlow: mamlpp_tf loads it first with its start-up
    # notices dropped (mamlpp_tf/__init__.py), so the client's output stays clean.
    importlib.import_module("mamlpp_tf")
    try:
        return importlib.import_module(f"tensorflow_serving.apis.{module}")
    except ImportError as error:
        raise ImportError(f"{purpose} need tensorflow-serving-api: "
                          f"{INSTALL_SERVING_API} ({error})") from None


def grpc_request(model_name: str,
                 signature_name: str,
                 inputs: Inputs,
                 version: int | None = None) -> Any:
    """A `tensorflow.serving.PredictRequest` carrying `inputs` as TensorProtos.

    Raises:
      ImportError: tensorflow-serving-api is not installed.
    """
    request = serving_api("predict_pb2").PredictRequest()
    # The protos above import TensorFlow already.
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    request.model_spec.name = model_name
    request.model_spec.signature_name = signature_name
    if version is not None:
        request.model_spec.version.value = version
    for name, value in inputs.items():
        request.inputs[name].CopyFrom(tf.make_tensor_proto(value))
    return request


def grpc_predict(server: str,
                 request: Any,
                 timeout_s: float = 30.0) -> dict[str, np.ndarray]:
    """Sends `request` to TF Serving's gRPC PredictionService at `server` (host:port).

    Raises:
      ImportError: tensorflow-serving-api is not installed.
      ServingError: the server is unreachable or answered with an error.
    """
    service = serving_api("prediction_service_pb2_grpc")
    import grpc  # pylint: disable=g-import-not-at-top
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    with grpc.insecure_channel(server) as channel:
        try:
            response = service.PredictionServiceStub(channel).Predict(request,
                                                                      timeout=timeout_s)
        except grpc.RpcError as error:
            raise ServingError(
                f"{server}: {error.code().name}: {error.details()}") from None
    return {name: tf.make_ndarray(proto) for name, proto in response.outputs.items()}


def predict(protocol: str,
            server: str,
            model_name: str,
            inputs: Inputs,
            version: int | None = None,
            timeout_s: float = 30.0) -> dict[str, np.ndarray]:
    """Sends `inputs` to the `predict_encoded` signature over `"rest"` or `"grpc"`.

    Raises:
      ValueError: an unknown `protocol`.
      ImportError, ServingError: as `grpc_predict` and `rest_predict`.
    """
    if protocol == "rest":
        return rest_predict(rest_url(server, model_name, version),
                            rest_body(ENCODED_SIGNATURE, inputs), timeout_s)
    if protocol == "grpc":
        request = grpc_request(model_name, ENCODED_SIGNATURE, inputs, version)
        return grpc_predict(server, request, timeout_s)
    raise ValueError(f"protocol {protocol!r} must be one of {PROTOCOLS}")


def format_predictions(files: Sequence[str],
                       outputs: Mapping[str, np.ndarray],
                       class_names: Sequence[str] | None = None) -> str:
    """One `file<TAB>class<TAB>probability` line per image.

    Args:
      files: The classified images, in request order.
      outputs: The model's answer for these images (for the meta-model, its
        one task: see `one_task`).
      class_names: Names of the class ids (the meta-model's support folders);
        None takes the task model's `class_names` output.
    """
    lines = []
    for i, file in enumerate(files):
        class_id = int(outputs["class_ids"][i])
        if class_names is None:
            name = outputs["class_names"][i]
            name = name.decode("utf-8") if isinstance(name, bytes) else str(name)
        else:
            name = class_names[class_id]
        lines.append(
            f"{file}\t{name}\t{float(outputs['probabilities'][i][class_id]):.4f}")
    return "\n".join(lines)
