"""File indexes: the list of (file, class) pairs every loader, logit store and result agrees on.

The position of a file in :attr:`FolderIndex.files` is its global sample id (``Batch.index``). Two layouts:

- ImageFolder, ``root/<class>/<image>``: classes sorted by folder name, files by name, so every rank and every
  run builds the same index (:func:`build_index`);
- a list file of ``relative/path label`` lines (ImageNet-LT's format; also ImageNet's validation label file,
  where the label is a class index or a class folder name such as a WordNet id), in file order
  (:func:`build_list_index`).

Images are checked when indexed (header parse + JPEG end-of-image marker). Under ``on_bad_image="error"`` the
first problem raises a one-line :class:`DataError` naming the path; under ``"skip"`` bad files are dropped,
counted in :attr:`FolderIndex.skipped` (written to results.json by the engine) and reported as a warning: never
silently. Empty class folders keep their class id (so train and val ids agree) and are reported the same way.

Walking and checking 1.28M ImageNet files takes minutes, so an index is cached (:mod:`hpckd.data.index_cache`):
next to the data when writable, else in ``~/.cache/hpckd/index``; a cache is used only while the modification
times of the root and of every class folder (which change whenever a file is added, removed or renamed) and
the options match.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from hpckd.data import index_cache
from hpckd.data.sources import FileSource
from hpckd.data.subsets import mix
from hpckd.errors import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
BAD_IMAGE_CHOICES = ("error", "skip")


class SkippedDataWarning(UserWarning):
    """Bad images or empty class folders that ``on_bad_image="skip"`` dropped (the CLI prints it on one line)."""


class LabelledIndex:
    """What every data-set index shares (folder, CIFAR arrays, WebDataset shards): ``labels`` and ``classes``."""

    labels: list[int]
    classes: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def relabel(self, classes: list[str], labels: list[int]) -> "LabelledIndex":
        """The same samples with a new class list (a class subset, :mod:`hpckd.data.subsets`)."""
        return dataclasses.replace(self, classes=list(classes), labels=list(labels))  # type: ignore[type-var]

    def tagged(self, subset_tag: str) -> "LabelledIndex":
        """The same index whose fingerprint also names the subset it is (:func:`hpckd.data.subsets.tag`)."""
        return dataclasses.replace(self, subset_tag=subset_tag)  # type: ignore[type-var]


@dataclass
class FolderIndex(LabelledIndex):
    root: Path
    classes: list[str]
    files: list[str]  # absolute paths
    labels: list[int]
    skipped: list[str] = field(default_factory=list)  # "path: problem" of what on_bad_image="skip" dropped
    stats: list[tuple[int, int]] | None = None  # (size, mtime_ns) per file when indexed; None = stat on demand
    _fingerprint: str | None = field(default=None, repr=False)
    subset_tag: str = ""  # data.subset that produced this index (mixed into the fingerprint)

    @property
    def source(self) -> FileSource:
        return FileSource(self.files)

    def fingerprint(self) -> str:
        """Hash of relative paths, sizes and mtimes (as indexed): identifies the exact data a result used."""
        if self._fingerprint is None:
            stats = self.stats if self.stats is not None else [file_stat(p) for p in self.files]
            digest = hashlib.sha256()
            for path, (size, mtime) in zip(self.files, stats):
                rel = os.path.relpath(path, self.root).replace(os.sep, "/")
                digest.update(f"{rel}\0{size}\0{mtime}\n".encode())
            self._fingerprint = digest.hexdigest()[:16]
        return mix(self._fingerprint, self.subset_tag)


    def select(self, positions) -> "FolderIndex":
        """The subset at ``positions`` (a long-tailed subset); sample ids are renumbered 0..len-1."""
        positions = [int(i) for i in positions]
        stats = None if self.stats is None else [self.stats[i] for i in positions]
        return FolderIndex(self.root, self.classes, [self.files[i] for i in positions],
                           [self.labels[i] for i in positions], list(self.skipped), stats, subset_tag=self.subset_tag)


def file_stat(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return int(st.st_size), int(st.st_mtime_ns)


def check_choice(on_bad_image: str) -> None:
    if on_bad_image not in BAD_IMAGE_CHOICES:
        raise DataError(f"on_bad_image={on_bad_image!r}; choose one of {', '.join(BAD_IMAGE_CHOICES)}")


def build_index(root: str | Path, on_bad_image: str = "error", classes: list[str] | None = None,
                cache: str | None = "auto") -> FolderIndex:
    """Index ``root/<class>/<image>``; ``classes`` pins the class order (val must use train's classes).

    ``cache``: ``"auto"`` (next to the data, else the user cache folder), ``None``/``"off"``, or a folder."""
    check_choice(on_bad_image)
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"dataset folder not found: {root} (expected one sub-folder per class)")
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not found:
        raise DataError(f"no class folders in {root} (expected {root}/<class>/<image>.jpg)")
    if classes is not None:
        missing = sorted(set(classes) - set(found))
        extra = sorted(set(found) - set(classes))
        if missing or extra:
            raise DataError(f"{root}: class folders differ from the training split (missing {missing}, extra {extra})")
    classes = list(classes) if classes is not None else found
    key = index_cache.folder_key(root, classes, on_bad_image)
    fields = index_cache.load(root, key, cache)
    if fields is not None:
        cached = FolderIndex(**fields)
        _report(root, cached.skipped)
        return cached
    index = _walk(root, classes, on_bad_image)
    index_cache.store(index, key, cache)
    return index


def _walk(root: Path, classes: list[str], on_bad_image: str) -> FolderIndex:
    files: list[str] = []
    labels: list[int] = []
    stats: list[tuple[int, int]] = []
    skipped: list[str] = []
    for label, name in enumerate(classes):
        folder = root / name
        images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            check_split_folder(root, "the folder")  # a data root given for a split: say so, not "empty class"
            problem = f"empty class folder: {folder} (no .jpg/.jpeg/.png files)"
            if on_bad_image != "skip":
                raise DataError(f"{problem}; add images or set data.on_bad_image=skip to keep the class empty")
            skipped.append(f"{folder}/: empty class folder")
        for path in images:
            _add(path, label, on_bad_image, files, labels, stats, skipped)
    return _finish(root, classes, files, labels, stats, skipped)


def _add(path: Path, label: int, on_bad_image: str, files: list, labels: list, stats: list, skipped: list) -> None:
    problem = check_image(path)
    if problem is None:
        files.append(str(path.resolve()))
        labels.append(label)
        stats.append(file_stat(str(path)))
    elif on_bad_image == "skip":
        skipped.append(f"{path}: {problem}")
    else:
        raise DataError(f"bad image {path}: {problem} (fix or remove it, or set data.on_bad_image=skip)")


def _finish(root: Path, classes: list[str], files: list, labels: list, stats: list, skipped: list) -> FolderIndex:
    _report(root, skipped)
    if not files:
        raise DataError(f"{root}: no readable images left")
    return FolderIndex(root=root.resolve(), classes=classes, files=files, labels=labels, skipped=skipped, stats=stats)


def _report(root: Path, skipped: list[str]) -> None:
    if skipped:
        warnings.warn(f"{root}: skipped {len(skipped)} bad image(s) or empty class folder(s), first: {skipped[0]}",
                      SkippedDataWarning, stacklevel=3)


def check_split_folder(path: str | Path, what: str) -> None:
    """Raise a one-line :class:`DataError` when ``path`` is a data root (it holds ``train/`` and ``val/``) where
    one split (``root/<class>/<image>``) is expected."""
    path = Path(path)
    splits = [name for name in ("train", "val") if (path / name).is_dir()]
    if len(splits) == 2:
        raise DataError(f"{what} {path} is a data root (it holds train/ and val/), not a split with one folder per "
                        f"class; give one split, e.g. {path / 'train'}")


def read_list_file(list_file: str | Path) -> list[tuple[str, str]]:
    """(relative path, label token) pairs of a ``path label`` list file; blank lines and ``#`` comments ignored."""
    list_file = Path(list_file)
    if not list_file.is_file():
        raise DataError(f"label/list file not found: {list_file}")
    pairs = []
    for number, line in enumerate(list_file.read_text().splitlines(), start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        # Tab-separated lines (Tiny ImageNet's val_annotations.txt: file, wnid, box) name the file and the label
        # in their first two fields; space-separated ones (ImageNet-LT) end with the label (paths may hold spaces).
        parts = text.split("\t")[:2] if "\t" in text else text.rsplit(None, 1)
        if len(parts) != 2:
            raise DataError(f"{list_file}:{number}: expected 'relative/path label', got {text!r}")
        pairs.append((parts[0], parts[1]))
    if not pairs:
        raise DataError(f"{list_file}: no 'relative/path label' lines")
    return pairs


def build_list_index(root: str | Path, list_file: str | Path, on_bad_image: str = "error",
                     classes: list[str] | None = None, num_classes: int | None = None) -> FolderIndex:
    """Index the files a list file names, relative to ``root``, in the list's order.

    A label is a class index (ImageNet-LT lists, numeric val label files) or a class name found in ``classes``
    (e.g. WordNet ids when the training split is an ImageFolder). Without ``classes`` the class names are the
    indices ``0 .. max`` (or ``num_classes - 1``). A listed file that is missing is a bad image (error or skip)."""
    check_choice(on_bad_image)
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"dataset folder not found: {root}")
    return build_pairs_index(root, read_list_file(list_file), str(list_file), on_bad_image, classes, num_classes)


def build_pairs_index(root: str | Path, pairs: list[tuple[str, str]], list_file: str, on_bad_image: str = "error",
                      classes: list[str] | None = None, num_classes: int | None = None) -> FolderIndex:
    """Index ``(relative path, label token)`` pairs under ``root`` (see :func:`build_list_index`); ``list_file``
    names where the pairs came from in errors."""
    check_choice(on_bad_image)
    root = Path(root)
    lookup = {name: i for i, name in enumerate(classes)} if classes is not None else {}
    files: list[str] = []
    labels: list[int] = []
    stats: list[tuple[int, int]] = []
    skipped: list[str] = []
    parsed = [(rel, _parse_label(token, lookup, list_file)) for rel, token in pairs]
    n_classes = len(classes) if classes is not None else max(num_classes or 0, 1 + max(label for _, label in parsed))
    for rel, label in parsed:
        if not 0 <= label < n_classes:
            raise DataError(f"{list_file}: label {label} of {rel} is outside 0..{n_classes - 1}")
        path = root / rel
        if not path.is_file():
            if on_bad_image != "skip":
                raise DataError(f"{list_file} names a missing file: {path} (fix the list or set data.on_bad_image=skip)")
            skipped.append(f"{path}: missing (named in {list_file})")
            continue
        _add(path, label, on_bad_image, files, labels, stats, skipped)
    names = list(classes) if classes is not None else [str(i) for i in range(n_classes)]
    return _finish(root, names, files, labels, stats, skipped)


def _parse_label(token: str, lookup: dict[str, int], list_file) -> int:
    if token in lookup:
        return lookup[token]
    try:
        return int(token)
    except ValueError as exc:
        raise DataError(f"{list_file}: label {token!r} is neither a class index nor a known class name") from exc


def check_image(path: Path) -> str | None:
    """Cheap integrity check (header parse + end-of-image marker); returns what is wrong, or None.

    A full decode of every file would cost minutes on ImageNet; truncation, garbage and wrong formats are caught
    here, and the decoders name the batch if something subtler slips through. Grayscale, CMYK and palette
    images are fine (both loaders convert them to RGB), and so is a PNG under a .jpg name (decoders look at the
    content, not the name).
    """
    try:
        size = path.stat().st_size
        if size == 0:
            return "empty file"
        with path.open("rb") as handle:
            head = handle.read(8)
            handle.seek(max(0, size - 8))
            tail = handle.read(8)
        with Image.open(path) as img:
            fmt = img.format
            mode = img.mode
    except Exception as exc:  # PIL.UnidentifiedImageError, OSError, ...
        return f"unreadable ({type(exc).__name__})"
    if fmt == "JPEG":
        if head[:2] != b"\xff\xd8" or tail[-2:] != b"\xff\xd9":
            return "truncated JPEG (no end-of-image marker)"
    elif fmt == "PNG":
        if tail != b"IEND\xaeB`\x82":
            return "truncated PNG (no IEND chunk)"
    else:
        return f"unsupported format {fmt}"
    if mode not in ("RGB", "L", "CMYK", "RGBA", "P", "LA", "I;16", "I"):
        return f"unsupported colour mode {mode}"
    return None


def build_tiny_imagenet(root: str | Path, split: str, on_bad_image: str = "error",
                        classes: list[str] | None = None) -> FolderIndex:
    """Tiny ImageNet (200 classes, 64 px) as its archive unpacks: ``train/<wnid>/images/<wnid>_<k>.JPEG`` and
    ``val/images/val_<k>.JPEG`` labelled by ``val/val_annotations.txt`` (tab-separated: file, wnid, box). Classes
    are the sorted training wnids (what an ImageFolder of the reorganised data gives); val uses train's."""
    root = Path(root)
    if split == "train":
        folder = root / "train"
        if not folder.is_dir():
            raise DataError(f"Tiny ImageNet train folder not found: {folder} (expected train/<wnid>/images/)")
        wnids = sorted(p.name for p in folder.iterdir() if (p / "images").is_dir())
        if not wnids:
            raise DataError(f"no train/<wnid>/images/ folders in {root} (is this Tiny ImageNet's layout?)")
        pairs = [(f"{w}/images/{f.name}", w) for w in wnids
                 for f in sorted((folder / w / "images").iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
        return build_pairs_index(folder, pairs, str(folder), on_bad_image, classes=wnids)
    annotations = root / "val" / "val_annotations.txt"
    pairs = [(f"images/{rel}", label) for rel, label in read_list_file(annotations)]
    return build_pairs_index(root / "val", pairs, str(annotations), on_bad_image, classes=classes)
