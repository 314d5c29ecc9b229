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


__all__ = ["EuclideanCodebook", "VectorQuantization", "ResidualVectorQuantization", "ResidualVectorQuantizer",
           "SplitResidualVectorQuantizer"]
