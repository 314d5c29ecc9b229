"""``python -m reference_export bench --model DIR``: ours and upstream side by side on the same folder, in one process.

The harness's driver around :func:`impl.bench.run`: the same arguments and measurements as ``python -m impl bench``
(our static decode step, our eager loop, first audio, peak memory, the read-bandwidth floor), plus upstream
``qwen-tts`` timed through its own public wrapper (:mod:`reference_export.upstream_bench`) for every batch size,
the ratios ours / upstream, and whether greedy codes are equal. ``--no-upstream`` times ours only. Results merge
into ``reports/bench-<device>-<preset>.json`` (``--json`` to choose), which ``reports/perf.py`` renders.
"""

from __future__ import annotations

import argparse
import sys

from impl.bench import add_arguments, run

PROG = "python -m reference_export bench"


def main(argv: list[str] | None = None) -> int:
    p = add_arguments(argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0]))
    p.add_argument("--no-upstream", action="store_true", help="time ours only")
    args = p.parse_args(argv)
    args.argv = argv
    args.prog = PROG
    try:
        if args.no_upstream:
            return run(args)
        from .upstream_bench import time_upstream

        return run(args, time_upstream)
    except (ValueError, FileNotFoundError, NotImplementedError, KeyError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
