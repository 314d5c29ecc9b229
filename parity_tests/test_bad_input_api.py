"""Bad input through the Python API (``Qwen3TTS``, ``impl.audio``): nonsense never becomes audio, ordinary mistakes
are one ``ValueError``/``RuntimeError`` line naming the value, and the documented input forms work.

Cases that need broken weights at run time (after the load-time checks) patch the loaded modules in memory and
restore them; each asserts the message first, then records it for the report's "Bad input" section.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from impl import Qwen3TTS
from impl.audio import AudioInputError, load_reference_audio, to_mono
from impl.generate import GenerationResult, NonFiniteError, default_frame_budget

SURFACE = "Python API"
_MODELS: dict[str, Qwen3TTS] = {}


def model(checkpoint_dir, variant: str) -> Qwen3TTS:
    if variant not in _MODELS:
        _MODELS[variant] = Qwen3TTS.from_pretrained(checkpoint_dir(variant), attn="eager")
    return _MODELS[variant]


def voice(n: int = 24000, sr: int = 24000) -> np.ndarray:
    t = np.arange(n) / sr
    return (0.3 * np.sin(2 * np.pi * 220 * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))).astype(np.float32)


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert msg and "\n" not in msg, f"not one line: {msg!r}"
    return msg


CV = dict(speaker="ryan", language="english", greedy=True)


def ICL(t: Qwen3TTS) -> dict:
    """ICL voice clone with a precomputed (zero) xvector: what a ref_codes case needs besides the codes."""
    return dict(xvector=torch.zeros(t.talker.cfg.hidden_size), ref_text="Reference words.", language="english",
                greedy=True, max_new_frames=2)


def _codes(frames: int, set_to: dict[tuple[int, int], int] | None = None) -> torch.Tensor:
    """Valid codes (frames, 16) with the given (frame, codebook) entries set to a value."""
    c = torch.randint(0, 2048, (frames, 16), generator=torch.Generator().manual_seed(frames))
    for (f, q), v in (set_to or {}).items():
        c[f, q] = v
    return c


def _result(codes: torch.Tensor, ref_codes: torch.Tensor | None = None) -> GenerationResult:
    """A one-item result as generate_codes returns it (what Qwen3TTS.decode reads: codes, ref_codes)."""
    z = torch.zeros(codes.shape[0], 1)
    return GenerationResult([codes], [z], ["eos"], [z], codes.shape[0] + 1, [0], [ref_codes])


# ------------------------------------------------------------------------------ ordinary mistakes -> one line

ERROR_CASES = [
    ("text None", "custom_voice", lambda t: t.generate_codes(None, **CV, max_new_frames=2), ValueError,
     "text must be a string or a non-empty list of strings, got NoneType"),
    ("text an empty list", "custom_voice", lambda t: t.generate_codes([], **CV, max_new_frames=2), ValueError,
     "got an empty list"),
    ("text a list holding a number", "custom_voice", lambda t: t.generate_codes(["hi", 3], **CV, max_new_frames=2),
     ValueError, "text item 1 is a int"),
    ("generate_codes(max_new_frames=0)", "custom_voice", lambda t: t.generate_codes("Hi.", **CV, max_new_frames=0),
     ValueError, "max_new_frames 0 is out of range"),
    ("stream(max_new_frames=0)", "custom_voice", lambda t: list(t.stream("Hi.", **CV, max_new_frames=0)),
     ValueError, "max_new_frames 0 is out of range"),
    ("max_new_frames=2.5", "custom_voice", lambda t: t.generate_codes("Hi.", **CV, max_new_frames=2.5),
     ValueError, "max_new_frames 2.5 is not an integer"),
    ("top_k=-3", "custom_voice", lambda t: t.generate_codes("Hi.", **CV, max_new_frames=2, top_k=-3), ValueError,
     "top_k -3 is not valid"),
    ("temperature=float('nan')", "custom_voice",
     lambda t: t.generate_codes("Hi.", **CV, max_new_frames=2, temperature=float("nan")), ValueError,
     "temperature nan is not valid"),
    ("ref_audio a URL", "base",
     lambda t: t.generate_codes("Hi.", ref_audio="https://example.com/a.wav", x_vector_only=True, greedy=True,
                                max_new_frames=2), AudioInputError, "no network I/O"),
    ("ref_audio=(wav, 0)", "base",
     lambda t: t.generate_codes("Hi.", ref_audio=(voice(), 0), x_vector_only=True, greedy=True, max_new_frames=2),
     AudioInputError, "sample rate 0 Hz is below 1000 Hz"),
    ("ref_audio with NaN samples", "base",
     lambda t: t.generate_codes("Hi.", ref_audio=(np.where(np.arange(24000) == 9, np.nan, voice()), 24000),
                                x_vector_only=True, greedy=True, max_new_frames=2), AudioInputError,
     "1 of 24000 samples are NaN or Inf"),
    ("ref_audio with Inf samples", "base",
     lambda t: t.generate_codes("Hi.", ref_audio=(np.where(np.arange(24000) == 9, np.inf, voice()), 24000),
                                x_vector_only=True, greedy=True, max_new_frames=2), AudioInputError,
     "NaN or Inf"),
    ("ref_audio a (2, 3, T) array", "base",
     lambda t: t.generate_codes("Hi.", ref_audio=(np.zeros((2, 3, 24000), np.float32), 24000),
                                x_vector_only=True, greedy=True, max_new_frames=2), AudioInputError,
     "expected a (T,), (T, C) or (C, T) array"),
    ("ref_audio of a 3-tuple", "base",
     lambda t: t.generate_codes("Hi.", ref_audio=[(voice(), 24000, "x")], x_vector_only=True, greedy=True,
                                max_new_frames=2), AudioInputError, "a (wav, sample_rate) pair"),
    ("xvector= holding NaN", "base",
     lambda t: t.generate_codes("Hi.", xvector=torch.full((t.talker.cfg.hidden_size,), float("nan")),
                                x_vector_only=True, greedy=True, max_new_frames=2), ValueError,
     "xvector (item 0): holds NaN/Inf"),
    ("xvector= of the wrong width", "base",
     lambda t: t.generate_codes("Hi.", xvector=torch.zeros(7), x_vector_only=True, greedy=True, max_new_frames=2),
     ValueError, "xvector (item 0): shape (7,)"),
    # issue 19: invisible text, seeds, code ranges
    ("text of only zero-width characters", "custom_voice",
     lambda t: t.generate_codes("\u200b\u200c\u200d\u2060\ufeff", **CV, max_new_frames=2), ValueError,
     "text item 0 is empty: it holds only invisible characters (U+200B ZERO WIDTH SPACE, U+200C ZERO WIDTH "
     "NON-JOINER, U+200D ZERO WIDTH JOINER, ...)"),
    ("text in a batch of only a BOM and a word joiner", "custom_voice",
     lambda t: t.generate_codes(["Hi.", "\ufeff \u2060"], **CV, max_new_frames=2), ValueError,
     "text item 1 is empty: it holds only invisible characters (U+2060 WORD JOINER, U+FEFF ZERO WIDTH NO-BREAK"),
    ("seed='abc'", "custom_voice", lambda t: t.generate_codes("Hi.", **CV, seed="abc", max_new_frames=2),
     ValueError, "seed 'abc' is not an integer"),
    ("stream(seed=1.5)", "custom_voice", lambda t: list(t.stream("Hi.", **CV, seed=1.5, max_new_frames=2)),
     ValueError, "seed 1.5 is not an integer"),
    ("seed=2**64", "custom_voice", lambda t: t.generate_codes("Hi.", **CV, seed=2**64, max_new_frames=2),
     ValueError, "seed 18446744073709551616 is out of range: must be in [-2**63, 2**64)"),
    ("ref_codes= with a code = codebook size", "base",
     lambda t: t.generate_codes("Hi.", ref_codes=_codes(20, {(7, 3): 2048}), **ICL(t)), ValueError,
     "ref_codes item 0, frame 7, codebook 3: code 2048 is out of range [0, 2048)"),
    ("ref_codes= holding -1", "base",
     lambda t: t.generate_codes("Hi.", ref_codes=_codes(20, {(19, 0): -1}), **ICL(t)), ValueError,
     "ref_codes item 0, frame 19, codebook 0: code -1 is out of range [0, 2048)"),
    ("ref_codes= of shape (20, 8)", "base",
     lambda t: t.generate_codes("Hi.", ref_codes=_codes(20)[:, :8], **ICL(t)), ValueError,
     "ref_codes (item 0): shape (20, 8) is not (frames, 16)"),
    ("ref_codes= of 0 frames", "base", lambda t: t.generate_codes("Hi.", ref_codes=_codes(0), **ICL(t)), ValueError,
     "ref_codes (item 0): 0 frames"),
    ("ref_codes= as floats", "base",
     lambda t: t.generate_codes("Hi.", ref_codes=_codes(20).float() + 0.5, **ICL(t)), ValueError,
     "ref_codes (item 0): dtype torch.float32 is not an integer dtype"),
    ("codec.decode() code = codebook size", "custom_voice",
     lambda t: t.codec.decode([_codes(6, {(2, 5): 2048})]), ValueError,
     "codes item 0, frame 2, codebook 5: code 2048 is out of range [0, 2048), or -1 for padding frames"),
    ("codec.decode() code 70000 in the 2nd item", "custom_voice",
     lambda t: t.codec.decode([_codes(6), _codes(4, {(3, 15): 70000})]), ValueError,
     "codes item 1, frame 3, codebook 15: code 70000 is out of range"),
    ("codec.decode() code -2", "custom_voice",
     lambda t: t.codec.decode(_codes(6, {(1, 0): -2})), ValueError,
     "codes item 0, frame 1, codebook 0: code -2 is out of range"),
    ("codec.decode() -1 inside a valid frame", "custom_voice",
     lambda t: t.codec.decode(_codes(6, {(4, 9): -1})[None]), ValueError,
     "codes item 0, frame 4: codebook 9 is -1 (padding) but codebook 0 holds"),
    ("codec.decode() a valid frame after -1 padding", "custom_voice",
     lambda t: t.codec.decode(torch.cat([_codes(2), torch.full((1, 16), -1), _codes(3)])[None]), ValueError,
     "codes item 0, frame 3: a valid frame after -1 padding at frame 2"),
    ("codec.decode() codes of shape (6, 8)", "custom_voice", lambda t: t.codec.decode([_codes(6)[:, :8]]),
     ValueError, "codes item 0: shape (6, 8) is not (frames, 16)"),
    ("codec.decode_oneshot() code = codebook size", "custom_voice",
     lambda t: t.codec.decode_oneshot(_codes(6, {(5, 1): 2048})), ValueError,
     "codes item 0, frame 5, codebook 1: code 2048 is out of range [0, 2048)"),
    ("codec.decoder.stream().push() code = codebook size", "custom_voice",
     lambda t: t.codec.decoder.stream().push(_codes(3, {(0, 2): 4096})), ValueError,
     "codes item 0, frame 0, codebook 2: code 4096 is out of range [0, 2048)"),
    ("Qwen3TTS.decode() of a result with a code = codebook size", "custom_voice",
     lambda t: t.decode(_result(_codes(4, {(1, 1): 2048}))), ValueError,
     "codes item 0, frame 1, codebook 1: code 2048 is out of range [0, 2048)"),
    ("Qwen3TTS.decode() of an ICL result whose reference holds 9999", "base",
     lambda t: t.decode(_result(_codes(4), _codes(8, {(6, 0): 9999}))), ValueError,
     "ref_codes item 0, frame 6, codebook 0: code 9999 is out of range [0, 2048)"),
]


@pytest.mark.parametrize("case,variant,call,exc,fragment", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_api_bad_input_is_one_line(case, variant, call, exc, fragment, checkpoint_dir, bad_input):
    tts = model(checkpoint_dir, variant)
    with pytest.raises(exc) as e:
        call(tts)
    msg = one_line(e)
    assert fragment in msg, msg
    bad_input(case, f"one-line {type(e.value).__name__}", msg, SURFACE)


def test_api_decode_of_padding_only_says_so(checkpoint_dir, bad_input):
    """Upstream's decode() returns 0 samples for an item of -1 padding frames without a word: here it warns."""
    tts = model(checkpoint_dir, "custom_voice")
    with pytest.warns(UserWarning) as w:
        wavs = tts.codec.decode(torch.full((1, 4, 16), -1))
    msgs = [str(x.message) for x in w]
    assert [len(x) for x in wavs] == [0] and msgs == ["codes item 0: all 4 frames are -1 padding, so its audio is "
                                                     "empty (0 samples)"], msgs
    bad_input("codec.decode() of all -1 codes", "handled: 0 samples, with a warning", msgs[0], SURFACE)
    with pytest.warns(UserWarning) as w:  # a padded batch: the empty row is named, the other decodes
        wavs = tts.codec.decode(torch.stack([_codes(3), torch.full((3, 16), -1)]))
    assert [len(x) for x in wavs] == [3 * 1920, 0] and "codes item 1: all 3 frames are -1 padding" in str(w[0].message)
    with pytest.warns(UserWarning, match="codes item 0: it has no frames"):
        assert [len(x) for x in tts.codec.decode([_codes(0)])] == [0]


def test_api_one_hz_reference_is_refused_fast(bad_input):
    """A 1 Hz clip used to hang in soxr's upsampling: now refused before resampling."""
    t0 = time.time()
    with pytest.raises(AudioInputError) as e:
        load_reference_audio((np.zeros(40, np.float32), 1))
    assert time.time() - t0 < 5 and "1 Hz is below 1000 Hz" in one_line(e)
    bad_input("ref_audio=(wav, 1) (1 Hz)", "one-line AudioInputError, no hang", one_line(e), SURFACE)


def test_api_bad_dtype_and_device_at_load(checkpoint_dir, bad_input):
    with pytest.raises(ValueError) as e:
        Qwen3TTS.from_pretrained(checkpoint_dir("custom_voice"), dtype=torch.int64)
    assert "is not a floating-point torch dtype" in one_line(e)
    bad_input("from_pretrained(dtype=torch.int64)", "one-line ValueError", one_line(e), SURFACE)


# ------------------------------------------------------------------------------ documented forms work


def test_api_ref_audio_pair_is_one_reference(checkpoint_dir, bad_input):
    """``ref_audio=(wav, sr)`` for one text is one reference (it used to be taken as a batch of two)."""
    tts = model(checkpoint_dir, "base")
    res = tts.generate_codes("Hi.", ref_audio=(voice(16000, 16000), 16000), x_vector_only=True, greedy=True,
                             max_new_frames=2)
    assert len(res.codes) == 1 and res.codes[0].shape[1] == 16
    bad_input("ref_audio=(wav, sr) with one text", "handled: one reference",
              f"{len(res.codes)} item, {res.codes[0].shape[0]} frames", SURFACE)


def test_api_int16_is_scaled_and_channels_first_is_mixed(bad_input):
    f = voice(4800, 24000)
    pcm = np.round(f * 32767).astype(np.int16)
    got = to_mono(pcm)
    # soundfile's own int16 -> float reading is the reference: x / 32768
    assert np.array_equal(got, (pcm.astype(np.float64) / 32768).astype(np.float32))
    assert np.abs(got - f).max() < 1e-4
    stereo_cf = np.stack([f, 0.5 * f])  # (2, T) channels first
    assert np.array_equal(to_mono(stereo_cf), to_mono(stereo_cf.T)) and to_mono(stereo_cf).shape == (4800,)
    u8 = np.array([0, 128, 255], np.uint8)
    assert np.allclose(to_mono(u8), [-1.0, 0.0, 127 / 128])
    bad_input("ref_audio int16 array", "handled: scaled by 1/32768 (as soundfile reads int16)",
              f"max |int16/32768 - float| = {np.abs(got - f).max():.1e}", SURFACE)
    bad_input("ref_audio (2, T) channels-first", "handled: channels averaged",
              f"shape {stereo_cf.shape} -> {to_mono(stereo_cf).shape}", SURFACE)


def test_api_default_budget_from_text_length(checkpoint_dir, monkeypatch, bad_input):
    """No max_new_frames: the budget follows the text, capped by upstream's max_new_tokens."""
    tts = model(checkpoint_dir, "custom_voice")
    assert tts.settings(greedy=True, text_tokens=10).max_new_tokens == default_frame_budget(10) + 1 == 226
    cap = tts.generation_config.get("max_new_tokens", 2048)  # upstream's own budget stays the cap
    assert tts.settings(greedy=True, text_tokens=10_000).max_new_tokens == cap
    assert tts.settings(greedy=True, max_new_frames=5, text_tokens=10).max_new_tokens == 6  # explicit wins
    import impl.generate as gen

    monkeypatch.setattr(gen, "BUDGET_BASE_FRAMES", 3)
    monkeypatch.setattr(gen, "BUDGET_FRAMES_PER_TOKEN", 0)
    res = tts.generate_codes("Hello there.", **CV)
    assert res.stop_reason == ["budget"] or res.codes[0].shape[0] < 3
    if res.stop_reason == ["budget"]:
        assert res.codes[0].shape[0] == 3
    bad_input("no max_new_frames (a model that may never stop)", "handled: default budget 75 + 15 x text tokens",
              f"10 text tokens -> {default_frame_budget(10)} frames; stop={res.stop_reason[0]}", SURFACE)


# ------------------------------------------------------------------------------ nonsense never becomes audio


def _poison(param: torch.nn.Parameter, value: float = float("nan")):
    saved = param.detach().clone()
    with torch.inference_mode():  # lazily loaded parts (codec, speaker encoder) hold inference tensors
        param.view(-1)[0] = value
    return saved


def _restore(param: torch.nn.Parameter, saved: torch.Tensor) -> None:
    with torch.inference_mode():
        param.copy_(saved)


@pytest.mark.parametrize("where", ["talker", "code_predictor"])
def test_api_nonfinite_during_generation_stops_with_an_error(where, checkpoint_dir, bad_input):
    """NaN reaching the logits (weights broken after loading, or overflow) stops generation with one line."""
    tts = model(checkpoint_dir, "custom_voice")
    p = (tts.talker.model.layers[0].mlp.down_proj.weight if where == "talker"
         else tts.talker.code_predictor.model.layers[0].mlp.down_proj.weight)
    saved = _poison(p)
    try:
        with pytest.raises(NonFiniteError) as e:
            tts.generate_codes("Hello there.", **CV, max_new_frames=4)
        with pytest.raises(NonFiniteError):
            list(tts.stream("Hello there.", **CV, max_new_frames=4))
    finally:
        _restore(p, saved)
    msg = one_line(e)
    assert "non-finite" in msg and "item(s) [0]" in msg and "no audio is made" in msg
    bad_input(f"NaN in the {where} at run time", "one-line NonFiniteError, no audio", msg, SURFACE)


def test_api_nan_speaker_encoder_gives_no_xvector(checkpoint_dir, bad_input):
    tts = model(checkpoint_dir, "base")
    p = next(tts.speaker_encoder.parameters())
    saved = _poison(p)
    try:
        with pytest.raises(ValueError) as e:
            tts.generate_codes("Hi.", ref_audio=(voice(), 24000), x_vector_only=True, greedy=True, max_new_frames=2)
    finally:
        _restore(p, saved)
    assert "xvector (item 0): holds NaN/Inf" in one_line(e)
    bad_input("NaN speaker encoder", "one-line ValueError", one_line(e), SURFACE)


def test_api_nan_codec_output_is_never_returned(checkpoint_dir, bad_input):
    tts = model(checkpoint_dir, "custom_voice")
    res = tts.generate_codes("Hi.", **CV, max_new_frames=2)
    p = next(tts.codec.decoder.parameters())
    saved = _poison(p)
    try:
        with pytest.raises(RuntimeError) as e:
            tts.decode(res)
    finally:
        _restore(p, saved)
    assert "NaN/Inf samples" in one_line(e)
    bad_input("NaN codec at run time", "one-line RuntimeError, no wav", one_line(e), SURFACE)


def test_api_generation_config_errors_name_the_file(checkpoint_dir, tmp_path, bad_input):
    src = checkpoint_dir("custom_voice")
    ck = tmp_path / "ck"
    ck.mkdir()
    for p in src.iterdir():
        if p.name != "generation_config.json":
            (ck / p.name).symlink_to(p)
    gen = json.loads((src / "generation_config.json").read_text())
    for key, value, frag in (("top_p", 1.5, "top_p 1.5 is not valid"), ("top_k", "ten", "top_k 'ten'"),
                             ("do_sample", "yes", "do_sample 'yes'")):
        (ck / "generation_config.json").write_text(json.dumps({**gen, key: value}))
        with pytest.raises(ValueError) as e:
            Qwen3TTS.from_pretrained(ck)
        msg = one_line(e)
        assert str(Path(ck) / "generation_config.json") in msg and frag in msg, msg
        bad_input(f"generation_config.json {key}: {value!r}", "one-line error naming the file",
                  msg.replace(str(tmp_path), "<tmp>"), SURFACE)
