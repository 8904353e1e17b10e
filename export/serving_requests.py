"""Predict requests for the exported models through TF Serving's REST and gRPC APIs.

Both models have a `predict_encoded` signature taking PNG/JPEG bytes, so a
client sends image files as they are and needs no preprocessing:

* task model: `{"image_bytes": [bytes, ...]}`;
* meta-model: `{"support_image_bytes": [...], "support_labels": int32 [...],
  "query_image_bytes": [...]}`.

REST bodies use the columnar `"inputs"` format (the meta-model's inputs have
different lengths, which the row format cannot express), with bytes as
`{"b64": ...}`; the answer is `{"outputs": {name: value}}`. REST needs only the
standard library (`urllib`). gRPC uses `grpcio` (a TensorFlow dependency) and the
protos of `tensorflow-serving-api`, an optional dependency installed with
`pip install --no-deps tensorflow-serving-api` (it requires the full
`tensorflow` wheel, which must not sit beside tensorflow-cpu); the gRPC
functions import it when called, so REST works without it.
"""

from __future__ import annotations

import base64
import importlib
import json
import types
from typing import Any, Mapping, Sequence
import urllib.error
import urllib.request

import grpc
import numpy as np
import tensorflow as tf

from export.support import class_folders

Inputs = Mapping[str, np.ndarray]
ENCODED_SIGNATURE = "predict_encoded"
PROTOCOLS = ("rest", "grpc")


class ServingError(RuntimeError):
    """The model server refused or failed a request; the message says why."""


def read_files(paths: Sequence[str]) -> np.ndarray:
    """The bytes of each file, as an object array (a string tensor's numpy form)."""
    contents = []
    for path in paths:
        with open(path, "rb") as stream:
            contents.append(stream.read())
    return np.array(contents, dtype=object)


def task_inputs(image_files: Sequence[str]) -> dict[str, np.ndarray]:
    """Inputs of the task model's `predict_encoded` for some image files."""
    return {"image_bytes": read_files(image_files)}


def meta_inputs(support: str,
                query_files: Sequence[str]) -> tuple[dict[str, np.ndarray], list[str]]:
    """Inputs of the meta-model's `predict_encoded` and the support class names.

    Args:
      support: A support folder, one sub-folder per class (`export.support`).
      query_files: Images to classify.

    Raises:
      ValueError: a bad support folder (see `export.support.class_folders`).
    """
    classes = class_folders(support)
    files = [file for _, class_files in classes for file in class_files]
    labels = [
        label for label, (_, class_files) in enumerate(classes) for _ in class_files
    ]
    inputs = {
        "support_image_bytes": read_files(files),
        "support_labels": np.asarray(labels, np.int32),
        "query_image_bytes": read_files(query_files)
    }
    return inputs, [name for name, _ in classes]


def rest_body(signature_name: str, inputs: Inputs) -> dict:
    """A TF Serving REST predict body in the columnar format."""
    return {
        "signature_name": signature_name,
        "inputs": {
            name: _to_json(value) for name, value in inputs.items()
        }
    }


def _to_json(value: np.ndarray) -> list:
    if value.dtype == object:
        return [{"b64": base64.b64encode(item).decode("ascii")} for item in value]
    return value.tolist()


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


def serving_api(module: str) -> types.ModuleType:
    """`tensorflow_serving.apis.<module>`, or an ImportError saying how to get it."""
    try:
        return importlib.import_module(f"tensorflow_serving.apis.{module}")
    except ImportError as error:
        raise ImportError(
            "gRPC requests need tensorflow-serving-api: pip install --no-deps "
            f"tensorflow-serving-api ({error})") from None


def grpc_request(model_name: str,
                 signature_name: str,
                 inputs: Inputs,
                 version: int | None = None) -> Any:
    """A `tensorflow.serving.PredictRequest` carrying `inputs` as TensorProtos."""
    request = serving_api("predict_pb2").PredictRequest()
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
      ServingError: the server is unreachable or answered with an error.
    """
    with grpc.insecure_channel(server) as channel:
        stub = serving_api("prediction_service_pb2_grpc").PredictionServiceStub(channel)
        try:
            response = stub.Predict(request, timeout=timeout_s)
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
    """Sends `inputs` to the `predict_encoded` signature over `"rest"` or `"grpc"`."""
    if protocol == "rest":
        return rest_predict(rest_url(server, model_name, version),
                            rest_body(ENCODED_SIGNATURE, inputs), timeout_s)
    return grpc_predict(server,
                        grpc_request(model_name, ENCODED_SIGNATURE, inputs, version),
                        timeout_s)


def format_predictions(files: Sequence[str],
                       outputs: Mapping[str, np.ndarray],
                       class_names: Sequence[str] | None = None) -> str:
    """One `file<TAB>class<TAB>probability` line per image.

    Args:
      files: The classified images, in request order.
      outputs: The model's answer.
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
