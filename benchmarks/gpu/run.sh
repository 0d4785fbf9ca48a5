#!/usr/bin/env bash
# The GPU kit's device side: runs ON THE DEVICE (the lent H100/H200, python3 = /opt/torch/.venv, root), from the repo
# root, after `bash benchmarks/gpu/prepare.sh` filled .whl/ HERE. Writes what it measures under $OUT.
#
# THE PLAN (exact `run` tool calls; issue them back to back, read the results after the last one: the machine stays
# warm only ~30 s between calls, and what calls 1-2 stash in /var/tmp is lost when it goes back):
#
#   call 1  command: bash benchmarks/gpu/run.sh call 1        carry: [".whl/small", ".whl/dali-1"]   timeout_s: 600
#           probe, stash part 1, install the small wheels, checks group core (env, dist, precision, serving, DDP
#           training variants, distillation); the loader-benchmark JPEGs are generated in the background
#   call 2  command: bash benchmarks/gpu/run.sh call 2        carry: [".whl/dali-2"]                 timeout_s: 600
#           stash part 2, checks group deepspeed (ZeRO 0/1/2, bf16/fp16/fp32, vs DDP), bench train
#   call 3  command: bash benchmarks/gpu/run.sh call 3        carry: [".whl/dali-3"]                 timeout_s: 600
#           stash part 3, install DALI (join + sha256 + unpack), checks group dali, `hpckd bench --size full` suites
#           loaders, kd-step, end-to-end (each in its own folder, limits 120/150/120 s)
#   call 4  command: bash benchmarks/gpu/run.sh call 4        carry: []                              timeout_s: 600
#           (machine still warm) `hpckd bench --size full` suites teachers, overhead, scaling (limits 240/60/60 s)
#   call 5  (optional, machine still warm, no carry): e.g. bash benchmarks/gpu/run.sh checks --only NAME,...
#
# (prepare.sh prints the number of parts P. Call K carries .whl/dali-K; call 2 does the DeepSpeed work whenever
# P > 2, further middle calls only stash, and call P, the last, does the DALI work: `call` reads P from MANIFEST.json.)
# Device time: 1-2 min to start, then about 6 + 6 + 8 + 3 min (23-25 min in all). Worst case, every budget used up
# (checks 400/200/120 s, bench train 240 s, bench suites 390 + 360 s, each overrun at most 30 s): about 32 min,
# more than the 30 min a session gets: call 4 is the one to drop when less is left.
#
# Subcommands (all from the repo root; environment overrides for testing elsewhere: HPCKD_STASH, HPCKD_SITE,
# HPCKD_SITE_DALI, HPCKD_WORK, OUT, PYTHON, CHECKS_DEVICE=cpu, CHECKS_BUDGET, BENCH_TRAIN_TIMEOUT, BENCH_SUITE_TIMEOUT, BENCH_SIZE, BENCH_DEVICE):
#   probe                     GPU, driver, python, torch, CUDA libraries DALI may dlopen (nvjpeg, npp) -> $OUT/probe.txt
#   stash K                   copy .whl/dali-K/* to $HPCKD_STASH (/var/tmp/hpckd-dali), verify, list what is there
#   install [small|dali|all]  small: pip install --target $HPCKD_SITE (/var/tmp/site) .whl/small/*.whl (+ the
#                             typing-extensions fallback if the device's is too old); dali: join the parts, check the
#                             sha256, unpack into $HPCKD_SITE_DALI (/var/tmp/site-dali); then print versions
#   versions                  import nvidia.dali, omegaconf, submitit, deepspeed, pydantic and print their versions
#   checks [ARGS]             benchmarks/gpu/checks.py --device cuda ARGS -> $OUT/gpu_checks.json
#   data                      generate the bench suites' JPEGs (2,048 x 375x500) into $HPCKD_WORK/bench/work/data
#   bench [train|gpu-only|dali|all|SUITE...]  train: benchmarks/train.py (backends); gpu-only: `hpckd bench teachers`,
#                             `overhead`, `scaling`; dali: `hpckd bench loaders`, `kd-step`, `end-to-end`; SUITE...: those
#                             suites; each suite `--size full` (BENCH_SIZE) -> $OUT/bench_SUITE.json + .md
#   call N                    step N of the plan above
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT" || exit 2
PYTHON=${PYTHON:-python3}
STASH=${HPCKD_STASH:-/var/tmp/hpckd-dali}
SITE=${HPCKD_SITE:-/var/tmp/site}
SITE_DALI=${HPCKD_SITE_DALI:-/var/tmp/site-dali}
WORK=${HPCKD_WORK:-/var/tmp/hpckd-work}
OUT=${OUT:-$WORK/out}
KIT=benchmarks/gpu/wheelkit.py
mkdir -p "$OUT" "$WORK"
export PYTHONPATH="$SITE_DALI:$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$WORK/inductor-cache}

log() { printf '\n[run.sh %s] %s\n' "$(date +%H:%M:%S)" "$*"; }

probe() {
  {
    echo "host: $(hostname) $(uname -r) $(nproc) cores, $(free -g 2>/dev/null | awk '/Mem:/ {print $2 " GiB"}') memory"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>&1 || echo "nvidia-smi failed"
    "$PYTHON" - <<'EOF'
import platform, sys
print("python", platform.python_version(), sys.executable)
try:
    import torch
    nccl = torch.cuda.nccl.version() if torch.cuda.is_available() else "-"
    print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(),
          "cudnn", torch.backends.cudnn.version(), "nccl", ".".join(map(str, nccl)) if isinstance(nccl, tuple) else nccl)
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        print("gpu", p.name, f"{p.total_memory / 2**30:.0f} GiB", f"sm_{p.major}{p.minor}", "bf16", torch.cuda.is_bf16_supported())
except Exception as exc:
    print("torch: import failed:", exc)
from importlib.metadata import PackageNotFoundError, version
for name in ("torchvision", "numpy", "typing-extensions", "packaging", "pyyaml", "six", "cloudpickle", "nvidia-ml-py", "cuda-toolkit"):
    try:
        print(f"  {name} {version(name)}")
    except PackageNotFoundError:
        print(f"  {name} not installed")
EOF
    echo "CUDA libraries DALI may dlopen (its runpath: nvidia/cu13/lib next to it, then /usr/local/cuda/lib64):"
    site=$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' 2>/dev/null)
    for dir in /usr/local/cuda/lib64 "$site/nvidia/cu13/lib" "$SITE_DALI/nvidia/cu13/lib"; do
      [ -d "$dir" ] && echo "  $dir: $(cd "$dir" && shopt -s nullglob && echo libnvjpeg.so* libnpp*.so* libcufft.so*)"
    done
    echo "  nvidia/__init__.py in the device's site-packages: $([ -f "$site/nvidia/__init__.py" ] && echo yes || echo no)"
    df -h /var/tmp | tail -1
  } 2>&1 | tee "$OUT/probe.txt"
}

stash() {
  local k=$1
  [ -d ".whl/dali-$k" ] || { echo "stash: .whl/dali-$k is not here: name it in the call's carry list"; return 2; }
  "$PYTHON" "$KIT" stash ".whl/dali-$k" --stash "$STASH"
}

install_small() {
  if [ ! -d .whl/small ]; then
    if [ -f "$SITE/.hpckd-small" ]; then echo "small wheels: already installed in $SITE"; return 0; fi
    echo "install small: .whl/small is not here and $SITE is empty: carry .whl/small (call 1)"; return 2
  fi
  rm -rf "$SITE"
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .whl/small/*.whl || return 3
  # pydantic 2.14 needs typing-extensions >= 4.16: install the carried one only when the device's is older.
  "$PYTHON" "$KIT" device-check .whl/small/device-requirements.txt --fail-on typing-extensions
  if [ $? = 10 ]; then
    echo "installing the fallback typing-extensions into $SITE"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" --upgrade \
      .whl/small/fallback/*.whl || return 3
  fi
  for f in .whl/small/*.whl; do basename "$f"; done >"$SITE/.hpckd-small"
  echo "small wheels installed in $SITE: $(tr '\n' ' ' <"$SITE/.hpckd-small")"
}

install_dali() {
  "$PYTHON" "$KIT" join --stash "$STASH" --dest "$SITE_DALI"
}

versions() {  # versions [MODULE...]: import each (default: all the carried ones); status 1 if one fails
  "$PYTHON" - "$@" <<'EOF'
import importlib, os, sys, time
import torch  # first, as in hpckd: torch loads its CUDA libraries before DALI does
failed = 0
for name in sys.argv[1:] or ("omegaconf", "submitit", "pydantic", "deepspeed", "nvidia.dali"):
    t0 = time.time()
    try:
        module = importlib.import_module(name)
        where = os.path.dirname(module.__file__)
        print(f"  {name:12s} {getattr(module, '__version__', '?'):10s} {where}  ({time.time() - t0:.1f} s)")
    except Exception as exc:
        failed += 1
        print(f"  {name:12s} IMPORT FAILED: {type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}")
sys.exit(1 if failed else 0)
EOF
}

install() {
  local what=${1:-all} rc=0
  case "$what" in
    small) install_small || rc=$?; versions omegaconf submitit pydantic deepspeed || rc=$? ;;
    dali) install_dali || rc=$?; versions nvidia.dali || rc=$? ;;
    all) install_small || rc=$?; install_dali || rc=$?; versions || rc=$? ;;
    *) echo "install: small | dali | all"; return 2 ;;
  esac
  return "$rc"
}

checks() {
  "$PYTHON" benchmarks/gpu/checks.py --device "${CHECKS_DEVICE:-cuda}" --work "$WORK/checks" --out "$OUT/gpu_checks.json" "$@"
}

data() {  # idempotent: the ImageNet-like JPEGs every full-size bench suite reads (2,048 x 375x500, 16 classes)
  "$PYTHON" - "$WORK/bench" <<'EOF'
import sys, time
from pathlib import Path
import torch
from hpckd.bench.common import FULL_DATA, Context, dataset
t0 = time.time()
root = dataset(Context("full", torch.device("cpu"), Path(sys.argv[1]), Path(sys.argv[1]) / "work"), **FULL_DATA)
print(f"bench data: {root} ready in {time.time() - t0:.0f} s")
EOF
}

bench_suite() {  # one `hpckd bench` suite at size full into its own folder (a timeout loses that suite only)
  local suite=$1 limit=$2
  log "hpckd bench $suite --size ${BENCH_SIZE:-full} --device ${BENCH_DEVICE:-cuda} (limit $limit s)"
  timeout -k 10 "$limit" "$PYTHON" -m hpckd bench "$suite" --size "${BENCH_SIZE:-full}" --device "${BENCH_DEVICE:-cuda}" \
    --out "$WORK/bench/$suite" --work "$WORK/bench/work" || return $?
  cp "$WORK/bench/$suite/bench.json" "$OUT/bench_$suite.json"
  cp "$WORK/bench/$suite/bench.md" "$OUT/bench_$suite.md"
}

bench() {  # bench [train|gpu-only|dali|all|SUITE...]: gpu-only needs no DALI, dali runs the suites that use it
  local what=${1:-all} rc=0
  if [ "$what" = train ] || [ "$what" = all ]; then
    log "bench train: ResNet-18/50 at 224 px, batch 128, DDP vs DeepSpeed ZeRO-1, fp32/bf16/channels-last"
    timeout -k 10 "${BENCH_TRAIN_TIMEOUT:-240}" "$PYTHON" benchmarks/train.py --arch resnet18,resnet50 --image-size 224 \
      --batch-size 128 --steps 25 --repeats 3 --warmup 8 --zero-stage 1 --device "${BENCH_DEVICE:-cuda}" \
      --json "$OUT/bench_train.json" || rc=$?
  fi
  if [ "$what" = gpu-only ] || [ "$what" = all ]; then
    bench_suite teachers "${BENCH_SUITE_TIMEOUT:-240}" || rc=$?  # inductor compiles ResNet-50 in its warm-up
    bench_suite overhead "${BENCH_SUITE_TIMEOUT:-60}" || rc=$?
    bench_suite scaling "${BENCH_SUITE_TIMEOUT:-60}" || rc=$?
  fi
  if [ "$what" = dali ] || [ "$what" = all ]; then
    bench_suite loaders "${BENCH_SUITE_TIMEOUT:-120}" || rc=$?
    bench_suite kd-step "${BENCH_SUITE_TIMEOUT:-150}" || rc=$?
    bench_suite end-to-end "${BENCH_SUITE_TIMEOUT:-120}" || rc=$?
  fi
  case "$what" in
    train|gpu-only|dali|all) ;;
    *) for suite in "$@"; do bench_suite "$suite" "${BENCH_SUITE_TIMEOUT:-150}" || rc=$?; done ;;
  esac
  return "$rc"
}

last_part() {  # number of parts of the payload, from any carried or stashed manifest
  "$PYTHON" - "$STASH" .whl/dali-* <<'EOF'
import json, sys
from pathlib import Path
for folder in sys.argv[1:]:
    path = Path(folder) / "MANIFEST.json"
    if path.is_file():
        print(len(json.loads(path.read_text())["parts"]))
        break
else:
    print(0)
EOF
}

call() {
  local n=$1 parts rc=0
  parts=$(last_part)
  log "plan call $n (payload in $parts parts)"
  case "$n" in
    1)
      probe
      stash 1 || rc=$?
      install small || rc=$?
      log "bench data in the background (CPU only)"
      nice -n 10 bash "$ROOT/benchmarks/gpu/run.sh" data >"$OUT/data.log" 2>&1 &
      local data_pid=$!
      checks --groups core --budget-s "${CHECKS_BUDGET:-400}" || rc=$?
      wait "$data_pid"; cat "$OUT/data.log"
      ;;
    *)
      if [ ! -f "$SITE/.hpckd-small" ]; then
        echo "call $n: $SITE is empty: this is a fresh machine (the one of call 1 was given back in between)."
        echo "The plan must start again from call 1 (run the calls back to back); nothing done."
        return 2
      fi
      if [ "$n" -gt "$parts" ]; then  # after the last part: the bench suites that need no DALI
        bench gpu-only || rc=$?
        log "plan call $n done (status $rc); files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
        return "$rc"
      fi
      stash "$n" || rc=$?
      if [ "$n" -lt "$parts" ]; then
        if [ "$n" = 2 ]; then
          checks --groups deepspeed --budget-s "${CHECKS_BUDGET:-200}" || rc=$?
          bench train || rc=$?
        fi
      else
        data
        if install dali; then
          checks --groups dali --budget-s "${CHECKS_BUDGET:-120}" || rc=$?
          bench dali || rc=$?
        else
          rc=1
          echo "DALI is not usable: the DALI checks are skipped; the bench suites run with the torch loaders only"
          bench dali || rc=$?
        fi
        [ "$parts" -lt 3 ] && echo "(payload in $parts parts: run 'run.sh checks --groups deepspeed' and 'run.sh bench train' in one more call)"
      fi
      ;;
  esac
  log "plan call $n done (status $rc); files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
  return "$rc"
}

cmd=${1:-}
shift || true
case "$cmd" in
  probe|data) "$cmd" ;;
  versions) versions "$@" ;;
  stash) stash "${1:?stash K}" ;;
  install) install "${1:-all}" ;;
  checks) checks "$@" ;;
  bench) bench "${1:-all}" ;;
  call) call "${1:?call N}" 2>&1 | tee "$OUT/call-$1.log"; exit "${PIPESTATUS[0]}" ;;
  *) sed -n '2,40p' "$0"; exit 2 ;;
esac
