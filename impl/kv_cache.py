"""Every key/value cache in one place. All three duck-type one interface that the shared
:class:`impl.layers.Attention` calls: ``update(layer, k, v) -> (keys, values)`` to attend over, then
``advance(T)`` once after all layers ran.

- :class:`KVCache`: preallocated, fixed capacity, fill length a host int; ``update`` returns the filled prefix
  (talker and code predictor on the eager path, where every parity row runs).
- :class:`StaticKVCache`: the same buffers with the fill position a device tensor; ``update`` returns the whole
  capacity and the caller masks the unfilled tail, so a decode step has fixed shapes and never syncs
  (:mod:`impl.fast_decode`: ``torch.compile(fullgraph=True)`` / CUDA graphs).
- :class:`SlidingKVCache`: the codec pre-transformer's window-bounded cache (72-frame sliding window), which
  keeps only the last ``window - 1`` positions (:mod:`impl.codec.streaming`).

Notation: B batch, K kv heads, T new positions, S capacity, D head dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class KVCache:
    """Keys/values for every layer: k, v (layers, B, K, S, D), or lists of per-layer (B, K, S, D) tensors (a
    :meth:`StaticKVCache.eager_view`, never grown); ``length`` positions filled.

    Passed into ``forward`` and advanced explicitly by the owner (``advance(T)`` after all layers ran), so a
    prefill and a one-token step go through the same code. ``limit`` is the most positions it may hold: a cache
    allocated below it (``allocate(..., initial=...)``) doubles its capacity when a write needs more, so a long
    generation budget does not cost its whole cache up front (at 0.6B fp32 a position is 229 KB per batch row).
    Growth is decided from host-side lengths only: no device sync.

    >>> c = KVCache.allocate(1, 1, 1, max_len=10, head_dim=2, device="cpu", dtype=torch.float32, initial=2)
    >>> _ = c.update(0, torch.ones(1, 1, 3, 2), torch.ones(1, 1, 3, 2)); c.advance(3); c.capacity
    4
    """

    k: torch.Tensor | list[torch.Tensor]
    v: torch.Tensor | list[torch.Tensor]
    length: int = 0
    limit: int | None = None  # None: fixed at the allocated capacity

    @classmethod
    def allocate(cls, n_layers: int, batch: int, n_kv_heads: int, max_len: int, head_dim: int,
                 device: torch.device | str, dtype: torch.dtype, initial: int | None = None) -> KVCache:
        """Room for ``max_len`` positions, allocated now, or ``initial`` now and grown up to ``max_len``."""
        cap = max_len if initial is None else max(1, min(initial, max_len))
        shape = (n_layers, batch, n_kv_heads, cap, head_dim)
        return cls(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype),
                   limit=max_len)

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2]

    def _grow(self, need: int) -> None:
        new = min(max(need, 2 * self.capacity), self.limit)
        pad = list(self.k.shape)
        pad[3] = new - self.capacity
        self.k = torch.cat((self.k, self.k.new_zeros(pad)), dim=3)
        self.v = torch.cat((self.v, self.v.new_zeros(pad)), dim=3)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k/v (B, K, T, D) at the current length; return all filled keys/values (B, K, length+T, D)."""
        t = k.shape[2]
        end = self.length + t
        if end > self.capacity and self.limit is not None and end <= self.limit:
            self._grow(end)
        if end > self.capacity:
            raise ValueError(f"KV cache full: {self.length} + {t} positions > capacity {self.capacity}")
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, t: int) -> None:
        self.length += t

    def reset(self) -> None:
        self.length = 0


class StaticKVCache:
    """Keys/values of every talker layer, one (B, K, S, D) tensor per layer in the lists ``k`` and ``v``, with the
    fill position ``pos`` a (1,) int64 device tensor. Same interface as :class:`KVCache` (``update``,
    ``advance``), but ``update`` returns the whole capacity: the caller masks the unfilled tail. Nothing here
    reads a value back to the host.

    One tensor per layer, not views of one (layers, B, K, S, D) buffer: under ``torch.compile`` a write into a
    view of a graph input is functionalised against the whole base, which can copy every layer's cache on each
    layer's write; a write into a tensor of its own copies at most that layer's. Measured on the 0.6B CPU bench:
    the compiled graph's own kernels went from 81 to 47-60 ms per frame."""

    def __init__(self, k: list[torch.Tensor], v: list[torch.Tensor]):
        self.k, self.v = list(k), list(v)
        self.pos = torch.zeros(1, dtype=torch.long, device=self.k[0].device)
        self._offsets = torch.arange(self.capacity, device=self.k[0].device)  # (S,) added to pos for a T-long write

    @classmethod
    def allocate(cls, n_layers: int, batch: int, n_kv_heads: int, capacity: int, head_dim: int,
                 device: torch.device | str, dtype: torch.dtype) -> StaticKVCache:
        shape = (batch, n_kv_heads, capacity, head_dim)
        return cls([torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)],
                   [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)])

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k/v (B, K, T, D) at positions ``pos .. pos+T-1``; return the full buffers (B, K, S, D)."""
        idx = self.pos + self._offsets[: k.shape[2]]  # (T,)
        self.k[layer].index_copy_(2, idx, k)
        self.v[layer].index_copy_(2, idx, v)
        return self.k[layer], self.v[layer]

    def advance(self, t: int) -> None:
        self.pos.add_(t)

    def eager_view(self) -> KVCache:
        """A host-position :class:`KVCache` over the same per-layer buffers, empty: the prefill runs the eager
        code on it."""
        return KVCache(self.k, self.v, 0)


@dataclass
class SlidingKVCache:
    """Keys/values of the last ``window - 1`` positions of every layer, (B, K, <= window-1, D) each.

    ``length`` counts all positions consumed (the absolute RoPE position of the next frame). ``update`` returns
    held + new keys for the layer; ``advance(T)`` (called once after all layers ran) drops what no future query
    can see: query at position p attends keys p-window+1 .. p, so window-1 past keys suffice.
    Used functionally: the pre-transformer works on ``copy()`` so a state passed in is never mutated.
    """

    window: int
    k: list[torch.Tensor | None]
    v: list[torch.Tensor | None]
    length: int = 0

    @classmethod
    def empty(cls, n_layers: int, window: int) -> SlidingKVCache:
        return cls(window, [None] * n_layers, [None] * n_layers)

    def copy(self) -> SlidingKVCache:
        return SlidingKVCache(self.window, list(self.k), list(self.v), self.length)

    @property
    def kept(self) -> int:
        """Past positions currently held (the same for every layer between calls)."""
        return 0 if self.k[0] is None else self.k[0].shape[2]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k/v (B, K, T, D) -> held + new (B, K, kept + T, D)."""
        if self.k[layer] is not None:
            k = torch.cat((self.k[layer], k), dim=2)
            v = torch.cat((self.v[layer], v), dim=2)
        self.k[layer], self.v[layer] = k, v  # untrimmed until advance()
        return k, v

    def advance(self, t: int) -> None:
        keep = self.window - 1

        def trim(x: torch.Tensor | None) -> torch.Tensor | None:
            # clone: a view of the last keys would pin the whole (possibly long) key tensor.
            return None if x is None else x[:, :, max(x.shape[2] - keep, 0):].clone()

        self.k = [trim(x) for x in self.k]
        self.v = [trim(x) for x in self.v]
        self.length += t
