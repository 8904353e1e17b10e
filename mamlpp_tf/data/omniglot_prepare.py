"""Omniglot prepared in a TFDS data dir: download, manual zips, and errors that say how.

`prepared_builder` returns the tensorflow-datasets builder once Omniglot is
prepared. Before a download it tries a connection to the download host (or the
HTTPS proxy) for `PROBE_TIMEOUT_S` seconds, so that offline the job fails at
once instead of after TFDS's minutes of retries; every failure is a
`DatasetNotFoundError` naming the data dir, the cause and the remedies, in the
Python API's terms and (`command_line`) in the training job's flags.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import urllib.parse
import urllib.request

import tensorflow_datasets as tfds
from tensorflow_datasets.core.download.download_manager import NonMatchingChecksumError

from mamlpp_tf.data.class_set import DatasetNotFoundError

TFDS_NAME = "omniglot"
ORIGINAL_ZIPS = ("images_background.zip", "images_evaluation.zip",
                 "images_background_small1.zip", "images_background_small2.zip")
_ZIPS_URL = "https://github.com/brendenlake/omniglot/tree/master/python"
# Where tensorflow-datasets downloads the zips from, and how long a connection
# to it may take before the download is judged impossible (offline).
DOWNLOAD_HOST = ("github.com", 443)
PROBE_TIMEOUT_S = 5.0


def prepared_builder(data_dir: str | None, download: bool) -> tfds.core.DatasetBuilder:
    """Returns the TFDS builder once its data is prepared, or says how to get it.

    Before downloading, a connection to the download host (or the HTTPS proxy)
    is tried for a few seconds: offline, TFDS would otherwise retry for minutes.

    Raises:
      DatasetNotFoundError: naming the data dir, the cause and the remedies, in
        the Python API's terms and (`command_line`) in the job's flags.
    """
    builder = tfds.builder(TFDS_NAME, data_dir=data_dir)
    if builder.is_prepared():
        return builder
    missing = _Missing(root=os.path.dirname(os.path.dirname(os.fspath(builder.data_dir))),
                       prepared_dir=os.fspath(builder.data_dir),
                       version=str(builder.version), default_dir=data_dir is None)
    if not download:
        raise missing.error("download=False", "--nodownload is set")
    present = [z for z in ORIGINAL_ZIPS if os.path.exists(os.path.join(missing.manual_dir, z))]
    if present and len(present) < len(ORIGINAL_ZIPS):
        absent = ", ".join(sorted(set(ORIGINAL_ZIPS) - set(present)))
        cause = f"{missing.manual_dir} holds only some of the original zips: {absent} missing"
        raise missing.error(cause)
    if not present:
        unreachable = _unreachable(DOWNLOAD_HOST)
        if unreachable:
            raise missing.error(f"the download cannot start: {unreachable}")
    try:
        builder.download_and_prepare()
    except NonMatchingChecksumError as e:
        cause = ("a zip differs from the original that tensorflow-datasets registered "
                 "(checksum mismatch; re-zipped copies do not pass)")
        raise missing.error(cause, details=str(e)) from e
    except (OSError, tfds.download.DownloadError) as e:
        raise missing.error(f"downloading it failed: {e}") from e
    return builder


@dataclasses.dataclass(frozen=True)
class _Missing:
    """Where Omniglot should be, to word the errors of `prepared_builder`.

    Attributes:
      root: The TFDS data dir.
      prepared_dir: Where the prepared dataset would be (`root/omniglot/VERSION`).
      version: The TFDS dataset version.
      default_dir: Whether `root` is TFDS's default (no data dir was given).
    """

    root: str
    prepared_dir: str
    version: str
    default_dir: bool

    @property
    def manual_dir(self) -> str:
        """Where TFDS takes the original zips from instead of downloading them."""
        return os.path.join(self.root, "downloads", "manual")

    def error(self, cause: str, command_line_cause: str | None = None,
              details: str | None = None) -> DatasetNotFoundError:
        """The error for `cause`; `command_line_cause` words it in flags if it differs."""
        zips = f"the original {', '.join(ORIGINAL_ZIPS)} (from {_ZIPS_URL})"
        two_zips = (f"from {ORIGINAL_ZIPS[0]} and {ORIGINAL_ZIPS[1]} in a folder ZIPS "
                    "(re-zipped copies too)")
        prepared = f"the directory that contains {TFDS_NAME}/{self.version}/"
        default = " (TFDS's default)" if self.default_dir else ""
        api = (
            f"Omniglot is not prepared in data_dir={self.root}{default} (no "
            f"{self.prepared_dir}), and {cause}.\n"
            "To provide it, either\n"
            "  * with network access and download=True, let tensorflow-datasets "
            "download and prepare it there; or\n"
            f"  * without network, {two_zips}: call "
            "mamlpp_tf.data.prepare_omniglot.prepare(ZIPS, DIR) and pass data_dir=DIR; or\n"
            f"  * without network: put {zips} in {self.manual_dir}/ and pass "
            "download=True; or\n"
            f"  * pass data_dir=<a prepared TFDS data dir>, {prepared}.")
        command_line = (
            f"Omniglot is not prepared in --data_dir={self.root}{default} (no "
            f"{self.prepared_dir}), and {command_line_cause or cause}.\n"
            "To provide it, either\n"
            "  * offline, with a prepared TFDS data dir DIR (" + prepared + "): add "
            "--data_dir=DIR --nodownload (mamlpp_tf.evaluate: --data_dir=DIR); or\n"
            f"  * offline, {two_zips}: prepare DIR with python -m "
            "mamlpp_tf.data.prepare_omniglot --zips=ZIPS --data_dir=DIR, then as above; or\n"
            f"  * offline: put {zips} in {self.manual_dir}/ and run without "
            "--nodownload (tensorflow-datasets prepares them there); or\n"
            "  * with network access: run without --nodownload to let "
            "tensorflow-datasets download and prepare it in --data_dir.")
        if details:
            api, command_line = (f"{text}\nDetails: {details}" for text in (api, command_line))
        return DatasetNotFoundError(api, command_line=command_line)


def _unreachable(address: tuple[str, int]) -> str | None:
    """Why a download from `address` cannot start, or None if it can connect.

    Connects to `address` (`(host, port)`), or to the HTTPS proxy that the
    environment configures for it, within `PROBE_TIMEOUT_S` seconds.
    """
    host, port = address
    target, via = address, ""
    proxy = urllib.request.getproxies().get("https")
    if proxy and not urllib.request.proxy_bypass(host):
        parts = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        target = (parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))
        via = f" through the HTTPS proxy {target[0]}:{target[1]}"
    try:
        socket.create_connection(target, timeout=PROBE_TIMEOUT_S).close()
    except OSError as error:
        return (f"no connection to {host}:{port}{via} within {PROBE_TIMEOUT_S:g} s "
                f"({str(error) or type(error).__name__})")
    return None
