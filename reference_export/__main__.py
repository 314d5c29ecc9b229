"""``python -m reference_export``: build synthetic checkpoints and capture upstream references.

    python -m reference_export synth --preset tiny --variant base --seed 0 --out ckpt/tiny-base
    python -m reference_export capture --checkpoint ckpt/tiny-base --case talker_stack --out refs/talker.h5
    python -m reference_export cases            # list the cases
"""

from __future__ import annotations

import argparse
import sys

from impl.config import PRESET_NAMES, VARIANTS


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m reference_export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("synth", help="write a synthetic checkpoint folder (real layout, random weights)")
    s.add_argument("--preset", required=True, choices=PRESET_NAMES)
    s.add_argument("--variant", required=True, choices=VARIANTS)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", required=True)
    s.add_argument("--force", action="store_true", help="replace an existing non-empty folder")
    c = sub.add_parser("capture", help="run upstream on a checkpoint and record a case's taps into HDF5")
    c.add_argument("--checkpoint", required=True)
    c.add_argument("--case", required=True)
    c.add_argument("--out", required=True)
    c.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    c.add_argument("--attn", default="eager", choices=["eager", "sdpa"])
    c.add_argument("--device", default="cpu")
    c.add_argument("--seed", type=int, default=0)
    sub.add_parser("cases", help="list the capture cases")
    a = p.parse_args(argv)
    try:
        if a.cmd == "synth":
            from .synth import build_checkpoint

            out = build_checkpoint(a.preset, a.variant, a.seed, a.out, force=a.force)
            print(out)
        elif a.cmd == "capture":
            from .export import capture_case

            print(capture_case(a.case, a.checkpoint, a.out, device=a.device, dtype=a.dtype, attn=a.attn, seed=a.seed))
        elif a.cmd == "cases":
            from .cases import all_cases

            for name, case in sorted(all_cases().items()):
                print(f"{name:32s} {case.component:20s} {','.join(case.variants):30s} {case.description}")
    except (FileExistsError, FileNotFoundError, ValueError, KeyError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
