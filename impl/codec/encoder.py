"""Speech-tokenizer encoder: 24 kHz audio -> 12.5 Hz codes (upstream ``Qwen3TTSTokenizerV2Encoder``, which is
transformers' Kyutai ``MimiModel`` with its decoder half removed, driven by ``Qwen3TTSTokenizerV2Model.encode``).

Module names equal the checkpoint keys under ``encoder.`` of ``speech_tokenizer/model.safetensors``::

    encoder.layers.{0..14}        SEANet: causal convs (zero left pad), residual blocks, ELU; x960 down   (B, C, T/960)
    encoder_transformer.layers.N  pre-norm transformer at 25 Hz: LayerNorm (bias), RoPE 1e4, layer scale,
                                  GELU MLP fc1/fc2; full causal or 250-frame window (see ``WINDOW_BY_ATTN``) (B, T25, C)
    downsample                    causal Conv1d k4 s2, no bias, REPLICATE padding; 25 -> 12.5 Hz           (B, C, F)
    quantizer.{semantic,acoustic}_residual_vector_quantizer
                                  split RVQ: both halves quantize input_proj(the same latents); nearest codeword
                                  by fp32 cdist against embed_sum / clamp(cluster_usage, 1e-5)             (B, Q, F)

Frames: every conv is causal with ``ceil`` length (extra zero/replicate padding on the right), so
``F = ceil(T / 1920)`` and frame ``i`` depends only on samples ``< (i + 1) * 1920``.

Attention window (transformers 4.57.3, what upstream really does): the Mimi transformer builds its mask with
``create_causal_mask``, so under ``eager`` and ``sdpa`` the config's ``sliding_window`` (250) is *ignored* and
attention is full-causal; only ``flash_attention_2`` passes ``sliding_window`` to the kernel, as
``window_size=(249, 249)`` = keys ``i-249 .. i``. ``WINDOW_BY_ATTN`` maps the upstream backend to our mode:
``"full"`` or ``"sliding"`` (keys ``[i - 249, i]``, computed with our eager/sdpa kernels). The two differ only
for clips longer than 250 frames at 25 Hz (10 s).

Deliberate differences: upstream computes all 32 RVQ levels and keeps 16; residual quantization is sequential,
so we stop after ``valid_quantizers`` levels (same codes, half the work). The padding mask is not passed to
Mimi upstream either; per-item lengths are applied afterwards, ``ceil(valid_samples / 1920)`` frames.

Notation: B batch, T samples, C channels, T25 frames at 25 Hz, F frames at 12.5 Hz, D codebook dim, Q levels.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..config import CodecEncoderConfig
from ..layers import Attention, AttentionSetting, LayerScale, RotaryEmbedding, causal_mask
from ..taps import tap

# upstream attention backend -> our window mode (see module docstring).
WINDOW_BY_ATTN = {"eager": "full", "sdpa": "full", "flash_attention_2": "sliding"}
CODEBOOK_EPS = 1e-5  # cluster_usage floor (upstream MimiEuclideanCodebook.epsilon)


# ---------------------------------------------------------------------------------------------- SEANet


class CausalConv1d(nn.Module):
    """Causal Conv1d with "ceil" output length (upstream ``MimiConv1d`` with ``use_causal_conv=True``).

    Left pad ``(k-1)*d + 1 - stride``, right pad ``(-T) % stride`` (what Mimi's ``_get_extra_padding_for_conv1d``
    works out, in integers here), both in ``pad_mode`` (``constant`` = zeros, or ``replicate``); out length
    ``ceil(T / stride)``.

    >>> CausalConv1d(2, 3, 8, stride=4)(torch.zeros(1, 2, 10)).shape
    torch.Size([1, 3, 3])
    """

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, dilation: int = 1, bias: bool = True,
                 pad_mode: str = "constant"):
        super().__init__()
        if pad_mode not in ("constant", "replicate"):
            raise ValueError(f"pad_mode {pad_mode!r}: only 'constant' and 'replicate' are used by Mimi")
        self.conv = nn.Conv1d(cin, cout, kernel, stride, dilation=dilation, bias=bias)
        self.stride = stride
        self.pad_left = (kernel - 1) * dilation + 1 - stride
        self.pad_mode = pad_mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad_right = (-x.shape[-1]) % self.stride  # complete the last stride
        return self.conv(F.pad(x, (self.pad_left, pad_right), mode=self.pad_mode))


class ResnetBlock(nn.Module):
    """``x + conv_1(elu(conv_k(elu(x))))`` with a ``dim // compress`` bottleneck (upstream ``MimiResnetBlock``).
    Children ``block.{0..3}`` = ELU, conv, ELU, conv, so the conv keys are ``block.1`` and ``block.3``.

    >>> ResnetBlock(4, 2, 3, 1)(torch.zeros(1, 4, 9)).shape
    torch.Size([1, 4, 9])
    """

    def __init__(self, dim: int, compress: int, kernel: int, dilation: int, conv_shortcut: bool = False):
        super().__init__()
        hidden = dim // compress
        self.block = nn.ModuleList([nn.ELU(), CausalConv1d(dim, hidden, kernel, dilation=dilation),
                                    nn.ELU(), CausalConv1d(hidden, dim, 1)])
        self.shortcut = CausalConv1d(dim, dim, 1) if conv_shortcut else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for layer in self.block:
            h = layer(h)
        return self.shortcut(x) + h


class SEANetEncoder(nn.Module):
    """Conv stack (upstream ``MimiEncoder``): (B, 1, T) -> (B, hidden, ceil(T / prod(ratios))).

    conv(k7) | per ratio r in reversed(upsampling_ratios): resblock(s), ELU, conv(k=2r, stride r, channels x2)
    | ELU, conv(k3) -> hidden.
    """

    def __init__(self, cfg: CodecEncoderConfig):
        super().__init__()
        layers: list[nn.Module] = [CausalConv1d(cfg.audio_channels, cfg.num_filters, cfg.kernel_size)]
        mult = 1
        for ratio in reversed(cfg.upsampling_ratios):
            dim = mult * cfg.num_filters
            for j in range(cfg.num_residual_layers):
                layers.append(ResnetBlock(dim, cfg.compress, cfg.residual_kernel_size, cfg.dilation_growth_rate**j,
                                          cfg.use_conv_shortcut))
            layers += [nn.ELU(), CausalConv1d(dim, dim * 2, ratio * 2, stride=ratio)]
            mult *= 2
        layers += [nn.ELU(), CausalConv1d(mult * cfg.num_filters, cfg.hidden_size, cfg.last_kernel_size)]
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


# ------------------------------------------------------------------------------------------ transformer


class MimiMLP(nn.Module):
    """``fc2(gelu(fc1(x)))``, no biases, exact (erf) GELU (upstream ``MimiMLP`` with ``hidden_act="gelu"``).

    >>> MimiMLP(4, 8)(torch.zeros(1, 3, 4)).shape
    torch.Size([1, 3, 4])
    """

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden, intermediate, bias=False)
        self.fc2 = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class MimiTransformerLayer(nn.Module):
    """``h = x + ls1(attn(ln1(x)))``, ``h + ls2(mlp(ln2(h)))`` (upstream ``MimiTransformerLayer``).

    LayerNorm with bias (not RMSNorm) and a GELU MLP, so not ``impl.layers.DecoderLayer``; the attention is the
    shared ``impl.layers.Attention`` with QK-norm off and plain 1D RoPE.
    """

    def __init__(self, cfg: CodecEncoderConfig):
        super().__init__()
        if cfg.hidden_act != "gelu":
            raise ValueError(f"Mimi encoder hidden_act {cfg.hidden_act!r}: only 'gelu' is implemented")
        C = cfg.hidden_size
        self.self_attn = Attention(C, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, bias=False)
        # Upstream multiplies by 1 / math.sqrt(head_dim); head_dim ** -0.5 can differ in the last bit.
        self.self_attn.scaling = 1 / math.sqrt(cfg.head_dim)
        self.mlp = MimiMLP(C, cfg.intermediate_size)
        self.input_layernorm = nn.LayerNorm(C, eps=cfg.norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(C, eps=cfg.norm_eps)
        self.self_attn_layer_scale = LayerScale(C, cfg.layer_scale_initial_scale)
        self.mlp_layer_scale = LayerScale(C, cfg.layer_scale_initial_scale)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None
                ) -> torch.Tensor:
        h = x + self.self_attn_layer_scale(self.self_attn(self.input_layernorm(x), cos, sin, mask))
        return h + self.mlp_layer_scale(self.mlp(self.post_attention_layernorm(h)))


class MimiTransformer(AttentionSetting, nn.Module):
    """Encoder transformer (upstream ``MimiTransformerModel``): (B, T25, C) -> (B, T25, C), positions 0..T25-1.

    Its ``attn_impl`` (set with its layers' by :func:`impl.layers.set_attention`) picks the mask: the eager
    kernel needs an explicit one where sdpa uses ``is_causal``."""

    def __init__(self, cfg: CodecEncoderConfig):
        super().__init__()
        self.layers = nn.ModuleList([MimiTransformerLayer(cfg) for _ in range(cfg.num_hidden_layers)])
        self.rotary_emb = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)
        self.sliding_window = cfg.sliding_window

    def attention_mask(self, T: int, dtype: torch.dtype, device: torch.device,
                       window_mode: str) -> torch.Tensor | None:
        """Additive mask (1, 1, T, T) for ``window_mode``, or None where SDPA's own ``is_causal`` does the job."""
        if window_mode == "sliding":
            # Keys [i - window + 1, i], as flash-attn's window_size=(window - 1, .) (upstream under FA2).
            return causal_mask(T, T, dtype, device, window=self.sliding_window)
        if window_mode == "full":
            # sdpa: no mask, is_causal=True inside Attention (upstream's SDPA path skips the mask the same way);
            # eager: an explicit additive finfo.min mask, as upstream's create_causal_mask builds it.
            return causal_mask(T, T, dtype, device) if self.attn_impl == "eager" else None
        raise ValueError(f"window_mode {window_mode!r} is not 'full' or 'sliding'")

    def forward(self, x: torch.Tensor, window_mode: str = "full") -> torch.Tensor:
        B, T, _ = x.shape
        cos, sin = self.rotary_emb(x, torch.arange(T, device=x.device)[None])  # (1, T, D) each, x.dtype
        mask = self.attention_mask(T, x.dtype, x.device, window_mode)
        for layer in self.layers:
            x = layer(x, cos, sin, mask)
        return x


# ---------------------------------------------------------------------------------------------- RVQ


class EuclideanCodebook(nn.Module):
    """Codebook buffers (upstream ``MimiEuclideanCodebook``): ``embed_sum`` (N, D), ``cluster_usage`` (N,),
    ``initialized`` (1,); codewords ``embed_sum / clamp(cluster_usage, 1e-5)``, recomputed each call (upstream
    caches them on first use)."""

    def __init__(self, size: int, dim: int):
        super().__init__()
        self.register_buffer("initialized", torch.ones(1))
        self.register_buffer("cluster_usage", torch.ones(size))
        self.register_buffer("embed_sum", torch.zeros(size, dim))

    def embed(self) -> torch.Tensor:
        return self.embed_sum / self.cluster_usage.clamp(min=CODEBOOK_EPS)[:, None]  # (N, D), buffer dtype

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, D, F) -> nearest codeword index (B, F).

        cdist over all B*F rows at once, in fp32, as upstream: cdist switches to a matmul formulation for large
        inputs, so computing it over a different set of rows could round differently and flip a near-tie.
        """
        B, D, Fr = x.shape
        flat = x.permute(0, 2, 1).reshape(-1, D)  # (B*F, D)
        dists = torch.cdist(flat[None].float(), self.embed()[None].float(), p=2)[0]  # (B*F, N)
        return dists.argmin(dim=-1).view(B, Fr)

    def decode(self, idx: torch.Tensor) -> torch.Tensor:
        return F.embedding(idx, self.embed()).permute(0, 2, 1)  # (B, F) -> (B, D, F)


class VectorQuantization(nn.Module):
    """Holder named like upstream ``MimiVectorQuantization`` (key ``layers.N.codebook.*``)."""

    def __init__(self, size: int, dim: int):
        super().__init__()
        self.codebook = EuclideanCodebook(size, dim)


class ResidualVectorQuantizer(nn.Module):
    """Residual VQ (upstream ``MimiResidualVectorQuantizer``): 1x1 ``input_proj`` hidden -> D (no bias) when the
    dims differ, then level by level: code = nearest(residual), residual -= codeword. ``output_proj`` is only
    used by decoding; it is kept so the checkpoint loads strictly."""

    def __init__(self, n_levels: int, hidden: int, dim: int, size: int):
        super().__init__()
        self.layers = nn.ModuleList([VectorQuantization(size, dim) for _ in range(n_levels)])
        self.input_proj = nn.Conv1d(hidden, dim, 1, bias=False) if dim != hidden else None
        self.output_proj = nn.Conv1d(dim, hidden, 1, bias=False) if dim != hidden else None

    def encode(self, x: torch.Tensor, n_levels: int) -> torch.Tensor:
        """x (B, hidden, F) -> codes (n_levels, B, F)."""
        r = self.input_proj(x) if self.input_proj is not None else x  # (B, D, F)
        codes = []
        for vq in self.layers[:n_levels]:
            idx = vq.codebook.encode(r)
            r = r - vq.codebook.decode(idx)  # residual in the activation dtype, as upstream
            codes.append(idx)
        return torch.stack(codes)


class SplitResidualVectorQuantizer(nn.Module):
    """Semantic RVQ (first level(s)) and acoustic RVQ (the rest), both over the *same* latents, not a residual
    across the split (upstream ``MimiSplitResidualVectorQuantizer``)."""

    def __init__(self, cfg: CodecEncoderConfig):
        super().__init__()
        n_sem = cfg.num_semantic_quantizers
        args = (cfg.hidden_size, cfg.vector_quantization_hidden_dimension, cfg.codebook_size)
        self.n_semantic = n_sem
        self.semantic_residual_vector_quantizer = ResidualVectorQuantizer(n_sem, *args)
        self.acoustic_residual_vector_quantizer = ResidualVectorQuantizer(cfg.num_quantizers - n_sem, *args)

    def encode(self, x: torch.Tensor, n_levels: int) -> torch.Tensor:
        """x (B, hidden, F) -> codes (n_levels, B, F)."""
        codes = self.semantic_residual_vector_quantizer.encode(x, self.n_semantic)
        if n_levels > self.n_semantic:
            acoustic = self.acoustic_residual_vector_quantizer.encode(x, n_levels - self.n_semantic)
            codes = torch.cat([codes, acoustic], dim=0)
        return codes[:n_levels]


# ---------------------------------------------------------------------------------------------- encoder


class EncoderOutput(NamedTuple):
    codes: torch.Tensor  # (B, Q, F) int64, first ``valid_quantizers`` levels (upstream audio_codes[:, :16])
    latents: torch.Tensor  # (B, hidden, F) downsampled latents fed to the quantizer
    lengths: torch.Tensor | None  # (B,) valid frames per item, when a padding mask was given


class CodecEncoder(nn.Module):
    """The 12 Hz speech-tokenizer encoder (upstream ``Qwen3TTSTokenizerV2Encoder`` + ``...V2Model.encode``).

    The attention kernel (``eager`` | ``sdpa``) is the module setting of its transformer
    (:func:`impl.layers.set_attention`, called by the loaders); ``window_mode`` (``"full"`` | ``"sliding"``)
    defaults to what upstream does under the same backend name, ``WINDOW_BY_ATTN[attn_impl]`` (full causal);
    pass ``"sliding"`` to mirror upstream under ``flash_attention_2``. Taps: ``speech_tokenizer.encoder.<path>:out``
    by hooks, plus ``quantizer:codes`` (B, Q, F).
    """

    def __init__(self, cfg: CodecEncoderConfig, valid_quantizers: int, *, window_mode: str | None = None):
        super().__init__()
        if not cfg.use_causal_conv:
            raise ValueError("Mimi encoder with use_causal_conv=False is not implemented (every release is causal)")
        if cfg.pad_mode != "constant":
            raise ValueError(f"Mimi encoder pad_mode {cfg.pad_mode!r}: only 'constant' is implemented")
        if not 1 <= valid_quantizers <= cfg.num_quantizers:
            raise ValueError(f"valid_quantizers {valid_quantizers} not in [1, {cfg.num_quantizers}]")
        self.cfg = cfg
        self.valid_quantizers = valid_quantizers
        self.window_mode = window_mode
        self.encoder = SEANetEncoder(cfg)
        self.encoder_transformer = MimiTransformer(cfg)
        hop = math.prod(cfg.upsampling_ratios)
        encodec_rate = math.ceil(cfg.sampling_rate / hop)  # 25 Hz (MimiConfig.encodec_frame_rate)
        frame_rate = cfg._frame_rate if cfg._frame_rate is not None else cfg.frame_rate
        if frame_rate == encodec_rate:
            raise ValueError("Mimi without the 25 -> 12.5 Hz downsample is not a 12 Hz tokenizer")
        self.downsample = CausalConv1d(cfg.hidden_size, cfg.hidden_size, 2 * int(encodec_rate / frame_rate),
                                       stride=2, bias=False, pad_mode="replicate")
        self.quantizer = SplitResidualVectorQuantizer(cfg)
        self.hop_length = hop * 2  # samples per code frame (1920)

    def resolved_window_mode(self) -> str:
        return self.window_mode if self.window_mode is not None else WINDOW_BY_ATTN[self.encoder_transformer.attn_impl]

    def forward(self, audio: torch.Tensor, padding_mask: torch.Tensor | None = None) -> EncoderOutput:
        """audio (B, T) or (B, 1, T) in the model dtype; padding_mask (B, T), 1 = real sample (right padding)."""
        x = audio if audio.ndim == 3 else audio[:, None]  # (B, 1, T)
        x = self.encoder(x)  # (B, C, T25)
        x = self.encoder_transformer(x.transpose(1, 2), self.resolved_window_mode())  # (B, T25, C)
        latents = self.downsample(x.transpose(1, 2))  # (B, C, F)
        codes = self.quantizer.encode(latents, self.valid_quantizers).transpose(0, 1)  # (Q, B, F) -> (B, Q, F)
        tap(self.quantizer, "codes", codes)
        lengths = None
        if padding_mask is not None:
            lengths = -(-padding_mask.sum(dim=-1).long() // self.hop_length)  # ceil(valid / 1920)
        return EncoderOutput(codes, latents, lengths)

    @torch.no_grad()
    def encode(self, audio: torch.Tensor, padding_mask: torch.Tensor) -> list[torch.Tensor]:
        """(B, T) audio + (B, T) padding mask -> per item codes (F_i, Q), F_i = ceil(valid_i / 1920)
        (upstream ``Qwen3TTSTokenizerV2Model.encode(...).audio_codes``).

        The API boundary: audio and mask may be on any device; they are moved to the weights' device (audio also
        to their dtype) here, and the codes come back on that device."""
        w = self.encoder.layers[0].conv.weight
        out = self(audio.to(device=w.device, dtype=w.dtype), padding_mask.to(w.device))
        return [c[:, :n].transpose(0, 1) for c, n in zip(out.codes, out.lengths.tolist())]


__all__ = ["CodecEncoder", "EncoderOutput", "WINDOW_BY_ATTN", "CausalConv1d", "ResnetBlock", "SEANetEncoder",
           "MimiMLP", "MimiTransformerLayer", "MimiTransformer", "SplitResidualVectorQuantizer"]
