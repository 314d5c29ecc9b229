"""bf16 generation against upstream bf16 on the same device (issue 7, item 7): the ``lm_gen_*`` cases run by
upstream in bf16 and in fp32 and by impl in bf16, judged by the rule of ``parity_tests/helpers_bf16.py``.

Rows ``Greedy codes <mode>/<variant> (<text>, bf16)``, one per mode, one result per batch item: ours-bf16 equal to
upstream-bf16 up to our first divergence (frame, codebook), which may not come before upstream-bf16's own
divergence (frame, codebook) from upstream-fp32 in generation order (or must be a tie of at most one bf16 ulp);
functional checks after it. ``extra`` carries the three divergence points (ours vs upstream bf16, upstream bf16 vs
its fp32, ours vs upstream fp32), our margin and the tie threshold there; the notes show the three points.

Streaming text runs by default (4 modes); non-streaming text is ``slow``. In a ``--dtype bfloat16`` session these
rows come from ``test_generate.py::test_greedy_codes`` (all 8 cases, same rule), so this file skips there.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from reference_export.cases.lm import MODES, gen_case_name

from .helpers import MODE_NAME, TEXT_NAME
from .helpers_bf16 import bf16_codes_results, bf16_run, divergence_note

BF16_CASES = ([pytest.param(m, False, id=f"{m}-stream") for m in MODES]
              + [pytest.param(m, True, id=f"{m}-nonstream", marks=pytest.mark.slow) for m in MODES])


@pytest.mark.parametrize("mode,nsm", BF16_CASES)
def test_greedy_codes_bf16(mode, nsm, checkpoint_dir, reference, device, attn, dtype, record):
    if dtype == torch.bfloat16:
        pytest.skip("a --dtype bfloat16 session records these rows from test_generate.py::test_greedy_codes")
    variant = MODES[mode][0]
    ref16, ref32, res, recs, settings, eos = bf16_run(reference, checkpoint_dir, device, attn,
                                                      gen_case_name(mode, nsm), variant)
    row = f"Greedy codes {MODE_NAME[mode]}/{variant} ({TEXT_NAME[nsm]}, bf16)"
    results = bf16_codes_results(res, recs, ref16, ref32, settings, eos)
    for i, r in enumerate(results):
        record(r, row=row, component="Generation, bf16", variant=variant, compares="ours vs upstream",
               notes=f"item {i}: {res.codes[i].shape[0]} frames, stop={res.stop_reason[i]}; upstream bf16 and fp32 "
                     f"on {device}, attention {ref16.meta.get('attn')} on both sides; {divergence_note(r)}")
    assert all(results), " | ".join(r.message for r in results if not r)


def _fake(codes16: torch.Tensor, codes32: torch.Tensor, ours: torch.Tensor):
    """A one-item generation and its two upstream captures, just what the rule reads (no head logits: no tie)."""
    F = ours.shape[0]
    res = SimpleNamespace(codes=[ours], stop_reason=["budget"], margins=[torch.ones(F, 16)],
                          hidden=[torch.zeros(F, 4)], n_tokens=F + 1)
    settings = SimpleNamespace(max_new_tokens=F + 1, talker=SimpleNamespace(min_new_tokens=2))
    ref = lambda c: SimpleNamespace(tap_steps=lambda name: [c])  # noqa: E731
    return res, ref(codes16), ref(codes32), settings


def test_divergence_order_is_frame_then_codebook():
    """Upstream bf16 leaves its fp32 at (frame 2, codebook 15); ours leaving upstream bf16 at (2, 0) is *before* it
    and, with no tie, fails; leaving at (3, 0) passes. The frame-only rule passed both."""
    g = torch.Generator().manual_seed(0)
    u32 = torch.randint(0, 2048, (6, 16), generator=g)
    u16 = u32.clone()
    u16[2, 15] = (u16[2, 15] + 1) % 2048  # upstream's own divergence, then its later frames follow on
    u16[3:] = (u16[3:] + 7) % 2048
    early = u16.clone()
    early[2, 0] = (early[2, 0] + 1) % 2048
    late = u16.clone()
    late[3, 0] = (late[3, 0] + 1) % 2048
    for ours, ok in ((early, False), (late, True)):
        res, r16, r32, settings = _fake(u16, u32, ours)
        r = bf16_codes_results(res, None, r16, r32, settings, eos=2150)[0]
        assert bool(r) is ok, r.message
        assert "(frame 2, codebook 15)" in divergence_note(r), divergence_note(r)
