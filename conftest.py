"""pytest options, fixtures that build or reuse synthetic checkpoints and upstream references, and the results
collector that writes ``reports/results.json`` for ``python -m reports``.

Options: ``--preset tiny|0.6b|1.7b``, ``--checkpoint PATH`` (a real checkpoint folder; tests for other variants
skip with a reason), ``--device cpu|cuda``, ``--dtype float32|bfloat16``, ``--attn eager|sdpa``, ``--refs DIR``
(use pre-captured reference files ``DIR/<case>--<variant>.h5`` instead of capturing; a missing one fails),
``--tf32 off|on`` (CUDA only; default off), ``--results PATH`` (default: ``results_path(device, dtype)``).

Built artefacts live under ``$QWEN3TTS_CACHE`` (default ``.cache/`` in the repo), keyed by everything that
decides their content (preset, variant, seed and the synth code's hash for checkpoints; the checkpoint hash,
case, dtype, attention and the capture code's hash for references), so a stale artefact is never reused.
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

ROOT = Path(__file__).parent
CACHE = Path(os.environ.get("QWEN3TTS_CACHE", ROOT / ".cache"))
SEED = 0


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


def pytest_configure(config: pytest.Config) -> None:
    if str(config.getoption("--device")).startswith("cuda"):
        set_tf32(config.getoption("--tf32") == "on")
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
                   "reference_export/h5io.py", "reference_export/registry.py", "reference_export/upstream.py")


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
            return Path(real)
        p = preset_override or preset
        from impl.config import ConfigError, preset_config_dicts

        try:
            preset_config_dicts(p, variant)
        except ConfigError as e:
            pytest.skip(str(e))
        return synthetic_checkpoint(p, variant)

    return get


_UPSTREAM: dict[tuple, object] = {}


def pytest_sessionstart(session: pytest.Session) -> None:
    """Drop cached artefacts built by other versions of the synth/capture code (they can never be reused)."""
    import shutil

    synth_h, cap_h = _src_hash(*SYNTH_SOURCES), _src_hash(*CAPTURE_SOURCES)
    # Dot-prefixed entries are another process's writes in progress (temp dir/file, renamed when complete):
    # never touch them.
    for d in (CACHE / "ckpt").glob("[!.]*-s*-*"):
        if d.is_dir() and not d.name.endswith(synth_h):
            shutil.rmtree(d, ignore_errors=True)
    for f in (CACHE / "refs").glob("[!.]*.h5"):
        if not f.stem.endswith(cap_h):
            f.unlink(missing_ok=True)


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
    key = f"{sha[:16]}-{case_name}-{dev_tag}-{dtype}-{codec_dtype}-{use_attn}-{_src_hash(*CAPTURE_SOURCES)}"
    out = CACHE / "refs" / f"{key}.h5"
    with _lock(key):
        if not out.exists():
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


class Results:
    """What the session recorded: typed comparison records (``reports.results.Record``), test outcomes, skip
    reasons, bad-input cases, and the hash of the code the session started from."""

    def __init__(self) -> None:
        from reports.results import code_hash

        self.rows: list = []  # reports.results.Record
        self.bad_input: list[dict] = []  # one entry per bad-input case (issue: bad input), rendered by reports
        self.outcomes: dict[str, str] = {}
        self.skipped: dict[str, str] = {}  # nodeid -> reason
        self.durations: dict[str, float] = {}
        self.start = time.time()
        # Taken when the session starts: an edit during the run makes the results refuse to render.
        self.code_hash = code_hash(ROOT)

    def log(self, report: pytest.TestReport) -> None:
        """Fold one test phase's report into the outcomes: a skip, the call's outcome, or an error in setup or
        teardown (the test errored: its row must not stay green)."""
        nid = report.nodeid
        if report.skipped:
            self.outcomes[nid] = "skipped"
            self.skipped[nid] = _skip_reason(report)
        elif report.when == "call":
            self.outcomes[nid] = report.outcome
        elif report.failed:
            self.outcomes[nid] = "error"
        if report.when == "call" or report.failed:
            self.durations[nid] = report.duration

    def add(self, nodeid: str, result, row: str, component: str, variant: str = "", notes: str = "",
            preset: str = "", compares: str = "ours vs upstream", expect_fail: bool = False) -> None:
        from reports.results import Record

        self.rows.append(Record(component=component, row=row, result=result, preset=preset, variant=variant,
                                compares=compares, expect_fail=expect_fail, notes=notes, nodeid=nodeid))


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
    the user saw. Record it after asserting on it, so that a recorded case is one whose test checked it. The
    session's temporary folder is shown as ``<tmp>``, so the report does not change from run to run."""
    base = str(tmp_path_factory.getbasetemp())

    def add(case: str, outcome: str, message: str, surface: str = "") -> None:
        _RESULTS.bad_input.append({"nodeid": request.node.nodeid, "surface": surface, "case": case,
                                   "outcome": outcome, "message": message.replace(base, "<tmp>")})

    return add


def _skip_reason(report: pytest.TestReport) -> str:
    lr = report.longrepr
    if isinstance(lr, tuple) and len(lr) == 3:  # (file, line, "Skipped: reason")
        return str(lr[2]).removeprefix("Skipped: ")
    return str(lr or "")


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _RESULTS.log(report)


def _device_info(device: str) -> dict:
    from reference_export.export import device_info

    try:
        return device_info(device)
    except (RuntimeError, AssertionError, ValueError) as e:  # no such device: the run skipped its tests
        return {"device": device, "error": str(e).splitlines()[0] if str(e) else type(e).__name__}


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if getattr(session.config, "workerinput", None) is not None:
        return
    path = Path(session.config.getoption("--results") or results_path(session.config.getoption("--device"),
                                                                        session.config.getoption("--dtype")))
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
        },
        summary={
            "collected": session.testscollected, "passed": outcomes.count("passed"),
            "failed": outcomes.count("failed"), "errors": outcomes.count("error"), "skipped": outcomes.count("skipped"),
            "duration_s": round(time.time() - _RESULTS.start, 1), "exitstatus": int(exitstatus),
        },
        tests=_RESULTS.outcomes, skipped=_RESULTS.skipped, records=_RESULTS.rows, bad_input=_RESULTS.bad_input,
    )
    if not _RESULTS.rows and not outcomes and int(exitstatus) == 0:
        return  # --collect-only: nothing ran. A collection error still writes (an empty run, with its exit status),
        # so the previous results can never pass for this run's.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(run.to_json(), indent=1))
    os.replace(tmp, path)
