"""Boundary values of the engine's checks and defaults, each on both sides of the line.

Found by generated mutants (``python -m parity_tests.mutants``): each of these boundaries moved by one, or this
default changed, and no test failed, because every caller passed values far from the edge. A tool test (runs on
the tiny preset): the values are the checks' own, not the weights'.
"""

from __future__ import annotations

import json

import pytest
import torch

from impl.codec.encoder import CodecEncoder
from impl.config import SpeechTokenizerConfig
from impl.generate import GenerationSettings, check_frame_budget, generate
from impl.prompt import build
from impl.sampling import check_sampling_value

from .helpers import load_model
from .helpers_codec import load_codec


@pytest.mark.parametrize("value", [1.0, 0.5, 1e-3])
def test_repetition_penalty_in_zero_one_is_accepted(value):
    """Upstream applies any penalty > 0 (1 turns it off, below 1 favours repeats): ours accepts (0, 1] too."""
    check_sampling_value("repetition_penalty", value)


@pytest.mark.parametrize("value", [0, 0.0, -1.0])
def test_repetition_penalty_at_or_below_zero_is_refused(value):
    with pytest.raises(ValueError, match=r"repetition_penalty .*> 0"):
        check_sampling_value("repetition_penalty", value)


def test_frame_budget_edges():
    """``max_new_frames`` in [1, max_positions - 1]: both ends accepted, one past each refused."""
    assert check_frame_budget(1, 64) == 1
    assert check_frame_budget(63, 64) == 63
    for bad in (0, 64):
        with pytest.raises(ValueError, match=rf"max_new_frames {bad} is out of range: must be in \[1, 63\]"):
            check_frame_budget(bad, 64)


def test_encoder_valid_quantizers_edges(checkpoint_dir):
    """The encoder keeps 1 to num_quantizers codebooks: both ends build, 0 and one too many are refused."""
    cfg = SpeechTokenizerConfig.from_file(checkpoint_dir("base") / "speech_tokenizer" / "config.json").encoder_config
    n = cfg.num_quantizers
    for ok in (1, n):
        assert CodecEncoder(cfg, ok).valid_quantizers == ok
    for bad in (0, n + 1):
        with pytest.raises(ValueError, match=rf"valid_quantizers {bad} not in \[1, {n}\]"):
            CodecEncoder(cfg, bad)


def test_chunked_decode_starts_at_frame_zero_by_default(checkpoint_dir):
    """``chunked_decode(codes)`` decodes from the first frame: within one chunk it is the one-shot decode."""
    ckpt = checkpoint_dir("base")
    dec = load_codec(ckpt).decoder
    st_cfg = json.loads((ckpt / "speech_tokenizer" / "config.json").read_text())
    Q = dec.cfg.num_quantizers
    codes = torch.randint(0, st_cfg["decoder_config"]["codebook_size"], (1, Q, 6),
                          generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(dec.chunked_decode(codes), dec(codes))


def test_fast_decode_with_a_one_frame_budget(checkpoint_dir):
    """The static step accepts the smallest budget, one token, and gives the eager loop's codes."""
    tts = load_model(checkpoint_dir("custom_voice"), "cpu", torch.float32, "sdpa")
    settings = GenerationSettings.greedy(1)
    with torch.inference_mode():
        prompt = build(tts.talker, tts.config, tts.requests(["Hi."], mode="custom_voice", speaker=tts.speakers[0],
                                                          language="english"))
        eager = generate(tts.talker, prompt, settings, None)
        fast = generate(tts.talker, prompt, settings, None, fast="eager")
    assert [c.shape for c in fast.codes] == [c.shape for c in eager.codes]
    assert all(torch.equal(f, e) for f, e in zip(fast.codes, eager.codes))
    assert fast.stop_reason == eager.stop_reason and fast.n_tokens == eager.n_tokens
