"""The 12 Hz speech tokenizer (codec): ``SpeechTokenizer`` = decoder (codes -> 24 kHz audio) + encoder.

Upstream: ``Qwen3TTSTokenizerV2Model`` (qwen_tts ``core/tokenizer_12hz``), loaded from a checkpoint's
``speech_tokenizer/{config.json, model.safetensors}``, and the ``decode`` of its inference wrapper
``Qwen3TTSTokenizer`` (list of float32 numpy arrays).

    st = SpeechTokenizer.from_dir(ckpt)                    # ckpt or ckpt/speech_tokenizer
    wavs = st.decode([codes_a, codes_b])                   # list of (F_i, 16) -> list of np.float32 (F_i*1920,)
    s = st.decoder.stream()                                # the streaming entry point: a DecoderStream
    for c in split_frames(codes, [1]):                     # (F, Q) codes one frame at a time
        wav = s.push(c)                                    # (1, 1920) per frame, at once (decoder's device)

``decode`` is upstream's: 300-frame chunks with 25 frames of recomputed left context (what upstream users get).
``decoder.stream()`` carries state and equals the FULL one-shot decode ``st.decoder(codes)`` (``decode_oneshot``);
the two differ slightly after frame 300. Module paths for taps: ``speech_tokenizer.decoder.<upstream path>``.
"""

from __future__ import annotations

import importlib
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

    @staticmethod
    def _pad(codes: CodesLike) -> torch.Tensor:
        """list of (F_i, Q) | (F, Q) | (B, F, Q) -> (B, F_max, Q) long, right-padded with -1 (upstream's
        ``pad_sequence(..., padding_value=-1)``)."""
        if isinstance(codes, (list, tuple)):
            rows = [torch.as_tensor(np.asarray(c) if not isinstance(c, torch.Tensor) else c).long() for c in codes]
            return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=-1)
        t = torch.as_tensor(codes).long()
        return t[None] if t.ndim == 2 else t

    @torch.inference_mode()
    def decode(self, codes: CodesLike) -> list[np.ndarray]:
        """Upstream ``decode``: one float32 (F_i*1920,) array per item. ``codes``: a list of (F_i, Q), or a
        (B, F, Q) / (F, Q) tensor padded with -1 (a frame counts if its first code is > -1)."""
        padded = self._pad(codes).to(self.device)
        if padded.shape[1] == 0:
            return [np.zeros(0, np.float32) for _ in range(padded.shape[0])]
        wavs = self.decoder.decode_padded(padded)
        return [w.float().cpu().numpy() for w in wavs]

    @torch.inference_mode()
    def decode_oneshot(self, codes: torch.Tensor | np.ndarray) -> np.ndarray:
        """The full one-shot decode of valid codes (F, Q) -> (F*1920,), or (B, F, Q) -> (B, F*1920), float32:
        what streaming with ``self.decoder.stream()`` equals (no 300-frame chunking, no -1 padding)."""
        t = torch.as_tensor(codes).long()
        single = t.ndim == 2
        t = t[None] if single else t
        if t.numel() and int(t.min()) < 0:
            raise ValueError("negative codes: use decode() for -1-padded batches")
        wav = self.decoder(t.to(self.device).transpose(1, 2))[:, 0].float().cpu().numpy()  # (B, F*1920)
        return wav[0] if single else wav

    # ---------------------------------------------------------------------------------------- encode

    def encode(self, *args: Any, **kwargs: Any) -> Any:
        """Audio -> codes, delegated to ``impl.codec.encoder.CodecEncoder.encode`` (``(B, T) audio, (B, T)
        padding mask -> list of (F_i, 16)``, as upstream ``Qwen3TTSTokenizerV2Model.encode``)."""
        if self.encoder is None:
            raise NotImplementedError("impl.codec.encoder.CodecEncoder is not available; only the decoder is loaded")
        return self.encoder.encode(*args, **kwargs)


__all__ = ["SpeechTokenizer", "CodecDecoder", "DecoderState", "DecoderStream", "split_frames"]
