"""The autoregressive loop: talker prefill, then per frame (code predictor for groups 1..15, talker step).

Reproduces upstream's HF ``generate`` on the talker (M:2267 → ``GenerationMixin._sample`` with the talker's
``forward`` glue, M:1636) without HF:

    prefill(prompt)                          -> h_0, logits_0  -> process, choose t_1
    step k = 1, 2, ...:  frame_k = [t_k, predictor(h_{k-1}, E_0(t_k))]        (16 codes)
                         x_k = sum_g E_g(frame_k) + (trailing[k-1] or tts_pad)
                         talker(x_k)         -> h_k, logits_k  -> process, choose t_{k+1}
    stop when every row has sampled EOS, or after N = max_new_tokens sampled tokens.

So N tokens give N-1 frames (the last sampled token is never expanded), rows are cut at their first EOS, and a
row that never sampled EOS stops with reason ``"budget"``. Finished rows keep being fed EOS (HF pads finished rows
with ``pad_token_id``, which is EOS here) so the batch stays aligned; their frames are discarded.

Device discipline: all per-step state is preallocated on the model's device; the only host sync per frame is the
"all rows finished?" check (HF does the same). The same read-back carries a NaN check of the newest margins
(top1 - top2 of the talker's and the predictor's scores, already computed: NaN logits make NaN margins), so
non-finite logits raise :class:`NonFiniteError` within a frame at the cost of a few tiny ops, no extra sync: no
audio is made from nonsense. Without an explicit budget the model API caps frames by :func:`default_frame_budget`.
Positions for left-padded rows continue at ``cache_len + delta``.

Notation: B batch, L prompt length (padded), C talker hidden, G code groups (16), N token budget.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from . import taps
from .layers import causal_mask
from .progress import ProgressFn
from .prompt import BatchPrompt
from .sampling import PredictorChooser, SamplingConfig, choose, margin, process_talker, suppress_mask
from .talker import Talker, rope_positions, step_positions

# Default frame budget when the caller gives none: 6 s plus 1.2 s per prompt text token (about 4x a slow speaking
# rate: English and Chinese both run near 3 text tokens per second), capped by upstream's max_new_tokens. Upstream
# has no such cap (2048 tokens, ~164 s of audio, whatever the text): a model that never emits EOS would then run for
# minutes (hours at 1.7B on CPU). A run that hits it says ``stop=budget``.
BUDGET_BASE_FRAMES = 75
BUDGET_FRAMES_PER_TOKEN = 15
# Talker KV-cache room allocated before the first frame (~10 s of audio); it doubles on demand up to the budget.
CACHE_START_FRAMES = 128


def default_frame_budget(text_tokens: int) -> int:
    """Frames allowed for a prompt text of ``text_tokens`` ids when no ``max_new_frames`` is given."""
    return BUDGET_BASE_FRAMES + BUDGET_FRAMES_PER_TOKEN * max(int(text_tokens), 0)


def check_frame_budget(max_new_frames: object, max_positions: int) -> int:
    """``max_new_frames`` as an int in [1, max_positions - 1], or one ``ValueError`` line with the range."""
    if isinstance(max_new_frames, bool) or not isinstance(max_new_frames, int):
        raise ValueError(f"max_new_frames {max_new_frames!r} is not an integer")
    if not 1 <= max_new_frames < max_positions:
        raise ValueError(f"max_new_frames {max_new_frames} is out of range: must be in [1, {max_positions - 1}] "
                         f"(the talker's max_position_embeddings is {max_positions})")
    return max_new_frames


class NonFiniteError(RuntimeError):
    """Logits went NaN/Inf during generation (talker or code predictor): nothing of it may become audio."""


@dataclass(frozen=True)
class GenerationSettings:
    """Everything that decides the token choices. Defaults are upstream's (``generation_config.json`` values)."""

    talker: SamplingConfig = field(default_factory=lambda: SamplingConfig(repetition_penalty=1.05, min_new_tokens=2))
    predictor: SamplingConfig = field(default_factory=SamplingConfig)
    max_new_tokens: int = 2048  # sampled group-0 tokens, so at most max_new_tokens - 1 frames

    @classmethod
    def greedy(cls, max_new_tokens: int = 2048, repetition_penalty: float = 1.05) -> GenerationSettings:
        return cls(SamplingConfig(do_sample=False, repetition_penalty=repetition_penalty, min_new_tokens=2),
                   SamplingConfig(do_sample=False), max_new_tokens)


@dataclass
class GenerationResult:
    """Per item: codes (F_i, 16) int64, talker hidden (F_i, C) (the final-normed state that produced each frame's
    group-0 code), stop reason ``"eos"`` | ``"budget"``, margins (F_i, 16) top1-top2 of the processed scores behind
    every code (group 0 from the talker, 1..15 from the predictor). ``n_tokens`` = group-0 tokens sampled."""

    codes: list[torch.Tensor]
    hidden: list[torch.Tensor]
    stop_reason: list[str]
    margins: list[torch.Tensor]
    n_tokens: int
    prompt_lengths: list[int]
    ref_codes: list[torch.Tensor | None] | None = None  # ICL reference frames (decoded before the new ones)

    @property
    def budget_exhausted(self) -> list[bool]:
        return [r == "budget" for r in self.stop_reason]


def _set_tap_step(step: int) -> None:
    for rec in taps._ACTIVE:
        rec.step = step


class TalkerLoop:
    """One batched generation, iterable frame by frame (``for k in loop`` yields the index of each new frame in
    ``loop.frames``); :meth:`result` cuts the rows. Used by :func:`generate` and by streaming synthesis. The
    attention implementation is the talker's module setting (:func:`impl.layers.set_attention`)."""

    def __init__(self, talker: Talker, prompt: BatchPrompt, settings: GenerationSettings,
                 generator: torch.Generator | None = None, progress: ProgressFn | None = None):
        if settings.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        self.talker, self.prompt, self.settings, self.generator = talker, prompt, settings, generator
        self.progress = progress  # progress(frames done, frame budget) after every frame (impl.progress)
        tc = talker.cfg
        self.eos = tc.codec_eos_token_id
        dev, dtype = prompt.embeds.device, prompt.embeds.dtype
        B, L, C = prompt.embeds.shape
        N = settings.max_new_tokens
        G = tc.num_code_groups
        self.B, self.L, self.N, self.G = B, L, N, G
        # The prefill writes L positions, then one per decode step (at most N - 1). The budget N is often far
        # above what a text needs (75 + 15 x tokens frames by default): room for CACHE_START_FRAMES is allocated
        # now and the cache doubles as frames come.
        self.cache = talker.allocate_cache(B, L + N, dev, dtype, initial=L + min(N, CACHE_START_FRAMES))
        self.cp_cache = talker.code_predictor.allocate_cache(B, dev, dtype)
        self.key_padding = None
        if prompt.has_padding:
            self.key_padding = torch.ones(B, L + N, dtype=torch.long, device=dev)  # (B, S_max)
            self.key_padding[:, :L] = prompt.attention_mask
        self.suppress = suppress_mask(tc.vocab_size, self.eos, dev)
        self.chooser = PredictorChooser(settings.predictor, generator)
        self.tokens = torch.zeros(B, N, dtype=torch.long, device=dev)  # sampled group-0 tokens
        self.frames = torch.zeros(B, N, G, dtype=torch.long, device=dev)
        self.margins = torch.zeros(B, N, G, dtype=torch.float32, device=dev)
        self.hiddens = torch.zeros(B, N, C, dtype=dtype, device=dev)
        self.finished = torch.zeros(B, dtype=torch.bool, device=dev)
        self.n = 0  # tokens sampled so far

    def _choose_token(self, logits: torch.Tensor, hidden_last: torch.Tensor) -> None:
        """Process the group-0 logits (B, V), pick t_{n+1}, record it; finished rows get EOS."""
        n, cfg = self.n, self.settings.talker
        scores = process_talker(logits.float(), cfg, self.tokens[:, :n], n, self.eos, self.suppress)
        tok = choose(scores, cfg.do_sample, self.generator)
        tok = torch.where(self.finished, torch.full_like(tok, self.eos), tok)
        self.tokens[:, n] = tok
        self.margins[:, n, 0] = margin(scores)
        self.hiddens[:, n] = hidden_last
        self.finished |= tok == self.eos
        self.n = n + 1

    def __iter__(self) -> Iterator[int]:
        t, p = self.talker, self.prompt
        _set_tap_step(0)
        positions, deltas = rope_positions(p.attention_mask)  # (3, B, L), (B, 1)
        mask = causal_mask(self.L, self.L, p.embeds.dtype, p.embeds.device, self.key_padding)
        out = t(p.embeds, positions, mask, self.cache)
        past_hidden = out.hidden[:, -1:]  # (B, 1, C)
        self._choose_token(out.logits[:, -1], past_hidden[:, 0])
        Lt = p.trailing.shape[1]
        while self.n < self.N and not self._stop():  # the one host sync per frame
            k = self.n - 1  # frame index == upstream generation_step
            _set_tap_step(k + 1)
            tok = self.tokens[:, k]
            c0_embed = t.embed_codec(tok[:, None])  # (B, 1, C)
            fc = t.code_predictor.generate_frame(past_hidden, c0_embed, self.cp_cache, self.chooser)
            self.frames[:, k, 0] = tok
            self.frames[:, k, 1:] = fc.codes
            self.margins[:, k, 1:] = fc.margins
            if self.progress is not None:
                self.progress(k + 1, self.N - 1)  # host ints only: no sync
            yield k
            x = t.frame_embedding(self.frames[:, k])  # (B, 1, C)
            x = x + (p.trailing[:, k : k + 1] if k < Lt else p.tts_pad)  # text side: trailing text, then tts_pad
            S = self.cache.length + 1
            mask = causal_mask(1, S, x.dtype, x.device, self.key_padding)
            out = t(x, step_positions(self.cache.length, deltas), mask, self.cache)
            past_hidden = out.hidden[:, -1:]
            self._choose_token(out.logits[:, -1], past_hidden[:, 0])
        _set_tap_step(0)
        if self.n >= self.N:
            self._stop()  # the budget ended the loop: one last look at the newest margins

    def _stop(self) -> bool:
        """True when every row has finished; raises :class:`NonFiniteError` when the newest margins are NaN.

        Margins rows ``n-2`` (the predictor's groups 1..15 of the frame just made) and ``n-1`` (the talker's
        newest token) hold everything computed since the last check. A margin is NaN exactly when the scores
        behind it are (top1 - top2 of real scores is finite, or +inf when only one candidate survives). One host
        sync: both answers travel in one small int."""
        newest = self.margins[:, max(self.n - 2, 0) : self.n]  # (B, <=2, G)
        state = int(self.finished.all().int() + 2 * torch.isnan(newest).any().int())
        if state & 2:
            rows = torch.isnan(newest).flatten(1).any(1).nonzero().flatten().tolist()
            raise NonFiniteError(
                f"generation stopped at frame {self.n - 1}: non-finite (NaN/Inf) logits in item(s) {rows} "
                "(talker or code predictor); the weights or the inputs (reference audio, xvector) hold NaN/Inf, "
                "so no audio is made")
        return bool(state & 1)

    def result(self) -> GenerationResult:
        n_frames = self.n - 1
        is_eos = self.tokens[:, : self.n] == self.eos  # (B, n)
        first = torch.where(is_eos.any(1), is_eos.int().argmax(1), torch.full_like(is_eos[:, 0], self.n, dtype=torch.long))
        codes, hidden, reasons, margins = [], [], [], []
        for i, f in enumerate(first.tolist()):  # one sync, after the loop
            length = min(f, n_frames)
            reasons.append("eos" if f < self.n else "budget")
            codes.append(self.frames[i, :length].clone())
            hidden.append(self.hiddens[i, :length].clone())
            margins.append(self.margins[i, :length].clone())
        return GenerationResult(codes, hidden, reasons, margins, self.n, list(self.prompt.lengths))


def generate(talker: Talker, prompt: BatchPrompt, settings: GenerationSettings,
             generator: torch.Generator | None = None, *, fast: str | None = None,
             progress: ProgressFn | None = None) -> GenerationResult:
    """Run the loop to the end (see :class:`TalkerLoop`). ``fast`` (greedy only): run the static decode step of
    :mod:`impl.fast_decode` in that mode (``eager``, ``compile``, ``cudagraph``, ``compile-cudagraph``) instead;
    same codes, proven equal in ``parity_tests/test_fast_decode.py``. ``progress(done, budget)`` is called after
    every frame (:mod:`impl.progress`)."""
    if fast is not None:
        from .fast_decode import generate_fast

        return generate_fast(talker, prompt, settings, fast, progress=progress)
    loop = TalkerLoop(talker, prompt, settings, generator, progress)
    for _ in loop:
        pass
    return loop.result()
