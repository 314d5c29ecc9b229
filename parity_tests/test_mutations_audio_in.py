"""The audio-in rows can fail: deliberate bugs in the mel front end and the codec encoder must turn them red.

Each mutation is a bug a port could plausibly ship: a centred STFT or the wrong reflect padding in the mel, zero
padding in Mimi's downsample conv (it is the one REPLICATE-padded conv), and applying Mimi's 250-frame window
under eager attention (upstream ignores it there). The named row is re-run on the mutated ``impl`` against the
same upstream reference and must FAIL; a row the mutation cannot reach must stay green, so the red is the
mutation's doing.
"""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F

import impl.codec.encoder as codec_encoder
import impl.mel

from .helpers import mel_results
from .helpers_codec import (
    ENCODER_CASE,
    build_encoder,
    codes_results,
    run_end_to_end,
    seanet_results,
    transformer_results,
)

CASE = ENCODER_CASE


def _record(record, results, name: str, row: str, notes: str = "") -> None:
    for r in results:
        record(r, row=f"mutation {name} → {row}", component="Mutation self-test", variant="base", notes=notes,
               expect_fail=True)


def _mel_center(monkeypatch):
    orig = impl.mel.mel_spectrogram
    monkeypatch.setattr(impl.mel, "mel_spectrogram", lambda y, **kw: orig(y, **{**kw, "center": True}))


def _mel_pad_amount(monkeypatch):
    monkeypatch.setattr(impl.mel, "frame_padding", lambda n_fft=1024, hop=256: n_fft // 2)  # 512, not 384


def _mel_zero_pad(monkeypatch):
    shim = types.SimpleNamespace(pad=lambda x, p, mode="constant", value=None: F.pad(x, p, mode="constant"))
    monkeypatch.setattr(impl.mel, "F", shim)  # zeros instead of reflection at both ends


MEL_MUTATIONS = {"mel-center-true": _mel_center, "mel-pad-512": _mel_pad_amount, "mel-zero-pad": _mel_zero_pad}


@pytest.mark.mutation
@pytest.mark.parametrize("name", list(MEL_MUTATIONS))
def test_mel_mutation_turns_row_red(name, reference, monkeypatch, record):
    ref = reference("speaker_xvector", "base")
    assert all(mel_results(ref)), "the Mel spectrogram row must be green before the mutation"
    MEL_MUTATIONS[name](monkeypatch)
    red = mel_results(ref)
    _record(record, red, name, "Mel spectrogram")
    assert not all(red), f"mutation {name} left row 'Mel spectrogram' green: the harness cannot see this bug"


@pytest.mark.mutation
def test_downsample_zero_padding_turns_codes_red(checkpoint_dir, reference, monkeypatch, record):
    """Zero instead of replicate padding in the k4 s2 downsample: 'Mimi codes' red, 'Mimi SEANet' green."""
    ref = reference(CASE["sdpa"], "base")
    enc = build_encoder(checkpoint_dir("base"), attn="sdpa")
    monkeypatch.setattr(enc.downsample, "pad_mode", "constant")
    got, items = run_end_to_end(enc, ref, "sdpa")
    red = codes_results(ref, got, items)
    green = seanet_results(enc, ref, got)
    changed = [r.name for r in red if r.tier == "exact" and not r]
    _record(record, red, "downsample-zero-pad", "Mimi codes",
            notes=f"code tensors that changed: {changed or 'none (only the latents)'}")
    assert not all(red), "zero padding in the downsample left 'Mimi codes' green"
    assert all(green), "the downsample mutation also broke 'Mimi SEANet', which it cannot reach"


@pytest.mark.mutation
def test_window_under_eager_turns_transformer_red(checkpoint_dir, reference, monkeypatch, record):
    """The 250-frame window applied under eager (upstream ignores it there): 'Mimi transformer' red."""
    ref = reference(CASE["eager"], "base")
    monkeypatch.setitem(codec_encoder.WINDOW_BY_ATTN, "eager", "sliding")
    enc = build_encoder(checkpoint_dir("base"), attn="eager")
    got, items = run_end_to_end(enc, ref, "eager")
    red = transformer_results(enc, ref, got, "eager")
    green = seanet_results(enc, ref, got)
    _record(record, red, "window-under-eager", "Mimi transformer")
    assert not all(red), "applying the window under eager left 'Mimi transformer' green"
    assert all(green), "the window mutation also broke 'Mimi SEANet', which it cannot reach"
    assert torch.equal(got["speech_tokenizer.encoder.encoder:out"], ref.tap("speech_tokenizer.encoder.encoder:out"))
