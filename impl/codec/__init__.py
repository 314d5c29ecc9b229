"""The 12 Hz speech tokenizer (codec): ``SpeechTokenizer`` = decoder (codes -> 24 kHz audio) + encoder.

Upstream: ``Qwen3TTSTokenizerV2Model`` (qwen_tts ``core/tokenizer_12hz``), loaded from a checkpoint's
``speech_tokenizer/{config.json, model.safetensors}``, and the ``decode`` of its inference wrapper
``Qwen3TTSTokenizer`` (list of float32 numpy arrays).

    st = SpeechTokenizer.from_dir(ckpt)                    # ckpt or ckpt/speech_tokenizer
    wavs = st.decode([codes_a, codes_b])                   # list of (F_i, 16) -> list of np.float32 (F_i*1920,)
    s = st.decoder.stream()                                # the streaming entry point: a DecoderStream
    for c in split_frames(codes, [1]):                     # (F, Q) codes one frame at a time
        wav = s.push(c)                                    # (1, 1920) per frame, at once (decoder's device)

``decode`` is upstream's: 300-frame chunks with 25 frames of recomputed left context (what upstream users get);
its codes are range-checked first (``impl.codec.quantizer.check_codes``: one line naming item, frame, codebook), and
``decode(codes, skip_frames=n)`` returns the audio after frame n without decoding the chunks wholly before it.
``decoder.stream()`` carries state and equals the FULL one-shot decode ``st.decoder(codes)`` (``decode_oneshot``);
the two differ slightly after frame 300. Module paths for taps: ``speech_tokenizer.decoder.<upstream path>``.
"""

from __future__ import annotations

import importlib
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..config import SpeechTokenizerConfig
from ..layers import check_attn_impl, set_attention
from ..loading import (
    CheckpointError,
    build_on_meta,
    finish_loaded,
    gathered_keys,
    load_into,
    read_state_dict,
    weight_files,
)
from ..taps import set_tap_paths
from .decoder import CodecDecoder, DecoderState
from .quantizer import check_codes, check_integer_codes
from .streaming import DecoderStream, split_frames

CodesLike = torch.Tensor | np.ndarray | list[Any]


def _encoder_class() -> type | None:
    """``impl.codec.encoder.CodecEncoder`` if that module exists (written separately), else None."""
    try:
        mod = importlib.import_module(f"{__name__}.encoder")
    except ModuleNotFoundError as e:
        if e.name == f"{__name__}.encoder":
            return None
        raise
    return getattr(mod, "CodecEncoder", None)


class SpeechTokenizer(nn.Module):
    """Decoder (and encoder when ``impl.codec.encoder`` provides one) under upstream's key names."""

    def __init__(self, cfg: SpeechTokenizerConfig, with_encoder: bool = True):
        super().__init__()
        self.cfg = cfg
        self.decoder = CodecDecoder(cfg.decoder_config)
        enc_cls = _encoder_class() if with_encoder else None
        self.encoder = (enc_cls(cfg.encoder_config, cfg.encoder_valid_num_quantizers)
                        if enc_cls is not None else None)
        self.sample_rate = cfg.output_sample_rate
        set_tap_paths(self.decoder, "speech_tokenizer.decoder")
        if self.encoder is not None:
            set_tap_paths(self.encoder, "speech_tokenizer.encoder")

    # ---------------------------------------------------------------------------------------- loading

    @classmethod
    def from_dir(cls, path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 attn: str = "sdpa", encoder: bool = True, mmap: bool = True) -> SpeechTokenizer:
        """Load ``<path>/speech_tokenizer/`` (or ``<path>`` itself if it holds the codec's ``config.json``).

        Strict: every ``decoder.*`` key must match, and so must every ``encoder.*`` key when an encoder module
        exists; without one, ``encoder.*`` keys are checked to be only that and skipped. Any other key raises.
        Runs fp32 by default (upstream's codec config says float32); ``dtype=torch.bfloat16`` is selectable.
        ``encoder=False`` builds the decoder only (``encoder.*`` keys are then skipped, as without a module).
        ``attn`` (``"eager"`` | ``"sdpa"``) is set once on decoder and encoder (:func:`impl.layers.set_attention`).
        ``mmap``: as :meth:`impl.Qwen3TTS.from_pretrained` (CPU lookup tables from a private file mapping).
        """
        check_attn_impl(attn)
        folder = Path(path)
        if (folder / "speech_tokenizer" / "config.json").exists():
            folder = folder / "speech_tokenizer"
        cfg = SpeechTokenizerConfig.from_file(folder / "config.json")
        # The loader recipe of impl.loading.load_module, in two strict parts (decoder, encoder) so each error
        # names its part: built on meta, the checkpoint's tensors (on device, in dtype) become the parameters.
        model = build_on_meta(lambda: cls(cfg, with_encoder=encoder))
        where = str(weight_files(folder)[0])
        state = read_state_dict(folder, device=device, dtype=dtype,
                                mmap=gathered_keys(model).__contains__ if mmap else False)
        stray = sorted(k for k in state if not k.startswith(("decoder.", "encoder.")))
        if stray:
            raise CheckpointError(f"{where}: unexpected key(s) {stray[:5]} (neither decoder.* nor encoder.*)")
        load_into(model.decoder, {k[8:]: v for k, v in state.items() if k.startswith("decoder.")}, where,
                  "decoder.")
        if model.encoder is not None:
            load_into(model.encoder, {k[8:]: v for k, v in state.items() if k.startswith("encoder.")}, where,
                      "encoder.")
        del state
        return set_attention(finish_loaded(model, device, where), attn)

    @property
    def device(self) -> torch.device:
        return next(self.decoder.parameters()).device

    # ---------------------------------------------------------------------------------------- decode

    def _pad(self, codes: CodesLike) -> torch.Tensor:
        """list of (F_i, Q) | (F, Q) | (B, F, Q) -> (B, F_max, Q) long, right-padded with -1 (upstream's
        ``pad_sequence(..., padding_value=-1)``). Integer codes of width Q, or one ``ValueError`` line."""
        Q = self.decoder.cfg.num_quantizers
        if isinstance(codes, (list, tuple)):
            if not codes:
                raise ValueError("codes: an empty list (decode takes a list of (frames, Q) code arrays)")
            rows = [torch.as_tensor(np.asarray(c) if not isinstance(c, torch.Tensor) else c) for c in codes]
            for i, r in enumerate(rows):
                check_integer_codes(r, f"codes item {i}")
                if r.ndim != 2 or r.shape[1] != Q:
                    raise ValueError(f"codes item {i}: shape {tuple(r.shape)} is not (frames, {Q})")
            return torch.nn.utils.rnn.pad_sequence([r.long() for r in rows], batch_first=True, padding_value=-1)
        t = torch.as_tensor(codes)
        check_integer_codes(t)
        if t.ndim not in (2, 3) or t.shape[-1] != Q:
            raise ValueError(f"codes: shape {tuple(t.shape)} is not (frames, {Q}) or (batch, frames, {Q})")
        t = t.long()
        return t[None] if t.ndim == 2 else t

    @torch.inference_mode()
    def decode(self, codes: CodesLike, skip_frames: int = 0) -> list[np.ndarray]:
        """Upstream ``decode``: one float32 (F_i*1920,) array per item. ``codes``: a list of (F_i, Q), or a
        (B, F, Q) / (F, Q) tensor right-padded with -1 (a frame counts if its first code is > -1).

        Codes are checked first: each in ``[0, codebook_size)``, -1 only for whole padding frames after the valid
        ones (one ``ValueError`` line naming item, frame and codebook otherwise). An item with no valid frame
        decodes to 0 samples, with a warning that says so.

        ``skip_frames``: return ``decode(codes)[i][skip_frames * 1920:]`` bit for bit, without decoding the
        300-frame chunks that lie wholly inside the skipped frames (each chunk is decoded from scratch, so the
        others do not change). ``Qwen3TTS.decode`` uses it to drop an ICL reference without decoding most of it.
        Must be at most every item's valid frames."""
        if isinstance(skip_frames, bool) or not isinstance(skip_frames, int) or skip_frames < 0:
            raise ValueError(f"skip_frames {skip_frames!r} must be an integer >= 0")
        padded = self._pad(codes).to(self.device)
        if padded.shape[0] == 0:
            return []
        check_codes(padded, self.decoder.cfg.codebook_size, padding=True)
        valid = (padded[..., 0] > -1).sum(1).tolist() if padded.shape[1] else [0] * padded.shape[0]
        for i, n in enumerate(valid):
            if n == 0:
                why = f"all {padded.shape[1]} frames are -1 padding" if padded.shape[1] else "it has no frames"
                warnings.warn(f"codes item {i}: {why}, so its audio is empty (0 samples)", stacklevel=3)
        if skip_frames > min(valid):
            raise ValueError(f"skip_frames {skip_frames} exceeds the valid frames of an item ({min(valid)})")
        if max(valid) == 0:
            return [np.zeros(0, np.float32) for _ in valid]
        wavs = self.decoder.decode_padded(padded, skip_frames)
        return [w.float().cpu().numpy() for w in wavs]

    @torch.inference_mode()
    def decode_oneshot(self, codes: torch.Tensor | np.ndarray) -> np.ndarray:
        """The full one-shot decode of valid codes (F, Q) -> (F*1920,), or (B, F, Q) -> (B, F*1920), float32:
        what streaming with ``self.decoder.stream()`` equals (no 300-frame chunking, no -1 padding)."""
        t = torch.as_tensor(codes)
        check_integer_codes(t)
        Q = self.decoder.cfg.num_quantizers
        if t.ndim not in (2, 3) or t.shape[-1] != Q:
            raise ValueError(f"codes: shape {tuple(t.shape)} is not (frames, {Q}) or (batch, frames, {Q})")
        single = t.ndim == 2
        t = t[None] if single else t
        if t.numel() and int(t.min()) < 0:
            raise ValueError("negative codes: use decode() for -1-padded batches")
        check_codes(t, self.decoder.cfg.codebook_size)
        wav = self.decoder(t.long().to(self.device).transpose(1, 2))[:, 0].float().cpu().numpy()  # (B, F*1920)
        return wav[0] if single else wav

    # ---------------------------------------------------------------------------------------- encode

    def encode(self, *args: Any, **kwargs: Any) -> Any:
        """Audio -> codes, delegated to ``impl.codec.encoder.CodecEncoder.encode`` (``(B, T) audio, (B, T)
        padding mask -> list of (F_i, 16)``, as upstream ``Qwen3TTSTokenizerV2Model.encode``)."""
        if self.encoder is None:
            raise NotImplementedError("impl.codec.encoder.CodecEncoder is not available; only the decoder is loaded")
        return self.encoder.encode(*args, **kwargs)


__all__ = ["SpeechTokenizer", "CodecDecoder", "DecoderState", "DecoderStream", "split_frames"]
