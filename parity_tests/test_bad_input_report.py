"""``reports/bad_input.py``: the "Bad input" section of VALIDATION.md, from results.json's ``bad_input`` list."""

from __future__ import annotations

from reports.bad_input import MIN_CASES, bad_input_section


def _case(i: int, msg: str = "x.json: not valid JSON") -> dict:
    return {"nodeid": f"parity_tests/test_bad_input_cli.py::t[{i}]", "surface": "python -m impl synthesize",
            "case": f"case {i}", "outcome": "one-line error", "message": msg}


def test_section_lists_every_case_and_goes_red_below_the_minimum_or_on_a_failed_test():
    assert bad_input_section({"tests": {}, "bad_input": []}) == []
    few = "\n".join(bad_input_section({"bad_input": [_case(0, "a | b\nc"), _case(1)], "tests": {}}))
    assert few.startswith("## Bad input") and "❌ 2 bad inputs checked" in few
    assert "a \\| b c" in few and "| case 1 " in few  # one line per cell, pipes escaped
    many = {"bad_input": [_case(i) for i in range(MIN_CASES)],
            "tests": {"parity_tests/test_bad_input_cli.py::t[0]": "passed"}}
    assert "✅ 40 bad inputs checked" in "\n".join(bad_input_section(many))
    many["tests"]["parity_tests/test_bad_input_api.py::u"] = "failed"
    red = "\n".join(bad_input_section(many))
    assert "❌ 40" in red and "`parity_tests/test_bad_input_api.py::u`: failed" in red


def test_render_markdown_includes_the_section():
    from reports.render import render_markdown

    data = {"schema": 1, "created": "2026-01-01T00:00:00+00:00", "code_hash": "", "provenance": {},
            "summary": {"passed": 1, "failed": 0, "skipped": 0, "collected": 1},
            "tests": {}, "rows": [], "bad_input": [_case(0)]}
    try:
        md = render_markdown(data)
    except Exception as e:  # the results schema belongs to reports/results.py; say what it refused
        raise AssertionError(f"render_markdown refused a minimal results dict: {e}") from None
    assert "## Bad input" in md and "case 0" in md
