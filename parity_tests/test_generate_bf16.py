"""bf16 generation against upstream bf16 on the same device (issue 7, item 7): the ``lm_gen_*`` cases run by
upstream in bf16 and in fp32 and by impl in bf16, judged by the rule of ``parity_tests/helpers_bf16.py``.

Rows ``Greedy codes <mode>/<variant> (<text>, bf16)``, one per mode, one result per batch item: ours-bf16 equal to
upstream-bf16 up to our first divergence (frame, codebook), which may not come before upstream-bf16's own
divergence from upstream-fp32 (or must be a tie of at most one bf16 ulp); functional checks after it. ``extra``
carries the three divergence points (ours vs upstream bf16, upstream bf16 vs its fp32, ours vs upstream fp32), our
margin and the tie threshold there.

Streaming text runs by default (4 modes); non-streaming text is ``slow``. In a ``--dtype bfloat16`` session these
rows come from ``test_generate.py::test_greedy_codes`` (all 8 cases, same rule), so this file skips there.
"""

from __future__ import annotations

import pytest
import torch

from reference_export.cases.lm import MODES, gen_case_name

from .helpers import MODE_NAME, TEXT_NAME
from .helpers_bf16 import bf16_codes_results, bf16_run

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
                     f"on {device}")
    assert all(results), " | ".join(r.message for r in results if not r)
