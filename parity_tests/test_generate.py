"""Generation against upstream (``impl/generate.py``, with ``impl/talker.py``, ``impl/code_predictor.py``,
``impl/prompt.py``, ``impl/sampling.py`` underneath): the ``lm_gen_*`` and ``lm_sample_*`` cases of
``reference_export/cases/lm.py``.

impl is fed the reference's stored ids (and, for Base, upstream's recorded x-vectors and ICL reference codes)
and runs its own prompt building and loop. Rows:

- ``Greedy codes <mode>/<variant> (<text>)``: codes exact per item; a mismatch names the first differing frame and
  codebook and our top1-top2 margin there (a tie or a real divergence).
- ``Talker layers (generation)``: every layer output on every talker call (prefill on real positions of the
  left-padded batch, then each decode step), ``Talker final norm``, ``Codec logits`` (last position per call),
  ``Code predictor (generation)`` (the 15 heads' logits per frame), ``Talker hidden states (result)``.
- ``Sampled codes (seeded)``: upstream after ``torch.manual_seed(s)`` and impl with ``seed=s`` draw the same
  random stream, so sampled codes must match exactly as well (plus functional checks).

A ``--dtype bfloat16`` session compares ours-bf16 with upstream-bf16 on the same device instead (rows suffixed
``, bf16``): codes by the rule of ``helpers_bf16`` (equal up to our first divergence, which may not come before
upstream's own bf16-vs-fp32 divergence unless it is a tie; functional checks after it), loop taps three-way
(upstream fp32 as the truth) over the talker calls whose inputs agree on all three runs.
"""

from __future__ import annotations

import re

import pytest
import torch

from reference_export.cases.lm import MODES, gen_case_name
from reports.compare import CompareResult, compare
from reports.results import FORMULA, OURS

from .helpers import GEN_CASES, MODE_NAME, TEXT_NAME, compare_codes, load_model, run_impl
from .helpers_bf16 import bf16_call_limits, bf16_codes_results, bf16_run, three_way


def first_divergence(res, ref) -> int:
    """Number of talker calls whose inputs agree on both sides (all, if every row's codes match)."""
    ups = ref.tap_steps("generate:codes")
    n_calls = res.n_tokens
    for ours, up in zip(res.codes, ups):
        n = min(ours.shape[0], up.shape[0])
        neq = (ours[:n].cpu() != up[:n]).any(1).nonzero()
        if len(neq):
            n_calls = min(n_calls, int(neq[0]) + 1)  # call k consumes frame k-1
    return n_calls


def _bf16_codes(mode, nsm, checkpoint_dir, reference, device, attn, record, preset=None, sampled=False,
                case=None, component="Generation, bf16"):
    """A ``--dtype bfloat16`` session: ours-bf16 vs upstream-bf16 on the same device by the rule of
    ``helpers_bf16`` (equal up to our first divergence, not before upstream's own bf16-vs-fp32 divergence)."""
    variant = MODES[mode][0]
    ref16, ref32, res, recs, settings, eos = bf16_run(reference, checkpoint_dir, device, attn,
                                                      case or gen_case_name(mode, nsm), variant, preset)
    row = (f"Greedy codes {MODE_NAME[mode]}/{variant} ({TEXT_NAME[nsm]}, bf16)" if not sampled
           else "Sampled codes (seeded, bf16)")
    results = bf16_codes_results(res, recs, ref16, ref32, settings, eos, sampled=sampled)
    for i, r in enumerate(results):
        record(r, row=row, component=component, variant=variant, preset_override=preset or "",
               notes=f"item {i}: {res.codes[i].shape[0]} frames, stop={res.stop_reason[i]}, attention "
                     f"{ref16.meta.get('attn')} on both sides")
    assert all(results), " | ".join(r.message for r in results if not r)


def _bf16_loop_taps(mode, nsm, checkpoint_dir, reference, device, attn, record):
    variant = MODES[mode][0]
    ref16, ref32, res, recs, _, _ = bf16_run(reference, checkpoint_dir, device, attn, gen_case_name(mode, nsm),
                                             variant)
    limits = bf16_call_limits(res, ref16, ref32)  # per item: calls with equal inputs on all three runs
    mask = ref16.tap("talker:prompt_mask").bool()
    n_layers = sum(1 for t in ref16.meta["expected_taps"] if re.fullmatch(r"talker\.model\.layers\.\d+:out", t))
    assert n_layers > 0
    where = f"{device} bf16, talker calls per item {limits}"
    groups = {"Talker layers (generation)": [f"talker.model.layers.{i}:out" for i in range(n_layers)],
              "Talker final norm": ["talker.model.norm:out"], "Codec logits": ["talker.codec_head:out"]}

    def flat(calls, head):  # per item its calls; prefill: the head's last position (ours computes only that), else
        rows = []  # the item's real positions
        for i, n in enumerate(limits):
            rows.append(calls[0][i, -1:] if head else calls[0][i][mask[i]])
            rows += [t[i].reshape(-1, t.shape[-1]) for t in calls[1:n]]
        return torch.cat([r.reshape(-1, r.shape[-1]) for r in rows]).float()

    all_ok = []
    for row, names in groups.items():
        for name in names:
            got, w16, w32 = recs[name], ref16.tap_steps(name), ref32.tap_steps(name)
            assert min(len(got), len(w16), len(w32)) >= max(limits), f"{name}: fewer calls recorded than compared"
            head = name == "talker.codec_head:out"
            r = three_way(name, flat(got, head), flat(w16, head), flat(w32, head), where)
            record(r, row=f"{row}, bf16", component="Generation, bf16", variant=variant, notes=where)
            all_ok.append(r)
    frames = [n - 1 for n in limits]  # the predictor runs once per frame
    if sum(frames) > 0:
        for j in range(15):
            name = f"talker.code_predictor.lm_head.{j}:out"
            got, w16, w32 = (torch.cat([torch.stack([t[i].reshape(-1, t.shape[-1])[-1] for t in steps[:f]])
                                        for i, f in enumerate(frames) if f > 0])
                             for steps in (recs[name], ref16.tap_steps(name), ref32.tap_steps(name)))
            r = three_way(name, got, w16, w32, f"{device} bf16, frames per item {frames}")
            record(r, row="Code predictor (generation), bf16", component="Generation, bf16", variant=variant,
                   notes=f"frames per item {frames}")
            all_ok.append(r)
    assert all(all_ok), " | ".join(r.message for r in all_ok if not r)


# ------------------------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("mode,nsm", GEN_CASES)
def test_greedy_codes(mode, nsm, gen_run, record, dtype, checkpoint_dir, reference, device, attn):
    if dtype == torch.bfloat16:
        return _bf16_codes(mode, nsm, checkpoint_dir, reference, device, attn, record)
    variant = MODES[mode][0]
    ref, res, _ = gen_run(gen_case_name(mode, nsm), variant)
    row = f"Greedy codes {MODE_NAME[mode]}/{variant} ({TEXT_NAME[nsm]})"
    ups = ref.tap_steps("generate:codes")
    assert len(ups) == len(res.codes) == 3
    results = []
    for i, (ours, up) in enumerate(zip(res.codes, ups)):
        r = compare_codes(f"generate:codes[{i}]", ours, up.long(), res.margins[i])
        r.extra["stop_reason"] = res.stop_reason[i]
        record(r, row=row, component="Generation", variant=variant,
               notes=f"item {i}: {ours.shape[0]} frames, stop={res.stop_reason[i]}")
        results.append(r)
        # Budget exhaustion is reported, never silent: a row that stops short of the budget stopped by EOS.
        budget = int(ref.case["max_new_tokens"]) - 1
        if up.shape[0] < budget:
            assert res.stop_reason[i] == "eos", f"item {i}: upstream stopped at {up.shape[0]} < {budget} frames"
    assert all(results), " | ".join(r.message for r in results if not r)
    assert max(int(c.shape[0]) for c in ups) >= 40, "case too weak: no item reached 40 frames"


@pytest.mark.slow
@pytest.mark.parametrize("mode,nsm", GEN_CASES)
def test_greedy_codes_released_dims(mode, nsm, gen_run, record, dtype, checkpoint_dir, reference, device, attn):
    """0.6b dimensions (random weights): head_dim 128 over a 1024-wide talker, 28 layers, Identity MTP.
    VoiceDesign has no 0.6b release, so its cases skip with that reason. About 2.5 min per case on 2 cores."""
    if dtype == torch.bfloat16:
        return _bf16_codes(mode, nsm, checkpoint_dir, reference, device, attn, record, preset="0.6b",
                           component="Generation (0.6b dims), bf16")
    variant = MODES[mode][0]
    ref, res, _ = gen_run(gen_case_name(mode, nsm), variant, "0.6b")
    row = f"Greedy codes {MODE_NAME[mode]}/{variant} ({TEXT_NAME[nsm]})"
    results = []
    for i, (ours, up) in enumerate(zip(res.codes, ref.tap_steps("generate:codes"))):
        r = compare_codes(f"generate:codes[{i}]", ours, up.long(), res.margins[i])
        record(r, row=row, component="Generation (0.6b dims)", variant=variant, preset_override="0.6b",
               notes=f"item {i}: {ours.shape[0]} frames, stop={res.stop_reason[i]}")
        results.append(r)
    assert all(results), " | ".join(r.message for r in results if not r)


@pytest.mark.parametrize("mode,nsm", GEN_CASES)
def test_loop_taps(mode, nsm, gen_run, record, dtype, checkpoint_dir, reference, device, attn):
    """Every talker call's layer outputs, final norm and codec logits; the predictor's 15 heads per frame.
    bf16 session: three-way (ours-bf16, upstream-bf16, upstream-fp32 as the truth) over the calls whose inputs agree
    on all three runs."""
    if dtype == torch.bfloat16:
        return _bf16_loop_taps(mode, nsm, checkpoint_dir, reference, device, attn, record)
    variant = MODES[mode][0]
    ref, res, recs = gen_run(gen_case_name(mode, nsm), variant)
    n_calls = first_divergence(res, ref)
    mask = ref.tap("talker:prompt_mask").bool()  # (B, L)
    n_layers = sum(1 for t in ref.meta["expected_taps"] if re.fullmatch(r"talker\.model\.layers\.\d+:out", t))
    assert n_layers > 0
    # Layer outputs here come from two whole autoregressive runs: each side feeds its own previous layers, calls and
    # frames, never the other's, so layer i carries the rounding of i layers over every call before it. That is the
    # stack tier's case ("many layers"), not one block on the reference's input. Measured on CPU fp32 with equal
    # codes: tiny at most 3.8e-6; 0.6b (28 layers, about 30 calls) 1.3e-5..2.0e-5 from layer 15 on at |x| 5..18
    # (a few of 188416 elements, about 20 ulp, cosine 1.0), past the block tier's 1e-5. The same holds for the
    # predictor's layers (fed our talker's hidden state): 0.6b 1.1e-5..1.5e-5.
    groups = {
        "Talker layers (generation)": ([f"talker.model.layers.{i}:out" for i in range(n_layers)], "stack"),
        "Talker final norm": (["talker.model.norm:out"], "block"),
        "Codec logits": (["talker.codec_head:out"], "stack"),
    }
    # Every call is compared up to the first code divergence (``n_calls``); after it the two runs consume different
    # frames and may stop at different steps, so their later calls do not correspond. Call counts: ours runs each
    # of these modules exactly once per talker call (per frame for the predictor's heads), and with no divergence
    # upstream ran exactly as many calls: a module run once more, or once less, on either side fails.
    whole = n_calls == res.n_tokens

    def check_calls(name: str, per_run: int) -> None:
        n_ours, n_up = len(recs.get(name, [])), len(ref.tap_steps(name))
        assert n_ours == per_run, f"{name}: impl recorded {n_ours} calls in a run of {per_run}"
        assert n_up == n_ours or not whole, f"{name}: impl recorded {n_ours} calls, upstream {n_up}, codes equal"

    all_ok = []
    for row, (names, tier) in groups.items():
        for name in names:
            check_calls(name, res.n_tokens)
            got, want = recs[name][:n_calls], ref.tap_steps(name)[:n_calls]
            assert len(got) == len(want) == n_calls, f"{name}: {len(got)} impl calls vs {len(want)} upstream"
            g0, w0 = got[0], want[0]
            if name == "talker.codec_head:out":
                w0 = w0[:, -1:]  # upstream applies the head to every prefill position; the loop reads the last
            else:
                g0, w0 = g0[mask], w0[mask]  # prefill: real (non-pad) positions only
            g = torch.cat([g0.reshape(-1, g0.shape[-1])] + [t.reshape(-1, t.shape[-1]) for t in got[1:]])
            w = torch.cat([w0.reshape(-1, w0.shape[-1])] + [t.reshape(-1, t.shape[-1]) for t in want[1:]])
            r = compare(name, g.float(), w.float(), tier)
            record(r, row=row, component="Generation", variant=variant, notes=f"{n_calls} talker calls")
            all_ok.append(r)
    # Code predictor: lm_head[j] runs once per frame.
    n_frames = n_calls - 1
    for j in range(15):
        name = f"talker.code_predictor.lm_head.{j}:out"
        check_calls(name, res.n_tokens - 1)  # once per frame: the last talker call ends the run, no frame after it
        got = torch.stack(recs[name][:n_frames])  # (F, B, V)
        want = torch.stack([t[:, -1] for t in ref.tap_steps(name)[:n_frames]])
        r = compare(name, got.float(), want.float(), "stack")
        record(r, row="Code predictor (generation)", component="Generation", variant=variant,
               notes=f"{n_frames} frames")
        all_ok.append(r)
    # The predictor's own layers and norm: per frame, one 2-position call ([talker hidden, code-0 embedding]) and one
    # call per further group; every call compared (all positions), up to the first code divergence.
    per_frame = len([t for t in ref.meta["expected_taps"] if t.startswith("talker.code_predictor.lm_head.")])
    cp_names = sorted((t for t in ref.meta["expected_taps"]
                       if re.fullmatch(r"talker\.code_predictor\.model\.(layers\.\d+|norm):out", t)),
                      key=lambda t: (t.endswith("norm:out"), t))
    assert per_frame == 15 and len(cp_names) > 1, (per_frame, cp_names)
    for name in cp_names:
        check_calls(name, (res.n_tokens - 1) * per_frame)
        k = n_frames * per_frame
        got, want = recs[name][:k], ref.tap_steps(name)[:k]
        assert len(got) == len(want) == k, f"{name}: {len(got)} impl calls vs {len(want)} upstream, {k} expected"
        g = torch.cat([t.reshape(-1, t.shape[-1]) for t in got])
        w = torch.cat([t.reshape(-1, t.shape[-1]) for t in want])
        r = compare(name, g.float(), w.float(), "stack")  # fed our own talker's hidden state: see the groups above
        record(r, row="Code predictor layers (generation)", component="Generation", variant=variant,
               notes=f"{n_frames} frames x {per_frame} calls")
        all_ok.append(r)
    for i, (h, hu) in enumerate(zip(res.hidden, ref.tap_steps("generate:hidden"))):
        n = min(h.shape[0], hu.shape[0])
        r = compare(f"generate:hidden[{i}]", h[:n].float(), hu[:n].float(), "block")
        record(r, row="Talker hidden states (result)", component="Generation", variant=variant)
        all_ok.append(r)
    assert all(all_ok), " | ".join(r.message for r in all_ok if not r)


def test_sampled_codes_seeded(gen_run, record, dtype, checkpoint_dir, reference, device, attn):
    """Upstream is sampled on the session's device (``reference`` defaults to it) after ``torch.manual_seed``; impl
    draws from ``make_generator(seed, model device)``. bf16 session: the bf16 codes rule, without the tie."""
    if dtype == torch.bfloat16:
        return _bf16_codes("custom_voice", True, checkpoint_dir, reference, device, attn, record, sampled=True,
                           case="lm_sample_custom_voice")
    ref, res, _ = gen_run("lm_sample_custom_voice", "custom_voice")
    ups = ref.tap_steps("generate:codes")
    results = []
    for i, (ours, up) in enumerate(zip(res.codes, ups)):
        r = compare_codes(f"generate:codes[{i}]", ours, up.long(), res.margins[i])
        record(r, row="Sampled codes (seeded)", component="Generation", variant="custom_voice")
        results.append(r)
    assert all(results), " | ".join(r.message for r in results if not r)


def test_sampled_functional(gen_run, record):
    """Functional gates on sampled output: code ranges, no EOS inside a row, lengths within budget, stop reasons."""
    ref, res, _ = gen_run("lm_sample_custom_voice", "custom_voice")
    budget = int(ref.case["max_new_tokens"]) - 1
    eos = 2150
    for i, c in enumerate(res.codes):
        in_range = bool((c >= 0).all()) and bool((c < 2048).all())  # no special id (EOS included) in a frame
        length_ok = c.shape[0] == budget if res.stop_reason[i] == "budget" else c.shape[0] < budget + 1
        ok = in_range and length_ok and res.stop_reason[i] in ("eos", "budget") and bool((c[:, 0] != eos).all())
        r = CompareResult(f"sampled item {i}", "functional", ok, list(c.shape), list(c.shape), "int64", n=c.numel())
        r.message = f"sampled item {i}: {c.shape[0]} frames, stop={res.stop_reason[i]}, codes in range: {ok}"
        r.extra = {"frames": int(c.shape[0]), "stop_reason": res.stop_reason[i]}
        r.judged_by = "functional checks: codes in range, no EOS inside a frame, length vs budget, stop reason"
        record(r, row="Sampled generation (functional)", component="Generation", variant="custom_voice",
               compares=FORMULA)
        assert r, r.message


def test_budget_reported(checkpoint_dir, device):
    """A run cut by the budget says so per item (never a silent truncation)."""
    tts = load_model(checkpoint_dir("voice_design"), device)
    res = tts.generate_codes(["Hello there, a budget test.", "Hi"], mode="voice_design", language="english",
                             instruct="calm", greedy=True, max_new_frames=3)
    assert res.n_tokens <= 4
    for c, reason in zip(res.codes, res.stop_reason):
        assert reason in ("eos", "budget")
        assert c.shape[0] <= 3
        if reason == "budget":
            assert c.shape[0] == 3
    assert res.budget_exhausted == [r == "budget" for r in res.stop_reason]


@pytest.mark.parametrize("variant", ["custom_voice", "base"])
def test_stream_and_synthesize(variant, checkpoint_dir, reference, device, record):
    """``stream`` chunks join to the codec's one-shot decode of the same codes (ICL: of reference + new frames,
    reference part cut); ``synthesize`` returns float32 mono at 24 kHz, frames x 1920 samples."""
    tts = load_model(checkpoint_dir(variant), device)
    if variant == "base":  # ICL with upstream's recorded x-vector and reference codes
        ref = reference(gen_case_name("icl", False), "base")
        kw = dict(xvector=ref.tap_steps("generate:xvector")[0], ref_codes=ref.tap_steps("generate:ref_codes")[0],
                  ref_text="Reference words here.", language="english")
    else:
        kw = dict(speaker="ryan", language="english")
    text = "Streaming should equal one-shot decoding."
    res = tts.generate_codes(text, greedy=True, max_new_frames=14, **kw)
    chunks = list(tts.stream(text, chunk_frames=5, greedy=True, max_new_frames=14, **kw))
    codes = res.codes[0]
    prefix = res.ref_codes[0] if res.ref_codes[0] is not None else codes[:0]
    full = tts.codec.decode_oneshot(torch.cat([prefix, codes]))[prefix.shape[0] * 1920:]
    got = torch.from_numpy(__import__("numpy").concatenate(chunks))
    assert [len(c) for c in chunks[:-1]] == [5 * 1920] * (len(chunks) - 1)
    r = compare("stream (chunks of 5 frames) vs one-shot decode", got, torch.from_numpy(full), "stack")
    record(r, row="Streaming synthesis (chunks vs one-shot)", component="Generation", variant=variant,
           notes=f"{codes.shape[0]} frames", compares=OURS)
    assert r, r.message
    wav, sr = tts.synthesize(text, greedy=True, max_new_frames=14, **kw)
    assert sr == 24000 and wav.dtype.name == "float32" and wav.ndim == 1 and len(wav) == codes.shape[0] * 1920


def test_growing_kv_cache_gives_the_same_codes(checkpoint_dir, reference, device, dtype, attn, monkeypatch, record):
    """The talker's KV cache starts at CACHE_START_FRAMES and doubles on demand (issue: speed, cache capacity). Set to
    one frame, every run regrows it many times; the greedy codes must still equal upstream's exactly (fp32)."""
    if dtype != torch.float32:
        pytest.skip("exact codes are the fp32 claim; bf16 generation is judged by test_generate_bf16.py")
    import impl.generate
    from impl.kv_cache import KVCache

    monkeypatch.setattr(impl.generate, "CACHE_START_FRAMES", 1)
    grown = []
    orig = KVCache._grow

    def counting_grow(self, need):
        grown.append(need)
        orig(self, need)

    monkeypatch.setattr(KVCache, "_grow", counting_grow)
    mode, nsm = "custom_voice", False
    variant = MODES[mode][0]
    ref = reference(gen_case_name(mode, nsm), variant)
    res, _ = run_impl(load_model(checkpoint_dir(variant), device, dtype, attn), ref, record_taps=False)
    ups = ref.tap_steps("generate:codes")
    results = [compare_codes(f"generate:codes[{i}]", ours, up.long(), res.margins[i])
               for i, (ours, up) in enumerate(zip(res.codes, ups))]
    for r in results:
        record(r, row="Greedy codes with a growing KV cache (1 frame, doubled on demand)", component="Generation",
               variant=variant)
    assert len(results) == 3 and all(results), " | ".join(r.message for r in results if not r)
    assert len(grown) >= 2, f"the talker cache grew {len(grown)} times; the test did not exercise growth"
