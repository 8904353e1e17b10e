"""The inputs of an exported model's `serving_default`, from image files, as `.npy` files.

What `saved_model_cli run --inputs` takes: for a task model `images` float32
`[B, H, W, C]`; for the meta-model one task, `support_images` float32
`[1, N·K, H, W, C]`, `support_labels` int32 `[1, N·K]` and `query_images`
float32 `[1, Q, H, W, C]` (label `i` is the `i`-th class of the support set,
as `mamlpp_tf_export.support` reads it). Images are preprocessed as training
did, by the preprocessing recorded in the version's export information.
"""

from __future__ import annotations

from collections.abc import Sequence
import io
import os

import numpy as np

from mamlpp_tf import files
from mamlpp_tf_export import saved_models
from mamlpp_tf_export.preprocessing import Preprocessing
from mamlpp_tf_export.serving_requests import IMAGE_EXTENSIONS, is_image_file
from mamlpp_tf_export.support import load_image, load_support


def image_files(entries: Sequence[str]) -> list[str]:
    """The image files that `entries` name: files as given, folders as their images, sorted.

    A folder stands for its PNG/JPEG files (hidden ones and sub-folders left out).

    Raises:
      ValueError: an entry does not exist, or a folder holds no image.
    """
    found = []
    for entry in entries:
        if os.path.isdir(entry):
            images = sorted(path for path in (os.path.join(entry, name)
                                              for name in os.listdir(entry))
                            if is_image_file(path))
            if not images:
                raise ValueError(f"folder {entry} has no images ({'/'.join(IMAGE_EXTENSIONS)})")
            found += images
        elif os.path.isfile(entry):
            found.append(entry)
        else:
            raise ValueError(f"image file or folder {entry} does not exist")
    return found


def model_inputs(version_dir: str, images: Sequence[str] = (), support: str | None = None,
                 query: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """The inputs of the `serving_default` of the model in `version_dir`, from image files.

    Args:
      version_dir: A version folder of a task model or of the meta-model.
      images: Task model: image files or folders (see `image_files`).
      support: Meta-model: the support set, a folder or an `.npz`
        (`mamlpp_tf_export.support`).
      query: Meta-model: image files or folders.

    Returns:
      Input name -> array, as the module docstring lists them.

    Raises:
      ValueError: `version_dir` holds no export information, the arguments do
        not fit its model, or an image, the support set or its class count is
        bad (naming the file, class or folder).
    """
    info = saved_models.read_info(version_dir)
    preprocessing = Preprocessing(info["preprocessing"]["kind"],
                                  info["preprocessing"]["image_shape"])

    def load(entries: Sequence[str]) -> np.ndarray:
        return np.stack([load_image(preprocessing, file) for file in image_files(entries)])

    if info["model"] == "meta":
        if support is None or not query or images:
            raise ValueError(f"{version_dir} is a meta-model: it takes a support set and query "
                             "images, not a task model's images")
        support_set = load_support(support, preprocessing, info["n_way"])
        return {"support_images": support_set.images[None],
                "support_labels": support_set.labels[None],
                "query_images": load(query)[None]}
    if not images or support is not None or query:
        raise ValueError(f"{version_dir} is a task model: it takes the images to classify, "
                         "not a support set or query images")
    return {"images": load(images)}


def write_npy(inputs: dict[str, np.ndarray], out: str) -> str:
    """Writes each input to `out/<name>.npy`; returns `saved_model_cli run`'s `--inputs`.

    Raises:
      files.WriteError: the filesystem refused a write (each file is written
        whole or not at all).
    """
    paths = {}
    for name, value in inputs.items():
        buffer = io.BytesIO()
        np.save(buffer, value)
        paths[name] = os.path.join(out, f"{name}.npy")
        files.atomic_write(paths[name], buffer.getvalue())
    return ";".join(f"{name}={path}" for name, path in paths.items())
