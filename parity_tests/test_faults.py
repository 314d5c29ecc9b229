"""Faults while the tools write their files (issue 19): a full filesystem, a read-only folder, a missing folder,
SIGINT and SIGTERM in the middle of a write, two writers at once — for each writer of the harness (`reports gate
--update`, `reports render`, `reports compare --json/--out`, `impl bench --json`, the HDF5 capture writer, the text
tokenizer files, `reference_export synth`, pytest's results file).

Each case asserts what the user sees (one line naming the path, or the handled outcome), that every file that was
there before is byte-identical afterwards, and that no temporary file is left, then records itself through the
``bad_input`` fixture with the surface ``faults: <tool>`` (the "Faults" section of VALIDATION.md).

The full and read-only filesystems are real: a small tmpfs mounted for the test (filled up, or remounted read-only;
needs root with the right to mount). Without that right, the same faults are injected in
``impl.outfile`` (the flush of the temporary file raises ENOSPC; the writability probe says EROFS), which every
writer goes through — ``test_no_writer_writes_its_final_path_directly`` proves that "every" by scanning the code.
``QWEN3TTS_FAULTS_NO_MOUNT=1`` runs the stubbed variant where mounting works.
Signals are sent to a forked child (a subprocess sharing the imports already made) while it is inside the write.
"""

from __future__ import annotations

import ast
import contextlib
import errno
import fnmatch
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

import impl.outfile as outfile
from impl.outfile import OutputError

ROOT = Path(__file__).resolve().parent.parent
PNG = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------ a filesystem of our own


class FaultFS:
    """A folder on a small tmpfs of its own (when we may mount one), which a test fills up or makes read-only."""

    def __init__(self, where: Path, monkeypatch: pytest.MonkeyPatch, size: str = "8m"):
        where.mkdir()
        self.dir = where
        self.mp = monkeypatch
        if os.environ.get("QWEN3TTS_FAULTS_NO_MOUNT"):  # to run the stubbed variant where mounting works
            why = "QWEN3TTS_FAULTS_NO_MOUNT is set"
        else:
            try:
                r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0777", "tmpfs", str(where)],
                                   capture_output=True, text=True)
                why = r.stderr.strip()[:80] if r.returncode else ""
            except OSError as e:  # no mount command
                why = str(e)
        self.mounted = not why
        self.how = "a real tmpfs" if self.mounted else "stubbed in impl.outfile"

    def fill(self) -> None:
        """No byte left: the filesystem is filled by a filler file (or the flush of every write raises ENOSPC)."""
        if not self.mounted:
            def no_space(p, directory=False):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(p))
            self.mp.setattr(outfile, "_fsync_path", no_space)
            return
        with open(self.dir / "filler", "wb", buffering=0) as f:  # unbuffered: nothing left to flush at close
            for chunk in (1 << 20, 1 << 12, 1):
                with contextlib.suppress(OSError):
                    while True:
                        f.write(b"\0" * chunk)

    def readonly(self) -> None:
        if not self.mounted:
            def read_only(folder, shown, name="out"):
                raise OutputError(f"{shown}: cannot write in {folder} ({os.strerror(errno.EROFS)})")
            self.mp.setattr(outfile, "_probe", read_only)
            return
        subprocess.run(["mount", "-o", "remount,ro", str(self.dir)], check=True)

    def close(self) -> None:
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.dir)], check=False)


@pytest.fixture
def fs(tmp_path, monkeypatch):
    f = FaultFS(tmp_path / "fs", monkeypatch)
    yield f
    f.close()


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative name -> bytes)."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _leftovers(folder: Path) -> list[str]:
    """Temporary or probe files/folders that a writer left behind."""
    if not folder.exists():
        return []
    return [str(p.relative_to(folder)) for p in folder.rglob("*")
            if any(m in p.name for m in (".tmp-", ".probe-", ".old-")) or p.name.endswith(".tmp")]


def _one_line(msg: str, names: str) -> None:
    assert msg and "\n" not in msg.strip() and "Traceback" not in msg, msg
    assert names in msg, (names, msg)


# ------------------------------------------------------------------------------------------ the writers


def _results(hash_: str) -> dict:
    """A small results file: one green row and one caught mutation, both tests passed, under code hash ``hash_``."""
    from reports.compare import compare
    from reports.results import Record

    ok = compare("t:out", torch.ones(3), torch.ones(3), "block")
    mut = compare("t:out", torch.ones(3) + 1.0, torch.ones(3), "op")
    rows = [Record(component="Talker", row="Full Layer 0", result=ok, preset="tiny", variant="base",
                   nodeid="a").to_json(),
            Record(component="Mutation self-test", row="mutation x → Full Layer 0", result=mut, preset="tiny",
                   variant="base", nodeid="b", expect_fail=True).to_json()]
    return {"schema": 2, "created": "2026-01-01T00:00:00+00:00", "code_hash": hash_,
            "provenance": {"preset": "tiny", "git_sha": "x", "versions": {}, "markexpr": ""},
            "summary": {"collected": 2, "passed": 2, "failed": 0, "errors": 0, "skipped": 0, "duration_s": 1.0,
                        "exitstatus": 0},
            "tests": {"a": "passed", "b": "passed"}, "skipped": {}, "rows": rows, "bad_input": []}


@dataclass
class Inputs:
    root: Path  # an empty "code root": results carry its code hash, so concurrent edits elsewhere cannot stale them
    results: Path
    ours: Path
    ref: Path
    model: Path
    capsys: pytest.CaptureFixture


@pytest.fixture
def inputs(tmp_path, capsys, monkeypatch) -> Inputs:
    from reference_export.h5io import write_refs
    from reports.results import code_hash

    src = tmp_path / "in"
    (src / "root").mkdir(parents=True)
    (src / "results.json").write_text(json.dumps(_results(hash_=code_hash(src / "root"))))
    recs = {"m.a:out": [torch.ones(2, 3)], "m.b:out": [torch.arange(6.0).reshape(2, 3)]}
    ref = write_refs(src / "ref.h5", meta={"checkpoint_sha256": "ab" * 32, "case_name": "toy"}, case={}, inputs={},
                     records=recs, progress=False)
    np.savez(src / "ours.npz", **{k: v[0].numpy() for k, v in recs.items()})
    (src / "model").mkdir()
    (src / "model" / "config.json").write_text(json.dumps({"tts_model_size": "tiny"}))
    return Inputs(src / "root", src / "results.json", src / "ours.npz", ref, src / "model", capsys)


def _gate(folder: Path, i: Inputs) -> str:
    from reports.gate import gate

    i.capsys.readouterr()
    rc = gate(i.results, folder / "baseline.json", update=True, also=[], root=i.root)
    out = i.capsys.readouterr().out.strip()
    assert rc in (0, 2), out
    return "" if rc == 0 else out


def _render(folder: Path, i: Inputs) -> str:
    from reports.render import render

    try:
        render(i.results, folder / "VALIDATION.md", [], baseline=None, root=i.root)
    except OutputError as e:
        return f"reports: {e}"
    return ""


def _compare(folder: Path, i: Inputs, json_out: bool) -> str:
    from reports.port_compare import main_compare

    i.capsys.readouterr()
    rc = main_compare(str(i.ours), str(i.ref), "stack", [], str(folder / "c.json") if json_out else None,
                      out_dir=None if json_out else str(folder / "port"))
    err = i.capsys.readouterr().err.strip()
    assert rc in (0, 2), err
    return "" if rc == 0 else err


class _Measured(Exception):
    pass


def _bench(folder: Path, i: Inputs) -> str:
    """``python -m impl bench`` with the measurement replaced by a stub that notes it ran: a fault on ``--json``
    must be said before it."""
    import impl.bench as bench

    reached = []
    mp = pytest.MonkeyPatch()
    try:
        mp.setattr(bench, "read_bandwidth_gbs", lambda *a, **k: {"floor": 1.0})
        mp.setattr(bench, "measure_ours", lambda *a, **k: reached.append(1) or {"bytes_per_frame": 1})
        mp.setattr(bench, "provenance", lambda *a, **k: {"cpu": "stub"})
        mp.setattr(bench, "build_runs", lambda *a, **k: [{"device": "cpu", "dtype": "float32", "preset": "tiny",
                                                          "batch": 1, "frames": 3, "fast_mode": "eager"}])
        mp.setattr(bench, "print_table", lambda *a, **k: None)
        i.capsys.readouterr()
        rc = bench.main(["--model", str(i.model), "--json", str(folder / "b.json")])  # ours only: no upstream
    finally:
        mp.undo()
    err = i.capsys.readouterr().err.strip()
    assert rc in (0, 2), err
    if rc == 2 and reached and "free on its filesystem" not in err and "write failed" not in err:
        raise AssertionError(f"bench measured before refusing its --json: {err}")
    return "" if rc == 0 else err


def _capture(folder: Path, i: Inputs) -> str:
    from reference_export.h5io import write_refs

    recs = {f"m.l{k}:out": [torch.randn(64, 64)] for k in range(4)}
    try:
        write_refs(folder / "r.h5", meta={"checkpoint_sha256": "cd" * 32}, case={}, inputs={}, records=recs,
                   progress=False)
    except OutputError as e:
        return f"error: {e}"
    return ""


def _tokenizer(folder: Path, i: Inputs) -> str:
    from reference_export.tokenizer_files import write_text_tokenizer

    try:
        write_text_tokenizer(folder / "tok", progress=False)
    except OutputError as e:
        return f"error: {e}"
    return ""


@dataclass
class Writer:
    tool: str
    run: Callable[[Path, Inputs], str]  # writes into the folder; "" when it succeeded, else the line the user saw
    outputs: tuple[str, ...]  # the files it writes, relative to the folder
    makes_folder: bool = False  # a missing output folder is created (the output *is* a folder, or a cache entry)

    def old(self, rel: str) -> bytes:
        if self.tool == "impl bench --json":
            return b'{"runs": [], "old": true}'  # bench merges into an existing file: it must be a bench JSON
        return PNG + b"old " + rel.encode() if rel.endswith(".png") else b"old " + rel.encode()

    def seed(self, folder: Path) -> None:
        """Old versions of every output, so that "byte-identical afterwards" has something to compare."""
        for rel in self.outputs:
            p = folder / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(self.old(rel))


WRITERS = [
    Writer("reports gate --update", _gate, ("baseline.json",)),
    Writer("reports render", _render, ("VALIDATION.md", "summary.json", "plots/max_abs.png")),
    Writer("reports compare --json", lambda f, i: _compare(f, i, True), ("c.json",)),
    Writer("reports compare --out", lambda f, i: _compare(f, i, False),
           ("port/REPORT.md", "port/results.json", "port/error_growth.png"), makes_folder=True),
    Writer("impl bench --json", _bench, ("b.json",)),
    Writer("reference_export capture (HDF5 writer)", _capture, ("r.h5",), makes_folder=True),
    Writer("synthetic checkpoint text tokenizer files", _tokenizer,
           ("tok/vocab.json", "tok/merges.txt", "tok/tokenizer_config.json"), makes_folder=True),
]
IDS = [w.tool.split(" (")[0].replace(" ", "_") for w in WRITERS]


def _complete(p: Path, old: bytes = b"") -> None:
    """``p`` is a whole new file of its kind (not the ``old`` bytes, not cut)."""
    data = p.read_bytes()
    assert data != old, p
    if p.suffix == ".json":
        json.loads(data)
    elif p.suffix == ".png":
        assert data.startswith(PNG) and data.endswith(b"IEND\xaeB`\x82"), p
    elif p.suffix == ".h5":
        import h5py

        with h5py.File(p, "r") as f:
            assert "taps" in f
    else:
        assert data.strip(), p


# ------------------------------------------------------------------------------------------ full, read-only, missing


@pytest.mark.parametrize("w", WRITERS, ids=IDS)
def test_full_filesystem_keeps_the_old_files(w, fs, inputs, bad_input):
    w.seed(fs.dir)
    fs.fill()
    before = _snapshot(fs.dir)
    msg = w.run(fs.dir, inputs)
    assert _snapshot(fs.dir) == before and not _leftovers(fs.dir)
    _one_line(msg, str(fs.dir))
    assert "No space left on device" in msg or "free on its filesystem" in msg, msg
    bad_input(f"full filesystem ({fs.how}), old output present", "one line; old file byte-identical, no temp left",
              msg.replace(str(fs.dir), "<fs>"), f"faults: {w.tool}")


@pytest.mark.parametrize("w", WRITERS, ids=IDS)
def test_read_only_folder_is_refused_before_any_work(w, fs, inputs, bad_input):
    w.seed(fs.dir)
    fs.readonly()
    before = _snapshot(fs.dir)
    msg = w.run(fs.dir, inputs)
    assert _snapshot(fs.dir) == before and not _leftovers(fs.dir)
    _one_line(msg, str(fs.dir))
    assert "Read-only file system" in msg, msg
    bad_input(f"read-only output folder ({fs.how})", "refused, one line; old file byte-identical",
              msg.replace(str(fs.dir), "<fs>"), f"faults: {w.tool}")


@pytest.mark.parametrize("w", WRITERS, ids=IDS)
def test_missing_folder_is_refused_or_made(w, tmp_path, inputs, bad_input):
    folder = tmp_path / "missing" / "deeper"
    msg = w.run(folder, inputs)
    if w.makes_folder:
        assert msg == "", msg
        for rel in w.outputs:
            _complete(folder / rel)
        assert not _leftovers(tmp_path / "missing")
        bad_input("output folder does not exist", "handled: the folder is made (the output is a folder or a cache "
                  "entry), files written whole", ", ".join(w.outputs), f"faults: {w.tool}")
        return
    assert not (tmp_path / "missing").exists()
    _one_line(msg, str(folder))
    assert "does not exist" in msg, msg
    bad_input("output folder does not exist", "refused before any work, one line, nothing created",
              msg.replace(str(tmp_path), "<tmp>"), f"faults: {w.tool}")


@pytest.mark.parametrize("w", [w for w in WRITERS if not w.makes_folder or w.tool.startswith("reference_export")],
                         ids=[i for w, i in zip(WRITERS, IDS, strict=True)
                              if not w.makes_folder or w.tool.startswith("reference_export")])
def test_a_folder_where_the_file_goes_is_refused(w, tmp_path, inputs, bad_input):
    (tmp_path / w.outputs[0]).mkdir(parents=True)
    (tmp_path / w.outputs[0] / "keep").write_text("x")
    msg = w.run(tmp_path, inputs)
    _one_line(msg, w.outputs[0])
    assert "is a directory; an output file is expected here" in msg, msg
    assert (tmp_path / w.outputs[0] / "keep").read_text() == "x" and not _leftovers(tmp_path)
    bad_input("the output path is an existing folder", "refused, one line, the folder untouched",
              msg.replace(str(tmp_path), "<tmp>"), f"faults: {w.tool}")


# ------------------------------------------------------------------------------------------ signals, two writers


def _fork(fn: Callable[[], object]) -> int:
    """Run ``fn`` in a forked child; its exit code: 0 done, 130 KeyboardInterrupt, SystemExit's code, 1 otherwise."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        # Ctrl-C as a user's terminal delivers it: pytest itself may run with SIGINT ignored (a shell without job
        # control starts background commands that way), and the child would inherit that and never see the signal.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            fn()
            code = 0
        except KeyboardInterrupt:
            code = 130
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    return pid


def _exit_code(pid: int, timeout: float = 60) -> int:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError(f"child {pid} did not finish in {timeout} s")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("w", WRITERS, ids=IDS)
def test_signal_mid_write_keeps_the_old_files(w, sig, tmp_path, inputs, monkeypatch, bad_input):
    """The child stops inside the write (its temporary file complete, not yet renamed) until the signal comes."""
    folder = tmp_path / "out"
    folder.mkdir()
    w.seed(folder)
    before = _snapshot(folder)
    rfd, wfd = os.pipe()
    real = outfile._fsync_path

    def stall(p, directory=False):
        if not directory:
            os.write(wfd, b"R")
            time.sleep(60)
        real(p, directory)

    monkeypatch.setattr(outfile, "_fsync_path", stall)
    pid = _fork(lambda: w.run(folder, inputs))
    try:
        ready, _, _ = select.select([rfd], [], [], 60)
        assert ready, "the writer never reached its write"
        os.kill(pid, sig)
        code = _exit_code(pid)
    finally:
        os.close(rfd)
        os.close(wfd)
    assert code == 128 + sig, f"exit {code}"  # 130: KeyboardInterrupt, 143: SIGTERM turned into SystemExit
    assert _snapshot(folder) == before and not _leftovers(folder)
    bad_input(f"{signal.Signals(sig).name} while the file is being written", f"stopped, exit {code}; old files "
              "byte-identical, no temp left", f"exit {code}", f"faults: {w.tool}")


@pytest.mark.parametrize("w", WRITERS, ids=IDS)
def test_two_writers_at_once(w, tmp_path, inputs, monkeypatch, bad_input):
    """Both write at the same moment (each holds its temporary file while the other writes): both succeed, and
    each output is one whole file, with no temporary file left."""
    folder = tmp_path / "out"
    folder.mkdir()
    w.seed(folder)
    real = outfile._fsync_path

    def slow(p, directory=False):
        time.sleep(0.3)  # both children are inside their writes at once
        real(p, directory)

    monkeypatch.setattr(outfile, "_fsync_path", slow)
    codes = [_exit_code(pid) for pid in [_fork(lambda: _must_succeed(w, folder, inputs)) for _ in range(2)]]
    assert codes == [0, 0], codes
    for rel in w.outputs:
        _complete(folder / rel, w.old(rel))
    assert not _leftovers(folder)
    bad_input("two writers at once", "both succeed; each output one whole file, no temp left",
              ", ".join(w.outputs), f"faults: {w.tool}")


def _must_succeed(w: Writer, folder: Path, i: Inputs) -> None:
    msg = w.run(folder, i)
    if msg:
        raise SystemExit(3)


# ------------------------------------------------------------------------------------------ CLI exit status


def test_reports_cli_says_one_line_and_exits_2(tmp_path, fs, capsys, bad_input):
    """`reports render --out` and `reports gate --update` refuse an unwritable output before reading anything."""
    from reports.__main__ import main

    fs.readonly()
    for argv, tool in ((["render", "--out", str(fs.dir / "V.md")], "reports render"),
                       (["render", "--out", str(tmp_path / "no" / "V.md")], "reports render"),
                       (["gate", "--update", "--baseline", str(fs.dir / "b.json")], "reports gate --update")):
        capsys.readouterr()
        rc = main(argv)
        got = capsys.readouterr()
        msg = (got.err + got.out).strip()
        assert rc == 2, (argv, msg)
        _one_line(msg, "V.md" if "render" in argv else "b.json")
        bad_input(f"{argv[0]} {argv[1]} into an unwritable place", "one line, exit 2, before any work",
                  msg.replace(str(fs.dir), "<fs>").replace(str(tmp_path), "<tmp>"), f"faults: {tool}")


def test_compare_out_that_is_a_file_is_one_line(tmp_path, inputs, bad_input):
    (tmp_path / "port").write_text("a file")
    msg = _compare(tmp_path, inputs, json_out=False)
    _one_line(msg, "port")
    assert "is a file; an output folder is expected here" in msg
    assert (tmp_path / "port").read_text() == "a file" and not _leftovers(tmp_path)
    bad_input("--out names an existing file where a folder is expected", "refused before any work, one line",
              msg.replace(str(tmp_path), "<tmp>"), "faults: reports compare --out")


def test_compare_refused_for_its_input_leaves_no_empty_out_folder(tmp_path, inputs, capsys, bad_input):
    from reports.port_compare import main_compare

    rc = main_compare(str(tmp_path / "nope.npz"), str(inputs.ref), "stack", [], None, out_dir=str(tmp_path / "a" / "b"))
    err = capsys.readouterr().err.strip()
    assert rc == 2 and not (tmp_path / "a").exists(), err
    _one_line(err, "nope.npz")
    bad_input("--out folder missing and the dump missing too", "refused, one line; no empty folder made",
              err.replace(str(tmp_path), "<tmp>"), "faults: reports compare --out")


def test_binary_results_and_baseline_are_one_line(tmp_path, inputs, capsys, bad_input):
    from reports.gate import gate
    from reports.render import render

    blob = tmp_path / "blob.json"
    blob.write_bytes(b"\x89\xff\xfe\x00binary")
    capsys.readouterr()
    assert gate(blob, inputs.results.with_name("nope.json"), root=inputs.root) == 2
    msg = capsys.readouterr().out.strip()
    _one_line(msg, "blob.json")
    assert "not a UTF-8 text file" in msg
    bad_input("binary (non-UTF-8) results file", "one line, exit 2", msg.replace(str(tmp_path), "<tmp>"),
              "faults: reports gate --update")
    assert gate(inputs.results, blob, root=inputs.root) == 2
    msg = capsys.readouterr().out.strip()
    _one_line(msg, "blob.json")
    bad_input("binary (non-UTF-8) baseline", "one line, exit 2", msg.replace(str(tmp_path), "<tmp>"),
              "faults: reports gate --update")
    from reports.__main__ import main

    assert main(["render", "--results", str(blob), "--out", str(tmp_path / "V.md")]) == 2
    got = capsys.readouterr()
    _one_line(got.err.strip(), "blob.json")
    assert "not a UTF-8 text file" in got.err and not got.out and not (tmp_path / "V.md").exists()
    bad_input("binary (non-UTF-8) results file", "one line, exit 2, nothing written",
              got.err.strip().replace(str(tmp_path), "<tmp>"), "faults: reports render")
    with pytest.raises(SystemExit) as e:
        render(inputs.results, tmp_path / "V.md", [], baseline=blob, root=inputs.root)
    _one_line(str(e.value), "blob.json")
    assert not (tmp_path / "V.md").exists()
    bad_input("binary (non-UTF-8) baseline", "one line, nothing written", str(e.value).replace(str(tmp_path), "<tmp>"),
              "faults: reports render")


def test_gate_refuses_nan_and_inf_rows_whatever_passed_says(tmp_path, inputs, capsys, bad_input):
    from reports.gate import baseline_from, gate
    from reports.results import RunResults, code_hash

    good = _results(hash_=code_hash(inputs.root))
    base = tmp_path / "baseline.json"
    base.write_text(json.dumps(baseline_from(RunResults.from_json(good, "r"))))
    for field, value in (("max_abs", "nan"), ("cosine", "nan"), ("max_abs", "inf"), ("nmse", "inf")):
        bad = json.loads(json.dumps(good))
        r = bad["rows"][0]["result"]
        assert r["passed"] is True
        r[field] = value
        res = tmp_path / "r.json"
        res.write_text(json.dumps(bad))
        capsys.readouterr()
        assert gate(res, base, root=inputs.root) == 1
        out = capsys.readouterr().out
        assert f"non-finite numbers ({field}={value})" in out and "marked passed; refused" in out, out
        before = base.read_bytes()
        assert gate(res, base, update=True, root=inputs.root) == 1 and base.read_bytes() == before
        line = next(ln for ln in out.splitlines() if "non-finite" in ln).strip()
        bad_input(f"a row with {field}={value} and passed=true", "gate fails; --update refuses", line,
                  "faults: reports gate --update")
    assert gate(tmp_path / "r.json", base, root=inputs.root) == 1  # the last one stays refused
    good_path = tmp_path / "good.json"
    good_path.write_text(json.dumps(good))
    assert gate(good_path, base, root=inputs.root) == 0  # an exact match's SNR of +inf is not refused


def test_compare_huge_step_number_says_so_at_once(tmp_path, inputs, capsys, bad_input):
    """A tap named ``…@step_100000000`` is one missing-call line, found from the keys (no 10⁸-entry range)."""
    from reports.port_dumps import load_dump

    dump = tmp_path / "d.npz"
    np.savez(dump, **{"m.a:out@step_0": np.ones(3, np.float32), "m.a:out@step_100000000": np.ones(3, np.float32)})
    t0 = time.perf_counter()
    d = load_dump(dump)
    took = time.perf_counter() - t0
    assert took < 5, took
    (line,) = [p for p in d.problems if "m.a:out" in p]
    assert "@step_0..@step_100000000 with @step_1 missing" in line, line
    bad_input("a tap named name@step_100000000", "one line at once (a missing call), no huge set built", line,
              "faults: reports compare --json")


def test_bench_json_problems_are_said_before_the_measurement(tmp_path, inputs, bad_input):
    for content, needle, case in ((b"\xff\xfe binary", "not UTF-8 text", "--json is a binary (non-UTF-8) file"),
                                  (b"[1, 2]", "got list", "--json holds JSON that is not a bench file")):
        (tmp_path / "b.json").write_bytes(content)
        msg = _bench(tmp_path, inputs)  # _bench fails the test if the measurement ran before the refusal
        _one_line(msg, "b.json")
        assert needle in msg and (tmp_path / "b.json").read_bytes() == content, msg
        bad_input(case, "one line, exit 2, before the measurement", msg.replace(str(tmp_path), "<tmp>"),
                  "faults: impl bench --json")


def test_capture_writer_failing_inside_h5py_is_one_line_and_exits_cleanly(fs, bad_input):
    """The disk fills *during* the HDF5 write (the free-space estimate passed: another process took the space):
    h5py's multi-line error becomes one line, the old file is kept, no temp is left, and the process exits
    normally (the issue saw a segfault after h5py's error)."""
    if not fs.mounted:
        pytest.skip("needs a mounted tmpfs (a subprocess)")
    (fs.dir / "r.h5").write_bytes(b"old reference")
    fs.fill()
    before = _snapshot(fs.dir)
    code = f"""
import torch, reference_export.h5io as h
h.check_free_space = lambda *a, **k: None  # the estimate passed; the disk filled afterwards
try:
    h.write_refs({str(fs.dir / "r.h5")!r}, meta={{}}, case={{}}, inputs={{}},
                 records={{f"m.l{{i}}:out": [torch.randn(20000)] for i in range(8)}}, progress=False)
except ValueError as e:
    print("error:", e)
"""
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "Traceback" not in p.stderr, (p.returncode, p.stderr[-2000:])
    msg = p.stdout.strip()
    _one_line(msg, str(fs.dir / "r.h5"))
    assert "write failed (No space left on device); the old file is kept unchanged" in msg, msg
    assert _snapshot(fs.dir) == before and not _leftovers(fs.dir)
    bad_input("disk fills during the HDF5 write (h5py error)", "one line, old file kept, clean exit (no segfault)",
              msg.replace(str(fs.dir), "<fs>"), "faults: reference_export capture (HDF5 writer)")


# ------------------------------------------------------------------------------------------ synth, pytest, outfile


def test_synth_checks_its_output_folder_first(tmp_path, fs, bad_input):
    from reference_export.__main__ import main

    (tmp_path / "afile").write_text("x")
    fs.readonly()
    for out, needle in ((tmp_path / "afile", "is a file"), (fs.dir / "ck", "Read-only file system")):
        t0 = time.perf_counter()
        with contextlib.redirect_stderr(buf := __import__("io").StringIO()):
            rc = main(["synth", "--preset", "tiny", "--variant", "base", "--out", str(out)])
        msg = buf.getvalue().strip()
        assert rc == 2 and time.perf_counter() - t0 < 5, (rc, msg)
        _one_line(msg, str(out) if needle == "is a file" else str(fs.dir))
        assert needle in msg, msg
        bad_input(f"synth --out: {needle.lower()}", "refused before any work, one line, exit 2",
                  msg.replace(str(fs.dir), "<fs>").replace(str(tmp_path), "<tmp>"), "faults: reference_export synth")
    assert (tmp_path / "afile").read_text() == "x" and not _leftovers(tmp_path)


@pytest.mark.parametrize("sig", [None, signal.SIGINT, signal.SIGTERM], ids=["ENOSPC", "SIGINT", "SIGTERM"])
def test_atomic_dir_keeps_the_old_folder(sig, tmp_path, monkeypatch, bad_input):
    """The synthetic checkpoint's folder writer (``impl.outfile.atomic_dir``): a full disk or a signal while the
    new folder is being filled leaves the old folder as it was and no temporary folder."""
    old = tmp_path / "ck"
    old.mkdir()
    (old / "config.json").write_text("old")
    before = _snapshot(tmp_path)
    rfd, wfd = os.pipe()

    def fill_it():
        with outfile.atomic_dir(old) as tmp:
            outfile.write_text(tmp / "config.json", "new")
            if sig is None:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            os.write(wfd, b"R")
            time.sleep(60)

    if sig is None:
        with pytest.raises(OutputError) as e:
            fill_it()
        msg = str(e.value)
        _one_line(msg, str(old))
        assert "No space left on device" in msg and "old folder is kept" in msg
    else:
        pid = _fork(fill_it)
        assert select.select([rfd], [], [], 60)[0]
        os.kill(pid, sig)
        code = _exit_code(pid)
        assert code == 128 + sig, code
        msg = f"exit {code}"
    os.close(rfd)
    os.close(wfd)
    assert _snapshot(tmp_path) == before and not _leftovers(tmp_path)
    bad_input("full disk" if sig is None else f"{signal.Signals(sig).name} while the folder is filled",
              "old folder kept byte for byte, no temp folder left", msg.replace(str(tmp_path), "<tmp>"),
              "faults: reference_export synth")


def test_pytest_results_file_survives_a_full_disk(fs, bad_input):
    """conftest.py's results writer: a full disk keeps the previous results file byte for byte and says so."""
    if not fs.mounted:
        pytest.skip("needs a mounted tmpfs (the in-process stub does not reach a pytest subprocess)")
    res = fs.dir / "results.json"
    res.write_text('{"old": true}')
    fs.fill()
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        "parity_tests/test_faults.py::test_scanner_flags_direct_writes", f"--results={res}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    out = p.stdout + p.stderr
    line = next((ln[ln.index("results not written"):] for ln in out.splitlines() if "results not written" in ln), "")
    assert p.returncode != 0 and "No space left on device" in line, out[-2000:]
    assert res.read_text() == '{"old": true}' and not _leftovers(fs.dir)
    bad_input("pytest --results on a full disk", "one line; previous results byte-identical; pytest exit non-zero",
              line.replace(str(fs.dir), "<fs>"), "faults: pytest results (conftest.py)")


@pytest.mark.slow
def test_synth_and_synthesize_on_a_full_disk(tmp_path, fs, checkpoint_dir, bad_input):
    """The whole commands (tens of seconds): `reference_export synth` and `python -m impl synthesize` into a full
    filesystem end in one line, exit 2, with the old output kept."""
    if not fs.mounted:
        pytest.skip("needs a mounted tmpfs (a subprocess)")
    (fs.dir / "ck").mkdir()
    (fs.dir / "ck" / "config.json").write_text("old")
    (fs.dir / "out.wav").write_bytes(b"old wav")
    fs.fill()
    before = _snapshot(fs.dir)
    for argv, tool in (([sys.executable, "-m", "reference_export", "synth", "--preset", "tiny", "--variant",
                         "custom_voice", "--force", "--out", str(fs.dir / "ck")], "reference_export synth"),
                       ([sys.executable, "-m", "impl", "synthesize", "--model", str(checkpoint_dir("custom_voice")),
                         "--text", "Hi.", "--mode", "custom_voice", "--speaker", "ryan", "--greedy",
                         "--max-new-frames", "2", "--out", str(fs.dir / "out.wav")], "python -m impl synthesize")):
        p = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)
        err = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
        assert p.returncode == 2 and len(err) == 1 and "Traceback" not in p.stderr, p.stderr[-2000:]
        assert "No space left on device" in err[0] or "free on its filesystem" in err[0], err
        assert _snapshot(fs.dir) == before and not _leftovers(fs.dir)
        bad_input("full filesystem", "one line, exit 2; old output byte-identical, no temp left",
                  err[0].replace(str(fs.dir), "<fs>"), f"faults: {tool}")


# ------------------------------------------------------------------------------------------ the writer scan

# Every file a tool writes goes through impl/outfile.py. These are the exceptions, each with its reason; an entry
# that no longer matches anything fails the test (remove it).
ALLOWED = {
    ("impl/outfile.py", "*"): "the atomic writer itself",
    ("conftest.py", "_lock"): "a lock file for flock: its content is never read, only its lock",
    ("reference_export/synth.py", "_save_file"): "safetensors' save_file, called only with an atomic_path temp path",
    ("examples/*", "*"): "an outside port's own code (numpy only; it must not import this package)",
    ("reference_export/upstream.py", "_cast_to_mapped_file"): "a scratch file in the system temp folder (mkstemp), "
                                                              "mapped and unlinked at once: never a tool output",
    ("parity_tests/test_*.py", "*"): "tests write their input fixtures into pytest's tmp_path, not tool outputs",
    ("parity_tests/helpers_bad_input.py", "*"): "makes broken fixture files (bad JSON, edited weights) in tmp_path",
    ("parity_tests/capture_child.py", "reset_rss_high_water"): "/proc/self/clear_refs, a kernel control file (it "
                                                               "lowers the RSS high-water mark): never a tool output",
    ("parity_tests/mutants.py", "mutated"): "writes a mutant into a scratch git clone and restores the file's "
                                            "bytes after: never a tool output",
}

_NOT_PATH_OPENERS = ("os", "io", "gzip", "bz2", "lzma", "h5py", "tarfile", "zipfile", "wave", "sf", "soundfile")


def _arg(call: ast.Call, pos: int, kw: str) -> ast.AST | None:
    if len(call.args) > pos:
        return call.args[pos]
    return next((k.value for k in call.keywords if k.arg == kw), None)


def _writes(mode: ast.AST | None) -> bool:
    return isinstance(mode, ast.Constant) and isinstance(mode.value, str) and bool(set(mode.value) & set("wax+"))


def write_target(call: ast.Call) -> ast.AST | None:
    """The path expression a call writes a file at, or None when it writes no file by name. ``write_text`` /
    ``write_bytes`` as a method are ``Path``'s; impl.outfile's functions of the same name are plain calls."""
    f = call.func
    owner = f.value.id if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else None
    name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
    if isinstance(f, ast.Attribute) and name in ("write_text", "write_bytes"):
        return None if owner == "outfile" else f.value
    if name in ("open", "fdopen") and (isinstance(f, ast.Name) or owner == "os"):
        return call.args[0] if call.args and _writes(_arg(call, 1, "mode")) else None
    if name == "open" and isinstance(f, ast.Attribute) and owner not in _NOT_PATH_OPENERS:
        return f.value if _writes(_arg(call, 0, "mode")) else None  # Path.open("w")
    if name == "File" and owner == "h5py":
        mode = _arg(call, 1, "mode")
        return _arg(call, 0, "name") if not (isinstance(mode, ast.Constant) and mode.value == "r") and mode else None
    if name == "savefig":
        return _arg(call, 0, "fname")
    if name == "save_file":
        return _arg(call, 1, "filename")
    if name in ("save", "savez", "savez_compressed") and owner in ("np", "numpy"):
        return _arg(call, 0, "file")
    if name == "save" and owner == "torch":
        return _arg(call, 1, "f")
    if name in ("copyfile", "copy", "copy2", "copytree", "move") and owner == "shutil":
        return _arg(call, 1, "dst")
    if name == "write" and owner in ("sf", "soundfile"):
        return _arg(call, 0, "file")
    return None


def direct_writes(source: str) -> list[tuple[int, str, str]]:
    """``(line, enclosing function, call)`` for each call writing a file at a path that is not a temporary path
    given by ``with atomic_path(…) as NAME`` / ``atomic_dir`` in the same function, or an in-memory buffer."""
    tree = ast.parse(source)
    funcs = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]
    owner_of: dict[int, ast.AST] = {}
    for fn in funcs:  # ast.walk is breadth-first: an inner function comes later and wins
        for node in ast.walk(fn):
            owner_of[id(node)] = fn
    temps: dict[int, set[str]] = {}
    for fn in funcs:
        temps[id(fn)] = {item.optional_vars.id for node in ast.walk(fn) if isinstance(node, ast.With)
                         for item in node.items
                         if isinstance(item.context_expr, ast.Call) and isinstance(item.optional_vars, ast.Name)
                         and getattr(item.context_expr.func, "id", getattr(item.context_expr.func, "attr", ""))
                         in ("atomic_path", "atomic_dir")}
        # an in-memory buffer (``buf = io.BytesIO()``) is no file: written to a path later through impl.outfile
        temps[id(fn)] |= {t.id for node in ast.walk(fn) if isinstance(node, ast.Assign)
                          and isinstance(node.value, ast.Call)
                          and getattr(node.value.func, "id", getattr(node.value.func, "attr", "")) in ("BytesIO",
                                                                                                         "StringIO")
                          for t in node.targets if isinstance(t, ast.Name)}
    found = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or (target := write_target(node)) is None:
            continue
        fn = owner_of.get(id(node))
        if fn is not None and {n.id for n in ast.walk(target) if isinstance(n, ast.Name)} & temps[id(fn)]:
            continue
        found.add((node.lineno, fn.name if fn is not None else "<module>", ast.unparse(node)[:100]))
    return sorted(found)


def test_scanner_flags_direct_writes():
    """The scan can fail: each direct form is found, each atomic form passes."""
    bad = '''
def f(p, fig, d, arr):
    p.write_text("x")
    Path(p).write_bytes(b"x")
    open(p, "w").write("x")
    with open(p, mode="ab") as fh: pass
    p.open("w")
    fig.savefig(p)
    save_file(d, str(p))
    h5py.File(p, "w")
    np.save(p, arr)
    shutil.copyfile(p, d)
'''
    assert len(direct_writes(bad)) == 10, direct_writes(bad)
    good = '''
def g(p, fig, d):
    write_text(p, "x")
    outfile.write_bytes(p, b"x")
    open(p).read()
    open(p, "rb")
    h5py.File(p, "r")
    with atomic_path(p) as tmp:
        fig.savefig(tmp)
        save_file(d, str(tmp))
    with atomic_path(p) as t2, h5py.File(t2, "w") as f:
        pass
    buf = io.BytesIO()
    np.savez(buf, a=1)
    write_bytes(p, buf.getvalue())
'''
    assert direct_writes(good) == [], direct_writes(good)


def test_no_writer_writes_its_final_path_directly():
    files = sorted(p for p in ROOT.rglob("*.py") if not ({".venv", ".cache", "build", "__pycache__"} &
                                                         set(p.relative_to(ROOT).parts)))
    assert len(files) > 50
    used = set()
    offenders = []
    for p in files:
        rel = p.relative_to(ROOT).as_posix()
        for line, fn, call in direct_writes(p.read_text(encoding="utf-8")):
            allow = next((k for k in ALLOWED if fnmatch.fnmatch(rel, k[0]) and fnmatch.fnmatch(fn, k[1])), None)
            if allow is None:
                offenders.append(f"{rel}:{line} in {fn}(): {call}")
            else:
                used.add(allow)
    assert not offenders, ("write these through impl/outfile.py (write_text / write_bytes / atomic_path), or add an "
                           "entry with its reason to ALLOWED:\n" + "\n".join(offenders))
    assert set(ALLOWED) == used, f"ALLOWED entries that match nothing any more: {set(ALLOWED) - used}"


# ------------------------------------------------------------------------------------------ the checkpoint hash cache


def test_checkpoint_hash_cache_stays_out_of_the_checkpoint_folder(tmp_path, monkeypatch, fs, bad_input):
    """``checkpoint_sha256`` keeps its per-file cache in the harness's cache, keyed by the folder's real path, and
    hashes a changed file again; the checkpoint folder (here read-only, as in a shared model cache) is not written."""
    import hashlib

    from reference_export.synth import HASHED_FILES, checkpoint_sha256

    cache = tmp_path / "cache"
    monkeypatch.setenv("QWEN3TTS_CACHE", str(cache))
    ck = fs.dir / "ckpt"
    for i, rel in enumerate(HASHED_FILES):
        (ck / rel).parent.mkdir(parents=True, exist_ok=True)
        (ck / rel).write_bytes(f"file {i}".encode())

    def expected() -> str:  # the definition, computed here from the bytes
        h = hashlib.sha256()
        for rel in HASHED_FILES:
            h.update(f"{rel}:{hashlib.sha256((ck / rel).read_bytes()).hexdigest()}\n".encode())
        return h.hexdigest()

    before = _snapshot(ck)
    if fs.mounted:  # (the stub for read-only folders would also stop the cache writes it checks)
        fs.readonly()
    first = checkpoint_sha256(ck)
    assert first == expected() and _snapshot(ck) == before
    entries = list((cache / "checkpoint-sha256").glob("*.json"))
    assert len(entries) == 1 and "model.safetensors" in json.loads(entries[0].read_text())
    link = tmp_path / "link"
    link.symlink_to(ck)
    assert checkpoint_sha256(link) == first and len(list((cache / "checkpoint-sha256").glob("*.json"))) == 1
    if fs.mounted:
        subprocess.run(["mount", "-o", "remount,rw", str(fs.dir)], check=True)
    (ck / "config.json").write_bytes(b"changed, and a different size")
    second = checkpoint_sha256(ck)
    assert second == expected() and second != first
    assert not (ck / ".harness-sha256.json").exists() and not _leftovers(cache)
    bad_input("checkpoint hash of a read-only checkpoint folder", "handled: cache kept in $QWEN3TTS_CACHE, keyed by "
              "the real path; nothing written into the folder", f"{len(entries)} cache entry, folder unchanged",
              "faults: reference_export capture (HDF5 writer)")


def test_faults_have_their_own_section_beside_bad_input():
    from reports.bad_input import MIN_FAULT_CASES, bad_input_section, faults_section

    case = {"nodeid": "parity_tests/test_faults.py::t", "surface": "faults: reports gate --update", "case": "full disk",
            "outcome": "one line", "message": "gate: <fs>/baseline.json: write failed (No space left on device)"}
    other = {"nodeid": "parity_tests/test_bad_input_cli.py::t", "surface": "impl synthesize", "case": "empty text",
             "outcome": "one line", "message": "--text is empty"}
    data = {"bad_input": [case, other], "tests": {"parity_tests/test_faults.py::u": "failed"}}
    bad = "\n".join(bad_input_section(data))
    faults = "\n".join(faults_section(data))
    assert "empty text" in bad and "full disk" not in bad and "## Bad input" in bad
    assert faults.startswith("## Faults") and "full disk" in faults and "empty text" not in faults
    assert "❌ 1 fault cases" in faults and "`parity_tests/test_faults.py::u`: failed" in faults, faults
    data = {"bad_input": [dict(case, case=f"c{i}") for i in range(MIN_FAULT_CASES)], "tests": {}}
    assert f"✅ {MIN_FAULT_CASES} fault cases" in "\n".join(faults_section(data))
    assert faults_section({"bad_input": [other], "tests": {}}) == []


def test_written_files_get_ordinary_permissions(tmp_path):
    """A new file gets what ``open()`` would give it (0o666 less the umask), whatever mode the writer's own temporary
    file had (safetensors creates 0600: a checkpoint in a shared folder would be unreadable to others); a replaced
    file keeps its own mode."""
    import os
    import stat

    from impl.outfile import atomic_path, write_text

    umask = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "new.bin") as t:
            t.write_bytes(b"x")
            os.chmod(t, 0o600)  # as safetensors leaves it
        assert stat.S_IMODE((tmp_path / "new.bin").stat().st_mode) == 0o644
        old = tmp_path / "private.txt"
        old.write_text("a")
        os.chmod(old, 0o640)
        write_text(old, "b")
        assert stat.S_IMODE(old.stat().st_mode) == 0o640 and old.read_text() == "b"
    finally:
        os.umask(umask)
