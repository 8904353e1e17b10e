"""Prepares Omniglot in a TFDS data dir, offline, from its two zips (re-zipped copies too).

    python -m mamlpp_tf.data.prepare_omniglot --zips=DIR --data_dir=OUT

DIR holds images_background.zip and images_evaluation.zip of Omniglot
(https://github.com/brendenlake/omniglot, python/), or any copy of them with
the same PNG files, e.g. one unpacked and zipped again: tensorflow-datasets
takes only the exact original zips (it checks their checksums) and also wants
the two `small` zips. OUT then holds `omniglot/3.0.0/` with the records that
TFDS's Omniglot builder makes from the original zips, for `--data_dir=OUT
--nodownload` or `tfds.load("omniglot", data_dir=OUT, download=False)`.

TFDS's own builder (`tensorflow_datasets.image_classification.omniglot`)
writes the dataset; only its download step is replaced, by the PNGs of the
local zips unpacked into a temporary directory. Its splits `small1` and
`small2` come from images_background_small1/2.zip, which hold whole alphabets
of the background set (`SMALL_ALPHABETS`) as the same PNG files under the
same names; so they are unpacked from images_background.zip, and the small
zips are neither needed nor read.

The zips are checked before anything is written: a missing zip, a file that
is not a zip, and a zip that is not Omniglot's (another top-level folder,
other file names, no PNGs, not 20 drawings per character, other character
counts than TFDS's) stop it in one line naming the file. The dataset is built
in a hidden temporary directory inside OUT and moved to OUT/omniglot/3.0.0 by
one rename once complete, so OUT never holds a partial dataset; an OUT that
already has omniglot/3.0.0 is refused (remove it to prepare again).
"""

from __future__ import annotations

import collections
from collections.abc import Mapping
import contextlib
import dataclasses
import io
import os
import re
import struct
import tempfile
import zipfile

from absl import flags
import tensorflow_datasets as tfds
from tensorflow_datasets.image_classification import omniglot as tfds_omniglot

from mamlpp_tf import cli, files
from mamlpp_tf.data.omniglot import IMAGES_PER_CLASS

# TFDS's download keys of the two zips -> their name (without .zip), also their top folder.
ZIPS = {"train": "images_background", "eval": "images_evaluation"}
# The alphabets of images_background_small1/2.zip (TFDS's splits small1/small2): every
# character and drawing of these background alphabets, the same PNG files.
SMALL_ALPHABETS = {
    "small1": ("Balinese", "Early_Aramaic", "Greek", "Korean", "Latin"),
    "small2": ("Greek", "Japanese_(katakana)", "Latin", "Sanskrit", "Tagalog"),
}
IMAGE_SIZE = 105
_ZIPS_URL = "https://github.com/brendenlake/omniglot/tree/master/python"
# An Omniglot image: <top>/<alphabet>/character<NN>/<character number>_<drawer>.png.
_MEMBER = re.compile(r"^(?P<top>[^/]+)/(?P<alphabet>[^/]+)/(?P<character>character\d+)/"
                     r"(?P<number>\d+)_\d+\.png$")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Prefix of the temporary build directory inside OUT (hidden from listings).
_TEMPORARY_PREFIX = ".tmp_prepare_omniglot_"


@dataclasses.dataclass(frozen=True)
class _Image:
    """One PNG of a zip.

    Attributes:
      member: Its name in the zip.
      alphabet: Its alphabet folder.
      character: Its character folder, `characterNN`.
      number: The character's number in the file name (TFDS's label + 1).
    """

    member: str
    alphabet: str
    character: str
    number: int

    @property
    def path(self) -> str:
        """Its path below the zip's top folder."""
        return self.member.split("/", 1)[1]


def prepare(zips_dir: str | os.PathLike, data_dir: str | os.PathLike) -> dict[str, int]:
    """Writes Omniglot's prepared TFDS dataset to `data_dir` from the zips in `zips_dir`.

    Args:
      zips_dir: Directory holding images_background.zip and images_evaluation.zip.
      data_dir: The TFDS data dir to write `omniglot/<version>/` into (created
        if missing; a local path).

    Returns:
      The number of records of each TFDS split.

    Raises:
      ValueError: A zip is missing, not a zip or not Omniglot's; `data_dir` is
        not local or already holds omniglot/<version>.
      files.WriteError: The storage refused a write; `data_dir` is as it was.
    """
    zips_dir, data_dir = os.fspath(zips_dir), os.fspath(data_dir)
    if not files.is_local(data_dir):
        raise ValueError(f"{data_dir} is not a local directory: Omniglot is prepared on local "
                         "disk, where one rename publishes it")
    target = os.path.join(data_dir, tfds_omniglot.Omniglot.name,
                          str(tfds_omniglot.Omniglot.VERSION))
    if os.path.lexists(target):
        raise ValueError(f"{target} already exists: remove it to prepare Omniglot again in "
                         f"{data_dir}, or use it as it is")
    images = {key: _list_zip(zips_dir, name) for key, name in ZIPS.items()}
    alphabets, characters = _check_images(zips_dir, images)
    created = not os.path.exists(data_dir)
    with files.writing(data_dir):
        os.makedirs(data_dir, exist_ok=True)
        work = tempfile.mkdtemp(prefix=_TEMPORARY_PREFIX, dir=data_dir)
    published = False
    try:
        with files.writing(target):
            builder = _UnpackedOmniglot(data_dir=os.path.join(work, "tfds"),
                                        unpacked=os.path.join(work, "unpacked"))
            _check_counts(zips_dir, builder.info, alphabets, characters)
            for key, name in ZIPS.items():
                _unpack(os.path.join(zips_dir, f"{name}.zip"), key, images[key],
                        os.path.join(work, "unpacked"))
            # TFDS prints that it downloads to, and prepared, the temporary
            # directory: both untrue for the user here, who gets one line at the end.
            with contextlib.redirect_stdout(io.StringIO()):
                builder.download_and_prepare(
                    download_dir=os.path.join(work, "downloads"),
                    download_config=tfds.download.DownloadConfig(try_download_gcs=False))
            if os.path.lexists(target):
                raise ValueError(f"{target} appeared while Omniglot was being prepared: remove "
                                 f"it to prepare Omniglot again in {data_dir}")
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.rename(os.fspath(builder.data_path), target)
            published = True
        return {name: split.num_examples for name, split in builder.info.splits.items()}
    finally:
        files.remove_quietly(work)
        if created and not published:
            with contextlib.suppress(OSError):
                os.rmdir(data_dir)  # Only if empty.


class _UnpackedOmniglot(tfds_omniglot.Omniglot, skip_registration=True):
    """TFDS's Omniglot builder, reading unpacked zips instead of downloading them.

    Registered under no name (TFDS's own `omniglot` stays the registered one),
    it writes the same dataset, `omniglot/<version>/`.
    """

    name = tfds_omniglot.Omniglot.name

    def __init__(self, *, unpacked: str, **kwargs):
        """Creates the builder.

        Args:
          unpacked: Where `_unpack` put the PNGs of each download key.
          **kwargs: The builder's (`data_dir`).
        """
        self._unpacked = unpacked
        super().__init__(**kwargs)

    def _split_generators(self, dl_manager):
        del dl_manager  # TFDS's own method, its downloads served from the unpacked zips.
        return super()._split_generators(_Unpacked(self._unpacked))


def _unpack(zip_path: str, key: str, images: list[_Image], unpacked: str) -> None:
    """Unpacks the PNGs of the zip of TFDS download key `key`, and those of the small splits.

    TFDS reads each split from a directory holding one folder (named as its
    zip's top folder): `unpacked/<key>/<folder>/`. The small splits' folders
    get the PNGs of their alphabets from images_background.zip.

    Raises:
      ValueError: A member does not unpack or is not a 105x105 PNG.
    """
    folders = {key: os.path.join(unpacked, key, ZIPS[key])}
    if key == "train":
        folders.update({small: os.path.join(unpacked, small, f"{ZIPS[key]}_{small}")
                        for small in SMALL_ALPHABETS})
    with zipfile.ZipFile(zip_path) as archive:
        for image in images:
            try:
                png = archive.read(image.member)
            except zipfile.BadZipFile as error:
                raise ValueError(f"{zip_path}: {image.member} does not unpack ({error})") from error
            if not _is_omniglot_png(png):
                raise ValueError(f"{zip_path}: {image.member} is not a {IMAGE_SIZE}x"
                                 f"{IMAGE_SIZE} PNG image, as Omniglot's are")
            for split, folder in folders.items():
                if split == key or image.alphabet in SMALL_ALPHABETS[split]:
                    path = os.path.join(folder, image.path)
                    os.makedirs(os.path.dirname(path), exist_ok=True)
                    with open(path, "wb") as stream:
                        stream.write(png)


class _Unpacked:
    """Stands in for TFDS's download manager: the zips of TFDS's URLs, already unpacked."""

    def __init__(self, root: str):
        self._root = root

    def download_and_extract(self, urls: Mapping[str, str]) -> dict[str, str]:
        """The unpacked directory of each download key (see `_unpack`)."""
        return {key: os.path.join(self._root, key) for key in urls}


def _list_zip(zips_dir: str, name: str) -> list[_Image]:
    """The PNGs of `zips_dir/name.zip`, checked to be named as Omniglot's.

    Folders, `__MACOSX/` and hidden files (what an archiver may add) are skipped.

    Raises:
      ValueError: The zip is missing, not a zip, holds another file or no PNG.
    """
    path = os.path.join(zips_dir, f"{name}.zip")
    expected = f"Omniglot's {name}.zip (from {_ZIPS_URL}, or a copy with the same PNGs)"
    if not os.path.isfile(path):
        raise ValueError(f"{path} does not exist: expected {expected}")
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.namelist()
    except (zipfile.BadZipFile, OSError) as error:
        raise ValueError(f"{path} is not a readable zip ({error}): expected {expected}") from error
    images, seen = [], set()
    for member in members:
        if (member.endswith("/") or member.startswith("__MACOSX/") or
                os.path.basename(member).startswith(".")):
            continue
        match = _MEMBER.match(member)
        if not match or match["top"] != name or member in seen:
            what = "appears twice" if member in seen else (
                f"is not {name}/<alphabet>/characterNN/NNNN_DD.png")
            raise ValueError(f"{path}: {member} {what}: expected {expected}")
        seen.add(member)
        images.append(_Image(member, match["alphabet"], match["character"],
                             int(match["number"])))
    if not images:
        raise ValueError(f"{path} holds no PNG images under {name}/: expected {expected}")
    return images


def _check_images(zips_dir: str,
                  images: Mapping[str, list[_Image]]) -> tuple[set[str], set[int]]:
    """Checks the characters of the zips: drawings, numbering, the small splits' alphabets.

    Returns:
      The alphabets and the character numbers of both zips.

    Raises:
      ValueError: A character has other than 20 drawings or several numbers,
        a number names several characters, the numbers are not 1..count, or
        images_background.zip lacks an alphabet of a small split.
    """
    drawings, numbers, owners = collections.Counter(), collections.defaultdict(set), {}
    for key, zip_images in images.items():
        zip_path = os.path.join(zips_dir, f"{ZIPS[key]}.zip")
        for image in zip_images:
            character = (zip_path, f"{image.alphabet}/{image.character}")
            drawings[character] += 1
            numbers[character].add(image.number)
            owner = owners.setdefault(image.number, character)
            if owner != character:
                raise ValueError(f"{zip_path}: {image.member} numbers its character "
                                 f"{image.number:04d}, as {owner[0]} does {owner[1]}; in "
                                 "Omniglot each character has its own number")
    for (zip_path, character), count in drawings.items():
        if count != IMAGES_PER_CLASS or len(numbers[zip_path, character]) != 1:
            raise ValueError(
                f"{zip_path}: {character} has {count} drawings numbered "
                f"{sorted(numbers[zip_path, character])}; each Omniglot character has "
                f"{IMAGES_PER_CLASS}, all with its number")
    if sorted(owners) != list(range(1, len(owners) + 1)):
        gap = min(set(range(1, len(owners) + 1)) - set(owners))
        raise ValueError(f"{zips_dir}: the zips number their {len(owners)} characters "
                         f"from {min(owners):04d} to {max(owners):04d} without {gap:04d}; "
                         f"Omniglot's are numbered 0001 to {len(owners):04d}")
    background = {image.alphabet for image in images["train"]}
    for split, alphabets in SMALL_ALPHABETS.items():
        for alphabet in alphabets:
            if alphabet not in background:
                raise ValueError(
                    f"{os.path.join(zips_dir, ZIPS['train'])}.zip has no {alphabet}/, an "
                    f"alphabet of Omniglot's images_background_{split}.zip (TFDS's split "
                    f"{split})")
    alphabets = {image.alphabet for zip_images in images.values() for image in zip_images}
    return alphabets, set(owners)


def _check_counts(zips_dir: str, info: tfds.core.DatasetInfo, alphabets: set[str],
                  characters: set[int]) -> None:
    """Checks that the zips hold as many alphabets and characters as TFDS's Omniglot.

    Raises:
      ValueError: They hold other counts than the builder's class labels.
    """
    expected = (info.features["alphabet"].num_classes, info.features["label"].num_classes)
    if (len(alphabets), len(characters)) != expected:
        raise ValueError(f"{zips_dir}: the zips hold {len(characters)} characters of "
                         f"{len(alphabets)} alphabets; TFDS's Omniglot has {expected[1]} of "
                         f"{expected[0]}")


def _is_omniglot_png(data: bytes) -> bool:
    """Whether `data` starts as a PNG of Omniglot's size (its header's width and height)."""
    if not data.startswith(_PNG_SIGNATURE) or data[12:16] != b"IHDR":
        return False
    return struct.unpack(">II", data[16:24]) == (IMAGE_SIZE, IMAGE_SIZE)


def _define_flags() -> None:
    """Defines the command's flags: only when it runs, as other modules define `--data_dir`."""
    flags.DEFINE_string("zips", None, "Directory holding Omniglot's images_background.zip and "
                        "images_evaluation.zip (re-zipped copies with the same PNGs will do).")
    flags.DEFINE_string("data_dir", None, "TFDS data dir to prepare Omniglot in (it gets "
                        "omniglot/3.0.0/); then train with --data_dir=<it> --nodownload.")
    flags.mark_flags_as_required(["zips", "data_dir"])


def _prepare_from_flags() -> str:
    tfds.disable_progress_bar()  # Seconds of work: its bars would only clutter a log.
    zips_dir, data_dir = flags.FLAGS.zips, flags.FLAGS.data_dir
    counts = prepare(zips_dir, data_dir)
    splits = ", ".join(f"{split} {count}" for split, count in counts.items())
    return (f"Prepared Omniglot in {data_dir} (TFDS records: {splits}); train with "
            f"--data_dir={data_dir} --nodownload")


if __name__ == "__main__":
    _define_flags()
    cli.run(_prepare_from_flags, job="the preparation of Omniglot")
