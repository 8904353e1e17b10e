"""Scalar summaries read back from a run's TensorBoard event files.

`train` writes its summaries with `tf.summary.scalar`, which TF2 stores as
tensor events (a rank-0 tensor with the "scalars" plugin's metadata), so they
are read from TensorBoard's `EventAccumulator` tensor store, with no sampling.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from tensorboard.backend.event_processing import event_accumulator
import tensorflow as tf


def read_scalars(directory: str,
                 tags: Sequence[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Scalar summaries of `tags` from the event files in `directory`.

    A resumed run writes the iterations after its checkpoint again, to a new
    event file; the value written last (by wall time) wins. A truncated final
    record (a writer killed mid-write) is skipped by the event file loader.

    Args:
      directory: A directory of `events.out.tfevents.*` files (any path
        `tf.io.gfile` reads); a missing one holds no summaries.
      tags: Summary tags to read; tags never written are left out.

    Returns:
      Per tag found, `(steps, values)`: int64 steps ascending and their float64
      values.
    """
    if not tf.io.gfile.isdir(directory):
        return {}
    # Size 0 keeps every event: the default guidance samples tensors down to 10.
    accumulator = event_accumulator.EventAccumulator(
        directory, size_guidance={event_accumulator.TENSORS: 0})
    accumulator.Reload()
    found = set(accumulator.Tags()[event_accumulator.TENSORS])
    scalars = {}
    for tag in tags:
        if tag not in found:
            continue
        by_step = {}
        # sorted() is stable: events of equal wall time keep their file order.
        for event in sorted(accumulator.Tensors(tag), key=lambda event: event.wall_time):
            by_step[event.step] = float(tf.make_ndarray(event.tensor_proto))
        steps = sorted(by_step)
        scalars[tag] = (np.array(steps, dtype=np.int64),
                        np.array([by_step[step] for step in steps], dtype=np.float64))
    return scalars
