"""The LM rows can fail: bugs other ports shipped, planted in ``impl``, must turn a named row red while a row
the bug cannot reach stays green (so the red is the mutation's doing, not noise).

- ``mtp-projection-without-bias``: the 1.7B-style ``small_to_mtp_projection`` applied without its bias
  -> ``Code predictor (teacher-forced)`` red; ``Prompt embeddings`` green.
- ``predictor-cache-and-positions-not-reset``: one predictor KV cache for the whole utterance, so positions keep
  counting across frames instead of restarting at 0 -> ``Greedy codes`` red; ``Code predictor (teacher-forced)``
  (one frame) green.
- ``icl-codes-without-predictor-embeddings``: ICL reference frames summed from the talker table for all 16 groups
  -> ``Prompt embeddings voice_clone ICL`` red; ``Prompt embeddings voice_clone x-vector`` green.
- ``predictor-unread-position-wrong``: the predictor's last layer wrong at the position its heads never read ->
  ``Code predictor layers (generation)`` red; ``Greedy codes`` of the same case green (no final output shows it).
- ``repetition-penalty-over-prompt``: the penalty also over the prompt's codec ids (every group of the ICL
  reference frames), as if the prompt were HF ``input_ids`` -> ``Greedy codes voice_clone ICL`` red; ``Prompt embeddings``
  of the same case green.

Fresh models are loaded for every mutation (the cached ones other tests use are never touched).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import impl.code_predictor as code_predictor
import impl.generate as gen
import impl.prompt as prompt_mod
from impl.layers import KVCache
from impl.model import Qwen3TTS
from impl.prompt import build
from reference_export.cases.lm import gen_case_name
from reports.compare import compare

from .helpers import compare_calls, compare_codes, requests_from_ref, run_impl, teacher_run

# ------------------------------------------------------------------------------------------------ rows


def rows_teacher(tts, reference, variant):
    ref = reference("lm_cp_teacher", variant)
    got = teacher_run(tts, ref)
    name = "talker.code_predictor:teacher_logits"
    return "Code predictor (teacher-forced)", compare_calls(name, got, ref, "stack")  # every call, by index


def rows_prompt(tts, reference, case, variant, label):
    ref = reference(case, variant)
    with torch.inference_mode():
        p = build(tts.talker, tts.config, requests_from_ref(ref))
    return f"Prompt embeddings {label}", [compare("talker:prompt_embeds", p.embeds.float(),
                                                 ref.tap("talker:prompt_embeds").float(), "op")]


def rows_codes(tts, reference, case, variant, label):
    ref = reference(case, variant)
    res, _ = run_impl(tts, ref, record_taps=False)
    ups = ref.tap_steps("generate:codes")
    assert len(res.codes) == len(ups), f"{case}: ours generated {len(res.codes)} items, upstream {len(ups)}"
    return f"Greedy codes {label}", [compare_codes(f"generate:codes[{i}]", c, u.long(), res.margins[i])
                                     for i, (c, u) in enumerate(zip(res.codes, ups))]


def rows_cp_layers(tts, reference, case, variant, label):
    """The predictor's layers and norm while generating, every call (as ``test_generate.test_loop_taps``)."""
    ref = reference(case, variant)
    res, recs = run_impl(tts, ref)
    names = [t for t in ref.meta["expected_taps"] if t.startswith("talker.code_predictor.model.")]
    assert names, "the generation reference records no predictor layer"
    k = (res.n_tokens - 1) * 15
    return f"Code predictor layers (generation) {label}", [
        compare(n, torch.cat([t.reshape(-1, t.shape[-1]) for t in recs[n][:k]]).float(),
                torch.cat([t.reshape(-1, t.shape[-1]) for t in ref.tap_steps(n)[:k]]).float(), "block")
        for n in names]


ICL = (gen_case_name("icl", False), "base", "voice_clone ICL (streaming text)")
XVEC = (gen_case_name("xvec", False), "base", "voice_clone x-vector (streaming text)")
CV = (gen_case_name("custom_voice", True), "custom_voice", "custom_voice/custom_voice (non-streaming text)")


# ------------------------------------------------------------------------------------------- mutations


def mut_mtp_bias(tts, monkeypatch, reference):
    proj = tts.talker.code_predictor.small_to_mtp_projection
    assert isinstance(proj, torch.nn.Linear), "tiny base must have the Linear (1.7B-style) MTP projection"
    monkeypatch.setattr(proj, "forward", lambda x: F.linear(x, proj.weight))
    return rows_teacher(tts, reference, "base"), rows_prompt(tts, reference, *XVEC)


def mut_positions(tts, monkeypatch, reference):
    """One predictor cache for the whole utterance: positions (= cache length) keep counting across frames and
    earlier frames stay visible. (Positions alone counting on, with the cache still reset, is invisible: every
    query and key of a frame shifts by the same offset and RoPE scores depend only on the difference.)"""

    class CarriedCache(KVCache):
        def reset(self) -> None:  # the bug: never restart
            pass

    def allocate(self, batch, device, dtype):
        c = self.cfg
        return CarriedCache.allocate(c.num_hidden_layers, batch, c.num_key_value_heads, 16 * 64, c.head_dim,
                                     device, dtype)

    monkeypatch.setattr(code_predictor.CodePredictor, "allocate_cache", allocate)
    return rows_codes(tts, reference, *CV), rows_teacher(tts, reference, "custom_voice")


def mut_icl_talker_table(tts, monkeypatch, reference):
    def talker_only(talker, ref_codes):
        return talker.embed_codec(ref_codes).sum(1).unsqueeze(0)  # all 16 groups from the talker table

    monkeypatch.setattr(prompt_mod, "reference_frame_embedding", talker_only)
    return rows_prompt(tts, reference, *ICL), rows_prompt(tts, reference, *XVEC)


def mut_penalty_over_prompt(tts, monkeypatch, reference):
    """The penalty also over every codec id of the prompt (all 16 groups of the ICL reference frames), as a port
    that feeds the prompt as HF ``input_ids`` would; upstream's ``input_ids`` hold only generated group-0 codes."""
    ref = reference(ICL[0], "base")
    ids = [c.long().flatten() for c in ref.tap_steps("generate:ref_codes")]
    n = max(len(f) for f in ids)
    prompt_ids = torch.stack([torch.cat([f, f[:1].expand(n - len(f))]) for f in ids])  # (B, n), pad by repeat
    orig = gen.process_talker

    def over_prompt(scores, cfg, prev_ids, n_generated, eos, mask):
        return orig(scores, cfg, torch.cat([prompt_ids.to(prev_ids.device), prev_ids], 1), n_generated, eos, mask)

    monkeypatch.setattr(gen, "process_talker", over_prompt)
    return rows_codes(tts, reference, *ICL), rows_prompt(tts, reference, *ICL)


def mut_cp_unread_position(tts, monkeypatch, reference):
    """A bug that no final output shows: the predictor's last layer gets position 0 of its two-position call (the
    talker hidden state) wrong. The heads read only the last position, so logits and codes stay exactly upstream's;
    only the layer values compared while generating can see it."""
    last = tts.talker.code_predictor.model.layers[-1]

    def hook(module, args, out):
        if out.shape[1] == 2:  # the per-frame prefill: [talker hidden, code-0 embedding]
            out = out.clone()
            out[:, 0] += 0.5
            return out
        return None

    handle = last.register_forward_hook(hook)
    try:
        return rows_cp_layers(tts, reference, *CV), rows_codes(tts, reference, *CV)
    finally:
        handle.remove()


MUTATIONS = {
    "mtp-projection-without-bias": ("base", mut_mtp_bias),
    "predictor-cache-and-positions-not-reset": ("custom_voice", mut_positions),
    "icl-codes-without-predictor-embeddings": ("base", mut_icl_talker_table),
    "repetition-penalty-over-prompt": ("base", mut_penalty_over_prompt),
    "predictor-unread-position-wrong": ("custom_voice", mut_cp_unread_position),
}


@pytest.mark.mutation
@pytest.mark.parametrize("name", list(MUTATIONS))
def test_mutation_turns_row_red(name, checkpoint_dir, reference, monkeypatch, record):
    variant, mutate = MUTATIONS[name]
    tts = Qwen3TTS.from_pretrained(checkpoint_dir(variant), attn="eager")  # fresh: never a cached model
    (red_row, red), (green_row, green) = mutate(tts, monkeypatch, reference)
    for r in red:
        record(r, row=f"mutation {name} → {red_row}", component="Mutation self-test", variant=variant,
               expect_fail=True)
    assert not all(red), f"mutation {name} left row {red_row!r} green: the harness cannot see this bug"
    assert all(green), f"mutation {name} also broke {green_row!r}, which it cannot reach: " + \
        " | ".join(r.message for r in green if not r)
