"""Speech-tokenizer decoder cases: codes -> 24 kHz audio (upstream ``Qwen3TTSTokenizerV2Decoder``).

``codec_decoder``: one-shot ``decoder(codes)`` on random codes (B, 16, F) with F = 90 frames, longer than the
72-frame attention window, under eager attention (so attention probabilities exist). Every tap the parity rows
use is recorded with its first input (``:in``), so op- and block-level rows can feed upstream's own input to
our layer. B = 2 on ``tiny`` (batching), 1 on released dimensions (audio-rate taps are ~130 MB each there).

``codec_chunked_decode``: upstream's user-facing ``Qwen3TTSTokenizerV2Model.decode`` on a batch of two items
of 310 and 40 frames, right-padded with -1: crosses the 300-frame ``chunked_decode`` boundary (25 frames of
recomputed left context) and exercises the -1 padding / length trimming. The per-item waveforms are recorded as
``speech_tokenizer:decode`` (one call per item, in batch order; read with ``tap_steps``).

Inputs: ``codes_bqf`` (B, Q, F) for the decoder forward; ``audio_codes`` (B, F, Q) padded with -1 for decode.
"""

from __future__ import annotations

import torch

from ..registry import register_taps
from . import Case, CaseEnv, register

FRAMES = 90  # > 72: queries past frame 71 lose their oldest keys (the window matters)
CHUNKED_FRAMES = (310, 40)  # crosses the 300-frame chunk boundary; the second item is padded with -1
D = "speech_tokenizer.decoder"

# Modules whose input and output the op/block rows use (paths under the decoder; upstream names).
OP_MODULES = {
    "conv": ["pre_conv", "decoder.0", "decoder.1.block.4.conv1", "upsample.0.1.dwconv", "decoder.6"],
    "snake": ["decoder.1.block.0", "decoder.1.block.2.act1", "decoder.5"],
    "transconv": ["upsample.0.0", "decoder.1.block.1", "decoder.4.block.1"],
    "convnext": ["upsample.0.1", "upsample.1.1"],
    "resunit": ["decoder.1.block.2", "decoder.2.block.3", "decoder.4.block.4"],
}
ATTN_POINTS = ("q_rope", "k_rope", "attn_probs")


def decoder_blocks(st_cfg: dict) -> list[str]:
    return [f"decoder.{i + 1}" for i in range(len(st_cfg["decoder_config"]["upsample_rates"]))]


def pre_transformer_taps(st_cfg: dict) -> list[str]:
    n = st_cfg["decoder_config"]["num_hidden_layers"]
    taps = [f"{D}.pre_transformer.input_proj:in", f"{D}.pre_transformer.input_proj:out"]
    for i in range(n):
        base = f"{D}.pre_transformer.layers.{i}"
        taps += [f"{base}.self_attn:{p}" for p in ATTN_POINTS] + [f"{base}.self_attn:out", f"{base}:out"]
    return taps + [f"{D}.pre_transformer.norm:out", f"{D}.pre_transformer.output_proj:out"]


def module_taps(st_cfg: dict) -> list[str]:
    """``:in`` and ``:out`` of every module an op/block row feeds (decoder blocks included)."""
    mods = [m for ms in OP_MODULES.values() for m in ms] + decoder_blocks(st_cfg)
    return [f"{D}.{m}:{p}" for m in mods for p in ("in", "out")]


@register_taps("codec_decoder")
def _codec_decoder_taps(cfg: dict, st_cfg: dict, settings: dict) -> list[str]:
    quant = [f"{D}.quantizer.rvq_first.output_proj:out", f"{D}.quantizer.rvq_rest.output_proj:out"]
    return quant + module_taps(st_cfg) + pre_transformer_taps(st_cfg) + [f"{D}:out"]


@register_taps("codec_chunked_decode")
def _codec_chunked_taps(cfg: dict, st_cfg: dict, settings: dict) -> list[str]:
    return ["speech_tokenizer:decode"]


def _codes(env: CaseEnv, salt: str, batch: int, frames: int) -> torch.Tensor:
    dc = env.st_config["decoder_config"]
    g = env.generator(salt)
    return torch.randint(0, dc["codebook_size"], (batch, dc["num_quantizers"], frames), generator=g)


def _inputs(env: CaseEnv) -> dict[str, torch.Tensor]:
    batch = 2 if env.config.get("tts_model_size") == "tiny" else 1
    return {"codes_bqf": _codes(env, "codec_decoder", batch, FRAMES)}


def _inputs_chunked(env: CaseEnv) -> dict[str, torch.Tensor]:
    rows = [_codes(env, f"codec_chunked_decode.{i}", 1, f)[0].T for i, f in enumerate(CHUNKED_FRAMES)]  # (F_i, Q)
    return {"audio_codes": torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=-1)}


def run_decoder(up, inputs: dict[str, torch.Tensor], rec) -> None:
    dec = up.speech_tokenizer.decoder
    dev = next(dec.parameters()).device
    with torch.no_grad():
        dec(inputs["codes_bqf"].to(dev))


def run_chunked(up, inputs: dict[str, torch.Tensor], rec) -> None:
    tok = up.speech_tokenizer
    dev = next(tok.parameters()).device
    with torch.no_grad():
        wavs = tok.decode(inputs["audio_codes"].to(dev), return_dict=True).audio_values
    for w in wavs:
        rec.add("speech_tokenizer:decode", w)


def _include(*globs: str) -> tuple[str, ...]:
    return tuple(f"{D}{g}" for g in globs)


register(Case(
    name="codec_decoder", component="codec_decoder", roots=("speech_tokenizer",), attn="eager",
    record_inputs=True,
    description=f"speech-tokenizer decoder one-shot on random codes, {FRAMES} frames (> 72-frame window), eager",
    make_inputs=_inputs, run=run_decoder, settings={"frames": FRAMES},
    include=_include(":out", ".quantizer.rvq_*.output_proj:out", ".pre_transformer.*",
                     *(f".{m}:*" for ms in OP_MODULES.values() for m in ms), ".decoder.?:*"),
))
register(Case(
    name="codec_chunked_decode", component="codec_chunked_decode", roots=("speech_tokenizer",),
    description=f"upstream decode() (chunked 300/25) on a -1-padded batch of {CHUNKED_FRAMES} frames",
    make_inputs=_inputs_chunked, run=run_chunked, settings={"frames": list(CHUNKED_FRAMES)},
    include=("speech_tokenizer:decode",),
))
