#!/usr/bin/env bash
# Fill the git-ignored .whl/ with what the GPU device lacks, in pieces that each fit one device call (64 MiB with
# the repo). Runs HERE (the CPU development machine, with PyPI); the device then runs benchmarks/gpu/run.sh.
#
#   bash benchmarks/gpu/prepare.sh            # download/build what is missing, split, print the call plan
#   FORCE=1 bash benchmarks/gpu/prepare.sh    # rebuild everything
#   CLEAN=1 bash benchmarks/gpu/prepare.sh    # ... and drop the download cache .whl/build afterwards
#
# Result (all under .whl/, ignored through .git/info/exclude):
#   .whl/small/*.whl          pure-python + cp312 wheels for `pip install --target` on the device: omegaconf,
#                             submitit, deepspeed (built here, DS_BUILD_OPS=0: no compiled ops), pydantic(+core),
#                             annotated-types, typing-inspection, hjson; fallback/ typing-extensions (installed there
#                             only if the device's is too old); device-requirements.txt (what they need from the
#                             device's own packages, compared there by `wheelkit.py device-check`)
#   .whl/dali-1 .. dali-N     the DALI payload in parts, one folder per device call, each with MANIFEST.json
#                             (part sizes + sha256 of every part and of the whole); .whl/dali.sha256
#   .whl/build/               download cache (wheels), not carried
#
# The DALI payload: the DALI wheel (~190 MiB, more than one call can carry) plus the runtime pieces it loads
# (nvImageCodec, nvJPEG for CUDA 13, and its small Python deps), installed HERE with `pip install --target` for
# CPython 3.12 x86-64 (the device's python), with the extension modules of other Python versions removed, packed
# as one .tar.xz (~145 MiB instead of ~230 MiB of wheels) and cut so that call 1 carries .whl/small plus part 1 and
# every other call one part. On the device `run.sh install` joins the parts, checks the sha256 and unpacks the tree
# to /var/tmp/site-dali (no pip needed for it). Deliberately left out (--no-deps): nvidia-libnvcomp, nvjpeg2k and
# nvtiff (only for compressed-array readers, JPEG 2000 and TIFF; 35 MiB), see README.md.
set -euo pipefail

ROOT=$(git rev-parse --show-toplevel)
cd "$ROOT"
PY=${PY:-$ROOT/.venv/bin/python}
KIT=benchmarks/gpu/wheelkit.py
W=.whl
LIMIT=$((64 * 1024 * 1024))           # what one device call carries (repo + carried paths)
RESERVE=$(( ${RESERVE_MB:-4} * 1024 * 1024 ))  # head-room for the repo growing before the calls

# Versions: the project's tested pins (constraints.txt) and the versions this repo's .venv resolved with them.
SMALL=(omegaconf==2.4.0 submitit==1.5.4 hjson==3.1.0 pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0
       typing-inspection==0.4.5)
DEEPSPEED=deepspeed==0.19.8
FALLBACK=(typing-extensions==4.16.0)
DALI_VERSION=${DALI_VERSION:-2.4.0}
# DALI's own Python deps (versions resolved for DALI 2.4.0) and, per CUDA flavour, the native libraries it dlopens.
DALI_PY_DEPS=(astunparse==1.6.3 gast==0.7.0 makefun==1.16.0 libcst==1.9.0 nvtx==0.2.17 optree==0.20.0)
DALI_CU130=(nvidia-nvimgcodec-cu13==0.9.0.20 nvidia-nvjpeg==13.0.1.86)
DALI_CU120=(nvidia-nvimgcodec-cu12==0.9.0.20 nvidia-nvjpeg-cu12==12.4.0.76)
SKIP=(nvidia-libnvcomp-cu13 nvidia-libnvcomp-cu12 nvidia-nvjpeg2k-cu13 nvidia-nvjpeg2k-cu12 nvidia-nvtiff-cu13
      nvidia-nvtiff-cu12)

PLAT=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
TARGET=(--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none "${PLAT[@]}")

say() { printf '\n== %s\n' "$*"; }
mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }
bytes_of() { if [ -e "$1" ]; then du -sb "$1" | cut -f1; else echo 0; fi; }
pip_quiet() {  # pip without the noise of this machine's extra file:// indexes; keeps pip's exit status
  local log rc=0
  log=$(mktemp)
  "$PY" -m pip "$@" >"$log" 2>&1 || rc=$?
  grep -v -e "is ignored: it is neither a file nor a directory" "$log" || true
  rm -f "$log"
  return "$rc"
}
have_wheel() { ls "$1"/"$(echo "$2" | cut -d= -f1 | tr '-' '_' | tr 'A-Z' 'a-z')"-"$(echo "$2" | cut -d= -f3)"-*.whl >/dev/null 2>&1; }
download() {  # download DIR SPEC...: binary wheels for the device's python, one version each
  local dir=$1; shift
  mkdir -p "$dir"
  for spec in "$@"; do
    if [ -z "${FORCE:-}" ] && have_wheel "$dir" "$spec"; then continue; fi
    pip_quiet download -q --no-deps "${TARGET[@]}" -d "$dir" "$spec"
    have_wheel "$dir" "$spec" || { echo "ERROR: no cp312 manylinux x86_64 wheel for $spec"; return 1; }
  done
}

# ------------------------------------------------------------------------------------------------ 0. .whl ignored
mkdir -p "$W"
EXCLUDE=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$EXCLUDE")"
grep -qxF '/.whl/' "$EXCLUDE" 2>/dev/null || echo '/.whl/' >>"$EXCLUDE"
git check-ignore -q "$W/x.whl" || { echo "ERROR: $W is not ignored by git"; exit 1; }
[ -n "${FORCE:-}" ] && rm -rf "$W/small" "$W"/dali-* "$W/build/dali-site" "$W/build/payload"

# ------------------------------------------------------------------------------------------------ 1. small wheels
say "small wheels -> $W/small"
download "$W/small" "${SMALL[@]}"
# omegaconf 2.3 needs antlr4-python3-runtime 4.9.* (sdist only on PyPI); 2.4 vendors it. Build it when asked for.
ANTLR=$("$PY" - "$W"/small/omegaconf-*.whl <<'EOF'
import sys, zipfile
z = zipfile.ZipFile(sys.argv[1])
meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
for line in z.read(meta).decode().splitlines():
    if line.startswith("Requires-Dist:") and "antlr4" in line and "extra ==" not in line:
        print(line.split(":", 1)[1].split(";")[0].replace(" ", "").replace("(", "").replace(")", ""))
EOF
)
if [ -n "$ANTLR" ] && ! ls "$W"/small/antlr4_python3_runtime-*.whl >/dev/null 2>&1; then
  echo "omegaconf needs $ANTLR (sdist only): building a pure-python wheel"
  pip_quiet wheel -q --no-deps -w "$W/small" "$ANTLR"
fi
if [ -n "${FORCE:-}" ] || ! ls "$W"/small/deepspeed-*.whl >/dev/null 2>&1; then
  echo "building $DEEPSPEED (sdist only) without compiled ops (DS_BUILD_OPS=0; ops JIT-build on the device if used)"
  DS_BUILD_OPS=0 pip_quiet wheel -q --no-deps --no-build-isolation --no-cache-dir -w "$W/small" "$DEEPSPEED"
fi
DSW=$(ls "$W"/small/deepspeed-*.whl)
case "$DSW" in *-py3-none-any.whl) ;; *) echo "ERROR: $DSW is not a pure-python wheel"; exit 1;; esac
if "$PY" -c "import sys, zipfile; sys.exit(any(n.endswith(('.so', '.pyd')) for n in zipfile.ZipFile(sys.argv[1]).namelist()))" "$DSW"; then
  echo "$(basename "$DSW"): pure python, no compiled ops"
else
  echo "ERROR: $DSW contains compiled extensions"; exit 1
fi
download "$W/small/fallback" "${FALLBACK[@]}"

# ------------------------------------------------------------------------------------------------ 2. DALI payload
say "DALI $DALI_VERSION payload"
BUILD=$W/build
mkdir -p "$BUILD/wheels"
FLAVOUR=${DALI_FLAVOUR:-}
if [ -z "$FLAVOUR" ]; then
  if download "$BUILD/wheels" "nvidia-dali-cuda130==$DALI_VERSION" 2>/dev/null; then FLAVOUR=cuda130; else FLAVOUR=cuda120; fi
fi
if [ "$FLAVOUR" = cuda130 ]; then NATIVE=("${DALI_CU130[@]}"); else NATIVE=("${DALI_CU120[@]}"); fi
DALI_SPECS=("nvidia-dali-$FLAVOUR==$DALI_VERSION" "${NATIVE[@]}" "${DALI_PY_DEPS[@]}")
download "$BUILD/wheels" "${DALI_SPECS[@]}"
DALI_WHEELS=()
for spec in "${DALI_SPECS[@]}"; do
  DALI_WHEELS+=("$(ls "$BUILD"/wheels/"$(echo "$spec" | cut -d= -f1 | tr '-' '_')"-"$(echo "$spec" | cut -d= -f3)"-*.whl)")
done
for f in "${DALI_WHEELS[@]}"; do echo "  $(basename "$f")  $(mib "$(bytes_of "$f")")"; done

say "requirements of everything carried (CPython 3.12, x86-64 Linux)"
SMALL_WHEELS=("$W"/small/*.whl)
"$PY" "$KIT" check "${SMALL_WHEELS[@]}" "${DALI_WHEELS[@]}" --skip "${SKIP[@]}" \
  --device-reqs "$W/small/device-requirements.txt"

STAMP="recipe-3 $FLAVOUR $(for f in "${DALI_WHEELS[@]}"; do basename "$f"; done | sort | tr '\n' ' ')"
if [ -z "${FORCE:-}" ] && [ -f "$W/dali-1/MANIFEST.json" ] && [ "$(cat "$BUILD/payload.stamp" 2>/dev/null)" = "$STAMP" ]; then
  echo "payload up to date (FORCE=1 to rebuild)"
  RESPLIT=0
else
  RESPLIT=1
  echo "installing for the device's python into $BUILD/dali-site (pip --target, cp312)"
  rm -rf "$BUILD/dali-site"
  pip_quiet install -q --no-deps --no-compile --no-index "${TARGET[@]}" --target "$BUILD/dali-site" "${DALI_WHEELS[@]}"
  before=$(bytes_of "$BUILD/dali-site")
  # Extension modules built for other CPython versions are dead weight on the 3.12 device.
  find "$BUILD/dali-site" -regextype posix-extended -regex '.*\.cpython-3[0-9]+t?-x86_64-linux-gnu\.so' \
       ! -name '*.cpython-312-x86_64-linux-gnu.so' -delete
  rm -rf "$BUILD/dali-site/bin"
  # nvImageCodec's JPEG 2000 and TIFF GPU extensions need the libraries left out above; without them they only print
  # load errors at every start.
  rm -f "$BUILD"/dali-site/nvidia/nvimgcodec/extensions/lib{nvjpeg2k,nvtiff}_ext.so*
  # nvImageCodec ships a regular nvidia/__init__.py: first on PYTHONPATH it would hide the device's own nvidia.*
  # packages (cu13, cudnn, nccl ... of torch), later on the path it would be hidden by theirs. A pkgutil-style
  # __init__ spans every nvidia/ folder on sys.path, in path order.
  printf '%s\n' '"""nvidia namespace spanning every sys.path entry (hpckd GPU kit: DALI carried next to the device'"'"'s packages)."""' \
    '__path__ = __import__("pkgutil").extend_path(__path__, __name__)' >"$BUILD/dali-site/nvidia/__init__.py"
  test -f "$BUILD"/dali-site/nvidia/dali/backend_impl.cpython-312-x86_64-linux-gnu.so
  echo "  unpacked $(mib "$before"), $(mib "$(bytes_of "$BUILD/dali-site")") without other Pythons' modules"
  echo "packing (xz -6, a few minutes on 2 cores)"
  mkdir -p "$BUILD/payload"
  tar -C "$BUILD/dali-site" --owner=0 --group=0 --numeric-owner -cf - . | xz -T0 -6 >"$BUILD/payload/dali-site.tar.xz"
  rm -rf "$BUILD/dali-site"
fi

# ------------------------------------------------------------------------------------------------ 3. budget, split
say "budget per device call"
REPO=$("$PY" - <<'EOF'
import os, subprocess
out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], capture_output=True, check=True).stdout
print(sum(os.path.getsize(p) for p in out.decode().split("\0") if p and os.path.isfile(p)))
EOF
)
SMALL_BYTES=$(bytes_of "$W/small")
if [ "$RESPLIT" = 1 ]; then
  PAYLOAD=$BUILD/payload/dali-site.tar.xz
  PAYLOAD_BYTES=$(bytes_of "$PAYLOAD")
  BUDGET=$((LIMIT - REPO - RESERVE))
  TOTAL=$((PAYLOAD_BYTES + SMALL_BYTES))
  CALLS=$(( (TOTAL + BUDGET - 1) / BUDGET ))
  PER=$(( (TOTAL + CALLS - 1) / CALLS ))
  FIRST=$((PER - SMALL_BYTES))
  rm -rf "$W"/dali-[0-9]*
  "$PY" "$KIT" split "$PAYLOAD" --out "$W" --first-max "$FIRST" --max "$PER" \
    --contents "$FLAVOUR" "${DALI_WHEELS[@]##*/}"
  rm -f "$PAYLOAD"
  echo "$STAMP" >"$BUILD/payload.stamp"
fi
[ -n "${CLEAN:-}" ] && rm -rf "$BUILD"

# ------------------------------------------------------------------------------------------------ 4. report, plan
say "sizes"
echo "repo (tracked + untracked-not-ignored, what every call sends): $REPO bytes ($(mib "$REPO"))"
echo "$W/small: $(mib "$SMALL_BYTES")"
for f in "$W"/small/*.whl "$W"/small/fallback/*.whl; do printf '  %-72s %9d\n' "${f#"$W"/small/}" "$(bytes_of "$f")"; done
NPARTS=$(ls -d "$W"/dali-[0-9]* | wc -l)
echo "DALI payload ($FLAVOUR, $(cut -c1-16 "$W/dali.sha256")...): $NPARTS parts"
for k in $(seq 1 "$NPARTS"); do printf '  %-24s %s\n' "$W/dali-$k" "$(mib "$(bytes_of "$W/dali-$k")")"; done
[ -d "$BUILD" ] && echo "$BUILD (cache, never carried): $(mib "$(bytes_of "$BUILD")")"

say "device call plan ($NPARTS data-carrying calls; see benchmarks/gpu/README.md for the exact command strings)"
ok=1
for k in $(seq 1 "$NPARTS"); do
  carry=("$W/dali-$k"); [ "$k" = 1 ] && carry=("$W/small" "$W/dali-1")
  size=$REPO; for c in "${carry[@]}"; do size=$((size + $(bytes_of "$c"))); done
  case "$k" in
    1) work="stash 1, install small, checks core (env, dist, serving, DDP training variants); bench data in the background";;
    "$NPARTS") work="stash $k, install (DALI), checks dali, hpckd bench loaders/kd-step/end-to-end (full)";;
    *) work="stash $k, checks deepspeed, bench train";;
  esac
  verdict="fits"; [ "$size" -gt "$LIMIT" ] && { verdict="TOO BIG"; ok=0; }
  printf 'call %d: carry %-32s %s of 64 MiB (%s): %s\n' "$k" "$(IFS=,; echo "${carry[*]}")" "$(mib "$size")" "$verdict" "$work"
done
echo "call $((NPARTS + 1)) (no carry, machine still warm): hpckd bench teachers/overhead/scaling (full)"
echo "call $((NPARTS + 2)) (optional, no carry, only while the machine is still warm): re-run what failed"
[ "$ok" = 1 ] || { echo "ERROR: a call is over the limit (RESERVE_MB=$((RESERVE / 1048576))); the repo grew?"; exit 1; }
