"""The "Performance" section of VALIDATION.md: the last recorded ``reports/bench-<device>-<preset>.json`` files
(written by ``python -m reference_export bench``), shown as recorded, with their provenance. Nothing here re-runs or judges a
timing: speed is measured, never asserted. A file or run that cannot be read is shown as such, in one line naming
the file and the key at fault, never skipped silently.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from tabulate import tabulate

from .results import freshness

REPORTS = Path(__file__).resolve().parent


def _fmt(x: Any, nd: int = 2) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, bool):
        return "yes" if x else "**no**"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


# An absolute path in a recorded command is the measuring machine's own folder: shown as <path> (the report is read
# on other machines, and the folder's name says nothing the checkpoint line does not).
_ABS_PATH = re.compile(r"(?<![\w.<])/[^\s'\"]+")


def shown_command(cmd: str) -> str:
    return _ABS_PATH.sub("<path>", cmd)


def _checkpoint_words(p: dict[str, Any]) -> str:
    """What the benchmark ran on: a synthetic checkpoint (random weights, released layout) or real weights. Older
    files did not record it."""
    ck = p.get("checkpoint")
    if not isinstance(ck, dict):
        return "checkpoint kind not recorded"
    if ck.get("synthetic"):
        return f"synthetic checkpoint (random weights, {ck.get('preset', '?')} {ck.get('variant', '?')} layout)"
    return f"real checkpoint ({ck.get('variant', '?')})"


# What a recorded bench or capture measurement measures: the engine and the harness's drivers (capture, bench,
# upstream loader), not the tests or the report code, which run no part of it. A run recorded before the last change
# to these is flagged stale (the parity sections also watch parity_tests/, conftest.py, reports/compare.py).
TOOL_MEASURED_PATHS = ("impl", "reference_export")


def _stale_line(p: dict[str, Any], root: Path | None, paths: tuple[str, ...] = TOOL_MEASURED_PATHS) -> str:
    """The freshness check the recorded sections get: flagged when the measured code (``paths``, by default
    ``TOOL_MEASURED_PATHS``) changed after the sha."""
    sha = str(p.get("git") or "").removesuffix("+dirty")
    f = freshness(sha, str(p.get("date_utc", "")), paths=paths, **({"root": root} if root else {}))
    dirty = " (measured on a tree with uncommitted changes)" if str(p.get("git") or "").endswith("+dirty") else ""
    if f.stale:
        return f"  - **⚠️ Possibly stale:** measured at `{sha[:10] or '?'}`{dirty}, but {f.stale}"
    return f"  - measured at the code in this tree{dirty}" if dirty else ""


def _provenance_line(p: dict[str, Any]) -> str:
    hw = p.get("gpu") or p.get("cpu", "?")
    sha = str(p.get("git") or "?")
    sha = sha[:10] + ("+dirty" if sha.endswith("+dirty") else "")
    bits = [f"measured {p.get('date_utc', '?')} at `{sha}`", _checkpoint_words(p), f"{hw}",
            f"{p.get('torch_threads', '?')} torch threads (load average {_fmt(p.get('load_average_1m'))})",
            f"torch {p.get('torch', '?')}", f"qwen-tts {p.get('qwen_tts', '?')}",
            f"warm-up {p.get('warmup', '?')}, median of {p.get('repeats', '?')}",
            f"read bandwidth {_fmt(p.get('read_bandwidth_gbs'))} GB/s"]
    return "- " + "; ".join(bits) + f"; `{shown_command(str(p.get('command', '?')))}`"


def _row(r: dict[str, Any]) -> list[str]:
    o, u, ratios = r["ours"], r.get("upstream") or {}, r.get("ratios") or {}
    eager = r.get("ours_eager_loop") or {}
    fa = [o.get(f"first_audio_ms_chunk{c}") for c in (1, 8)]
    fa = "n/a" if all(x is None for x in fa) else " / ".join(_fmt(x, 0) for x in fa)
    step = str(r.get("fast_mode", "?")) + ("" if r.get("linear", "aten") == "aten" else f", linear {r['linear']}")
    return [r["dtype"], str(r["batch"]), str(r["frames"]), step, _fmt(o["frames_per_s"]), _fmt(eager.get("frames_per_s")),
            _fmt(u.get("frames_per_s")), _fmt(ratios.get("frames_per_s_ours_over_upstream")) + "×" if ratios else "n/a",
            _fmt(o.get("rtf"), 3), fa, f"{_fmt(o.get('peak_mem_gb'))} / {_fmt(u.get('peak_mem_gb'))}"
            + (" (profiler included)" if "profiler included" in str(o.get("peak_mem_note", "")) else ""),
            _fmt(o.get("x_read_floor")) + "×" if o.get("x_read_floor") is not None else "n/a",
            _fmt(r.get("codes_equal")), _fmt(r.get("fast_equals_eager"))]


HEADERS = ["dtype", "batch", "frames", "static step", "ours frames/s", "ours eager loop", "upstream frames/s", "ours/upstream",
           "RTF ours", "first audio ms (1/8-frame chunk)", "peak GB ours / upstream", "× read floor",
           "codes = upstream", "static = eager loop"]


def performance_section(folder: Path | None = None, root: Path | None = None) -> list[str]:
    """Markdown lines for every ``bench-*.json`` in ``folder`` (default: ``reports/``); none when there are none."""
    files = sorted((folder or REPORTS).glob("bench-*.json"))
    if not files:
        return []
    lines = ["## Performance (recorded benchmarks)", "",
             "Recorded by `python -m reference_export bench` (or `./run.sh bench`), shown as recorded and not re-run here; "
             "timings are never asserted by a test. *frames/s* is aggregate over the batch (greedy, both sides the "
             "same folder, text and settings); *RTF* is compute seconds per second of audio (12.5 frames/s; below 1 "
             "is faster than real time); *first audio* is prompt + prefill + the chunk's frames + its codec decode; "
             "peak memory is CUDA `max_memory_allocated`, or on CPU the peak growth of the process RSS over the "
             "side's load and runs; *× read floor* is the time per frame over (weight bytes one frame reads ÷ the "
             "read bandwidth measured in the same run). A number measured on a busy shared machine says so in its "
             "load average.", ""]
    for f in files:
        lines += [f"### `{f.name}`", ""]
        try:
            data = json.loads(f.read_text())
            runs = data["runs"]
            rows, provs = [], []
            for i, r in enumerate(runs):
                try:
                    rows.append(_row(r))
                except KeyError as e:
                    lines.append(f"- ⚠️ `{f.name}`: run {i} lacks key {e}; not shown")
                    continue
                p = r.get("provenance") or data.get("provenance") or {}
                if p not in provs:
                    provs.append(p)
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            lines += [f"- ⚠️ `{f.name}`: unreadable ({type(e).__name__}: {e}); not shown", ""]
            continue
        for p in provs:
            lines.append(_provenance_line(p))
            stale = _stale_line(p, root)
            if stale:
                lines.append(stale)
        lines.append("")
        if rows:
            lines += [tabulate(rows, headers=HEADERS, tablefmt="github"), ""]
        else:
            lines += [f"- ⚠️ `{f.name}`: no readable run", ""]
    return lines
