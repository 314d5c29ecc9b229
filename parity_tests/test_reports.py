"""reports: rendering from results.json and the CI gate's failure modes."""

from __future__ import annotations

import copy
import json

import torch

from reports.compare import compare
from reports.gate import baseline_from, check
from reports.render import render


def _results(max_diff: float = 0.0, mutation_caught: bool = True) -> dict:
    ok = compare("t:out", torch.ones(3) + max_diff, torch.ones(3), "block").to_json()
    mut = compare("t:out", torch.ones(3) + (1.0 if mutation_caught else 0.0), torch.ones(3), "op").to_json()
    return {
        "schema": 1, "created": "now",
        "provenance": {"preset": "tiny", "git_sha": "x", "versions": {}, "markexpr": ""},
        "summary": {"collected": 2, "passed": 2, "failed": 0, "skipped": 0, "duration_s": 1.0, "exitstatus": 0},
        "tests": {"a": "passed", "b": "passed"},
        "rows": [
            {"nodeid": "a", "row": "Full Layer 0", "component": "Talker", "variant": "base", "preset": "tiny",
             "notes": "", "result": ok},
            {"nodeid": "b", "row": "mutation x → Full Layer 0", "component": "Mutation self-test", "variant": "base",
             "preset": "tiny", "notes": "expected to FAIL", "result": mut},
        ],
    }


def test_render_writes_status_and_counts(tmp_path):
    res = tmp_path / "results.json"
    res.write_text(json.dumps(_results()))
    also = tmp_path / "released.json"
    rel = _results(max_diff=2e-6)
    rel["provenance"]["markexpr"] = "slow"
    also.write_text(json.dumps(rel))
    render(res, tmp_path / "V.md", [also])
    md = (tmp_path / "V.md").read_text()
    assert "2 passed, 0 failed, 0 skipped of 2 collected" in md
    assert "| Talker · Full Layer 0" in md and "0 (bit-exact)" in md and "✅ caught" in md
    assert "## Opt-in run: slow" in md and "e-06 " in md  # fp32 rounding of 1 + 2e-6
    assert (tmp_path / "summary.json").exists() and (tmp_path / "plots" / "max_abs.png").exists()


def test_gate_flags_regressions_missing_rows_and_lost_mutations():
    base = baseline_from(_results(max_diff=1e-7))
    assert check(_results(max_diff=1e-7), base) == []
    assert any("grew" in p for p in check(_results(max_diff=5e-6), base))  # still in tier, but 50x worse
    assert any("fails now" in p for p in check(_results(max_diff=1.0), base))
    assert any("no longer caught" in p for p in check(_results(mutation_caught=False), base))
    fewer = copy.deepcopy(_results())
    fewer["rows"] = fewer["rows"][:1]
    assert any("not measured" in p for p in check(fewer, base))
