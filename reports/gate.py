"""The CI gate: compare a run's results against the committed baseline (``reports/baseline.json``).

Fails when
- the results were not produced by the code in this working tree (code hash), or a file cannot be read;
- a row that was green in the baseline is red now (its comparisons failed *or* its test failed/errored), or is
  missing; a mutation row is no longer caught; a row new to this run is red; a test failed or errored;
- a row made fewer comparisons than in the baseline (108 → 1 is not the same row any more);
- a row's max difference grew more than ``GROWTH`` times beyond the baseline (plus ``FLOOR``) while still inside its
  tier — a regression worth seeing before it crosses the tier;
- a recorded section (the released-size runs, ``reports/results-released*.json``) that the baseline holds is
  missing, or any of its rows changed in the same ways;
- a test skipped that the baseline does not list as an expected skip (``skipped``: node id -> reason, written by
  ``--update``): a test that starts skipping is a check that stopped running. A baseline written before skips were
  listed (no ``skipped`` key) is one problem line saying to re-run ``--update`` after checking the skips;
- a CUDA run (gated on itself) whose ``cuda``-marked tests did not run (all skipped, or not recorded).

``--update`` rewrites the baseline from the current results, and refuses to when any row is red or any test
failed: a baseline holds only what passed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from impl.outfile import OutputError, check_output, write_text

from .results import ROOT, ResultsError, RunResults, check_fresh, load, marker_not_run, read_json

GROWTH = 10.0
FLOOR = 1e-9
SCHEMA = 3  # 3: the expected skips (``skipped``)


def _rows(run: RunResults) -> dict[str, dict[str, Any]]:
    out = {}
    for g in run.rows():
        m = g.max_abs
        out[g.key] = {"ok": g.ok, "expect_fail": g.expect_fail, "n": g.n, "compares": g.compares,
                      "max_abs": m if m is not None and math.isfinite(m) else None}
    return out


def run_kind(run: RunResults) -> str:
    """"cpu float32", "cuda bfloat16", …: the device and dtype a run's impl side ran in."""
    dev = str(run.provenance.get("device") or "cpu")
    return f"{'cuda' if dev.startswith('cuda') else dev} {run.provenance.get('dtype') or 'float32'}"


def is_device_run(run: RunResults) -> bool:
    return run_kind(run) != "cpu float32"


def skipped_tests(run: RunResults) -> dict[str, str]:
    """The tests this run skipped, with their reasons."""
    return {t: run.skipped.get(t, "") for t, o in run.tests.items() if o == "skipped"}


def skip_problems(run: RunResults, baseline: dict[str, Any]) -> list[str]:
    """One line per test that skipped now but is not an expected skip of the baseline."""
    expected = baseline.get("skipped")
    if not isinstance(expected, dict):
        return ["the baseline lists no expected skips (written before skips were gated): check this run's skipped "
                "tests, then record them with `python -m reports gate --update`"]
    return [f"test {t} skipped, not an expected skip in the baseline (reason: {why or 'not recorded'}); if "
            f"expected, record it with `python -m reports gate --update`"
            for t, why in skipped_tests(run).items() if t not in expected]


def baseline_from(run: RunResults, sections: list[RunResults] | None = None) -> dict[str, Any]:
    return {"schema": SCHEMA, "provenance": run.provenance, "rows": _rows(run), "skipped": skipped_tests(run),
            "sections": {s.source: {"git_sha": s.provenance.get("git_sha", ""), "created": s.created,
                                    "rows": _rows(s)} for s in sections or []}}


def _ok(b: dict) -> bool:
    if "ok" in b:
        return bool(b["ok"])
    # schema 1 baselines stored whether the comparisons passed; a mutation row is green when they did not
    return not b.get("passed") if b.get("expect_fail") else bool(b.get("passed"))


def _check_rows(now: dict[str, dict], base: dict[str, dict], where: str = "") -> list[str]:
    pre = f"{where}: " if where else ""
    problems = []
    for key, b in base.items():
        n = now.get(key)
        if n is None:
            problems.append(f"{pre}{key}: in the baseline but not measured in this run")
            continue
        if b.get("expect_fail"):
            if not n["ok"]:
                problems.append(f"{pre}{key}: mutation no longer caught (or its test failed)")
        elif _ok(b) and not n["ok"]:
            problems.append(f"{pre}{key}: passed in the baseline, fails now")
        elif b.get("max_abs") is not None and n["max_abs"] is not None and n["max_abs"] > GROWTH * b["max_abs"] + FLOOR:
            problems.append(f"{pre}{key}: max diff {n['max_abs']:.3g} grew over {GROWTH:g}× the baseline "
                            f"{b['max_abs']:.3g}")
        if isinstance(b.get("n"), int) and n["n"] < b["n"]:
            problems.append(f"{pre}{key}: {n['n']} comparisons, {b['n']} in the baseline (a row that compares less "
                            f"is not the row the baseline passed)")
    for key, n in now.items():
        if key not in base and not n["ok"]:
            problems.append(f"{pre}{key}: red (not in the baseline)")
    return problems


# A measured number that must be finite whatever the comparison concluded; snr_db, max_rel and needed_rtol are +inf
# legitimately (an exact match; a nonzero difference where the reference is 0), but never NaN.
FINITE_FIELDS = ("max_abs", "mean_abs", "nmse", "cosine", "needed_atol")
NOT_NAN_FIELDS = ("max_rel", "snr_db", "needed_rtol")


def nonfinite_problems(run: RunResults, where: str = "") -> list[str]:
    """Rows holding a NaN/Inf number, whatever their ``passed`` says (a hand-edited or corrupted results file could
    say ``"passed": true`` beside ``"max_abs": NaN``). A deliberate bug that made its row fail (a caught mutation) may
    legitimately measure Inf/NaN and is left alone."""
    pre = f"{where}: " if where else ""
    out = []
    for g in run.rows():
        for r in g.results:
            if g.expect_fail and not r.passed:
                continue
            bad = [f"{k}={getattr(r, k)}" for k in FINITE_FIELDS
                   if isinstance(getattr(r, k, 0.0), float) and not math.isfinite(getattr(r, k))]
            bad += [f"{k}=nan" for k in NOT_NAN_FIELDS
                    if isinstance(getattr(r, k, 0.0), float) and math.isnan(getattr(r, k))]
            if bad:
                out.append(f"{pre}{g.key}: {r.name} has non-finite numbers ({', '.join(bad)}) "
                           f"though marked {'passed' if r.passed else 'failed'}; refused")
                break  # one line per row
    return out


def check(run: RunResults, baseline: dict[str, Any], sections: list[RunResults] | None = None) -> list[str]:
    problems = _check_rows(_rows(run), baseline["rows"])
    problems += nonfinite_problems(run)
    have = {s.source: s for s in sections or []}
    for src, b in (baseline.get("sections") or {}).items():
        s = have.get(src)
        if s is None:
            problems.append(f"{src}: recorded section in the baseline, but the file was not given or not found")
            continue
        problems += _check_rows(_rows(s), b.get("rows", {}), src)
        problems += nonfinite_problems(s, src)
    bad_tests = [f"{t} {o}" for t, o in run.tests.items() if o not in ("passed", "skipped")]
    problems += [f"test {t}" for t in bad_tests]
    problems += skip_problems(run, baseline)
    return problems


def _read_baseline(path: Path) -> dict[str, Any]:
    """The baseline as a dict; any problem is one ResultsError line naming the file."""
    b = read_json(path, str(path), "baseline missing; create it with `python -m reports gate --update`",
                  "baseline is empty; recreate it with `python -m reports gate --update`", "baseline is ")
    if not isinstance(b, dict) or not isinstance(b.get("rows"), dict):
        got = type(b).__name__ if not isinstance(b, dict) else f"'rows' is {type(b.get('rows')).__name__}"
        raise ResultsError(f"{path}: not a baseline (expected an object with a 'rows' object; got {got})")
    for key, row in b["rows"].items():
        if not isinstance(row, dict):
            raise ResultsError(f"{path}: baseline row {key!r} is {type(row).__name__}, not an object")
    return b


def gate(results: Path, baseline: Path, update: bool = False, also: list[Path] | None = None,
         root: Path | None = None) -> int:
    """0: no problems; 1: problems (listed); 2: a file could not be used (one line naming it)."""
    try:
        if update:  # the output first: a baseline that cannot be written is said before anything is read
            check_output(baseline)
        run = load(results)
        check_fresh(run, root or ROOT)
        sections = [load(p, p.name) for p in also or []]  # keyed by file name in the baseline
        base = None if update else _read_baseline(baseline)
    except (ResultsError, OutputError) as e:
        print(f"gate: {e}")
        return 2
    if not run.records:
        print(f"gate: {results}: the run recorded no comparisons (pytest exit status "
              f"{run.summary.get('exitstatus', '?')})")
        return 2
    if is_device_run(run):
        # A CUDA or bf16 run (``./run.sh test --device cuda``): the baseline holds the CPU fp32 rows, which such a
        # run does not reproduce; it is gated on itself: no red row, no failed test.
        if update:
            print(f"gate: {results} is a {run_kind(run)} run; the baseline holds the CPU fp32 run only")
            return 2
        red = [f"{g.key}: red" for g in run.rows() if not g.ok]
        red += nonfinite_problems(run)
        red += [f"test {t} {o}" for t, o in run.tests.items() if o not in ("passed", "skipped")]
        if run_kind(run).startswith("cuda") and (why := marker_not_run(run, "cuda")):
            red.append(f"CUDA run: {why}")
        s = run.summary
        print(f"gate: {run_kind(run)} run: {s['passed']} passed, {s['failed']} failed, {s.get('errors', 0)} errors, "
              f"{s['skipped']} skipped; {len(run.rows())} rows, {len(red)} problem(s)")
        for p in red:
            print(f"  - {p}")
        return 1 if red or s["failed"] or s.get("errors") else 0
    if update:
        red = [g.key for r in [run, *sections] for g in r.rows() if not g.ok]
        red += [p for r in [run, *sections] for p in nonfinite_problems(r, r.source if r is not run else "")]
        red += [f"test {t} {o}" for t, o in run.tests.items() if o not in ("passed", "skipped")]
        if red:
            print(f"gate: refusing to update {baseline}: {len(red)} red row(s) or failed test(s) would become the "
                  f"baseline: " + "; ".join(red[:10]) + (" …" if len(red) > 10 else ""))
            return 1
        try:  # atomic: on a full disk the old baseline stays byte for byte (impl/outfile.py)
            write_text(baseline, json.dumps(baseline_from(run, sections), indent=1, sort_keys=True))
        except OutputError as e:
            print(f"gate: {e}")
            return 2
        print(f"gate: wrote {baseline} ({len(run.records)} comparisons in {len(run.rows())} rows, "
              f"{len(skipped_tests(run))} expected skip(s), {len(sections)} recorded section(s))")
        return 0
    problems = check(run, base, sections)
    s = run.summary
    print(f"gate: {s['passed']} passed, {s['failed']} failed, {s.get('errors', 0)} errors, {s['skipped']} skipped; "
          f"{len(base['rows'])} baseline rows and {len(base.get('sections') or {})} recorded section(s) checked, "
          f"{len(problems)} problem(s)")
    for p in problems:
        print(f"  - {p}")
    return 1 if problems or s["failed"] or s.get("errors") else 0
