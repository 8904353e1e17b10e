"""A procedurally generated family of glyph-like classes: offline test and demo data.

Not a benchmark. Each class is a random glyph of 3 to 5 straight strokes (some
joined into a polyline) in a random ink colour; each image of the class redraws
it with small jitter: scale, shift, stroke end points, stroke thickness and
pixel noise. Background is 1 and ink darker, as in Omniglot. Classes are
clearly distinguishable (a small conv net learns 5-way 1-shot quickly), so it
serves as the data of fast tests and of a short smoke run; numbers on it say
nothing about Omniglot or mini-ImageNet.

Deterministic from a seed (each split has its own stream, so changing one
split's size leaves the others unchanged); any image shape; about a second for
the default sizes.
"""

from __future__ import annotations

import numpy as np

from mamlpp_tf.data.class_set import ClassSet

SPLITS = ("train", "val", "test")
_MAX_STROKES = 5
_CHUNK_ELEMENTS = 2**20  # bounds the [images, strokes, pixels] temporaries


def glyphs(num_classes: int, images_per_class: int, image_shape: tuple[int, int, int],
           rng: np.random.Generator) -> np.ndarray:
    """Draws `num_classes` glyph classes.

    Args:
      num_classes: Number of classes.
      images_per_class: Jittered drawings per class.
      image_shape: `(H, W, C)`.
      rng: Source of randomness.

    Returns:
      float32 `[num_classes, images_per_class, H, W, C]` in [0, 1].
    """
    height, width, channels = image_shape
    # Class prototypes: stroke end points in [0.15, 0.85]^2, in (y, x) canvas units.
    points = rng.uniform(0.15, 0.85, size=(num_classes, _MAX_STROKES, 2, 2))
    joined = rng.random((num_classes, _MAX_STROKES)) < 0.5
    for s in range(1, _MAX_STROKES):  # a joined stroke starts where the previous ended
        points[joined[:, s], s, 0] = points[joined[:, s], s - 1, 1]
    num_strokes = rng.integers(3, _MAX_STROKES + 1, size=(num_classes, 1))
    used = np.arange(_MAX_STROKES) < num_strokes
    if channels > 1:  # a random ink colour per class
        ink = rng.uniform(0.0, 0.6, size=(num_classes, channels))
    else:
        ink = np.zeros((num_classes, 1))

    # Per-image jitter.
    n = num_classes * images_per_class
    points = np.repeat(points, images_per_class, axis=0)
    scale = rng.uniform(0.9, 1.1, size=(n, 1, 1, 1))
    shift = rng.uniform(-0.07, 0.07, size=(n, 1, 1, 2))
    end_jitter = rng.normal(0.0, 0.02, size=points.shape)
    points = (points - 0.5) * scale + 0.5 + shift + end_jitter
    thickness = rng.uniform(0.03, 0.055, size=(n, 1))
    used = np.repeat(used, images_per_class, axis=0)

    ys, xs = np.meshgrid((np.arange(height) + 0.5) / height,
                         (np.arange(width) + 0.5) / width,
                         indexing="ij")
    pixels = np.stack([ys.ravel(), xs.ravel()], axis=-1).astype(np.float32)  # [P, 2]
    coverage = np.empty((n, height * width), np.float32)
    chunk = max(1, _CHUNK_ELEMENTS // (_MAX_STROKES * height * width))
    for i in range(0, n, chunk):
        squared = _squared_segment_distance(pixels, points[i:i + chunk])  # [b, S, P]
        squared[~used[i:i + chunk]] = np.inf
        distance = np.sqrt(squared.min(axis=1))
        # Anti-aliased stroke: full ink inside the stroke, a one-pixel ramp at its edge.
        coverage[i:i + chunk] = np.clip(
            (thickness[i:i + chunk] - distance) * max(height, width) + 0.5, 0, 1)
    darkness = np.repeat(1.0 - ink, images_per_class, axis=0).astype(np.float32)
    images = coverage[..., None] * darkness[:, None, :]  # [n, P, C]
    np.subtract(1.0, images, out=images)
    # Pixel noise, the same on every channel.
    noise = rng.standard_normal(coverage.shape, dtype=np.float32)
    noise *= np.float32(0.05)
    images += noise[..., None]
    np.clip(images, 0.0, 1.0, out=images)
    return images.reshape(num_classes, images_per_class, height, width, channels)


def from_uint8(images: np.ndarray) -> np.ndarray:
    """8-bit images as the generator's float32 values in [0, 1]: `x / 255`."""
    return images.astype(np.float32) / np.float32(255.0)


def _squared_segment_distance(pixels: np.ndarray, segments: np.ndarray) -> np.ndarray:
    """Squared distances `[b, S, P]` from pixels `[P, 2]` to segments `[b, S, 2, 2]`.

    Works on (y, x) components separately and in place: this is the hot loop.
    """
    segments = segments.astype(np.float32)
    start_y, start_x = segments[:, :, 0, 0, None], segments[:, :, 0, 1, None]
    dir_y = segments[:, :, 1, 0, None] - start_y
    dir_x = segments[:, :, 1, 1, None] - start_x
    inv_length2 = 1.0 / np.maximum(dir_y * dir_y + dir_x * dir_x, 1e-12)
    off_y = pixels[:, 0] - start_y
    off_x = pixels[:, 1] - start_x
    along = off_y * dir_y  # projection of the pixel on the segment, clipped to [0, 1]
    along += off_x * dir_x
    along *= inv_length2
    np.clip(along, 0.0, 1.0, out=along)
    off_y -= along * dir_y
    off_x -= along * dir_x
    off_y *= off_y
    off_x *= off_x
    off_y += off_x
    return off_y


def load(num_classes: tuple[int, int, int] = (64, 20, 20),
         images_per_class: int = 20,
         image_shape: tuple[int, int, int] = (28, 28, 1),
         seed: int = 0) -> dict[str, ClassSet]:
    """Builds the synthetic train/val/test class sets.

    Args:
      num_classes: Classes of train, val and test.
      images_per_class: Drawings per class.
      image_shape: `(H, W, C)`, e.g. `(28, 28, 1)` or `(84, 84, 3)`.
      seed: Seed of the whole family.

    Returns:
      `{"train", "val", "test"}` -> `ClassSet` of float32
      `[classes, images_per_class, H, W, C]` in [0, 1]; no augmentation.

    Raises:
      ValueError: A size is out of range; the message names it.
    """
    image_shape = tuple(int(d) for d in image_shape)
    if len(image_shape) != 3 or min(image_shape[:2]) < 8 or image_shape[2] < 1:
        raise ValueError(
            f"image_shape={image_shape} must be (H, W, C) with H, W >= 8, C >= 1")
    if len(num_classes) != 3 or min(num_classes) < 1:
        raise ValueError(
            f"num_classes={num_classes} must be 3 positive sizes (train, val, test)")
    if images_per_class < 1:
        raise ValueError(f"images_per_class={images_per_class} must be >= 1")
    sets = {}
    for index, (split, count) in enumerate(zip(SPLITS, num_classes)):
        rng = np.random.default_rng([seed, index])
        sets[split] = ClassSet(images=glyphs(count, images_per_class, image_shape, rng),
                               class_names=tuple(
                                   f"glyph_{split}_{c:04d}" for c in range(count)),
                               split=split,
                               dataset="synthetic")
    return sets
