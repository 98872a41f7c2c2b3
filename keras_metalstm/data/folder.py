"""Image-folder loader for the user's own data: ``root/<class>/*.png|jpg|jpeg|bmp|gif`` (JPEGs also as
``jfif|jpe|pjpeg|pjp``, and ``webp`` with TensorFlow 2.20 or later), one sub-folder per class, or a folder split
already, ``root/{train,val,test}/<class>/*`` (``validation`` for ``val`` too; the layout many copies of
Mini-ImageNet come in), whose splits are kept as they are.

Every immediate sub-folder of ``root`` (hidden ones skipped) is a class named after the folder; its image files
(extensions ``IMAGE_EXTENSIONS``, any case) are read in sorted order, other files are ignored, but a load that
leaves out images (in a sub-folder of a class folder, beside the class folders, or of a format not read) says so
in one warning. A file or folder name that is not UTF-8 is refused (TensorFlow takes UTF-8 paths only). With
``image_shape=(H, W, C)`` every image is converted to it by the package's rule (``convert_images``); without it
all images must already share one shape (an alpha channel does not count) and mixed shapes are refused, the
message naming two files that differ and the rule ``image_shape`` would apply.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import NamedTuple

from keras_metalstm.data.dataset import (
    DEFAULT_SPLIT_FRACTIONS,
    ClassIndexedDataset,
    DatasetSplits,
    composed,
    read_split_file,
)
from keras_metalstm.data.errors import DataError
from keras_metalstm.data.images import READS_WEBP, decode_image_files

# The formats the installed TensorFlow's image decoder reads (a GIF: its first frame; WebP from TensorFlow 2.20 on).
# .jfif, .jpe, .pjpeg and .pjp are JPEG files under the names Windows and browsers save some of them with.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".jfif", ".jpe", ".pjpeg", ".pjp", ".bmp", ".gif") + (
    (".webp",) if READS_WEBP else ()
)
# Image formats it does not read: named when a folder holds only them.
UNREAD_IMAGE_EXTENSIONS = tuple(
    extension
    for extension in (
        ".tif", ".tiff", ".webp", ".heic", ".heif", ".avif", ".jxl", ".jp2", ".ppm", ".pgm", ".pbm", ".pnm", ".ico",
        ".svg", ".dcm", ".exr",
    )
    if extension not in IMAGE_EXTENSIONS
)


def is_hidden(name: str) -> bool:
    """Whether a file or folder is skipped by every listing: hidden (".*"), or the resource-fork folder a zip made
    on a Mac carries ("__MACOSX")."""
    return name.startswith(".") or name == "__MACOSX"


def unread_files_note(folder: Path) -> str:
    """The end of a message about a folder with no image to read, naming the most common format among its files
    that is not read (`UNREAD_IMAGE_EXTENSIONS`) and the fix; "" when it holds none: a folder of TIFF images is not
    an empty one."""
    others = [f.suffix.lower() for f in folder.iterdir() if f.is_file() and not is_hidden(f.name)]
    others = [suffix for suffix in others if suffix in UNREAD_IMAGE_EXTENSIONS]
    if not others:
        return ""
    suffix = max(sorted(set(others)), key=others.count)
    return (
        f"; it holds {others.count(suffix)} {suffix} file(s), a format not read "
        f"({'/'.join(IMAGE_EXTENSIONS)} are): convert them to PNG"
    )


def readable_path(path: str | os.PathLike) -> str:
    """`path` as text that prints anywhere: a byte of its name that is not UTF-8 (which Python holds as a lone
    surrogate, unprintable) is shown as ``\\xNN``."""
    try:
        return os.fsencode(path).decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate that no file system name decodes to: typed, not listed
        return str(path).encode("utf-8", "backslashreplace").decode("utf-8")


def _is_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def refuse_non_utf8_names(paths: Sequence[Path], kind: str = "file") -> None:
    """DataError naming the first of `paths` whose name is not UTF-8 (a Windows or Latin-1 archive's), and the fix:
    TensorFlow takes paths as UTF-8 strings only and would fail deep inside."""
    for path in paths:
        if not _is_utf8(str(path)):
            raise DataError(
                f"the {kind} path {readable_path(path)} is not valid UTF-8 (\\xNN: a byte that is not): "
                "TensorFlow takes paths in UTF-8 only; rename it in UTF-8 (convmv -r -f <its encoding> -t utf-8 "
                "--notest DIR renames a whole folder tree)"
            )


def refuse_dangling_link(path: Path) -> None:
    """DataError for a link whose target is gone (a drive not mounted, a moved folder): skipped, its class or image
    would silently be missing from the data set."""
    if path.is_symlink() and not path.exists():
        raise DataError(
            f"{readable_path(path)} is a link to {readable_path(os.readlink(path))}, which does not exist: restore "
            "its target (mount its drive?) or remove the link"
        )


def _listed_image_files(folder: Path, extensions: Sequence[str]) -> list[Path]:
    files = []
    # os.scandir knows an entry's type from the listing: a stat call only for links.
    with os.scandir(folder) as entries:
        for entry in entries:
            if is_hidden(entry.name) or Path(entry.name).suffix.lower() not in extensions:
                continue
            if entry.is_file():
                files.append(Path(entry.path))
            else:
                refuse_dangling_link(Path(entry.path))
    return sorted(files)


def image_files(folder: Path, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> list[Path]:
    """The image files directly in `folder` (lower-case `extensions`, matched in any case; hidden files skipped),
    sorted by name; DataError for a folder or image file name that is not UTF-8 (`refuse_non_utf8_names`)."""
    refuse_non_utf8_names([folder], "folder")
    files = _listed_image_files(folder, extensions)
    refuse_non_utf8_names(files)
    return files


class LeftOut(NamedTuple):
    """The image files a load leaves out, by why."""

    nested: list[Path]  # in a sub-folder of a class folder
    unread: list[Path]  # in a class folder, of a format not read
    loose: list[Path]  # beside the class folders, in no class

    def __add__(self, other: LeftOut) -> LeftOut:
        return LeftOut(*(mine + theirs for mine, theirs in zip(self, other, strict=True)))


def _unread_extensions(extensions: Sequence[str]) -> tuple[str, ...]:
    return tuple(suffix for suffix in UNREAD_IMAGE_EXTENSIONS if suffix not in extensions)


def left_out_files(class_dir: Path, extensions: Sequence[str]) -> tuple[list[Path], list[Path]]:
    """The files of a class folder that look like images but are not read: (those in its sub-folders, at any depth,
    of a read or unread image format; those directly in it of a format not read). Hidden files and folders and
    other files (notes, labels) are expected there and are not counted."""
    unread_extensions = _unread_extensions(extensions)
    wanted = tuple(extensions) + unread_extensions
    nested, unread = [], []
    # os.scandir knows an entry's type from the listing: no stat call for each of a large class's files.
    with os.scandir(class_dir) as entries:
        for entry in entries:
            if is_hidden(entry.name):
                continue
            if entry.is_dir():
                for folder, folders, names in os.walk(entry.path):
                    folders[:] = [name for name in folders if not is_hidden(name)]
                    nested += [
                        Path(folder, name)
                        for name in names
                        if not is_hidden(name) and Path(name).suffix.lower() in wanted
                    ]
            elif Path(entry.name).suffix.lower() in unread_extensions and entry.is_file():
                unread.append(Path(entry.path))
    return sorted(nested), sorted(unread)


def warn_left_out(root: Path, left_out: LeftOut) -> None:
    """One warning for a data set's images that its load leaves out, with counts, an example and the fixes: a
    class silently smaller than its folder suggests would go unnoticed."""
    nested, unread, loose = left_out
    if not any(left_out):
        return
    notes = []
    if loose:
        notes.append(
            f"{len(loose)} image file(s) beside the class folders (e.g. {readable_path(loose[0].relative_to(root))}), "
            "in no class: move each into its class's folder"
        )
    if nested:
        folders = {path.parent for path in nested}
        formats = sorted({path.suffix.lower() for path in nested if path.suffix.lower() in UNREAD_IMAGE_EXTENSIONS})
        convert = f" (and convert the {', '.join(formats)} ones to PNG)" if formats else ""
        notes.append(
            f"{len(nested)} image file(s) in {len(folders)} sub-folder(s) of class folders (e.g. "
            f"{readable_path(nested[0].relative_to(root))}): a class holds only the images directly in its folder, "
            f"so move them up into their class folder{convert}"
        )
    if unread:
        suffixes = sorted({path.suffix.lower() for path in unread})
        notes.append(
            f"{len(unread)} file(s) of a format not read ({', '.join(suffixes)}; e.g. "
            f"{readable_path(unread[0].relative_to(root))}): convert them to PNG ({'/'.join(IMAGE_EXTENSIONS)} "
            "are read)"
        )
    warnings.warn(
        f"keras_metalstm: image folder {readable_path(root)}: left out {'; and '.join(notes)}.",
        RuntimeWarning,
        stacklevel=3,
    )


# The names of the sub-folders of a folder split already (any case), by split.
SPLIT_FOLDER_NAMES = {"train": ("train",), "val": ("val", "validation"), "test": ("test",)}
SPLIT_FOLDER_ALIASES = {name for names in SPLIT_FOLDER_NAMES.values() for name in names}


def split_folders(root: Path) -> dict[str, Path] | None:
    """``{split: folder}`` when every sub-folder of ``root`` is named after a split (``SPLIT_FOLDER_NAMES``) and holds
    class folders rather than images; None for a folder of classes (a class may be called "test")."""
    splits = {name: split for split, names in SPLIT_FOLDER_NAMES.items() for name in names}
    folders = [p for p in root.iterdir() if p.is_dir() and not is_hidden(p.name)]
    if not folders or any(p.name.lower() not in splits for p in folders):
        return None
    if any(image_files(p) or not any(q.is_dir() for q in p.iterdir()) for p in folders):
        return None
    found = {}
    for folder in sorted(folders):
        split = splits[folder.name.lower()]
        if split in found:
            raise DataError(f"{root} has two folders of the {split} split, {found[split].name} and {folder.name}")
        found[split] = folder
    return {split: found[split] for split in SPLIT_FOLDER_NAMES if split in found}


def _images_in_split_folders(split_dirs, extensions) -> str:
    """What keeps a folder split already from being read as one: images directly in its split folders."""
    stray = [path for folder in split_dirs for path in image_files(folder, extensions)]
    shown = ", ".join(f"{path.parent.name}/{path.name}" for path in stray[:3]) + ("..." if len(stray) > 3 else "")
    return (
        f"{len(stray)} image(s) lie directly in a split folder ({shown}): a split folder holds only class folders, "
        "so move them into their class folders"
    )


def list_image_folder(
    root: str | os.PathLike, extensions: Sequence[str] = IMAGE_EXTENSIONS, only: Collection[str] | None = None
) -> dict[str, list[Path]]:
    """``{class name: sorted image paths}`` of ``root/<class>/*`` (with `only`, of the classes it names; the other
    folders are not read); DataError for an empty or malformed folder, a RuntimeWarning for image files it leaves
    out (`warn_left_out`)."""
    classes, left_out = _list_classes(Path(root), extensions, only)
    warn_left_out(Path(root), left_out)
    return classes


def _list_classes(
    root: Path, extensions: Sequence[str], only: Collection[str] | None = None
) -> tuple[dict[str, list[Path]], LeftOut]:
    """`list_image_folder`'s classes and the files it leaves out, for one warning per load."""
    if root.is_file():
        raise DataError(
            f"{readable_path(root)} is a file: give the folder that holds one sub-folder of images per class"
        )
    if not root.is_dir():
        raise DataError(f"image folder not found: {readable_path(root)}")
    refuse_non_utf8_names([root], "folder")
    extensions = tuple(e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions)
    entries = [p for p in root.iterdir() if not is_hidden(p.name)]
    for entry in entries:
        refuse_dangling_link(entry)
    wanted = None if only is None else {composed(name) for name in only}  # either Unicode form names a folder
    class_dirs = sorted(p for p in entries if p.is_dir() and (wanted is None or composed(p.name) in wanted))
    # Before any message names a class folder: a name that is not UTF-8 would not even print.
    refuse_non_utf8_names(class_dirs, "class folder")
    image_like = extensions + _unread_extensions(extensions)
    loose = sorted(p for p in entries if p.suffix.lower() in image_like and p.is_file())
    if not class_dirs:
        hint = (
            f"; found {len(loose)} image(s) directly in it: move them into one sub-folder per class"
            if loose
            else ""
        )
        raise DataError(
            f"image folder {root} is empty: expected one sub-folder per class, "
            f"root/<class>/*{'|'.join(extensions)}{hint}"
        )
    classes, left_out = {}, LeftOut([], [], loose)
    for class_dir in class_dirs:
        files = image_files(class_dir, extensions)
        if not files:
            nested = sorted(
                p.name for p in class_dir.iterdir() if p.is_dir() and _listed_image_files(p, extensions)
            )
            shown = ", ".join(nested[:3]) + ("..." if len(nested) > 3 else "")
            if nested and (splits := split_folders(root)):
                fix = (
                    f"; {root} is split into {', '.join(p.name for p in splits.values())} folders of classes: read "
                    "it with image_folder_splits (--dataset folder), which keeps the splits"
                )
            elif nested and any(p.name.lower() in SPLIT_FOLDER_ALIASES for p in class_dirs):
                others = [p.name for p in class_dirs if p.name.lower() not in SPLIT_FOLDER_ALIASES]
                fix = f"; {root} looks split into train/val/test folders of classes, but " + (
                    f"it also holds {', '.join(others)}: a folder split already holds only its split folders, so "
                    "move or remove the others"
                    if others
                    else _images_in_split_folders(class_dirs, extensions)
                )
            elif nested and len(class_dirs) == 1:  # the data set's folder, one level down
                fix = (
                    f"; it holds {len(nested)} folder(s) of images ({shown}): if those are the classes, give "
                    f"{class_dir} as the data directory"
                )
            elif nested:
                fix = (
                    f"; it holds {len(nested)} folder(s) of images ({shown}) but the classes must be the immediate "
                    f"sub-folders of {root}: move those folders up into it"
                )
            else:
                fix = unread_files_note(class_dir) or "; add images or remove the folder"
            raise DataError(f"class folder {class_dir} holds no {'/'.join(extensions)} image{fix}")
        classes[class_dir.name] = files
        left_out += LeftOut(*left_out_files(class_dir, extensions), [])
    refuse_one_folder_twice(classes)
    return classes, left_out


def refuse_one_folder_twice(classes: dict[str, list[Path]]) -> None:
    """DataError when two classes of ``{name: files}`` are one folder, reached through a link: its images would be
    two classes, which the split may put on both sides of a few-shot split."""
    seen = {}
    for files in classes.values():
        folder = files[0].parent
        real = folder.resolve()
        if real in seen:
            raise DataError(
                f"class folders {seen[real]} and {folder} are one folder ({real}), reached through a link: its "
                "images would be two classes, perhaps in two splits; remove the link, or copy the images if the "
                "two classes are meant to differ"
            )
        seen[real] = folder


def load_image_folder(
    root: str | os.PathLike,
    image_shape: Sequence[int] | None = None,
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
) -> ClassIndexedDataset:
    """All classes of ``root/<class>/*.{png,jpg,jpeg,bmp,gif}`` as uint8 images (see the module doc for shapes)."""
    root = Path(root)
    return _decoded(root, list_image_folder(root, extensions), image_shape)


def _decoded(root: Path, classes: dict[str, list[Path]], image_shape) -> ClassIndexedDataset:
    """The images of ``{class: files}`` decoded in one pass (one shape, one cache entry), sources relative to root."""
    files = [f for paths in classes.values() for f in paths]
    images, _ = decode_image_files([str(f) for f in files], image_shape, cache=True)
    return ClassIndexedDataset(
        images,
        [len(paths) for paths in classes.values()],
        list(classes),
        sources=[str(f.relative_to(root)) for f in files],
        name=root.name or str(root),
    )


def image_folder_splits(
    root: str | os.PathLike,
    image_shape: Sequence[int] | None = None,
    fractions: Sequence[float] = DEFAULT_SPLIT_FRACTIONS,
    seed: int = 0,
    split_file: str | os.PathLike | None = None,
    rotations: bool = False,
) -> DatasetSplits:
    """Class-disjoint (train, val, test) of an image folder: its own split folders (``split_folders``), else from
    ``split_file`` if given, else by ``seed`` and ``fractions``."""
    folders = split_folders(Path(root)) if Path(root).is_dir() else None
    if folders and split_file is not None:
        raise DataError(
            f"{root} is split into {', '.join(p.name for p in folders.values())} folders already: leave out the "
            "split file, or give it a folder of classes"
        )
    if folders:
        splits = _load_split_folders(Path(root), folders, image_shape)
    else:
        # A split file's classes only: a folder it leaves out is not read (it may be broken or not images at all).
        named = None if split_file is None else {name for part in read_split_file(split_file).values() for name in part}
        classes = list_image_folder(root, only=named)
        splits = _decoded(Path(root), classes, image_shape).split(fractions, seed, split_file=split_file)
    return splits.with_rotations() if rotations else splits


def _load_split_folders(root: Path, folders: dict[str, Path], image_shape) -> DatasetSplits:
    """The splits of a folder split already, its classes' names unique across them."""
    classes, assignment, left_out = {}, {}, LeftOut([], [], [])
    for split, folder in folders.items():
        listed, split_left_out = _list_classes(folder, IMAGE_EXTENSIONS)
        left_out += split_left_out
        for name in listed:
            if name in classes:
                raise DataError(
                    f"class {name!r} is in two splits of {root} ({classes[name][0].parent.parent.name} and "
                    f"{folder.name}); few-shot splits must not share classes: rename or remove one"
                )
        classes.update(listed)
        assignment[split] = list(listed)
    refuse_one_folder_twice(classes)
    warn_left_out(root, left_out)
    return _decoded(root, classes, image_shape).split_as(assignment)
