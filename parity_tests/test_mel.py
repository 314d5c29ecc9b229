"""The log-mel front end (``impl/mel.py``) against upstream's ``mel_spectrogram`` and real librosa.

Row "Mel spectrogram": our mel of upstream's resampled clip (``speaker_encoder:wav24k`` of the ``speaker_xvector``
case) against the mel upstream fed its speaker encoder (``speaker_encoder:in``, (1, F, 128)), at ``op``.
The filterbank is compared with ``librosa.filters.mel`` (librosa is used only here, in tests). Property: the
frame law F = (N + 768 - 1024) // 256 + 1.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import impl.mel
from reports.compare import compare_exact
from reports.results import LIBROSA

from .helpers import mel_results
from .rows import assert_row

CASE = "speaker_xvector"


@pytest.fixture(scope="module")
def mel_ref(reference):
    return reference(CASE, "base")


def test_mel_spectrogram(mel_ref, device, record):
    results = mel_results(mel_ref, device)
    for r in results:
        record(r, row="Mel spectrogram", component="Speaker encoder", variant="base",
               notes=f"device {device}; reflect pad 384, n_fft 1024, hop 256, center=False")
    assert_row("Mel spectrogram", results)


def test_filterbank_matches_librosa(record):
    librosa = pytest.importorskip("librosa")
    ref = librosa.filters.mel(sr=24000, n_fft=1024, n_mels=128, fmin=0, fmax=12000)
    ours = impl.mel.mel_filterbank()
    r = compare_exact("mel filterbank (slaney)", torch.from_numpy(ours), torch.from_numpy(ref), axes=("mel", "bin"))
    record(r, row="Mel filterbank", component="Speaker encoder", notes="vs librosa.filters.mel", compares=LIBROSA)
    assert ours.dtype == np.float32 and r, r.message


@settings(max_examples=25, deadline=None, derandomize=True)
@given(n=st.integers(385, 60000))
def test_frame_law(n):
    """F = (N + 768 - 1024) // 256 + 1 (24000 samples -> 93 frames)."""
    y = torch.zeros(1, n)
    assert impl.mel.mel_spectrogram(y).shape == (1, 128, (n + 768 - 1024) // 256 + 1) == (1, 128, impl.mel.num_frames(n))


def test_short_input_error():
    with pytest.raises(ValueError, match="too short"):
        impl.mel.mel_spectrogram(torch.zeros(1, 384))


def test_dtype_and_device_agnostic(device):
    """bf16 input gives the fp32 mel of the bf16 values, on the input's device."""
    y = torch.randn(1, 6000, generator=torch.Generator().manual_seed(0)).clamp(-1, 1).to(device)
    a = impl.mel.mel_spectrogram(y.bfloat16())
    b = impl.mel.mel_spectrogram(y.bfloat16().float())
    assert a.dtype == torch.float32 and a.device == y.device
    torch.testing.assert_close(a, b, rtol=0, atol=0)
