"""Import hygiene: ``impl`` stands alone (importing every one of its modules loads neither ``transformers``,
``qwen_tts`` nor ``librosa``, the reference side's dependencies), and test files never import each other."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = ("transformers", "qwen_tts", "librosa")

PROBE = """
import importlib, json, pkgutil, sys
import impl
names = ["impl"] + [m.name for m in pkgutil.walk_packages(impl.__path__, "impl.")]
for n in names:
    importlib.import_module(n)
print(json.dumps({"modules": names, "loaded": sorted({m.split(".")[0] for m in sys.modules})}))
"""


def test_importing_every_impl_module_loads_no_reference_dependency():
    # A fresh interpreter: this pytest process has imported the reference side already.
    p = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert len(out["modules"]) > 10, out["modules"]  # the walk really found impl's modules
    loaded = [m for m in FORBIDDEN if m in out["loaded"]]
    assert not loaded, f"importing impl loaded {loaded}"


def test_test_files_do_not_import_each_other():
    """Shared test code lives in ``parity_tests/helpers*.py`` (and fixtures in ``parity_tests/conftest.py``): a
    test file that imports another drags that file's module-level setup and fixtures along."""
    import ast

    offenders = []
    for f in sorted((ROOT / "parity_tests").glob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom):
                mod = node.module or ""
                if mod.split(".")[-1].startswith(("test_", "bench_")):
                    offenders.append(f"{f.name}: from {'.' * node.level}{mod}")
    assert not offenders, offenders


HARNESS = ("reference_export", "reports", "parity_tests", "conftest", "h5py")


def test_impl_imports_nothing_of_the_harness_not_even_lazily():
    """``impl`` is the engine a user installs: no import of the harness anywhere in it, at module level or inside a
    function (the bench's side-by-side driver lives in ``reference_export/bench.py`` for that reason)."""
    import ast

    offenders = []
    for f in sorted((ROOT / "impl").rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            offenders += [f"{f.relative_to(ROOT)}:{node.lineno}: {n}" for n in names if n.split(".")[0] in HARNESS]
    assert not offenders, offenders
