"""Shared transformer pieces: RMSNorm, RoPE (1D and interleaved M-RoPE), attention, SwiGLU MLP, decoder layer,
and (re-exported from :mod:`impl.kv_cache`) the preallocated KV cache.

The talker, the code predictor and the speech-tokenizer decoder's pre-transformer all use ``DecoderLayer`` /
``Attention`` from here; what differs between them is injected (QK-norm or not, the RoPE flavour, a sliding
window, layer scales), never copied into a near-identical class.

Notation: B batch, T query length, S key length (cache included), H query heads, K kv heads, D head dim,
C hidden size.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .kv_cache import KVCache
from .taps import tap

ATTN_IMPLS = ("eager", "sdpa")


def check_attn_impl(impl: str) -> str:
    if impl not in ATTN_IMPLS:
        raise ValueError(f"attn={impl!r} is not one of {ATTN_IMPLS} (flash kernels are reached through sdpa on CUDA)")
    return impl


class AttentionSetting:
    """Mixin for a module whose computation depends on the attention implementation: ``attn_impl``, ``"eager"``
    (explicit softmax; the ``attn_probs`` tap) or ``"sdpa"`` (``F.scaled_dot_product_attention``; the
    construction default). A plain str attribute, validated when set, chosen once for a whole model by
    :func:`set_attention` (the loaders' ``attn=`` argument); forwards read it, no call signature carries it.
    Under ``torch.compile`` it is a constant of the graph."""

    _attn_impl: str = "sdpa"

    @property
    def attn_impl(self) -> str:
        return self._attn_impl

    @attn_impl.setter
    def attn_impl(self, impl: str) -> None:
        self._attn_impl = check_attn_impl(impl)


def _settings(module: nn.Module) -> list[AttentionSetting]:
    found = [m for m in module.modules() if isinstance(m, AttentionSetting)]
    if not found:
        raise ValueError(f"{type(module).__name__} has no attention module to set")
    return found


def set_attention(module: nn.Module, impl: str) -> nn.Module:
    """Set ``attn_impl = impl`` on every attention-dependent module under ``module`` (itself included); returns
    ``module``. The one place a model's attention implementation is chosen.

    >>> a = set_attention(Attention(8, 2, 1, 4), "eager"); a.attn_impl
    'eager'
    >>> set_attention(a, "flash")
    Traceback (most recent call last):
    ValueError: attn='flash' is not one of ('eager', 'sdpa') (flash kernels are reached through sdpa on CUDA)
    """
    check_attn_impl(impl)
    for m in _settings(module):
        m.attn_impl = impl
    return module


def get_attention(module: nn.Module) -> str:
    """The attention implementation every attention module under ``module`` uses (ValueError if they differ)."""
    impls = {m.attn_impl for m in _settings(module)}
    if len(impls) != 1:
        raise ValueError(f"{type(module).__name__} mixes attention implementations {sorted(impls)}")
    return impls.pop()


@contextmanager
def attention(module: nn.Module, impl: str) -> Iterator[nn.Module]:
    """Temporarily :func:`set_attention` (tests that run one model under a given implementation); the previous
    per-module settings come back on exit.

    >>> a = Attention(8, 2, 1, 4)
    >>> with attention(a, "eager"):
    ...     a.attn_impl
    'eager'
    >>> a.attn_impl
    'sdpa'
    """
    check_attn_impl(impl)
    saved = [(m, m.attn_impl) for m in _settings(module)]
    try:
        yield set_attention(module, impl)
    finally:
        for m, old in saved:
            m.attn_impl = old


LINEAR_KERNELS = ("aten", "onednn")


def check_linear_kernel(kernel: str) -> str:
    if kernel not in LINEAR_KERNELS:
        raise ValueError(f"linear={kernel!r} is not one of {LINEAR_KERNELS}")
    return kernel


def onednn_available() -> bool:
    """Whether this torch build has oneDNN's linear (``torch.ops.mkldnn._linear_pointwise``, the op inductor's own
    CPU freezing pass emits)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


@torch.library.custom_op("qwen3tts_impl::onednn_linear", mutates_args=())
def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    # An opaque op under torch.compile: inductor's own lowering of _linear_pointwise raised on a plain weight.
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@_onednn_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, same keys) with a kernel setting, ``linear_kernel``:

    - ``"aten"`` (default): ``F.linear``, the kernel upstream runs, so ours equals it bit for bit on the CPU;
    - ``"onednn"``: CPU float32 only, oneDNN's matmul on the plain weight. A one-row product (the decode step)
      streams the weights 1.3-1.8x faster than ``F.linear``'s MKL path on the 2-core AMD EPYC it was measured on
      (``python -m impl bench --linear onednn``); the values agree to fp32 rounding, not bit for bit, so greedy
      codes may part from upstream's at a near tie. Any other device or dtype falls back to ``F.linear``.

    Chosen once for a model by :func:`set_linear_kernel` (``from_pretrained(linear=...)``); under
    ``torch.compile`` it is a constant of the graph.
    """

    linear_kernel: str = "aten"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.linear_kernel == "onednn" and x.device.type == "cpu" and x.dtype == torch.float32:
            if torch.compiler.is_compiling():
                return _onednn_linear(x, self.weight, self.bias)
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


def set_linear_kernel(module: nn.Module, kernel: str) -> nn.Module:
    """Set ``linear_kernel`` on every :class:`Linear` under ``module``; returns ``module``.

    >>> set_linear_kernel(SwiGLU(8, 16), "onednn").up_proj.linear_kernel
    'onednn'
    """
    check_linear_kernel(kernel)
    if kernel == "onednn":
        if not onednn_available():
            raise ValueError("linear='onednn' needs a torch build with oneDNN (torch.backends.mkldnn); this one has none")
        p = next(module.parameters(), None)
        if p is not None and (p.device.type != "cpu" or p.dtype != torch.float32):
            raise ValueError(f"linear='onednn' is a CPU float32 kernel; this model is {p.dtype} on {p.device} "
                             "(use linear='aten')")
    for m in module.modules():
        if isinstance(m, Linear):
            m.linear_kernel = kernel
    return module


def get_linear_kernel(module: nn.Module) -> str:
    """The kernel every :class:`Linear` under ``module`` uses (``"aten"`` when there is none; ValueError if they
    differ)."""
    kernels = {m.linear_kernel for m in module.modules() if isinstance(m, Linear)} or {"aten"}
    if len(kernels) != 1:
        raise ValueError(f"{type(module).__name__} mixes linear kernels {sorted(kernels)}")
    return kernels.pop()


class RMSNorm(nn.Module):
    """Root-mean-square norm (upstream ``Qwen3TTSRMSNorm`` / ``Qwen3TTSTokenizerV2DecoderRMSNorm``).

    >>> RMSNorm(8)(torch.ones(2, 3, 8)).shape
    torch.Size([2, 3, 8])
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        # Statistics in fp32 whatever the activation dtype (bf16 variance underflows otherwise).
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        # Cast back to the activation dtype BEFORE the weight multiply, as upstream does; multiplying in fp32
        # and casting after rounds differently in bf16.
        return self.weight * x32.to(dtype)


# ------------------------------------------------------------------------------------------------- RoPE


def rope_inv_freq(head_dim: int, theta: float, device: torch.device | None = None) -> torch.Tensor:
    """Default RoPE inverse frequencies, (D/2,), fp32: ``theta ** (-2i/D)``."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))


class RotaryEmbedding(nn.Module):
    """cos/sin tables for half-split (GPT-NeoX, ``rotate_half``) RoPE.

    ``forward(x, positions)`` takes positions of shape (B, T) -> cos, sin (B, T, D), or of shape (R, B, T) for
    multi-row (M-RoPE) positions -> (R, B, T, D). Computed in fp32 with autocast off, then cast to ``x.dtype``
    (upstream does the same; computing the angles in bf16 loses the position).

    >>> cos, sin = RotaryEmbedding(16, 1e4)(torch.zeros(1), torch.arange(5)[None])
    >>> cos.shape
    torch.Size([1, 5, 16])
    """

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.head_dim, self.theta = head_dim, theta
        self.register_buffer("inv_freq", rope_inv_freq(head_dim, theta), persistent=False)

    def _apply(self, fn, recurse: bool = True):
        # ``.to(bf16)`` would round the table (the angle of position 60 moves by up to ~0.2 rad) and ``to_empty``
        # leaves it uninitialised; upstream's from_pretrained keeps it fp32. Recompute it in fp32 on the new device
        # after any such move.
        super()._apply(fn, recurse)
        self.inv_freq = rope_inv_freq(self.head_dim, self.theta, device=self.inv_freq.device)
        return self

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dev_type = x.device.type if x.device.type not in ("mps", "meta") else "cpu"  # no autocast there
        with torch.autocast(device_type=dev_type, enabled=False):
            freqs = positions.to(torch.float32).unsqueeze(-1) * self.inv_freq.float()  # (..., T, D/2)
            emb = torch.cat((freqs, freqs), dim=-1)  # (..., T, D): the same angle in both halves
            return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``cat(-x2, x1)`` over the last dim split in halves (not pairwise interleaved)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain 1D RoPE. q (B, H, T, D), k (B, K, T, D), cos/sin (B, T, D)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, D): broadcast over heads
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def merge_mrope(t: torch.Tensor, sections: list[int], interleaved: bool) -> torch.Tensor:
    """Merge per-row M-RoPE tables (R=3, B, T, D) into one (B, T, D) table (upstream
    ``apply_multimodal_rotary_pos_emb``).

    Interleaved (Qwen3-VL/Omni): frequency slot f of the first half takes row 1 (H) if ``f % 3 == 1`` and
    ``f < 3*sections[1]``, row 2 (W) if ``f % 3 == 2`` and ``f < 3*sections[2]``, otherwise row 0 (T); the half is
    then duplicated. Sectioned (Qwen2-VL): contiguous chunks ``sections*2`` cycle through rows 0, 1, 2.
    """
    n_rows = len(sections)
    if interleaved:
        half = t[..., : t.shape[-1] // 2]
        out = half[0].clone()  # (B, T, D/2)
        for row in range(1, n_rows):
            end = sections[row] * n_rows
            out[..., row:end:n_rows] = half[row, ..., row:end:n_rows]
        return torch.cat((out, out), dim=-1)
    chunks = t.split(list(sections) * 2, dim=-1)
    return torch.cat([c[i % n_rows] for i, c in enumerate(chunks)], dim=-1)


# ------------------------------------------------------------------------------------------------ masks


def causal_mask(
    q_len: int, kv_len: int, dtype: torch.dtype, device: torch.device | str,
    key_padding: torch.Tensor | None = None, window: int | None = None,
) -> torch.Tensor | None:
    """Additive mask (B or 1, 1, T, S): 0 where query may attend, ``finfo(dtype).min`` elsewhere.

    Query t sits at absolute position ``kv_len - q_len + t``. ``key_padding`` (B, >=S) is 1 for real keys, 0 for
    left padding, or None when the batch has none. ``window`` keeps keys ``[pos - window + 1, pos]`` (72 in the
    codec decoder). Returns ``None`` when nothing is masked (one query, no padding, the window covering every key),
    decided from host-side facts only, so a decode step never waits on the device; SDPA then takes its fastest
    path.
    """
    if q_len == 1 and key_padding is None and (window is None or kv_len <= window):
        return None
    q_pos = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]  # (T, 1)
    k_pos = torch.arange(kv_len, device=device)[None, :]  # (1, S)
    allowed = k_pos <= q_pos  # (T, S)
    if window is not None:
        allowed = allowed & (k_pos > q_pos - window)
    allowed = allowed[None, None]  # (1, 1, T, S)
    if key_padding is not None:
        allowed = allowed & key_padding[:, None, None, :kv_len].bool()  # (B, 1, T, S)
    # finfo.min rather than -inf, as upstream: a fully masked (left-pad) row then softmaxes to uniform, not NaN;
    # those rows are never read.
    zero = torch.zeros((), dtype=dtype, device=device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, K, S, D) -> (B, K*n_rep, S, D), each kv head repeated for its group of query heads."""
    if n_rep == 1:
        return x
    b, k, s, d = x.shape
    return x[:, :, None].expand(b, k, n_rep, s, d).reshape(b, k * n_rep, s, d)


# -------------------------------------------------------------------------------------------- attention


class Attention(AttentionSetting, nn.Module):
    """Multi-head attention with GQA, optional per-head QK RMSNorm before RoPE, injected RoPE function.

    Reproduces upstream ``Qwen3TTSTalkerAttention`` (QK-norm; its M-RoPE table is merged by the caller),
    ``Qwen3TTSAttention`` (code predictor, QK-norm) and ``Qwen3TTSTokenizerV2DecoderAttention`` (no QK-norm:
    ``nn.Identity``; its 72-frame sliding window lives in the mask). ``head_dim`` is explicit: q_proj outputs ``n_heads * head_dim``, which need not equal the
    hidden size (2048 vs 1024 in the 0.6B talker).

    The kernel is the module setting ``attn_impl`` (:class:`AttentionSetting`, set by :func:`set_attention`).
    Taps: ``q_rope``, ``k_rope`` (B, H|K, T, D) after RoPE; ``attn_probs`` (B, H, T, S) on the eager path.
    """

    def __init__(self, hidden: int, n_heads: int, n_kv_heads: int, head_dim: int, *, bias: bool = False,
                 qk_norm_eps: float | None = None):
        super().__init__()
        if n_heads % n_kv_heads:
            raise ValueError(f"n_heads {n_heads} is not a multiple of n_kv_heads {n_kv_heads}")
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.scaling = head_dim**-0.5
        self.q_proj = Linear(hidden, n_heads * head_dim, bias=bias)
        self.k_proj = Linear(hidden, n_kv_heads * head_dim, bias=bias)
        self.v_proj = Linear(hidden, n_kv_heads * head_dim, bias=bias)
        self.o_proj = Linear(n_heads * head_dim, hidden, bias=bias)
        norm = (lambda: RMSNorm(head_dim, qk_norm_eps)) if qk_norm_eps is not None else nn.Identity
        self.q_norm = norm()
        self.k_norm = norm()

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        B, T, _ = x.shape
        # QK-norm acts per head on (B, T, H, D), before the transpose and before RoPE (upstream order).
        q = self.q_norm(self.q_proj(x).view(B, T, -1, self.head_dim)).transpose(1, 2)  # (B, H, T, D)
        k = self.k_norm(self.k_proj(x).view(B, T, -1, self.head_dim)).transpose(1, 2)  # (B, K, T, D)
        v = self.v_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, K, T, D)
        q, k = apply_rope(q, k, cos, sin)
        tap(self, "q_rope", q)
        tap(self, "k_rope", k)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, K, S, D)
        n_rep = self.n_heads // self.n_kv_heads
        k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)  # (B, H, S, D)
        impl = self.attn_impl
        if impl == "eager":
            w = torch.matmul(q, k.transpose(2, 3)) * self.scaling  # (B, H, T, S)
            if mask is not None:
                w = w + mask[..., : k.shape[2]]
            # Softmax in fp32 then back to the activation dtype (upstream eager_attention_forward).
            w = F.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
            tap(self, "attn_probs", w)
            o = torch.matmul(w, v)  # (B, H, T, D)
        elif impl == "sdpa":
            # is_causal only for a square, unpadded, unwindowed prefill: lets CUDA pick flash attention.
            square = mask is None and T == k.shape[2] and T > 1
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=square, scale=self.scaling)
        else:
            raise ValueError(f"attention implementation {impl!r} is not one of {ATTN_IMPLS}")
        o = o.transpose(1, 2).reshape(B, T, -1)  # (B, T, H*D)
        return self.o_proj(o)


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))``, no biases (upstream ``Qwen3TTSTalkerTextMLP`` and the codec MLP)."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = Linear(hidden, intermediate, bias=False)
        self.up_proj = Linear(hidden, intermediate, bias=False)
        self.down_proj = Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LayerScale(nn.Module):
    """Per-channel scale (upstream ``Qwen3TTSTokenizerV2DecoderLayerScale``): ``x * scale``."""

    def __init__(self, dim: int, init: float = 0.01):
        super().__init__()
        self.scale = nn.Parameter(torch.full((dim,), float(init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


class DecoderLayer(nn.Module):
    """Pre-norm transformer layer: ``h = x + ls1(attn(norm1(x)))``, ``h + ls2(mlp(norm2(h)))``.

    ``layer_scale=None`` (talker, code predictor) has no scales; a float (codec pre-transformer) adds
    ``self_attn_layer_scale`` and ``mlp_layer_scale``.
    """

    def __init__(self, hidden: int, intermediate: int, n_heads: int, n_kv_heads: int, head_dim: int, *,
                 eps: float, qk_norm: bool, layer_scale: float | None = None, bias: bool = False):
        super().__init__()
        self.self_attn = Attention(hidden, n_heads, n_kv_heads, head_dim, bias=bias,
                                   qk_norm_eps=eps if qk_norm else None)
        self.mlp = SwiGLU(hidden, intermediate)
        self.input_layernorm = RMSNorm(hidden, eps)
        self.post_attention_layernorm = RMSNorm(hidden, eps)
        if layer_scale is not None:
            self.self_attn_layer_scale = LayerScale(hidden, layer_scale)
            self.mlp_layer_scale = LayerScale(hidden, layer_scale)
        self.has_layer_scale = layer_scale is not None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        a = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer)
        if self.has_layer_scale:
            a = self.self_attn_layer_scale(a)
        h = x + a
        m = self.mlp(self.post_attention_layernorm(h))
        if self.has_layer_scale:
            m = self.mlp_layer_scale(m)
        return h + m


def qwen3_layers(cfg) -> nn.ModuleList:
    """The QK-normed decoder layers of a Qwen3-style config (talker or code predictor: same field names)."""
    return nn.ModuleList([
        DecoderLayer(cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads,
                     cfg.head_dim, eps=cfg.rms_norm_eps, qk_norm=True, bias=cfg.attention_bias)
        for _ in range(cfg.num_hidden_layers)
    ])


__all__ = [
    "RMSNorm", "RotaryEmbedding", "rotate_half", "apply_rope", "merge_mrope", "KVCache",
    "causal_mask", "repeat_kv", "Attention", "SwiGLU", "LayerScale", "DecoderLayer", "qwen3_layers", "check_attn_impl",
    "ATTN_IMPLS", "AttentionSetting", "set_attention", "get_attention", "attention", "Linear", "LINEAR_KERNELS",
    "check_linear_kernel", "set_linear_kernel", "get_linear_kernel", "onednn_available",
]
