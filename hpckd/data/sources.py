"""Where a loader's samples come from: encoded image files or in-memory uint8 arrays (CIFAR).

A source maps a global sample id to the sample's bytes (``encoded``: a JPEG/PNG file's content) or pixels (an
HxWx3 uint8 array). Loaders read samples by id in the order they decide (:mod:`hpckd.data.sharding`); the DALI
loader feeds what a source returns to its graph through ``fn.external_source``, the torch loader decodes it with
PIL. :func:`image_size` reads an image's size from its header, which the crop parameters need before decoding.
"""

from __future__ import annotations

import io
from typing import Protocol, Sequence

import numpy as np
from PIL import Image

from hpckd.errors import DataError


class Source(Protocol):
    encoded: bool

    def __len__(self) -> int: ...

    def read(self, i: int) -> np.ndarray: ...

    def size(self, i: int, data: np.ndarray) -> tuple[int, int]: ...

    def name(self, i: int) -> str: ...


class FileSource:
    """Encoded image files (JPEG/PNG); sample id = position in ``files``."""

    encoded = True

    def __init__(self, files: Sequence[str]) -> None:
        self.files = list(files)

    def __len__(self) -> int:
        return len(self.files)

    def read(self, i: int) -> np.ndarray:
        try:
            return np.fromfile(self.files[i], dtype=np.uint8)
        except OSError as exc:
            raise DataError(f"cannot read {self.files[i]} ({exc.strerror or type(exc).__name__})") from None

    def size(self, i: int, data: np.ndarray) -> tuple[int, int]:
        return image_size(data, self.files[i])

    def name(self, i: int) -> str:
        return self.files[i]


class ArraySource:
    """Decoded images in memory, (N, H, W, 3) uint8 (the CIFAR pickles)."""

    encoded = False

    def __init__(self, images: np.ndarray, label: str = "array") -> None:
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise DataError(f"{label}: expected (N, H, W, 3) uint8 images, got {images.shape} {images.dtype}")
        self.images = images
        self.label = label

    def __len__(self) -> int:
        return len(self.images)

    def read(self, i: int) -> np.ndarray:
        return self.images[i]

    def size(self, i: int, data: np.ndarray) -> tuple[int, int]:
        return int(data.shape[0]), int(data.shape[1])

    def name(self, i: int) -> str:
        return f"{self.label}[{i}]"


def as_source(data) -> Source:
    """A source from a source, or from a list of file paths."""
    if hasattr(data, "read") and hasattr(data, "encoded"):
        return data
    return FileSource(list(data))


def image_size(data: np.ndarray | bytes, where: str = "image") -> tuple[int, int]:
    """(height, width) from an encoded image's header (no decode)."""
    try:
        with Image.open(io.BytesIO(memoryview(data))) as img:
            w, h = img.size
    except Exception as exc:
        raise DataError(f"cannot read the image header of {where} ({type(exc).__name__})") from None
    return int(h), int(w)


def decode_rgb(data: np.ndarray, encoded: bool, where: str = "image") -> np.ndarray:
    """HxWx3 uint8 RGB pixels (grayscale, CMYK, palette and alpha images are converted)."""
    if not encoded:
        return np.ascontiguousarray(data)
    try:
        with Image.open(io.BytesIO(memoryview(data))) as img:
            return np.array(img.convert("RGB"))  # a writable copy: torch.from_numpy wants one
    except Exception as exc:
        raise DataError(f"cannot decode {where} ({type(exc).__name__})") from None
