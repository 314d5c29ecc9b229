"""Speech-tokenizer encoder (Mimi) cases: 24 kHz audio -> SEANet -> transformer -> downsample -> split RVQ -> codes.

``codec_encoder`` / ``codec_encoder_eager``: a batch of two deterministic speech-like clips of 12.05 s, the second
right-padded with 1.25 s of zeros (padding mask 0 there), through upstream's ``Qwen3TTSTokenizerV2Model.encode``
(the call the voice-clone prompt makes). 12.05 s is 302 frames at 25 Hz, past Mimi's 250-frame
``sliding_window``, which upstream ignores under eager and sdpa (transformers 4.57.3): the references therefore
record full-causal attention. Captured under sdpa (upstream's default for the codec) and under eager.

Besides the module outputs the hooks record, ``run`` records:

- ``speech_tokenizer.encoder.quantizer:codes`` (B, 16, F) int64: ``MimiModel.encode(...).audio_codes[:, :16]``
  (before per-item trimming), taken by wrapping the encoder's ``encode`` for the duration of the call;
- ``speech_tokenizer:codes_<i>`` (F_i, 16) int64: the wrapper's per-item output (trimmed to ceil(valid/1920)).
"""

from __future__ import annotations

import math

import torch

from ..registry import register_taps
from . import Case, CaseEnv, register

SECONDS = 12.05
PAD_SAMPLES = 30000  # right padding of item 1
SR = 24000


def speechlike(n: int, g: torch.Generator) -> torch.Tensor:
    """A deterministic speech-like test signal (n,): a few gliding harmonics under a syllable-rate envelope,
    plus a little noise; peak about 0.6. Not speech, but broadband and non-stationary, so codes vary."""
    t = torch.arange(n, dtype=torch.float64) / SR
    f0 = 110 + 40 * torch.sin(2 * math.pi * 0.7 * t) + 20 * torch.rand(1, generator=g, dtype=torch.float64)
    phase = 2 * math.pi * torch.cumsum(f0, 0) / SR
    y = sum(torch.sin(k * phase) / k for k in range(1, 9))
    env = 0.5 * (1 + torch.sin(2 * math.pi * 4.0 * t + 6 * torch.rand(1, generator=g, dtype=torch.float64)))
    y = y * env * 0.25 + 0.02 * torch.randn(n, generator=g, dtype=torch.float64)
    return y.float()


def _inputs(env: CaseEnv) -> dict[str, torch.Tensor]:
    g = env.generator("codec_encoder")
    n = int(SECONDS * SR)
    audio = torch.stack([speechlike(n, g), speechlike(n, g)])  # (2, T)
    mask = torch.ones(2, n, dtype=torch.long)
    mask[1, n - PAD_SAMPLES:] = 0
    audio[1, n - PAD_SAMPLES:] = 0.0  # as the feature extractor pads
    return {"audio": audio, "padding_mask": mask}


def run_encode(up, inputs: dict[str, torch.Tensor], rec) -> None:
    """Upstream's ``Qwen3TTSTokenizerV2Model.encode`` on the stored batch (hooks record every module)."""
    tok = up.speech_tokenizer
    dev = next(tok.parameters()).device
    mimi = tok.encoder
    orig = mimi.encode

    def encode_and_record(*args, **kwargs):
        out = orig(*args, **kwargs)
        rec.add("speech_tokenizer.encoder.quantizer:codes", out.audio_codes[:, : tok.encoder_valid_num_quantizers])
        return out

    mimi.encode = encode_and_record  # instance attribute: shadows the method for this call only
    try:
        with torch.no_grad():
            # in the tokenizer's dtype (fp32 unless a bf16/fp64 capture asked otherwise), as upstream's wrapper feeds it
            audio = inputs["audio"].to(dev, next(tok.parameters()).dtype)
            out = tok.encode(audio, inputs["padding_mask"].to(dev), return_dict=True)
    finally:
        del mimi.encode
    for i, c in enumerate(out.audio_codes):
        rec.add(f"speech_tokenizer:codes_{i}", c)


ENC = "speech_tokenizer.encoder"
INCLUDE = (
    f"{ENC}.encoder.layers.[0-9]:out", f"{ENC}.encoder.layers.[0-9][0-9]:out", f"{ENC}.encoder:out",
    f"{ENC}.encoder_transformer.layers.*", f"{ENC}.downsample:out", f"{ENC}.quantizer*", "speech_tokenizer:codes_*",
)
SETTINGS = {"seconds": SECONDS, "batch": 2, "pad_samples": PAD_SAMPLES, "window_note":
            "transformers 4.57.3 Mimi ignores sliding_window=250 under eager/sdpa (full causal)"}

for _name, _attn in (("codec_encoder", "sdpa"), ("codec_encoder_eager", "eager")):
    register(Case(
        name=_name, component="codec_encoder", roots=("speech_tokenizer",), attn=_attn,
        description=f"Mimi encoder on 2 x {SECONDS} s (302 frames at 25 Hz > 250 window), {_attn} attention",
        make_inputs=_inputs, run=run_encode, settings=dict(SETTINGS, attn=_attn), include=INCLUDE,
    ))
# Released dimensions: the per-layer SEANet outputs would be ~1.5 GB at 12 s, so only the conv stack's output.
register(Case(
    name="codec_encoder_lite", component="codec_encoder_lite", roots=("speech_tokenizer",), attn="sdpa",
    description="as codec_encoder (sdpa) without per-layer SEANet taps, for released dimensions",
    make_inputs=_inputs, run=run_encode, settings=dict(SETTINGS, attn="sdpa"),
    include=tuple(g for g in INCLUDE if ".encoder.layers." not in g),
))


TRANSFORMER_LAYER_POINTS = ("input_layernorm:out", "self_attn:q_rope", "self_attn:k_rope", "self_attn:out",
                            "self_attn_layer_scale:out", "post_attention_layernorm:out", "mlp:out", ":out")


def seanet_layer_count(st_cfg: dict) -> int:
    e = st_cfg["encoder_config"]
    return 1 + len(e["upsampling_ratios"]) * (e.get("num_residual_layers", 1) + 2) + 2


@register_taps("codec_encoder")
def _codec_encoder_taps(cfg: dict, st_cfg: dict, settings: dict) -> list[str]:
    seanet = [f"{ENC}.encoder.layers.{i}:out" for i in range(seanet_layer_count(st_cfg))]
    return seanet + _codec_encoder_lite_taps(cfg, st_cfg, settings)


@register_taps("codec_encoder_lite")
def _codec_encoder_lite_taps(cfg: dict, st_cfg: dict, settings: dict) -> list[str]:
    e = st_cfg["encoder_config"]
    taps = [f"{ENC}.encoder:out"]
    for i in range(e["num_hidden_layers"]):
        base = f"{ENC}.encoder_transformer.layers.{i}"
        taps += [f"{base}{p}" if p.startswith(":") else f"{base}.{p}" for p in TRANSFORMER_LAYER_POINTS]
    taps += [f"{ENC}.downsample:out", f"{ENC}.quantizer.semantic_residual_vector_quantizer.input_proj:out",
             f"{ENC}.quantizer.acoustic_residual_vector_quantizer.input_proj:out", f"{ENC}.quantizer:codes"]
    return taps + [f"speech_tokenizer:codes_{i}" for i in range(settings.get("batch", 2))]
