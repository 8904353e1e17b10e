"""Tests of `python -m mamlpp_tf.data.prepare_omniglot`: Omniglot's zips to a TFDS data dir."""

from __future__ import annotations

import contextlib
import io
import json
import os
import pathlib
import re
import subprocess
import sys
import zipfile

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from tensorflow_datasets.image_classification import omniglot as tfds_omniglot

from mamlpp_tf import data
from mamlpp_tf.data import omniglot, prepare_omniglot

from conftest import REAL_DATA, ROOT, TEST_DATA_ENV

# A fake Omniglot: alphabet -> the numbers of its characters (character01, 02, ...), as its
# file names number them (TFDS label + 1). The background set holds the alphabets of the
# small splits; 14 characters give the paper split a validation class.
BACKGROUND = {"Balinese": [5], "Early_Aramaic": [3], "Greek": [11, 1, 7],
              "Japanese_(katakana)": [9], "Korean": [2], "Latin": [10, 4], "Sanskrit": [8],
              "Tagalog": [6]}
EVALUATION = {"Angelic": [13, 12], "Keble": [14]}
SPLITS = {"train": BACKGROUND, "test": EVALUATION,
          **{split: {a: BACKGROUND[a] for a in alphabets}
             for split, alphabets in prepare_omniglot.SMALL_ALPHABETS.items()}}
# What an archiver may add to a re-zipped copy; the command skips it.
JUNK = ("__MACOSX/images_background/._Greek", "images_background/Greek/.DS_Store")

SHARED_ZIPS = pathlib.Path(REAL_DATA) / "omniglot"
SHARED_TFDS = pathlib.Path(REAL_DATA) / "tfds"


def png(number: int, drawer: int, size: int = 105) -> bytes:
    """A 1-bit PNG (as Omniglot's) whose 28x28 preprocessing shows `number` and `drawer`."""
    pattern = np.ones((28, 28), bool)
    pattern[0, :8] = [(number >> b) & 1 for b in range(8)]
    pattern[1, :8] = [(drawer >> b) & 1 for b in range(8)]
    owner = np.arange(size) * 28 // size  # Nearest sampling reads pattern[x] back.
    buffer = io.BytesIO()
    Image.fromarray(pattern[owner[:, None], owner[None, :]]).save(buffer, format="PNG")
    return buffer.getvalue()


def decode(image: np.ndarray) -> tuple[int, int]:
    """`(number, drawer)` of a preprocessed 28x28 image of `png`."""
    bits = image[:2, :8, 0].astype(int)
    return int((bits[0] << np.arange(8)).sum()), int((bits[1] << np.arange(8)).sum())


def write_zip(path: pathlib.Path, top: str, alphabets: dict[str, list[int]],
              extra: dict[str, bytes] | None = None) -> None:
    """Writes a zip laid out as Omniglot's: top/<alphabet>/characterNN/NNNN_DD.png.

    `extra` members are added, or replace the generated ones of the same name.
    """
    members = {f"{top}/": b""}
    for alphabet, numbers in alphabets.items():
        for c, number in enumerate(numbers, 1):
            for drawer in range(1, 21):
                members[f"{top}/{alphabet}/character{c:02d}/{number:04d}_{drawer:02d}.png"] = (
                    png(number, drawer))
    with zipfile.ZipFile(path, "w") as archive:
        for name, content in (members | (extra or {})).items():
            archive.writestr(name, content)


def fake_zips(folder: pathlib.Path, background=None, evaluation=None,
              extra: dict[str, bytes] | None = None) -> pathlib.Path:
    """Writes the two fake zips into `folder` (`extra` members go into the background zip)."""
    folder.mkdir(parents=True, exist_ok=True)
    write_zip(folder / "images_background.zip", "images_background",
              BACKGROUND if background is None else background,
              {name: b"junk" for name in JUNK} | (extra or {}))
    write_zip(folder / "images_evaluation.zip", "images_evaluation",
              EVALUATION if evaluation is None else evaluation)
    return folder


def shrink_tfds_omniglot(monkeypatch) -> None:
    """Gives TFDS's Omniglot builder the fake's counts: 10 alphabets, 14 characters."""
    monkeypatch.setattr(tfds_omniglot, "_NUM_ALPHABETS", len(BACKGROUND) + len(EVALUATION))
    monkeypatch.setattr(tfds_omniglot, "_NUM_CLASSES",
                        sum(map(len, (BACKGROUND | EVALUATION).values())))


@pytest.fixture
def fake_counts(monkeypatch):
    shrink_tfds_omniglot(monkeypatch)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """The fake zips prepared once: `(zips dir, data dir, split counts, its stdout)`."""
    root = tmp_path_factory.mktemp("prepared")
    zips = fake_zips(root / "zips")
    stdout = io.StringIO()
    with pytest.MonkeyPatch.context() as monkeypatch, contextlib.redirect_stdout(stdout):
        shrink_tfds_omniglot(monkeypatch)
        counts = prepare_omniglot.prepare(str(zips), str(root / "tfds"))
    return zips, root / "tfds", counts, stdout.getvalue()


def test_preparing_prints_nothing_of_tfds_downloads_or_temporary_paths(prepared):
    assert prepared[3] == ""


# --- The prepared data dir ------------------------------------------------------------------


def test_prepared_dir_holds_the_tfds_records_of_the_zips(prepared, fake_counts):
    _, data_dir, counts, _ = prepared
    assert counts == {split: 20 * sum(map(len, a.values())) for split, a in SPLITS.items()}
    assert sorted(os.listdir(data_dir)) == ["omniglot"]  # No temporary left.
    assert os.listdir(data_dir / "omniglot") == ["3.0.0"]
    alphabets = sorted(BACKGROUND | EVALUATION)
    character = {number: (alphabet, c) for alphabet, numbers in (BACKGROUND | EVALUATION).items()
                 for c, number in enumerate(numbers)}
    info = tfds.builder("omniglot", data_dir=str(data_dir)).info
    assert info.features["alphabet"].names == alphabets
    assert info.features["label"].names == [f"{a}_{c}" for _, (a, c) in sorted(character.items())]
    for split, split_alphabets in SPLITS.items():
        records = tfds.load("omniglot", split=split, data_dir=str(data_dir), download=False,
                            decoders={"image": tfds.decode.SkipDecoding()})
        got = sorted((int(r["label"]), int(r["alphabet"]), int(r["alphabet_char_id"]),
                      bytes(r["image"])) for r in records.as_numpy_iterator())
        # TFDS's builder: label = file number - 1, the PNG's own bytes.
        expected = sorted((number - 1, alphabets.index(alphabet), c, png(number, drawer))
                          for alphabet, numbers in split_alphabets.items()
                          for c, number in enumerate(numbers) for drawer in range(1, 21))
        assert got == expected, split
    decoded = tfds.load("omniglot", split="test", data_dir=str(data_dir), download=False)
    assert next(iter(decoded))["image"].shape == (105, 105, 3)


def test_repo_loader_loads_the_prepared_dir(prepared, fake_counts, tmp_path):
    _, data_dir, _, _ = prepared
    names = {number: f"{alphabet}/character{c:02d}"
             for alphabet, numbers in (BACKGROUND | EVALUATION).items()
             for c, number in enumerate(numbers, 1)}
    paper = data.load("omniglot", data_dir=data_dir, download=False)
    assert paper.keys() == {"train", "val", "test"}
    assert {part: list(s.class_names) for part, s in paper.items()} == omniglot.paper_split(
        list(names.values()))
    assert [s.num_classes for s in paper.values()] == [9, 1, 4]
    for class_set in paper.values():
        for c, name in enumerate(class_set.class_names):
            drawn = [decode(image) for image in class_set.images[c]]
            assert {names[number] for number, _ in drawn} == {name}
            assert sorted(d for _, d in drawn) == list(range(1, 21))
    # TFDS's key-hash record order names each image's file: the official order applies.
    order = {name: [f"{number:04d}_{d:02d}.png" for d in range(20, 0, -1)]
             for number, name in names.items()}
    order_file = tmp_path / "order.json"
    order_file.write_text(json.dumps({"per_class_file_order": order}))
    ordered = data.load("omniglot", data_dir=data_dir, file_order=order_file)
    drawers = [decode(image)[1] for image in ordered["test"].images[0]]
    assert drawers == list(range(20, 0, -1))
    split = data.load("omniglot", split="background_evaluation", data_dir=data_dir,
                      val_classes=2)
    assert sorted(split["test"].class_names) == sorted(names[n] for n in (12, 13, 14))


def test_a_prepared_dir_is_refused_and_kept(prepared):
    zips, data_dir, _, _ = prepared
    before = {p: p.stat().st_mtime_ns for p in data_dir.rglob("*")}
    target = data_dir / "omniglot" / "3.0.0"
    with pytest.raises(ValueError, match=f"^{re.escape(str(target))} already exists: remove"):
        prepare_omniglot.prepare(str(zips), str(data_dir))
    assert {p: p.stat().st_mtime_ns for p in data_dir.rglob("*")} == before


@pytest.mark.parametrize("existing", [False, True])
def test_a_failed_build_leaves_the_data_dir_as_it_was(tmp_path, fake_counts, monkeypatch,
                                                     existing):
    data_dir = tmp_path / "tfds"
    if existing:
        data_dir.mkdir()
        (data_dir / "other").write_text("kept")
    generate = tfds_omniglot.Omniglot._generate_examples  # pylint: disable=protected-access

    def failing(self, directory):
        for count, example in enumerate(generate(self, directory)):
            if count == 30:
                raise RuntimeError("killed mid-split")
            yield example

    monkeypatch.setattr(tfds_omniglot.Omniglot, "_generate_examples", failing)
    with pytest.raises(RuntimeError, match="killed mid-split"):
        prepare_omniglot.prepare(str(fake_zips(tmp_path / "zips")), str(data_dir))
    if existing:
        assert [p.name for p in data_dir.iterdir()] == ["other"]
    else:
        assert not data_dir.exists()


# --- Zips that are not Omniglot's -------------------------------------------------------------


@pytest.mark.parametrize("make, file, message", [
    (lambda z: (z / "images_evaluation.zip").unlink(), "images_evaluation.zip",
     "does not exist: expected Omniglot's images_evaluation.zip"),
    (lambda z: (z / "images_background.zip").write_text("PNGs"), "images_background.zip",
     "is not a readable zip"),
    (lambda z: write_zip(z / "images_background.zip", "images_evaluation", BACKGROUND),
     "images_background.zip", "images_evaluation/Balinese/character01/0005_01.png is not "
     "images_background/<alphabet>/characterNN/NNNN_DD.png"),
    (lambda z: write_zip(z / "images_evaluation.zip", "images_evaluation", {},
                         {"__MACOSX/images_evaluation/._Angelic": b"",
                          "images_evaluation/.DS_Store": b""}),
     "images_evaluation.zip", "holds no PNG images under images_evaluation/"),
    (lambda z: fake_zips(z, extra={"images_background/Greek/character01/notes.txt": b"x"}),
     "images_background.zip", "notes.txt is not images_background/<alphabet>/characterNN"),
    (lambda z: fake_zips(z, extra={"images_background/Greek/character01/0011_01.png": b"x"}),
     "images_background.zip", "0011_01.png is not a 105x105 PNG image"),
    (lambda z: fake_zips(z, extra={
        "images_background/Greek/character01/0011_01.png": png(11, 1, size=100)}),
     "images_background.zip", "0011_01.png is not a 105x105 PNG image"),
    (lambda z: fake_zips(z, background=BACKGROUND | {"Greek": [11, 1]}, extra={
        "images_background/Greek/character03/0007_01.png": png(7, 1)}),
     "images_background.zip", "Greek/character03 has 1 drawings numbered [7]"),
    (lambda z: fake_zips(z, evaluation={"Angelic": [13, 12], "Keble": [15]}), "",
     "number their 14 characters from 0001 to 0015 without 0014"),
    (lambda z: fake_zips(z, evaluation={"Angelic": [13, 12], "Keble": [5]}),
     "images_evaluation.zip", "numbers its character 0005, as"),
    (lambda z: fake_zips(z, background={("Korean_" if a == "Korean" else a): n
                                        for a, n in BACKGROUND.items()}),
     "images_background.zip", "has no Korean/, an alphabet of Omniglot's "
     "images_background_small1.zip"),
])
def test_zips_that_are_not_omniglots_are_refused_before_any_write(tmp_path, fake_counts, make,
                                                                  file, message):
    zips = fake_zips(tmp_path / "zips")
    make(zips)
    data_dir = tmp_path / "tfds"
    with pytest.raises(ValueError) as error:
        prepare_omniglot.prepare(str(zips), str(data_dir))
    assert str(error.value).startswith(str(zips / file)), str(error.value)
    assert message in str(error.value)
    assert "\n" not in str(error.value) and not data_dir.exists()


def test_other_counts_than_tfds_omniglots_are_refused(tmp_path):
    """Without the fake's counts: TFDS's Omniglot has 1623 characters of 50 alphabets."""
    data_dir = tmp_path / "tfds"
    with pytest.raises(ValueError, match="the zips hold 14 characters of 10 alphabets; "
                       "TFDS's Omniglot has 1623 of 50"):
        prepare_omniglot.prepare(str(fake_zips(tmp_path / "zips")), str(data_dir))
    assert not data_dir.exists()


def test_command_line_error_is_one_line_with_status_2(tmp_path):
    zips = fake_zips(tmp_path / "zips")
    (zips / "images_evaluation.zip").unlink()
    process = subprocess.run(
        [sys.executable, "-m", "mamlpp_tf.data.prepare_omniglot", f"--zips={zips}",
         f"--data_dir={tmp_path / 'tfds'}"], cwd=ROOT, capture_output=True, text=True,
        timeout=300, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"), check=False)
    assert process.returncode == 2, process.stderr[-3000:]
    errors = [line for line in process.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {zips / 'images_evaluation.zip'} does not exist: expected "
                      "Omniglot's images_evaluation.zip (from https://github.com/brendenlake/"
                      "omniglot/tree/master/python, or a copy with the same PNGs)"]
    assert "Traceback" not in process.stderr and not (tmp_path / "tfds").exists()


def test_missing_omniglot_names_the_command_among_the_remedies(tmp_path):
    with pytest.raises(data.DatasetNotFoundError) as error:
        data.load("omniglot", data_dir=tmp_path, download=False)
    assert ("python -m mamlpp_tf.data.prepare_omniglot --zips=ZIPS --data_dir=DIR"
            in error.value.command_line)
    assert "mamlpp_tf.data.prepare_omniglot.prepare(ZIPS, DIR)" in str(error.value)


# --- The real zips (when ../shared is present) ------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(
    not all((SHARED_ZIPS / f"{name}.zip").exists() for name in prepare_omniglot.ZIPS.values())
    or not (SHARED_TFDS / "omniglot" / "3.0.0" / "dataset_info.json").exists(),
    reason=f"real data: needs {SHARED_ZIPS}/images_background.zip, images_evaluation.zip and "
           f"a prepared TFDS Omniglot at {SHARED_TFDS}/omniglot/3.0.0 (set ${TEST_DATA_ENV} "
           "to the folder holding omniglot/ and tfds/)")
def test_real_zips_make_the_records_of_tfds_prepared_dir(tmp_path):
    """The re-zipped real zips (TFDS's checksums refuse them) give TFDS's prepared records."""
    data_dir = tmp_path / "tfds"
    process = subprocess.run(
        [sys.executable, "-m", "mamlpp_tf.data.prepare_omniglot", f"--zips={SHARED_ZIPS}",
         f"--data_dir={data_dir}"], cwd=ROOT, capture_output=True, text=True, timeout=1800,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"), check=False)
    assert process.returncode == 0, process.stderr[-3000:]
    assert ("train 19280, test 13180, small1 2720, small2 3120" in process.stdout and
            f"--data_dir={data_dir} --nodownload" in process.stdout), process.stdout
    ours, theirs = data_dir / "omniglot" / "3.0.0", SHARED_TFDS / "omniglot" / "3.0.0"
    for name in ("features.json", "label.labels.txt", "alphabet.labels.txt"):
        assert (ours / name).read_bytes() == (theirs / name).read_bytes(), name
    for split in SPLITS:
        # Equal examples in the same order (the bytes of a proto map's entries may be ordered
        # otherwise by another protobuf).
        files = [f"{d}/omniglot-{split}.tfrecord-00000-of-00001" for d in (ours, theirs)]
        records = [[tf.train.Example.FromString(r) for r in tf.data.TFRecordDataset(f)
                    .as_numpy_iterator()] for f in files]
        assert len(records[0]) == len(records[1]) and records[0] == records[1], split
    ours_info, theirs_info = (tfds.builder("omniglot", data_dir=str(d)).info
                              for d in (data_dir, SHARED_TFDS))
    assert ({s: i.num_examples for s, i in ours_info.splits.items()} ==
            {s: i.num_examples for s, i in theirs_info.splits.items()})
    sets = data.load("omniglot", data_dir=data_dir, download=False)
    reference = data.load("omniglot", data_dir=SHARED_TFDS, download=False)
    assert [s.num_classes for s in sets.values()] == [1150, 50, 423]
    for part, class_set in sets.items():
        assert class_set.class_names == reference[part].class_names
        np.testing.assert_array_equal(class_set.images, reference[part].images)
