"""The "Bad input" section of ``VALIDATION.md``: one row per bad-input case the tests checked.

Rows come from ``results.json``'s ``"bad_input"`` list, which the ``bad_input`` fixture (conftest.py) fills only
after a test has asserted the message (one line, naming the file/key/value) and that no file was created or
changed. A bad-input test that failed records nothing for the failing case, so the section also lists the
failed tests of the files that record cases (and of ``test_bad_input_*``) by name: a missing row is never silent.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from tabulate import tabulate

MIN_CASES = 40  # what the bad-input issue asks the report to show
MAX_MESSAGE = 220  # characters of a message shown in the table


def _cell(text: str, limit: int = MAX_MESSAGE) -> str:
    """One Markdown table cell: a single line, pipes escaped, long text cut with an ellipsis."""
    text = " ".join(str(text).split())
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return text.replace("|", "\\|")


def _cases_and_failures(data: dict[str, Any], faults: bool, file_marker: str) -> tuple[list[dict], list[str], set]:
    """The recorded cases of one section (fault cases or the others), the failed tests of the files that record them
    (and of every file whose name holds ``file_marker``, in case all of its tests failed), and those files."""
    cases = [c for c in data.get("bad_input") or [] if isinstance(c, dict) and _is_fault(c) == faults]
    tests = data.get("tests") or {}
    files = {str(c.get("nodeid", "")).split("::")[0] for c in cases} - {""}
    failed = sorted(t for t, o in tests.items() if o not in ("passed", "skipped")
                    and (t.split("::")[0] in files or file_marker in t))
    return cases, [f"- `{t}`: {tests[t]}" for t in failed], files


def bad_input_section(data: dict[str, Any]) -> list[str]:
    """Markdown lines for the section (empty when the results hold no bad-input cases and no such tests)."""
    cases, failed, files = _cases_and_failures(data, False, "test_bad_input_")
    if not cases and not failed:
        return []
    lines = ["## Bad input", ""]
    status = "✅" if len(cases) >= MIN_CASES and not failed else "❌"
    by_outcome = Counter(c.get("outcome", "") for c in cases)
    shown = ", ".join(f"`{f}`" for f in sorted(files)) or "`parity_tests/test_bad_input_*.py`"
    lines += [f"{status} {len(cases)} bad inputs checked (at least {MIN_CASES} expected), by the tests in "
              f"{shown}: each asserted the line the user sees (one line, naming the "
              "file, key or value) and, where a file could be written, that none was created or changed, before "
              "recording it here. A *handled* case is input we accept on purpose; its message is what its test "
              "recorded: the warning the user sees where there is one, else the test's own summary of the outcome. "
              "Outcomes: " + "; ".join(f"{n} × {o}" for o, n in by_outcome.most_common()) + ".", ""]
    if failed:
        lines += ["Failed bad-input tests (their cases are missing below):", "", *failed, ""]
    return lines + _table(cases)


def _table(cases: list[dict]) -> list[str]:
    rows = [[_cell(c.get("surface", ""), 40), _cell(c.get("case", ""), 80), _cell(c.get("outcome", ""), 60),
             _cell(c.get("message", ""))]
            for c in sorted(cases, key=lambda c: str(c.get("surface", "")))]  # stable: test order kept
    return [tabulate(rows, headers=["surface", "case", "outcome", "message (an error: the line the user sees; "
                                                             "handled: what the test recorded)"],
                     tablefmt="github"), ""]


# Fault cases (parity_tests/test_faults.py) are recorded through the same fixture with a surface "faults: <tool>":
# a full disk, a read-only or missing folder, SIGINT/SIGTERM mid-write, two writers at once, for each writer.
FAULT_PREFIX = "faults: "
MIN_FAULT_CASES = 40


def _is_fault(c: dict) -> bool:
    return str(c.get("surface", "")).startswith(FAULT_PREFIX)


def faults_section(data: dict[str, Any]) -> list[str]:
    """The "Faults" section: what each file writer did under an injected fault (empty when none was recorded and
    no fault test ran)."""
    cases, failed, _ = _cases_and_failures(data, True, "test_faults")
    if not cases and not failed:
        return []
    status = "✅" if len(cases) >= MIN_FAULT_CASES and not failed else "❌"
    tools = sorted({str(c.get("surface", ""))[len(FAULT_PREFIX):] for c in cases})
    lines = ["## Faults", "",
             f"{status} {len(cases)} fault cases checked (at least {MIN_FAULT_CASES} expected) on {len(tools)} "
             f"writers ({', '.join(f'`{t}`' for t in tools)}): each injected a fault (a full filesystem, a "
             "read-only or missing folder, SIGINT or SIGTERM while the file was being written, two writers at "
             "once) or handed the tool a damaged file (binary results, NaN rows, a huge step number), asserted what "
             "the user sees (one line naming the path, or the handled outcome) and, where a file was there before, "
             "that it is byte-identical afterwards with no temporary file left, before recording it here.", ""]
    if failed:
        lines += ["Failed fault tests (their cases are missing below):", "", *failed, ""]
    return lines + _table(cases)


__all__ = ["FAULT_PREFIX", "MIN_CASES", "MIN_FAULT_CASES", "bad_input_section", "faults_section"]
