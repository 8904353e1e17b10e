"""Durable file I/O on any `tf.io.gfile` filesystem: local disk, GCS, `ram://`.

Run directories, exports and reports write only through this module and
`tf.io.gfile`, so `--model_dir` and `--export_dir` may be `gs://` paths (the
tests use TensorFlow's in-memory `ram://` filesystem to prove it).

What a reader sees while a writer dies depends on the filesystem's rename:

* POSIX local disk: `rename(2)` is atomic for a file and for a directory:
  readers see the old version or the new one.
* Object stores (GCS): gfile renames a file by copying it and deleting the
  source. A file written with `atomic_write` is never seen half-written, but
  depending on the store a reader may briefly find no file, and a kill
  between the copy and the delete can leave the temporary behind. A
  "directory" is renamed object by object, hence `publish_dir`.
* `ram://`: a file rename moves the file, but a directory rename moves only
  the directory's own entry, not the files in it. Its paths also match by
  string prefix: `exists("d/a")` holds while `d/ab` exists, and then
  `rmtree("d/a")` fails. So temporaries here are named with a prefix
  (`.tmp_name...`), never by extending the final name (`name.tmp`).
"""

from __future__ import annotations

from collections.abc import Iterator
import contextlib
import errno
import json
import os
from typing import Any
import uuid

import tensorflow as tf

# Prefix of `atomic_write`'s temporaries (hidden, so listings skip them).
_TEMPORARY_PREFIX = ".tmp_"
# What a filesystem raises when it refuses a write: Python's and TensorFlow's kinds.
_STORAGE_ERRORS = (OSError, tf.errors.ResourceExhaustedError, tf.errors.PermissionDeniedError,
                   tf.errors.FailedPreconditionError, tf.errors.UnknownError,
                   tf.errors.NotFoundError)
# The errors of a write the storage refused, worth naming.
_REFUSALS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG,
             errno.EIO)
# Their causes as the C library spells them (TensorFlow's messages quote them).
_CAUSES = tuple(os.strerror(code) for code in _REFUSALS)


class WriteError(OSError):
    """A write the storage refused (no space, read-only, no permission), naming the path.

    Raised by `writing`. The writers of this package publish a file or
    directory only once it is complete, so what `path` held before is intact.

    Attributes:
      path: What was being written.
      cause: Why it failed, e.g. "No space left on device".
    """

    def __init__(self, path: str, cause: str):
        super().__init__(f"cannot write {path}: {cause}")
        self.path, self.cause = path, cause


@contextlib.contextmanager
def writing(path: str) -> Iterator[None]:
    """Raises a storage failure inside the block as one `WriteError` naming `path`.

    TensorFlow reports a full disk under a checkpoint as a `ResourceExhaustedError`
    that names a temporary file deep inside; callers wrap each write in this so
    that the error names what the user knows (the checkpoint, the results file).

    Args:
      path: The file or directory the block writes (a `WriteError` of a file
        inside it is raised again naming `path`).

    Raises:
      WriteError: the block raised an `OSError` or a TensorFlow storage error.
    """
    try:
        yield
    except WriteError as error:  # Of a part: name the whole.
        raise WriteError(path, error.cause) from error
    except _STORAGE_ERRORS as error:
        raise WriteError(path, _cause(error)) from error


def refused_write(error: OSError) -> WriteError | None:
    """The `WriteError` of an OSError that names a path the storage refused, else None.

    For writes outside `writing` (e.g. a lock file opened with `open`): a full
    disk, a read-only filesystem or a missing permission, as the kernel reports
    it with the path. Other errors (a missing file, a bad argument) give None.
    """
    if isinstance(error, WriteError) or not error.filename or error.errno not in _REFUSALS:
        return None
    return WriteError(os.fsdecode(error.filename), error.strerror or _cause(error))


def check_output_dir(path: str) -> None:
    """Checks, before a job starts, that it can write into the directory `path`.

    `path` may not exist yet (the job creates it with any missing parents):
    then the nearest existing directory above it must take new entries. On
    local disk the filesystem answers (`access(2)`: a read-only mount refuses
    even root); other filesystems (GCS, `ram://`) tell their permissions only
    when a write fails, so there only a file in the way is found.

    Args:
      path: The directory a job writes into.

    Raises:
      NotADirectoryError: `path`, or the nearest existing path above it, is not
        a directory; `filename` is that path, `strerror` says what it is.
      WriteError: that directory refuses new entries, naming it and the cause
        ("Read-only file system", "Permission denied").
    """
    if not is_local(path):
        if tf.io.gfile.exists(path) and not tf.io.gfile.isdir(path):
            raise NotADirectoryError(errno.ENOTDIR, "is a file, not a directory", path)
        return
    existing = os.path.abspath(path)
    while not os.path.lexists(existing):  # Up to a directory, or to a file in the way.
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        what = "is a file, not a directory" if os.path.isfile(existing) else "is not a directory"
        raise NotADirectoryError(errno.ENOTDIR, what, existing)
    if not os.access(existing, os.W_OK | os.X_OK):
        read_only = os.statvfs(existing).f_flag & os.ST_RDONLY
        raise WriteError(existing, os.strerror(errno.EROFS if read_only else errno.EACCES))


def _cause(error: BaseException) -> str:
    """The reason of a storage error in a few words."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    text = str(error)
    for cause in _CAUSES:
        if cause in text:
            return cause
    return text.splitlines()[0] if text else type(error).__name__


def remove_quietly(path: str) -> None:
    """Deletes the file or directory `path` if it can: cleanup after a failed write.

    A failed write's temporaries are never read (they are not published), so
    a filesystem that refuses this too (read-only) costs only their space.
    """
    with contextlib.suppress(*_STORAGE_ERRORS):
        if tf.io.gfile.isdir(path):
            tf.io.gfile.rmtree(path)
        elif tf.io.gfile.exists(path):
            tf.io.gfile.remove(path)


def is_local(path: str) -> bool:
    """Whether `path` is on the local filesystem (it has no `scheme://`).

    Only such paths have POSIX semantics: atomic directory renames, `flock`,
    `fsync`.
    """
    return "://" not in path


def atomic_write(path: str, data: bytes | str) -> None:
    """Writes `data` to `path` so that no reader ever sees a partial file.

    The data goes to a uniquely named temporary sibling (same directory, so
    the rename stays on one filesystem), which is renamed over `path`. On
    local disk the temporary is also `fsync`ed first, so a crash of the
    machine cannot leave an empty `path` either. See the module docstring for
    what other filesystems guarantee.

    Args:
      path: The file to (over)write; missing parent directories are created.
      data: The content; a `str` is encoded as UTF-8.

    Raises:
      WriteError: the filesystem refused a step; the temporary is removed (if
        the filesystem allows) and `path` is left as it was.
    """
    directory, name = os.path.split(path)
    temporary = os.path.join(directory, f"{_TEMPORARY_PREFIX}{name}.{uuid.uuid4().hex}")
    with writing(path):
        if directory:
            tf.io.gfile.makedirs(directory)
        try:
            with tf.io.gfile.GFile(temporary, "wb") as stream:
                stream.write(data.encode("utf-8") if isinstance(data, str) else data)
            if is_local(temporary):
                _fsync(temporary)
            tf.io.gfile.rename(temporary, path, overwrite=True)
        except BaseException:
            remove_quietly(temporary)
            raise


def _fsync(path: str) -> None:
    """Flushes a local file's data to the disk (gfile has no `fsync`)."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_json(path: str, value: Any) -> None:
    """Writes `value` as indented JSON with sorted keys to `path`, atomically.

    Raises:
      TypeError, ValueError: `value` is not JSON-serialisable (nothing is
        written).
      WriteError: as `atomic_write`.
    """
    atomic_write(path, json.dumps(value, indent=2, sort_keys=True))


def read_json(path: str) -> Any:
    """The JSON value stored in `path`.

    Raises:
      tf.errors.NotFoundError: `path` does not exist.
      json.JSONDecodeError: `path` does not hold JSON.
    """
    with tf.io.gfile.GFile(path, "r") as stream:
        return json.load(stream)


def publish_dir(temporary: str, final: str, commit: str) -> None:
    """Moves the finished directory `temporary` to the new path `final`.

    On local disk this is one `rename(2)`: `final` appears whole or not at
    all. Elsewhere a directory rename is not atomic (see the module
    docstring), so the files move one by one with `commit` last: a reader that
    takes `final` as complete once `commit` exists never sees part of it.

    Args:
      temporary: The written directory, on the filesystem of `final`.
      final: Where it goes; must not exist.
      commit: The path, relative to `temporary`, of the file whose presence
        marks the directory complete (e.g. a checkpoint's `.index`).

    Raises:
      tf.errors.AlreadyExistsError: `final` exists (e.g. a concurrent writer
        took it; off local disk two writers may both pass this check).
      tf.errors.NotFoundError: `temporary` holds no `commit`; nothing moved.
    """
    commit_path = os.path.join(temporary, commit)
    if not tf.io.gfile.exists(commit_path):
        raise tf.errors.NotFoundError(None, None, f"{commit_path} does not exist")
    if is_local(final):
        tf.io.gfile.rename(temporary, final)
        return
    if tf.io.gfile.exists(final):
        raise tf.errors.AlreadyExistsError(None, None, f"{final} already exists")
    for directory, _, names in list(tf.io.gfile.walk(temporary)):
        target = os.path.join(final, directory[len(temporary):].strip("/"))
        tf.io.gfile.makedirs(target)
        for name in names:
            source = os.path.join(directory, name)
            if source != commit_path:
                tf.io.gfile.rename(source, os.path.join(target, name))
    tf.io.gfile.rename(commit_path, os.path.join(final, commit))
    tf.io.gfile.rmtree(temporary)
