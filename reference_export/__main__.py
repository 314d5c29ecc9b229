"""``python -m reference_export``: build synthetic checkpoints and capture upstream references.

    python -m reference_export synth --preset tiny --variant base --seed 0 --out ckpt/tiny-base
    python -m reference_export capture --checkpoint ckpt/tiny-base --case talker_stack --out refs/talker.h5
    python -m reference_export cases            # list the cases
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

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
    c.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float64"],
                   help="talker/speaker-encoder dtype (float64: the fp64 tier's truth, codec included)")
    c.add_argument("--codec-dtype", default=None, choices=["float32", "bfloat16", "float64"],
                   help="speech tokenizer dtype (default float32; float64 when --dtype float64)")
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

            out = _check_capture_args(a)
            written = capture_case(a.case, a.checkpoint, out, device=a.device, dtype=a.dtype, attn=a.attn,
                                   seed=a.seed, codec_dtype=a.codec_dtype)
            _warn_nonfinite(written)
            print(written)
        elif a.cmd == "cases":
            from .cases import all_cases

            for name, case in sorted(all_cases().items()):
                print(f"{name:32s} {case.component:20s} {','.join(case.variants):30s} {case.description}")
    except KeyboardInterrupt:
        # Ctrl-C: one line, 128 + SIGINT. Writes are atomic (temporary file or folder, renamed at the end).
        print("interrupted (no output written or changed)", file=sys.stderr)
        return 130
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
        lines = [ln for ln in text.strip().splitlines() if ln.strip()]
        print(f"error: {lines[0] if lines else type(e).__name__}", file=sys.stderr)
        return 2
    return 0


def _warn_nonfinite(path: str | Path) -> None:
    """Say loudly (stderr) when a written reference holds NaN/Inf taps: weights were checked before the run, so
    these come from the computation itself (e.g. upstream's codec overflowing in bf16), and they are a finding,
    not a reference to compare against silently."""
    import h5py

    bad: list[str] = []
    total = [0]

    def visit(name: str, obj) -> None:
        if isinstance(obj, h5py.Dataset) and name.startswith("taps/"):
            total[0] += 1
            if not bool(obj.attrs.get("finite", True)):
                bad.append(name[len("taps/"):])

    with h5py.File(path, "r") as f:
        f.visititems(visit)
    if bad:
        print(f"warning: {path}: {len(bad)} of {total[0]} tap datasets hold NaN/Inf (first: {bad[0]}); "
              "this reference is not finite", file=sys.stderr)


def _check_capture_args(a: argparse.Namespace) -> str:
    """Everything ``capture`` can check before loading upstream, each failure one line naming the file or value:
    the case exists, the device exists, ``--out`` can be written (a symlink is followed; a folder, device or
    other non-regular file is refused: the atomic rename would replace it), and the checkpoint's configs parse and
    its weights are readable, finite and not blanked (a reference captured on NaN weights is NaN throughout).
    Returns the path to write (symlinks resolved)."""
    from impl.config import Qwen3TTSConfig, SpeechTokenizerConfig
    from impl.loading import CheckpointError, read_state_dict
    from impl.model import resolve_device
    from impl.outfile import OutputError, check_output

    from .cases import get_case

    get_case(a.case)
    resolve_device(a.device)
    target, through = check_output(a.out)
    if through:
        raise OutputError(f"{a.out}: not a regular file; a reference is written atomically to a regular file")
    ck = Path(a.checkpoint)
    if not ck.is_dir():
        raise CheckpointError(f"{ck}: not a checkpoint folder")
    Qwen3TTSConfig.from_file(ck / "config.json")
    SpeechTokenizerConfig.from_file(ck / "speech_tokenizer" / "config.json")
    for folder in (ck, ck / "speech_tokenizer"):
        read_state_dict(folder)  # one read per tensor: truncation, NaN/Inf and all-zero matrices raise here
    return str(target)


if __name__ == "__main__":
    sys.exit(main())
