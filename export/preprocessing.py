"""Image preprocessing of an exported model: the training pipeline, as graph ops.

A served model receives PNG/JPEG bytes of any size and must see them exactly
as training saw its images. Three kinds, chosen by the run's dataset:

* `"omniglot"` (Omniglot): decoded to one channel with TensorFlow's decoder
  (what the TFDS pipeline used in training), resized to the network's H×W by
  nearest neighbour with source index `floor((y + 0.5) * h / H)` (Pillow's
  sampling of the official 105×105 PNGs, `omniglot.preprocess`), then pixels
  above 127 become 1.0 and ink 0.0 (background 1). An image of another size
  goes through the same formula with its own `h`, `w`: stretched to H×W, no
  cropping or padding, then binarised.
* `"imagenet"` (mini-ImageNet): RGB, resized to H×W, `x / 255` normalised
  with ImageNet's mean and std. Support files on disk go through the
  training code itself (`mini_imagenet.decode_image`: Pillow's default filter,
  skipped when the size already matches). The graph decodes with TensorFlow;
  it is exact for images already H×W and approximates Pillow's resampling
  with an antialiased bicubic resize otherwise.
* `"unit"` (the synthetic glyphs): C channels, the nearest-neighbour resize
  above, `x / 255` (the synthetic images are in [0, 1]).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf

from mamlpp_tf.config import RunConfig
from mamlpp_tf.data import mini_imagenet
from mamlpp_tf.data.registry import SERVING_KINDS as KINDS
from mamlpp_tf.data.registry import dataset_info, serving_info


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """How encoded images become the float images `[H, W, C]` a network takes.

    Attributes:
      kind: One of `KINDS` (see the module docstring).
      image_shape: `(H, W, C)` of the network's input.

    Raises:
      ValueError: `kind` is unknown or does not fit the channel count.
    """
    kind: str
    image_shape: tuple[int, int, int]

    def __post_init__(self):
        object.__setattr__(self, "image_shape", tuple(int(d) for d in self.image_shape))
        if self.kind not in KINDS:
            raise ValueError(f"preprocessing kind {self.kind!r} must be one of {KINDS}")
        if self.image_shape[2] not in serving_info(self.kind).channels:
            raise ValueError(f"{self.kind} preprocessing cannot make images of shape "
                             f"{self.image_shape}")

    @classmethod
    def for_run(cls, config: RunConfig) -> Preprocessing:
        """The preprocessing the run's dataset used in training."""
        return cls(dataset_info(config.dataset).serving_kind, config.learner.image_shape)

    def pixel_values(self) -> np.ndarray:
        """float32 `[256, C]`: the network's value of 8-bit level `v` in channel `c`.

        Computed once with numpy by the training code's own function (the
        dataset's `preprocess` in `data.registry`); the graph looks values up
        instead of recomputing them, so graph rewrites (e.g. a division turned
        into a multiplication) cannot change a bit.
        """
        levels = np.repeat(
            np.arange(256, dtype=np.uint8)[:, None], self.image_shape[2], 1)
        return serving_info(self.kind).preprocess(levels)

    def decode(self, image_bytes: tf.Tensor) -> tf.Tensor:
        """One PNG/JPEG (scalar string) as float32 `[H, W, C]`; graph-compatible."""
        height, width, channels = self.image_shape
        image = tf.io.decode_image(image_bytes,
                                   channels=channels,
                                   expand_animations=False)
        image.set_shape([None, None, channels])
        if self.kind == "imagenet":
            image = tf.cond(tf.reduce_all(tf.shape(image)[:2] == [height, width]),
                            lambda: image, lambda: _bicubic(image, height, width))
        else:
            rows = _nearest_indices(tf.shape(image)[0], height)
            cols = _nearest_indices(tf.shape(image)[1], width)
            image = tf.gather(tf.gather(image, rows, axis=0), cols, axis=1)
        # Flat index into pixel_values(): value * C + channel.
        index = tf.cast(image, tf.int32) * channels + tf.range(channels)
        return tf.gather(tf.constant(self.pixel_values().reshape(-1)), index)

    def decode_batch(self, image_bytes: tf.Tensor) -> tf.Tensor:
        """Strings `[B]` (images of any sizes) as float32 `[B, H, W, C]`."""
        return tf.map_fn(self.decode,
                         image_bytes,
                         fn_output_signature=tf.TensorSpec(self.image_shape,
                                                           tf.float32))

    def load_file(self, path: str) -> np.ndarray:
        """Reads one image file as float32 `[H, W, C]`, as training read its images.

        Raises:
          ValueError: The file cannot be read as an image; the message names it.
        """
        if self.kind == "imagenet":
            height, width, _ = self.image_shape
            if height != width:
                raise ValueError(f"imagenet preprocessing needs square images, the "
                                 f"network takes {self.image_shape}")
            return mini_imagenet.normalize(mini_imagenet.decode_image(path, height))
        try:
            with open(path, "rb") as stream:
                return self.decode(tf.constant(stream.read())).numpy()
        except (OSError, tf.errors.InvalidArgumentError) as error:
            message = getattr(error, "message", None) or str(error)
            raise ValueError(f"cannot read image {path}: {message}") from None

    def to_dict(self) -> dict:
        """A JSON-serialisable description (written beside each export)."""
        return dict(kind=self.kind, image_shape=list(self.image_shape))


def _bicubic(image: tf.Tensor, height: int, width: int) -> tf.Tensor:
    """Antialiased bicubic resize of uint8 `image`, rounded to uint8 as Pillow's is."""
    resized = tf.image.resize(image, [height, width], method="bicubic", antialias=True)
    return tf.cast(tf.round(tf.clip_by_value(resized, 0.0, 255.0)), tf.uint8)


def _nearest_indices(source: tf.Tensor, target: int) -> tf.Tensor:
    """`floor((i + 0.5) * source / target)` for `i < target`, in integer arithmetic."""
    source = tf.cast(source, tf.int64)
    return (2 * tf.range(target, dtype=tf.int64) + 1) * source // (2 * target)
