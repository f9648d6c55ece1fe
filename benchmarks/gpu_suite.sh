#!/usr/bin/env bash
# Issue 12's GPU figures in one run: at most about 9 minutes on one NVIDIA H100/H200, JSON under one directory.
#
#   bash benchmarks/gpu_suite.sh [--quick] [--out DIR] [--budget SECONDS] [--python PY]
#
# --quick   tiny shapes and budgets, to check the script on CPU (every step's cap tripled; 25 minutes on 2 cores at
#           load 10-16 with --budget 1500, the last study cut); the same steps, the same output layout.
# --out     where the results go (default /tmp/peel_gpu_suite_out): DIR/gpu_suite.tar.gz (every JSON/CSV),
#           DIR/gpu_suite_all.tar.gz (the same and the studies' figures), DIR/suite.log and DIR/summary.json: four
#           files (the device tool returns at most 8, 16 MiB each), re-packed after every step, so a run cut short
#           still returns what it measured.
# --budget  seconds for the whole suite, setup included (default 510: 8.5 minutes, under the 600 s of one call).
#           Steps run in order of importance; a step starts only if its minimum fits in what is left and is
#           killed at its cap or at the deadline, whichever comes first. Skipped steps say so in summary.json.
# --python  the interpreter (default python3: on the H200 image, the one with JAX/CUDA, flax, optax, torch).
#
# The GPU image has JAX with CUDA, flax, optax, chex, scikit-image, scikit-learn, matplotlib, tqdm and torch, but
# no internet and no jaxopt (which peel_jax's solver imports). jaxopt is carried as a wheel in .wheels/ (ignored
# by git; pure Python, any Python 3). Fetch it here once, from the repo root:
#
#   .venv/bin/python -m pip download --no-deps --only-binary=:all: -d .wheels jaxopt==0.8.5
#
# The exact call a session with a GPU makes (the device tool's `run`, from the repo root):
#
#   run(command="PYTHONUNBUFFERED=1 bash benchmarks/gpu_suite.sh --out $OUT --budget 510",
#       carry=[".wheels"], timeout_s=600)
#
# then, here: mkdir -p /tmp/gpu && tar xzf <files_at>/gpu_suite.tar.gz -C /tmp/gpu, and read /tmp/gpu/*.json,
# <files_at>/summary.json (what ran, how long, what was skipped) and <files_at>/suite.log.
# A first call spends a minute or more starting the machine; 510 s of suite leaves about 90 s of the 600 s call
# for that and the transfers, and the 15-minute device allowance room for one rerun of a failed step.
#
# Steps (GPU sizes; --quick shrinks every shape):
#   env         jax.devices(), device kind, versions, nvidia-smi, git commit (if .git travelled)       ~10 s
#   blocks      benchmarks.throughput: the 64-channel 56x56 paper block, batch 1/8/64, LM, branch gain 0.3
#               (contractive) and 1.0 (He scale), default precision (TF32 on the GPU); compile time, images/s,
#               iterations/s, device peak memory, % of the measured float32 and TF32 peaks (8192^2 matmul and a
#               64x56x56x256 3x3 conv, measured in the same process)                                    ~90 s
#   r18         resnet18 (paper variant, branches x0.3) from layer4, 224 px, batch 64, 30 LM iterations per
#               block: loop driver, and the one-program jax.jit pass (scan driver) where
#               peel_jax.NetworkConfig exists (issue 9); first call (compile) + one steady call each       ~150 s
#   highest     the blocks at batch 1 and 64 again with jax_default_matmul_precision=highest: speed, and the
#               residual and input error reached, beside the default (TF32) rows                        ~50 s
#   r18_scan    the r18 problem with the scan driver (scan against loop)                                 ~90 s
#   r50         resnet50 (paper variant, x0.3) from layer3, 224 px, batch 64, 30 iterations, loop driver  ~90 s
#   cpu_rows    resnet18 from layer1..layer4 at 96 px, batch 1, 30 iterations: the CPU rows of
#               benchmarks/RESULTS.md (throughput_network.json), for GPU/CPU ratios                      ~40 s
#   roofline    benchmarks.roofline_estimate --no-cpu-timing: XLA's cost analysis by the GPU compiler     ~60 s
#   r18_default resnet18 from layer4 at 224 px, batch 64, the default SolverConfig (150 iterations cap),
#               loop driver: the issue's "whole inversion in under 60 s" target at the default budget     ~90 s
#   deployed    benchmarks.deployed (issue 10's table) at 224 px, 32 images, if that module exists        rest
#   studies     experiments.faces, chest_xray, imagenet with --images 32 at 224 px, as far as time allows  rest
set -u -o pipefail

QUICK=0
OUT=/tmp/peel_gpu_suite_out
BUDGET=510
PY=python3
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) QUICK=1 ;;
    --out) OUT="$2"; shift ;;
    --budget) BUDGET="$2"; shift ;;
    --python) PY="$2"; shift ;;
    -h|--help) sed -n '2,60p' "$0"; exit 0 ;;
    *) echo "gpu_suite: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT" || exit 2
START=$(date +%s)
DEADLINE=$((START + BUDGET))
mkdir -p "$OUT" || exit 2
OUT="$(cd "$OUT" && pwd)"
WORK="$(mktemp -d /tmp/peel_gpu_suite.XXXXXX)"
LOG="$OUT/suite.log"
STEPS="$WORK/steps.tsv"
: > "$LOG"
printf 'step\tstatus\tseconds\tnote\n' > "$STEPS"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS="ignore::DeprecationWarning"

log() { echo "[$(date -u +%H:%M:%S) +$(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }

pack() {  # everything measured so far, re-packed after every step
  "$PY" - "$WORK" "$STEPS" "$OUT/summary.json" "$QUICK" "$BUDGET" "$START" <<'EOF' >> "$LOG" 2>&1
import csv, glob, json, os, sys, time
work, steps, out, quick, budget, start = sys.argv[1:]
rows = list(csv.DictReader(open(steps), delimiter="\t"))
files = sorted(os.path.relpath(p, work) for p in glob.glob(os.path.join(work, "**", "*.json"), recursive=True))
json.dump({"quick": quick == "1", "budget_s": int(budget), "elapsed_s": int(time.time()) - int(start),
           "steps": rows, "json_files": files}, open(out, "w"), indent=1)
EOF
  # The figures (maybe large) go in a second archive, so the device tool's 16 MiB per file never costs the JSON.
  (cd "$WORK" && find . -type f \( -name '*.json' -o -name '*.csv' -o -name '*.tsv' \) -print0 \
    | tar czf "$OUT/gpu_suite.tar.gz.tmp" --null -T -) 2>> "$LOG" \
    && mv "$OUT/gpu_suite.tar.gz.tmp" "$OUT/gpu_suite.tar.gz"
  tar czf "$OUT/gpu_suite_all.tar.gz.tmp" -C "$WORK" . 2>> "$LOG" \
    && mv "$OUT/gpu_suite_all.tar.gz.tmp" "$OUT/gpu_suite_all.tar.gz"
}

# step NAME MIN_SECONDS CAP_SECONDS COMMAND...: runs COMMAND if MIN_SECONDS fit in what is left, for at most
# CAP_SECONDS (and never past the deadline); its output goes to the log.
step() {
  local name="$1" min="$2" cap="$3"
  shift 3
  local now left limit t0 rc status
  now=$(date +%s)
  left=$((DEADLINE - now))
  if [ "$left" -lt "$min" ]; then
    log "SKIP $name: ${left}s left, it needs ${min}s"
    printf '%s\tskipped\t0\t%ss left < %ss\n' "$name" "$left" "$min" >> "$STEPS"
    pack
    return 0
  fi
  limit=$((cap * CAPX))
  [ "$left" -lt "$limit" ] && limit=$left
  log "START $name (limit ${limit}s): $*"
  t0=$(date +%s)
  timeout -k 10 "$limit" "$@" >> "$LOG" 2>&1
  rc=$?
  status=ok
  [ "$rc" -ne 0 ] && status="failed rc=$rc"
  [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && status="cut at ${limit}s"
  log "END $name: $status after $(( $(date +%s) - t0 ))s"
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$(( $(date +%s) - t0 ))" "$*" >> "$STEPS"
  pack
  return 0
}

# --- setup: carried wheels, only for what is missing ------------------------------------------------------------
if ! "$PY" -c "import jaxopt" > /dev/null 2>&1; then
  if ls .wheels/*.whl > /dev/null 2>&1; then
    log "installing carried wheels: $(ls .wheels)"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/peel_site \
      .wheels/*.whl >> "$LOG" 2>&1 || log "pip install of .wheels failed"
    export PYTHONPATH="/tmp/peel_site${PYTHONPATH:+:$PYTHONPATH}"
  else
    log "jaxopt is missing and .wheels/ holds no wheel: peel_jax will not import (see the header)"
  fi
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

"$PY" - "$WORK/env.json" <<'EOF' >> "$LOG" 2>&1
import datetime, json, os, platform, subprocess, sys
info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(), "argv": sys.argv}
def run(cmd):
  try:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
  except Exception as e:  # noqa: BLE001
    return f"unavailable: {type(e).__name__}"
info["nvidia_smi"] = run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                          "--format=csv"])
info["git_commit"] = run(["git", "rev-parse", "HEAD"]) or "unknown (no .git)"
try:
  import jax, jaxlib
  info.update(jax=jax.__version__, jaxlib=jaxlib.__version__, backend=jax.default_backend(),
              devices=[str(d) for d in jax.devices()], device_kind=jax.devices()[0].device_kind)
  for name in ("flax", "optax", "jaxopt", "numpy", "skimage", "peel_jax"):
    try:
      info[name] = __import__(name).__version__
    except Exception as e:  # noqa: BLE001
      info[name] = f"unavailable: {type(e).__name__}: {e}"
  import peel_jax
  info["network_config"] = hasattr(peel_jax, "NetworkConfig")
  from benchmarks.block_solver import _source_digest  # pins the code measured when .git did not travel
  info["peel_jax_source_sha256"] = _source_digest()
except Exception as e:  # noqa: BLE001
  info["error"] = f"{type(e).__name__}: {e}"
json.dump(info, open(sys.argv[1], "w"), indent=1)
print(json.dumps(info, indent=1))
EOF
printf 'env\tok\t0\t-\n' >> "$STEPS"
pack

T="$PY -m benchmarks.throughput"
if [ "$QUICK" = 1 ]; then
  BLOCKS="--quick --kinds paper --sizes 16 --batches 1,2 --inners lm --gains 0.3,1.0 --repeats 1 --min-time 0"
  HIGHEST="--quick --kinds paper --sizes 16 --batches 2 --inners lm --gains 0.3,1.0 --repeats 1 --min-time 0 \
           --precision highest"
  NET="--quick --network-only --network-size 96 --network-batch 1 --network-max-iters 2 --network-cg-iters 2"
  R18="$NET --network-layers layer1.0"
  R50="$NET --network-archs resnet50 --network-layers layer1.0 --network-repeats 0"
  ROWS="$NET --network-layers layer1,layer2"
  R18D="$NET --network-layers layer1.0 --network-max-iters 3 --network-repeats 0"
  ROOF="--quick --no-cpu-timing --configs block,resnet18"
  STUDY="--images 1 --size 96 --batch-size 1 --layers layer1 --max-iters 2 --cg-iters 2 --refine-iters 1 \
         --authors-steps 4 --mv-steps 4"
  DEPLOYED="--quick"
  M=(5 10 20)  # minimum seconds: small, medium, large steps
  CAPX=3       # a CPU compiles slower than the GPU runs: triple every step's cap
else
  BLOCKS="--kinds paper --sizes 56 --batches 1,8,64 --inners lm --gains 0.3,1.0 --repeats 3 --min-time 2"
  HIGHEST="--kinds paper --sizes 56 --batches 1,64 --inners lm --gains 0.3,1.0 --repeats 3 --min-time 2 \
           --precision highest"
  NET="--network-only --network-size 224 --network-batch 64 --network-max-iters 30"
  R18="$NET --network-layers layer4"
  R50="$NET --network-archs resnet50 --network-layers layer3"
  ROWS="--network-only --network-size 96 --network-batch 1 --network-max-iters 30 \
        --network-layers layer1,layer2,layer3,layer4"
  R18D="--network-only --network-size 224 --network-batch 64 --network-layers layer4"
  ROOF="--no-cpu-timing --configs block,resnet18,resnet50"
  STUDY="--images 32 --size 224 --batch-size 32"
  DEPLOYED="--size 224 --images 32"
  M=(30 60 90)
  CAPX=1
fi

# shellcheck disable=SC2086  # word splitting of the option strings is intended
{
step blocks      "${M[1]}" 150 $T $BLOCKS --out "$WORK/blocks.json"
step r18         "${M[2]}" 240 $T $R18 --network-drivers loop --network-jit --out "$WORK/network_resnet18.json"
step highest     "${M[1]}" 90  $T $HIGHEST --out "$WORK/blocks_highest.json"
step r18_scan    "${M[2]}" 150 $T $R18 --network-drivers scan --out "$WORK/network_resnet18_scan.json"
step r50         "${M[2]}" 120 $T $R50 --network-drivers loop --out "$WORK/network_resnet50.json"
step cpu_rows    "${M[1]}" 60  $T $ROWS --out "$WORK/network_cpu_rows.json"
step roofline    "${M[1]}" 90  $PY -m benchmarks.roofline_estimate $ROOF --out "$WORK/roofline_device.json"
step r18_default "${M[2]}" 120 $T $R18D --network-drivers loop --out "$WORK/network_resnet18_default.json"
if [ -f benchmarks/deployed.py ]; then
  # Its options are not known when this was written (issue 10): pass ours only where its --help names them.
  DARGS=()
  HELP="$($PY -m benchmarks.deployed --help 2>/dev/null)"
  for opt in $DEPLOYED; do
    case "$opt" in --*) echo "$HELP" | grep -q -- "$opt" && DARGS+=("$opt") && KEEP=1 || KEEP=0 ;;
                   *) [ "${KEEP:-0}" = 1 ] && DARGS+=("$opt") ;; esac
  done
  echo "$HELP" | grep -q -- "--out" && DARGS+=(--out "$WORK/deployed")
  step deployed  "${M[2]}" 240 $PY -m benchmarks.deployed "${DARGS[@]}"
else
  printf 'deployed\tskipped\t0\tbenchmarks/deployed.py does not exist (issue 10)\n' >> "$STEPS"
fi
mkdir -p "$WORK/studies"
for study in faces chest_xray imagenet; do
  step "$study" "${M[2]}" 240 $PY -m "experiments.$study" $STUDY --out "$WORK/studies/$study" --overwrite
done
}
pack
log "done: $(( $(date +%s) - START ))s of ${BUDGET}s; results in $OUT/gpu_suite.tar.gz"
rm -rf "$WORK"
