"""Speaker-encoder cases (Base checkpoints only): reference clip -> 24 kHz -> log-mel -> ECAPA-TDNN -> x-vector.

``speaker_xvector``: a deterministic 3.2 s speech-like clip stored at 16 kHz, taken through exactly the calls
upstream's ``Qwen3TTSModel.create_voice_clone_prompt`` makes for the speaker embedding:
``librosa.resample(wav, orig_sr=16000, target_sr=24000)`` (default ``res_type="soxr_hq"``), then
``Qwen3TTSForConditionalGeneration.extract_speaker_embedding(wav24k, 24000)``. Every module's input and output is
recorded (``speaker_encoder:in`` is upstream's mel, (1, F, 128)); ``run`` adds ``speaker_encoder:wav24k`` (the
resampled clip) and ``speaker_encoder:xvector`` (the returned (D,) embedding).
"""

from __future__ import annotations

import numpy as np
import torch

from ..registry import register_taps
from . import Case, CaseEnv, register
from .codec_encoder import speechlike

SOURCE_SR = 16000
SECONDS = 3.2


def _inputs(env: CaseEnv) -> dict[str, torch.Tensor]:
    g = env.generator("speaker_xvector")
    n24 = int(SECONDS * 24000)
    y24 = speechlike(n24, g).double()
    # Decimate the 24 kHz synthetic signal to 16 kHz by sampling its formula's grid (no resampler involved).
    idx = torch.arange(int(SECONDS * SOURCE_SR), dtype=torch.float64) * 1.5
    lo = idx.floor().long().clamp(max=n24 - 2)
    frac = idx - lo
    wav16 = (y24[lo] * (1 - frac) + y24[lo + 1] * frac).float()
    return {"wav": wav16, "sample_rate": torch.tensor(SOURCE_SR)}


def run_xvector(up, inputs: dict[str, torch.Tensor], rec) -> None:
    """The speaker-embedding half of upstream's ``create_voice_clone_prompt`` on the stored clip."""
    import librosa

    wav = inputs["wav"].numpy().astype(np.float32)
    sr = int(inputs["sample_rate"])
    wav24 = librosa.resample(y=wav.astype(np.float32), orig_sr=sr, target_sr=24000)  # the call upstream makes
    rec.add("speaker_encoder:wav24k", torch.from_numpy(np.ascontiguousarray(wav24)))
    with torch.no_grad():
        emb = up.model.extract_speaker_embedding(audio=wav24, sr=24000)
    rec.add("speaker_encoder:xvector", emb)


register(Case(
    name="speaker_xvector", component="speaker_encoder", roots=("speaker_encoder",), record_inputs=True,
    description=f"{SECONDS} s clip at {SOURCE_SR} Hz -> librosa.resample -> mel -> ECAPA-TDNN -> x-vector",
    make_inputs=_inputs, run=run_xvector, settings={"seconds": SECONDS, "source_sr": SOURCE_SR},
    variants=("base",),
))


def block_names(cfg: dict) -> list[str]:
    """Module paths of the blocks the "Speaker encoder blocks" row compares one by one."""
    n = len(cfg["speaker_encoder_config"].get("enc_channels", [0] * 5))
    return [f"speaker_encoder.blocks.{i}" for i in range(n - 1)] + [
        "speaker_encoder.mfa", "speaker_encoder.asp", "speaker_encoder.fc"]


@register_taps("speaker_encoder")
def _speaker_taps(cfg: dict, st_cfg: dict, settings: dict) -> list[str]:
    taps = ["speaker_encoder:wav24k", "speaker_encoder:in", "speaker_encoder:out", "speaker_encoder:xvector"]
    for b in block_names(cfg):
        taps += [f"{b}:in", f"{b}:out"]
    return taps
