"""Console scripts (``pyproject.toml`` ``[project.scripts]``): one command per job, each a thin front for the
``python -m`` entry that already exists, so ``--help`` shows that entry's complete option list.

    qwen3tts-synthesize   python -m impl synthesize           text -> 24 kHz wav with the from-scratch model
    qwen3tts-bench        python -m reference_export bench    speed, ours vs upstream (points at reference_export.bench:main)
    qwen3tts-synth        python -m reference_export synth    a synthetic checkpoint folder
    qwen3tts-capture      python -m reference_export capture  upstream references (needs the [upstream] extra)
    qwen3tts-compare      python -m reports compare           a port's dump vs a reference, per-port report
    qwen3tts-report       python -m reports run               the parity suite + VALIDATION.md (needs a clone)
"""

from __future__ import annotations

import sys
from pathlib import Path


def _argv() -> list[str]:
    return sys.argv[1:]


def synthesize() -> int:
    from impl.__main__ import main

    return main(["synthesize", *_argv()])


def synth() -> int:
    from reference_export.__main__ import main

    return main(["synth", *_argv()])


def capture() -> int:
    from reference_export.__main__ import main

    return main(["capture", *_argv()])


def compare() -> int:
    from reports.__main__ import main

    return main(["compare", *_argv()])


def report() -> int:
    from reports.__main__ import ROOT, main

    # The main job runs the parity suite, whose fixtures live in the repository's top-level conftest.py (not part
    # of the package): it runs from a clone, where `pip install -e .` or run.sh provide the environment.
    if not (ROOT / "conftest.py").is_file() and not {"-h", "--help"} & set(_argv()):
        print(f"qwen3tts-report: needs a clone of the repository (no conftest.py next to {Path(ROOT, 'reports')}); "
              f"run it from a checkout installed with `pip install -e .`", file=sys.stderr)
        return 2
    return main(["run", *_argv()])
