#!/usr/bin/env bash
# The GPU check of issue 18: everything gnlightning wants to know from a GPU, in one unattended run.
#
# Why one script: a GPU may be lent for a few minutes only, once. This runs the GPU tests (tests/test_gpu.py and
# any other test marked gpu) and the GPU section of the benchmark, each step under its own time limit, carries on
# past a failed step, and writes everything into ONE markdown report with a PASS / FAIL line per step. It installs
# nothing and asks nothing. Expected 3-5 minutes on one GPU; the step limits add up to 590 s, under 10 minutes.
#
# Usage, from the repository root:
#   bash scripts/gpu_check.sh                 # report: ./gpu_report.md, or $OUT/gpu_report.md when OUT is set
#   bash scripts/gpu_check.sh path/report.md  # report there
#   PYTHON=/path/to/python bash scripts/gpu_check.sh
# Exit status: 0 when every step passed, 1 otherwise (the report says which).
set -euo pipefail

REPORT=${1:-${OUT:-.}/gpu_report.md}
mkdir -p "$(dirname "$REPORT")"
REPORT=$(cd "$(dirname "$REPORT")" && pwd)/$(basename "$REPORT")
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PYTHON=${PYTHON:-python}
# The code of this checkout, whatever copy of gnlightning is installed.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gnl-gpu-check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

FAILED=0
SUMMARY=()

{
  echo "# gnlightning GPU check"
  echo
  revision="no git checkout"
  if git rev-parse --git-dir > /dev/null 2>&1; then
    revision="commit $(git rev-parse --short HEAD)"
    git diff --quiet HEAD 2>/dev/null || revision="$revision with uncommitted changes"
  fi
  echo "\`bash scripts/gpu_check.sh\` on ${HOSTNAME:-?}, $(date -u '+%Y-%m-%d %H:%M UTC'), $revision."
  echo "Each step below ends with a PASS or FAIL line; the summary at the end lists them. A report without a"
  echo "summary was cut short."
} > "$REPORT"

# run_step NAME LIMIT_SECONDS CHECK -- COMMAND...
# Runs COMMAND under `timeout`, shows its output and appends it to the report. CHECK (a function name, or "none")
# gets the log path after a zero exit and may turn the step into a FAIL, printing why.
run_step() {
  local name=$1 limit=$2 check=$3
  shift 4
  local log="$WORK/step-${#SUMMARY[@]}.log" start=$SECONDS rc verdict reason=""
  echo
  echo "==> $name: $* (limit ${limit}s)"
  set +e
  timeout --kill-after=15 "$limit" "$@" 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  set -e
  local took=$((SECONDS - start))
  if ((rc == 124 || rc == 137)); then
    verdict=FAIL reason="timed out after ${limit}s"
  elif ((rc != 0)); then
    verdict=FAIL reason="exit status $rc"
  elif [[ $check != none ]] && ! reason=$($check "$log"); then
    verdict=FAIL
  else
    verdict=PASS reason=""
  fi
  local line="$verdict: $name (${took}s${reason:+; $reason})"
  echo "$line"
  {
    echo
    echo "## $name"
    echo
    echo "Command: \`$*\`"
    echo
    echo '```'
    cat "$log"
    echo '```'
    echo
    echo "**$line**"
  } >> "$REPORT"
  SUMMARY+=("$line")
  [[ $verdict == PASS ]] || FAILED=$((FAILED + 1))
}

# Checks: print why on failure, return non-zero.
tests_ran() {
  if ! grep -qE '^PASSED ' "$1"; then
    echo "no test passed (all skipped: is CUDA visible to this python?)"
    return 1
  fi
  local skipped
  skipped=$(grep -cE '^SKIPPED ' "$1" || true)
  if ((skipped > 0)); then
    echo "$skipped skip lines among the GPU tests (see the report)"
    return 1
  fi
}
cuda_visible() {
  grep -q '^cuda available: True' "$1" || { echo "torch sees no CUDA device"; return 1; }
}
bench_ran() {
  local markdown="$WORK/bench/bench.md"
  [[ -s $markdown ]] || { echo "no bench.md written"; return 1; }
  if grep -q 'Skipped: CUDA is not available' "$markdown"; then
    echo "the gpu section skipped: no CUDA"
    return 1
  fi
  if grep -q '\*\*FAILED:\*\*' "$markdown"; then
    echo "$(grep -c '\*\*FAILED:\*\*' "$markdown") benchmark variant(s) failed (FAILED lines in the report)"
    return 1
  fi
}

# 1. The machine.
if command -v nvidia-smi > /dev/null 2>&1; then
  run_step "nvidia-smi" 30 none -- nvidia-smi
else
  run_step "nvidia-smi" 30 none -- sh -c 'echo "nvidia-smi not found on PATH"; exit 1'
fi

run_step "torch and CUDA" 60 cuda_visible -- "$PYTHON" -c '
import platform, sys
import torch, torch.distributed as dist
print("python", platform.python_version(), "on", platform.platform())
print("torch", torch.__version__, "| built for CUDA", torch.version.cuda, "| cuDNN", torch.backends.cudnn.version())
for name in ("torchvision", "lightning", "timm"):
    try:
        module = __import__(name)
        print(name, module.__version__)
    except ImportError:
        print(name, "not installed")
print("cuda available:", torch.cuda.is_available())
if torch.cuda.is_available():
    for index in range(torch.cuda.device_count()):
        properties = torch.cuda.get_device_properties(index)
        print(f"device {index}: {properties.name}, compute capability {properties.major}.{properties.minor}, "
              f"{properties.total_memory / 2**30:.1f} GiB")
    print("bf16 supported:", torch.cuda.is_bf16_supported())
    print("NCCL", torch.cuda.nccl.version() if dist.is_nccl_available() else "not available")
    print("TF32 defaults: cudnn", torch.backends.cudnn.allow_tf32, "| matmul", torch.backends.cuda.matmul.allow_tf32)
    x = torch.randn(256, 256, device="cuda")
    print("a CUDA matmul runs:", bool(torch.isfinite(x @ x).all()))
print("distributed backends: gloo", dist.is_gloo_available(), "| nccl", dist.is_nccl_available())
'

# 2. The tests marked gpu (tests/test_gpu.py and any other), verbose, with a line per test.
run_step "GPU tests (pytest -m gpu)" 300 tests_ran -- \
  "$PYTHON" -m pytest -m gpu tests -v -rA -p no:cacheprovider

# 3. The benchmark's GPU section.
run_step "GPU benchmark (bench.py --only gpu)" 200 bench_ran -- \
  "$PYTHON" scripts/bench.py --only gpu --out "$WORK/bench"
if [[ -s $WORK/bench/bench.md ]]; then
  {
    echo
    echo "### The benchmark's report"
    echo
    sed 's/^# /#### /; s/^## /#### /; s/^### /#### /' "$WORK/bench/bench.md"
    if [[ -s $WORK/bench/bench.json ]]; then
      echo
      echo "<details><summary>bench.json</summary>"
      echo
      echo '```json'
      cat "$WORK/bench/bench.json"
      echo '```'
      echo
      echo "</details>"
    fi
  } >> "$REPORT"
fi

{
  echo
  echo "## Summary"
  echo
  for line in "${SUMMARY[@]}"; do
    echo "- $line"
  done
  echo
  if ((FAILED == 0)); then
    echo "**ALL ${#SUMMARY[@]} STEPS PASSED**"
  else
    echo "**$FAILED OF ${#SUMMARY[@]} STEPS FAILED**"
  fi
} >> "$REPORT"

echo
printf '%s\n' "${SUMMARY[@]}"
echo "report: $REPORT"
exit $((FAILED > 0 ? 1 : 0))
