"""The CI gate: compare a run's results against the committed baseline (``reports/baseline.json``).

Fails when a row that passed in the baseline fails now or is missing, or when a row's max difference grew more
than ``GROWTH`` times beyond the baseline (plus ``FLOOR``) while still inside its tier — a regression worth
seeing before it crosses the tier. ``--update`` rewrites the baseline from the current results.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from .render import group_rows

GROWTH = 10.0
FLOOR = 1e-9


def baseline_from(data: dict) -> dict:
    rows = {}
    for g in group_rows(data):
        key = f"{g['component']} · {g['row']} · {g['preset']}"
        rows[key] = {"passed": g["passed"], "expect_fail": g["expect_fail"],
                     "max_abs": g["max_abs"] if math.isfinite(g["max_abs"]) else None}
    return {"provenance": data["provenance"], "rows": rows}


def check(data: dict, baseline: dict) -> list[str]:
    now = baseline_from(data)["rows"]
    problems = []
    for key, b in baseline["rows"].items():
        n = now.get(key)
        if n is None:
            problems.append(f"{key}: in the baseline but not measured in this run")
            continue
        if b["expect_fail"]:
            if n["passed"]:
                problems.append(f"{key}: mutation no longer caught")
            continue
        if b["passed"] and not n["passed"]:
            problems.append(f"{key}: passed in the baseline, fails now")
        elif b["max_abs"] is not None and n["max_abs"] is not None and n["max_abs"] > GROWTH * b["max_abs"] + FLOOR:
            problems.append(f"{key}: max diff {n['max_abs']:.3g} grew over {GROWTH:g}× the baseline {b['max_abs']:.3g}")
    return problems


def gate(results: Path, baseline: Path, update: bool = False) -> int:
    try:
        data = json.loads(results.read_text())
    except (FileNotFoundError, json.JSONDecodeError) as e:
        print(f"gate: {results}: cannot read results ({e})")
        return 2
    if update:
        baseline.write_text(json.dumps(baseline_from(data), indent=1, sort_keys=True))
        print(f"gate: wrote {baseline} ({len(data['rows'])} comparisons)")
        return 0
    if not baseline.exists():
        print(f"gate: {baseline} missing; create it with `python -m reports gate --update`")
        return 2
    problems = check(data, json.loads(baseline.read_text()))
    s = data["summary"]
    print(f"gate: {s['passed']} passed, {s['failed']} failed, {s['skipped']} skipped; "
          f"{len(json.loads(baseline.read_text())['rows'])} baseline rows checked, {len(problems)} problem(s)")
    for p in problems:
        print(f"  - {p}")
    return 1 if problems or s["failed"] else 0
