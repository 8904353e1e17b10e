"""Tests of the Omniglot loader: split recipe, preprocessing, TFDS access and errors."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pathlib
import shutil
import subprocess
import sys
import zipfile

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from mamlpp_tf import data
from mamlpp_tf.data import omniglot, omniglot_prepare

from conftest import REAL_DATA, TEST_DATA_ENV

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
SHARED_TFDS = pathlib.Path(REAL_DATA) / "tfds"
SHARED_OMNIGLOT = pathlib.Path(REAL_DATA) / "omniglot"
SPLIT_JSON = SHARED_OMNIGLOT / "mamlpp_official_class_split.json"
needs_shared_tfds = pytest.mark.skipif(
    not (SHARED_TFDS / "omniglot" / "3.0.0" / "dataset_info.json").exists(),
    reason=f"real data: needs a prepared TFDS Omniglot at {SHARED_TFDS}/omniglot/3.0.0 "
           f"(set ${TEST_DATA_ENV} to the folder holding tfds/)")
needs_split_json = pytest.mark.skipif(
    not SPLIT_JSON.exists(),
    reason=f"real data: needs the official split file {SPLIT_JSON} "
           f"(set ${TEST_DATA_ENV} to the folder holding omniglot/)")



def test_real_data_tests_read_the_folder_the_environment_names(tmp_path):
    """$MAMLPP_TF_TEST_DATA moves the real data away from ../shared/data."""
    tests_dir = pathlib.Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-c", "import conftest; print(conftest.REAL_DATA)"], cwd=tests_dir,
        env={**os.environ, TEST_DATA_ENV: str(tmp_path), "TF_CPP_MIN_LOG_LEVEL": "3"},
        capture_output=True, text=True, timeout=300, check=True)
    assert result.stdout.strip() == str(tmp_path)


# --- Class names and the paper split -------------------------------------------------


@pytest.mark.parametrize("tfds_name, official", [
    ("Arcadian_0", "Arcadian/character01"),
    ("Japanese_(hiragana)_45", "Japanese_(hiragana)/character46"),
    ("N_Ko_9", "N_Ko/character10"),
])
def test_class_name_maps_tfds_labels_to_official_names(tfds_name, official):
    assert omniglot.class_name(tfds_name) == official


def test_class_name_rejects_unnamed_labels():
    with pytest.raises(ValueError, match="'17' is not '<alphabet>_<character index>'"):
        omniglot.class_name("17")


def test_paper_split_sizes_disjoint_and_complete():
    names = [
        f"Alphabet{a:02d}/character{c:02d}" for a in range(50) for c in range(1, 34)
    ][:1623]
    split = omniglot.paper_split(names)
    assert [len(split[s]) for s in ("train", "val", "test")] == [1150, 50, 423]
    union = set(split["train"]) | set(split["val"]) | set(split["test"])
    assert len(union) == 1623 and union == set(names)
    assert omniglot.paper_split(names[::-1]) == split  # keys are the sorted names


def test_paper_split_seed_is_the_official_derived_val_seed():
    assert omniglot.PAPER_SPLIT_SEED == data.derive_seed(0)


@needs_shared_tfds
@needs_split_json
def test_paper_split_equals_the_official_json():
    tfds_names = (SHARED_TFDS / "omniglot" / "3.0.0" /
                  "label.labels.txt").read_text().split()
    split = omniglot.paper_split([omniglot.class_name(n) for n in tfds_names])
    official = json.loads(SPLIT_JSON.read_text())
    for part in ("train", "val", "test"):
        assert split[part] == official[part]  # names and order
    assert split["test"][:3] == [
        "Sylheti/character11", "Hebrew/character07", "Aurek-Besh/character18"
    ]


# --- Preprocessing -------------------------------------------------------------------


@pytest.mark.parametrize("png",
                         sorted(FIXTURES.glob("omniglot_*.png")),
                         ids=lambda p: p.name)
def test_preprocess_matches_pil_on_real_pngs(png):
    raw = png.read_bytes()
    # The official pipeline: PIL resize of the 1-bit PNG (LANCZOS is forced to NEAREST).
    reference = np.array(
        Image.open(io.BytesIO(raw)).resize((28, 28), Image.LANCZOS), np.float32)
    # An independent nearest-neighbour reference with half-pixel centres.
    source = np.array(Image.open(io.BytesIO(raw)).convert("L"))
    nearest = np.array([[
        source[int(
            (y + 0.5) * 105 / 28), int((x + 0.5) * 105 / 28)] == 255 for x in range(28)
    ] for y in range(28)], np.float32)
    ours = omniglot.preprocess(tf.io.decode_png(raw, channels=1).numpy()[None])
    assert ours.shape == (1, 28, 28, 1) and ours.dtype == np.float32
    np.testing.assert_array_equal(ours[0, :, :, 0], reference)
    np.testing.assert_array_equal(ours[0, :, :, 0], nearest)
    assert set(np.unique(ours)) == {0.0, 1.0} and ours.mean() > 0.8  # background is 1


def test_preprocess_uses_channel_zero_of_rgb():
    image = np.zeros((2, 105, 105, 3), np.uint8)
    image[0, :, :, 0] = 255
    out = omniglot.preprocess(image)
    np.testing.assert_array_equal(out[:, 0, 0, 0], [1.0, 0.0])


# --- Through TFDS, mocked ------------------------------------------------------------

# Fake classes (TFDS label, TFDS label name): 8 background, 5 evaluation characters.
_BACKGROUND = [(3, "Beta_1"), (0, "Alpha_0"), (1, "Alpha_1"), (2, "Alpha_2"),
               (4, "Beta_0"), (5, "Gamma_(x)_0"), (6, "Gamma_(x)_1"),
               (7, "Gamma_(x)_2")]
_EVALUATION = [(8, "Delta_0"), (9, "Delta_1"), (10, "Epsilon_0"), (11, "Epsilon_1"),
               (12, "Epsilon_2")]


def _encode(label: int, drawer: int) -> bytes:
    """A 105x105 PNG whose 28x28 preprocessing shows `label` and `drawer` in binary."""
    pattern = np.ones((28, 28), np.uint8)
    pattern[0, :8] = [(label >> b) & 1 for b in range(8)]
    pattern[1, :8] = [(drawer >> b) & 1 for b in range(8)]
    # Source pixel s belongs to output pixel floor(s * 28 / 105), so nearest sampling at
    # floor((x + 0.5) * 105 / 28) reads pattern[x] back.
    owner = np.arange(105) * 28 // 105
    image = (pattern[owner[:, None], owner[None, :]] * 255).astype(np.uint8)
    rgb = np.repeat(image[..., None], 3, axis=-1)  # TFDS stores 105x105x3
    return tf.io.encode_png(rgb).numpy()


def _decode(image: np.ndarray) -> tuple[int, int]:
    bits = image[:2, :8, 0].astype(int)
    return int((bits[0] << np.arange(8)).sum()), int((bits[1] << np.arange(8)).sum())


def _records(classes, split: str, hash_order: bool) -> list[tuple[int, int]]:
    """(label, drawer) of a split in TFDS's key-hash order, or in a scrambled order."""
    records = [(label, d) for label, _ in classes for d in range(1, 21)]
    if hash_order:

        def key_hash(record):
            label, drawer = record
            alphabet, index = dict(classes)[label].rsplit("_", 1)
            key = f"{alphabet}_{index}_{label + 1:04d}_{drawer:02d}.png"
            return int(hashlib.md5((split + key).encode()).hexdigest(), 16)

        return sorted(records, key=key_hash)
    return [records[i] for i in np.random.RandomState(0).permutation(len(records))]


@pytest.fixture
def mock_omniglot(tmp_path):
    """Mocks TFDS Omniglot with the fake classes; yields a record-order switch."""
    builder = tfds.builder("omniglot", data_dir=str(tmp_path))
    names = [f"Unused_{i}" for i in range(1623)]
    for label, name in _BACKGROUND + _EVALUATION:
        names[label] = name
    builder.info.features["label"].names = names
    pathlib.Path(builder.data_dir).mkdir(parents=True)
    builder.info.write_to_directory(builder.data_dir)
    state = {"hash_order": True}

    def as_dataset(self, split, decoders=None, **kwargs):
        del self, kwargs
        assert isinstance(decoders["image"], tfds.decode.SkipDecoding)
        classes = _BACKGROUND if split == "train" else _EVALUATION
        records = _records(classes, split, state["hash_order"])
        return tf.data.Dataset.from_tensor_slices({
            "image": [_encode(label, drawer) for label, drawer in records],
            "label": np.array([label for label, _ in records], np.int64),
        })

    with tfds.testing.mock_data(as_dataset_fn=as_dataset, data_dir=str(tmp_path)):
        yield state


def _official(names):
    return [omniglot.class_name(n) for n in names]


def test_tfds_paper_split_groups_classes_in_record_order(mock_omniglot, tmp_path):
    sets = omniglot.load("paper", data_dir=tmp_path / "paper")
    expected = omniglot.paper_split(_official(n for _, n in _BACKGROUND + _EVALUATION))
    label_of = {omniglot.class_name(n): label for label, n in _BACKGROUND + _EVALUATION}
    for part, class_set in sets.items():
        assert list(class_set.class_names) == expected[part]
        assert class_set.images.shape == (len(expected[part]), 20, 28, 28, 1)
        assert class_set.images.dtype == np.float32
        assert class_set.augment == (part == "train")
        for c, name in enumerate(class_set.class_names):
            decoded = [_decode(image) for image in class_set.images[c]]
            label = label_of[name]
            assert {y for y, _ in decoded} == {label}
            # Within a class: TFDS record order.
            background = label < len(_BACKGROUND)
            records = _records(_BACKGROUND if background else _EVALUATION,
                               "train" if background else "test",
                               hash_order=True)
            assert [d for _, d in decoded] == [d for y, d in records if y == label]


def test_tfds_background_evaluation_split(mock_omniglot, tmp_path):
    sets = data.load("omniglot",
                     split="background_evaluation",
                     data_dir=tmp_path / "be",
                     val_classes=3)
    background = sorted(_official(n for _, n in _BACKGROUND))
    permutation = np.arange(8, dtype=np.int32)
    np.random.RandomState(985773).shuffle(permutation)
    assert list(sets["train"].class_names) == [background[i] for i in permutation[:5]]
    assert list(sets["val"].class_names) == [background[i] for i in permutation[5:]]
    assert list(sets["test"].class_names) == sorted(_official(
        n for _, n in _EVALUATION))
    assert [s.augment for s in sets.values()] == [True, False, False]
    with pytest.raises(ValueError, match=r"val_classes=8 must be in \[1, 8\)"):
        omniglot.load("background_evaluation", data_dir=tmp_path / "be", val_classes=8)


def test_file_order_reorders_images_within_each_class(mock_omniglot, tmp_path):
    rng = np.random.RandomState(1)
    orders = {
        omniglot.class_name(name): [
            f"{label + 1:04d}_{d:02d}.png" for d in rng.permutation(np.arange(1, 21))
        ] for label, name in _BACKGROUND + _EVALUATION
    }
    order_file = tmp_path / "order.json"
    order_file.write_text(json.dumps({"per_class_file_order": orders}))
    sets = omniglot.load("paper", data_dir=tmp_path / "ordered", file_order=order_file)
    for class_set in sets.values():
        for c, name in enumerate(class_set.class_names):
            drawers = [_decode(image)[1] for image in class_set.images[c]]
            assert [f"{d:02d}.png" for d in drawers] == [f[-6:] for f in orders[name]]


def test_file_order_refuses_records_not_in_hash_order(mock_omniglot, tmp_path):
    mock_omniglot["hash_order"] = False
    order_file = tmp_path / "order.json"
    order_file.write_text(json.dumps({"per_class_file_order": {}}))
    sets = omniglot.load("paper", data_dir=tmp_path / "scrambled")  # TFDS order is fine
    assert sets["train"].images.shape[1:] == (20, 28, 28, 1)
    with pytest.raises(ValueError, match="not in TFDS's key-hash order"):
        omniglot.load("paper", data_dir=tmp_path / "scrambled", file_order=order_file)


def test_file_order_must_list_every_file(mock_omniglot, tmp_path):
    order_file = tmp_path / "order.json"
    order_file.write_text(
        json.dumps({"per_class_file_order": {
            "Alpha/character01": []
        }}))
    with pytest.raises(ValueError, match="class Alpha/character01 lists"):
        omniglot.load("paper", data_dir=tmp_path / "bad_order", file_order=order_file)


# --- Missing data --------------------------------------------------------------------


def test_missing_data_without_download_gives_one_clear_error(tmp_path):
    with pytest.raises(data.DatasetNotFoundError) as error:
        data.load("omniglot", data_dir=tmp_path, download=False)
    message = str(error.value)
    assert f"not prepared in data_dir={tmp_path}" in message
    assert str(tmp_path / "downloads" / "manual") in message
    assert "images_background.zip" in message and "download=True" in message
    assert "omniglot/3.0.0/" in message


def test_incomplete_manual_zips_are_named_before_any_download(tmp_path):
    manual = tmp_path / "downloads" / "manual"
    manual.mkdir(parents=True)
    (manual / "images_background.zip").write_bytes(b"zip")
    with pytest.raises(
            data.DatasetNotFoundError,
            match="images_background_small1.zip, images_background_small2.zip, "
            "images_evaluation.zip missing"):
        omniglot.load(data_dir=tmp_path, download=True)


def test_manual_zips_with_wrong_checksums_give_a_clear_error(tmp_path):
    manual = tmp_path / "downloads" / "manual"
    manual.mkdir(parents=True)
    for name in omniglot_prepare.ORIGINAL_ZIPS:
        (manual / name).write_bytes(b"not the original zip")
    with pytest.raises(data.DatasetNotFoundError, match="checksum mismatch"):
        omniglot.load(data_dir=tmp_path, download=True)


# --- The real prepared TFDS dir (when ../shared is present) ---------------------------


@needs_shared_tfds
@needs_split_json
def test_real_tfds_dir_loads_both_splits():
    paper = data.load("omniglot", split="paper", data_dir=SHARED_TFDS)
    official = json.loads(SPLIT_JSON.read_text())
    for part, size in (("train", 1150), ("val", 50), ("test", 423)):
        assert paper[part].images.shape == (size, 20, 28, 28, 1)
        assert list(paper[part].class_names) == official[part]
    images = paper["test"].images
    assert set(np.unique(images)) == {0.0, 1.0} and 0.88 < images.mean() < 0.95
    split = data.load("omniglot", split="background_evaluation", data_dir=SHARED_TFDS)
    assert [s.images.shape[0] for s in split.values()] == [914, 50, 659]

    def alphabets(class_set):
        return {name.split("/")[0] for name in class_set.class_names}

    assert len(alphabets(split["train"]) | alphabets(split["val"])) == 30
    assert len(alphabets(split["test"])) == 20
    assert not (alphabets(split["train"]) | alphabets(split["val"])) & alphabets(
        split["test"])


@needs_shared_tfds
@needs_split_json
def test_real_tfds_dir_with_file_order_equals_the_official_pngs():
    sets = omniglot.load("paper", data_dir=SHARED_TFDS, file_order=SPLIT_JSON)
    order = json.loads(SPLIT_JSON.read_text())["per_class_file_order"]
    zips = {
        z: zipfile.ZipFile(SHARED_OMNIGLOT / f"{z}.zip")
        for z in ("images_background", "images_evaluation")
    }
    members = {
        "/".join(n.split("/")[-3:]): (z, n)
        for z, f in zips.items() for n in f.namelist() if n.endswith(".png")
    }
    for class_set in sets.values():
        for c in range(0, class_set.num_classes, 41):
            name = class_set.class_names[c]
            for i, file_name in enumerate(order[name]):
                z, member = members[f"{name}/{file_name}"]
                png = Image.open(io.BytesIO(zips[z].read(member)))
                reference = np.array(png.resize((28, 28), Image.LANCZOS), np.float32)
                np.testing.assert_array_equal(class_set.images[c, i, :, :, 0],
                                              reference)


@needs_shared_tfds
def test_a_corrupt_record_file_is_named_with_its_split(tmp_path):
    data_dir = tmp_path / "tfds"
    shutil.copytree(SHARED_TFDS / "omniglot", data_dir / "omniglot")
    shard = data_dir / "omniglot" / "3.0.0" / "omniglot-test.tfrecord-00000-of-00001"
    with open(shard, "r+b") as stream:  # Garbage over a record in the middle: a bad CRC.
        stream.seek(shard.stat().st_size // 2)
        stream.write(b"\xff" * 64)
    with pytest.raises(ValueError) as raised:
        omniglot.load("paper", data_dir=data_dir)
    message = str(raised.value)
    assert "TFDS split 'test' is damaged" in message and f"record file {shard}" in message, message
    assert message.startswith(f"--data_dir={data_dir}")
