#!/usr/bin/env bash
# The prepared GPU check (DESIGN.md section 7): one command for a fresh GPU machine with nothing but
# its own preinstalled PyTorch (no package registry), finishing within ~8 minutes:
#
#   bash scripts/gpu_check.sh            # results in $OUT, else ./gpu-results/
#
# Stages, in order, each under its own time limit (a failing or hanging stage never stops the rest):
#   probe      the GPU, torch, nvcc, compute-sanitizer (no GPU: every later stage is skipped, exit 0)
#   build      fastar._C in place for this GPU's arch with all cores (setup.py build_ext --inplace)
#   check      `fastar check --device all`, the user's self-check (every kernel vs its reference, a
#              tiny model of every family cached vs naive, a captured decode step): its table in check.md
#   tests      every CUDA test: one pytest process per test file, in parallel, so a crashed or
#              poisoned CUDA context costs one file, not the run; failures recorded, never -x
#   sanitizer  scripts/gpu_sanitizer_cases.py under compute-sanitizer memcheck, racecheck, synccheck
#   bench      python -m fastar bench FAMILY --device cuda --quick, one process per family
#   summary    always (EXIT trap): scripts/gpu_check_summary.py writes summary.md and the merged files
#
# Files written to the results folder (at most 8): summary.md, gpu_check.log, check.md, junit.xml,
# sanitizer.log, bench.json, bench.md.
#
# Environment (all optional):
#   PYTHON                         interpreter with torch (default python3)
#   OUT                            results folder (default ./gpu-results)
#   FASTAR_GPU_CHECK_BUDGET        total seconds for all stages (default 470)
#   FASTAR_GPU_CHECK_LIMIT_<STAGE> a stage's own limit in seconds (BUILD 270, CHECK 60, TESTS 180, SANITIZER 120,
#                                  BENCH 150); each is also cut to what the budget leaves after the
#                                  minimum the later stages need
#   FASTAR_GPU_CHECK_SKIP_BUILD=1  reuse the extension already built in place
#   FASTAR_GPU_CHECK_FORCE=1       run the stages even without a GPU (a dry run of this script)
#   FASTAR_GPU_CHECK_TEST_FILES    test files to run (default: every file that has CUDA tests)
#   FASTAR_GPU_CHECK_TEST_JOBS     pytest processes at once (default 4)
#   FASTAR_GPU_CHECK_BENCH_FAMILIES  benchmark families (default: all of fastar.bench.FAMILIES)
#   FASTAR_GPU_CHECK_SANITIZER_KERNELS  compute-sanitizer --kernel-name filter (default kns=fastar:
#                                  only our kernels are instrumented; empty: every kernel)
#   FASTAR_GPU_CHECK_HANG=<stage>  test hook: that stage sleeps instead of working (to check limits)
set -u -o pipefail  # deliberately no -e: every stage runs whatever the previous one did

cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
OUT=${OUT:-$ROOT/gpu-results}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/fastar-gpu-check.XXXXXX")
LOG=$OUT/gpu_check.log
: > "$LOG"
T0=$(date +%s)
BUDGET=${FASTAR_GPU_CHECK_BUDGET:-470}
DEADLINE=$((T0 + BUDGET))
SUMMARY_RESERVE=10  # seconds kept for the summary at the end

# What the stage bodies (run under `timeout bash -c`) need from here.
export ROOT PY WORK LOG
export PYTHONUNBUFFERED=1          # a killed process still leaves every line it printed
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # the in-place build, not an installed fastar
export PYTHONDONTWRITEBYTECODE=1

log() { echo "[gpu_check +$(( $(date +%s) - T0 ))s] $*" | tee -a "$LOG"; }

# ---------------------------------------------------------------------------------------------
# Always end with the summary, whatever happened before (a failed stage, a hang, Ctrl-C).
finished=0
finish() {
  [ "$finished" = 1 ] && return
  finished=1
  trap - INT TERM
  log "summary"
  if ! timeout -k 5 60 "$PY" "$ROOT/scripts/gpu_check_summary.py" --work "$WORK" --out "$OUT" \
      --budget "$BUDGET" --elapsed "$(( $(date +%s) - T0 ))" >> "$LOG" 2>&1; then
    # The summary script itself failed (a broken python?): a plain one from the stage table.
    { echo "# fastar GPU check (fallback summary: gpu_check_summary.py failed, see gpu_check.log)"; echo
      echo '```'; cat "$WORK/stages.tsv" 2>/dev/null; echo '```'; } > "$OUT/summary.md"
  fi
  cat "$OUT/summary.md"
  rm -rf "$WORK"
}
trap finish EXIT
trap 'log "interrupted"; exit 130' INT TERM

# ---------------------------------------------------------------------------------------------
# stage NAME NOMINAL_LIMIT LATER_MIN FUNCTION: run FUNCTION under `timeout`, its output into the
# log; the limit is NOMINAL cut to what the budget leaves after LATER_MIN (the later stages'
# minimum). One line per stage in stages.tsv: name, status, rc, seconds, limit, note.
record() { printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >> "$WORK/stages.tsv"; }

stage() {
  local name=$1 nominal=$2 later=$3 fn=$4
  local upper; upper=$(echo "$name" | tr a-z A-Z)
  local var="FASTAR_GPU_CHECK_LIMIT_$upper"
  nominal=${!var:-$nominal}
  local left=$(( DEADLINE - $(date +%s) - later - SUMMARY_RESERVE ))
  local limit=$(( nominal < left ? nominal : left ))
  if [ -n "${SKIP_ALL:-}" ]; then
    record "$name" skipped - 0 "$limit" "$SKIP_ALL"; log "$name: skipped ($SKIP_ALL)"; return
  fi
  if [ "$limit" -lt 3 ]; then
    record "$name" skipped - 0 "$limit" "no time left in the ${BUDGET} s budget"
    log "$name: skipped, no time left"; return
  fi
  [ "${FASTAR_GPU_CHECK_HANG:-}" = "$name" ] && fn=hang
  log "== $name (limit ${limit} s)"
  local s; s=$(date +%s)
  echo "$limit" > "$WORK/limit"
  timeout -k 5 "$limit" bash -c "$fn" > "$WORK/$name.out" 2>&1
  local rc=$?
  local took=$(( $(date +%s) - s ))
  # Cap what one stage adds to the log (a sanitizer flood must not push the file past 16 MiB).
  tail -c 3000000 "$WORK/$name.out" >> "$LOG"
  if [ "$name" = tests ]; then  # the per-file pytest logs too, also when the stage was cut off
    for f in "$WORK"/tests/*.log; do
      [ -f "$f" ] && { echo "---- pytest log of $(basename "$f" .log | tr + /)"; tail -c 1000000 "$f"; } >> "$LOG"
    done
  fi
  local status note=""
  case $rc in
    0) status=ok ;;
    124|137) status=timeout; note="cut off at its ${limit} s limit" ;;
    *) status=fail; note=$(grep -v '^\s*$' "$WORK/$name.out" | tail -1 | cut -c1-200 | tr '\t' ' ') ;;
  esac
  [ -f "$WORK/$name.note" ] && note="$(head -c 300 "$WORK/$name.note" | tr '\t\n' '  ')${note:+; $note}"
  record "$name" "$status" "$rc" "$took" "$limit" "$note"
  log "$name: $status (rc $rc, ${took} s)"
}

hang() { echo "FASTAR_GPU_CHECK_HANG: sleeping instead of working"; sleep 100000; }
export -f hang

# ---------------------------------------------------------------------------------------------
# probe: what this machine is. Writes probe.json (read by the summary) and decides whether the
# GPU stages run at all.
probe() {
  "$PY" - <<'EOF'
import json, os, shutil, subprocess, sys
d = {"python": sys.version.split()[0], "executable": sys.executable}
try:
    import torch
    d["torch"] = torch.__version__
    d["torch_cuda"] = torch.version.cuda
    d["gpu"] = torch.cuda.is_available()
    if d["gpu"]:
        d["gpu_name"] = torch.cuda.get_device_name(0)
        d["arch"] = "%d.%d" % torch.cuda.get_device_capability(0)
        d["sms"] = torch.cuda.get_device_properties(0).multi_processor_count
except Exception as e:
    d["torch_error"] = f"{type(e).__name__}: {e}"
    d["gpu"] = False
home = os.environ.get("CUDA_HOME") or ("/usr/local/cuda" if os.path.exists("/usr/local/cuda/bin/nvcc") else None)
nvcc = (os.path.join(home, "bin", "nvcc") if home else None) or shutil.which("nvcc")
if nvcc and not os.path.exists(nvcc):
    nvcc = shutil.which("nvcc")
d["nvcc"] = nvcc
if nvcc:
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()
    d["nvcc_version"] = out[-1] if out else None
cs = shutil.which("compute-sanitizer")
for cand in ([os.path.join(home, "bin", "compute-sanitizer")] if home else []) + \
        ["/usr/local/cuda/bin/compute-sanitizer", "/usr/local/cuda/compute-sanitizer/compute-sanitizer"]:
    if not cs and os.path.exists(cand):
        cs = cand
d["compute_sanitizer"] = cs
for mod in ("pytest", "pytest_timeout", "xdist", "mlxtend"):
    try:
        __import__(mod)
        d[mod] = True
    except Exception:
        d[mod] = False
d["cores"] = os.cpu_count()
print(json.dumps(d, indent=1))
with open(os.path.join(os.environ["WORK"], "probe.json"), "w") as f:
    json.dump(d, f)
EOF
}
export -f probe

probe_get() {  # probe_get KEY: one field of probe.json ("" when absent)
  "$PY" -c "import json,sys; v=json.load(open(sys.argv[1])).get(sys.argv[2]); print('' if v in (None, False) else v)" \
    "$WORK/probe.json" "$1" 2>/dev/null
}

# ---------------------------------------------------------------------------------------------
build() {
  if [ "${FASTAR_GPU_CHECK_SKIP_BUILD:-}" = 1 ]; then
    echo "FASTAR_GPU_CHECK_SKIP_BUILD=1: reusing the extension built in place" | tee "$WORK/build.note"
  else
    # No pip and no isolation: the extension is compiled against the torch that will run it, and
    # nothing is downloaded. The arch is this GPU's own (e.g. 9.0), so nvcc compiles one target.
    export FASTAR_CUDA=1 TORCH_CUDA_ARCH_LIST=${ARCH:-9.0} MAX_JOBS=${MAX_JOBS:-$(nproc)}
    if [ -z "${CUDA_HOME:-}" ] && [ -n "${NVCC:-}" ]; then export CUDA_HOME=$(dirname "$(dirname "$NVCC")"); fi
    echo "building: FASTAR_CUDA=1 TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS CUDA_HOME=${CUDA_HOME:-}"
    local s; s=$(date +%s)
    "$PY" setup.py build_ext --inplace || { echo "build failed after $(( $(date +%s) - s )) s"; return 1; }
    echo "built in $(( $(date +%s) - s )) s (archs $TORCH_CUDA_ARCH_LIST, $MAX_JOBS jobs)" | tee "$WORK/build.note"
  fi
  # The build must load and carry the CUDA kernels, or every later stage measures the reference.
  "$PY" -c "
import fastar
from fastar import _backend as b
print('fastar from', fastar.__file__)
assert b.C_LOADED, b.C_LOAD_ERROR
print('cuda kernels:', ', '.join(sorted(b.CUDA_KERNELS)) or 'none')
assert b.CUDA_KERNELS, 'fastar._C loaded but has no CUDA kernels'
"
}
export -f build

# ---------------------------------------------------------------------------------------------
# check: what a user with this GPU runs first. Its record of failed CUDA ops goes to the work folder,
# not the home directory, so the tests after it still run (and report) every kernel.
selfcheck() {
  FASTAR_CACHE_DIR="$WORK/cache" "$PY" -m fastar check --device all > "$WORK/check.out" 2>&1
  local rc=$?
  cat "$WORK/check.out"
  { echo "# fastar check (exit $rc)"; echo; echo '```'; cat "$WORK/check.out"; echo '```'; } > "$OUT/check.md"
  return $rc
}
export -f selfcheck

# ---------------------------------------------------------------------------------------------
# tests: the CUDA cases of the device-fixture tests (their ids hold "cuda"; "not cpu" drops the
# cpu twins of tests whose own names mention cuda), which takes in the CUDA-graph tests, both
# wavenet_step CUDA paths and the half/bfloat16 cases, plus the build check of test_backend.
# FASTAR_REQUIRE_KERNELS=1: a missing CUDA kernel fails instead of skipping.
TEST_EXPR=${FASTAR_GPU_CHECK_TEST_EXPR:-"(cuda and not cpu) or test_info_reports_compiled_kernels"}
TEST_FILES=${FASTAR_GPU_CHECK_TEST_FILES:-"tests/ops/test_masked_conv.py tests/ops/test_masked_conv_at.py
  tests/ops/test_mixture.py tests/ops/test_pixel_step.py tests/ops/test_pixelrnn_step.py tests/ops/test_wavenet_step.py
  tests/ops/test_lstm_scan.py tests/ops/test_made.py tests/models/test_pixelsnail.py
  tests/ops/test_lstm_scan_cuda.py tests/sampling/test_sampling.py tests/models/test_contract.py
  tests/models/test_wavenet.py tests/package/test_backend.py"}
export TEST_EXPR TEST_FILES

test_file() {  # test_file PATH: one pytest process, its own JUnit XML and log
  local f=$1 name=${1//\//+}  # tests/ops/x.py -> tests+ops+x.py (the summary turns it back)
  if [ ! -f "$f" ]; then  # listed but not in this checkout (a branch without it): said, not failed
    echo "$f: not in this checkout, skipped" | tee -a "$WORK/tests/missing"
    return 0
  fi
  local extra=()
  [ "$(probe_get pytest_timeout)" = True ] && extra+=(--timeout "${FASTAR_GPU_CHECK_TEST_TIMEOUT:-120}")
  FASTAR_REQUIRE_KERNELS=1 "$PY" -m pytest -p no:cacheprovider -v -rfE --tb=short -k "$TEST_EXPR" \
    --junitxml="$WORK/junit/$name.xml" "${extra[@]}" "$f" > "$WORK/tests/$name.log" 2>&1
  local rc=$?
  echo "$rc" > "$WORK/tests/$name.rc"
  echo "$f: pytest exit $rc ($(grep -E '^=+ .* in [0-9.]+s' "$WORK/tests/$name.log" | tail -1 | tr -d '='))"
}
export -f test_file probe_get

tests() {
  mkdir -p "$WORK/junit" "$WORK/tests"
  # Parallel files on one GPU: each process has its own CUDA context, so an illegal access
  # (a sticky error) or a segfault ends one file's run, not the others'.
  echo $TEST_FILES | tr ' ' '\n' | grep . | xargs -P "${FASTAR_GPU_CHECK_TEST_JOBS:-4}" -I{} bash -c 'test_file "$1"' _ {}
  local bad=0
  for rc in "$WORK"/tests/*.rc; do
    [ -f "$rc" ] || continue
    case $(cat "$rc") in 0|5) ;; *) bad=$((bad + 1)) ;; esac  # 5: nothing selected in that file
  done
  echo "$bad test file(s) with failures (counts below)" > "$WORK/tests.note"
  [ -f "$WORK/tests/missing" ] && echo "; listed but missing: $(cut -d: -f1 "$WORK/tests/missing" | tr '\n' ' ')" >> "$WORK/tests.note"
  [ "$bad" = 0 ]
}
export -f tests

# ---------------------------------------------------------------------------------------------
sanitizer() {
  mkdir -p "$WORK/sanitizer"
  if [ -z "${CS:-}" ]; then
    echo "compute-sanitizer not found: sanitizer unavailable" | tee "$WORK/sanitizer.note"
    return 0
  fi
  local tools=(memcheck racecheck synccheck) stage_end=$(( $(date +%s) + $(cat "$WORK/limit") - 3 ))
  local i=0 tool
  for tool in "${tools[@]}"; do
    local left=$(( stage_end - $(date +%s) )) n=$(( ${#tools[@]} - i ))
    local lim=$(( left / n )); i=$((i + 1))
    if [ "$lim" -lt 5 ]; then echo "$tool: no time left" > "$WORK/sanitizer/$tool.log"; echo 124 > "$WORK/sanitizer/$tool.rc"; continue; fi
    local filt=() envs=()
    local kern=${FASTAR_GPU_CHECK_SANITIZER_KERNELS-kns=fastar}
    # Only our kernels are instrumented (all live in namespace fastar): an out-of-bounds access
    # of ours is caught at our own instrumented instruction, and torch's kernels run at full speed.
    [ -n "$kern" ] && filt=(--kernel-name "$kern")
    # No caching allocator under memcheck: each tensor its own allocation, so an overrun is seen.
    [ "$tool" = memcheck ] && envs=(PYTORCH_NO_CUDA_MEMORY_CACHING=1)
    echo "== $tool (limit ${lim} s) ${filt[*]}"
    local s; s=$(date +%s)
    env "${envs[@]}" timeout -k 5 "$lim" "$CS" --tool "$tool" "${filt[@]}" "$PY" "$ROOT/scripts/gpu_sanitizer_cases.py" \
      > "$WORK/sanitizer/$tool.log" 2>&1
    local rc=$?
    if [ "${#filt[@]}" -gt 0 ] && [ "$rc" != 124 ] && ! grep -q -e "ERROR SUMMARY" -e "^START" "$WORK/sanitizer/$tool.log"; then
      # The filter option was refused (another sanitizer version?): once more on every kernel.
      echo "$tool refused ${filt[*]}; again without the filter" | tee -a "$WORK/sanitizer/$tool.log"
      local left2=$(( stage_end - $(date +%s) - (${#tools[@]} - i) * 10 ))
      [ "$left2" -gt 5 ] && { env "${envs[@]}" timeout -k 5 "$left2" "$CS" --tool "$tool" "$PY" "$ROOT/scripts/gpu_sanitizer_cases.py" \
        >> "$WORK/sanitizer/$tool.log" 2>&1; rc=$?; }
    fi
    echo "$rc" > "$WORK/sanitizer/$tool.rc"
    echo "$tool: exit $rc in $(( $(date +%s) - s )) s: $(grep -h 'ERROR SUMMARY' "$WORK/sanitizer/$tool.log" | tail -1)"
  done
}
export -f sanitizer

# ---------------------------------------------------------------------------------------------
bench() {
  mkdir -p "$WORK/bench"
  # Only the families that measure cuda (floors and load are CPU-only: said in the status, not run).
  local fams=${FASTAR_GPU_CHECK_BENCH_FAMILIES:-$("$PY" -c "from fastar.bench import families_for; print(' '.join(families_for('cuda')[0]))")}
  [ -n "$fams" ] || { echo "no benchmark families found"; return 1; }
  if [ -z "${FASTAR_GPU_CHECK_BENCH_FAMILIES:-}" ]; then
    local skip; skip=$("$PY" -c "from fastar.bench import families_for; print(' '.join(families_for('cuda')[1]))")
    for fam in $skip; do echo "$fam skipped (CPU only)" >> "$WORK/bench/status"; done
  fi
  local stage_end=$(( $(date +%s) + $(cat "$WORK/limit") - 3 )) n i=0 bad=0 fam
  n=$(echo $fams | wc -w)
  for fam in $fams; do
    # An even share of what is left, so a slow family cannot starve the ones after it.
    local lim=$(( (stage_end - $(date +%s)) / (n - i) )); i=$((i + 1))
    if [ "$lim" -lt 5 ]; then echo "$fam: no time left"; echo "$fam timeout" >> "$WORK/bench/status"; bad=1; continue; fi
    echo "== bench $fam (limit ${lim} s)"
    timeout -k 5 "$lim" "$PY" -m fastar bench "$fam" --device cuda --quick --no-plot --out "$WORK/bench"
    local rc=$?
    case $rc in 0) echo "$fam ok" ;; 124|137) echo "$fam timeout"; bad=1 ;; *) echo "$fam fail $rc"; bad=1 ;; esac \
      >> "$WORK/bench/status"
    echo "bench $fam: exit $rc"
  done
  return $bad
}
export -f bench

# ---------------------------------------------------------------------------------------------
log "fastar GPU check in $ROOT with $PY, results in $OUT, budget ${BUDGET} s"
: > "$WORK/stages.tsv"
stage probe 60 -$BUDGET probe  # always runs: everything after depends on it
GPU=$(probe_get gpu)
if [ "$GPU" != True ]; then
  if [ "${FASTAR_GPU_CHECK_FORCE:-}" = 1 ]; then
    log "no GPU, FASTAR_GPU_CHECK_FORCE=1: running the stages anyway (dry run)"
  else
    log "no GPU: torch sees no CUDA device; nothing to check here"
    SKIP_ALL="no GPU"
  fi
fi
export ARCH=$(probe_get arch) NVCC=$(probe_get nvcc) CS=$(probe_get compute_sanitizer)
# The later minima: check 20 + tests 60 + sanitizer 45 + bench 40 after the build, and so on.
stage build 270 165 build
stage check 60 145 selfcheck
stage tests 180 85 tests
stage sanitizer 120 40 sanitizer
stage bench 150 0 bench
status=0
cut -f2 "$WORK/stages.tsv" | grep -q -e fail -e timeout && status=1
exit $status
