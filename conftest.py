"""pytest options, fixtures that build or reuse synthetic checkpoints and upstream references, and the results
collector that writes ``reports/results.json`` for ``python -m reports``.

Options: ``--preset tiny|0.6b|1.7b``, ``--checkpoint PATH`` (a real checkpoint folder; tests for other variants
skip with a reason), ``--device cpu|cuda``, ``--dtype float32|bfloat16``, ``--attn eager|sdpa``, ``--refs DIR``
(use pre-captured reference files ``DIR/<case>--<variant>.h5`` instead of capturing; a missing one fails),
``--tf32 off|on`` (CUDA only; default off), ``--results PATH`` (default: ``results_path(device, dtype)``).

Across processes (README "Running the matrix"): ``-n 2`` (pytest-xdist, whole modules per worker) writes the same
results file as a serial run (each test's rows and bad-input cases travel to the controller on the test's own
report, and are put back in collection order); ``--splits N --group i [--durations-path FILE]`` runs one shard of
whole modules, balanced on the committed ``reports/durations.json``; its results file (default
``reports/shards/…-shard<i>of<N>.json``) carries its own provenance and shard number, for ``python -m reports merge``.

Built artefacts live under ``$QWEN3TTS_CACHE`` (default ``.cache/`` in the repo), keyed by everything that
decides their content (preset, variant, seed and the synth code's hash for checkpoints; the checkpoint hash,
case, dtype, attention and ``capture_key()`` for references: the capture code with its recorder, the torch /
transformers / qwen-tts versions, the seed and the TF32 setting), so a stale artefact is never reused.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import platform
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
import torch

from parity_tests.capture_child import reset_rss_high_water, return_freed_memory, rss_high_water

ROOT = Path(__file__).parent
CACHE = Path(os.environ.get("QWEN3TTS_CACHE", ROOT / ".cache"))
SEED = 0
# Per-test seconds (setup + call + teardown) that --splits balances shards on; refreshed from a results file with
# `python -m reports durations reports/results.json` (README "Running the matrix").
DURATIONS = ROOT / "reports" / "durations.json"


def results_path(device: str, dtype: str, root: Path = ROOT) -> Path:
    """Where a run on ``device``/``dtype`` writes its results by default: ``reports/results.json`` for the CPU fp32
    run the baseline gates; ``reports/results-cuda.json``, ``results-cuda-bfloat16.json``,
    ``results-cpu-bfloat16.json`` for the others (rendered as their own sections, never mixed with the CPU rows)."""
    kind = "cuda" if device.startswith("cuda") else device
    if kind == "cpu" and dtype == "float32":
        return root / "reports" / "results.json"
    return root / "reports" / ("results-" + kind + ("" if dtype == "float32" else f"-{dtype}") + ".json")


def set_tf32(enabled: bool) -> None:
    """TF32 is a setting of the harness, never PyTorch's default: cuDNN convolutions default to TF32 on, matmuls to
    off, which made fp32 CUDA codec rows differ from upstream's CPU by ~5e-3. Both are set together and recorded in
    every CUDA row's provenance."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's, which turns an unset --dist into "load"
def pytest_cmdline_main(config: pytest.Config) -> None:
    """``-n N`` without ``--dist`` distributes whole modules (``loadscope``), not single tests: a module's scoped
    fixtures (a loaded model, one generation run) are built once, and a row test that reads what an earlier test of
    its module measured (test_sampling's hypothesis row) runs in the same process, as in a serial run."""
    if getattr(config.option, "numprocesses", None) and getattr(config.option, "dist", None) == "no" \
            and not getattr(config.option, "distload", False):
        config.option.dist = "loadscope"


def pytest_configure(config: pytest.Config) -> None:
    s = shard_of(config)
    splits, group = config.getoption("--splits"), config.getoption("--group")
    if (splits is None) != (group is None):
        raise pytest.UsageError("--splits N and --group i go together (run shard i of N)")
    if s is not None and not (s["splits"] >= 1 and 1 <= s["group"] <= s["splits"]):
        raise pytest.UsageError(f"--splits {splits} --group {group}: need N >= 1 and 1 <= i <= N")
    if str(config.getoption("--device")).startswith("cuda"):
        set_tf32(config.getoption("--tf32") == "on")
    mode = config.getoption("--capture-in-child")
    CAPTURE_IN_CHILD[0] = mode == "always" or (mode == "auto" and tool_tests_deselected(config))
    if tool_tests_deselected(config):
        # Released dimensions or a user's checkpoint: one model of ours in memory at a time, shared by every test
        # that asks for the same one (parity_tests.helpers.load_model).
        from parity_tests import helpers

        helpers.ONE_MODEL[0] = True
    # Tiny models are dispatch-bound: one intra-op thread is faster than two (measured 4-15x on a busy 2-core
    # machine for frame-at-a-time generation and streaming). QWEN3TTS_THREADS overrides.
    n = os.environ.get("QWEN3TTS_THREADS")
    if n or config.getoption("--preset") == "tiny":
        torch.set_num_threads(int(n or 1))


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("qwen3tts parity")
    g.addoption("--preset", default="tiny", choices=["tiny", "0.6b", "1.7b"], help="synthetic preset (default tiny)")
    g.addoption("--checkpoint", default=None, help="a real checkpoint folder to test instead of a synthetic one")
    g.addoption("--device", default="cpu", help="device for impl (cpu, cuda, cuda:1)")
    g.addoption("--dtype", default="float32", choices=["float32", "bfloat16"], help="impl dtype")
    g.addoption("--attn", default="eager", choices=["eager", "sdpa"], help="impl attention implementation")
    g.addoption("--refs", default=None, help="folder of pre-captured references (<case>--<variant>.h5)")
    g.addoption("--tf32", default="off", choices=["off", "on"],
                help="CUDA: TF32 for matmuls and cuDNN convolutions, both sides (default off: fp32 rows are fp32)")
    g.addoption("--results", default=None,
                help="where to write the results (default reports/results.json for CPU fp32, "
                     "reports/results-<device>[-<dtype>].json otherwise)")
    g.addoption("--capture-in-child", default="auto", choices=["auto", "always", "never"],
                help="capture upstream references in a child process (auto: with --preset 0.6b|1.7b or "
                     "--checkpoint, where upstream beside our model would double the memory)")
    g.addoption("--splits", type=int, default=None, metavar="N", help="run one of N shards (with --group i)")
    g.addoption("--group", type=int, default=None, metavar="I", help="which shard of --splits N to run (1..N)")
    g.addoption("--durations-path", default=None, metavar="FILE",
                help="per-test seconds that shards are balanced on (default reports/durations-<preset>.json where "
                     "one is committed for --preset, else reports/durations.json)")


# ------------------------------------------------------------------------------------------ options


@pytest.fixture(scope="session")
def device(request) -> str:
    d = request.config.getoption("--device")
    if d.startswith("cuda") and not torch.cuda.is_available():
        pytest.skip(f"--device {d}: CUDA is not available on this machine")
    return d


@pytest.fixture(scope="session")
def dtype(request) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[request.config.getoption("--dtype")]


@pytest.fixture(scope="session")
def attn(request) -> str:
    return request.config.getoption("--attn")


@pytest.fixture(scope="session")
def preset(request) -> str:
    return request.config.getoption("--preset")


# --------------------------------------------------------------------------------- build or reuse


def _src_hash(*rels: str) -> str:
    h = hashlib.sha256()
    for rel in rels:
        p = ROOT / rel
        files = sorted(p.rglob("*.py")) + sorted(p.rglob("*.json")) if p.is_dir() else [p]
        for f in files:
            h.update(f.relative_to(ROOT).as_posix().encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:12]


SYNTH_SOURCES = ("reference_export/synth.py", "reference_export/tokenizer_files.py", "reference_export/upstream.py",
                 "impl/config.py", "impl/presets")
CAPTURE_SOURCES = ("reference_export/capture.py", "reference_export/cases", "reference_export/export.py",
                   "reference_export/h5io.py", "reference_export/registry.py", "reference_export/upstream.py",
                   "reference_export/recorder.py")


def capture_key_parts() -> dict[str, str]:
    """Everything besides the checkpoint, case, device, dtypes and attention that changes a captured reference:
    the capture code (its recorder included), the torch / transformers / qwen-tts versions that computed it, the
    seed its inputs are drawn from, and the TF32 settings in force (matmul and cuDNN)."""
    import importlib.metadata as md

    parts = {"code": _src_hash(*CAPTURE_SOURCES), "torch": str(torch.__version__), "seed": str(SEED),
             "tf32": f"{int(torch.backends.cuda.matmul.allow_tf32)}{int(torch.backends.cudnn.allow_tf32)}"}
    for pkg in ("transformers", "qwen-tts"):
        try:
            parts[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            parts[pkg] = "absent"
    return parts


def capture_key() -> str:
    """The last component of a cached reference's name: a hash of :func:`capture_key_parts`."""
    return hashlib.sha256(json.dumps(capture_key_parts(), sort_keys=True).encode()).hexdigest()[:12]


@contextlib.contextmanager
def _lock(name: str):
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / f".lock-{name}", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)  # several pytest processes may build the same artefact
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def synthetic_checkpoint(preset: str, variant: str, seed: int = SEED) -> Path:
    """Build (once) and return a synthetic checkpoint folder."""
    from reference_export.synth import build_checkpoint

    key = f"{preset}-{variant}-s{seed}-{_src_hash(*SYNTH_SOURCES)}"
    out = CACHE / "ckpt" / key
    with _lock(key):
        if not (out / "synth.json").exists():
            build_checkpoint(preset, variant, seed, out, force=True, progress=True)
    return out


@pytest.fixture(scope="session")
def checkpoint_dir(request, preset):
    """``checkpoint_dir(variant, preset=None) -> Path``: the checkpoint folder under test for a variant."""
    real = request.config.getoption("--checkpoint")

    def get(variant: str, preset_override: str | None = None) -> Path:
        if real:
            cfg = json.loads((Path(real) / "config.json").read_text())
            if cfg.get("tts_model_type") != variant:
                pytest.skip(f"--checkpoint {real} is a {cfg.get('tts_model_type')} checkpoint, not {variant}")
            return _RESULTS.used(Path(real))
        p = preset_override or preset
        from impl.config import ConfigError, preset_config_dicts

        try:
            preset_config_dicts(p, variant)
        except ConfigError as e:
            pytest.skip(str(e))
        return _RESULTS.used(synthetic_checkpoint(p, variant))

    return get


_UPSTREAM: dict[tuple, object] = {}


def pytest_sessionstart(session: pytest.Session) -> None:
    """Drop cached artefacts built by other versions of the synth/capture code (they can never be reused)."""
    import shutil

    synth_h, cap_h = _src_hash(*SYNTH_SOURCES), capture_key()
    # Dot-prefixed entries are another process's writes in progress (temp dir/file, renamed when complete):
    # never touch them.
    for d in (CACHE / "ckpt").glob("[!.]*-s*-*"):
        if d.is_dir() and not d.name.endswith(synth_h):
            shutil.rmtree(d, ignore_errors=True)
    for f in (CACHE / "refs").glob("[!.]*.h5"):
        if not f.stem.endswith(cap_h):
            f.unlink(missing_ok=True)


# Whether references are captured in a child process (``--capture-in-child``; ``auto``: on released dimensions and
# on a user's checkpoint, where upstream's weights beside ours would double the run's memory). A one-element list, so
# ``pytest_configure`` sets it for the fixtures and for callers of ``reference_file``.
CAPTURE_IN_CHILD = [False]


class CaptureChildError(RuntimeError):
    """A reference capture in a child process failed: its last line of stderr says why."""


def capture_in_child(case_name: str, ckpt: Path, out: Path, *, device: str, dtype: str, codec_dtype: str,
                     attn: str) -> dict:
    """Run ``python -m parity_tests.capture_child`` for one case: upstream loads in that process, writes ``out``
    (atomically) and exits before anything of ours runs again. The child gets this process's TF32 flags and thread
    count, so the file is the one an in-process capture writes. Returns the child's peak RSS and wall time, also
    added to the results' provenance (``captures``)."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "parity_tests.capture_child", case_name, str(ckpt), str(out), "--device", device,
           "--dtype", dtype, "--codec-dtype", codec_dtype, "--attn", attn, "--seed", str(SEED),
           "--tf32", capture_key_parts()["tf32"], "--threads", str(torch.get_num_threads())]
    t0 = time.time()
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if p.returncode != 0 or not out.exists():
        lines = [ln for ln in (p.stderr or p.stdout or "").strip().splitlines() if ln.strip()]
        raise CaptureChildError(f"capture of {case_name} on {machine_paths_hidden(str(ckpt))} in a child process "
                                f"failed (exit {p.returncode}): {machine_paths_hidden(lines[-1]) if lines else 'no output'}")
    stats = json.loads(p.stdout.strip().splitlines()[-1])
    stats = {"case": case_name, "dtype": dtype, "device": device, "peak_rss_gb": round(stats["peak_rss_bytes"] / 1e9, 3),
             "wall_s": round(time.time() - t0, 1)}
    _RESULTS.add_capture(stats)
    return stats


def reference_file(case_name: str, ckpt: Path, refs_dir: str | None = None, attn: str = "eager",
                   dtype: str = "float32", device: str = "cpu", codec_dtype: str | None = None):
    """Capture (once) or find the reference file of ``case_name`` on ``ckpt``, upstream run on ``device`` in
    ``dtype`` (``codec_dtype`` for the speech tokenizer; default float32, float64 with float64); return an open
    ``RefFile``."""
    from reference_export.cases import get_case
    from reference_export.export import codec_dtype_for
    from reference_export.h5io import RefFile
    from reference_export.synth import checkpoint_sha256

    sha = checkpoint_sha256(ckpt)
    variant = json.loads((ckpt / "config.json").read_text())["tts_model_type"]
    codec_dtype = codec_dtype or codec_dtype_for(dtype)
    if refs_dir:
        # Pre-captured references: a missing file is a failure, never a pass. Only the CPU fp32 set is named
        # plainly; others carry their device and dtypes.
        tag = "" if (device, dtype, codec_dtype) == ("cpu", "float32", "float32") else \
            f"--{device.replace(':', '')}-{dtype}-{codec_dtype}"
        return RefFile(Path(refs_dir) / f"{case_name}--{variant}{tag}.h5", expect_checkpoint_sha256=sha)
    case = get_case(case_name)
    use_attn = case.attn or attn
    dev_tag = device.replace(":", "")
    key = f"{sha[:16]}-{case_name}-{dev_tag}-{dtype}-{codec_dtype}-{use_attn}-{capture_key()}"
    out = CACHE / "refs" / f"{key}.h5"
    with _lock(key):
        if not out.exists() and CAPTURE_IN_CHILD[0]:
            from parity_tests.helpers import release_models

            release_models()  # the shared model of ours is not kept beside the child (a test's own copy may be)
            capture_in_child(case_name, ckpt, out, device=device, dtype=dtype, codec_dtype=codec_dtype, attn=use_attn)
        elif not out.exists():
            from reference_export.export import DTYPES, capture_case
            from reference_export.upstream import load_upstream

            ukey = (str(ckpt), device, dtype, codec_dtype, use_attn)
            if ukey not in _UPSTREAM:
                _UPSTREAM.clear()  # one upstream model in memory at a time
                _UPSTREAM[ukey] = load_upstream(ckpt, device=device, dtype=DTYPES[dtype], attn=use_attn,
                                                codec_dtype=DTYPES[codec_dtype])
            capture_case(case_name, ckpt, out, device=device, dtype=dtype, attn=use_attn, seed=SEED,
                         upstream=_UPSTREAM[ukey], progress=False, codec_dtype=codec_dtype)
    return RefFile(out, expect_checkpoint_sha256=sha)


@pytest.fixture(scope="session")
def reference(request, checkpoint_dir):
    """``reference(case_name, variant, preset=None, dtype="float32", device=None, codec_dtype=None) -> RefFile``.

    ``device`` defaults to the session's ``--device``: on a CUDA run every row compares ours with upstream run on
    the same device (same kernels, same generator for sampled rows). Pass ``device="cpu"`` for the truth a
    three-way row measures both against."""
    refs_dir = request.config.getoption("--refs")
    session_device = request.config.getoption("--device")
    opened = []

    def get(case_name: str, variant: str, preset_override: str | None = None, dtype: str = "float32",
            device: str | None = None, codec_dtype: str | None = None):
        r = reference_file(case_name, checkpoint_dir(variant, preset_override), refs_dir, dtype=dtype,
                           device=device or session_device, codec_dtype=codec_dtype)
        opened.append(r)
        return r

    yield get
    for r in opened:
        r.close()


# ------------------------------------------------------------------------------------------ results


# Markers whose tests the results list by node id, so a report can tell "the CUDA tests ran" from "they all skipped".
LISTED_MARKERS = ("cuda",)
# The attribute of a test's teardown report that carries what the test recorded (see ``Results``).
PAYLOAD = "qwen3tts_recorded"


def machine_paths_hidden(text: str) -> str:
    """A recorded message or note with this machine's folders written as ``<cache>`` / ``<repo>``: committed
    reports are read on other machines, and the folder names say nothing there."""
    for folder, shown in ((CACHE.resolve(), "<cache>"), (CACHE, "<cache>"), (ROOT.resolve(), "<repo>"),
                          (ROOT, "<repo>")):
        text = text.replace(str(folder), shown)
    return text


class Results:
    """What the session recorded: typed comparison records (``reports.results.Record``), test outcomes, skip
    reasons, per-test durations, the tests carrying ``LISTED_MARKERS``, bad-input cases, and the hash of the code
    the session started from.

    One path for a serial run and for pytest-xdist: a test's records and bad-input cases are held as pending while
    it runs, attached to its teardown report (``PAYLOAD``; pytest serialises a report's extra attributes, so xdist
    carries them from the worker to the controller), and folded in by ``log`` wherever that report arrives. A
    worker that crashes loses only the test it was running. ``ordered`` puts everything back in collection order,
    so ``-n 2`` writes the serial run's file."""

    def __init__(self) -> None:
        from reports.results import code_hash

        self.rows: list = []  # reports.results.Record
        self.bad_input: list[dict] = []  # one entry per bad-input case (issue: bad input), rendered by reports
        self.outcomes: dict[str, str] = {}
        self.skipped: dict[str, str] = {}  # nodeid -> reason
        self.durations: dict[str, float] = {}  # nodeid -> seconds, setup + call + teardown (what shards balance on)
        self.marked: dict[str, list[str]] = {m: [] for m in LISTED_MARKERS}
        self.order: list[str] = []  # node ids in collection order (serial: session.items; xdist: a worker's)
        self._pending: dict[str, dict[str, list]] = {}  # nodeid -> what the running test recorded
        self.captures: list[dict] = []  # references captured in a child process: case, peak RSS, wall time
        self.current = ""  # the test running in this process (what a child capture is charged to)
        self.peak: dict = {}  # this process's RSS high-water mark and the test during which it last rose
        self.weights: dict[str, int] = {}  # checkpoint folder -> bytes of its weight files (the memory budget's unit)
        self.worker_peaks: list[dict] = []  # xdist controller: each worker's ``peak``
        self.start = time.time()
        # Taken when the session starts: an edit during the run makes the results refuse to render.
        self.code_hash = code_hash(ROOT)

    def log(self, report: pytest.TestReport) -> None:
        """Fold one test phase's report into the outcomes: a skip, the call's outcome, or an error in setup or
        teardown (the test errored: its row must not stay green); and what the test recorded, when the report
        carries it."""
        nid = report.nodeid
        if report.skipped:
            self.outcomes[nid] = "skipped"
            self.skipped[nid] = _skip_reason(report)
        elif report.when == "call":
            self.outcomes[nid] = report.outcome
        elif report.failed:
            self.outcomes[nid] = "error"
        self.durations[nid] = round(self.durations.get(nid, 0.0) + float(report.duration or 0.0), 4)
        if report.when == "setup":
            for m in LISTED_MARKERS:
                if m in (report.keywords or {}) and nid not in self.marked[m]:
                    self.marked[m].append(nid)
        payload = getattr(report, PAYLOAD, None)
        if payload:
            self.fold(payload, nid)

    def fold(self, payload: dict, nid: str = "") -> None:
        from reports.results import Record

        self.rows += [Record.from_json(r, f"test {nid}") for r in payload.get("rows", [])]
        self.bad_input += list(payload.get("bad_input", []))
        self.captures += list(payload.get("captures", []))

    def add(self, nodeid: str, result, row: str, component: str, variant: str = "", notes: str = "",
            preset: str = "", compares: str = "ours vs upstream", expect_fail: bool = False) -> None:
        from reports.results import Record

        rec = Record(component=component, row=row, result=result, preset=preset, variant=variant,
                     compares=compares, expect_fail=expect_fail, notes=notes, nodeid=nodeid)
        row_json = rec.to_json()
        row_json["notes"] = machine_paths_hidden(row_json["notes"])
        if isinstance(row_json["result"].get("message"), str):
            row_json["result"]["message"] = machine_paths_hidden(row_json["result"]["message"])
        self._pending.setdefault(nodeid, {"rows": [], "bad_input": []})["rows"].append(row_json)

    def add_bad_input(self, nodeid: str, case: dict) -> None:
        self._pending.setdefault(nodeid, {"rows": [], "bad_input": []})["bad_input"].append(case)

    def add_capture(self, stats: dict) -> None:
        """A child capture, charged to the running test (it travels with the test's report, like its rows)."""
        stats = {**stats, "nodeid": self.current}
        self._pending.setdefault(self.current, {"rows": [], "bad_input": []}).setdefault("captures", []).append(stats)

    def used(self, ckpt: Path) -> Path:
        """Note a checkpoint folder a test used, with the bytes of its weight files."""
        if str(ckpt) not in self.weights:
            self.weights[str(ckpt)] = weight_bytes(ckpt)
        return ckpt

    def watch_rss(self, nodeid: str) -> None:
        """After a test: the RSS high-water mark (``VmHWM``) reached since the last test ended (the mark is lowered
        to the present RSS after each reading, where Linux allows), charged to this test (its setup included). Keeps
        the highest and the ten heaviest tests."""
        hwm = rss_high_water()
        if not hwm:
            return
        top = sorted([*self.peak.get("top", []), [hwm, nodeid]], key=lambda t: -t[0])[:10]
        if hwm > self.peak.get("bytes", 0):
            self.peak = {"bytes": hwm, "nodeid": nodeid}
        self.peak["top"] = top
        reset_rss_high_water()

    def take(self, nodeid: str) -> dict | None:
        """What ``nodeid`` recorded (JSON), removed from pending: it travels on the test's teardown report."""
        return self._pending.pop(nodeid, None)

    def ordered(self) -> None:
        """Rows, bad-input cases, outcomes, skips, durations and marker lists in collection order (a stable sort:
        a test's own records keep the order it made them). Anything still pending (an interrupted test) is folded
        in first."""
        for nid in list(self._pending):
            self.fold(self._pending.pop(nid), nid)
        index = {nid: i for i, nid in enumerate(self.order)}

        def pos(nid: str) -> int:
            return index.get(nid, len(index))

        self.rows.sort(key=lambda r: pos(r.nodeid))
        self.bad_input.sort(key=lambda c: pos(str(c.get("nodeid", ""))))
        self.captures.sort(key=lambda c: pos(str(c.get("nodeid", ""))))
        for name in ("outcomes", "skipped", "durations"):
            d = getattr(self, name)
            setattr(self, name, {k: d[k] for k in sorted(d, key=pos)})
        self.marked = {m: sorted(ids, key=pos) for m, ids in self.marked.items()}


def weight_bytes(ckpt: Path) -> int:
    """The bytes of a checkpoint folder's weight files (``*.safetensors`` at any depth): the unit the memory budget
    of a run on it is stated in."""
    return sum(f.stat().st_size for f in Path(ckpt).rglob("*.safetensors"))


def memory_provenance(peaks: list[dict], weights: dict[str, int], captures: list[dict]) -> dict | None:
    """What the results' provenance says about memory: the highest RSS high-water mark of the run's pytest
    processes (the controller's and every xdist worker's) and the test during which it was reached, the largest
    checkpoint the run used, their ratio (the budget on released dimensions is 1.5x), and the reference captures run
    in child processes (how many, their highest peak RSS, their summed wall time). ``peaks`` entries may carry
    ``top``: [bytes, nodeid] of their heaviest tests."""
    peaks = [p for p in peaks if p.get("bytes")]
    if not peaks:
        return None
    top = max(peaks, key=lambda p: p["bytes"])
    out: dict = {"peak_rss_gb": round(top["bytes"] / 1e9, 3), "peak_rss_test": top.get("nodeid", "")}
    heaviest = sorted((t for p in peaks for t in p.get("top", [])), key=lambda t: -t[0])[:10]
    if heaviest:  # per-test peaks: where the memory goes, the next thing to slim
        out["heaviest_tests"] = [[round(b / 1e9, 3), nid] for b, nid in heaviest]
    if weights:
        ck, w = max(weights.items(), key=lambda kv: kv[1])
        out.update(weights_gb=round(w / 1e9, 3), weights_checkpoint=machine_paths_hidden(ck),
                   peak_over_weights=round(top["bytes"] / w, 3) if w else None)
    if captures:
        out.update(capture_children=len(captures),
                   capture_children_peak_rss_gb=max(c["peak_rss_gb"] for c in captures),
                   capture_children_wall_s=round(sum(c["wall_s"] for c in captures), 1))
    return out


_RESULTS = Results()


@pytest.fixture
def record(request, preset):
    """``record(result, row=..., component=..., variant="", notes="", compares="ours vs upstream",
    expect_fail=False)`` adds a comparison to results.json. ``compares`` says what the row compares (one of
    ``reports.results.COMPARES``: ours vs upstream / ours vs ours / ours vs a formula / ours vs librosa);
    ``expect_fail`` marks a mutation self-test row, which must turn red."""

    def add(result, row: str, component: str, variant: str = "", notes: str = "", preset_override: str = "",
            compares: str = "ours vs upstream", expect_fail: bool = False):
        _RESULTS.add(request.node.nodeid, result, row, component, variant, notes, preset_override or preset,
                     compares, expect_fail)
        return result

    return add


@pytest.fixture
def bad_input(request, tmp_path_factory):
    """``bad_input(case, outcome, message, surface="")`` records one bad-input case for the report's "Bad input"
    section. ``outcome`` says what happened (e.g. "one-line error", "refused", "handled"); ``message`` is the line
    the user saw (for a "handled" case: the warning shown, or the test's own summary of the outcome). Record it after asserting on it, so that a recorded case is one whose test checked it. The
    session's temporary folder is shown as ``<tmp>``, so the report does not change from run to run."""
    base = str(tmp_path_factory.getbasetemp())

    def add(case: str, outcome: str, message: str, surface: str = "") -> None:
        _RESULTS.add_bad_input(request.node.nodeid, {"nodeid": request.node.nodeid, "surface": surface, "case": case,
                                                     "outcome": outcome,
                                                     "message": machine_paths_hidden(message.replace(base, "<tmp>"))})

    return add


def _skip_reason(report: pytest.TestReport) -> str:
    if hasattr(report, "wasxfail"):  # an expected failure (strict xfail): its stated reason, not the traceback
        return f"xfail: {report.wasxfail}".rstrip(": ")
    lr = report.longrepr
    if isinstance(lr, (tuple, list)) and len(lr) == 3:  # (file, line, "Skipped: reason"); a list after xdist
        return str(lr[2]).removeprefix("Skipped: ")
    return str(lr or "")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """The teardown report (the last of a test's three) carries what the test recorded: a serial run folds it in
    ``pytest_runtest_logreport`` right here, an xdist controller when the worker's report arrives."""
    report = yield
    if call.when == "teardown":
        payload = _RESULTS.take(item.nodeid)
        if payload:
            setattr(report, PAYLOAD, payload)
    return report


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _RESULTS.log(report)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    _RESULTS.current = item.nodeid  # a reference captured in a child process is charged to this test


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem):
    try:
        return (yield)
    finally:
        # After pytest's own teardown: the fixtures that end with this test (a class's, a module's) are gone, so
        # the high-water mark is lowered to what is really left, not charged to the next test.
        from parity_tests import helpers

        if nextitem is None or nextitem.path != item.path:
            # on released dimensions (helpers.ONE_MODEL) the shared model does not outlive its file (compared by
            # path: doctest items have no .module): the next file may need only the codec or the speaker encoder
            # (a file that needs the same model loads it again)
            helpers.release_models()
        if helpers.ONE_MODEL[0]:
            return_freed_memory()
        _RESULTS.watch_rss(item.nodeid)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error) -> None:
    """xdist controller: a worker's RSS high-water mark and the checkpoints it used, for the provenance."""
    out = getattr(node, "workeroutput", None) or {}
    if out.get("qwen3tts_peak"):
        _RESULTS.worker_peaks.append(out["qwen3tts_peak"])
    _RESULTS.weights.update(out.get("qwen3tts_weights") or {})


def pytest_collection_finish(session: pytest.Session) -> None:
    _RESULTS.order = [i.nodeid for i in session.items]


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_node_collection_finished(node, ids) -> None:
    """xdist controller: the workers' collection order (every worker collects the same list)."""
    if not _RESULTS.order:
        _RESULTS.order = list(ids)


def _workers(config: pytest.Config) -> int:
    n = getattr(config.option, "numprocesses", None)  # xdist resolves "auto" to a number before the session
    try:
        return int(n or 0)
    except (TypeError, ValueError):
        return 0


def shard_of(config: pytest.Config) -> dict | None:
    """``{"group": i, "splits": N}`` when this run is one shard (``--splits N --group i``)."""
    splits, group = getattr(config.option, "splits", None), getattr(config.option, "group", None)
    return {"group": int(group), "splits": int(splits)} if splits and group else None


def plan_shards(weights: list[float], splits: int) -> list[int]:
    """The shard (0-based) of each module, given the modules' seconds in collection order: contiguous runs of whole
    modules, cut where the heaviest shard is lightest (exact, by dynamic programming; ties keep cuts early), no
    shard empty unless there are fewer modules than shards. Contiguous, so shards merged in order are the serial
    run's order; whole modules, so module fixtures are built once and tests that share module state stay together.

    >>> plan_shards([5, 1, 1, 1, 4], 2)
    [0, 0, 1, 1, 1]
    """
    n = len(weights)
    k_max = min(splits, n)
    if k_max <= 1:
        return [0] * n
    pre = [0.0]
    for w in weights:
        pre.append(pre[-1] + w)
    inf = float("inf")
    # best[k][j]: the lightest possible heaviest shard when the first j modules make k shards; cut[k][j]: where the
    # last of those shards starts.
    best = [[inf] * (n + 1) for _ in range(k_max + 1)]
    cut = [[0] * (n + 1) for _ in range(k_max + 1)]
    best[0][0] = 0.0
    for k in range(1, k_max + 1):
        for j in range(k, n + 1):
            for i in range(k - 1, j):
                v = max(best[k - 1][i], pre[j] - pre[i])
                if v < best[k][j] - 1e-12:
                    best[k][j], cut[k][j] = v, i
    out = [0] * n
    j = n
    for k in range(k_max, 0, -1):
        i = cut[k][j]
        out[i:j] = [k - 1] * (j - i)
        j = i
    return out


def durations_path(config: pytest.Config) -> str:
    """``--durations-path``, else the committed durations of the run's preset (``reports/durations-0.6b.json``,
    measured by a whole ``--preset 0.6b`` run: generation dominates there, not on tiny), else
    ``reports/durations.json`` (tiny; also what a --checkpoint run balances on)."""
    given = config.getoption("--durations-path")
    if given:
        return str(given)
    own = DURATIONS.with_name(f"durations-{config.getoption('--preset')}.json")
    return str(own if not config.getoption("--checkpoint") and own.is_file() else DURATIONS)


def _durations(path: str) -> dict[str, float]:
    """The durations file; a missing one balances on test counts (the shard's line says so), a malformed one is a
    usage error."""
    p = Path(path)
    if not p.exists():
        return {}
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise pytest.UsageError(f"--durations-path {path}: not a durations file ({e})") from None
    if not isinstance(d, dict) or not all(isinstance(v, (int, float)) for v in d.values()):
        raise pytest.UsageError(f"--durations-path {path}: not a durations file (expected an object of node id -> "
                                f"seconds)")
    return {str(k): float(v) for k, v in d.items()}


# Tests of the harness's tools rather than of the weights: they run on the tiny preset, and a run on released
# dimensions or on a user's checkpoint (--preset 0.6b|1.7b, --checkpoint DIR) deselects them, says so on the
# terminal and records it in the results' provenance ("deselected"). Module file names, relative to the root.
TOOL_TESTS = tuple(f"parity_tests/{m}.py" for m in (
    "test_bad_input_api", "test_bad_input_cli", "test_bad_input_export", "test_bad_input_report", "test_faults",
    "test_port_compare", "test_port_formats", "test_port_numpy", "test_port_install", "test_mutations_audio_in",
    "test_mutations_bf16", "test_mutations_codec", "test_mutations_core", "test_mutations_lm", "test_bench",
    "test_matrix", "test_reports", "test_imports", "test_h5io", "test_progress", "test_every_call", "test_recorder",
    "test_capture_request", "test_capture_released", "test_synth", "test_cli", "test_compare", "test_mutants",
    "test_capture_child", "test_device_placement", "test_boundaries"))
TOOL_TESTS_REASON = ("tests of the harness's tools (bad input, faults, port checks, mutation self-tests, bench smoke, "
                     "reports, capture, device placement): they run on the tiny preset; a run on released dimensions or a checkpoint "
                     "runs the parity rows its weights feed")


def tool_tests_deselected(config: pytest.Config) -> bool:
    return config.getoption("--preset") != "tiny" or bool(config.getoption("--checkpoint"))


def _deselect_tool_tests(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not tool_tests_deselected(config):
        return
    dropped = [it for it in items if it.nodeid.split("::")[0] in TOOL_TESTS]
    if not dropped:
        return
    config.hook.pytest_deselected(items=dropped)
    items[:] = [it for it in items if it.nodeid.split("::")[0] not in TOOL_TESTS]
    config._qwen3tts_deselected = {"count": len(dropped), "reason": TOOL_TESTS_REASON,  # type: ignore[attr-defined]
                                   "modules": sorted({it.nodeid.split("::")[0] for it in dropped})}
    if getattr(config, "workerinput", None) is None:
        config.get_terminal_writer().line(f"deselected {len(dropped)} tool tests: {TOOL_TESTS_REASON}")


@pytest.hookimpl(trylast=True)  # after -m/-k deselection: balance what will actually run
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tool tests leave runs on released dimensions / a checkpoint (``TOOL_TESTS``); then ``--splits N --group i``:
    keep shard i's modules (``plan_shards`` over the committed per-test durations; a test the file does not know
    counts the mean of those it knows). Every process computes the same plan from the same collection, so xdist
    workers inside a shard agree."""
    _deselect_tool_tests(config, items)
    s = shard_of(config)
    if s is None:
        return
    durations = _durations(durations_path(config))
    default = sum(durations.values()) / len(durations) if durations else 1.0
    modules: dict[str, float] = {}
    for it in items:
        m = it.nodeid.split("::")[0]
        modules[m] = modules.get(m, 0.0) + durations.get(it.nodeid, default)
    plan = dict(zip(modules, plan_shards(list(modules.values()), s["splits"])))
    keep = [it for it in items if plan[it.nodeid.split("::")[0]] == s["group"] - 1]
    dropped = [it for it in items if plan[it.nodeid.split("::")[0]] != s["group"] - 1]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
    items[:] = keep
    if getattr(config, "workerinput", None) is None:  # said once, by the process that reports
        est = sum(w for m, w in modules.items() if plan[m] == s["group"] - 1)
        config.get_terminal_writer().line(
            f"shard {s['group']}/{s['splits']}: {len(keep)} tests in "
            f"{sum(1 for m in plan.values() if m == s['group'] - 1)} modules, about {est:.0f} s by "
            f"{'the durations file' if durations else 'test counts (no durations file)'}")


def default_results(config: pytest.Config) -> Path:
    """``results_path(device, dtype)``; for a shard, ``reports/shards/<that name>-shard<i>of<N>.json`` (never the
    file a whole run writes, nor one that ``reports render`` picks up as a recorded section)."""
    p = results_path(config.getoption("--device"), config.getoption("--dtype"))
    s = shard_of(config)
    return p if s is None else p.parent / "shards" / f"{p.stem}-shard{s['group']}of{s['splits']}.json"


def _device_info(device: str) -> dict:
    from reference_export.export import device_info

    try:
        return device_info(device)
    except (RuntimeError, AssertionError, ValueError) as e:  # no such device: the run skipped its tests
        return {"device": device, "error": str(e).splitlines()[0] if str(e) else type(e).__name__}


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if getattr(session.config, "workerinput", None) is not None:
        session.config.workeroutput["qwen3tts_peak"] = _RESULTS.peak  # type: ignore[attr-defined]
        session.config.workeroutput["qwen3tts_weights"] = _RESULTS.weights  # type: ignore[attr-defined]
        return
    path = Path(session.config.getoption("--results") or default_results(session.config))
    _RESULTS.ordered()
    outcomes = list(_RESULTS.outcomes.values())
    vers = {"torch": str(torch.__version__)}
    try:
        import importlib.metadata as md

        for pkg in ("qwen-tts", "transformers", "tokenizers", "librosa"):
            with contextlib.suppress(md.PackageNotFoundError):
                vers[pkg] = md.version(pkg)
    except Exception:  # provenance is best effort; results still get written
        pass
    from reference_export.export import git_sha
    from reports.results import RunResults

    run = RunResults(
        created=datetime.now(UTC).isoformat(timespec="seconds"), code_hash=_RESULTS.code_hash,
        provenance={
            "git_sha": git_sha(), "versions": vers, "python": platform.python_version(),
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "cpus": os.cpu_count(),
            "preset": session.config.getoption("--preset"), "checkpoint": session.config.getoption("--checkpoint"),
            "device": session.config.getoption("--device"), "dtype": session.config.getoption("--dtype"),
            "attn": session.config.getoption("--attn"), "markexpr": session.config.getoption("-m") or "",
            "tf32": session.config.getoption("--tf32"), "device_info": _device_info(session.config.getoption("--device")),
            # how the run was spread: xdist workers (0: one process) and, for a shard, which one of how many
            "workers": _workers(session.config),
            "shard": shard_of(session.config),
            "deselected": getattr(session.config, "_qwen3tts_deselected", None),
            "capture_in_child": CAPTURE_IN_CHILD[0],
            "memory": memory_provenance([_RESULTS.peak, *_RESULTS.worker_peaks], _RESULTS.weights,
                                        _RESULTS.captures),
            "captures": _RESULTS.captures,
        },
        summary={
            "collected": session.testscollected, "passed": outcomes.count("passed"),
            "failed": outcomes.count("failed"), "errors": outcomes.count("error"), "skipped": outcomes.count("skipped"),
            "duration_s": round(time.time() - _RESULTS.start, 1), "exitstatus": int(exitstatus),
        },
        tests=_RESULTS.outcomes, skipped=_RESULTS.skipped, records=_RESULTS.rows, bad_input=_RESULTS.bad_input,
        durations=_RESULTS.durations, marked=_RESULTS.marked,
    )
    if not _RESULTS.rows and not outcomes and int(exitstatus) == 0:
        return  # --collect-only: nothing ran. A collection error still writes (an empty run, with its exit status),
        # so the previous results can never pass for this run's.
    path.parent.mkdir(parents=True, exist_ok=True)
    from impl.outfile import OutputError, write_text

    try:  # atomic (impl/outfile.py): a full disk keeps the previous results file byte for byte
        write_text(path, json.dumps(run.to_json(), indent=1))
    except OutputError as e:
        session.config.get_terminal_writer().line(f"results not written: {e}", red=True)
        session.exitstatus = pytest.ExitCode.INTERNAL_ERROR
