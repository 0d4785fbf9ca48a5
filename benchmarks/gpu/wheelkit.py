"""Helpers of the GPU kit (``prepare.sh`` here, ``run.sh`` on the device): requirement checks, payload split/join.

Subcommands (``python benchmarks/gpu/wheelkit.py CMD ...``):

* ``check WHEEL... [--skip NAME...] [--device-reqs FILE]`` (here, needs ``packaging``): every ``Requires-Dist``
  of the carried wheels, evaluated for CPython 3.12 on x86-64 Linux, must be carried too (at a matching version),
  be on the device already (:data:`DEVICE_PACKAGES`) or be skipped on purpose. Writes the requirements that fall
  on device packages to ``--device-reqs`` so that ``device-check`` can compare them with the versions there.
* ``split PAYLOAD --out .whl --first-max BYTES --max BYTES`` (here): cut ``PAYLOAD`` into parts
  ``.whl/dali-K/part-XX`` (one folder per device call) and write the same ``MANIFEST.json`` (sizes, sha256 of each
  part and of the whole) into every folder.
* ``stash SRC --stash DIR`` (device): copy one part folder into ``DIR`` and verify its parts; print what ``DIR``
  holds and what is still missing.
* ``join --stash DIR --dest DIR`` (device): all parts present? concatenate, check the sha256, extract the tar
  (``.tar.xz``) into ``--dest``.
* ``device-check FILE [--fail-on NAME...]`` (device): installed versions against the requirements written by
  ``check``; exit status 10 when a ``--fail-on`` package falls short (``run.sh`` then installs its fallback wheel).

Only the standard library is used by ``stash``, ``join`` and ``device-check`` (``packaging`` if present), so they
run with the device's bare ``python3``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

# Python distributions on the device image ('cuda' image of the lent H100/H200 machines, read 2026-11-17; see the
# device tool's KINDS.md). Names only: versions there are unknown here, `device-check` compares them there.
DEVICE_PACKAGES = set("""
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy
peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six
sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile
tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm
transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel
wrapt xarray xxhash yarl zipp
""".split())

# The interpreter of the device (python3 there is CPython 3.12.3 on x86-64 Linux).
DEVICE_ENV = {
    "implementation_name": "cpython", "implementation_version": "3.12.3", "os_name": "posix",
    "platform_machine": "x86_64", "platform_python_implementation": "CPython", "platform_release": "",
    "platform_system": "Linux", "platform_version": "", "python_full_version": "3.12.3", "python_version": "3.12",
    "sys_platform": "linux",
}

MANIFEST = "MANIFEST.json"


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def sha256_of(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------------ here: check


def wheel_metadata(path: Path) -> tuple[str, str, list[str]]:
    """(name, version, Requires-Dist lines) of a wheel, from its METADATA."""
    with zipfile.ZipFile(path) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1)
        text = zf.read(meta).decode("utf-8", "replace")
    headers = text.split("\n\n", 1)[0].splitlines()
    get = lambda key: [line.split(":", 1)[1].strip() for line in headers if line.startswith(key + ":")]  # noqa: E731
    return get("Name")[0], get("Version")[0], get("Requires-Dist")


def check(args: argparse.Namespace) -> int:
    from packaging.requirements import Requirement
    from packaging.version import Version

    carried: dict[str, tuple[str, Path]] = {}
    requires: list[tuple[str, str, Requirement]] = []
    for path in map(Path, args.wheels):
        name, version, reqs = wheel_metadata(path)
        key = canonical(name)
        if key in carried:
            print(f"ERROR: two versions of {name}: {carried[key][1].name} and {path.name}")
            return 1
        carried[key] = (version, path)
        requires += [(name, version, Requirement(r)) for r in reqs]
    skip = {canonical(s) for s in args.skip}
    problems, device_reqs, rows = [], [], []
    for owner, _, req in requires:
        extras = [""]
        # An extra asked for by a requirement of ours (e.g. nvimgcodec[all]) pulls the extra's requirements.
        extras += wanted_extras(requires, owner)
        if req.marker is not None and not any(req.marker.evaluate({**DEVICE_ENV, "extra": e}) for e in extras):
            continue
        key = canonical(req.name)
        if key in carried:
            version = carried[key][0]
            ok = req.specifier.contains(Version(version), prereleases=True)
            rows.append((owner, str(req), f"carried {version}" + ("" if ok else "  <-- VERSION MISMATCH")))
            if not ok:
                problems.append(f"{owner} needs {req} but {req.name} {version} is carried")
        elif key in DEVICE_PACKAGES:
            rows.append((owner, str(req), "on the device"))
            device_reqs.append(f"{req.name}{req.specifier}")
        elif key in skip:
            rows.append((owner, str(req), "skipped on purpose"))
        else:
            rows.append((owner, str(req), "MISSING"))
            problems.append(f"{owner} needs {req}: neither carried nor on the device")
    width = max((len(r[0]) + len(r[1]) for r in rows), default=20) + 4
    for owner, req, where in rows:
        print(f"  {owner}: {req}".ljust(width + 2) + where)
    if args.device_reqs:
        lines = sorted(set(device_reqs))
        Path(args.device_reqs).write_text("\n".join(lines) + "\n")
    for problem in problems:
        print(f"ERROR: {problem}")
    return 1 if problems else 0


def wanted_extras(requires, owner: str) -> list[str]:
    """Extras of ``owner`` that another carried wheel asks for (``name[extra]`` requirements)."""
    return sorted({e for _, _, r in requires if canonical(r.name) == canonical(owner) for e in r.extras})


# ------------------------------------------------------------------------------------------------ here: split


def split(args: argparse.Namespace) -> int:
    payload, out = Path(args.payload), Path(args.out)
    size = payload.stat().st_size
    sizes, left = [], size
    while left > 0:
        cap = args.first_max if not sizes else args.max
        sizes.append(min(cap, left))
        left -= sizes[-1]
    parts = []
    with open(payload, "rb") as src:
        for k, n in enumerate(sizes, start=1):
            folder = out / f"dali-{k}"
            if folder.exists():
                shutil.rmtree(folder)
            folder.mkdir(parents=True)
            name = "part-" + "abcdefghijklmnopqrstuvwxyz"[(k - 1) // 26] + "abcdefghijklmnopqrstuvwxyz"[(k - 1) % 26]
            digest = hashlib.sha256()
            with open(folder / name, "wb") as dst:
                left = n
                while left:
                    block = src.read(min(left, 1 << 20))
                    digest.update(block)
                    dst.write(block)
                    left -= len(block)
            parts.append({"name": name, "folder": folder.name, "size": n, "sha256": digest.hexdigest()})
    manifest = {"payload": payload.name, "size": size, "sha256": sha256_of([payload]), "parts": parts,
                "contents": args.contents or []}
    for part in parts:
        (out / part["folder"] / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    (out / "dali.sha256").write_text(f"{manifest['sha256']}  {payload.name}\n")
    print(f"split {payload.name} ({size} bytes, sha256 {manifest['sha256'][:16]}...) into {len(parts)} parts: "
          + ", ".join(f"{p['folder']}/{p['name']} {p['size'] / 2**20:.1f} MiB" for p in parts))
    return 0


# ------------------------------------------------------------------------------------------------ device side


def load_manifest(folder: Path) -> dict | None:
    path = folder / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def status(stash: Path) -> tuple[dict | None, list[dict], list[str]]:
    """(manifest, parts present and verified, problems) of the stash folder."""
    manifest = load_manifest(stash)
    if manifest is None:
        return None, [], [f"{stash}: no {MANIFEST} (nothing stashed yet)"]
    good, problems = [], []
    for part in manifest["parts"]:
        path = stash / part["name"]
        if not path.is_file():
            problems.append(f"missing {part['name']} (from .whl/{part['folder']})")
        elif path.stat().st_size != part["size"]:
            problems.append(f"{part['name']}: {path.stat().st_size} bytes, expected {part['size']}")
        elif Path(str(path) + ".ok").is_file() or sha256_of([path]) == part["sha256"]:
            Path(str(path) + ".ok").touch()
            good.append(part)
        else:
            problems.append(f"{part['name']}: sha256 mismatch")
    return manifest, good, problems


def stash(args: argparse.Namespace) -> int:
    src, dst = Path(args.src), Path(args.stash)
    dst.mkdir(parents=True, exist_ok=True)
    incoming = load_manifest(src)
    if incoming is None:
        print(f"stash: {src} has no {MANIFEST}; was it named in the call's carry list?")
        return 2
    held = load_manifest(dst)
    if held is not None and held["sha256"] != incoming["sha256"]:
        print(f"stash: {dst} holds parts of another payload ({held['sha256'][:12]}); clearing it")
        shutil.rmtree(dst)
        dst.mkdir(parents=True)
    for item in src.iterdir():
        shutil.copy2(item, dst / item.name)
        Path(str(dst / item.name) + ".ok").unlink(missing_ok=True)
    manifest, good, problems = status(dst)
    print(f"stash {dst}: {len(good)}/{len(manifest['parts'])} parts verified "
          f"({sum(p['size'] for p in good) / 2**20:.1f} of {manifest['size'] / 2**20:.1f} MiB)")
    for line in problems:
        print(f"  still needed: {line}")
    for item in sorted(dst.iterdir()):
        if not item.name.endswith(".ok"):
            print(f"  {item.name:16s} {item.stat().st_size:>12d}")
    return 0


def join(args: argparse.Namespace) -> int:
    stash_dir, dest = Path(args.stash), Path(args.dest)
    manifest, good, problems = status(stash_dir)
    if manifest is None or problems:
        print("join: cannot reassemble the payload:")
        for line in problems:
            print(f"  {line}")
        print("  (each call of the plan stashes its part in the stash folder, which survives only while the machine "
              "stays warm: if the machine was given back in between, start the plan again from call 1)")
        return 2
    parts = [stash_dir / p["name"] for p in manifest["parts"]]
    whole = sha256_of(parts)
    if whole != manifest["sha256"]:
        print(f"join: sha256 of the joined parts is {whole}, the manifest says {manifest['sha256']}")
        return 3
    print(f"join: {len(parts)} parts, {manifest['size']} bytes, sha256 ok ({whole[:16]}...)")
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    if shutil.which("xz") and shutil.which("tar"):
        cmd = f"cat {' '.join(map(str, parts))} | xz -dc -T0 | tar -x -C {dest}"
        rc = subprocess.call(["bash", "-o", "pipefail", "-c", cmd])
        if rc != 0:
            print(f"join: extraction failed ({cmd})")
            return 4
    else:  # python's lzma: slower, always there
        import io

        class Joined(io.RawIOBase):
            def __init__(self, files):
                self.files, self.current = [open(f, "rb") for f in files], 0

            def readable(self):
                return True

            def readinto(self, buf):
                while self.current < len(self.files):
                    n = self.files[self.current].readinto(buf)
                    if n:
                        return n
                    self.current += 1
                return 0

        with tarfile.open(fileobj=io.BufferedReader(Joined(parts), 1 << 20), mode="r|xz") as tar:
            tar.extractall(dest, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    (dest / ".hpckd-payload").write_text(json.dumps({"sha256": whole, "contents": manifest.get("contents", [])}) + "\n")
    names = sorted(p.name for p in dest.iterdir() if not p.name.startswith("."))
    print(f"join: extracted into {dest}: " + ", ".join(names))
    return 0


def device_check(args: argparse.Namespace) -> int:
    """Installed versions of device packages against what the carried wheels require; prints mismatches."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        from packaging.requirements import Requirement
    except ImportError:
        print("device-check: no 'packaging' here; skipped")
        return 0
    bad, fatal = 0, False
    for line in Path(args.file).read_text().splitlines():
        if not line.strip():
            continue
        req = Requirement(line)
        try:
            have = version(req.name)
        except PackageNotFoundError:
            print(f"  MISSING on this machine: {req}")
            bad += 1
            continue
        if not req.specifier.contains(have, prereleases=True):
            print(f"  {req.name} {have} does not satisfy {req}")
            bad += 1
            fatal = fatal or canonical(req.name) in {canonical(n) for n in args.fail_on}
    print(f"device-check: {bad} requirement(s) not met by this machine's packages" if bad
          else "device-check: every requirement on this machine's packages is met")
    return 10 if fatal else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("check")
    s.add_argument("wheels", nargs="+")
    s.add_argument("--skip", nargs="*", default=[])
    s.add_argument("--device-reqs", default="")
    s.set_defaults(func=check)
    s = sub.add_parser("split")
    s.add_argument("payload")
    s.add_argument("--out", required=True)
    s.add_argument("--first-max", type=int, required=True)
    s.add_argument("--max", type=int, required=True)
    s.add_argument("--contents", nargs="*")
    s.set_defaults(func=split)
    s = sub.add_parser("stash")
    s.add_argument("src")
    s.add_argument("--stash", required=True)
    s.set_defaults(func=stash)
    s = sub.add_parser("join")
    s.add_argument("--stash", required=True)
    s.add_argument("--dest", required=True)
    s.set_defaults(func=join)
    s = sub.add_parser("device-check")
    s.add_argument("file")
    s.add_argument("--fail-on", nargs="*", default=[])
    s.set_defaults(func=device_check)
    args = p.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
