"""Where a step's time goes: TensorFlow's profiler, summed by kind of op.

One call of a step runs under `tf.profiler.experimental`; the trace's op
events (XPlane, read with the protobuf that ships with TensorFlow) are summed
into convolutions, matmuls and everything else (batch norm, activations,
pooling, their gradients, copies). With the step's FLOPs, the convolutions'
own GFLOP/s tell whether a case is bound by the products or by the rest.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
import glob
import os
import tempfile

import tensorflow as tf
from tensorflow.tsl.profiler.protobuf import xplane_pb2  # pylint: disable=no-name-in-module

CONVOLUTIONS = ("Conv2D", "Conv2DBackpropInput", "Conv2DBackpropFilter")
MATMULS = ("MatMul", "BatchMatMul", "BatchMatMulV2", "BatchMatMulV3")


def _op_type(event_name: str) -> str | None:
    """The op type of an op event (`"<op name>:<op type>"`), None for other events.

    Spans that enclose ops, such as `ExecutorState::Process` or
    `EagerLocalExecute: __inference_step_…`, are not op events.
    """
    if "::" in event_name or ": " in event_name or ":" not in event_name:
        return None
    return event_name.rsplit(":", 1)[1]


def _base_type(op_type: str) -> str:
    """The op type without oneDNN's prefixes, and a fused product's without Grappler's.

    `_MklNativeFusedConv2D` → `Conv2D`, `_MklNativeFusedBatchNormV3` →
    `FusedBatchNormV3`.

    Grappler's remapper fuses a convolution with its bias add (`_FusedConv2D`,
    oneDNN's `_MklNativeFusedConv2D`); the product dominates such an op, so
    it counts as a convolution.
    """
    base = op_type.removeprefix("_MklNative").removeprefix("_Mkl")
    product = base.removeprefix("_Fused").removeprefix("Fused")
    # Other fused kernels keep their name (`FusedBatchNormV3` is batch norm).
    return product if _product_kind(product) else base


def _product_kind(base: str) -> str | None:
    if base in CONVOLUTIONS or base.startswith("Conv2D"):
        return "convolution"
    if base in MATMULS or base.startswith("MatMul"):
        return "matmul"
    return None


def _kind(op_type: str) -> str:
    return _product_kind(_base_type(op_type)) or "other"


def split(by_type: dict[str, float], top: int = 8) -> dict:
    """The profile split of `op_type_seconds`: seconds by kind and the largest "other" types.

    Args:
      by_type: Op seconds by op type.
      top: How many op types of "other" to list by name; the rest are summed
        under `"(rest)"`.

    Returns:
      `{"convolution": s, "matmul": s, "other": s, "other_by_type": {type: s}}`,
      seconds rounded to 0.1 ms, the types largest first.
    """
    seconds = {"convolution": 0.0, "matmul": 0.0, "other": 0.0}
    others = collections.Counter()
    for op_type, value in by_type.items():
        kind = _kind(op_type)
        seconds[kind] += value
        if kind == "other":
            others[_base_type(op_type)] += value
    listed = dict(others.most_common(top))
    rest = sum(others.values()) - sum(listed.values())
    if rest > 0:
        listed["(rest)"] = rest
    result = {kind: round(value, 4) for kind, value in seconds.items()}
    result["other_by_type"] = {name: round(value, 4) for name, value in listed.items()}
    return result


def op_type_seconds(step: Callable[[], None]) -> dict[str, float]:
    """Seconds of op execution by op type during one call of `step`.

    Args:
      step: Runs one (already traced and warmed-up) step to completion.

    Returns:
      `{op type: seconds}` summed over the executor's threads, op types as
      the runtime names them (oneDNN's `_MklNative…` included).
    """
    seconds = collections.Counter()
    with tempfile.TemporaryDirectory() as logdir:
        tf.profiler.experimental.start(logdir)
        try:
            step()
        finally:
            tf.profiler.experimental.stop()
        for path in glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True):
            space = xplane_pb2.XSpace()
            with open(path, "rb") as stream:
                space.ParseFromString(stream.read())
            for plane in space.planes:
                names = {key: meta.name for key, meta in plane.event_metadata.items()}
                for line in plane.lines:
                    for event in line.events:
                        op_type = _op_type(names.get(event.metadata_id, ""))
                        if op_type is not None:
                            seconds[op_type] += event.duration_ps * 1e-12
    return dict(seconds)
