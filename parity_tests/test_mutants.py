"""The generated-mutant tool (parity_tests/mutants.py) and its VALIDATION.md section (reports/mutation_score.py):
each operator yields the mutants it claims and nothing in messages, a mutant is caught or survives in a scratch
repository as its tests say, the test selection follows coverage, and the score is computed as documented."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from parity_tests import mutants as M
from reports.mutation_score import mutation_score_section

TOY = textwrap.dedent('''\
    """Module docstring 1.5 < 2."""
    import torch
    import torch.nn.functional as F

    EPS = 1e-6


    def f(x, n):
        """Docstring: 3 > 2."""
        if n <= 0:
            raise ValueError(f"n {n} < 1")
        assert n < 100, "n too big: 100"
        y = F.pad(x, (1, 1), mode="reflect")
        z = y[1:n].float() * 0.5 + EPS
        return z.to(torch.float32) + torch.zeros(1, dtype=torch.float32)
    ''')


@pytest.fixture()
def toy_root(tmp_path: Path) -> Path:
    (tmp_path / "impl").mkdir()
    (tmp_path / "impl" / "toy.py").write_text(TOY)
    return tmp_path


def test_each_operator_yields_its_mutants_and_nothing_in_messages(toy_root):
    ms = M.mutants_of("impl/toy.py", toy_root)
    changes = {(m.op, m.change) for m in ms}
    assert ("num", "`1e-6` → `(1e-05)`") in changes and ("num", "`1e-6` → `(1e-07)`") in changes
    assert ("num", "`0.5` → `(5.0)`") in changes
    assert ("cmp", "`n <= 0` → `(n < 0)`") in changes
    assert ("slice", "`1` → `(1) + 1`") in changes and ("num", "`1` → `(2)`") in changes
    assert ("slice", "`n` → `(n) - 1`") in changes and ("slice", "`n` → `(n) + 1`") in changes
    assert ("pad", "`\"reflect\"` → `'replicate'`") in changes
    assert ("cast", "`y[1:n].float()` → `(y[1:n])`") in changes
    assert ("cast", "`z.to(torch.float32)` → `(z)`") in changes
    assert ("cast", "`torch.zeros(1, dtype=torch.float32)` → `torch.zeros(1)`") in changes
    lines = TOY.splitlines()
    for m in ms:  # docstrings, the raise and the assert are never touched
        text = lines[m.line - 1]
        assert "raise" not in text and "assert" not in text and '"""' not in text, (m.id, text)
    assert len({m.id for m in ms}) == len(ms)


def test_apply_changes_only_the_span_and_compiles(toy_root):
    ms = M.mutants_of("impl/toy.py", toy_root)
    m = next(m for m in ms if m.op == "cmp")
    with M.mutated(m, toy_root):
        new = (toy_root / "impl" / "toy.py").read_text()
    assert (toy_root / "impl" / "toy.py").read_text() == TOY
    compile(new, "toy", "exec")
    diff = [(a, b) for a, b in zip(TOY.splitlines(), new.splitlines()) if a != b]
    assert diff == [("    if n <= 0:", "    if (n < 0):")]


def test_selection_follows_coverage():
    m = M.Mutant("impl/toy.py", 10, 10, 4, "num", "", 0, 1, "(2)")
    cov = {"impl/toy.py": {10: {"t.py::a", "t.py::b"}, 11: {"t.py::c"}, 5: {""}}}
    assert M.select_tests(m, cov) == (["t.py::a", "t.py::b"], "line")
    at_import = M.Mutant("impl/toy.py", 5, 5, 0, "num", "", 0, 1, "(2)")
    assert M.select_tests(at_import, cov) == (["t.py::a", "t.py::b", "t.py::c"], "file (line runs at import)")
    unrun = M.Mutant("impl/toy.py", 7, 7, 0, "num", "", 0, 1, "(2)")
    assert M.select_tests(unrun, cov) == ([], "not executed")


def test_config_and_presets_are_not_in_the_population():
    files = M.population_files()
    assert "impl/layers.py" in files and "impl/codec/decoder.py" in files
    assert not [f for f in files if f == "impl/config.py" or f.startswith("impl/presets/")]


def _toy_repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    (repo / "impl").mkdir(parents=True)
    (repo / "impl" / "__init__.py").write_text("")
    (repo / "impl" / "calc.py").write_text("def double(x):\n    return x * 2\n\n\ndef unused(x):\n    return x + 1\n")
    (repo / "test_calc.py").write_text("from impl.calc import double\n\n\ndef test_double():\n"
                                       "    assert double(3) == 6\n")
    (repo / "conftest.py").write_text("def pytest_addoption(parser):\n    parser.addoption('--results')\n")
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "toy"], cwd=repo, check=True)
    return repo


def test_a_mutant_is_caught_or_survives_as_its_tests_say_and_the_file_is_restored(tmp_path):
    repo = _toy_repo(tmp_path)
    ms = {m.change: m for m in M.mutants_of("impl/calc.py", repo)}
    caught = M.run_one(ms["`2` → `(3)`"], repo, ["test_calc.py"], timeout=120)
    assert caught["outcome"] == "caught" and caught["first_failed"] == "test_calc.py::test_double", caught
    survived = M.run_one(ms["`1` → `(2)`"], repo, ["test_calc.py"], timeout=120)  # in unused(): no test sees it
    assert survived["outcome"] == "survived", survived
    assert subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True).stdout == ""


def _data(outcomes: list[dict]) -> dict:
    return {"seed": 7, "n": len(outcomes), "summary": M.summarize(outcomes), "mutants": outcomes,
            "population": {"files": ["impl/a.py"], "excluded": M.EXCLUDED, "mutants": 10, "executed": 8,
                           "per_operator": {"num": {"all": 10, "executed": 8}}},
            "provenance": {"git": "0123456789", "date_utc": "2026-12-07T00:00:00+00:00", "cores": 2,
                           "command": "python -m parity_tests.mutants run"}}


def test_score_counts_equivalents_out_and_timeouts_in(tmp_path):
    outs = [{"id": str(i), "file": "impl/a.py", "line": i, "op": "num", "change": "`1` → `(2)`", "tests": 3,
             "outcome": o, "first_failed": "t.py::x" if o == "caught" else "", "first_red_row": "", "note": "",
             "killed_by": []} for i, o in enumerate(["caught"] * 17 + ["timeout", "equivalent", "survived"])]
    s = M.summarize(outs)
    assert (s["total"], s["non_equivalent"], s["caught"], s["timeout"], s["survived"]) == (20, 19, 17, 1, 1)
    assert s["score"] == round(18 / 19, 4)
    (tmp_path / "mutation-score.json").write_text(json.dumps(_data(outs)))
    md = "\n".join(mutation_score_section(tmp_path))
    assert "18 of 19 non-equivalent mutants caught = 94.7 %" in md and "**misses**" in md
    assert "**survived**" in md and "Possibly stale" in md  # commit 0123456789 is unknown here


def test_an_unreadable_score_file_is_one_line(tmp_path):
    (tmp_path / "mutation-score.json").write_text('{"summary": {}}')
    md = mutation_score_section(tmp_path)
    assert len([ln for ln in md if "unreadable" in ln]) == 1 and "mutation-score.json" in md[-2]


def test_the_command_refuses_a_bad_count():
    r = subprocess.run([sys.executable, "-m", "parity_tests.mutants", "run", "--n", "0"], capture_output=True,
                       text=True, cwd=M.ROOT)
    assert r.returncode == 2 and "--n 0: must be at least 1" in r.stderr


def test_a_smaller_sample_is_a_prefix_of_a_larger_one():
    """``--n 40`` draws the first 40 mutants of ``--n 48`` with the same seed (random.sample's selection for a small
    sample of a large population), so a run stopped early is a smaller sample of the same draw, not another one."""
    cov = {f: {ln: {"t"} for ln in range(1, 3000)} for f in M.population_files()}
    small, pop = M.sample(20261207, 40, cov)
    large, _ = M.sample(20261207, 48, cov)
    assert [m.id for m in large[:40]] == [m.id for m in small] and pop["executed"] > 1000
