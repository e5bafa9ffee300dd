#!/usr/bin/env bash
# scripts/gpu-check.sh: the CUDA check, ONE script for a machine with one NVIDIA GPU (nvcc, cmake and ninja
# installed, no network), run from the repository root. Each step logs its wall time and runs under `timeout`; the
# whole run stays inside GPU_CHECK_BUDGET_S (default 540 s, so it ends well inside a 10-minute call).
#
#   1. gpu      nvidia-smi: the GPU, its driver and compute capability (9.0 -> --cuda-arch 90); nvcc's release
#   2. python   .venv if it imports mvlm's dependencies; else, when .venv is missing, `make venv`; else this
#               machine's python3 (PyTorch, NumPy, transformers are there) + the wheels carried in .whl/ (gguf,
#               diskcache, llama-cpp-python's bindings) + this repository on PYTHONPATH. Missing ones: named, exit 3
#   3. build    mvlm runtime build --target cuda --cuda-arch <detected> -j <all cores> (the llama.cpp source comes
#               from .whl/llama-cpp-src-*.tar.gz when the machine cannot download it). Meanwhile, on the side:
#   4. models   tiny MobileVLM V1, V2 and Xmodel-VLM (XDP, f=4) checkpoints -> mvlm convert --outtype f32
#   5. offload  the cuda build's llama-mtmd-cli on the tiny V2 with -ngl 999: its log must say the layers and CLIP
#               went to the GPU
#   6. verify   mvlm verify --runtime cuda (every layer and the mmproj on the GPU) for the three models, image
#               embedding rel. error <= 5e-3, logits rel. error <= 2e-3
#   7. bench    mvlm bench --protocol lm and vlm -ngl 999 on the tiny V2 (f32; and lm on a q4_0 made by the cuda
#               build's llama-quantize, time permitting), on a local device profile whose target is cuda
#   8. summary  $OUT/summary.txt (printed at the end), verify.json, bench-{lm,vlm}.{json,md} and gpu-check.tar.gz
#               (every log, the build log, nvidia-smi -q, the runtime manifest, timings): at most 8 files
#
# Exit status: 0 every step passed; 1 a check failed or a step was cut off by the budget; 3 Python dependencies
# missing; 4 no GPU answered. If the build is cut off by the budget, run the script again on the same machine:
# everything lives under .cache/gpu-check (ignored by git), so the build resumes where it stopped.
#
# The GPU machine cannot reach a package registry. Prepare once on a machine that can (after `make setup`):
#     scripts/gpu-check.sh --prepare      # writes .whl/: 3 wheels + the llama.cpp source (about 20 MB)
# then carry .whl to the GPU machine beside this repository and run `bash scripts/gpu-check.sh` there.
#
# Knobs: OUT (where the results go; default .cache/gpu-check/out), GPU_CHECK_BUDGET_S, GPU_CHECK_WORK, MVLM_CACHE.
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }

REPO=$(pwd)
if [ ! -f "$REPO/mvlm_core/runtime.py" ] || [ ! -f "$REPO/pyproject.toml" ]; then
    echo "gpu-check: run me from the mvlm repository root (bash scripts/gpu-check.sh)" >&2
    exit 2
fi

# --- --prepare: on a machine with the package registry, make what the GPU machine cannot download ----------------
prepare() {
    local py=.venv/bin/python
    [ -x "$py" ] || { echo "gpu-check --prepare: no .venv here: run \`make setup\` first" >&2; exit 2; }
    mkdir -p .whl
    local gguf_v dc_v lcp_v
    gguf_v=$("$py" -c 'import importlib.metadata as m; print(m.version("gguf"))')
    dc_v=$("$py" -c 'import importlib.metadata as m; print(m.version("diskcache"))')
    lcp_v=$("$py" -c 'from mvlm_core.runtime import LLAMA_CPP_PYTHON_VERSION as v; print(v)')
    echo "gpu-check --prepare: wheels gguf==$gguf_v diskcache==$dc_v (pure Python)"
    "$py" -m pip download -q --no-deps --only-binary=:all: -d .whl "gguf==$gguf_v" "diskcache==$dc_v"
    echo "gpu-check --prepare: llama-cpp-python==$lcp_v as bindings only (no libraries: they come from the runtime)"
    CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" "$py" -m pip wheel -q --no-deps -w .whl "llama-cpp-python==$lcp_v"
    local src
    src=$("$py" -c 'from mvlm_core.runtime import pinned_source; print(pinned_source().path)')
    echo "gpu-check --prepare: the pinned llama.cpp source $src (sha256-checked sdist, extracted)"
    tar -C "$(dirname "$src")" -czf ".whl/llama-cpp-src-$lcp_v.tar.gz" "$(basename "$src")"
    du -ch .whl/* | sed 's/^/  /'
    local total
    total=$(du -cb .whl/* | tail -1 | cut -f1)
    if [ "$total" -gt $((60 * 1024 * 1024)) ]; then
        echo "gpu-check --prepare: .whl is $((total / 1048576)) MiB: more than a 64 MiB transfer leaves room for" >&2
        exit 1
    fi
    echo "gpu-check --prepare: done. On the GPU machine, with .whl beside the repository: bash scripts/gpu-check.sh"
}

case "${1:-}" in
    --prepare) prepare; exit 0 ;;
    -h|--help) usage; exit 0 ;;
    "") ;;
    *) echo "gpu-check: unknown argument $1 (use --prepare, --help or nothing)" >&2; exit 2 ;;
esac

# --- the run -------------------------------------------------------------------------------------------------------
WORK=${GPU_CHECK_WORK:-$REPO/.cache/gpu-check}
BUDGET_S=${GPU_CHECK_BUDGET_S:-540}
RESERVE_S=15  # kept for the summary and the archive
OUT=${OUT:-$WORK/out}
export MVLM_CACHE=${MVLM_CACHE:-$WORK/mvlm-cache}
export PYTHONUNBUFFERED=1
LOGS=$WORK/logs
RES=$WORK/results
MODELS=$WORK/models
IMAGE_THRESHOLD=5e-3
LOGITS_THRESHOLD=2e-3
T0=$(date +%s)
PY=""
ARCH=""
RT=""
FINAL_RC=0

OUT_FILES="summary.txt verify.json bench-lm.json bench-lm.md bench-vlm.json bench-vlm.md gpu-check.tar.gz"
rm -rf "$LOGS" "$RES"
mkdir -p "$LOGS" "$RES" "$MODELS" "$OUT" "$MVLM_CACHE"
for f in $OUT_FILES; do rm -f "${OUT:?}/$f"; done
printf 'step\texit\tseconds\tnote\n' >"$WORK/timings.tsv"

say() { printf '[gpu-check %4ss] %s\n' "$(( $(date +%s) - T0 ))" "$*"; }
left() { echo $(( BUDGET_S - ($(date +%s) - T0) - RESERVE_S )); }
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$WORK/timings.tsv"; }
fail() { FINAL_RC=1; }

# run_step NAME CAP_S LOG CMD...: CMD under timeout (CAP_S or what is left of the budget), output to LOG (stdout to
# $STEP_STDOUT instead, when set); records exit status and wall time; returns CMD's status.
run_step() {
    local name=$1 cap=$2 log=$3
    shift 3
    local budget
    budget=$(left)
    if [ "$budget" -lt 5 ]; then
        record "$name" skipped 0 "time budget spent"
        say "$name: skipped (time budget spent)"
        return 125
    fi
    local limit=$(( cap < budget ? cap : budget ))
    say "$name: start (limit ${limit} s): $*"
    local start rc=0
    start=$(date +%s.%N)
    if [ -n "${STEP_STDOUT:-}" ]; then
        timeout --kill-after=10 "$limit" "$@" >"$STEP_STDOUT" 2>"$log" || rc=$?
    else
        timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1 || rc=$?
    fi
    local secs note
    secs=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    case $rc in
        0) note=ok ;;
        124|137) note="cut off after ${limit} s" ;;
        *) note="failed (exit $rc)" ;;
    esac
    record "$name" "$rc" "$secs" "$note"
    say "$name: $note in $secs s (log: ${log#"$WORK"/})"
    return "$rc"
}

# --- the summary and the files that come back (at most 8 in $OUT) ----------------------------------------------------
# shellcheck disable=SC2317  # (summarize_verify and finish run from the EXIT trap)
summarize_verify() {
    "${PY:-python3}" - "$RES" "$LOGS" "$IMAGE_THRESHOLD" "$LOGITS_THRESHOLD" <<'PYEOF'
import json, sys
from pathlib import Path
res, logs, ithr, lthr = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4]
combined, rows = {}, []
for tag in ("v1", "v2", "xmodel"):
    f = res / f"verify-{tag}.json"
    try:
        r = json.loads(f.read_text())
    except (OSError, ValueError):
        try:
            said = (logs / f"verify-{tag}.log").read_text(errors="replace").strip().splitlines()[-1]
        except (OSError, IndexError):
            said = "not run"
        rows.append(f"| {tag} | no result: {said} | | | | | | |")
        continue
    combined[tag] = r
    def g(k, fmt="{:.3e}"):
        v = r.get(k)
        return "-" if v is None else (fmt.format(v) if isinstance(v, float) else str(v))
    rows.append(f"| {tag} | {'PASS' if r.get('passed') else 'FAIL'} | {g('image_rel_err')} | {g('logits_rel_err')} | "
                f"{g('top1_agree', '{:.3f}')} | {g('n_image_tokens_llama')} | {g('mm_last_logits_rel_err')} | "
                f"{g('seconds', '{:.1f}')} |")
    for p in r.get("problems", []):
        rows.append(f"|   problem: {p} | | | | | | |")
(res / "verify.json").write_text(json.dumps(combined, indent=2, default=str))
print(f"mvlm verify --runtime cuda (thresholds: image <= {ithr}, logits <= {lthr})\n")
print("| model | verdict | image rel. err | logits rel. err | top-1 | image tokens | mm last-logits rel. err | s |")
print("|---|---|---|---|---|---|---|---|")
print("\n".join(rows))
PYEOF
}

# shellcheck disable=SC2317
finish() {
    local rc=$?
    trap - EXIT
    set +e
    [ "$rc" -ne 0 ] && [ "$FINAL_RC" -eq 0 ] && FINAL_RC=$rc
    # every step must have passed, except the attempts that have a fallback (make venv offline, pip --target)
    if awk -F'\t' 'NR > 1 && $2 != "0" && $1 != "make-venv" && $1 != "wheels" { bad = 1 } END { exit !bad }' \
            "$WORK/timings.tsv"; then
        [ "$FINAL_RC" -eq 0 ] && FINAL_RC=1
    fi
    local s=$RES/summary.txt
    {
        echo "mvlm GPU check, $(date -u +%Y-%m-%dT%H:%M:%SZ), repository $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '(no git)')"
        echo "verdict: $([ "$FINAL_RC" -eq 0 ] && echo PASS || echo "FAIL (exit $FINAL_RC)"), $(( $(date +%s) - T0 )) s in all"
        echo
        echo "== GPU and toolchain"
        cat "$RES/gpu.txt" 2>/dev/null || echo "(no nvidia-smi answer)"
        echo
        echo "== runtime (mvlm runtime build --target cuda --cuda-arch ${ARCH:-?})"
        if [ -f "$RES/runtime-manifest.json" ]; then
            "${PY:-python3}" -c 'import json,sys; m=json.load(open(sys.argv[1])); print("root:", m.get("root")); print("toolchain:", m.get("toolchain")); print("cuda:", m.get("cuda")); print("build seconds:", m.get("build_seconds")); print("patches:", ", ".join(p["name"] + " (" + p["status"] + ")" for p in m.get("patches", []))); print("libraries:", " ".join(m.get("libraries", [])))' "$RES/runtime-manifest.json"
            [ -f "$RES/ldd-ggml-cuda.txt" ] && { echo "libggml-cuda.so links:"; sed 's/^/  /' "$RES/ldd-ggml-cuda.txt"; }
        else
            echo "not built; the last 40 lines of the build log:"
            tail -n 40 "$RES/build.log" 2>/dev/null || tail -n 40 "$LOGS/build.log" 2>/dev/null || echo "(no build log)"
        fi
        echo
        echo "== offload (llama-mtmd-cli -ngl 999 on the tiny V2): what llama.cpp said"
        cat "$RES/offload.txt" 2>/dev/null || echo "(not run)"
        echo
        echo "== verify"
        summarize_verify 2>&1
        for f in bench-lm bench-vlm bench-lm-q4_0; do
            echo
            echo "== $f (mvlm bench -ngl 999, device profile local-cuda)"
            cat "$RES/$f.md" 2>/dev/null || { echo "(no report); the end of its log:"; tail -n 15 "$LOGS/$f.log" 2>/dev/null; }
        done
        echo
        echo "== Python"
        cat "$RES/python.txt" 2>/dev/null || echo "(not set up)"
        echo
        echo "== steps (wall seconds; budget $BUDGET_S s)"
        column -t -s $'\t' "$WORK/timings.tsv" 2>/dev/null || cat "$WORK/timings.tsv"
    } >"$s" 2>&1
    cp "$WORK/timings.tsv" "$RES/timings.tsv"
    tar -C "$WORK" -czf "$WORK/gpu-check.tar.gz" logs results 2>/dev/null
    mkdir -p "$OUT"
    cp "$s" "$OUT/summary.txt"
    for f in $OUT_FILES; do
        if [ -f "$RES/$f" ]; then cp "$RES/$f" "$OUT/$f"; fi
    done
    cp "$WORK/gpu-check.tar.gz" "$OUT/gpu-check.tar.gz"
    echo
    cat "$s"
    echo
    local back=""
    for f in $OUT_FILES; do if [ -f "$OUT/$f" ]; then back="$back $f"; fi; done
    echo "gpu-check: results in $OUT:$back"
    exit "$FINAL_RC"
}
trap finish EXIT

say "work dir $WORK, MVLM_CACHE $MVLM_CACHE, results to $OUT, budget $BUDGET_S s"

# --- 1. the GPU ------------------------------------------------------------------------------------------------------
if ! command -v nvidia-smi >/dev/null; then
    say "nvidia-smi is not on PATH: this script is for a machine with an NVIDIA GPU"
    record gpu 127 0 "no nvidia-smi"
    FINAL_RC=4
    exit 4
fi
if ! STEP_STDOUT=$RES/gpu-query.csv run_step gpu 30 "$LOGS/gpu.log" \
        nvidia-smi --query-gpu=name,driver_version,compute_cap,memory.total --format=csv,noheader; then
    say "nvidia-smi found no GPU (log: logs/gpu.log)"
    FINAL_RC=4
    exit 4
fi
nvidia-smi -q >"$RES/nvidia-smi-q.txt" 2>&1 || true
CAP=$(head -n 1 "$RES/gpu-query.csv" | cut -d, -f3 | tr -d ' ')
ARCH=${CAP/./}
{
    echo "GPU: $(head -n 1 "$RES/gpu-query.csv")   (name, driver, compute capability, memory)"
    echo "GPUs: $(wc -l <"$RES/gpu-query.csv"); building for the first: --cuda-arch $ARCH"
    grep -m 1 "CUDA Version" "$RES/nvidia-smi-q.txt" | sed 's/^ */driver /' || true
    if command -v nvcc >/dev/null; then echo "nvcc: $(command -v nvcc): $(nvcc --version | grep -m 1 release)"; else echo "nvcc: not on PATH"; fi
    echo "cmake: $(cmake --version 2>/dev/null | head -n 1)   ninja: $(ninja --version 2>/dev/null)   cores: $(nproc)"
    if ldconfig -p 2>/dev/null | grep -q 'libcublas\.so'; then
        echo "cuBLAS: $(ldconfig -p | grep -m 1 'libcublas\.so' | sed 's/.*=> //')"
    else
        echo "cuBLAS: not in the loader cache (ggml-cuda links it; the CUDA toolkit's own lib dir may still hold it)"
    fi
} >"$RES/gpu.txt" 2>&1
sed 's/^/  /' "$RES/gpu.txt"

# --- 2. Python -------------------------------------------------------------------------------------------------------
MODULES=(mvlm mvlm_core mvlm_convert mvlm_bench torch numpy gguf llama_cpp diskcache sentencepiece safetensors transformers
         typer rich PIL matplotlib jinja2)
missing_modules() {  # prints the modules $1 cannot find (find_spec: llama_cpp would load a library on import)
    "$1" - "${MODULES[@]}" <<'PYEOF' 2>/dev/null || echo "(the interpreter did not run)"
import importlib.util, sys
print(" ".join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))
PYEOF
}

python_ok() { [ -z "$(missing_modules "$1")" ]; }

setup_python() {
    if [ -x .venv/bin/python ] && python_ok .venv/bin/python; then
        PY=$REPO/.venv/bin/python
        say "python: .venv has everything"
        return 0
    fi
    if [ ! -e .venv ]; then
        # offline, pip fails at its first request; PIP_RETRIES/PIP_DEFAULT_TIMEOUT keep that short
        if run_step make-venv 150 "$LOGS/make-venv.log" env PIP_RETRIES=0 PIP_DEFAULT_TIMEOUT=5 make venv \
                && python_ok .venv/bin/python; then
            PY=$REPO/.venv/bin/python
            return 0
        fi
        say "python: make venv did not give a working .venv (no package registry here?); using this machine's python3"
    else
        say "python: .venv is there but lacks: $(missing_modules .venv/bin/python); using this machine's python3"
    fi
    PY=$(command -v python3 || true)
    if [ -z "$PY" ]; then
        say "python: no python3 on PATH"
        record python 3 0 "no python3"
        FINAL_RC=3
        return 3
    fi
    local site=$WORK/site
    if compgen -G ".whl/*.whl" >/dev/null; then
        rm -rf "$site"
        if ! run_step wheels 120 "$LOGS/wheels.log" "$PY" -m pip install -q --no-index --no-deps --no-compile \
                --no-cache-dir --target "$site" .whl/*.whl; then
            say "python: pip could not install .whl/*.whl; unpacking them as zip files"
            for w in .whl/*.whl; do "$PY" -m zipfile -e "$w" "$site"; done
        fi
    fi
    export PYTHONPATH="$REPO:$site${PYTHONPATH:+:$PYTHONPATH}"
    local miss
    miss=$(missing_modules "$PY")
    if [ -n "$miss" ]; then
        say "python: $PY lacks: $miss"
        say "python: gguf, diskcache and llama_cpp come as wheels from \`scripts/gpu-check.sh --prepare\` (carry .whl);" \
            "the others (PyTorch, NumPy, transformers, ...) must be in this python3 or be carried as wheels in .whl too"
        record python 3 0 "missing: $miss"
        FINAL_RC=3
        return 3
    fi
    say "python: $PY with .whl/ and this repository on PYTHONPATH"
}
setup_python || exit 3
"$PY" - >"$RES/python.txt" 2>&1 <<'PYEOF' || true
import importlib.metadata as md, sys
print("interpreter:", sys.executable, sys.version.split()[0])
for d in ("torch", "numpy", "transformers", "gguf", "llama_cpp_python", "sentencepiece", "safetensors", "typer"):
    try:
        print(f"{d}: {md.version(d)}")
    except md.PackageNotFoundError:
        print(f"{d}: (no metadata)")
PYEOF
MVLM=("$PY" -m mvlm)

# --- 3. the llama.cpp source, then the build (the models are made meanwhile) -------------------------------------------
LCP_V=$("$PY" -c 'from mvlm_core.runtime import LLAMA_CPP_PYTHON_VERSION as v; print(v)')
SRC_DIR=$MVLM_CACHE/src/llama-cpp-python-$LCP_V
if [ ! -f "$SRC_DIR/.mvlm-source.json" ] && [ -f ".whl/llama-cpp-src-$LCP_V.tar.gz" ]; then
    mkdir -p "$MVLM_CACHE/src"
    run_step source 60 "$LOGS/source.log" tar -C "$MVLM_CACHE/src" -xzf ".whl/llama-cpp-src-$LCP_V.tar.gz" || fail
elif [ ! -f "$SRC_DIR/.mvlm-source.json" ]; then
    say "source: no .whl/llama-cpp-src-$LCP_V.tar.gz: mvlm will try to download the sdist (fails without network)"
fi

make_models() {  # 4. tiny checkpoints -> f32 GGUFs (CPU only; runs beside the build)
    local ok=0
    rm -rf "$MODELS"
    mkdir -p "$MODELS"
    run_step tiny-v1 90 "$LOGS/tiny-v1.log" "$PY" -m mvlm_convert.tiny "$MODELS/ckpt-v1" --variant v1 || ok=1
    run_step tiny-v2 90 "$LOGS/tiny-v2.log" "$PY" -m mvlm_convert.tiny "$MODELS/ckpt-v2" --variant v2 || ok=1
    run_step tiny-xmodel 90 "$LOGS/tiny-xmodel.log" "$PY" -c \
        'import sys; from mvlm_convert.families.xmodel import make_tiny_xmodel; print(make_tiny_xmodel(sys.argv[1], factor=4))' \
        "$MODELS/ckpt-xmodel" || ok=1
    local tag name
    for tag in v1 v2 xmodel; do
        name=$(model_name "$tag")
        run_step "convert-$tag" 90 "$LOGS/convert-$tag.log" "${MVLM[@]}" convert "$MODELS/ckpt-$tag" \
            --outdir "$MODELS/gguf-$tag" --outtype f32 --name "$name" || ok=1
    done
    return "$ok"
}
model_name() { case $1 in v1) echo MobileVLM-tiny ;; v2) echo MobileVLM_V2-tiny ;; xmodel) echo Xmodel_VLM-tiny ;; esac; }
lm_of() { echo "$MODELS/gguf-$1/$(model_name "$1")-F32.gguf"; }
mmproj_of() { echo "$MODELS/gguf-$1/mmproj-$(model_name "$1")-F32.gguf"; }

# beside the build: few threads, so nvcc keeps the cores
( export OMP_NUM_THREADS=2 MKL_NUM_THREADS=2; make_models ) &
MODELS_PID=$!

BUILD_CAP=$(( $(left) - 120 ))  # kept for offload, verify and bench (tiny models: seconds each on the CPU build)
[ "$BUILD_CAP" -lt 60 ] && BUILD_CAP=60
BUILT=0
if run_step build "$BUILD_CAP" "$LOGS/build.log" "${MVLM[@]}" runtime build --target cuda --cuda-arch "$ARCH" -j "$(nproc)"; then
    BUILT=1
else
    fail
    say "build: not finished; if it was cut off by the budget, run the script again here: the build resumes"
fi
BLOG=""
for f in "$MVLM_CACHE"/runtime/cuda-*/build.log; do  # the newest: the build just run
    if [ -f "$f" ] && { [ -z "$BLOG" ] || [ "$f" -nt "$BLOG" ]; }; then BLOG=$f; fi
done
if [ -n "$BLOG" ]; then cp "$BLOG" "$RES/build.log"; fi
if [ "$BUILT" = 1 ]; then
    if RT=$("${MVLM[@]}" runtime path --target cuda 2>>"$LOGS/runtime-info.log"); then
        "${MVLM[@]}" runtime info --target cuda >"$RES/runtime-manifest.json" 2>>"$LOGS/runtime-info.log" || true
        ldd "$RT/lib/libggml-cuda.so" 2>&1 | grep -Ei 'cuda|cublas|not found' >"$RES/ldd-ggml-cuda.txt" || true
    else
        BUILT=0
        record runtime-path 1 0 "mvlm runtime path --target cuda found no build"
        fail
    fi
fi

if ! wait "$MODELS_PID"; then fail; say "models: a step failed (see logs/tiny-*.log, logs/convert-*.log)"; fi

# --- 5. offload: the GPU really runs the layers and CLIP ------------------------------------------------------------
if [ "$BUILT" = 1 ] && [ -f "$(lm_of v2)" ]; then
    IMG=$("$PY" -c 'from mvlm_bench.session.runners import default_image; print(default_image())' 2>>"$LOGS/offload.log" || true)
    if run_step offload 60 "$LOGS/offload.log" "$RT/bin/llama-mtmd-cli" -m "$(lm_of v2)" --mmproj "$(mmproj_of v2)" \
            --image "$IMG" -p "What is in the image?" -n 16 --temp 0 -ngl 999 -lv 4; then
        grep -E 'CUDA devices|Device [0-9]+:|offloaded [0-9]+/[0-9]+ layers|CLIP using|using device' "$LOGS/offload.log" \
            | sed 's/^/  /' >"$RES/offload.txt" || true
        if ! grep -q 'CLIP using CUDA' "$RES/offload.txt" || ! grep -Eq 'offloaded ([0-9]+)/\1 layers' "$RES/offload.txt"; then
            echo "  NOT everything is on the GPU (expected 'offloaded N/N layers to GPU' and 'CLIP using CUDA0 backend')" \
                >>"$RES/offload.txt"
            record offload-check 1 0 "layers or CLIP not on the GPU"
            fail
        fi
    else
        fail
        tail -n 20 "$LOGS/offload.log" | sed 's/^/  /' >"$RES/offload.txt"
    fi
fi

# --- 6. verify against PyTorch ---------------------------------------------------------------------------------------
if [ "$BUILT" = 1 ]; then
    for tag in v1 v2 xmodel; do
        if [ ! -f "$(lm_of "$tag")" ]; then
            record "verify-$tag" skipped 0 "no converted model"
            fail
            continue
        fi
        STEP_STDOUT=$RES/verify-$tag.json run_step "verify-$tag" 120 "$LOGS/verify-$tag.log" \
            "${MVLM[@]}" verify "$MODELS/ckpt-$tag" --gguf "$(lm_of "$tag")" --mmproj "$(mmproj_of "$tag")" \
            --runtime cuda --image-threshold "$IMAGE_THRESHOLD" --logits-threshold "$LOGITS_THRESHOLD" --json || fail
    done
fi

# --- 7. bench on the GPU ---------------------------------------------------------------------------------------------
if [ "$BUILT" = 1 ] && [ -f "$(lm_of v2)" ]; then
    PROFILE=$WORK/local-cuda.toml  # `--device local` is the host (CPU) build; this one runs the cuda build
    cat >"$PROFILE" <<EOF
# written by scripts/gpu-check.sh: this machine, the cuda runtime, every layer on the GPU
name = "local-cuda"
description = "this machine with the cuda runtime (mvlm runtime build --target cuda)"
transport = "local"
workdir = "$WORK/device"
target = "cuda"
n_gpu_layers = 999
EOF
    cp "$PROFILE" "$RES/local-cuda.toml"
    run_step bench-lm 90 "$LOGS/bench-lm.log" "${MVLM[@]}" bench --device "$PROFILE" --protocol lm \
        --model "$(lm_of v2)" -ngl 999 --repeat 3 --json "$RES/bench-lm.json" --markdown "$RES/bench-lm.md" || fail
    run_step bench-vlm 90 "$LOGS/bench-vlm.log" "${MVLM[@]}" bench --device "$PROFILE" --protocol vlm \
        --model "$(lm_of v2)" --mmproj "$(mmproj_of v2)" -ngl 999 --repeat 3 \
        --json "$RES/bench-vlm.json" --markdown "$RES/bench-vlm.md" || fail
    if [ "$(left)" -gt 60 ]; then  # q4_0: the quantized kernels real models use (mvlm quantize needs the host build)
        Q4=$MODELS/gguf-v2/$(model_name v2)-Q4_0.gguf
        if run_step quantize-q4_0 30 "$LOGS/quantize-q4_0.log" "$RT/bin/llama-quantize" "$(lm_of v2)" "$Q4" q4_0; then
            run_step bench-lm-q4_0 60 "$LOGS/bench-lm-q4_0.log" "${MVLM[@]}" bench --device "$PROFILE" --protocol lm \
                --model "$Q4" -ngl 999 --repeat 3 --json "$RES/bench-lm-q4_0.json" --markdown "$RES/bench-lm-q4_0.md" || fail
        else
            fail
        fi
    else
        say "bench-lm-q4_0: left out (optional; too little of the time budget left)"
    fi
fi

exit "$FINAL_RC"
