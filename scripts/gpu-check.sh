#!/usr/bin/env bash
# The one prepared script for a lent CUDA machine (see README "On a CUDA machine"): the default test selection on
# CUDA in fp32 (TF32 off) and in bf16, each gated on itself, then the speed benchmark at 0.6b dimensions. Everything
# it writes that is worth committing is copied to $OUT (the device tool brings that folder back):
#   reports/results-cuda.json, reports/results-cuda-bfloat16.json, reports/bench-cuda-0.6b.json, logs.
# Offline machines with another torch: put the wheels named in README "On a CUDA machine" in .whl/ first.
# Usage: OUT=/some/dir bash scripts/gpu-check.sh [--skip-bench]
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-reports/gpu-run}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$HOME/site" .whl/*.whl 2>&1 | tail -3
    export PYTHONPATH="$HOME/site${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PY" - <<'PY' | tee "$OUT/env.txt"
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(0))
for pkg in ("transformers", "qwen_tts", "h5py", "librosa"):
    try:
        m = __import__(pkg)
        print(pkg, getattr(m, "__version__", "?"))
    except Exception as e:  # noqa: BLE001 - an environment probe: report and go on
        print(pkg, "MISSING:", e)
PY
SEL="not slow and not benchmark and not install"
status=0
for dtype in float32 bfloat16; do
    suffix=$([ "$dtype" = float32 ] && echo "" || echo "-$dtype")
    results="reports/results-cuda$suffix.json"
    start=$(date +%s)
    "$PY" -m pytest -q parity_tests --device cuda --dtype "$dtype" -m "$SEL" -p no:cacheprovider \
        --results="$results" >"$OUT/pytest-cuda$suffix.log" 2>&1
    echo "pytest cuda $dtype: exit $? in $(( $(date +%s) - start )) s; $(tail -1 "$OUT/pytest-cuda$suffix.log")"
    "$PY" -m reports gate --results "$results" 2>&1 | tee "$OUT/gate-cuda$suffix.txt" | head -40 || status=1
    cp "$results" "$OUT/" 2>/dev/null
    grep -E "^(FAILED|ERROR)" "$OUT/pytest-cuda$suffix.log" | head -40
done
if [ "${1:-}" != "--skip-bench" ]; then
    ck=${QWEN3TTS_CACHE:-.cache}/gpu-ck-0.6b-custom_voice
    [ -f "$ck/synth.json" ] || "$PY" -m reference_export synth --preset 0.6b --variant custom_voice --out "$ck" --force \
        >"$OUT/synth.log" 2>&1
    for dtype in float32 bfloat16; do
        "$PY" -m reference_export bench --model "$ck" --device cuda --dtype "$dtype" --frames 200 --batch 1,8,16 \
            --json reports/bench-cuda-0.6b.json 2>&1 | tee -a "$OUT/bench.log" | tail -25
    done
    cp reports/bench-cuda-0.6b.json "$OUT/" 2>/dev/null
fi
exit $status
