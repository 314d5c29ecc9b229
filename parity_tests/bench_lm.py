"""Language-model speed: ours vs upstream on the same weights, side by side in one run (pytest-benchmark).

Not collected by the default run (the file name does not match ``test_*.py``); run it explicitly::

    pytest parity_tests/bench_lm.py -m benchmark --benchmark-enable [--preset 0.6b] [--device cuda]

Both sides: the same checkpoint folder, fp32, SDPA attention (upstream's default), greedy, the same prompt ids.
Groups: a talker prefill, one code-predictor frame (15 tokens), a full greedy generation (talker + predictor,
``FRAMES`` frames, batch 1). ``test_ratio`` prints medians, upstream/ours ratios and the real-time factor
(seconds of compute per second of audio at 12.5 frames/s), with hardware, threads and warm-up.
"""

from __future__ import annotations

import os
import platform

import pytest
import torch

from impl.generate import GenerationSettings, generate
from impl.layers import causal_mask
from impl.prompt import build
from impl.sampling import PredictorChooser, SamplingConfig
from impl.talker import rope_positions

from .helpers import load_model, requests_from_ref

pytestmark = pytest.mark.benchmark
FRAMES = 30
VARIANT = "custom_voice"
CASE = "lm_gen_custom_voice_nonstream"
GROUPS = {"talker prefill": ("upstream", "ours"), "code predictor, 1 frame": ("upstream", "ours"),
          f"greedy generation, {FRAMES} frames": ("upstream", "ours")}
MEDIANS: dict[tuple[str, str], float] = {}


@pytest.fixture(scope="module")
def env(checkpoint_dir, reference, device):
    from reference_export.upstream import load_upstream

    ckpt = checkpoint_dir(VARIANT)
    ref = reference(CASE, VARIANT)
    ours = load_model(ckpt, device, torch.float32, "sdpa")
    up = load_upstream(ckpt, device=device, attn="sdpa")
    reqs = requests_from_ref(ref)[2:3]  # batch 1; this item runs to the budget (no early EOS) on both sides
    with torch.inference_mode():
        prompt = build(ours.talker, ours.config, reqs)
    return ours, up, reqs, prompt


def _fn(group: str, side: str, env):
    ours, up, reqs, prompt = env
    t = ours.talker
    L = prompt.embeds.shape[1]
    if group == "talker prefill":
        if side == "upstream":
            return lambda: up.model.talker.model(inputs_embeds=prompt.embeds, use_cache=True)
        pos, _ = rope_positions(prompt.attention_mask)
        mask = causal_mask(L, L, prompt.embeds.dtype, prompt.embeds.device, None)

        def ours_prefill():
            cache = t.allocate_cache(1, L, prompt.embeds.device, prompt.embeds.dtype)
            return t.model(prompt.embeds, pos, mask, cache)  # sdpa: the model was loaded with it

        return ours_prefill
    if group.startswith("code predictor"):
        h = torch.randn(1, 1, t.cfg.hidden_size, generator=torch.Generator().manual_seed(0)).to(prompt.embeds)
        c0 = t.embed_codec(torch.tensor([[17]], device=h.device))
        if side == "upstream":
            return lambda: up.model.talker.code_predictor.generate(
                inputs_embeds=torch.cat((h, c0), 1), max_new_tokens=15, do_sample=False)
        cache = t.code_predictor.allocate_cache(1, h.device, h.dtype)
        chooser = PredictorChooser(SamplingConfig(do_sample=False), None)
        return lambda: t.code_predictor.generate_frame(h, c0, cache, chooser)
    r = reqs[0]
    if side == "upstream":
        ids = torch.tensor([r.input_ids], device=prompt.embeds.device)
        kw = {"instruct_ids": [torch.tensor([r.instruct_ids])] if r.instruct_ids else None}
        return lambda: up.model.generate(input_ids=[ids], languages=[r.language], speakers=[r.speaker],
                                         non_streaming_mode=r.non_streaming, max_new_tokens=FRAMES + 1,
                                         do_sample=False, subtalker_dosample=False, **kw)
    settings = GenerationSettings.greedy(FRAMES + 1)

    def ours_generate():
        res = generate(t, build(t, ours.config, reqs), settings, None)
        assert res.codes[0].shape[0] == FRAMES, "the benchmark item must run to the budget"
        return res

    return ours_generate


@pytest.mark.parametrize("group,side", [(g, s) for g, sides in GROUPS.items() for s in sides])
def test_lm_speed(group: str, side: str, env, benchmark):
    benchmark.group = group
    fn = _fn(group, side, env)
    with torch.inference_mode():
        benchmark.pedantic(fn, rounds=3, warmup_rounds=1, iterations=1)
    if benchmark.stats is not None:  # None under --benchmark-disable
        MEDIANS[(group, side)] = benchmark.stats.stats.median  # median: robust to a busy shared machine


def test_ratio(capsys):
    want = [(g, s) for g, sides in GROUPS.items() for s in sides]
    if any(k not in MEDIANS for k in want):
        pytest.skip("timings missing (run with --benchmark-enable)")
    lines = [f"LM speed, fp32, sdpa, batch 1; {platform.machine()} {os.cpu_count()} cpus, torch threads "
             f"{torch.get_num_threads()}, 1 warm-up + 3 rounds (median)"]
    for g in GROUPS:
        up, ours = MEDIANS[(g, "upstream")], MEDIANS[(g, "ours")]
        rtf = f"  RTF ours {ours / (FRAMES / 12.5):.3f}, upstream {up / (FRAMES / 12.5):.3f}" if "generation" in g else ""
        lines.append(f"  {g:32s} upstream {up:8.4f} s  ours {ours:8.4f} s  upstream/ours = {up / ours:5.2f}x{rtf}")
    with capsys.disabled():
        print("\n" + "\n".join(lines))
