"""Extract the inputs a reference was captured with, as ``.npy`` files a port can read (harness side: h5py).

    python examples/numpy_port/feed.py --talker-ref refs/talker_stack.h5 --codec-ref refs/codec_decoder.h5 \\
        --out port_inputs/

Writes ``text_ids.npy`` (the ``talker_stack`` case's token ids) and ``decoder_block_in.npy`` (the input of
``speech_tokenizer.decoder.decoder.1`` in the ``codec_decoder`` case: the port's codec block starts from upstream's
own input, as the harness's block rows do).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

try:
    from reference_export.h5io import ReferenceError_, RefFile
except ImportError:  # run from a clone without `pip install .`: the harness is two folders up
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from reference_export.h5io import ReferenceError_, RefFile

BLOCK_IN = "speech_tokenizer.decoder.decoder.1:in"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--talker-ref", required=True, type=Path, help="reference of the talker_stack case")
    ap.add_argument("--codec-ref", required=True, type=Path, help="reference of the codec_decoder case")
    ap.add_argument("--out", required=True, type=Path, help="folder for text_ids.npy, decoder_block_in.npy")
    a = ap.parse_args(argv)
    try:
        with RefFile(a.talker_ref) as t, RefFile(a.codec_ref) as c:
            ids = t.input("text_ids").numpy()
            block_in = c.tap(BLOCK_IN).float().numpy()
    except ReferenceError_ as e:
        print(f"feed: {e}", file=sys.stderr)
        return 2
    a.out.mkdir(parents=True, exist_ok=True)
    np.save(a.out / "text_ids.npy", ids)
    np.save(a.out / "decoder_block_in.npy", block_in)
    print(f"feed: wrote {a.out / 'text_ids.npy'} {ids.shape} and {a.out / 'decoder_block_in.npy'} {block_in.shape}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
