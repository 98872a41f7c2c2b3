"""Atomic writes: everything is written to a hidden temporary path beside the target and renamed into place.

A reader (TensorFlow Serving polling a model folder, a user) never sees a half-written artifact, and an existing
target is only replaced when the caller passes ``force=True``.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import uuid
from contextlib import contextmanager, suppress
from pathlib import Path

from keras_metalstm.data.errors import tensorflow_error_text
from keras_metalstm.export.errors import ExportError
from keras_metalstm.paths import refuse_url
from keras_metalstm.processes import process_alive


def check_target(target: str | os.PathLike, force: bool) -> Path:
    """``target`` as a Path; ExportError if it exists and ``force`` is False, is a URL, or cannot be written: its
    nearest existing folder is a file or not writable (said before any work, not after it)."""
    refuse_url(target, "the export target", ExportError)
    target = Path(target)
    if target.exists() and not force:
        raise ExportError(
            f"{target} already exists; pass --force (force=True in Python) to overwrite it or choose another path."
        )
    folder = next(parent for parent in target.absolute().parents if parent.exists())
    if not folder.is_dir():
        raise ExportError(f"cannot write {target}: {folder} is a file, not a folder; choose another path.")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ExportError(f"cannot write {target}: the folder {folder} is not writable; choose another path.")
    return target


def temporary_sibling(target: Path, suffix: str = "") -> Path:
    """A hidden, unique path in the target's folder (same file system, so the final rename is atomic)."""
    return target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}{suffix}"


_TEMPORARY_NAME = re.compile(r"^\..+\.tmp-(\d+)-[0-9a-f]{8}(\..*)?$")


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete the temporaries `temporary_sibling` left in `folder` by writers that died (kill -9, power loss): those
    whose process no longer runs on this machine. Returns what was removed."""
    removed = []
    if not folder.is_dir():
        return removed
    for path in folder.iterdir():
        match = _TEMPORARY_NAME.match(path.name)
        if match is None or process_alive(int(match.group(1))):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def replace(tmp: Path, target: Path) -> None:
    """Move ``tmp`` (file or folder) to ``target``, replacing an existing target (the caller checked --force)."""
    if target.is_dir() and not target.is_symlink():
        old = temporary_sibling(target, ".old")
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)


@contextmanager
def atomic_path(target: str | os.PathLike, force: bool = False, directory: bool = False, suffix: str = ""):
    """Yields a temporary path to write; on success it is renamed to ``target``, on error removed.

    ``directory=True`` creates the temporary path as an empty folder first. ``suffix`` keeps an extension that a
    writer insists on (Keras only writes ``*.keras`` files). Folders made for the target are removed again when
    nothing was written into them (a failed or interrupted export leaves no empty model folder).
    """
    target = check_target(target, force)
    made = [folder for folder in (target.parent, *target.parent.parents) if not folder.exists()]
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target.parent)
    tmp = temporary_sibling(target, suffix)
    if directory:
        tmp.mkdir()
    try:
        yield tmp
        check_target(target, force)  # still free (another writer may have raced us)
        replace(tmp, target)
        made = []
    except Exception as error:
        cause = _storage_failure(error)
        if cause is None:
            raise
        raise ExportError(
            f"cannot write {target}: {cause}; nothing was written there (free some space, or choose another path)"
        ) from None
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()
        for folder in made:  # innermost first; rmdir leaves a folder someone else wrote into
            with suppress(OSError):
                folder.rmdir()


def _storage_failure(error: Exception) -> str | None:
    """Why a write failed when the file system refused it (a full disk, no permission): an OSError, or the
    TensorFlow error that writing a SavedModel's files raises for one; None for any other error."""
    if isinstance(error, OSError):
        return error.strerror or str(error)
    tf = sys.modules.get("tensorflow")
    if tf is not None and isinstance(error, (tf.errors.ResourceExhaustedError, tf.errors.PermissionDeniedError)):
        return tensorflow_error_text(error).rsplit("; ", 1)[-1]  # "<temporary file>; No space left on device"
    return None


def versions(base: str | os.PathLike) -> list[int]:
    """The integer version folders of a TensorFlow-Serving model folder, sorted."""
    base = Path(base)
    if not base.is_dir():
        return []
    return sorted(int(p.name) for p in base.iterdir() if p.is_dir() and p.name.isdigit())


def next_version(base: str | os.PathLike) -> int:
    """The next free integer version under ``base`` (1 for a new model folder): past every integer name there,
    a stray file's too, which would stand in the new version's way."""
    base = Path(base)
    taken = [int(p.name) for p in base.iterdir() if p.name.isdigit()] if base.is_dir() else []
    return max(taken, default=0) + 1
