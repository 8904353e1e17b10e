"""Benchmark of the episode sampler: meta-batches per second at the paper's shapes.

Prints one JSON line per case:

* `omniglot_20way_1shot`: 20-way 1-shot, 1 query per class, meta-batch 8, training
  stream with rotations, from the real prepared TFDS dir when there is one
  (`--omniglot_data_dir`, default `../shared/data/tfds`), else from random binary
  stand-in arrays of the paper split's shape `[1150, 20, 28, 28, 1]`;
* `mini_imagenet_5way_5shot`: 5-way 5-shot, 15 queries per class, meta-batch 2,
  from a generated folder of 84x84 JPEGs in a temporary directory, decoded per
  episode (`lazy`) and from memory (`in_memory`).

Compare `meta_batches_per_s` with the learner's meta-iterations per second
(`benchmarks/meta_step.py`): the sampler must be far faster. A benchmark, not a
test: timings on shared machines are noisy.

    python benchmarks/episodes.py
    python benchmarks/episodes.py --batches=500 --omniglot_data_dir=/path/to/tfds
"""

from __future__ import annotations

import json
import os
import pathlib
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# pylint: disable=g-import-not-at-top
from absl import app, flags
import numpy as np
from PIL import Image

from mamlpp_tf import data
from mamlpp_tf.data import mini_imagenet, omniglot

# pylint: enable=g-import-not-at-top

_DEFAULT_TFDS = pathlib.Path(
    __file__).resolve().parents[1].parent / "shared" / "data" / "tfds"


def time_stream(class_set: data.ClassSet,
                n_way: int,
                k_shot: int,
                n_query: int,
                meta_batch_size: int,
                batches: int,
                warmup: int = 5) -> dict:
    """Times `batches` meta-batches of a training stream after `warmup` ones."""
    dataset = data.episodes(class_set,
                            n_way,
                            k_shot,
                            n_query,
                            meta_batch_size,
                            seed=0,
                            split_kind="train")
    iterator = iter(dataset)
    for _ in range(warmup):
        next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    seconds = time.perf_counter() - start
    return dict(meta_batches_per_s=round(batches / seconds, 1),
                tasks_per_s=round(batches * meta_batch_size / seconds, 1))


def omniglot_case(data_dir: pathlib.Path, batches: int) -> dict:
    """20-way 1-shot Omniglot, real TFDS data when present."""
    start = time.perf_counter()
    if (data_dir / "omniglot" / "3.0.0" / "dataset_info.json").exists():
        train = omniglot.load("paper", data_dir=data_dir)["train"]
        source = f"tfds:{data_dir}"
    else:
        images = (np.random.RandomState(0).rand(1150, 20, 28, 28, 1)
                  < 0.9).astype(np.float32)
        train = data.ClassSet(images=images,
                              class_names=tuple(map(str, range(1150))),
                              split="train",
                              dataset="stand-in",
                              augment=True)
        source = "random stand-in arrays"
    load_s = time.perf_counter() - start
    return dict(case="omniglot_20way_1shot",
                source=source,
                load_s=round(load_s, 2),
                n_way=20,
                k_shot=1,
                n_query=1,
                meta_batch=8,
                rotations=train.augment,
                **time_stream(train, 20, 1, 1, 8, batches))


def write_jpeg_folder(root: pathlib.Path, classes: int, per_class: int) -> None:
    """`root/train/<wnid>/*.jpg`: random-texture 84x84 JPEGs."""
    rng = np.random.RandomState(0)
    for c in range(classes):
        class_dir = root / "train" / f"n{c:08d}"
        class_dir.mkdir(parents=True)
        for i in range(per_class):
            low = rng.randint(0, 256, size=(12, 12, 3), dtype=np.uint8)
            Image.fromarray(low).resize(
                (84, 84), Image.BILINEAR).save(class_dir / f"n{c:08d}_{i:05d}.jpg",
                                               quality=90)
    for split in ("val", "test"):
        (root / split / "n99999999").mkdir(parents=True)


def mini_imagenet_cases(batches: int,
                        classes: int = 16,
                        per_class: int = 60) -> list[dict]:
    """5-way 5-shot mini-ImageNet shapes from a generated JPEG folder."""
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp)
        write_jpeg_folder(root, classes, per_class)
        for in_memory in (False, True):
            start = time.perf_counter()
            train = mini_imagenet.load(root, in_memory=in_memory)["train"]
            load_s = time.perf_counter() - start
            records.append(
                dict(case="mini_imagenet_5way_5shot",
                     source=f"{classes}x{per_class} "
                     f"generated 84x84 JPEGs",
                     decoding="in_memory" if in_memory else "lazy",
                     load_s=round(load_s, 2),
                     n_way=5,
                     k_shot=5,
                     n_query=15,
                     meta_batch=2,
                     **time_stream(train, 5, 5, 15, 2, batches)))
    return records


flags.DEFINE_string("omniglot_data_dir", str(_DEFAULT_TFDS),
                    "Prepared TFDS data dir (random stand-in arrays when absent).")
flags.DEFINE_integer("batches", 200, "Timed meta-batches per case.", lower_bound=1)
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    """Times episode sampling for each case and prints one JSON line per case."""
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    common = dict(cpus=os.cpu_count())
    print(json.dumps({
        **omniglot_case(pathlib.Path(FLAGS.omniglot_data_dir), FLAGS.batches),
        **common
    }),
          flush=True)
    for record in mini_imagenet_cases(FLAGS.batches):
        print(json.dumps({**record, **common}), flush=True)


if __name__ == "__main__":
    app.run(main)
