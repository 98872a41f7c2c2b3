"""The inputs of prediction: image files, folders of them and ``.npy`` arrays turned into float32 batches
(batch, H, W, C) in [0, 1] at a model's input shape (the training scale), checked with messages that say how to
fix them. `ImageInputs` reads them batch by batch (any number of images in bounded memory), `read_images` all at
once, `labelled_inputs` a folder of class sub-folders with each image's true class; image files are converted by
the package's rule, rounded to uint8 and divided by 255 (the training preparation).
"""

from __future__ import annotations

import itertools
import warnings
from pathlib import Path

import numpy as np

from keras_metalstm.export.errors import ExportError
from keras_metalstm.meta_learner_inputs import check_inner_steps


def inner_steps_of(meta, inner_steps) -> int:
    """T for an adaptation: the meta-learner's own (None) or `inner_steps`, a whole number >= 1 (int() would export
    2.7 steps as 2, and 0 a model that never adapts)."""
    if inner_steps is None:
        return meta.inner_steps
    try:
        return check_inner_steps(inner_steps)
    except ValueError as error:
        raise ExportError(str(error)) from None


def check_images(images, image_shape):
    """Validates a batch for a model taking ``image_shape``; returns it as a float32 array (batch, H, W, C)."""
    images = np.asarray(images)
    shape = tuple(image_shape)
    if images.dtype == np.uint8:
        raise ExportError(
            "images are uint8 but the model takes float32 in [0, 1] (the training scale): divide by 255 first."
        )
    if images.dtype != np.float32:
        if images.dtype == np.float64:
            images = images.astype(np.float32)
        else:
            raise ExportError(
                f"images must be float32 in [0, 1] (the training scale), got dtype {images.dtype}."
            )
    if images.ndim == 3 and images.shape == shape:
        images = images[np.newaxis]
    if images.ndim != 4:
        raise ExportError(
            f"images must be a batch of shape (batch, {', '.join(map(str, shape))}), got shape {images.shape}."
        )
    if tuple(images.shape[1:]) != shape:
        raise ExportError(
            f"images have shape {tuple(images.shape[1:])} per image but the model takes {shape} (H, W, C): "
            "convert them with keras_metalstm.data.convert_images, or pass the image files to `metalstm predict`, "
            "which applies the training conversion rule."
        )
    if images.shape[0] == 0:
        raise ExportError("no images to predict.")
    finite = np.isfinite(images)
    if not finite.all():  # NaN compares false with everything: the range test alone lets it through
        count = int(finite.size - finite.sum())
        raise ExportError(f"image values must be finite numbers in [0, 1], got {count} NaN or infinite value(s).")
    if images.size and (images.min() < 0.0 or images.max() > 1.0):
        raise ExportError(
            f"image values must be in [0, 1] (the training scale), got {images.min():.3g}..{images.max():.3g}: "
            "divide 0..255 values by 255."
        )
    return images


class ImageInputs:
    """Image files, folders of them and ``.npy`` arrays for a model taking ``image_shape``, read batch by batch
    (`batches`), so a folder of any size is predicted in bounded memory.

    A folder stands for its image files (``IMAGE_EXTENSIONS``, any case, hidden ones skipped, sorted by name; not
    its sub-folders). Image files are converted to ``image_shape`` by the package's rule and rounded to uint8
    before dividing by 255 (the training preparation). A ``.npy`` file holds one image (H, W, C) or a batch,
    already float32 in [0, 1] at the model's shape (checked, never converted; its values batch by batch). Every
    path, and every array's dtype and shape, is checked when the inputs are made, before anything is predicted.
    ``len()`` is the number of images.
    """

    def __init__(self, paths, image_shape):
        self.image_shape = tuple(image_shape)
        # (path, None) for an image file, (path, its number of images) for a .npy array.
        self._sources = [(path, self._check(path)) for path in _expand_folders(map(Path, paths))]
        if not self._sources:
            raise ExportError("no images given.")
        self._count = sum(1 if rows is None else rows for _, rows in self._sources)

    def __len__(self):
        return self._count

    def _check(self, path):
        """None for an image file; an array's number of images, its dtype and shape checked (its values are
        checked as they are read)."""
        if not path.is_file():
            raise ExportError(f"image {path} not found.")
        if path.suffix.lower() != ".npy":
            return None
        array = _mapped_array(path)  # not kept: each map holds a file descriptor, and there may be thousands
        height, width, channels = self.image_shape
        if array.shape[1:] != tuple(self.image_shape) and array.shape[2:] == (height, width) and channels == 1:
            raise ExportError(
                f"{path}: an array of shape {array.shape[1:]}, {array.shape[1]} grey images without their channel "
                f"axis: save them as ({array.shape[1]}, {height}, {width}, 1) (numpy.save(path, images[..., None]))."
            )
        if array.ndim != 4:
            raise ExportError(
                f"{path}: an array of shape {array.shape}; expected one image {tuple(self.image_shape)} or a batch "
                f"(n, {', '.join(str(size) for size in self.image_shape)})."
            )
        try:
            check_images(array[:1] if array.ndim else array, self.image_shape)
        except ExportError as error:
            raise ExportError(f"{path}: {error}") from None
        return len(array)

    def batches(self, batch_size=256):
        """Yields (images float32 (n, H, W, C), names), n <= ``batch_size``, one name per image (an array's rows:
        ``path[i]``, unless it holds one image), reading only that batch's files."""
        positions = (  # (source index, row of an array or None for an image file), in input order
            (index, row)
            for index, (_, rows) in enumerate(self._sources)
            for row in ([None] if rows is None else range(rows))
        )
        while batch := list(itertools.islice(positions, batch_size)):
            yield self._read(batch)

    def _read(self, batch):
        files = [self._sources[index][0] for index, row in batch if row is None]
        decoded = iter(self._decoded(files) if files else ())
        images, names = [], []
        for index, group in itertools.groupby(batch, key=lambda item: item[0]):
            path, rows = self._sources[index]
            numbers = [row for _, row in group]
            if rows is None:
                images.append(next(decoded)[np.newaxis])
                names.append(str(path))
                continue
            block = np.array(_mapped_array(path)[numbers[0] : numbers[-1] + 1])
            try:
                images.append(check_images(block, self.image_shape))
            except ExportError as error:
                raise ExportError(f"{path}: {error}") from None
            names.extend([str(path)] if rows == 1 else [f"{path}[{i}]" for i in numbers])
        return np.concatenate(images), names

    def _decoded(self, files):
        from keras_metalstm.data import decode_image_files

        decoded, _ = decode_image_files([str(f) for f in files], self.image_shape)
        return decoded.astype(np.float32) * np.float32(1.0 / 255.0)


def _mapped_array(path):
    """A .npy file memory-mapped, one image (H, W, C) as a batch of one."""
    with open(path, "rb") as file:
        if file.read(6) != b"\x93NUMPY":  # NumPy would take any other file for a pickle and say so
            raise ExportError(f"{path}: not a NumPy .npy file (no .npy header): write the images with numpy.save.")
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as error:
        raise ExportError(f"{path}: not a readable .npy array ({error}).") from error
    return array[np.newaxis] if array.ndim == 3 else array


def read_images(paths, image_shape):
    """Image files and/or ``.npy`` arrays (as `ImageInputs` takes them) -> (float32 (n, H, W, C) in [0, 1], one
    name per row), all in memory: for many images, `Predictor.predict_inputs` reads them batch by batch."""
    batches = list(ImageInputs(paths, image_shape).batches(batch_size=4096))
    return np.concatenate([images for images, _ in batches]), [name for _, names in batches for name in names]


def _expand_folders(paths):
    from keras_metalstm.data.folder import (
        IMAGE_EXTENSIONS,
        image_files,
        left_out_files,
        refuse_non_utf8_names,
        unread_files_note,
    )

    for path in paths:
        if not path.is_dir():
            refuse_non_utf8_names([path])
            yield path
            continue
        images = image_files(path)
        if not images:
            folders = [child for child in path.iterdir() if child.is_dir() and image_files(child)]
            classes = (
                f"; it holds {len(folders)} folder(s) of images (e.g. {folders[0].name}): to score held-out images "
                "in class folders, pass it with --labelled (labelled_inputs in Python)"
                if folders
                else ""
            )
            raise ExportError(
                f"folder {path} holds no image files ({', '.join(IMAGE_EXTENSIONS)}){unread_files_note(path)}"
                f"{classes}. Pass image files, .npy arrays or folders of images."
            )
        _warn_of_unread(path, *left_out_files(path, IMAGE_EXTENSIONS))
        yield from images


def _warn_of_unread(folder, nested, unread) -> None:
    """One warning for the images of a folder given to predict that are not predicted (a prediction count
    smaller than the folder suggests would go unnoticed)."""
    notes = []
    if nested:
        notes.append(f"{len(nested)} in its sub-folders (e.g. {nested[0].relative_to(folder)}; pass those too)")
    if unread:
        notes.append(f"{len(unread)} of a format not read (e.g. {unread[0].name}; convert them to PNG)")
    if notes:
        warnings.warn(f"keras_metalstm: {folder}: not predicted: {'; '.join(notes)}.", RuntimeWarning, stacklevel=4)


def labelled_inputs(root, image_shape, class_names):
    """The images of a labelled folder ``root/<class>/*`` (``IMAGE_EXTENSIONS``; class folders named as the model's
    classes) as (`ImageInputs`, each image's true class name), for `accuracy`."""
    from keras_metalstm.data.folder import list_image_folder

    classes = list_image_folder(root)
    unknown = sorted(set(classes) - set(class_names))
    if unknown:
        raise ExportError(
            f"{root}: the class folder(s) {', '.join(unknown)} are not classes of the model "
            f"({', '.join(class_names)}): name each sub-folder after the class its images show."
        )
    files = [path for paths in classes.values() for path in paths]
    return ImageInputs(files, image_shape), [name for name, paths in classes.items() for _ in paths]
