"""A disk cache of decoded image files: a data set given as thousands of image files is decoded once, not at every
command (Mini-ImageNet from its original-size ImageNet JPEGs takes 80-100 s on two cores to decode; its cache
entry, 1.3 GB, should read back in a few seconds: 42 MB took 0.1 s here).

An entry holds the converted uint8 images (and each file's own shape) of one ordered list of files at one target
shape, in the cache folder: ``KERAS_METALSTM_CACHE_DIR``, by default ``$XDG_CACHE_HOME/keras-metalstm`` or
``~/.cache/keras-metalstm``; set it to an empty string to turn the cache off. An entry is used only while every
path leads to the same file (inode) with the size, modification and change times it had when the entry was
written; the entry of a changed file list's new version replaces the old one. Entries are written to a temporary file and renamed, so no reader sees half of
one; a cache that cannot be written or read is a warning, never a failure.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
import zipfile
from pathlib import Path

import numpy as np

CACHE_ENV = "KERAS_METALSTM_CACHE_DIR"
# Fewer files decode in about a second or less: not worth an entry (a support folder, a batch of predictions).
MIN_CACHED_FILES = 1000
# Part of every key: a change to the entry layout must bump it.
_FORMAT = 1


def cache_folder() -> Path | None:
    """Where entries are kept; None when the cache is turned off (``KERAS_METALSTM_CACHE_DIR=''``)."""
    chosen = os.environ.get(CACHE_ENV)
    if chosen is not None:
        return Path(chosen).expanduser() if chosen.strip() else None
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "keras-metalstm"


def cached_decode(paths, target_shape, decode, decoder):
    """``decode()`` -> (images, native_shapes) for the image files ``paths`` at ``target_shape``, or the result of
    an earlier call for the same files, unchanged since, by the same ``decoder`` (a text naming the decoding: its
    library's version and the conversion rule), read from the cache."""
    folder = cache_folder()
    if folder is None or len(paths) < MIN_CACHED_FILES:
        return decode()
    try:
        listing, version = _keys(paths, target_shape, decoder)
    except OSError:
        return decode()  # a missing file: decode() names it
    entry = folder / f"images-{listing}-{version}.npz"
    cached = _read(entry)
    if cached is not None:
        return cached
    images, native = decode()
    _write(entry, listing, images, native)
    return images, native


def _keys(paths, target_shape, decoder):
    """(the file list's and shape's key, its version: the decoder, the files' sizes, times and inodes)."""
    shape = None if target_shape is None else [int(v) for v in target_shape]
    listing = json.dumps([_FORMAT, shape, [os.path.abspath(p) for p in paths]])
    # The inode and change time too: folders swapped by name keep every path's size and modification time (an
    # archive sets the same time on all its files), but not which file is behind the path.
    stats = [(s.st_size, s.st_mtime_ns, s.st_ctime_ns, s.st_ino) for s in map(os.stat, paths)]
    return _digest(listing), _digest(json.dumps([decoder, stats]))


def _digest(text):
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:24]


def _read(entry):
    if not entry.is_file():
        return None
    try:
        with np.load(entry, allow_pickle=False) as stored:
            return stored["images"], stored["native_shapes"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
        warnings.warn(
            f"keras_metalstm: ignoring the unreadable image cache entry {entry} ({error}); decoding the files again.",
            RuntimeWarning,
            stacklevel=2,
        )
        return None


def _write(entry, listing, images, native):
    temporary = None
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=entry.parent, prefix=".writing-", suffix=".npz", delete=False) as out:
            temporary = Path(out.name)
            np.savez(out, images=images, native_shapes=native)
        os.replace(temporary, entry)
        temporary = None
        for older in entry.parent.glob(f"images-{listing}-*.npz"):
            if older != entry:
                older.unlink(missing_ok=True)
    except OSError as error:
        warnings.warn(
            f"keras_metalstm: could not write the decoded images to the cache {entry.parent} ({error}): they "
            f"will be decoded again next time. Set {CACHE_ENV} to a writable folder, or to an empty string to turn "
            "the cache off.",
            RuntimeWarning,
            stacklevel=2,
        )
    finally:
        if temporary is not None:
            temporary.unlink(missing_ok=True)
