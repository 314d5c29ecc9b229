#!/usr/bin/env bash
# One entry point for the README's commands. Each sets up what it needs in ./.venv (pinned, from
# requirements.lock) the first time, and again whenever requirements.lock changes.
#   ./run.sh report [--preset tiny] [pytest args…]  build synthetic checkpoints, capture upstream references,
#                                                   run the parity suite, write reports/VALIDATION.md
#   ./run.sh test [pytest args…]                    the default test suite (what CI runs), then the CI gate;
#                                                   on a GPU: ./run.sh test --device cuda [--dtype bfloat16]
#   ./run.sh bench --model DIR [bench args…]        speed: ours vs upstream on one folder (python -m reference_export bench)
#   ./run.sh setup                                  only create/refresh the virtualenv
set -euo pipefail
cd "$(dirname "$0")"
VENV=${QWEN3TTS_VENV:-.venv}
PY="$VENV/bin/python"
# QWEN3TTS_PYTHON=/path/to/python: use that interpreter as it is and skip the setup (a CUDA machine whose image
# brings its own torch, offline; see README "On a CUDA machine").
[ -n "${QWEN3TTS_PYTHON:-}" ] && PY=$QWEN3TTS_PYTHON

# pip on these machines warns about every absent local index folder; keep real messages only.
quiet() { grep -v "is ignored: it is neither a file nor a directory" || true; }

setup() {
    [ -n "${QWEN3TTS_PYTHON:-}" ] && return 0
    local stamp="$VENV/.requirements.lock"
    if [ -x "$PY" ] && cmp -s requirements.lock "$stamp"; then return 0; fi
    local base=${PYTHON:-python3}
    "$base" -c 'import sys; assert sys.version_info[:2] >= (3, 11), sys.version' \
        || { echo "run.sh: need Python >= 3.11 (set PYTHON=/path/to/python3.11)" >&2; exit 2; }
    echo "run.sh: setting up $VENV (one time, about a minute)…" >&2
    [ -x "$PY" ] || "$base" -m venv "$VENV"
    "$PY" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
    # torch==2.13.0 is the first line of the lock: pinned so pip never pulls a multi-GB CUDA build.
    "$PY" -m pip install -q -r requirements.lock 2>&1 | quiet
    # Upstream reference package without its dependency list (gradio, torchaudio, accelerate are not used by
    # the 12 Hz path; the modules it does import are in requirements.lock). See README "Why --no-deps".
    "$PY" -m pip install -q --no-deps qwen-tts==0.1.1 2>&1 | quiet
    cp requirements.lock "$stamp"
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
    setup) setup ;;
    report) setup; exec "$PY" -m reports run "$@" ;;
    bench) setup; exec "$PY" -m reference_export bench "$@" ;;
    test)
        setup
        "$PY" -m ruff check --quiet . || { echo "run.sh: ruff found problems (see above)" >&2; exit 1; }
        # The results file this run writes (conftest.results_path): reports/results.json for CPU fp32, gated
        # against the baseline; reports/results-cuda[-bfloat16].json etc. for other devices/dtypes, gated on
        # themselves. An explicit --results wins.
        device=cpu dtype=float32 results=""
        prev=""
        for a in "$@"; do
            case "$prev" in --device) device=$a ;; --dtype) dtype=$a ;; --results) results=$a ;; esac
            case "$a" in --device=*) device=${a#--device=} ;; --dtype=*) dtype=${a#--dtype=} ;;
                         --results=*) results=${a#--results=} ;; esac
            prev=$a
        done
        if [ -z "$results" ]; then
            results=$("$PY" -c 'import sys; from conftest import results_path; print(results_path(sys.argv[1], sys.argv[2]))' "$device" "$dtype")
        fi
        "$PY" -m pytest -q "$@"
        exec "$PY" -m reports gate --results "$results"
        ;;
    *) echo "usage: ./run.sh {report|test|bench|setup} [args…]" >&2; exit 2 ;;
esac
