"""reports: typed results, rendering and the CI gate — a report that cannot say more than the run showed.

Each test names the issue-9 item it guards (row status, provenance, freshness, the gate's failure modes).
"""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import conftest
from reports.compare import CompareResult, compare
from reports.gate import baseline_from, check, gate
from reports.render import render, render_markdown
from reports.results import (
    FORMULA,
    OURS,
    UPSTREAM,
    Record,
    ResultsError,
    RunResults,
    code_hash,
    freshness,
    load,
)

ROOT = Path(__file__).resolve().parent.parent


def _rec(row: str, result: CompareResult, nodeid: str, component: str = "Talker", **kw) -> dict:
    return Record(component=component, row=row, result=result, preset=kw.pop("preset", "tiny"),
                  variant=kw.pop("variant", "base"), nodeid=nodeid, **kw).to_json()


def _results(max_diff: float = 0.0, mutation_caught: bool = True, n_ok: int = 1, tests: dict | None = None,
             extra_rows: list[dict] | None = None, hash_: str | None = "live") -> dict:
    ok = compare("t:out", torch.ones(3) + max_diff, torch.ones(3), "block")
    mut = compare("t:out", torch.ones(3) + (1.0 if mutation_caught else 0.0), torch.ones(3), "op")
    rows = [_rec("Full Layer 0", ok, "a") for _ in range(n_ok)]
    rows.append(_rec("mutation x → Full Layer 0", mut, "b", component="Mutation self-test", expect_fail=True))
    rows += extra_rows or []
    tests = {"a": "passed", "b": "passed", **(tests or {})}
    outcomes = list(tests.values())
    return {
        "schema": 2, "created": "2026-01-01T00:00:00+00:00", "code_hash": code_hash() if hash_ == "live" else hash_,
        "provenance": {"preset": "tiny", "git_sha": "x", "versions": {}, "markexpr": ""},
        "summary": {"collected": len(tests), "passed": outcomes.count("passed"), "failed": outcomes.count("failed"),
                    "errors": outcomes.count("error"), "skipped": outcomes.count("skipped"), "duration_s": 1.0,
                    "exitstatus": 0},
        "tests": tests, "skipped": {}, "rows": rows, "bad_input": [],
    }


def _run(d: dict) -> RunResults:
    return RunResults.from_json(d, "results.json")


def _write(tmp_path: Path, d: dict | str, name: str = "results.json") -> Path:
    p = tmp_path / name
    p.write_text(d if isinstance(d, str) else json.dumps(d))
    return p


def _row_line(md: str, row: str) -> str:
    return next(line for line in md.splitlines() if f"· {row} " in line)


# ------------------------------------------------------------------------------------------- typed results


def test_results_round_trip_and_legacy_mutation_notes():
    """Results are objects through render and gate; the recorded schema-1 files still read (mutations were marked
    by "expected to FAIL" in their notes there, and only there)."""
    d = _results()
    run = _run(d)
    assert _run(run.to_json()).to_json() == run.to_json()
    assert [g.expect_fail for g in run.rows()] == [False, True]
    legacy = json.loads(json.dumps(d))
    for r in legacy["rows"]:
        r.pop("expect_fail"), r.pop("compares")
    legacy["rows"][1]["notes"] = "expected to FAIL"
    legacy["rows"][1]["component"] = "Other"
    g = _run(legacy).rows()[1]
    assert g.expect_fail and g.notes == [] and g.compares == UPSTREAM
    with pytest.raises(ValueError, match="compares="):
        Record("C", "r", CompareResult("t", "op", True, [1], [1], "float32"), compares="ours vs a guess")


# ------------------------------------------------------------------------------------ item 1: n/a, not 0


def test_rows_without_a_numeric_comparison_show_na_and_how_they_were_judged():
    functional = CompareResult("sampled item 0", "functional", True, [5, 16], [5, 16], "int64", n=80,
                               judged_by="functional checks: codes in range")
    refused = CompareResult("q_proj:out", "op", False, [], [], "", message="loader refused",
                            judged_by="the strict loader refused the checkpoint")
    d = _results(extra_rows=[_rec("Sampled generation (functional)", functional, "a", compares=FORMULA),
                             _rec("mutation head-dim → QKV", refused, "b", component="Mutation self-test",
                                  expect_fail=True)])
    md = render_markdown(d)
    for row, how in (("Sampled generation (functional)", "judged by: functional checks"),
                     ("mutation head-dim → QKV", "judged by: the strict loader refused")):
        line = _row_line(md, row)
        assert "| n/a " in line and "bit-exact" not in line and how in line
    # a measured zero still says so
    assert "0 (bit-exact)" in _row_line(md, "Full Layer 0")


# ------------------------------------------------------------------------ item 2: test outcome and missing


def test_a_row_whose_test_failed_or_errored_is_red_although_its_comparisons_passed():
    for outcome in ("failed", "error"):
        run = _run(_results(tests={"a": outcome}))
        g = run.rows()[0]
        assert g.comparisons_passed and not g.ok and "FAIL" in g.status
        assert "❌" in _row_line(render_markdown(run.to_json()), "Full Layer 0")
    # a mutation row is caught only if the test that demanded the red also passed
    assert not _run(_results(tests={"b": "failed"})).rows()[1].ok


def test_a_baseline_row_that_vanished_is_red_in_the_report_and_the_gate():
    base = baseline_from(_run(_results()))
    fewer = _results()
    fewer["rows"] = fewer["rows"][1:]
    md = render_markdown(fewer, baseline=base)
    assert "❌ missing" in _row_line(md, "Full Layer 0")
    assert any("not measured" in p for p in check(_run(fewer), base))
    other = json.loads(json.dumps(fewer))
    other["provenance"]["preset"] = "0.6b"  # another kind of run: the tiny baseline's rows are not its to miss
    assert "❌ missing" not in render_markdown(other, baseline=base)


def test_collector_records_errors_in_setup_and_teardown_and_skip_reasons():
    # A fresh collector, fed directly: patching the session's own collector would swallow this test's outcome.
    fresh = conftest.Results()

    def report(nodeid, when, outcome, longrepr=None):
        return pytest.TestReport(nodeid, ("f.py", 1, nodeid), {}, outcome, longrepr, when)

    fresh.log(report("t1", "call", "passed"))
    fresh.log(report("t1", "teardown", "failed", "boom"))
    fresh.log(report("t2", "setup", "failed", "fixture raised"))
    fresh.log(report("t3", "setup", "skipped", ("f.py", 3, "Skipped: no CUDA device")))
    assert fresh.outcomes == {"t1": "error", "t2": "error", "t3": "skipped"}
    assert fresh.skipped == {"t3": "no CUDA device"}


# ------------------------------------------------------------------------------- item 3: skipped, listed


def test_skipped_tests_are_listed_with_their_reason():
    d = _results(tests={"c": "skipped"})
    d["skipped"] = {"c": "no CUDA device on this machine"}
    md = render_markdown(d)
    assert "- `c`: no CUDA device on this machine" in md


# -------------------------------------------------------------------------- item 4: what a row compares


def test_every_row_says_what_it_compares():
    ours = compare("s:out", torch.ones(2), torch.ones(2), "stack")
    md = render_markdown(_results(extra_rows=[_rec("Prefill vs incremental", ours, "a", compares=OURS)]))
    assert "| Compares " in md
    assert "| ours vs ours " in _row_line(md, "Prefill vs incremental")
    assert "| ours vs upstream " in _row_line(md, "Full Layer 0")


SELF_ROWS = {"Prefill vs incremental": "OURS", "Code predictor (generation vs teacher-forced)": "OURS",
             "Streaming synthesis (chunks vs one-shot)": "OURS", "Streaming = one-shot, any chunking (fp32)": "OURS",
             "Talker positions (decode steps)": "FORMULA", "Mel filterbank": "LIBROSA", "Audio intake": "LIBROSA",
             "Resampler (soxr HQ vs librosa.resample)": "LIBROSA", "Sampled generation (functional)": "FORMULA"}


def test_rows_that_do_not_compare_with_upstream_are_marked_at_the_record_call():
    """The rows the audit found unmarked are recorded with ``compares=`` naming what they compare."""
    found = {}
    for f in sorted((ROOT / "parity_tests").glob("test_*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "record":
                kw = {k.arg: k.value for k in node.keywords}
                row = kw.get("row")
                if isinstance(row, ast.Constant) and row.value in SELF_ROWS:
                    found[row.value] = getattr(kw.get("compares"), "id", None)
    assert found == SELF_ROWS


# -------------------------------------------------------------------------------- item 7: recorded preset


def test_recorded_section_shows_the_preset_its_rows_ran_at():
    rel = _results(hash_=None)
    for r in rel["rows"]:
        r["preset"] = "0.6b"
    rel["provenance"]["markexpr"] = "slow"  # its provenance says "tiny": the session default, not what ran
    md = render_markdown(_results(), extra=[("reports/results-released.json", rel)])
    section = md[md.index("## Recorded run"):]
    assert section.startswith("## Recorded run: preset 0.6b")
    assert "0.6b / synthetic" in section and "tiny / synthetic" not in section


# ------------------------------------------------------------------------ item 8: recorded, not re-run


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True,
                          capture_output=True, text=True).stdout.strip()


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_recorded_section_says_when_and_flags_code_changed_since(tmp_path):
    repo = tmp_path / "repo"
    (repo / "impl").mkdir(parents=True)
    _git(repo, "init", "-q")
    (repo / "impl" / "a.py").write_text("x = 1\n")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "one")
    old = _git(repo, "rev-parse", "HEAD")
    (repo / "impl" / "a.py").write_text("x = 2\n")
    _git(repo, "commit", "-qam", "two")
    new = _git(repo, "rev-parse", "HEAD")
    assert "changed after it" in freshness(old, "d", repo).stale
    assert freshness(new, "d", repo).stale == ""
    (repo / "impl" / "a.py").write_text("x = 3\n")
    assert "uncommitted" in freshness(new, "d", repo).stale
    assert "unknown" in freshness("0" * 40, "d", repo).stale

    rel = _results(hash_=None)
    rel["provenance"]["git_sha"] = old
    rel["created"] = "2026-01-02T03:04:05+00:00"
    md = render_markdown(_results(), extra=[("r.json", rel)], root=repo)
    assert f"Recorded at `{old[:10]}` on 2026-01-02T03:04:05+00:00, on " in md and "; not re-run for this report" in md
    assert "Possibly stale" in md


# ---------------------------------------------------------------------------------- item 9: code hash


def test_code_hash_covers_the_code_and_not_the_report(tmp_path):
    for rel in ("impl/a.py", "reference_export/b.py", "parity_tests/c.py", "reports/d.py", "conftest.py",
                "reports/VALIDATION.md", "reports/baseline.json"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("1")
    h = code_hash(tmp_path)
    for rel in ("reports/VALIDATION.md", "reports/baseline.json"):
        (tmp_path / rel).write_text("edited")
        assert code_hash(tmp_path) == h, rel
    for rel in ("impl/a.py", "reference_export/b.py", "parity_tests/c.py", "reports/d.py", "conftest.py"):
        (tmp_path / rel).write_text("edited")
        assert code_hash(tmp_path) != h, rel
        h = code_hash(tmp_path)


def test_render_and_gate_refuse_results_from_other_code(tmp_path, capsys):
    base = _write(tmp_path, json.dumps(baseline_from(_run(_results()))), "baseline.json")
    for hash_, why in ((None, "carries no code hash"), ("0123456789abcdef", "produced by code 0123456789abcdef")):
        res = _write(tmp_path, _results(hash_=hash_))
        with pytest.raises(SystemExit, match=why):
            render(res, tmp_path / "V.md")
        assert gate(res, base) == 2
        out = capsys.readouterr().out.strip()
        assert why in out and str(res) in out and len(out.splitlines()) == 1
    assert not (tmp_path / "V.md").exists()
    assert gate(_write(tmp_path, _results()), base) == 0


def test_reports_run_does_not_rerender_old_results_when_pytest_wrote_none(tmp_path, capsys):
    res = _write(tmp_path, _results())
    out = tmp_path / "V.md"
    from reports.__main__ import main as reports_main

    try:
        rc = reports_main(["run", "--results", str(res), "--out", str(out), "--also", str(res),
                           "--", "parity_tests/no_such_test_file.py"])
    finally:
        sys.modules.pop("reports.__main__", None)  # else a later runpy.run_module("reports") warns about it
    assert rc != 0 and not out.exists()
    said = capsys.readouterr().out
    assert "not rendering" in said and "recorded no comparisons (pytest exit status 4)" in said


def test_a_collection_error_overwrites_the_previous_results(tmp_path, capsys):
    """pytest with a collection error used to leave results.json untouched, so the old results still gated."""
    res = _write(tmp_path, _results())
    broken = tmp_path / "test_broken.py"
    broken.write_text("import a_module_that_does_not_exist  # noqa\n")
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "conftest", str(broken),
                        f"--results={res}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stdout[-2000:]
    run = load(res)
    assert not run.records and run.summary["exitstatus"] == 2
    assert gate(res, _write(tmp_path, json.dumps(baseline_from(_run(_results()))), "baseline.json")) == 2
    assert "recorded no comparisons (pytest exit status 2)" in capsys.readouterr().out


# ---------------------------------------------------------------------------------- item 10: the plot


def test_render_writes_status_counts_and_links_the_plot(tmp_path):
    res = _write(tmp_path, _results())
    render(res, tmp_path / "V.md", [])
    md = (tmp_path / "V.md").read_text()
    assert "2 passed, 0 failed, 0 errors, 0 skipped of 2 collected" in md
    assert "✅ caught" in _row_line(md, "mutation x → Full Layer 0")
    assert "](plots/max_abs.png)" in md and (tmp_path / "plots" / "max_abs.png").exists()
    assert (tmp_path / "summary.json").exists()


# -------------------------------------------------------------------------------------- item 11: gate


def test_gate_flags_regressions_missing_rows_and_lost_mutations():
    base = baseline_from(_run(_results(max_diff=1e-7)))
    assert check(_run(_results(max_diff=1e-7)), base) == []
    assert any("grew" in p for p in check(_run(_results(max_diff=5e-6)), base))  # still in tier, but 50x worse
    assert any("fails now" in p for p in check(_run(_results(max_diff=1.0)), base))
    assert any("no longer caught" in p for p in check(_run(_results(mutation_caught=False)), base))


def test_gate_flags_a_row_that_makes_fewer_comparisons():
    base = baseline_from(_run(_results(n_ok=108)))
    assert check(_run(_results(n_ok=108)), base) == []
    problems = check(_run(_results(n_ok=1)), base)
    assert any("1 comparisons, 108 in the baseline" in p for p in problems)


def test_gate_checks_the_recorded_sections():
    rel = _run(_results(hash_=None))
    rel.source = "results-released.json"
    base = baseline_from(_run(_results()), [rel])
    assert check(_run(_results()), base, [rel]) == []
    assert any("results-released.json" in p and "not given" in p for p in check(_run(_results()), base, []))
    broken = _run(_results(max_diff=1.0, hash_=None))
    broken.source = "results-released.json"
    assert any(p.startswith("results-released.json: ") and "fails now" in p
               for p in check(_run(_results()), base, [broken]))


def test_gate_update_refuses_red_rows(tmp_path, capsys):
    base = tmp_path / "baseline.json"
    assert gate(_write(tmp_path, _results(max_diff=1.0)), base, update=True) == 1
    assert "refusing" in capsys.readouterr().out and not base.exists()
    assert gate(_write(tmp_path, _results(mutation_caught=False)), base, update=True) == 1
    assert gate(_write(tmp_path, _results(tests={"a": "failed"})), base, update=True) == 1
    assert not base.exists()
    assert gate(_write(tmp_path, _results()), base, update=True) == 0 and base.exists()


@pytest.mark.parametrize("case,text,needle", [
    ("corrupt baseline", '{"rows": {', "not valid JSON"),
    ("empty baseline", "", "empty"),
    ("list-shaped baseline", "[1, 2]", "not a baseline"),
])
def test_gate_bad_baseline_is_one_line_exit_2(case, text, needle, tmp_path, capsys, bad_input):
    res = _write(tmp_path, _results())
    base = _write(tmp_path, text, "baseline.json")
    assert gate(res, base) == 2
    out = capsys.readouterr()
    line = out.out.strip()
    assert needle in line and str(base) in line and len(line.splitlines()) == 1 and "Traceback" not in out.err
    bad_input(case, "one-line error, exit 2", line, surface="reports gate")


@pytest.mark.parametrize("case,text,needle", [
    ("results {}", "{}", "missing 'provenance'"),
    ("results not JSON", "{", "not valid JSON"),
    ("results list-shaped", "[]", "not an object"),
])
def test_gate_bad_results_is_one_line_exit_2(case, text, needle, tmp_path, capsys, bad_input):
    res = _write(tmp_path, text)
    base = _write(tmp_path, json.dumps(baseline_from(_run(_results()))), "baseline.json")
    assert gate(res, base) == 2
    out = capsys.readouterr()
    line = out.out.strip()
    assert needle in line and str(res) in line and len(line.splitlines()) == 1 and "Traceback" not in out.err
    bad_input(case, "one-line error, exit 2", line, surface="reports gate")


def test_load_names_the_key_at_fault(tmp_path):
    d = _results()
    d["rows"][0]["result"] = 3
    with pytest.raises(ResultsError, match=r"rows\[0\]: 'result' is int"):
        load(_write(tmp_path, d))


# ------------------------------------------------------------------------------ CUDA / bf16 runs (issue 7, item 8)


def _device_run(device: str, dtype: str, red: bool = False, cuda_skipped: bool = False) -> dict:
    d = _results(max_diff=1.0 if red else 0.0, tests={"c": "skipped" if cuda_skipped else "passed"})
    d["provenance"].update(device=device, dtype=dtype, device_info={
        "gpu": "NVIDIA H200", "driver": "580.1", "cuda": "13.0", "cudnn": 91000, "torch": "2.11.0",
        "tf32_matmul": False, "tf32_cudnn": False})
    d["marked"] = {"cuda": ["c"]}  # test "c" carries the cuda marker
    if cuda_skipped:
        d["skipped"] = {"c": "no CUDA device on this machine"}
    return d


def test_results_path_keeps_cpu_fp32_apart_from_device_runs():
    assert conftest.results_path("cpu", "float32").name == "results.json"
    assert conftest.results_path("cuda", "float32").name == "results-cuda.json"
    assert conftest.results_path("cuda:1", "bfloat16").name == "results-cuda-bfloat16.json"
    assert conftest.results_path("cpu", "bfloat16").name == "results-cpu-bfloat16.json"


def test_cuda_runs_not_recorded_say_not_measured_never_pass():
    md = render_markdown(_results(), extra=[])
    section = md.split("## CUDA runs", 1)[1].split("\n## ", 1)[0]
    assert section.count("not measured on this machine") == 2  # cuda float32 and cuda bfloat16
    assert "✅" not in section


def test_a_recorded_cuda_run_is_its_own_section_with_its_gpu_and_tf32_flags():
    md = render_markdown(_results(), extra=[("reports/results-cuda.json", _device_run("cuda", "float32"))])
    section = md.split("## CUDA runs", 1)[1].split("\n## ", 1)[0]
    import re

    assert re.search(r"cuda float32\s*\|\s*✅", section) and "NVIDIA H200 (driver 580.1, CUDA 13.0" in section
    assert "TF32 matmul off / cuDNN off" in section
    assert section.count("not measured on this machine") == 1  # bf16 still missing
    assert "## Recorded run: cuda float32, preset tiny" in md


def test_gate_judges_a_device_run_on_itself(tmp_path, capsys):
    base = tmp_path / "baseline.json"
    base.write_text(json.dumps(baseline_from(_run(_results()))))
    ok = _write(tmp_path, _device_run("cuda", "bfloat16"), "results-cuda-bfloat16.json")
    assert gate(ok, base) == 0 and "cuda bfloat16 run" in capsys.readouterr().out
    bad = _write(tmp_path, _device_run("cuda", "float32", red=True), "results-cuda.json")
    assert gate(bad, base) == 1 and "red" in capsys.readouterr().out
    assert gate(ok, base, update=True) == 2  # a device run never becomes the CPU baseline


# ------------------------------------------------------------------- issue 18 item 3: a gate that sees skips


def test_a_cuda_run_whose_cuda_tests_all_skipped_never_renders_a_pass(tmp_path, capsys):
    """Issue 18: a committed CUDA results file whose CUDA-marked tests all skipped rendered ✅ (its other rows
    passed on the CPU). It shows "not shown" with the reason, its section says so, and its gate fails; a file
    that does not record the marker lists (older harness) is not ✅ either."""
    import re

    skipped = _device_run("cuda", "float32", cuda_skipped=True)
    md = render_markdown(_results(), extra=[("reports/results-cuda.json", skipped)])
    section = md.split("## CUDA runs", 1)[1].split("\n## ", 1)[0]
    line = next(x for x in section.splitlines() if x.startswith("| cuda float32"))
    assert "✅" not in line and "not shown" in line and "all 1 'cuda'-marked tests skipped" in line, line
    assert "no CUDA device on this machine" in line
    assert "**⚠️ CUDA not shown:** all 1 'cuda'-marked tests skipped" in md
    older = _device_run("cuda", "float32")
    del older["marked"]
    md = render_markdown(_results(), extra=[("reports/results-cuda.json", older)])
    section = md.split("## CUDA runs", 1)[1].split("\n## ", 1)[0]
    assert not re.search(r"cuda float32\s*\|\s*✅", section) and "does not record which tests carry" in section
    base = tmp_path / "baseline.json"
    base.write_text(json.dumps(baseline_from(_run(_results()))))
    assert gate(_write(tmp_path, skipped, "results-cuda.json"), base) == 1
    assert "CUDA run: all 1 'cuda'-marked tests skipped" in capsys.readouterr().out


def test_gate_fails_on_a_new_skip_and_update_records_the_expected_ones(tmp_path, capsys):
    """Issue 18: the gate counted failed and errored tests only, so a test that started skipping kept CI green.
    The baseline now lists the expected skips with their reasons (``--update``); a skip not in it is one line
    naming the test; a baseline of the older format (no skip list) says to re-run --update."""
    base = tmp_path / "baseline.json"
    assert gate(_write(tmp_path, _results()), base, update=True) == 0
    capsys.readouterr()
    now = _results(tests={"c": "skipped"})
    now["skipped"] = {"c": "the reference file is missing"}
    res = _write(tmp_path, now)
    assert gate(res, base) == 1
    said = capsys.readouterr().out
    assert "- test c skipped, not an expected skip in the baseline (reason: the reference file is missing)" in said
    assert gate(res, base, update=True) == 0 and "1 expected skip(s)" in capsys.readouterr().out
    assert json.loads(base.read_text())["skipped"] == {"c": "the reference file is missing"}
    assert gate(res, base) == 0  # an expected skip, recorded by --update with its reason
    old = json.loads(base.read_text())
    del old["skipped"]
    base.write_text(json.dumps(old))
    assert gate(res, base) == 1
    assert "the baseline lists no expected skips" in capsys.readouterr().out
    assert check(_run(_results()), old) == [
        "the baseline lists no expected skips (written before skips were gated): check this run's skipped tests, "
        "then record them with `python -m reports gate --update`"]


# -------------------------------------------------------------- issue 18 item 4: freshness paths and +dirty


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_a_change_to_the_tests_the_comparison_engine_or_the_collector_makes_a_section_stale(tmp_path):
    """Issue 18: staleness watched impl/ and reference_export/ only; the tests that judge, reports/compare.py and
    conftest.py decide a row's verdict too. The report formatting (reports/render.py) does not."""
    repo = tmp_path / "repo"
    for rel in ("impl/a.py", "parity_tests/test_a.py", "reports/compare.py", "reports/render.py", "conftest.py"):
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / rel).write_text("x = 1\n")
    _git(repo, "init", "-q")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "one")
    for rel, stale in (("reports/render.py", False), ("parity_tests/test_a.py", True), ("reports/compare.py", True),
                       ("conftest.py", True)):
        sha = _git(repo, "rev-parse", "HEAD")
        (repo / rel).write_text("x = 2\n")
        _git(repo, "commit", "-qam", f"edit {rel}")
        f = freshness(sha, "d", repo)
        assert bool(f.stale) == stale, (rel, f.stale)
        if stale:
            shown = "parity_tests/" if rel.startswith("parity_tests") else rel
            assert f.stale.startswith(f"{shown} changed after it"), f.stale


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_provenance_sha_says_dirty_when_the_code_differs_from_head(tmp_path):
    """Issue 18: the provenance sha had no "+dirty" even when the tree differed from the commit it names."""
    from reference_export.export import git_sha
    from reports.render import short_sha

    repo = tmp_path / "repo"
    (repo / "impl").mkdir(parents=True)
    (repo / "impl" / "a.py").write_text("x = 1\n")
    (repo / "README.md").write_text("r\n")
    _git(repo, "init", "-q")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "one")
    head = _git(repo, "rev-parse", "HEAD")
    assert git_sha(repo) == head
    (repo / "README.md").write_text("edited\n")  # not code: the numbers are still the commit's
    assert git_sha(repo) == head
    (repo / "impl" / "new.py").write_text("y = 1\n")  # a new, untracked module
    assert git_sha(repo) == head + "+dirty"
    (repo / "impl" / "new.py").unlink()
    (repo / "impl" / "a.py").write_text("x = 2\n")
    assert git_sha(repo) == head + "+dirty"
    assert short_sha(head + "+dirty") == head[:10] + "+dirty"
    assert "unknown" not in freshness(head + "+dirty", "d", repo).stale  # the commit is still looked up
    assert git_sha(tmp_path / "not-a-repo") == "unknown"


def test_recorded_messages_hide_this_machines_folders():
    """Committed reports are read elsewhere: a row message naming a cached checkpoint or the clone shows <cache> /
    <repo>, never this machine's absolute path."""
    from conftest import CACHE, ROOT, machine_paths_hidden

    msg = f"{CACHE / 'ckpt' / 'x' / 'model.safetensors'}: bad key; see {ROOT / 'README.md'}"
    shown = machine_paths_hidden(msg)
    assert shown == "<cache>/ckpt/x/model.safetensors: bad key; see <repo>/README.md", shown
