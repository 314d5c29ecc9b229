"""Typed results: what a parity run recorded, kept as objects from the collector through render and gate.

- ``Record``: one comparison a test recorded (its row, preset, variant, what it compares, whether the row is a
  deliberate bug that must turn red, the ``CompareResult``).
- ``RowResult``: the records of one (component, row, preset) folded together, joined with the outcomes of the
  tests that recorded them: a row is green only if its comparisons passed *and* its tests passed.
- ``RunResults``: a whole results file (provenance, summary, test outcomes, skip reasons, records, bad-input
  cases, and the hash of the code that produced it); ``load`` turns any malformed file into one ``ResultsError``
  line naming the file and the key at fault.

``code_hash`` hashes the code that decides the numbers (``impl/``, ``reference_export/``, ``parity_tests/``,
``reports/*.py``, ``conftest.py``), not the generated report or the committed baseline, so ``pytest`` then
``reports gate`` in one tree agree, while results from other code are refused.
"""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .compare import CompareResult

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = 2

# What a row compares. "ours vs upstream" is the claim the report exists for; the others are marked so that a
# self-consistency row is never read as parity with upstream.
UPSTREAM = "ours vs upstream"
OURS = "ours vs ours"
FORMULA = "ours vs a formula"
LIBROSA = "ours vs librosa"
COMPARES = (UPSTREAM, OURS, FORMULA, LIBROSA)

# The code whose change invalidates results (item: results carry the code hash). Globs relative to the root.
CODE_GLOBS = ("impl/**/*.py", "impl/**/*.json", "reference_export/**/*.py", "reference_export/**/*.json",
              "parity_tests/**/*.py", "reports/*.py", "conftest.py")
# The code a recorded section measures: a section recorded before the last change to these is flagged stale. Not
# only the model: the tests that judge it, the comparison engine and the collector decide what a row says.
MEASURED_PATHS = ("impl", "reference_export", "parity_tests", "reports/compare.py", "conftest.py")


class ResultsError(ValueError):
    """A results file that cannot be used; the message is one line naming the file and what is wrong."""


def code_files(root: Path = ROOT) -> list[Path]:
    files: set[Path] = set()
    for g in CODE_GLOBS:
        files.update(p for p in root.glob(g) if p.is_file() and "__pycache__" not in p.parts)
    return sorted(files)


def code_hash(root: Path = ROOT) -> str:
    """sha256 (16 hex digits) over the path and bytes of every file in ``CODE_GLOBS``."""
    h = hashlib.sha256()
    for f in code_files(root):
        h.update(f.relative_to(root).as_posix().encode() + b"\0")
        h.update(f.read_bytes())
        h.update(b"\0")
    return h.hexdigest()[:16]


# ------------------------------------------------------------------------------------------------ records


def _result_from_json(d: dict, where: str) -> CompareResult:
    if not isinstance(d, dict):
        raise ResultsError(f"{where}: 'result' is {type(d).__name__}, not an object")
    fields = set(CompareResult.__dataclass_fields__)
    kw = {k: v for k, v in d.items() if k in fields}
    for k in ("name", "tier", "passed"):
        if k not in kw:
            raise ResultsError(f"{where}: result lacks '{k}'")
    for k, v in list(kw.items()):
        if isinstance(v, str) and v in ("inf", "-inf", "nan") and k not in ("name", "tier", "message", "dtype",
                                                                              "judged_by"):
            kw[k] = float(v)
    kw.setdefault("shape", [])
    kw.setdefault("ref_shape", [])
    kw.setdefault("dtype", "")
    return CompareResult(**kw)


@dataclass
class Record:
    """One recorded comparison."""

    component: str
    row: str
    result: CompareResult
    preset: str = ""
    variant: str = ""
    compares: str = UPSTREAM
    expect_fail: bool = False  # a mutation self-test: the row must turn red
    notes: str = ""
    nodeid: str = ""

    def __post_init__(self) -> None:
        if self.compares not in COMPARES:
            raise ValueError(f"row {self.row!r}: compares={self.compares!r}; expected one of {COMPARES}")

    def to_json(self) -> dict[str, Any]:
        return {"nodeid": self.nodeid, "component": self.component, "row": self.row, "preset": self.preset,
                "variant": self.variant, "compares": self.compares, "expect_fail": self.expect_fail,
                "notes": self.notes, "result": self.result.to_json()}

    @classmethod
    def from_json(cls, d: Any, where: str) -> Record:
        if not isinstance(d, dict):
            raise ResultsError(f"{where}: a row is {type(d).__name__}, not an object")
        for k in ("component", "row", "result"):
            if k not in d:
                raise ResultsError(f"{where}: row lacks '{k}'")
        notes = d.get("notes") or ""
        expect_fail = d.get("expect_fail")
        if expect_fail is None:  # schema 1 (the recorded released files): mutations were marked in the notes
            expect_fail = d["component"] == "Mutation self-test" or "expected to FAIL" in notes
            notes = notes.replace("expected to FAIL; ", "").replace("expected to FAIL", "")
        compares = d.get("compares", UPSTREAM)
        if compares not in COMPARES:
            raise ResultsError(f"{where}: row {d['row']!r} has compares={compares!r}; expected one of {COMPARES}")
        return cls(component=d["component"], row=d["row"], result=_result_from_json(d["result"], where),
                   preset=d.get("preset") or "", variant=d.get("variant") or "", compares=compares,
                   expect_fail=bool(expect_fail), notes=notes, nodeid=d.get("nodeid") or "")


def _numeric(r: CompareResult) -> bool:
    """Whether ``r`` measured a difference (a failed shape check, a missing tap or a functional verdict did not)."""
    return (not r.judged_by and r.tier != "functional" and r.n > 0 and list(r.shape) == list(r.ref_shape))


@dataclass
class RowResult:
    """One report row: every record of (component, row, preset), and the outcomes of the tests that made them."""

    component: str
    row: str
    preset: str
    compares: str
    expect_fail: bool
    results: list[CompareResult] = field(default_factory=list)
    variants: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    tests: dict[str, str] = field(default_factory=dict)  # nodeid -> outcome (passed / failed / error / …)

    @property
    def key(self) -> str:
        return f"{self.component} · {self.row} · {self.preset}"

    @property
    def n(self) -> int:
        return len(self.results)

    @property
    def n_failed(self) -> int:
        return sum(not r.passed for r in self.results)

    @property
    def tests_failed(self) -> list[str]:
        """Tests of this row that did not pass: a failed assert after recording makes the row red too."""
        return [t for t, o in self.tests.items() if o not in ("passed", "skipped")]

    @property
    def comparisons_passed(self) -> bool:
        return all(r.passed for r in self.results)

    @property
    def ok(self) -> bool:
        """Green: for a parity row, all comparisons and tests passed; for a mutation row, the row turned red and
        the test that demanded it passed."""
        if self.tests_failed:
            return False
        return (not self.comparisons_passed) if self.expect_fail else self.comparisons_passed

    @property
    def status(self) -> str:
        if self.expect_fail:
            return "✅ caught" if self.ok else "❌ NOT caught"
        if self.tests_failed and self.comparisons_passed:
            return "❌ FAIL (test)"
        return "✅ pass" if self.ok else "❌ FAIL"

    @property
    def tiers(self) -> list[str]:
        return list(dict.fromkeys(r.tier for r in self.results))

    @property
    def numeric(self) -> list[CompareResult]:
        return [r for r in self.results if _numeric(r)]

    @property
    def max_abs(self) -> float | None:
        """The worst measured difference; None when no comparison of this row measured one."""
        vals = [float(r.max_abs) for r in self.numeric]
        return max(vals) if vals else None

    @property
    def judged_by(self) -> list[str]:
        """How the non-numeric results were judged (e.g. "functional checks", "strict loader refused")."""
        out = []
        for r in self.results:
            if _numeric(r):
                continue
            how = r.judged_by or ("functional checks" if r.tier == "functional" else
                                  "shape mismatch" if list(r.shape) != list(r.ref_shape) else "no elements")
            if how not in out:
                out.append(how)
        return out

    @property
    def worst(self) -> CompareResult:
        def key(r: CompareResult) -> tuple[int, float]:
            v = float(r.max_abs)
            return (not r.passed, v if math.isfinite(v) else 1e300)
        return max(self.results, key=key)

    @property
    def min_cosine(self) -> float:
        return min((float(r.cosine) for r in self.numeric), default=math.nan)

    @property
    def needed_atol(self) -> float:
        return max((float(r.needed_atol) for r in self.numeric), default=0.0)


# ------------------------------------------------------------------------------------------------ a run


@dataclass
class RunResults:
    provenance: dict[str, Any]
    summary: dict[str, Any]
    records: list[Record]
    tests: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # nodeid -> skip reason
    bad_input: list[dict] = field(default_factory=list)
    code_hash: str | None = None
    created: str = ""
    schema: int = SCHEMA
    durations: dict[str, float] = field(default_factory=dict)  # nodeid -> seconds (setup + call + teardown)
    # marker -> node ids of the tests carrying it (conftest.LISTED_MARKERS); None: not recorded (an older file)
    marked: dict[str, list[str]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # other top-level keys (other sections' data), kept as is
    source: str = ""

    def rows(self) -> list[RowResult]:
        groups: dict[tuple[str, str, str], RowResult] = {}
        for rec in self.records:
            k = (rec.component, rec.row, rec.preset)
            g = groups.get(k)
            if g is None:
                g = groups[k] = RowResult(rec.component, rec.row, rec.preset, rec.compares, rec.expect_fail)
            g.results.append(rec.result)
            g.expect_fail = g.expect_fail or rec.expect_fail
            if rec.compares != g.compares and rec.compares != UPSTREAM:
                g.compares = rec.compares if g.compares == UPSTREAM else f"{g.compares}; {rec.compares}"
            if rec.variant and rec.variant not in g.variants:
                g.variants.append(rec.variant)
            if rec.notes and rec.notes not in g.notes:
                g.notes.append(rec.notes)
            if rec.nodeid:
                g.tests[rec.nodeid] = self.tests.get(rec.nodeid, "not run")
        return list(groups.values())

    @property
    def presets(self) -> list[str]:
        """The presets the rows ran at (a recorded file's provenance may name only the session default)."""
        return sorted({r.preset for r in self.records if r.preset}) or [str(self.provenance.get("preset", ""))]

    def to_json(self) -> dict[str, Any]:
        return {"schema": self.schema, "created": self.created, "code_hash": self.code_hash,
                "provenance": self.provenance, "summary": self.summary, "tests": self.tests,
                "skipped": self.skipped, "rows": [r.to_json() for r in self.records], "bad_input": self.bad_input,
                "durations": self.durations, **({} if self.marked is None else {"marked": self.marked}),
                **self.extra}

    @classmethod
    def from_json(cls, d: Any, source: str = "results") -> RunResults:
        if not isinstance(d, dict):
            raise ResultsError(f"{source}: top level is {type(d).__name__}, not an object")
        for k in ("provenance", "summary", "rows"):
            if k not in d:
                raise ResultsError(f"{source}: missing '{k}' (not a results file written by the parity suite)")
        if not isinstance(d["rows"], list):
            raise ResultsError(f"{source}: 'rows' is {type(d['rows']).__name__}, not a list")
        for k in ("provenance", "summary"):
            if not isinstance(d[k], dict):
                raise ResultsError(f"{source}: '{k}' is {type(d[k]).__name__}, not an object")
        for k, typ in (("tests", dict), ("skipped", dict), ("bad_input", list), ("durations", dict), ("marked", dict)):
            if d.get(k) is not None and not isinstance(d[k], typ):
                raise ResultsError(f"{source}: '{k}' is {type(d[k]).__name__}, not a{'n object' if typ is dict else ' list'}")
        summ = d["summary"]
        for k in ("passed", "failed", "skipped", "collected"):
            if not isinstance(summ.get(k), int):
                raise ResultsError(f"{source}: summary.{k} is {summ.get(k)!r}, not an integer")
        records = [Record.from_json(r, f"{source}: rows[{i}]") for i, r in enumerate(d["rows"])]
        known = {"schema", "created", "code_hash", "provenance", "summary", "tests", "skipped", "rows", "bad_input",
                 "durations", "marked"}
        marked = d.get("marked")
        return cls(provenance=d["provenance"], summary=summ, records=records, tests=dict(d.get("tests") or {}),
                   skipped=dict(d.get("skipped") or {}), bad_input=list(d.get("bad_input") or []),
                   durations=dict(d.get("durations") or {}),
                   marked=None if marked is None else {str(m): list(ids) for m, ids in marked.items()},
                   code_hash=d.get("code_hash"), created=str(d.get("created", "")), schema=int(d.get("schema", 1)),
                   extra={k: v for k, v in d.items() if k not in known}, source=source)


def marker_not_run(run: RunResults, marker: str = "cuda") -> str:
    """"" when at least one test carrying ``marker`` passed in ``run``; otherwise one line saying why not (none
    collected, all skipped with the first reason, none passed, or an older file that does not record it). A run
    whose CUDA tests all skipped has shown nothing about CUDA, whatever its other rows say."""
    ids = (run.marked or {}).get(marker)
    if ids is None:
        return f"{run.source or 'the results'} does not record which tests carry the '{marker}' marker (an older " \
               f"results file): cannot tell whether they ran"
    if not ids:
        return f"no '{marker}'-marked test was collected"
    if any(run.tests.get(t) == "passed" for t in ids):
        return ""
    skipped = [t for t in ids if run.tests.get(t) == "skipped"]
    if len(skipped) == len(ids):
        return f"all {len(ids)} '{marker}'-marked tests skipped ({run.skipped.get(ids[0]) or 'reason not recorded'})"
    return f"none of the {len(ids)} '{marker}'-marked tests passed"


def read_json(path: Path, name: str, missing: str, empty: str, invalid: str = "") -> Any:
    """A JSON file's content; a missing, unreadable, empty or non-JSON file is one ``ResultsError`` line naming it
    (``missing``/``empty`` say what to do; ``invalid`` prefixes "not valid JSON")."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ResultsError(f"{name}: {missing}") from None
    except OSError as e:
        raise ResultsError(f"{name}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError as e:  # a binary file (or another encoding) where JSON text belongs
        raise ResultsError(f"{name}: {invalid}not a UTF-8 text file (byte 0x{e.object[e.start]:02x} at offset "
                           f"{e.start}); not JSON") from None
    if not text.strip():
        raise ResultsError(f"{name}: {empty}")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ResultsError(f"{name}: {invalid}not valid JSON ({e})") from None


def load(path: Path, shown: str | None = None) -> RunResults:
    """Read a results file; any problem is one ``ResultsError`` line naming the file."""
    name = shown or str(path)
    d = read_json(path, name, "no results (run the parity suite first: ./run.sh report)",
                  "empty file (not a results file)")
    return RunResults.from_json(d, name)


def check_fresh(run: RunResults, root: Path = ROOT) -> None:
    """Refuse results that were not produced by the code in this working tree (one line saying so)."""
    now = code_hash(root)
    if not run.code_hash:
        raise ResultsError(f"{run.source}: carries no code hash (written by an older harness): re-run the suite "
                           f"(./run.sh report) before rendering or gating")
    if run.code_hash != now:
        raise ResultsError(f"{run.source}: produced by code {run.code_hash}, but the working tree is {now} "
                           f"(impl/, reference_export/, parity_tests/, reports/*.py or conftest.py changed since): "
                           f"re-run the suite (./run.sh report)")


# ------------------------------------------------------------------------------------------------ freshness


def _git(root: Path, *args: str) -> str | None:
    try:
        p = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return p.stdout.strip() if p.returncode == 0 else None


@dataclass(frozen=True)
class Freshness:
    sha: str
    date: str  # when the section was recorded
    stale: str  # "" when the recorded sha includes the last change to the measured code; else why it is stale


def _shown_paths(paths: tuple[str, ...] | list[str], root: Path) -> str:
    return ", ".join(f"{p}/" if (root / p).is_dir() else p for p in paths)


def freshness(sha: str, created: str, root: Path = ROOT, paths: tuple[str, ...] = MEASURED_PATHS) -> Freshness:
    """Whether a section recorded at ``sha`` still measures the code in ``paths`` as it is in this tree. A sha
    recorded from a tree with uncommitted changes carries ``+dirty`` (``reference_export.export.git_sha``); its
    commit is what is looked up."""
    commit = sha.removesuffix("+dirty")
    if not commit or _git(root, "cat-file", "-e", f"{commit}^{{commit}}") is None:
        return Freshness(sha, created, f"commit {commit or '(none)'} is unknown here: cannot tell whether "
                                       f"{_shown_paths(paths, root)} changed since")
    changed = []  # the measured paths whose last change is not in the recorded commit
    for p in paths:
        last = _git(root, "rev-list", "-1", "HEAD", "--", p)
        if last and _git(root, "merge-base", "--is-ancestor", last, commit) is None:
            changed.append((p, last))
    if changed:
        newest = _git(root, "rev-list", "-1", "HEAD", "--", *[p for p, _ in changed]) or changed[0][1]
        return Freshness(sha, created, f"{_shown_paths([p for p, _ in changed], root)} changed after it (last "
                                       f"change {newest[:10]})")
    dirty = _git(root, "status", "--porcelain", "--", *paths)
    if dirty:
        return Freshness(sha, created, f"{_shown_paths(paths, root)} have uncommitted changes")
    return Freshness(sha, created, "")
