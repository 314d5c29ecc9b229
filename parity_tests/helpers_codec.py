"""Codec helpers the parity test files share: loading our codec decoder / encoder and upstream's codec from a
checkpoint folder, the decoder's row table and ``row_results`` (a row recomputed from scratch, so the mutation
tests can re-run it on a patched ``impl``), and the encoder's row checks. Test files import from here, never
from each other.
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path

import torch

from impl.codec import SpeechTokenizer
from impl.codec.encoder import CodecEncoder
from impl.config import SpeechTokenizerConfig
from impl.layers import attention, set_attention
from impl.loading import load_into, read_state_dict
from impl.taps import recording, set_tap_paths
from reference_export.cases.codec_decoder import OP_MODULES, D, decoder_blocks, pre_transformer_taps
from reports.compare import CompareResult, compare, compare_exact

from . import helpers
from .helpers import Calls, compare_calls, compare_tap
from .rows import Row, missing

# ------------------------------------------------------------------------------------------ decoder

VARIANT = "base"
COMPONENT = "Codec decoder"
BF16_CONV_SLOWDOWN_LIMIT = 10.0  # bf16 / fp32 Conv1d time above which a released-size bf16 decode is unaffordable
# (native bf16 convolutions run about as fast as fp32 or faster; the fallback measured 20-280x here, busy or quiet)


@functools.cache
def bf16_conv_slowdown() -> float:
    """How many times slower a bf16 Conv1d runs than the same fp32 one on this CPU (192 channels, 4000 samples,
    kernel 7, dilation 3: the decoder's residual units' shape), measured once per process. Without native bf16
    (avx512_bf16 / AMX) PyTorch's CPU convolution falls back to a slow path: on the 2-core EPYC this project is
    developed on, 60-280x (a busy machine reads lower)."""
    conv = torch.nn.Conv1d(192, 192, 7, dilation=3)
    x = torch.randn(1, 192, 4000)
    took = {}
    with torch.no_grad():
        for dt in (torch.float32, torch.bfloat16):
            c, xi = conv.to(dt), x.to(dt)
            c(xi)  # warm-up
            runs = []
            for _ in range(3 if dt == torch.float32 else 1):  # bf16 takes ~1 s without native support
                t0 = time.perf_counter()
                c(xi)
                runs.append(time.perf_counter() - t0)
            took[dt] = min(runs)
    return took[torch.bfloat16] / max(took[torch.float32], 1e-9)


def bf16_decode_skip_reason(device: str) -> str | None:
    """Why a released-size bf16 codec decode is not run here, or None to run it. It is skipped only on released
    dimensions or a user's checkpoint (``helpers.ONE_MODEL``, set for ``--preset 0.6b|1.7b`` and ``--checkpoint``),
    on a CPU whose bf16 convolution is more than ``BF16_CONV_SLOWDOWN_LIMIT`` times slower than fp32: there one
    90-frame decode (upstream's capture, then ours) runs for hours. The tiny preset runs these rows on every CPU,
    and a GPU or a CPU with bf16 convolutions runs them at every size."""
    if device != "cpu" or not helpers.ONE_MODEL[0]:
        return None
    ratio = bf16_conv_slowdown()
    if ratio <= BF16_CONV_SLOWDOWN_LIMIT:
        return None
    return (f"bf16 Conv1d on this CPU runs {ratio:.0f}x slower than fp32 (measured here; no native bf16): a "
            f"released-size bf16 decode of the case's 90 frames would take hours. Run these rows on a GPU or a CPU "
            f"with bf16 convolutions; the tiny preset runs them here")


def rows(st_cfg: dict) -> list[Row]:
    """The decoder rows; ``driver`` says how each is computed (see ``row_results``)."""
    return [
        Row("Quantizer decode", (), "op", driver="quantizer"),
        Row("Causal Conv1d", (), "op", driver="fed", modules=tuple(OP_MODULES["conv"])),
        Row("SnakeBeta", (), "op", driver="fed", modules=tuple(OP_MODULES["snake"])),
        Row("CausalTransConv1d", (), "op", driver="fed", modules=tuple(OP_MODULES["transconv"])),
        Row("ConvNeXtBlock", (), "block", driver="fed", modules=tuple(OP_MODULES["convnext"])),
        Row("ResidualUnit", (), "block", driver="fed", modules=tuple(OP_MODULES["resunit"])),
        Row("DecoderBlock", (), "block", driver="fed", modules=tuple(decoder_blocks(st_cfg))),
        Row("Pre-transformer", (), "block", driver="pre_transformer"),
        Row("Full decoder", (), "stack", driver="full"),
        Row("Chunked decode", (), "stack", driver="chunked"),
    ]


ROW_NAMES = [r.name for r in rows({"decoder_config": {"upsample_rates": [8, 5, 4, 3]}})]
# Stage boundaries judged at the stack tier. Not the audio-rate block outputs: on the synthetic checkpoint they
# reach ~500, where fp32 rounding alone (sdpa vs eager: 0.047 at decoder.4) exceeds an elementwise atol of 1e-4;
# the DecoderBlock row judges those blocks on upstream's own inputs instead.
FULL_TAPS = (f"{D}.pre_transformer.output_proj:out", f"{D}.upsample.1.1:out", f"{D}:out")


def load_codec(ckpt, device: str = "cpu", attn: str = "eager", dtype: torch.dtype = torch.float32) -> SpeechTokenizer:
    """Our decoder from the checkpoint folder (decoder only: these tests do not depend on the encoder)."""
    return SpeechTokenizer.from_dir(ckpt, device=device, dtype=dtype, attn=attn, encoder=False)


def _y(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out  # Streamed(y, state) or a plain tensor (SnakeBeta)


def _cmp(name: str, got: torch.Tensor | None, ref, row: Row) -> CompareResult:
    """Tap ``name`` of ours (a value this driver computed directly; None: impl did not produce it) vs the
    reference, at the row's tier for that tap."""
    tier = row.tier_of(name)
    if got is None:
        return missing(name, "impl", tier)
    if not ref.has(name):
        return missing(name, f"the reference {ref.path.name}", tier)
    # No cast to fp32 here: ``compare`` measures in float64 itself, and the fp64 rows (test_fp64.py) must not be
    # rounded to fp32 before they are judged (``compare_tap`` asserts float64 on both sides at that tier).
    return compare_tap(name, got.cpu(), ref.tap(name), tier)


def _cmp_calls(name: str, records: dict, ref, row: Row) -> list[CompareResult]:
    """Every call ``impl`` recorded of tap ``name`` vs every call in the reference, paired by index."""
    return compare_calls(name, records, ref, row.tier_of(name))


@torch.no_grad()
def row_results(row: Row, codec: SpeechTokenizer, ref, attn: str, chunked_ref=None) -> list[CompareResult]:
    """Compute row ``row`` afresh with ``codec`` against the reference file(s)."""
    dec = codec.decoder
    dev = codec.device
    out: list[CompareResult] = []
    if row.driver == "fed":
        for path in row.modules:
            name_in, name_out = f"{D}.{path}:in", f"{D}.{path}:out"
            if not ref.has(name_in):
                out.append(missing(name_in, f"the reference {ref.path.name}", row.tier_of(name_in)))
                continue
            # Fed every call upstream recorded (one on today's cases), each output paired with upstream's output of
            # the same call; a reference whose :in and :out hold different numbers of calls fails on the count.
            mod = dec.get_submodule(path)
            ours = [_y(mod(x.to(dev))).cpu() for x in ref.tap_steps(name_in)]
            out.extend(_cmp_calls(name_out, {name_out: ours}, ref, row))
    elif row.driver == "quantizer":
        codes = ref.input("codes_bqf").to(dev)
        with recording(dec.quantizer, prefix=f"{D}.quantizer") as rec:
            latent = dec.quantizer(codes)
        for half in ("rvq_first", "rvq_rest"):
            name = f"{D}.quantizer.{half}.output_proj:out"
            out.extend(_cmp_calls(name, rec.records, ref, row))
        out.append(_cmp(f"{D}.pre_conv:in", latent, ref, row))  # upstream's dequantised latent
    elif row.driver == "pre_transformer":
        pt = dec.pre_transformer
        with recording(pt, prefix=f"{D}.pre_transformer") as rec:
            pt(ref.tap(f"{D}.pre_transformer.input_proj:in").to(dev))
        n_layers = codec.cfg.decoder_config.num_hidden_layers
        for name in pre_transformer_taps({"decoder_config": {"num_hidden_layers": n_layers}})[1:]:
            if name.endswith(":attn_probs") and attn != "eager":
                continue  # probabilities exist only on the eager path
            out.extend(_cmp_calls(name, rec.records, ref, row))
    elif row.driver == "full":
        with recording(dec, prefix=D, include=FULL_TAPS) as rec:
            wav = dec(ref.input("codes_bqf").to(dev))
        for name in FULL_TAPS[:-1]:
            out.extend(_cmp_calls(name, rec.records, ref, row))
        out.append(_cmp(f"{D}:out", wav, ref, row))
    elif row.driver == "chunked":
        if chunked_ref is None:
            raise ValueError("the Chunked decode row needs the codec_chunked_decode reference")
        codes = chunked_ref.input("audio_codes")  # (B, F, Q), -1 padded
        ours = codec.decode(codes)
        theirs = chunked_ref.tap_steps("speech_tokenizer:decode")
        out.append(compare_exact("speech_tokenizer:decode (lengths)", torch.tensor([len(w) for w in ours]),
                                 torch.tensor([len(w) for w in theirs])))
        for i, (a, b) in enumerate(zip(ours, theirs)):
            name = f"speech_tokenizer:decode[{i}]"
            out.append(compare(name, torch.from_numpy(a), b.float(), row.tier_of(name)))
    else:
        raise ValueError(f"unknown driver {row.driver!r}")
    if not out:
        raise AssertionError(f"row {row.name!r} compares nothing")
    return out


def upstream_codec(ckpt, dtype: torch.dtype, attn: str = "eager"):
    """Upstream's ``Qwen3TTSTokenizerV2Model`` alone (no TTS model), weights loaded strictly, in ``dtype``."""
    from safetensors.torch import load_file
    from transformers.modeling_utils import no_init_weights

    from reference_export.upstream import import_upstream, upstream_config_dict

    up = import_upstream()
    st_cfg = json.loads((ckpt / "speech_tokenizer" / "config.json").read_text())
    with no_init_weights():
        tok = up.T.Qwen3TTSTokenizerV2Model(up.Qwen3TTSTokenizerV2Config(**upstream_config_dict(st_cfg)))
    tok.load_state_dict(load_file(str(ckpt / "speech_tokenizer" / "model.safetensors")), strict=True)
    tok.set_attn_implementation(attn)
    return tok.to(dtype).eval()


# ------------------------------------------------------------------------------------------ encoder

ENC = "speech_tokenizer.encoder"
ENCODER_CASE = {"sdpa": "codec_encoder", "eager": "codec_encoder_eager"}


def build_encoder(ckpt: Path, device: str = "cpu", dtype: torch.dtype = torch.float32,
                  attn: str = "sdpa") -> CodecEncoder:
    """impl's codec encoder from a checkpoint folder (keys ``encoder.*`` of speech_tokenizer/model.safetensors)."""
    folder = ckpt / "speech_tokenizer"
    cfg = SpeechTokenizerConfig.from_file(folder / "config.json")
    enc = set_attention(CodecEncoder(cfg.encoder_config, cfg.encoder_valid_num_quantizers), attn)
    load_into(enc, read_state_dict(folder, "encoder."), str(folder / "model.safetensors"), "encoder.")
    set_tap_paths(enc, ENC)
    return enc.to(device=device, dtype=dtype).eval()


QUANTIZER_IN_TAPS = (f"{ENC}.downsample:out", f"{ENC}.quantizer.semantic_residual_vector_quantizer.input_proj:out",
                     f"{ENC}.quantizer.acoustic_residual_vector_quantizer.input_proj:out")


def end_to_end_taps(enc: CodecEncoder) -> tuple[str, ...]:
    """The taps the encoder rows read from the end-to-end run (:func:`seanet_results`, :func:`transformer_results`,
    :func:`codes_results`): recording only these, not a copy of every SEANet activation, keeps a released-size run
    small (the fp64 tier's end-to-end recording alone took 11.3 GB RSS at 0.6B dimensions). A tap left out here is
    a missing tap, which fails its row."""
    last = len(enc.encoder_transformer.layers) - 1
    return (f"{ENC}.encoder:out", f"{ENC}.encoder_transformer.layers.{last}:out", *QUANTIZER_IN_TAPS,
            f"{ENC}.quantizer:codes")


def run_end_to_end(enc: CodecEncoder, ref, attn: str) -> tuple[Calls, list[torch.Tensor]]:
    """impl on the reference's audio under attention ``attn``: (every call of the taps the rows read, per-item
    trimmed codes)."""
    dev = next(enc.parameters()).device
    audio, mask = ref.input("audio").to(dev), ref.input("padding_mask").to(dev)
    with attention(enc, attn), recording(enc, ENC, include=end_to_end_taps(enc)) as rec, torch.no_grad():
        out = enc(audio, mask)
    items = [c[:, :n].transpose(0, 1) for c, n in zip(out.codes, out.lengths.tolist())]
    return Calls(rec.records), items


def seanet_results(enc: CodecEncoder, ref, got: Calls) -> list[CompareResult]:
    """Each SEANet layer on upstream's recorded input, then the whole stack end to end."""
    dev = next(enc.parameters()).device
    out = []
    x = ref.input("audio")[:, None]  # (B, 1, T): the first layer's input
    with torch.no_grad():
        for i, layer in enumerate(enc.encoder.layers):
            name = f"{ENC}.encoder.layers.{i}:out"
            y = layer(x.to(dev))
            tier = "block" if type(layer).__name__ == "ResnetBlock" else "op"
            r = ref.tap(name)
            out.append(compare(name, y, r, tier))
            x = r  # next layer starts from upstream's output, not ours
    name = f"{ENC}.encoder:out"
    out.extend(compare_calls(name, got, ref, "stack", label=name + " (stack, from audio)"))
    return out


LAYER_POINTS = ("input_layernorm:out", "self_attn:q_rope", "self_attn:k_rope", "self_attn:out",
                "self_attn_layer_scale:out", "post_attention_layernorm:out", "mlp:out", ":out")


def transformer_results(enc: CodecEncoder, ref, got: Calls, attn: str) -> list[CompareResult]:
    """Each transformer layer on upstream's recorded input (all its internal taps), then the stack end to end."""
    dev = next(enc.parameters()).device
    tr = enc.encoder_transformer
    x = ref.tap(f"{ENC}.encoder:out").transpose(1, 2).to(dev)  # (B, T25, C): layer 0's input
    B, T, _ = x.shape
    out = []
    cos, sin = tr.rotary_emb(x, torch.arange(T, device=dev)[None])
    with attention(enc, attn):
        mask = tr.attention_mask(T, x.dtype, x.device, enc.resolved_window_mode())
    for i, layer in enumerate(tr.layers):
        base = f"{ENC}.encoder_transformer.layers.{i}"
        with attention(enc, attn), recording(enc, ENC) as rec, torch.no_grad():
            layer(x, cos, sin, mask)
        for p in LAYER_POINTS:
            name = f"{base}{p}" if p.startswith(":") else f"{base}.{p}"
            out.extend(compare_calls(name, rec.records, ref, "block"))
        x = ref.tap(f"{base}:out").to(dev)
    last = f"{ENC}.encoder_transformer.layers.{len(tr.layers) - 1}:out"
    out.extend(compare_calls(last, got, ref, "stack", label=last + " (stack, from audio)"))
    return out


def codes_results(ref, got: Calls, items: list[torch.Tensor], tier: str = "stack") -> list[CompareResult]:
    """The quantizer inputs at ``tier`` (stack in fp32; the fp64 tier for float64 runs), then the codes exactly;
    every recorded call of each."""
    out = [r for n in QUANTIZER_IN_TAPS for r in compare_calls(n, got, ref, tier)]
    name = f"{ENC}.quantizer:codes"
    out.extend(compare_calls(name, got, ref, "exact",
                             judge=lambda n, a, b: compare_exact(n, a, b, axes=("batch", "codebook", "frame"))))
    for i, c in enumerate(items):
        name = f"speech_tokenizer:codes_{i}"
        out.append(compare_exact(name, c, ref.tap(name), axes=("frame", "codebook")))
    return out
