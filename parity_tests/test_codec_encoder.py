"""Speech-tokenizer encoder (``impl/codec/encoder.py``) against upstream's Mimi encoder, plus its laws.

Rows (reference cases ``codec_encoder`` (sdpa) and ``codec_encoder_eager``, 2 x 12.05 s, the second right-padded):

- "Mimi SEANet": every SEANet layer fed upstream's recorded input (``op`` for a conv or an ELU, ``block`` for a
  residual block), and the whole conv stack from the audio (``stack``);
- "Mimi transformer": every transformer layer fed upstream's recorded input (``block``: layer norm, RoPE'd q/k,
  attention, layer scale, MLP, output), and the whole stack from the audio (``stack``). 302 frames at 25 Hz, past
  the 250-frame window that upstream ignores under eager and sdpa: our "full" window mode is checked against it.
  A flash-attention row (window applied) needs CUDA and flash-attn; it skips with the reason otherwise;
- "Mimi codes": the 16 code levels, equality, first differing (batch, codebook, frame), and the per-item trimmed
  codes (frame, codebook); the quantizer inputs (downsampled latents, both ``input_proj`` outputs) at ``stack``.

Property tests on ``impl`` alone: causality (appending audio never changes earlier codes or latents) and the
length laws (frames = ceil(samples / 1920), per item from the padding mask).
"""

from __future__ import annotations

import copy
import importlib.util
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reports.compare import compare

from .helpers import compare_calls
from .helpers_codec import (
    ENC,
    ENCODER_CASE,
    build_encoder,
    codes_results,
    run_end_to_end,
    seanet_results,
    transformer_results,
)
from .rows import assert_row

CASE = ENCODER_CASE
ATTNS = [pytest.param("sdpa", id="sdpa"), pytest.param("eager", id="eager")]

@pytest.fixture(scope="module")
def runs(checkpoint_dir, reference, device):
    cache: dict = {}

    def get(attn: str, case: str | None = None, preset: str | None = None):
        key = (attn, case, preset)
        if key not in cache:
            ref = reference(case or CASE[attn], "base", preset)
            enc = build_encoder(checkpoint_dir("base", preset), device, attn=attn)
            cache[key] = (enc, ref, *run_end_to_end(enc, ref, attn))
        return cache[key]

    return get


# ------------------------------------------------------------------------------------------ parity rows


def test_seanet(runs, record):
    enc, ref, got, _ = runs("sdpa")
    results = seanet_results(enc, ref, got)
    for r in results:
        record(r, row="Mimi SEANet", component="Codec encoder", variant="base")
    assert_row("Mimi SEANet", results)


@pytest.mark.parametrize("attn", ATTNS)
def test_transformer(attn, runs, record):
    enc, ref, got, _ = runs(attn)
    T25 = ref.tap(f"{ENC}.encoder:out").shape[-1]
    window = enc.cfg.sliding_window
    assert T25 > window, f"reference has {T25} frames at 25 Hz; the row must cross the {window}-frame window"
    results = transformer_results(enc, ref, got, attn)
    for r in results:
        record(r, row="Mimi transformer", component="Codec encoder", variant="base",
               notes=f"{attn}: upstream full causal over {T25} frames (window {window} ignored by transformers 4.57.3)")
    assert_row("Mimi transformer", results)


@pytest.mark.parametrize("attn", ATTNS)
def test_codes(attn, runs, record):
    enc, ref, got, items = runs(attn)
    results = codes_results(ref, got, items)
    for r in results:
        record(r, row="Mimi codes", component="Codec encoder", variant="base", notes=attn)
    assert_row("Mimi codes", results)


@pytest.mark.cuda
def test_transformer_flash_window(runs, checkpoint_dir, record):
    """Upstream under flash_attention_2 applies the 250-frame window; our "sliding" mode must model it better
    than "full" does. Needs CUDA and flash-attn (bf16 kernels; upstream casts fp32 activations for them)."""
    if not torch.cuda.is_available():
        pytest.skip("flash-attention row: CUDA is not available on this machine")
    if importlib.util.find_spec("flash_attn") is None:
        pytest.skip("flash-attention row: the flash_attn package is not installed")
    from reference_export.upstream import load_upstream

    enc, ref, _, _ = runs("sdpa")
    up = load_upstream(checkpoint_dir("base"), device="cuda", attn="flash_attention_2", codec_dtype=torch.bfloat16)
    x = ref.tap(f"{ENC}.encoder:out").transpose(1, 2)
    with torch.no_grad():
        y_up = up.speech_tokenizer.encoder.encoder_transformer(x.cuda().bfloat16(), return_dict=True)[0].float().cpu()
        mine = copy.deepcopy(enc).to("cuda")
        ys = {m: mine.encoder_transformer(x.cuda(), m).cpu() for m in ("sliding", "full")}  # sdpa, as built
    r_slide = compare("encoder_transformer (sliding vs upstream flash bf16)", ys["sliding"], y_up, "stack")
    r_full = compare("encoder_transformer (full vs upstream flash bf16)", ys["full"], y_up, "stack")
    record(r_slide, row="Mimi transformer (flash_attention_2)", component="Codec encoder", variant="base",
           notes=f"window applied; full-causal error for contrast {r_full.max_abs:.3g}")
    assert r_slide.cosine > 0.999 and r_slide.max_abs < r_full.max_abs / 10, r_slide.message


@pytest.mark.slow
@pytest.mark.parametrize("row", ["Mimi transformer", "Mimi codes"])
def test_released_dims(row, runs, record):
    """Released Mimi dimensions (0.6b preset; the codec is the same in every release), random weights, sdpa;
    case ``codec_encoder_lite`` (no per-layer SEANet taps, which would be ~1.5 GB)."""
    enc, ref, got, items = runs("sdpa", "codec_encoder_lite", "0.6b")
    if row == "Mimi transformer":
        results = transformer_results(enc, ref, got, "sdpa")
        name = f"{ENC}.encoder:out"
        results += compare_calls(name, got, ref, "stack", label=name + " (SEANet stack, from audio)")
    else:
        results = codes_results(ref, got, items)
    for r in results:
        record(r, row=row, component="Codec encoder (0.6b dims)", variant="base", preset_override="0.6b")
    assert_row(row, results)


# ------------------------------------------------------------------------------------------ properties


@pytest.fixture(scope="module")
def encoder(checkpoint_dir, device):
    return build_encoder(checkpoint_dir("base"), device)


def _noise(n: int, seed: int) -> torch.Tensor:
    return torch.randn(1, n, generator=torch.Generator().manual_seed(seed)) * 0.3


@settings(max_examples=12, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(frames=st.integers(1, 24), partial=st.integers(0, 1919), extra=st.integers(1, 6000))
def test_causality(encoder, frames, partial, extra):
    """Appending audio never changes earlier codes or latents: frame i depends only on samples < (i+1)*1920."""
    n = frames * 1920 + partial
    dev = next(encoder.parameters()).device
    x = _noise(n + extra, frames * 7919 + partial).to(dev)
    with torch.no_grad():
        short, long = encoder(x[:, :n]), encoder(x)
    full = n // 1920  # frames whose receptive field ends inside the short clip
    assert torch.equal(short.codes[..., :full], long.codes[..., :full])
    torch.testing.assert_close(short.latents[..., :full], long.latents[..., :full], rtol=1e-5, atol=1e-5)


@settings(max_examples=12, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.one_of(st.integers(1, 40000), st.sampled_from([1919, 1920, 1921, 3839, 3840, 3841])),
       valid=st.floats(0.0, 1.0))
def test_length_laws(encoder, n, valid):
    """frames = ceil(samples / 1920); with a padding mask, item lengths = ceil(valid samples / 1920)."""
    dev = next(encoder.parameters()).device
    x = _noise(n, n).to(dev).expand(2, n).contiguous()
    mask = torch.ones(2, n, dtype=torch.long, device=dev)
    nv = int(valid * n)
    mask[1, nv:] = 0
    items = encoder.encode(x, mask)
    assert items[0].shape == (math.ceil(n / 1920), encoder.valid_quantizers)
    assert items[1].shape == (math.ceil(nv / 1920), encoder.valid_quantizers)


def test_encode_api(encoder):
    """The contract impl.codec's SpeechTokenizer relies on: encode((B, T), (B, T)) -> list of (F_i, 16) int64."""
    x = _noise(5000, 1).expand(2, 5000).contiguous()
    mask = torch.ones(2, 5000, dtype=torch.long)
    mask[1, 3000:] = 0
    out = encoder.encode(x, mask)
    assert [tuple(c.shape) for c in out] == [(3, 16), (2, 16)] and out[0].dtype == torch.int64
