"""Decode throughput: ours vs upstream on the same weights, side by side in one run (pytest-benchmark).

Not collected by the default run (the file name does not match ``test_*.py``); run it explicitly::

    pytest parity_tests/bench_codec.py -m benchmark --benchmark-enable [--preset 0.6b]

Both sides decode the same codes from the same checkpoint folder, fp32, sdpa attention (upstream's default for
the codec), through their user-facing ``decode`` (upstream ``Qwen3TTSTokenizerV2Model.decode``, ours
``SpeechTokenizer.decode``), plus our frame-at-a-time streaming decode. ``test_ratio`` prints the ratios and
the real-time factor (seconds of compute per second of audio). Hardware, threads and warm-up are printed too:
timings mean nothing without them.
"""

from __future__ import annotations

import os
import platform

import pytest
import torch

from impl.codec.streaming import split_frames

from .helpers_codec import VARIANT, load_codec, upstream_codec

pytestmark = pytest.mark.benchmark
FRAMES = 100  # 8 s of audio: one chunk of upstream's 300-frame chunked decode
SIDES = ["upstream decode()", "ours decode()", "ours streaming (1 frame/push)"]
MEANS: dict[str, float] = {}  # side -> median seconds


@pytest.fixture(scope="module")
def bench_env(checkpoint_dir, device):
    ckpt = checkpoint_dir(VARIANT)
    ours = load_codec(ckpt, device, "sdpa")
    theirs = upstream_codec(ckpt, torch.float32, "sdpa").to(device)
    q = ours.cfg.decoder_config.num_quantizers
    codes = torch.randint(0, ours.cfg.decoder_config.codebook_size, (1, FRAMES, q),
                          generator=torch.Generator().manual_seed(0))
    return ours, theirs, codes


def _run(side: str, env):
    ours, theirs, codes = env
    if side == "upstream decode()":
        with torch.inference_mode():
            return lambda: theirs.decode(codes.to(next(theirs.parameters()).device), return_dict=True)
    if side == "ours decode()":
        return lambda: ours.decode(codes)

    def stream():
        s = ours.decoder.stream()
        for c in split_frames(codes, [1]):
            s.push(c)

    return stream


@pytest.mark.parametrize("side", SIDES)
def test_decode_throughput(side: str, bench_env, benchmark):
    benchmark.group = f"codec decode, {FRAMES} frames"
    fn = _run(side, bench_env)
    with torch.inference_mode():
        benchmark.pedantic(fn, rounds=3, warmup_rounds=1, iterations=1)
    if benchmark.stats is not None:  # None under --benchmark-disable
        MEANS[side] = benchmark.stats.stats.median  # median: robust to a busy shared machine


def test_ratio(capsys):
    if len(MEANS) < len(SIDES):
        pytest.skip("timings missing (run with --benchmark-enable)")
    audio_s = FRAMES * 1920 / 24000
    up = MEANS["upstream decode()"]
    lines = [f"codec decode, {FRAMES} frames = {audio_s:.1f} s of audio; {platform.machine()} "
             f"{os.cpu_count()} cpus, torch threads {torch.get_num_threads()}, 1 warm-up + 3 rounds (median)"]
    for side in SIDES:
        m = MEANS[side]
        lines.append(f"  {side:32s} {m:8.3f} s  RTF {m / audio_s:6.3f}  upstream/this = {up / m:5.2f}x")
    with capsys.disabled():
        print("\n" + "\n".join(lines))
