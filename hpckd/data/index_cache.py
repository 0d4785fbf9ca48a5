"""On-disk cache of file indexes, so a 1.28M-image tree is walked and checked once, not at every start.

Where: ``PARENT/.hpckd-index-<name of ROOT>.json.gz`` next to the data when that folder is writable (not inside
ROOT: writing there would change ROOT's own listing), else
``~/.cache/hpckd/index/<hash of ROOT>.json.gz`` (``cache="auto"``); or a folder given as ``cache``; ``"off"``
disables it. Written atomically (temp file + rename), so concurrent ranks or a killed job never leave a partial
cache behind; a corrupt or mismatching cache is ignored and rebuilt.

Validity: the key holds the format version, the resolved root, the class list, ``on_bad_image`` and the
modification time of the root and of every class folder. A folder's mtime changes when a file in it is added,
removed or renamed, so those invalidate the cache without a stat of every file. Rewriting a file in place (same
name) does not change its folder's mtime; delete the cache (or use ``cache="off"``) after such edits. The cache
stores each file's size and mtime as indexed, which the dataset fingerprint hashes.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from pathlib import Path

from hpckd.io import atomic_open

VERSION = 1


def folder_key(root: Path, classes: list[str], on_bad_image: str) -> dict:
    root = root.resolve()
    mtimes = [os.stat(root / c).st_mtime_ns for c in classes]
    return {"version": VERSION, "root": str(root), "classes": list(classes), "on_bad_image": on_bad_image,
            "mtimes": mtimes}


OFF = ("off", "false", "no", "none", "")


def cache_paths(root: Path, cache: str | None) -> list[Path]:
    """Candidate cache files, most preferred first."""
    # YAML (and so OmegaConf's command-line parser) reads a bare `off` / `no` as false, which a str field stores
    # as "False": every spelling of "no cache" means no cache, never a folder named False.
    if cache is None or str(cache).strip().lower() in OFF:
        return []
    digest = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:16]
    if cache != "auto":
        return [Path(cache) / f"{digest}.json.gz"]
    user = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hpckd" / "index" / f"{digest}.json.gz"
    return [root.resolve().parent / f".hpckd-index-{root.resolve().name}.json.gz", user]


def load(root: Path, key: dict, cache: str | None) -> dict | None:
    """The fields of the cached :class:`~hpckd.data.index.FolderIndex` for ``key`` (its constructor's keyword
    arguments; the index module builds it, so this module stays below it), or None."""
    for path in cache_paths(root, cache):
        try:
            with gzip.open(path, "rt") as handle:
                data = json.load(handle)
        except (OSError, ValueError, EOFError):
            continue
        if data.get("key") != key:
            continue
        base = Path(key["root"])
        return dict(root=base, classes=list(data["classes"]), files=[str(base / f) for f in data["files"]],
                    labels=list(data["labels"]), skipped=list(data["skipped"]), stats=[tuple(s) for s in data["stats"]])
    return None


def stale_hint(file: str | os.PathLike, cache: str | None = "auto") -> str:
    """``"; <file> changed after ..."`` when ``file`` differs from what a cached index recorded for it (rewritten
    in place, which the cache cannot notice), else ``""``: appended to a decode error, it says how to re-check."""
    file = Path(file)
    root = file.parent.parent  # ImageFolder: root/<class>/<image>
    try:
        now = (int(file.stat().st_size), int(file.stat().st_mtime_ns))
        rel = os.path.relpath(file.resolve(), root.resolve())
    except (OSError, ValueError):
        return ""
    for path in cache_paths(root, cache):
        try:
            with gzip.open(path, "rt") as handle:
                data = json.load(handle)
            recorded = tuple(data["stats"][data["files"].index(rel)])
        except (OSError, ValueError, EOFError, KeyError, IndexError, TypeError):
            continue
        if recorded != now:
            return (f"; {file} changed after it was indexed (cached in {path}): re-index the data by deleting "
                    f"that file or setting data.index_cache=off")
    return ""


def store(index, key: dict, cache: str | None) -> Path | None:
    """Write ``index`` to the first writable cache location; returns it (None when caching is off or impossible)."""
    root = Path(key["root"])
    data = {"key": key, "classes": index.classes, "labels": index.labels, "skipped": index.skipped,
            "files": [os.path.relpath(f, root) for f in index.files], "stats": [list(s) for s in index.stats]}
    payload = gzip.compress(json.dumps(data).encode(), compresslevel=5)
    for path in cache_paths(root, cache):
        try:
            with atomic_open(path, "wb") as handle:  # gets the umask's permissions, like any file hpckd writes
                handle.write(payload)
            return path
        except OSError:
            continue
    return None
