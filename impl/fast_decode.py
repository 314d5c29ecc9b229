"""A static decode step: one whole frame (15 code-predictor steps, then one talker step and the choice of the next
group-0 token) as a fixed-shape, host-sync-free function that ``torch.compile(fullgraph=True)`` traces without a
graph break and that a ``torch.cuda.CUDAGraph`` captures once per (batch, capacity) bucket.

The eager loop (:class:`impl.generate.TalkerLoop`) stays the reference: every parity row runs on it, and this path
is proven equal to it (greedy codes exactly, fp32; ``parity_tests/test_fast_decode.py``). What changes here:

- The talker's KV cache has a fixed capacity and its fill position is a device tensor (:class:`StaticKVCache`);
  a decode step writes its key/value with ``index_copy_`` at that position and attends over the whole capacity
  under a mask ``key <= pos & not padding``, so every step has the same shapes. The prefill is the eager code
  itself, written through a :class:`impl.kv_cache.KVCache` view of the same buffers.
- The code predictor needs nothing new: its 16 positions are Python constants of the unrolled frame, so its small
  :class:`~impl.kv_cache.KVCache` (reset each frame) already has static shapes.
- The talker's logits processing runs on device with fixed shapes: the repetition penalty marks the ids seen in a
  full-length token buffer (``scatter_add`` of a validity mask, equal elementwise to HF's gather/scatter over the
  ``n`` tokens so far), ``min_new_tokens`` compares a device counter. Greedy only: a sampled fast path would draw
  a different random stream than the eager one (and upstream), so sampled generation stays on the eager loop.
- The host reads one flag per frame ("every row finished?"), as the eager loop does.

Modes: ``"eager"`` (the static step run op by op: the reference for the two below), ``"compile"``
(``torch.compile(fullgraph=True)``, inductor, any device), ``"cudagraph"`` (CUDA only: warm-up on a side stream,
then one ``torch.cuda.CUDAGraph`` per decoder; each frame is one ``replay()``).

Notation: B batch (bucket), S capacity (prompt + new tokens, rounded up), C talker hidden, G code groups (16),
V codec vocabulary.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .generate import GenerationResult, GenerationSettings, NonFiniteError
from .kv_cache import KVCache, StaticKVCache
from .layers import causal_mask, get_attention, get_linear_kernel
from .progress import ProgressFn
from .prompt import BatchPrompt
from .sampling import NEG_INF, PredictorChooser, margin, suppress, suppress_mask
from .talker import Talker, rope_positions

MODES = ("eager", "compile", "cudagraph", "compile-cudagraph")
CAPACITY_STEP = 128  # capacities are rounded up to a multiple of this, so one captured graph serves many lengths
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)  # a CUDA graph per bucket; a smaller batch fills up with finished rows


def round_capacity(n: int) -> int:
    return -(-n // CAPACITY_STEP) * CAPACITY_STEP


class StaticDecoder:
    """Preallocated state and the static frame step for one (batch, capacity) bucket.

    ``load(prompt, settings)`` resets the state and runs the eager prefill into the static buffers; iterating
    (:meth:`frames_iter`) runs one static frame per step; :meth:`result` cuts the rows like the eager loop. A decoder
    is reusable: the next ``load`` overwrites everything a step reads, and a captured graph keeps pointing at the
    same buffers.
    """

    def __init__(self, talker: Talker, batch: int, capacity: int, device: torch.device | str, dtype: torch.dtype,
                 mode: str = "eager", compile_backend: str = "inductor"):
        if mode not in MODES:
            raise ValueError(f"fast-decode mode {mode!r} is not one of {MODES}")
        device = torch.device(device)
        if "cudagraph" in mode and device.type != "cuda":
            raise ValueError(f"fast-decode mode {mode!r} needs a CUDA device, got {device}")
        tc = talker.cfg
        # The attention implementation is the talker's module setting (a constant of the compiled step); recorded
        # here so decoder_for never reuses a decoder built under another setting.
        self.talker, self.attn, self.mode = talker, get_attention(talker), mode
        self.B, self.S, self.G, self.V, self.C = batch, capacity, tc.num_code_groups, tc.vocab_size, tc.hidden_size
        self.eos = tc.codec_eos_token_id
        self.device, self.dtype = device, dtype
        B, S, G, C = self.B, self.S, self.G, self.C
        self.cache = StaticKVCache.allocate(tc.num_hidden_layers, B, tc.num_key_value_heads, S, tc.head_dim, device,
                                            dtype)
        cp = talker.code_predictor.allocate_cache(B, device, dtype)
        # Per-layer tensors of their own, as StaticKVCache's (a write into a view of one buffer compiles to a copy
        # of the whole buffer); its capacity is its limit, so it never grows.
        self.cp_cache = KVCache([x.clone() for x in cp.k], [x.clone() for x in cp.v], limit=cp.limit)
        self.key_valid = torch.ones(B, S, dtype=torch.bool, device=device)  # False on left padding
        self.key_index = torch.arange(S, device=device)  # (S,) key positions, also token slots
        self.deltas = torch.zeros(B, 1, dtype=torch.long, device=device)
        self.text_side = torch.zeros(B, S, C, dtype=dtype, device=device)  # trailing text, then tts_pad
        self.past_hidden = torch.zeros(B, 1, C, dtype=dtype, device=device)
        # One slot per sampled group-0 token (N <= S - L <= S, so S slots always suffice).
        self.tokens = torch.zeros(B, S, dtype=torch.long, device=device)
        self.frames = torch.zeros(B, S, G, dtype=torch.long, device=device)
        self.margins0 = torch.zeros(B, S, dtype=torch.float32, device=device)
        self.margins_cp = torch.zeros(B, S, G - 1, dtype=torch.float32, device=device)
        self.hiddens = torch.zeros(B, S, C, dtype=dtype, device=device)
        self.finished = torch.zeros(B, dtype=torch.bool, device=device)
        # Rows that went NaN/Inf (as the eager loop's flag): read with the per-frame finished flag, one int.
        self.nonfinite = torch.zeros(B, dtype=torch.bool, device=device)
        self.n = torch.zeros(1, dtype=torch.long, device=device)  # tokens sampled so far
        self.suppress = suppress_mask(self.V, self.eos, device)
        self.eos_onehot = torch.zeros(self.V, dtype=torch.bool, device=device)
        self.eos_onehot[self.eos] = True
        self.penalty, self.min_new = 1.0, 0
        self.chooser = PredictorChooser(GenerationSettings.greedy().predictor, None)
        self.settings: GenerationSettings | None = None
        self.n_host = 0
        self.n_real = B
        self.lengths: list[int] = []
        self._step = self._frame
        self._graph = None
        if mode.startswith("compile"):
            # Inductor kernels; with "compile-cudagraph" they are then captured into one CUDA graph (_capture).
            # ``fullgraph=True``: a graph break raises instead of silently splitting the step (the capturability
            # test runs ``compile_backend="aot_eager"``: the same full trace without inductor's C++ build).
            self._step = torch.compile(self._frame, fullgraph=True, dynamic=False, backend=compile_backend)

    # -- the static step -------------------------------------------------------------------------------------

    def _choose(self, logits: torch.Tensor, hidden_last: torch.Tensor) -> None:
        """Process the group-0 logits (B, V) with fixed shapes, pick t_{n+1} greedily, record it."""
        self.nonfinite.logical_or_(~(torch.isfinite(logits).all(-1) & torch.isfinite(hidden_last).all(-1))
                                   & ~self.finished)
        scores = logits.float()  # HF upcasts before the processors
        if self.penalty != 1.0:
            valid = (self.key_index < self.n).long().expand(self.B, -1)  # (B, S): slots holding a sampled token
            seen = torch.zeros_like(scores, dtype=torch.long).scatter_add(1, self.tokens, valid) > 0  # (B, V)
            # Same expression as sampling.repetition_penalty, applied to every id seen (each once).
            scores = torch.where(seen, torch.where(scores < 0, scores * self.penalty, scores / self.penalty), scores)
        if self.min_new > 0:
            scores = scores.masked_fill(self.eos_onehot & (self.n < self.min_new), NEG_INF)
        scores = suppress(scores, self.suppress)
        tok = torch.argmax(scores, dim=-1)  # (B,)
        tok = torch.where(self.finished, torch.full_like(tok, self.eos), tok)
        self.tokens.index_copy_(1, self.n, tok[:, None])
        self.margins0.index_copy_(1, self.n, margin(scores)[:, None])
        self.hiddens.index_copy_(1, self.n, hidden_last[:, None])
        self.finished.logical_or_(tok == self.eos)
        self.n.add_(1)

    def _frame(self) -> torch.Tensor:
        """One frame: groups 1..15 for token t_k (k = n-1), the talker step on that frame, token t_{k+1}.
        Shapes never change and nothing syncs with the host; returns :meth:`_flags` as a device tensor."""
        t = self.talker
        k = self.n - 1  # (1,) frame index
        tok = self.tokens.index_select(1, k)[:, 0]  # (B,)
        c0_embed = t.embed_codec(tok[:, None])  # (B, 1, C)
        fc = t.code_predictor.generate_frame(self.past_hidden, c0_embed, self.cp_cache, self.chooser)
        frame = torch.cat((tok[:, None], fc.codes), dim=1)  # (B, G)
        self.frames.index_copy_(1, k, frame[:, None])
        self.margins_cp.index_copy_(1, k, fc.margins[:, None])
        self.nonfinite.logical_or_(torch.isnan(fc.margins).any(-1) & ~self.finished)  # NaN scores, NaN margins
        x = t.frame_embedding(frame) + self.text_side.index_select(1, k)  # (B, 1, C)
        pos = self.cache.pos  # (1,) keys already cached = this token's cache slot
        positions = (pos + self.deltas)[None].expand(3, -1, -1)  # (3, B, 1): M-RoPE rows, equal in inference
        allowed = (self.key_index <= pos)[None] & self.key_valid  # (B, S)
        zero = torch.zeros((), dtype=x.dtype, device=x.device)
        mask = torch.where(allowed, zero, torch.finfo(x.dtype).min)[:, None, None, :]  # (B, 1, 1, S)
        out = t(x, positions, mask, self.cache)
        self.past_hidden.copy_(out.hidden[:, -1:])
        self._choose(out.logits[:, -1], out.hidden[:, -1])
        return self._flags()

    def _flags(self) -> torch.Tensor:
        """(1 if every row finished) + (2 if a row went non-finite), as one device int."""
        return self.finished.all().int() + 2 * self.nonfinite.any().int()

    # -- CUDA graph ------------------------------------------------------------------------------------------

    def _capture(self) -> None:
        """Warm up on a side stream (allocator, cuBLAS workspaces, compilation), then capture one frame. The
        state the warm-up and the capture advance is restored by the caller."""
        self.n.fill_(1)
        self.cache.pos.zero_()
        s = torch.cuda.Stream(self.device)
        s.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(s):
            for _ in range(2):
                self.n.fill_(1)
                self.cache.pos.zero_()
                self._step()
        torch.cuda.current_stream(self.device).wait_stream(s)
        self.n.fill_(1)
        self.cache.pos.zero_()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._step()
        self._graph = graph

    # -- driving ---------------------------------------------------------------------------------------------

    def load(self, prompt: BatchPrompt, settings: GenerationSettings) -> None:
        """Reset the state for ``prompt`` and run the prefill (the eager code, on the static buffers)."""
        for name, cfg in (("talker", settings.talker), ("predictor", settings.predictor)):
            if cfg.do_sample:
                raise ValueError(f"the fast decode path is greedy only ({name} do_sample=True); sampled "
                                 "generation runs on the eager loop")
        if settings.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        b, L, C = prompt.embeds.shape
        N = settings.max_new_tokens
        if b > self.B or L + N > self.S:
            raise ValueError(f"prompt batch {b} x ({L} + {N} tokens) does not fit this decoder's bucket "
                             f"{self.B} x {self.S}")
        # Settings that shape the graph are fixed per decoder (a change means a new decoder / capture).
        pen, mn = float(settings.talker.repetition_penalty), int(settings.talker.min_new_tokens)
        if self.settings is not None and (pen, mn) != (self.penalty, self.min_new) and self.mode != "eager":
            raise ValueError("repetition_penalty / min_new_tokens differ from the ones this decoder was built for")
        self.penalty, self.min_new, self.settings = pen, mn, settings
        self.lengths, self.n_real, self.N, self.L = list(prompt.lengths), b, N, L
        embeds, amask, trailing = prompt.embeds, prompt.attention_mask, prompt.trailing
        if b < self.B:  # bucket filler rows: copies of row 0, finished from the start, dropped from the result
            pad = self.B - b
            embeds = torch.cat((embeds, embeds[:1].expand(pad, -1, -1)))
            amask = torch.cat((amask, amask[:1].expand(pad, -1)))
            trailing = torch.cat((trailing, trailing[:1].expand(pad, -1, -1)))
        self.key_valid.fill_(True)
        self.key_valid[:, :L] = amask.bool()
        Lt = min(trailing.shape[1], self.S)
        self.text_side.copy_(prompt.tts_pad.expand(self.B, self.S, -1))
        self.text_side[:, :Lt] = trailing[:, :Lt]
        self.tokens.zero_()
        self.frames.zero_()
        self.finished.zero_()
        self.finished[b:] = True
        self.nonfinite.zero_()
        self.n.zero_()
        # Prefill: exactly the eager loop's (same mask, same cache writes, same S = L keys).
        positions, deltas = rope_positions(amask)  # (3, B, L), (B, 1)
        self.deltas.copy_(deltas)
        key_padding = self.key_valid.long() if prompt.has_padding else None
        mask = causal_mask(L, L, embeds.dtype, embeds.device, key_padding)
        out = self.talker(embeds, positions, mask, self.cache.eager_view())
        self.cache.pos.fill_(L)
        self.past_hidden.copy_(out.hidden[:, -1:])
        self._choose(out.logits[:, -1], out.hidden[:, -1])
        self.n_host = 1
        if "cudagraph" in self.mode and self._graph is None:
            # Capture needs valid state; it runs frames on a scratch copy of what the prefill just wrote.
            saved = [x.clone() for x in self._state()]
            self._capture()
            for x, s in zip(self._state(), saved):
                x.copy_(s)

    def _state(self) -> list[torch.Tensor]:
        return [*self.cache.k, *self.cache.v, self.cache.pos, self.past_hidden, self.tokens, self.frames,
                self.margins0, self.margins_cp, self.hiddens, self.finished, self.nonfinite, self.n]

    def step(self) -> None:
        if self._graph is not None:
            self._graph.replay()
        else:
            self._step()
        self.n_host += 1

    def frames_iter(self) -> Iterator[int]:
        """Run frames until every row finished or the budget is spent; yields each new frame's index (its codes
        are in ``self.frames[:, k]``). One host read per frame: the ``finished`` flag."""
        while self.n_host < self.N and not self._stop():
            k = self.n_host - 1
            self.step()
            yield k
        if self.n_host >= self.N:
            self._stop()  # the budget ended the loop: one last look at the non-finite flag

    def _stop(self) -> bool:
        state = int(self._flags())  # the one host sync per frame
        if state & 2:
            rows = self.nonfinite[: self.n_real].nonzero().flatten().tolist()
            raise NonFiniteError(
                f"generation stopped at frame {self.n_host - 1}: non-finite (NaN/Inf) logits, hidden states or "
                f"code-predictor scores in item(s) {rows}; the weights or the inputs hold NaN/Inf, so no audio is made")
        return bool(state & 1)

    def result(self) -> GenerationResult:
        """Rows cut at their first EOS, as :meth:`impl.generate.TalkerLoop.result`."""
        n = self.n_host
        n_frames = n - 1
        b = self.n_real
        is_eos = self.tokens[:b, :n] == self.eos  # (b, n)
        first = torch.where(is_eos.any(1), is_eos.int().argmax(1), torch.full_like(is_eos[:, 0], n, dtype=torch.long))
        margins = torch.cat((self.margins0[:, :, None], self.margins_cp), dim=2)  # (B, S, G)
        codes, hidden, reasons, margs = [], [], [], []
        for i, f in enumerate(first.tolist()):  # one sync, after the loop
            length = min(f, n_frames)
            reasons.append("eos" if f < n else "budget")
            codes.append(self.frames[i, :length].clone())
            hidden.append(self.hiddens[i, :length].clone())
            margs.append(margins[i, :length].clone())
        return GenerationResult(codes, hidden, reasons, margs, n, self.lengths)


_DECODERS: dict[tuple, StaticDecoder] = {}  # least recently used first
# Decoders kept across calls: each holds its talker, its KV buffers and its compiled step / graphs, so an unbounded
# cache would keep every model and bucket ever used alive for the life of the process.
MAX_DECODERS = 4


def clear_decoders() -> None:
    """Drop every cached decoder (their buffers, compiled steps and graphs)."""
    _DECODERS.clear()


def decoder_for(talker: Talker, prompt: BatchPrompt, settings: GenerationSettings, mode: str = "eager",
                batch_bucket: int | None = None) -> StaticDecoder:
    """A decoder for this prompt's bucket, reused across calls (so a compiled step or a captured graph is built
    once per (talker, its attention and linear-kernel settings, batch bucket, capacity bucket, dtype, mode, settings))."""
    b, L, _ = prompt.embeds.shape
    if batch_bucket is None and "cudagraph" in mode:
        batch_bucket = next((x for x in BATCH_BUCKETS if x >= b), b)
    B = max(batch_bucket or b, b)
    S = round_capacity(L + settings.max_new_tokens)
    key = (id(talker), B, S, prompt.embeds.device, prompt.embeds.dtype, get_attention(talker),
           get_linear_kernel(talker), mode, settings.talker.repetition_penalty, settings.talker.min_new_tokens)
    dec = _DECODERS.pop(key, None)
    if dec is None or dec.talker is not talker:
        while len(_DECODERS) >= MAX_DECODERS:
            _DECODERS.pop(next(iter(_DECODERS)))  # the least recently used
        dec = StaticDecoder(talker, B, S, prompt.embeds.device, prompt.embeds.dtype, mode)
    _DECODERS[key] = dec  # now the most recently used
    return dec


def generate_fast(talker: Talker, prompt: BatchPrompt, settings: GenerationSettings,
                  mode: str = "eager", progress: ProgressFn | None = None) -> GenerationResult:
    """Greedy generation on the static step; the same result as :func:`impl.generate.generate` (codes exactly
    equal in fp32). ``progress(done, budget)`` after every frame, as there."""
    dec = decoder_for(talker, prompt, settings, mode)
    dec.load(prompt, settings)
    for k in dec.frames_iter():
        if progress is not None:
            progress(k + 1, settings.max_new_tokens - 1)
    return dec.result()
