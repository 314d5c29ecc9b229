"""Long work says what it is doing (issue 19): generation progress (API callback, ``progress=True``, the CLI's
stderr line), budgets far from what the text warrants said before generation starts, and a long ICL reference
whose dropped audio is never decoded, with the kept audio bit-identical to the full decode's.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch

from impl import Qwen3TTS
from impl.__main__ import main as impl_main
from impl.generate import GenerationResult, default_frame_budget
from impl.model import BudgetWarning
from impl.progress import ProgressLine, resolve_progress
from impl.prompt import assistant_text
from reports.compare import compare_exact

SURFACE = "Python API"
CV = dict(speaker="ryan", language="english", greedy=True)
_MODELS: dict[tuple[str, str | None], Qwen3TTS] = {}


def model(checkpoint_dir, variant: str, fast: str | None = None) -> Qwen3TTS:
    if (variant, fast) not in _MODELS:
        _MODELS[variant, fast] = Qwen3TTS.from_pretrained(checkpoint_dir(variant), attn="eager", fast=fast)
    return _MODELS[variant, fast]


# ------------------------------------------------------------------------------------------ progress callbacks


@pytest.mark.parametrize("how", ["generate_codes", "stream", "fast"])
def test_progress_callback_counts_every_frame(how, checkpoint_dir):
    """``progress(done, budget)`` is called once per frame, done = 1..frames, budget = max_new_frames, on the eager
    loop, the streaming loop and the static decode step alike; the codes are the same as without it."""
    tts = model(checkpoint_dir, "custom_voice", "eager" if how == "fast" else None)
    calls: list[tuple[int, int]] = []
    kw = dict(CV, max_new_frames=5)
    if how == "stream":
        chunks = list(tts.stream("Hello there.", chunk_frames=2, progress=lambda d, b: calls.append((d, b)), **kw))
        frames = sum(len(c) for c in chunks) // 1920
    else:
        res = tts.generate_codes("Hello there.", progress=lambda d, b: calls.append((d, b)), **kw)
        frames = res.codes[0].shape[0]
        assert torch.equal(res.codes[0], tts.generate_codes("Hello there.", **kw).codes[0])
    assert frames >= 1 and calls == [(k, 5) for k in range(1, frames + 1)], calls


def test_progress_true_writes_one_line_to_stderr(checkpoint_dir, capsys):
    tts = model(checkpoint_dir, "custom_voice")
    capsys.readouterr()
    res = tts.generate_codes("Hello there.", progress=True, **CV, max_new_frames=4)
    err = capsys.readouterr().err.splitlines()
    n = res.codes[0].shape[0]
    # Not a terminal: the first frame's line at once, then (a short run) only the final count.
    assert err[0] == "generating: 1/4 frames (25%), 0.1 s of audio"
    assert err[-1] == f"generating: {n}/4 frames ({100 * n // 4}%), {n / 12.5:.1f} s of audio" and len(err) <= 2


def test_progress_argument_is_checked(checkpoint_dir, bad_input):
    tts = model(checkpoint_dir, "custom_voice")
    with pytest.raises(ValueError) as e:
        tts.generate_codes("Hi.", progress="yes", **CV, max_new_frames=2)
    msg = str(e.value)
    assert msg == "progress 'yes' is not True, False, None or a callable(done, budget)"
    bad_input("progress='yes'", "one-line ValueError", msg, SURFACE)
    assert resolve_progress(None) == (None, None) and resolve_progress(False) == (None, None)


def test_progress_line_on_a_terminal_and_in_a_log(monkeypatch):
    """A terminal gets one line redrawn in place and ended by a newline; a log gets whole lines, none before the
    delay and at most one per log interval, then the final count."""
    import impl.progress as progress

    now = [100.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: now[0])
    tty = io.StringIO()
    p = ProgressLine(tty, tty=True)
    for k in range(1, 4):
        p(k, 10)
        now[0] += 0.06  # faster than the redraw interval (0.1 s): frame 2 is skipped
    p.close()
    assert tty.getvalue() == ("\rgenerating: 1/10 frames (10%), 0.1 s of audio\x1b[K"
                              "\rgenerating: 3/10 frames (30%), 0.2 s of audio\x1b[K\n")
    log = io.StringIO()
    p = ProgressLine(log, delay=5.0, tty=False)
    for k in range(1, 31):
        p(k, 100)
        now[0] += 1.0  # one frame a second: silent for 5 s, then a line every 10 s
    p.close()
    assert log.getvalue().splitlines() == [f"generating: {k}/100 frames ({k}%), {k / 12.5:.1f} s of audio"
                                           for k in (6, 16, 26, 30)]
    quiet = io.StringIO()
    p = ProgressLine(quiet, delay=5.0, tty=False)
    p(1, 10)
    p.close()
    assert quiet.getvalue() == ""  # a run shorter than the delay says nothing


def test_cli_progress_line_after_the_delay(checkpoint_dir, tmp_path, capsys, monkeypatch):
    """The CLI's progress goes to stderr once generation has run PROGRESS_DELAY_S (0 here); the default delay
    keeps a short run's stderr to its usual lines (every test_bad_input_cli.py case asserts that)."""
    import impl.__main__ as cli

    monkeypatch.setattr(cli, "PROGRESS_DELAY_S", 0.0)
    capsys.readouterr()
    rc = impl_main(["synthesize", "--model", str(checkpoint_dir("custom_voice")), "--out", str(tmp_path / "o.wav"),
                    "--text", "Hello there.", "--speaker", "ryan", "--greedy", "--max-new-frames", "3"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    frames = int(cap.out.split(": ")[1].split()[0])
    lines = [ln for ln in cap.err.splitlines() if ln.startswith("generating:")]
    assert lines[0] == "generating: 1/3 frames (33%), 0.1 s of audio"
    assert lines[-1].startswith(f"generating: {frames}/3 frames")


# ------------------------------------------------------------------------------------------ budgets


def _stop_before_generation(monkeypatch):
    """Generation raises at once: what was said before it is all a test sees (and no frame is spent)."""
    import impl.model

    class Started(Exception):
        pass

    def started(*a, **k):
        raise Started

    monkeypatch.setattr(impl.model, "generate", started)  # generate_codes / synthesize
    monkeypatch.setattr(impl.model, "TalkerLoop", started)  # stream
    return Started


def test_budget_far_above_the_text_is_said_before_generation(checkpoint_dir, monkeypatch, bad_input):
    tts = model(checkpoint_dir, "custom_voice")
    n_tok = len(tts.tokenizer.encode(assistant_text("Hi.")))  # the prompt's text ids, as the budget counts them
    warranted = default_frame_budget(n_tok)
    started = _stop_before_generation(monkeypatch)
    with pytest.warns(BudgetWarning) as w, pytest.raises(started):
        tts.generate_codes("Hi.", **CV, max_new_frames=5000)
    msg = str(w[0].message)
    assert msg == (f"max_new_frames 5000 is far above what the text warrants (75 + 15 x {n_tok} text tokens = "
                   f"{warranted} frames): a model that never emits EOS runs all 5000 frames (400 s of audio)"), msg
    with pytest.warns(BudgetWarning), pytest.raises(started):
        next(tts.stream("Hi.", **CV, max_new_frames=5000))
    bad_input("max_new_frames=5000 for a 3-character text", "handled: BudgetWarning before generation", msg,
              SURFACE)
    with warnings.catch_warnings():
        warnings.simplefilter("error", BudgetWarning)  # within 2x of the text's budget: nothing said
        with pytest.raises(started):
            tts.generate_codes("Hi.", **CV, max_new_frames=2 * warranted)


def test_long_text_capped_budget_is_said_before_generation(checkpoint_dir, monkeypatch, bad_input):
    """A 10k-character text with no max_new_frames: its default budget is cut by max_new_tokens (8192 in the
    checkpoint's generation_config.json): said once, before the (long) run."""
    tts = model(checkpoint_dir, "custom_voice")
    cap = tts.generation_config.get("max_new_tokens", 2048) - 1
    started = _stop_before_generation(monkeypatch)
    text = ("The quick brown fox jumps over the lazy dog. " * 230)[:10_000]
    with pytest.warns(BudgetWarning) as w, pytest.raises(started):
        tts.generate_codes(text, speaker="ryan", language="english", greedy=True)
    msg = str(w[0].message)
    assert "more than max_new_tokens allows" in msg and f"up to {cap} frames" in msg, msg
    assert f"({cap / 12.5:.0f} s of audio)" in msg and "split the text, or pass max_new_frames" in msg
    bad_input("10k-character text, no max_new_frames", "handled: BudgetWarning before generation", msg, SURFACE)


def test_cli_budget_warning_is_one_line_before_generation(checkpoint_dir, tmp_path, capsys, monkeypatch,
                                                          bad_input):
    started = _stop_before_generation(monkeypatch)
    capsys.readouterr()
    with pytest.raises(started):
        impl_main(["synthesize", "--model", str(checkpoint_dir("custom_voice")), "--out", str(tmp_path / "o.wav"),
                   "--text", "Hi.", "--speaker", "ryan", "--greedy", "--max-new-frames", "5000"])
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("warning: max_new_frames 5000 is far above what the text warrants")
    assert list(tmp_path.iterdir()) == []
    bad_input("--max-new-frames 5000 for a 3-character text", "handled: one warning line before generation",
              err[0].removeprefix("warning: "), "python -m impl synthesize")


# ------------------------------------------------------------------------------------------ long ICL reference


def _icl_result(lengths: list[tuple[int | None, int]], seed: int = 0) -> GenerationResult:
    """A result of random codes: per item (reference frames or None, generated frames)."""
    g = torch.Generator().manual_seed(seed)
    codes = [torch.randint(0, 2048, (n, 16), generator=g) for _, n in lengths]
    refs = [torch.randint(0, 2048, (r, 16), generator=g) if r else None for r, _ in lengths]
    z = [torch.zeros(c.shape[0], 1) for c in codes]
    return GenerationResult(codes, z, ["eos"] * len(codes), z, 0, [0] * len(codes), refs)


def _full_decode_then_cut(tts: Qwen3TTS, res: GenerationResult) -> list[np.ndarray]:
    """Upstream's ICL decode (IM:614-633) without the shortcut: decode reference + new frames, cut the front."""
    seqs = [torch.cat([r, c]) if r is not None else c for r, c in zip(res.ref_codes, res.codes)]
    wavs = tts.codec.decode(seqs)
    return [w[int(r.shape[0] / s.shape[0] * len(w)):] if r is not None else w
            for w, r, s in zip(wavs, res.ref_codes, seqs)]


def _count_chunks(monkeypatch) -> list[int]:
    from impl.codec.decoder import CodecDecoder

    calls: list[int] = []
    orig = CodecDecoder.forward

    def counting(self, codes):
        calls.append(codes.shape[-1])
        return orig(self, codes)

    monkeypatch.setattr(CodecDecoder, "forward", counting)
    return calls


@pytest.mark.parametrize("lengths,chunks", [
    pytest.param([(45, 7)], (3, 1), id="one item: 2 of 3 chunks skipped"),
    pytest.param([(45, 7), (22, 9), (None, 4)], (3, 3), id="batch with an x-vector row: nothing skipped"),
    pytest.param([(45, 7), (22, 9)], (3, 2), id="batch: the chunk before both cuts skipped"),
])
def test_long_icl_reference_skips_dropped_chunks_bit_identically(lengths, chunks, checkpoint_dir, monkeypatch,
                                                                 record):
    """``Qwen3TTS.decode`` of an ICL result decodes only the chunks that reach the kept audio; the kept audio equals
    the full decode's, cut as upstream cuts it, bit for bit. Chunks of 20 frames (5 of context) stand in for
    upstream's 300 (25) so that batches take seconds; the real size is the next test."""
    import impl.codec.decoder as dec

    monkeypatch.setattr(dec, "DECODE_CHUNK_FRAMES", 20)
    monkeypatch.setattr(dec, "DECODE_LEFT_CONTEXT", 5)
    tts = model(checkpoint_dir, "base")
    res = _icl_result(lengths)
    calls = _count_chunks(monkeypatch)
    want = _full_decode_then_cut(tts, res)
    n_full = len(calls)
    got = tts.decode(res)
    assert (n_full, len(calls) - n_full) == chunks, calls
    for i, (g, w) in enumerate(zip(got, want)):
        r = record(compare_exact(f"icl_decode[{i}]", torch.from_numpy(g), torch.from_numpy(w)),
                   row="ICL decode skips the reference's chunks (kept audio bit-identical)",
                   component="Generation", variant="base", compares="ours vs ours",
                   notes="20-frame chunks, 5 of context")
        assert r, r.message
        assert len(g) == res.codes[i].shape[0] * 1920


def test_long_icl_reference_real_chunk_size(checkpoint_dir, monkeypatch, record):
    """The same at upstream's 300-frame chunks: a 650-frame reference (52 s) + 20 new frames decodes 1 chunk of 3
    (about 10 s on the tiny preset, most of it the full decode it is compared with)."""
    tts = model(checkpoint_dir, "base")
    res = _icl_result([(650, 20)])
    calls = _count_chunks(monkeypatch)
    want = _full_decode_then_cut(tts, res)
    n_full = len(calls)
    got = tts.decode(res)
    assert (n_full, len(calls) - n_full) == (3, 1), calls
    r = record(compare_exact("icl_decode[0]", torch.from_numpy(got[0]), torch.from_numpy(want[0])),
               row="ICL decode skips the reference's chunks (kept audio bit-identical)", component="Generation",
               variant="base", compares="ours vs ours", notes="300-frame chunks, 650 reference frames")
    assert r, r.message
