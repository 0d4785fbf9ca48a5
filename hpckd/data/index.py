"""ImageFolder index: the list of (file, class) pairs every loader and logit store agrees on.

The position of a file in :attr:`FolderIndex.files` is its global sample id (``Batch.index``). Files are sorted
(classes by folder name, files by name) so every rank and every run builds the same index. The index is checked
when built: a missing split folder, an empty class folder or a file that is not a complete JPEG/PNG is reported
with its path (``on_bad_image="error"``) or counted and dropped (``"skip"``).
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from hpckd.errors import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


@dataclass
class FolderIndex:
    root: Path
    classes: list[str]
    files: list[str]  # absolute paths
    labels: list[int]
    skipped: list[str] = field(default_factory=list)  # bad files dropped under on_bad_image="skip"

    def __len__(self) -> int:
        return len(self.files)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def fingerprint(self) -> str:
        """Hash of relative paths, sizes and mtimes: identifies the exact data a result or logit store used."""
        digest = hashlib.sha256()
        for path in self.files:
            stat = Path(path).stat()
            rel = Path(path).relative_to(self.root).as_posix()
            digest.update(f"{rel}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        return digest.hexdigest()[:16]


def build_index(root: str | Path, on_bad_image: str = "error", classes: list[str] | None = None) -> FolderIndex:
    """Index ``root/<class>/<image>``; ``classes`` pins the class order (val must use train's classes)."""
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
    files: list[str] = []
    labels: list[int] = []
    skipped: list[str] = []
    for label, name in enumerate(classes):
        folder = root / name
        images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise DataError(f"empty class folder: {folder} (no .jpg/.jpeg/.png files)")
        for path in images:
            problem = check_image(path)
            if problem is None:
                files.append(str(path.resolve()))
                labels.append(label)
            elif on_bad_image == "skip":
                skipped.append(str(path))
            else:
                raise DataError(f"bad image {path}: {problem} (fix or remove it, or set data.on_bad_image=skip)")
    if skipped:
        warnings.warn(f"{root}: skipped {len(skipped)} bad image(s), first: {skipped[0]}", stacklevel=2)
    if not files:
        raise DataError(f"{root}: no readable images left")
    return FolderIndex(root=root.resolve(), classes=classes, files=files, labels=labels, skipped=skipped)


def check_image(path: Path) -> str | None:
    """Cheap integrity check (header parse + end-of-image marker); returns what is wrong, or None.

    A full decode of every file would cost minutes on ImageNet; truncation, garbage and wrong formats are caught
    here, and the decoders name the batch if something subtler slips through.
    """
    try:
        size = path.stat().st_size
        if size == 0:
            return "empty file"
        with path.open("rb") as handle:
            head = handle.read(8)
            handle.seek(max(0, size - 2))
            tail = handle.read(2)
        with Image.open(path) as img:
            fmt = img.format
            mode = img.mode
    except Exception as exc:  # PIL.UnidentifiedImageError, OSError, ...
        return f"unreadable ({type(exc).__name__})"
    if fmt == "JPEG":
        if head[:2] != b"\xff\xd8" or tail != b"\xff\xd9":
            return "truncated JPEG (no end-of-image marker)"
    elif fmt != "PNG":
        return f"unsupported format {fmt}"
    if mode not in ("RGB", "L", "CMYK", "RGBA", "P", "LA", "I;16", "I"):
        return f"unsupported colour mode {mode}"
    return None
