"""The package installs into a user's environment without touching its torch (opt-in: ``-m install``).

Builds a wheel from the repository's files, creates a fresh venv holding a torch other than the one
``requirements.lock`` pins, installs the wheel there, checks that torch was left alone, then runs every console
script's ``--help`` and a tiny ``qwen3tts-compare`` (green and red) from outside the repository.

Minutes and network (PyPI): the torch install alone moves ~3 GB (PyPI's Linux torch is the CUDA build; its nvidia
wheels are needed to import it even on a CPU machine). ``QWEN3TTS_INSTALL_TORCH`` chooses the torch requirement
(default ``torch>=2.5,!=<locked version>``); ``QWEN3TTS_INSTALL_VENV`` reuses an existing venv that already holds a
torch (faster; it is left in place, the wheel is installed into it).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from reference_export.h5io import write_refs

pytestmark = pytest.mark.install

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = {  # console script -> text its --help must show (the entry's own options, not a stub)
    "qwen3tts-synthesize": "--model",
    "qwen3tts-bench": "--model",
    "qwen3tts-synth": "--preset",
    "qwen3tts-capture": "--case",
    "qwen3tts-compare": "--map",
    "qwen3tts-report": "--preset",
}


def _locked_torch() -> str:
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if line.startswith("torch=="):
            return line.split("==", 1)[1].strip()
    raise AssertionError("requirements.lock pins no torch")


def _run(cmd: list[str], cwd: Path, timeout: int = 1800) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env, check=False)


def _source_tree(dst: Path) -> Path:
    """The files a fresh clone has (tracked + untracked-not-ignored), copied so the build leaves no build/ or
    *.egg-info in the working tree."""
    p = _run(["git", "ls-files", "-co", "--exclude-standard"], ROOT)
    assert p.returncode == 0, p.stderr
    for rel in p.stdout.splitlines():
        src = ROOT / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)
    return dst


@pytest.fixture
def opted_in(request):
    # `reports run` passes its own -m (without "not install"): run only when install is selected explicitly.
    expr = request.config.getoption("-m") or ""
    if "install" not in expr.replace("not install", ""):
        pytest.skip("opt-in: pytest -m install parity_tests/test_port_install.py")


def test_wheel_installs_beside_another_torch_and_its_scripts_run(opted_in, tmp_path):
    times: dict[str, float] = {}
    t0 = time.time()
    src = _source_tree(tmp_path / "src")
    p = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "wheels"), str(src)],
             tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    (wheel,) = (tmp_path / "wheels").glob("qwen3_tts_parity-*.whl")
    times["build wheel"] = time.time() - t0

    venv_env = os.environ.get("QWEN3TTS_INSTALL_VENV")
    venv = Path(venv_env) if venv_env else tmp_path / "venv"
    py = venv / "bin" / "python"
    t0 = time.time()
    if not venv_env:
        assert _run([sys.executable, "-m", "venv", str(venv)], tmp_path).returncode == 0
        spec = os.environ.get("QWEN3TTS_INSTALL_TORCH", f"torch>=2.5,!={_locked_torch()}")
        p = _run([str(py), "-m", "pip", "install", "-q", spec], tmp_path)
        assert p.returncode == 0, p.stderr[-3000:]
    times["venv + torch"] = time.time() - t0

    def torch_version() -> str:
        q = _run([str(py), "-c", "import torch; print(torch.__version__)"], tmp_path)
        assert q.returncode == 0, q.stderr[-2000:]
        return q.stdout.strip()

    before = torch_version()
    assert before.split("+")[0] != _locked_torch(), f"the venv holds the locked torch {before}: not a test"
    t0 = time.time()
    p = _run([str(py), "-m", "pip", "install", str(wheel)], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    times["install wheel"] = time.time() - t0
    installed = next((ln for ln in p.stdout.splitlines() if ln.startswith("Successfully installed")), "")
    assert " torch-" not in installed, installed
    assert torch_version() == before  # pip left the user's torch alone

    bindir = venv / "bin"
    where = _run([str(py), "-c", "import reports, impl; print(reports.__file__)"], tmp_path)
    assert str(venv) in where.stdout, where.stdout + where.stderr  # the installed copy, not the source tree
    t0 = time.time()
    for script, must in SCRIPTS.items():
        h = _run([str(bindir / script), "--help"], tmp_path, timeout=300)
        assert h.returncode == 0, (script, h.stderr[-2000:])
        assert "usage:" in h.stdout and must in h.stdout, (script, h.stdout[:500])
    times["--help x6"] = time.time() - t0

    # A tiny compare with the installed command: an exact copy passes, a perturbed tap is named.
    g = torch.Generator().manual_seed(0)
    recs = {f"m.layers.{i}:out": [torch.randn(2, 8, generator=g)] for i in range(3)}
    ref = write_refs(tmp_path / "ref.h5", meta={"checkpoint_sha256": "cd" * 32}, case={}, inputs={}, records=recs,
                     progress=False)
    save_file({k: v[0] for k, v in recs.items()}, str(tmp_path / "same.safetensors"))
    bad = {k: v[0].clone() for k, v in recs.items()}
    bad["m.layers.1:out"][1, 2] += 0.1
    save_file(bad, str(tmp_path / "bad.safetensors"))
    c = _run([str(bindir / "qwen3tts-compare"), "same.safetensors", ref.name, "--tier", "op", "--out", "rep"],
             tmp_path, timeout=300)
    assert c.returncode == 0, c.stdout + c.stderr
    assert (tmp_path / "rep" / "REPORT.md").is_file() and (tmp_path / "rep" / "error_growth.png").is_file()
    c = _run([str(bindir / "qwen3tts-compare"), "bad.safetensors", ref.name, "--tier", "op"], tmp_path, timeout=300)
    assert c.returncode == 1 and "first divergence (upstream execution order): m.layers.1:out" in c.stdout, c.stdout
    print(f"\ninstall test: torch {before} in the venv (lock pins {_locked_torch()}); "
          + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()))
    if not venv_env:
        shutil.rmtree(venv, ignore_errors=True)  # ~5 GB: do not leave it for pytest's tmp retention
