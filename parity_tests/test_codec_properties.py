"""Properties of the codec decoder that need no upstream (tests ``impl/codec/conv.py``, ``decoder.py``).

- Streaming = one-shot for every layer, over a grid of kernel × dilation × stride × chunking × length
  (hypothesis), in fp64 with random weights: exact up to fp64 rounding (<= 1e-10), so a wrong history length,
  a lost overlap tail or a mis-offset KV cache cannot hide under fp32 noise.
- Causality: appending input never changes earlier output -- per layer (fp64, exact) and for the whole decoder
  on the synthetic checkpoint (appending codes never changes earlier samples; stack tier in fp32).
- Lengths: exactly ``frames × 1920`` samples, and every stage boundary at its own rate (the trim-bug class).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from impl.codec.conv import (
    CausalConv1d,
    CausalTransConv1d,
    ConvNeXtBlock,
    DecoderBlock,
    ResidualUnit,
    SnakeBeta,
)
from impl.codec.decoder import PreTransformer
from impl.config import SpeechTokenizerConfig, preset_config_dicts
from impl.layers import set_attention
from reports.compare import compare

from .helpers_codec import VARIANT, load_codec

EXACT64 = 1e-10  # fp64 streaming vs one-shot: only summation-order rounding remains
FAST = dict(deadline=None, derandomize=True, max_examples=25,
            suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _randomise(m: nn.Module, seed: int) -> nn.Module:
    """Every parameter drawn (SnakeBeta log-scales, gammas and layer scales included), fp64, eval."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith(("alpha", "beta")):
                p.copy_(torch.rand(p.shape, generator=g) - 0.5)
            elif name.endswith(("gamma", "scale")):
                p.copy_(torch.rand(p.shape, generator=g) * 0.1 + 0.05)
            else:
                fan = p.shape[1] * (p.shape[2] if p.ndim == 3 else 1) if p.ndim > 1 else 1
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) / fan**0.5)
    return m.double().eval()


def _stream(layer: nn.Module, x: torch.Tensor, schedule: list[int], time_dim: int = -1) -> torch.Tensor:
    """Feed x in chunks along ``time_dim`` carrying the state; concatenate the outputs."""
    outs, state, start, i = [], None, 0, 0
    T = x.shape[time_dim]
    while start < T:
        n = schedule[min(i, len(schedule) - 1)]
        y, state = layer(x.narrow(time_dim, start, min(n, T - start)), state)
        outs.append(y)
        start, i = start + n, i + 1
    return torch.cat(outs, dim=time_dim)


def _check_stream(layer: nn.Module, x: torch.Tensor, schedule: list[int], time_dim: int = -1) -> None:
    with torch.no_grad():
        full = layer(x)[0]
        got = _stream(layer, x, schedule, time_dim)
        assert got.shape == full.shape
        err = float((got - full).abs().max())
        assert err <= EXACT64, f"{type(layer).__name__} streamed {schedule}: max |diff| {err:.3g} > {EXACT64}"
        # Causality: a prefix of the input gives the same prefix of the output.
        cut = x.shape[time_dim] // 2 + 1
        pre = layer(x.narrow(time_dim, 0, cut))[0]
        err = float((pre - full.narrow(time_dim, 0, pre.shape[time_dim])).abs().max())
        assert err <= EXACT64, f"{type(layer).__name__}: output before frame {cut} changed when input was appended"


schedules = st.lists(st.integers(min_value=1, max_value=9), min_size=1, max_size=6)


@settings(**FAST)
@given(k=st.sampled_from([1, 2, 3, 7]), d=st.sampled_from([1, 3, 9]), grouped=st.booleans(),
       T=st.integers(1, 40), schedule=schedules)
def test_causal_conv_streams_exactly(k, d, grouped, T, schedule):
    conv = _randomise(CausalConv1d(4, 4, k, dilation=d, groups=4 if grouped else 1), k * 100 + d)
    _check_stream(conv, torch.randn(2, 4, T, dtype=torch.float64), schedule)


@settings(**FAST)
@given(ks=st.sampled_from([(2, 2), (4, 2), (6, 3), (8, 4), (10, 5), (16, 8), (3, 2), (5, 1)]),
       T=st.integers(1, 30), schedule=schedules)
def test_trans_conv_streams_exactly(ks, T, schedule):
    k, s = ks
    tc = _randomise(CausalTransConv1d(3, 5, k, s), k * 10 + s)
    x = torch.randn(2, 3, T, dtype=torch.float64)
    with torch.no_grad():
        assert tc(x).y.shape[-1] == T * s  # right-only trim of k - s: exactly T*s samples
    _check_stream(tc, x, schedule)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_trans_conv_one_shot_is_upstreams_fused_op(dtype):
    """Without a state the output is upstream's op bit for bit: ``nn.ConvTranspose1d`` with its bias fused, trimmed
    by ``k - s`` on the right. A bias added after the conv rounds twice, which in bf16 differs wherever the kernel
    accumulates in fp32 (CPUs with native bf16 convolutions, GPUs); on other CPUs both orders may agree."""
    tc = _randomise(CausalTransConv1d(16, 8, 10, 5), 7).to(dtype)
    x = torch.randn(2, 16, 12, generator=torch.Generator().manual_seed(3)).to(dtype)
    with torch.no_grad():
        got = tc(x).y
        want = tc.conv(x)[..., : 12 * 5]
    assert got.dtype == dtype and torch.equal(got, want), \
        f"{int((got != want).sum())} of {want.numel()} samples differ from the fused op"


@settings(**FAST)
@given(kind=st.sampled_from(["convnext", "resunit1", "resunit9", "block3", "block8"]),
       T=st.integers(1, 24), schedule=schedules)
def test_blocks_stream_exactly(kind, T, schedule):
    layer = {
        "convnext": lambda: ConvNeXtBlock(6),
        "resunit1": lambda: ResidualUnit(4, 1),
        "resunit9": lambda: ResidualUnit(4, 9),
        "block3": lambda: DecoderBlock(6, 3, 3),
        "block8": lambda: DecoderBlock(4, 2, 8),
    }[kind]()
    _check_stream(_randomise(layer, len(kind)), torch.randn(1, layer_in(layer), T, dtype=torch.float64), schedule)


def layer_in(layer: nn.Module) -> int:
    first = next(m for m in layer.modules() if isinstance(m, (nn.Conv1d, SnakeBeta)))
    return first.alpha.shape[0] if isinstance(first, SnakeBeta) else first.in_channels


@settings(**(FAST | {"max_examples": 10}))
@given(T=st.integers(1, 40), schedule=st.lists(st.integers(1, 12), min_size=1, max_size=6),
       window=st.sampled_from([1, 3, 8]))
def test_pre_transformer_streams(T, schedule, window):
    """Sliding-window KV cache: streaming equals the one-shot windowed attention, for windows shorter and longer
    than the chunks. (RMSNorm and RoPE run in fp32 even in an fp64 model, as upstream; hence 1e-6.)"""
    cfg = SpeechTokenizerConfig.from_dict(preset_config_dicts("tiny", "base")[1]).decoder_config
    cfg.sliding_window = window
    pt = _randomise(set_attention(PreTransformer(cfg), "eager"), 7)
    x = torch.randn(1, T, cfg.latent_dim, dtype=torch.float64)
    with torch.no_grad():
        full = pt(x).y
        got = _stream(pt, x, schedule, time_dim=1)
    r = compare("pre_transformer streamed", got, full, "block")
    assert r, r.message


# ---------------------------------------------------------------------------------- whole decoder


@pytest.fixture(scope="module")
def codec(checkpoint_dir, device, attn):
    return load_codec(checkpoint_dir(VARIANT), device, attn)


def test_lengths_per_stage(codec):
    """frames × 1920 at the output, and each stage at its own rate: 4× after upsample, ×8, ×5, ×4, ×3."""
    dec = codec.decoder
    cfg = dec.cfg
    lengths: dict[str, int] = {}
    stages = ["pre_conv", "upsample.0.0", "upsample.1.1", *(f"decoder.{i + 1}" for i in range(len(cfg.upsample_rates)))]

    def hook(name):
        return lambda m, a, o: lengths.__setitem__(name, (o[0] if isinstance(o, tuple) else o).shape[-1])

    hooks = [dec.get_submodule(n).register_forward_hook(hook(n)) for n in stages]
    try:
        for F in (1, 2, 3, 7, 73):
            lengths.clear()
            with torch.no_grad():
                wav = dec(torch.zeros(1, cfg.num_quantizers, F, dtype=torch.long, device=codec.device))
            assert tuple(wav.shape) == (1, 1, F * 1920)
            assert lengths["pre_conv"] == F
            assert lengths["upsample.0.0"] == F * cfg.upsampling_ratios[0]
            rate = 1
            for r in cfg.upsampling_ratios:
                rate *= r
            assert lengths["upsample.1.1"] == F * rate
            for i, r in enumerate(cfg.upsample_rates):
                rate *= r
                assert lengths[f"decoder.{i + 1}"] == F * rate, (F, i)
            assert rate == 1920
    finally:
        for h in hooks:
            h.remove()


@pytest.mark.parametrize("cut", [1, 40, 72, 73])
def test_decoder_causal(codec, reference, cut):
    """Appending codes never changes earlier samples (fp32: equal within the stack tier; rounding differs
    with the sequence length)."""
    codes = reference("codec_decoder", VARIANT).input("codes_bqf")[:1].to(codec.device)  # (1, Q, 90)
    with torch.no_grad():
        full = codec.decoder(codes)[..., : cut * 1920]
        pre = codec.decoder(codes[..., :cut])
    r = compare(f"decoder(codes[:{cut}]) vs decoder(codes)[:{cut}*1920]", pre.cpu(), full.cpu(), "stack")
    assert r, r.message
