"""Speaker encoder (``impl/speaker_encoder.py``) against upstream's ``Qwen3TTSSpeakerEncoder`` (Base only).

Reference case ``speaker_xvector``: a 3.2 s clip stored at 16 kHz, resampled and embedded by the calls upstream's
``create_voice_clone_prompt`` makes. Rows:

- "Speaker encoder blocks": each block (``blocks.0..3``, ``mfa``, ``asp``, ``fc``) fed upstream's recorded input
  (``block``), and the network from upstream's mel to the embedding (``stack``);
- "x-vector": our whole path from the stored 16 kHz clip (``impl.audio`` intake, ``impl.mel``, the network) to
  the (D,) x-vector (``stack``), with the resampled clip itself compared exactly on the way.

Plus the minimum-length guard, where upstream crashes inside a reflect pad.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from impl.audio import AudioTooShortError, load_reference_audio
from impl.config import Qwen3TTSConfig
from impl.loading import load_into, read_state_dict
from impl.speaker_encoder import SpeakerEncoder, extract_xvector, min_samples
from impl.taps import set_tap_paths
from reference_export.cases.speaker import block_names
from reports.compare import CompareResult, compare, compare_exact

from .rows import assert_row

CASE = "speaker_xvector"


def build_speaker_encoder(ckpt: Path, device: str = "cpu", dtype: torch.dtype = torch.float32) -> SpeakerEncoder:
    cfg = Qwen3TTSConfig.from_file(ckpt / "config.json")
    se = SpeakerEncoder(cfg.speaker_encoder_config)
    load_into(se, read_state_dict(ckpt, "speaker_encoder."), str(ckpt / "model.safetensors"), "speaker_encoder.")
    set_tap_paths(se, "speaker_encoder")
    return se.to(device=device, dtype=dtype).eval()


@pytest.fixture(scope="module")
def speaker_at(checkpoint_dir, reference, device):
    cache: dict = {}

    def get(preset: str | None = None):
        if preset not in cache:
            ckpt = checkpoint_dir("base", preset)
            cache[preset] = (build_speaker_encoder(ckpt, device), reference(CASE, "base", preset),
                             json.loads((ckpt / "config.json").read_text()))
        return cache[preset]

    return get


@pytest.fixture(scope="module")
def speaker(speaker_at):
    return speaker_at()


def block_results(se: SpeakerEncoder, ref, cfg: dict) -> list[CompareResult]:
    dev = next(se.parameters()).device
    out = []
    with torch.no_grad():
        for name in block_names(cfg):
            mod = se.get_submodule(name.removeprefix("speaker_encoder."))
            y = mod(ref.tap(f"{name}:in").to(dev))
            out.append(compare(f"{name}:out", y, ref.tap(f"{name}:out"), "block"))
        y = se(ref.tap("speaker_encoder:in").to(dev)).embedding
    out.append(compare("speaker_encoder:out (stack, from upstream's mel)", y, ref.tap("speaker_encoder:out"), "stack"))
    return out


def xvector_results(se: SpeakerEncoder, ref) -> list[CompareResult]:
    wav16 = ref.input("wav").numpy()
    sr = int(ref.input("sample_rate"))
    wav24 = load_reference_audio((wav16, sr))
    out = [compare_exact("speaker_encoder:wav24k", torch.from_numpy(wav24), ref.tap("speaker_encoder:wav24k"),
                         axes=("sample",))]
    x = extract_xvector(se, wav24, 24000)
    out.append(compare("speaker_encoder:xvector", x, ref.tap("speaker_encoder:xvector"), "stack"))
    return out


def test_blocks(speaker, record):
    se, ref, cfg = speaker
    results = block_results(se, ref, cfg)
    for r in results:
        record(r, row="Speaker encoder blocks", component="Speaker encoder", variant="base")
    assert_row("Speaker encoder blocks", results)


def test_xvector(speaker, record):
    se, ref, _ = speaker
    results = xvector_results(se, ref)
    for r in results:
        record(r, row="x-vector", component="Speaker encoder", variant="base",
               notes="16 kHz clip -> soxr HQ -> mel -> ECAPA-TDNN")
    assert_row("x-vector", results)


@pytest.mark.slow
@pytest.mark.parametrize("row", ["Speaker encoder blocks", "x-vector"])
def test_released_dims(row, speaker_at, record):
    """0.6b dimensions (channels 512..1536, res2net scale 8, enc_dim 1024), random weights."""
    se, ref, cfg = speaker_at("0.6b")
    results = block_results(se, ref, cfg) if row == "Speaker encoder blocks" else xvector_results(se, ref)
    for r in results:
        record(r, row=row, component="Speaker encoder (0.6b dims)", variant="base", preset_override="0.6b")
    assert_row(row, results)


def test_min_length_guard(speaker):
    """Upstream fails under 1280 samples inside a reflect pad; we refuse with a one-line error and accept 1280."""
    se, _, _ = speaker
    n = min_samples(se.cfg)
    assert n == 1280
    with pytest.raises(AudioTooShortError, match=r"1279 samples .* need at least 1280"):
        extract_xvector(se, np.zeros(n - 1, np.float32), 24000)
    assert extract_xvector(se, np.zeros(n, np.float32), 24000).shape == (se.cfg.enc_dim,)


def test_rejects_other_rates(speaker):
    se, _, _ = speaker
    with pytest.raises(ValueError, match="expected 24000 Hz"):
        extract_xvector(se, np.zeros(4000, np.float32), 16000)
