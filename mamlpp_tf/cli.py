"""Shared behaviour of the command-line entry points (train, evaluate, export, report)."""

from __future__ import annotations

import logging as std_logging
import os
import sys
from typing import NoReturn

from absl import flags
from absl import logging
import tensorflow as tf


def quiet_tensorflow_logs() -> None:
    """Drops TensorFlow's (and TFDS's) INFO/WARNING chatter from the absl log, keeps ours."""
    tf.get_logger().setLevel("ERROR")
    logging.get_absl_handler().addFilter(
        lambda record: record.levelno >= std_logging.ERROR or
        f"{os.sep}tensorflow" not in record.pathname)


def parse_flags_or_exit(argv: list[str]) -> list[str]:
    """absl `flags_parser` that reports a bad flag in one line (no usage dump), exit 2."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as error:
        exit_on_user_error(error)


def exit_on_user_error(error: BaseException) -> NoReturn:
    """Reports a user error (bad flag combination, file, data) in one line, exit 2.

    absl lists each failed validator on its own line; they are joined with "; ".
    """
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    print(f"error: {'; '.join(lines)}", file=sys.stderr)
    sys.exit(2)
