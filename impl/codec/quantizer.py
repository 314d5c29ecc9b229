"""Split residual vector quantizer of the speech-tokenizer decoder: codes -> latent (decode side only).

Reproduces upstream ``SplitResidualVectorQuantizer.decode`` (qwen_tts ``tokenizer_12hz``), whose nesting fixes the
checkpoint keys, so the same nesting is kept here (``rvq_first.vq.layers.0._codebook.embedding_sum`` …):

    SplitResidualVectorQuantizer      rvq_first (1 codebook: semantic), rvq_rest (15 codebooks: acoustic)
      ResidualVectorQuantizer         input_proj (encode side, unused in decode), output_proj (Conv1d k1, no bias)
        ResidualVectorQuantization    layers.N
          VectorQuantization          _codebook (project_out is the identity: codebook dim == dim)
            EuclideanCodebook         embedding_sum (K, d), cluster_usage (K,)   -- Parameters in upstream

The two halves are dequantised and projected SEPARATELY, each by its own ``output_proj``, then added:

    latent = output_proj_first(E_0[c_0]) + output_proj_rest(sum_{k=1..15} E_k[c_k])

Summing all 16 embeddings before one projection is a different (wrong) model; the mutation tests check that
the harness notices. Notation: B batch, Q codebooks, F frames, d codebook dim, C output dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def check_integer_codes(codes: torch.Tensor, what: str = "codes") -> None:
    """Codes are integers: a float array (3.7 -> 3 after ``.long()``) or a bool mask is refused in one line."""
    if codes.dtype == torch.bool or codes.is_floating_point() or codes.is_complex():
        raise ValueError(f"{what}: dtype {codes.dtype} is not an integer dtype (codes are codebook indices)")


def check_codes(codes: torch.Tensor, codebook_size: int, what: str = "codes", items: list[int] | None = None,
                padding: bool = False) -> None:
    """codes (B, F, Q) integer: every code in ``[0, codebook_size)``, or one ``ValueError`` line naming the item,
    frame, codebook and the allowed range (an embedding lookup would fail with a bare ``IndexError`` on the CPU and
    a device-side assert on CUDA). ``items[b]`` is the item number shown for row ``b`` (default ``b``).

    ``padding=True`` also allows upstream's ``-1`` right padding (``Qwen3TTSTokenizerV2Model.decode`` counts a
    frame as valid when its first code is > -1 and decodes the rest as code 0, then cuts): a padding frame must be
    -1 in every codebook and may only follow the valid frames. Upstream silently decodes a -1 inside a valid frame,
    or a valid frame after padding, as code 0 and returns misaligned audio; here both are refused. One host read
    when nothing is wrong."""
    B, F, Q = codes.shape
    lo = -1 if padding else 0
    bad = (codes < lo) | (codes >= codebook_size)  # (B, F, Q)
    pad = codes == -1
    if padding:
        mixed = pad.any(-1) & ~pad.all(-1)  # (B, F): -1 in some codebooks only
        frame_pad = pad[..., 0]  # (B, F): upstream's rule (first code == -1)
        after_pad = (frame_pad.long().cumsum(1) > 0) & ~frame_pad  # (B, F): a valid frame after a padding frame
    else:
        mixed = after_pad = bad.new_zeros(())
    if not bool(bad.any() | mixed.any() | after_pad.any()):  # the one host read
        return

    def name(b: int) -> str:
        return f"{what} item {items[b] if items is not None else b}"

    allowed = f"[0, {codebook_size})" + (", or -1 for padding frames" if padding else "")
    if bool(bad.any()):
        b, f, q = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{name(b)}, frame {f}, codebook {q}: code {int(codes[b, f, q])} is out of range {allowed} "
                         f"({int(bad.sum())} code(s) out of range in all)")
    if bool(mixed.any()):
        b, f = (int(i) for i in mixed.nonzero()[0])
        q, r = int(pad[b, f].int().argmax()), int((~pad[b, f]).int().argmax())  # a -1 codebook, a coded one
        raise ValueError(f"{name(b)}, frame {f}: codebook {q} is -1 (padding) but codebook {r} holds "
                         f"{int(codes[b, f, r])} (a padding frame is -1 in all {Q} codebooks)")
    b, f = (int(i) for i in after_pad.nonzero()[0])
    p = int(frame_pad[b].int().argmax())
    raise ValueError(f"{name(b)}, frame {f}: a valid frame after -1 padding at frame {p} (-1 frames are right "
                     "padding only)")


class EuclideanCodebook(nn.Module):
    """Codebook stored as an EMA sum and usage count; the vectors are ``embedding_sum / max(usage, 1e-5)``
    (upstream ``EuclideanCodebook``). The 1e-5 clamp keeps never-used entries finite.

    >>> EuclideanCodebook(4, 10).decode(torch.zeros(2, 3, dtype=torch.long)).shape
    torch.Size([2, 3, 4])
    """

    epsilon = 1e-5

    def __init__(self, dim: int, codebook_size: int):
        super().__init__()
        self.cluster_usage = nn.Parameter(torch.ones(codebook_size))
        self.embedding_sum = nn.Parameter(torch.zeros(codebook_size, dim))

    def embedding(self) -> torch.Tensor:
        """(K, d) codebook vectors."""
        return self.embedding_sum / self.cluster_usage.clamp(min=self.epsilon)[:, None]

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, F) -> (B, F, d)."""
        return F.embedding(codes, self.embedding())


class VectorQuantization(nn.Module):
    """One codebook (upstream ``VectorQuantization``; ``project_out`` is an identity in every config)."""

    def __init__(self, dim: int, codebook_size: int):
        super().__init__()
        self._codebook = EuclideanCodebook(dim, codebook_size)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, F) -> (B, d, F)."""
        return self._codebook.decode(codes).transpose(1, 2)


class ResidualVectorQuantization(nn.Module):
    """A stack of codebooks whose vectors add up (upstream ``ResidualVectorQuantization``)."""

    def __init__(self, num_quantizers: int, dim: int, codebook_size: int):
        super().__init__()
        self.layers = nn.ModuleList([VectorQuantization(dim, codebook_size) for _ in range(num_quantizers)])

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (Q, B, F) -> (B, d, F): sum over codebooks in index order (upstream's order, for rounding)."""
        out = self.layers[0].decode(codes[0])
        for layer, c in zip(self.layers[1:], codes[1:]):
            out = out + layer.decode(c)
        return out


class ResidualVectorQuantizer(nn.Module):
    """Codebooks + 1×1 conv projections (upstream ``ResidualVectorQuantizer`` with ``force_projection=True``).

    ``input_proj`` (C -> d) is only used when encoding; it is here because the checkpoint holds it.
    """

    def __init__(self, num_quantizers: int, dim: int, io_dim: int, codebook_size: int):
        super().__init__()
        self.input_proj = nn.Conv1d(io_dim, dim, 1, bias=False)
        self.output_proj = nn.Conv1d(dim, io_dim, 1, bias=False)
        self.vq = ResidualVectorQuantization(num_quantizers, dim, codebook_size)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, Q, F) -> (B, C, F)."""
        return self.output_proj(self.vq.decode(codes.transpose(0, 1)))  # codes as (Q, B, F)


class SplitResidualVectorQuantizer(nn.Module):
    """First ``n_q_semantic`` codebooks and the rest as two separately projected RVQs (upstream
    ``SplitResidualVectorQuantizer``, built by the decoder with dim = codebook_dim/2, io dim = codebook_dim).

    >>> q = SplitResidualVectorQuantizer(n_q=4, dim=8, io_dim=16, codebook_size=32)
    >>> q.decode(torch.zeros(2, 4, 5, dtype=torch.long)).shape
    torch.Size([2, 16, 5])
    """

    def __init__(self, n_q: int, dim: int, io_dim: int, codebook_size: int, n_q_semantic: int = 1):
        super().__init__()
        if n_q <= n_q_semantic:
            raise ValueError(f"n_q {n_q} must exceed the number of semantic quantizers {n_q_semantic}")
        self.n_q_semantic = n_q_semantic
        self.rvq_first = ResidualVectorQuantizer(n_q_semantic, dim, io_dim, codebook_size)
        self.rvq_rest = ResidualVectorQuantizer(n_q - n_q_semantic, dim, io_dim, codebook_size)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, Q, F) -> latent (B, C, F). Stateless per frame, so streaming needs no state here."""
        latent = self.rvq_first.decode(codes[:, : self.n_q_semantic])  # (B, C, F)
        if codes.shape[1] > self.n_q_semantic:
            latent = latent + self.rvq_rest.decode(codes[:, self.n_q_semantic:])  # projected on its own
        return latent

    forward = decode


__all__ = ["check_codes", "check_integer_codes", "EuclideanCodebook", "VectorQuantization",
           "ResidualVectorQuantization", "ResidualVectorQuantizer", "SplitResidualVectorQuantizer"]
