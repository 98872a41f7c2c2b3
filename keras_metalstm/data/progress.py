"""Progress of reading many image files, reported to whoever asked for it (the command line shows a bar).

Decoding an image folder, Omniglot or Mini-ImageNet from its JPEG files takes from seconds to minutes (60,000
original-size ImageNet JPEGs: about 100 s on two cores) and happens deep inside the loaders. Rather than pass a
callback through every loader, a caller asks for progress around a block of code:

    from tqdm import tqdm
    with reading_progress(lambda total: tqdm(total=total, unit="img")):
        splits = load_dataset("folder", "my_images")

`factory(total)` is called when `total` image files are about to be read and returns an object with `update(n)`
and `close()` (a tqdm bar is one). The setting is a context variable: it holds in this thread (and its asyncio
tasks) inside the block only.
"""

from __future__ import annotations

import contextlib
import contextvars

_FACTORY = contextvars.ContextVar("keras_metalstm_reading_progress", default=None)


@contextlib.contextmanager
def reading_progress(factory):
    """Inside the block, every image reading of `total` files reports to `factory(total)` (None: to nothing)."""
    token = _FACTORY.set(factory)
    try:
        yield
    finally:
        _FACTORY.reset(token)


@contextlib.contextmanager
def reading(total):
    """The progress object of a reading of `total` files (closed at the end), or None when nobody asked."""
    factory = _FACTORY.get()
    if factory is None:
        yield None
        return
    bar = factory(total)
    try:
        yield bar
    finally:
        bar.close()
