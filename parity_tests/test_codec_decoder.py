"""Speech-tokenizer decoder against upstream, layer by layer (tests ``impl/codec/{conv,quantizer,decoder}.py``).

References: the ``codec_decoder`` case (one-shot ``decoder(codes)``, 90 frames > the 72-frame window, eager) and
``codec_chunked_decode`` (upstream ``decode()`` on a -1-padded batch of 310 and 40 frames).

How each row is driven (``DRIVERS``):

- ``fed``: our module gets upstream's own recorded input (``<path>:in``) and its output is compared with
  upstream's ``<path>:out`` -- isolates one op/block from drift upstream of it (op and block tiers);
- ``quantizer``: our split RVQ on the stored codes; each half's projection and their sum (= ``pre_conv:in``);
- ``pre_transformer``: our pre-transformer on upstream's ``input_proj:in``; every layer, q/k after RoPE,
  attention probabilities (eager), the output projection;
- ``full``: our whole decoder from the codes, compared at the stage boundaries and the waveform (stack tier);
- ``chunked``: our ``SpeechTokenizer.decode`` (upstream's user-facing path: 300-frame chunks, 25 frames of
  recomputed context, -1 padding cut) against upstream ``decode()``, with exact lengths.

The codec is the same in every variant's folder (weights are drawn per key from the seed), so one variant runs.
``row_results`` recomputes a row from scratch: the mutation tests re-run it on a patched ``impl``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch

from impl.codec import SpeechTokenizer
from impl.taps import recording
from reference_export.cases.codec_decoder import OP_MODULES, D, decoder_blocks, pre_transformer_taps
from reports.compare import CompareResult, compare, compare_exact

from .rows import assert_row, missing

VARIANT = "base"
COMPONENT = "Codec decoder"


@dataclass(frozen=True)
class CodecRow:
    name: str
    driver: str  # fed | quantizer | pre_transformer | full | chunked
    tier: str
    modules: tuple[str, ...] = ()  # fed rows: decoder-relative module paths


def rows(st_cfg: dict) -> list[CodecRow]:
    return [
        CodecRow("Quantizer decode", "quantizer", "op"),
        CodecRow("Causal Conv1d", "fed", "op", tuple(OP_MODULES["conv"])),
        CodecRow("SnakeBeta", "fed", "op", tuple(OP_MODULES["snake"])),
        CodecRow("CausalTransConv1d", "fed", "op", tuple(OP_MODULES["transconv"])),
        CodecRow("ConvNeXtBlock", "fed", "block", tuple(OP_MODULES["convnext"])),
        CodecRow("ResidualUnit", "fed", "block", tuple(OP_MODULES["resunit"])),
        CodecRow("DecoderBlock", "fed", "block", tuple(decoder_blocks(st_cfg))),
        CodecRow("Pre-transformer", "pre_transformer", "block"),
        CodecRow("Full decoder", "full", "stack"),
        CodecRow("Chunked decode", "chunked", "stack"),
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


def _cmp(name: str, got: torch.Tensor, ref, tier: str) -> CompareResult:
    if not ref.has(name):
        return missing(name, f"the reference {ref.path.name}", tier)
    return compare(name, got.float().cpu(), ref.tap(name).float(), tier)


@torch.no_grad()
def row_results(row: CodecRow, codec: SpeechTokenizer, ref, attn: str, chunked_ref=None) -> list[CompareResult]:
    """Compute row ``row`` afresh with ``codec`` against the reference file(s)."""
    dec = codec.decoder
    dev = codec.device
    out: list[CompareResult] = []
    if row.driver == "fed":
        for path in row.modules:
            name_in, name_out = f"{D}.{path}:in", f"{D}.{path}:out"
            if not ref.has(name_in):
                out.append(missing(name_in, f"the reference {ref.path.name}", row.tier))
                continue
            got = _y(dec.get_submodule(path)(ref.tap(name_in).to(dev)))
            out.append(_cmp(name_out, got, ref, row.tier))
    elif row.driver == "quantizer":
        codes = ref.input("codes_bqf").to(dev)
        with recording(dec.quantizer, prefix=f"{D}.quantizer") as rec:
            latent = dec.quantizer(codes)
        for half in ("rvq_first", "rvq_rest"):
            name = f"{D}.quantizer.{half}.output_proj:out"
            got = rec.records.get(name)
            out.append(missing(name, "impl", row.tier) if got is None else _cmp(name, got[0], ref, row.tier))
        out.append(_cmp(f"{D}.pre_conv:in", latent, ref, row.tier))  # upstream's dequantised latent
    elif row.driver == "pre_transformer":
        pt = dec.pre_transformer
        with recording(pt, prefix=f"{D}.pre_transformer") as rec:
            pt(ref.tap(f"{D}.pre_transformer.input_proj:in").to(dev))
        n_layers = codec.cfg.decoder_config.num_hidden_layers
        for name in pre_transformer_taps({"decoder_config": {"num_hidden_layers": n_layers}})[1:]:
            if name.endswith(":attn_probs") and attn != "eager":
                continue  # probabilities exist only on the eager path
            got = rec.records.get(name)
            out.append(missing(name, "impl", row.tier) if got is None else _cmp(name, got[0], ref, row.tier))
    elif row.driver == "full":
        with recording(dec, prefix=D, include=FULL_TAPS) as rec:
            wav = dec(ref.input("codes_bqf").to(dev))
        for name in FULL_TAPS[:-1]:
            got = rec.records.get(name)
            out.append(missing(name, "impl", row.tier) if got is None else _cmp(name, got[0], ref, row.tier))
        out.append(_cmp(f"{D}:out", wav, ref, row.tier))
    elif row.driver == "chunked":
        if chunked_ref is None:
            raise ValueError("the Chunked decode row needs the codec_chunked_decode reference")
        codes = chunked_ref.input("audio_codes")  # (B, F, Q), -1 padded
        ours = codec.decode(codes)
        theirs = chunked_ref.tap_steps("speech_tokenizer:decode")
        out.append(compare_exact("speech_tokenizer:decode (lengths)", torch.tensor([len(w) for w in ours]),
                                 torch.tensor([len(w) for w in theirs])))
        for i, (a, b) in enumerate(zip(ours, theirs)):
            out.append(compare(f"speech_tokenizer:decode[{i}]", torch.from_numpy(a), b.float(), row.tier))
    else:
        raise ValueError(f"unknown driver {row.driver!r}")
    if not out:
        raise AssertionError(f"row {row.name!r} compares nothing")
    return out


@pytest.fixture(scope="module")
def codec_env(checkpoint_dir, reference, device, attn):
    ckpt = checkpoint_dir(VARIANT)
    codec = load_codec(ckpt, device, attn)
    ref = reference("codec_decoder", VARIANT)
    st_cfg = json.loads((ckpt / "speech_tokenizer" / "config.json").read_text())
    return codec, ref, {r.name: r for r in rows(st_cfg)}


@pytest.mark.parametrize("row_name", ROW_NAMES)
def test_codec_decoder_row(row_name: str, codec_env, reference, record, attn):
    codec, ref, by_name = codec_env
    row = by_name[row_name]
    chunked = reference("codec_chunked_decode", VARIANT) if row.driver == "chunked" else None
    results = row_results(row, codec, ref, attn, chunked)
    for r in results:
        record(r, row=row.name, component=COMPONENT, variant=VARIANT)
    assert_row(row.name, results)


@pytest.mark.slow
@pytest.mark.parametrize("row_name", ROW_NAMES)
def test_codec_decoder_row_released_dims(row_name: str, checkpoint_dir, reference, device, attn, record):
    """The released codec dimensions (0.6b and 1.7b share one speech tokenizer): 1024 latent, 1536 decoder
    channels, 8 pre-transformer layers of 16 heads × 64 (random weights)."""
    ckpt = checkpoint_dir(VARIANT, "0.6b")
    st_cfg = json.loads((ckpt / "speech_tokenizer" / "config.json").read_text())
    row = {r.name: r for r in rows(st_cfg)}[row_name]
    codec = load_codec(ckpt, device, attn)
    ref = reference("codec_decoder", VARIANT, "0.6b")
    chunked = reference("codec_chunked_decode", VARIANT, "0.6b") if row.driver == "chunked" else None
    results = row_results(row, codec, ref, attn, chunked)
    for r in results:
        record(r, row=row.name, component=f"{COMPONENT} (released dims)", variant=VARIANT, preset_override="0.6b")
    assert_row(row.name, results)


def test_samples_per_frame(codec_env):
    """Exactly 1920 samples per frame, at every stage boundary (the trim bug class: 143445 instead of 144000)."""
    codec, ref, _ = codec_env
    codes = ref.input("codes_bqf")
    B, _, F = codes.shape
    with torch.no_grad():
        wav = codec.decoder(codes.to(codec.device))
    assert codec.decoder.total_upsample == 1920
    assert tuple(wav.shape) == (B, 1, F * 1920)


def test_decode_accepts_upstream_input_forms(codec_env):
    """``decode`` takes a list of (F_i, Q), a -1-padded (B, F, Q) tensor or one (F, Q) tensor, like upstream's
    wrapper; padding frames are cut and never change the valid samples of a row."""
    codec, ref, _ = codec_env
    codes = ref.input("codes_bqf").transpose(1, 2)  # (B, F, Q)
    a, b = codes[0, :30], codes[1, :20]
    listed = codec.decode([a, b])
    padded = codec.decode(torch.nn.utils.rnn.pad_sequence([a, b], batch_first=True, padding_value=-1))
    single = codec.decode(b)
    assert [len(w) for w in listed] == [30 * 1920, 20 * 1920]
    for x, y in zip(listed, padded):
        assert (x == y).all()
    # Row b alone vs inside a batch padded with -1 (decoded as code 0 past its end, then cut): causal, so equal.
    torch.testing.assert_close(torch.from_numpy(single[0]), torch.from_numpy(listed[1]), rtol=1e-4, atol=1e-4)
    assert listed[0].dtype.name == "float32"
    # Under 300 frames the chunked decode is a single one-shot chunk: decode() == decode_oneshot() exactly.
    assert (codec.decode_oneshot(b) == single[0]).all()


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


def test_full_decoder_bf16_referee(checkpoint_dir, codec_env, device, attn, record):
    """bf16 is selectable: our bf16 decode may be no further from upstream fp32 than 3× upstream's own bf16
    decode is (referee tier; the codec runs fp32 by default, as upstream's config says)."""
    _, ref, _ = codec_env
    ckpt = checkpoint_dir(VARIANT)
    codes = ref.input("codes_bqf")[:1]
    ref32 = ref.tap(f"{D}:out")[:1].double()
    with torch.no_grad():
        up16 = upstream_codec(ckpt, torch.bfloat16, ref.meta["attn"]).decoder(codes).double()
        ours16 = load_codec(ckpt, device, attn, torch.bfloat16).decoder(codes.to(device)).double().cpu()
    up_err = float((up16 - ref32).pow(2).mean().sqrt())
    r = compare(f"{D}:out (bf16)", ours16, ref32, "referee", referee_ref_err=up_err)
    record(r, row="Full decoder (bf16)", component=COMPONENT, variant=VARIANT,
           notes="ours bf16 vs upstream fp32, judged against upstream bf16 vs upstream fp32")
    assert r, r.message
