"""The validation matrix across processes (issue 17): ``pytest -n 2`` (pytest-xdist) and duration-balanced shards
(``--splits N --group i``, whole modules) merged by ``python -m reports merge`` write the results of a serial run —
the same tests, outcomes, skip reasons, rows, bad-input cases and per-test duration keys — and the CI workflow
that runs the matrix is a valid GitHub Actions workflow.

The default tests run a small generated test file (rows, a row shared by several tests, a red row, a failed test,
a setup error, skips with reasons, a CUDA-marked skip, a bad-input case) in pytest subprocesses with their own
``--results``; ``-m slow`` repeats it on real parity files of the tiny preset.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from reports.gate import baseline_from, check
from reports.merge import MergeError, merge
from reports.render import render_markdown
from reports.results import RunResults, load

ROOT = Path(__file__).resolve().parent.parent

# Two generated test modules (shards hold whole modules): rows and a bad-input case; skips, failures, a red row.
SYNTHETIC_A = '''
import pytest
import torch

from reports.compare import compare


@pytest.mark.parametrize("i", range(6))
def test_rows(record, i):
    record(compare("t:out", torch.ones(3) * i, torch.ones(3) * i, "block"), row=f"row {i % 3}",
           component="Synthetic", variant="base")
    record(compare("u:out", torch.ones(2), torch.ones(2) + i * 1e-3, "op"), row="shared row", component="Synthetic")


def test_bad_input(bad_input):
    bad_input("empty text", "one-line error", "text is empty", surface="api")
'''

SYNTHETIC_B = '''
import pytest
import torch

from reports.compare import compare


def test_skip_reason():
    pytest.skip("no such device here")


@pytest.mark.cuda
def test_cuda_marked():
    pytest.skip("no CUDA device on this machine")


def test_fails(record):
    record(compare("v:out", torch.ones(2), torch.ones(2), "op"), row="row of a failing test", component="Synthetic")
    assert False


@pytest.fixture
def broken():
    raise RuntimeError("setup broke")


def test_setup_error(broken):
    pass


def test_red_row(record):
    record(compare("w:out", torch.ones(2), torch.ones(2) + 1, "op"), row="red row", component="Synthetic")
'''

# What a run must reproduce of the serial run: everything but the timing and when/where it ran.
COUNTS = ("collected", "passed", "failed", "errors", "skipped", "exitstatus")


def _pytest(args: list[str], results: Path, timeout: int = 300, outside: bool = True) -> RunResults:
    """A pytest subprocess in the repo root; ``outside``: the test file lies outside the repo, so the root
    conftest (options, fixtures, collector) is loaded by name."""
    plug = ["-p", "conftest"] if outside else []
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *plug, *args,
                        f"--results={results}"], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert p.returncode in (0, 1), p.stdout[-3000:] + p.stderr[-2000:]
    return load(results, results.name)


def _same_run(a: RunResults, b: RunResults) -> None:
    """``b`` holds exactly what ``a`` holds (order included), timings and provenance aside."""
    assert {k: b.summary[k] for k in COUNTS} == {k: a.summary[k] for k in COUNTS}
    assert list(b.tests.items()) == list(a.tests.items())
    assert b.skipped == a.skipped
    assert [r.to_json() for r in b.records] == [r.to_json() for r in a.records]
    assert b.bad_input == a.bad_input
    assert list(b.durations) == list(a.durations) == list(a.tests)
    assert b.marked == a.marked


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """The generated test files and their serial run."""
    d = tmp_path_factory.mktemp("matrix")
    files = [d / "test_synthetic_a.py", d / "test_synthetic_b.py"]
    files[0].write_text(SYNTHETIC_A)
    files[1].write_text(SYNTHETIC_B)
    f = [str(x) for x in files]
    serial = _pytest(f, d / "serial.json")
    return d, f, serial


def test_the_serial_run_records_what_the_file_does(synthetic):
    _, _, serial = synthetic
    s = serial.summary
    assert (s["collected"], s["passed"], s["failed"], s["errors"], s["skipped"]) == (12, 8, 1, 1, 2)
    ids = list(serial.tests)
    assert ids[0].endswith("test_rows[0]") and ids[-1].endswith("test_red_row")  # collection order
    assert {t.split("::")[1]: why for t, why in serial.skipped.items()} == {
        "test_skip_reason": "no such device here", "test_cuda_marked": "no CUDA device on this machine"}
    assert [t.split("::")[1] for t in serial.marked["cuda"]] == ["test_cuda_marked"]
    assert len(serial.records) == 14 and [c["case"] for c in serial.bad_input] == ["empty text"]
    assert serial.provenance["workers"] == 0 and serial.provenance["shard"] is None


def test_xdist_run_writes_the_serial_runs_results(synthetic):
    """Issue 17: with -n 2 the controller held no rows (``pytest_sessionfinish`` returned early on workers). Now a
    test's rows ride on its teardown report to the controller, which restores collection order."""
    d, f, serial = synthetic
    par = _pytest(["-n", "2", *f], d / "xdist.json")
    _same_run(serial, par)
    assert par.provenance["workers"] == 2


def test_two_shards_merged_equal_the_serial_run(synthetic, capsys):
    """Issue 17: ``--splits 2 --group i`` run one after the other, then ``reports merge``: the serial run's rows;
    each shard keeps its provenance line; the gate judges the merged run as it judges the serial one."""
    d, f, serial = synthetic
    durations = d / "durations.json"
    durations.write_text(json.dumps({t: 1.0 for t in serial.tests}))  # equal weights: one module a shard
    shards = [_pytest(["--splits", "2", "--group", str(g), "--durations-path", str(durations), *f],
                      d / f"shard{g}.json") for g in (1, 2)]
    assert [s.provenance["shard"] for s in shards] == [{"group": 1, "splits": 2}, {"group": 2, "splits": 2}]
    assert [s.summary["collected"] for s in shards] == [7, 5]
    from reports.__main__ import main as reports_main

    out = d / "merged.json"
    try:
        rc = reports_main(["merge", str(d / "shard2.json"), str(d / "shard1.json"), "--out", str(out),
                           "--expect", "2"])
    finally:
        sys.modules.pop("reports.__main__", None)  # else a later runpy.run_module("reports") warns about it
    assert rc == 0, capsys.readouterr()
    merged = load(out)
    _same_run(serial, merged)
    assert [s["group"] for s in merged.provenance["shards"]] == [1, 2]
    md = render_markdown(merged.to_json(), "merged.json")
    assert "| shard 1/2 " in md and "| shard 2/2 " in md and "shard1.json" in md
    base = baseline_from(serial)
    assert check(merged, base) == check(serial, base) != []  # the failed and errored tests, in both


def test_shards_are_contiguous_whole_modules_cut_where_the_heaviest_is_lightest():
    from conftest import plan_shards

    assert plan_shards([5, 1, 1, 1, 4], 2) == [0, 0, 1, 1, 1]  # 6 | 6, not 5 | 7
    assert plan_shards([1, 1, 1, 1, 1, 1, 9], 3) == [0, 0, 0, 1, 1, 1, 2]  # no shard left empty
    assert plan_shards([1, 2], 4) == [0, 1] and plan_shards([], 2) == []  # fewer modules than shards
    w = [3.0, 8.0, 1.0, 1.0, 7.0, 2.0, 2.0, 5.0]
    plan = plan_shards(w, 3)
    assert plan == sorted(plan) and set(plan) == {0, 1, 2}  # contiguous, in order, none empty
    heaviest = max(sum(x for x, g in zip(w, plan) if g == k) for k in range(3))
    assert heaviest == 11.0  # the best contiguous cut: 3+8 | 1+1+7+2 | 2+5 (brute force agrees)


def test_a_wrong_shard_option_is_one_usage_line(tmp_path):
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--co", "--splits", "2",
                        "--group", "3", "parity_tests/test_matrix.py"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 4 and "--splits 2 --group 3: need N >= 1 and 1 <= i <= N" in p.stderr, p.stderr


@pytest.mark.parametrize("opts", [["--preset", "0.6b"], ["--checkpoint", "/nonexistent/ckpt"]], ids=["0.6b", "ckpt"])
def test_tool_tests_leave_a_released_or_checkpoint_run_with_a_reason(opts):
    """Under --preset 0.6b or --checkpoint DIR the tool tests (bad input, ports, mutations, bench smoke, …) are
    deselected, and the run says so; a parity file stays. Collection only: nothing is built."""
    files = ["parity_tests/test_bad_input_export.py", "parity_tests/test_bench.py", "parity_tests/test_mel.py"]
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--co", *opts, *files],
                       cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    ids = [ln for ln in p.stdout.splitlines() if "::" in ln]
    assert ids and all(i.startswith("parity_tests/test_mel.py::") for i in ids), ids[:5]
    assert "deselected" in p.stdout and "tool tests: tests of the harness's tools" in p.stdout, p.stdout[-1500:]


def test_a_released_shard_balances_on_its_presets_durations():
    """``--preset 0.6b --splits 2`` balances on the committed ``reports/durations-0.6b.json`` (a whole 0.6b run's
    per-test seconds), not on tiny's file: the shard line's estimate is that file's plan. Collection only."""
    from conftest import plan_shards

    d = json.loads((ROOT / "reports" / "durations-0.6b.json").read_text())
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--co", "--preset", "0.6b",
                        "--splits", "2", "--group", "2", "parity_tests"], cwd=ROOT, capture_output=True, text=True,
                       timeout=180)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    ids = [ln for ln in p.stdout.splitlines() if "::" in ln]
    modules: dict[str, float] = {}
    for nid in d:  # the file holds exactly the run's tests, in collection order
        modules[nid.split("::")[0]] = modules.get(nid.split("::")[0], 0.0) + d[nid]
    plan = plan_shards(list(modules.values()), 2)
    mine = [m for m, g in zip(modules, plan) if g == 1]
    assert sorted({i.split("::")[0] for i in ids}) == sorted(mine)
    est = sum(w for w, g in zip(modules.values(), plan) if g == 1)
    assert f"about {est:.0f} s by the durations file" in p.stdout, p.stdout[-1500:]


def test_durations_file_is_refreshed_from_results(synthetic, tmp_path, capsys):
    _, _, serial = synthetic
    src = tmp_path / "r.json"
    src.write_text(json.dumps(serial.to_json()))
    from reports.__main__ import main as reports_main

    out = tmp_path / "durations.json"
    try:
        assert reports_main(["durations", str(src), "--out", str(out)]) == 0
    finally:
        sys.modules.pop("reports.__main__", None)
    got = json.loads(out.read_text())
    assert list(got) == sorted(serial.tests) and all(isinstance(v, float) and v >= 0 for v in got.values())


# ------------------------------------------------------------------------------- merge refuses, one line


def _shard(group: int, splits: int = 2, tests: dict | None = None, code: str = "c0de", **summary) -> RunResults:
    tests = tests if tests is not None else {f"t{group}": "passed"}
    return RunResults(provenance={"preset": "tiny", "device": "cpu", "dtype": "float32", "markexpr": "",
                                  "shard": {"group": group, "splits": splits}},
                      summary={"collected": len(tests), "passed": len(tests), "failed": 0, "errors": 0,
                               "skipped": 0, "duration_s": 1.0, "exitstatus": 0, **summary},
                      records=[], tests=tests, code_hash=code, source=f"shard{group}.json")


@pytest.mark.parametrize("case,runs,expect,needle", [
    ("different code hashes", [_shard(1), _shard(2, code="other")], None,
     "shard2.json: produced by code other, but shard1.json by c0de"),
    ("a test in two shards", [_shard(1, tests={"t": "passed"}), _shard(2, tests={"t": "passed"})], None,
     "shard2.json: test t is also in shard1.json: the shards overlap"),
    ("a shard that failed to collect", [_shard(1), _shard(2, exitstatus=2)], None,
     "shard2.json: this shard did not run its tests (pytest exit status 2"),
    ("a shard that collected nothing", [_shard(1), _shard(2, tests={}, exitstatus=5)], None,
     "shard2.json: this shard did not run its tests (pytest exit status 5, 0 collected)"),
    ("a missing shard (--expect)", [_shard(1, splits=3), _shard(3, splits=3)], 3, "shard(s) 2/3 missing (2 of 3 given)"),
    ("a missing shard (from the shards)", [_shard(2)], None, "shard(s) 1/2 missing (1 of 2 given)"),
    ("a shard twice", [_shard(1), _shard(1)], 2, "shard1.json: shard 1/2 again"),
    ("a shard of another split", [_shard(1), _shard(2, splits=3)], None, "shards of different splits (2, 3)"),
    ("another kind of run", [_shard(1), RunResults(**{**_shard(2).__dict__, "provenance": {
        **_shard(2).provenance, "dtype": "bfloat16"}})], None, "shard2.json: dtype is 'bfloat16'"),
])
def test_merge_refuses_shards_that_are_not_one_run(case, runs, expect, needle, bad_input):
    with pytest.raises(MergeError) as e:
        merge(runs, expect)
    msg = str(e.value)
    assert needle in msg and "\n" not in msg, msg
    bad_input(case, "one-line error", msg, surface="python -m reports merge")


def test_merge_cli_says_one_line_and_writes_nothing(tmp_path, capsys):
    from reports.__main__ import main as reports_main

    a = tmp_path / "a.json"
    a.write_text(json.dumps(_shard(1).to_json()))
    out = tmp_path / "merged.json"
    try:
        rc = reports_main(["merge", str(a), "--out", str(out)])
    finally:
        sys.modules.pop("reports.__main__", None)
    err = capsys.readouterr().err
    assert rc == 2 and not out.exists() and err.count("\n") == 1 and "shard(s) 2/2 missing" in err


# ------------------------------------------------------------------------------------------- the workflow


def test_the_ci_workflow_is_a_valid_github_actions_workflow(tmp_path):
    """Issue 17: the workflow others copy is checked against the GitHub workflow schema that check-jsonschema
    vendors (no network), and runs what the README says: shards, a merge that expects them all, the gate."""
    wf = ROOT / ".github" / "workflows" / "validation.yml"
    p = subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.github-workflows",
                        str(wf)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    text = wf.read_text()
    for needle in ("--splits", "--group", "python -m reports merge", "--expect", "python -m reports gate",
                   "python -m reports render", "actions/upload-artifact", "VALIDATION.md", "runs-on: ${{"):
        assert needle in text, needle
    # and the schema check bites: a job without runs-on is refused
    broken = tmp_path / "broken.yml"
    broken.write_text("on: push\njobs:\n  a:\n    steps:\n      - run: echo\n")
    p = subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.github-workflows",
                        str(broken)], capture_output=True, text=True, timeout=120)
    assert p.returncode != 0


# ------------------------------------------------------------------------- the same on real parity files


REAL = ["parity_tests/test_audio.py", "parity_tests/test_sampling.py", "parity_tests/test_bad_input_export.py"]


@pytest.mark.slow
def test_real_parity_files_serial_xdist_and_shards_agree(tmp_path):
    """Opt-in (-m slow, about 2-4 minutes on 2 cores): three tiny-preset files with rows, skips and bad-input
    cases, serial vs -n 2 vs two shards merged."""
    serial = _pytest(REAL, tmp_path / "serial.json", timeout=1200, outside=False)
    assert serial.records and serial.bad_input
    _same_run(serial, _pytest(["-n", "2", *REAL], tmp_path / "xdist.json", timeout=1200, outside=False))
    durations = tmp_path / "durations.json"
    durations.write_text(json.dumps(serial.durations))
    shards = [_pytest(["--splits", "2", "--group", str(g), "--durations-path", str(durations), *REAL],
                      tmp_path / f"shard{g}.json", timeout=1200, outside=False) for g in (1, 2)]
    _same_run(serial, merge(shards, 2))
