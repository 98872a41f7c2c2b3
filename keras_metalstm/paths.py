"""Paths the package reads and writes must be local (or mounted) file-system paths, not URLs.

Run directories, exports and data are written and read with the operating system's files: each artifact is
written beside its target and renamed into place, which object stores (gs://, s3://) cannot do, and a URL given
as a path would otherwise become a local folder named "gs:" without a word. A bucket mounted as a file system
(Cloud Storage FUSE, s3fs) is a local path and works.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def refuse_url(path: str | os.PathLike | None, what: str, error: type[Exception]) -> None:
    """Raises `error` saying why `path` (called `what`) cannot be used when it is a URL; nothing otherwise."""
    if path is None or not _URL.match(os.fspath(path)):
        return
    raise error(
        f"{what} {os.fspath(path)} is a URL: it must be a local path (object stores cannot rename the files this "
        "package writes into place); mount the bucket as a file system (e.g. Cloud Storage FUSE, s3fs) and give "
        "its local path"
    )


@contextlib.contextmanager
def replaced_in_place(path: str | os.PathLike):
    """Yields a temporary path beside `path`, with its name's suffix (Keras saves only to a ".keras" name), to write
    in full; then renames it over `path`, so that `path` is never half-written. On failure the temporary file is
    removed, and an OSError without a file name (a full disk's ENOSPC from write()) or naming the temporary file (a
    read-only folder's EROFS from open()) is raised again naming `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        if isinstance(error, OSError) and (not error.filename or Path(error.filename) == tmp):
            raise OSError(error.errno, error.strerror or str(error), str(path)) from error
        raise
