"""True streaming for the speech-tokenizer decoder: carried state instead of recomputed context.

Upstream has no streaming decoder. ``Qwen3TTSTokenizerV2Decoder.chunked_decode`` cuts the codes into 300-frame
chunks and re-decodes 25 frames of left context from scratch for each; because the decoder's receptive field is
far longer than 25 frames (8 attention layers with a 72-frame window, then the conv stacks), its output after
frame 300 differs slightly from a one-shot decode of all frames.

Here every layer carries exactly the past its next output needs (``conv.py`` states, and the sliding-window
KV cache below for the pre-transformer), and the decoder is causal with zero look-ahead. So:

- pushing codes in ANY chunking (down to one frame at a time) gives the **full one-shot decode**
  ``CodecDecoder(codes)`` on all frames, up to float rounding (stack tier) -- not ``chunked_decode``;
- every pushed frame yields its 1920 samples at once: audio is available after the first frame.

The one codec-level entry point is ``CodecDecoder.stream()``, which returns a :class:`DecoderStream` (the
per-layer state between pushes); ``Qwen3TTS.stream`` is the model-level one and uses it.

``SlidingKVCache`` (in :mod:`impl.kv_cache`, with the other caches; re-exported here) duck-types
``impl.kv_cache.KVCache`` (``update`` / ``advance``) so the shared ``Attention`` runs on it unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..kv_cache import SlidingKVCache
from .quantizer import check_codes, check_integer_codes

if TYPE_CHECKING:
    from .decoder import CodecDecoder, DecoderState


class DecoderStream:
    """Push codes, get audio at once: ``wav = stream.push(codes)`` with codes (B, f, Q) or (f, Q) -> (B, f*1920).

    Made by ``CodecDecoder.stream()``. Holds the ``DecoderState`` between pushes (``state``, ``frames``);
    ``reset()`` starts a new utterance. Codes (a tensor on any device, or an array) must be valid
    (0 <= code < codebook size, checked before the lookup): there is no -1 padding in a stream. Audio comes back on
    the decoder's device, in its dtype. Per-frame pushes are many small ops: on a busy CPU,
    ``torch.set_num_threads(1)`` made a frame-at-a-time tiny decode 8-15x faster (measured).

    Usage: ``s = decoder.stream(); a = s.push(codes[:1]); b = s.push(codes[1:])`` -- ``cat(a, b)`` equals the
    one-shot ``decoder(codes)`` up to fp32 rounding; ``for c in split_frames(codes, [n]): s.push(c)`` pushes n
    frames at a time.
    """

    def __init__(self, decoder: CodecDecoder):
        self.decoder = decoder
        self.state: DecoderState | None = None

    @property
    def frames(self) -> int:
        return 0 if self.state is None else self.state.frames

    def reset(self) -> None:
        self.state = None

    @torch.inference_mode()
    def push(self, codes: torch.Tensor | np.ndarray) -> torch.Tensor:
        codes = torch.as_tensor(codes)
        check_integer_codes(codes)
        codes = codes.long()
        if codes.ndim == 2:
            codes = codes[None]  # (1, f, Q)
        if codes.ndim != 3:
            raise ValueError(f"codes must be (f, Q) or (B, f, Q), got {tuple(codes.shape)}")
        if codes.numel() and int(codes.min()) < 0:
            raise ValueError("negative codes in a stream (-1 padding is only meaningful for batch decode)")
        check_codes(codes, self.decoder.cfg.codebook_size)  # before the lookup: names item, frame, codebook
        p = next(self.decoder.parameters())
        wav, self.state = self.decoder._step(codes.to(p.device).transpose(1, 2), self.state)  # (B, 1, f*1920)
        return wav[:, 0]


def split_frames(codes: torch.Tensor, schedule: Iterable[int]) -> Iterator[torch.Tensor]:
    """Cut codes (..., F, Q) along frames into chunks of the given sizes, repeating the last size until done."""
    n = codes.shape[-2]
    start, last = 0, 1
    it = iter(schedule)
    while start < n:
        last = next(it, last)
        if last < 1:
            raise ValueError(f"chunk sizes must be >= 1, got {last}")
        yield codes[..., start:start + last, :]
        start += last


__all__ = ["SlidingKVCache", "DecoderStream", "split_frames"]
