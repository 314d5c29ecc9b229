"""Unit and property tests of impl/layers.py: RoPE forms, attention backends, KV cache."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from impl.layers import (
    Attention,
    KVCache,
    RMSNorm,
    RotaryEmbedding,
    apply_rope,
    attention,
    causal_mask,
    merge_mrope,
)


def test_interleaved_mrope_with_equal_rows_is_plain_rope():
    rot = RotaryEmbedding(32, 1e6)
    x = torch.zeros(1)
    pos = torch.arange(11)[None]  # (1, T)
    cos1, sin1 = rot(x, pos)
    cos3, sin3 = rot(x, pos[None].expand(3, 1, 11))
    assert torch.equal(merge_mrope(cos3, [6, 5, 5], True), cos1)
    assert torch.equal(merge_mrope(sin3, [6, 5, 5], False), sin1)


def test_interleaved_mrope_slot_assignment_with_distinct_rows():
    # rows hold their own index as the "table value": the merged table says which row fed each slot
    D, sec = 32, [6, 5, 5]
    t = torch.stack([torch.full((1, 1, D), float(r)) for r in range(3)])  # (3, 1, 1, D)
    m = merge_mrope(t, sec, True)[0, 0]
    for f in range(D // 2):
        want = 1 if (f % 3 == 1 and f < 3 * sec[1]) else 2 if (f % 3 == 2 and f < 3 * sec[2]) else 0
        assert m[f] == want and m[f + D // 2] == want


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 9), st.integers(0, 5))
def test_rope_preserves_norm_and_relative_position(T, shift):
    g = torch.Generator().manual_seed(T)
    q = torch.randn(1, 2, T, 16, generator=g, dtype=torch.float64)
    rot = RotaryEmbedding(16, 1e4)
    c, s = rot(q, torch.arange(T)[None])
    c2, s2 = rot(q, torch.arange(T)[None] + shift)
    q1, k1 = apply_rope(q, q, c, s)
    q2, k2 = apply_rope(q, q, c2, s2)
    assert torch.allclose(q1.norm(dim=-1), q.norm(dim=-1))
    # scores depend only on relative positions
    assert torch.allclose(q1 @ k1.transpose(-1, -2), q2 @ k2.transpose(-1, -2), atol=1e-9)


def _attn():
    torch.manual_seed(0)
    return Attention(24, 4, 2, 8, qk_norm_eps=1e-6).double()


@pytest.mark.parametrize("window", [None, 3])
def test_eager_equals_sdpa_and_prefill_equals_incremental(window):
    a = _attn()  # the window lives in the mask
    rot = RotaryEmbedding(8, 1e4)
    x = torch.randn(2, 7, 24, dtype=torch.float64)
    cos, sin = rot(x, torch.arange(7)[None].expand(2, 7))
    mask = causal_mask(7, 7, x.dtype, "cpu", window=window)
    with attention(a, "eager"):
        full_e = a(x, cos, sin, mask)
    with attention(a, "sdpa"):
        full_s = a(x, cos, sin, mask)
    # eager runs its softmax in fp32 (as upstream does), so in float64 the two backends agree to fp32 rounding
    assert torch.allclose(full_e, full_s, atol=1e-6)
    cache = KVCache.allocate(1, 2, 2, 16, 8, "cpu", torch.float64)
    outs = []
    for t in range(7):
        m = causal_mask(1, t + 1, x.dtype, "cpu", window=window)
        with attention(a, "eager"):
            outs.append(a(x[:, t:t + 1], cos[:, t:t + 1], sin[:, t:t + 1], m, cache, 0))
        cache.advance(1)
    assert torch.allclose(torch.cat(outs, 1), full_e, atol=1e-12)


def test_left_padding_mask_and_cache_overflow():
    pad = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    m = causal_mask(4, 4, torch.float32, "cpu", key_padding=pad)
    assert m.shape == (2, 1, 4, 4) and m[0, 0, 3, 1] < -1e30 and m[0, 0, 3, 2] == 0 and m[1, 0, 3, 0] == 0
    assert causal_mask(1, 5, torch.float32, "cpu") is None
    c = KVCache.allocate(1, 1, 1, 2, 4, "cpu", torch.float32)
    c.update(0, torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 2, 4))
    c.advance(2)
    with pytest.raises(ValueError, match="capacity 2"):
        c.update(0, torch.zeros(1, 1, 1, 4), torch.zeros(1, 1, 1, 4))


def test_rmsnorm_casts_back_before_weight_in_bf16():
    n = RMSNorm(64)
    with torch.no_grad():
        n.weight.uniform_(0.7, 1.3)
    x = torch.randn(3, 64).to(torch.bfloat16)
    x32 = x.float()
    normed = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16)
    assert torch.equal(n.to(torch.bfloat16)(x), n.weight.to(torch.bfloat16) * normed)
