"""The "Capture at released sizes (recorded)" section of VALIDATION.md: ``reports/capture-released.json`` as
recorded by ``python -m reference_export measure-capture`` (reference_export/measure_capture.py), with its
provenance and the freshness flag the benchmark section uses (``reports.perf._stale_line``), over the code a capture
measurement runs (``CAPTURE_MEASURED_PATHS``). Nothing here re-runs
a capture or judges a timing; the peak-RSS budget (issue 16: peak ≤ 1.3× the weights in the capture dtype) is
shown as measured against it, and the configurations of the grid that have no measurement are listed as such.
A file or run that cannot be read is shown in one line naming the file and the key at fault.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tabulate import tabulate

from .perf import REPORTS, _fmt, _stale_line, shown_command

FILE = "capture-released.json"
# The code a capture measurement runs: reference_export/ (measure-capture and its `capture --request` child) and the
# impl/ modules those two processes import (config parsing, weight loading, prompt building, output files; the CPU
# line comes from impl/bench.py). Upstream computes the capture, so impl's codec, speaker encoder and tokenizer never
# load there, and a change to them leaves a capture row fresh. A module added to either process's imports and not
# listed here fails parity_tests/test_capture_released.py::test_capture_measured_paths_cover_its_imports (a tiny
# measure-capture run with Python's import log).
CAPTURE_IMPL_MODULES = ("__init__", "audio", "bench", "code_predictor", "config", "fast_decode", "generate",
                        "kv_cache", "layers", "loading", "model", "outfile", "progress", "prompt", "sampling",
                        "talker", "taps")
CAPTURE_MEASURED_PATHS = ("reference_export", *(f"impl/{m}.py" for m in CAPTURE_IMPL_MODULES))
# The grid issue 16 asks for: each preset × dtype, with all taps and with --taps for one talker layer.
GRID = [(p, d, t) for p in ("0.6b", "1.7b") for d in ("float32", "bfloat16") for t in ("all", "one layer")]
HEADERS = ["preset", "dtype (codec)", "taps", "frames ran / asked (stop)", "wall time", "peak RSS GB",
           "weights GB", "peak ÷ weights", "file MB", "tap calls"]


def _gb(b: Any) -> str:
    return "n/a" if b is None else f"{b / 1e9:.2f}"


def _wall(s: Any) -> str:
    if not isinstance(s, (int, float)):
        return "n/a"
    m, sec = divmod(int(round(s)), 60)
    return f"{m} min {sec:02d} s" if m else f"{sec} s"


def _taps(r: dict[str, Any]) -> str:
    t = r.get("taps") or []
    return "all" if not t else ", ".join(f"`{g}`" for g in t)


def _row(r: dict[str, Any]) -> list[str]:
    ratio, budget = r["peak_over_weights"], r.get("budget", 1.3)
    verdict = "within" if ratio <= budget else "**over**"
    frames = r["frames_ran"]
    stop = sorted(set(r.get("stop_reason") or []))
    return [r["preset"], f"{r['dtype']} ({r.get('codec_dtype', '?')})", _taps(r),
            f"{', '.join(map(str, frames))} / {r['frames_requested']} ({', '.join(stop) or '?'})", _wall(r["wall_s"]),
            _gb(r["peak_rss_bytes"]), _gb(r["weights_bytes"]), f"{ratio:.2f}× ({verdict} {budget}×)",
            f"{r['output_bytes'] / 1e6:.1f}", _fmt(r.get("tap_calls_written"))]


def _provenance_line(r: dict[str, Any]) -> str:
    p = r.get("provenance") or {}
    ck = p.get("checkpoint") or {}
    sha = str(p.get("git") or "?")
    sha = sha[:10] + ("+dirty" if sha.endswith("+dirty") else "")
    kind = (f"synthetic checkpoint (random weights, {ck.get('preset', '?')} {ck.get('variant', '?')} layout)"
            if ck.get("synthetic") else "real checkpoint" if ck else "checkpoint kind not recorded")
    bits = [f"{r.get('preset')} {r.get('dtype')} taps {_taps(r)}: measured {p.get('date_utc', '?')} at `{sha}`", kind,
            f"{p.get('cpu', '?')}, {p.get('cores', '?')} cores, {_fmt(p.get('mem_total_gb'), 1)} GB",
            f"load average {_fmt(p.get('load_average_1m'))} before, {_fmt(p.get('load_average_1m_after'))} after",
            f"torch {p.get('torch', '?')}", f"transformers {p.get('transformers', '?')}",
            f"qwen-tts {p.get('qwen_tts', '?')}"]
    note = f" Note: {p['note']}" if p.get("note") else ""
    return "- " + "; ".join(bits) + f"; `{shown_command(str(p.get('command', '?')))}`{note}"


def capture_perf_section(folder: Path | None = None, root: Path | None = None) -> list[str]:
    """Markdown lines for ``capture-released.json`` in ``folder`` (default: ``reports/``); none when absent."""
    f = (folder or REPORTS) / FILE
    if not f.exists():
        return []
    lines = ["## Capture at released sizes (recorded)", "",
             f"Recorded by `python -m reference_export measure-capture` into `reports/{FILE}`, shown as recorded and "
             "not re-run here. Each row is one `python -m reference_export capture --request` of a custom_voice "
             "request (greedy, upstream qwen-tts, CPU) run in a child process: *wall time* is that child's (load, "
             "generation with every tap streamed to HDF5, codec decode, write; the talker's weights are freed once "
             "upstream's `generate` has returned the codes, since the codec decode that follows never reads them); "
             "*peak RSS* is its `ru_maxrss` (the "
             "embedding tables are mapped, so their rows count once a lookup has read them); *weights* are the bytes of the tensors as that capture holds them (talker in the capture dtype, the "
             "codec in its own, from the safetensors headers), and the budget is peak ≤ 1.3× weights. *file* is "
             "the capture's size (deleted after measuring). Frames are forced with `--max-new-frames`; a synthetic "
             "checkpoint may stop at EOS earlier, and the frames column says how many ran. Timings are from a "
             "shared machine: the load average says how busy it was.", ""]
    try:
        data = json.loads(f.read_text())
        runs = data["runs"]
        if not isinstance(runs, list):
            raise TypeError("'runs' is not a list")
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        return lines + [f"- ⚠️ `{f.name}`: unreadable ({type(e).__name__}: {e}); not shown", ""]
    rows, provs, seen = [], [], set()
    for i, r in enumerate(runs):
        try:
            rows.append(_row(r))
            seen.add((r["preset"], r["dtype"], "all" if not r.get("taps") else "one layer"))
        except (KeyError, TypeError, AttributeError) as e:
            lines.append(f"- ⚠️ `{f.name}`: run {i} lacks key {e}; not shown")
            continue
        provs.append(_provenance_line(r))
        stale = _stale_line(r.get("provenance") or {}, root, CAPTURE_MEASURED_PATHS)
        if stale:
            provs.append(stale)
    if rows:
        lines += [tabulate(rows, headers=HEADERS, tablefmt="github", disable_numparse=True), ""]
    missing = [f"{p} {d} ({t})" for p, d, t in GRID if (p, d, t) not in seen]
    if missing:
        lines += [f"- **Not measured:** {', '.join(missing)}.", ""]
    lines += provs + [""]
    return lines
