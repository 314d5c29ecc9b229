"""Fixtures the parity test files share (the session-wide options, checkpoints, references and the results
collector are in the root ``conftest.py``)."""

from __future__ import annotations

import pytest

from .helpers import _MODELS, _RUNS, GEN_TAPS, ONE_MODEL, free_memory, load_model, run_impl


@pytest.fixture(scope="module")
def gen_run(checkpoint_dir, reference, device, dtype, attn):
    """``gen_run(case_name) -> (ref, result, records)``, one impl run per case and module."""

    def get(case_name: str, variant: str, preset: str | None = None):
        key = (case_name, variant, preset, device, dtype, attn)
        if key not in _RUNS:
            if preset is not None or ONE_MODEL[0]:
                # Released sizes (a slow row's preset, or a whole released or checkpoint run): one cached run at a
                # time; a case asked for again after another one ran is generated again. With four runs of one
                # model cached (every tap recorded then), test_prompt.py reached 17 GB at 0.6b.
                _RUNS.clear()
                if preset is not None:
                    _MODELS.clear()  # a released model asked for by a tiny session is not kept beside the tiny ones
                free_memory()
            ref = reference(case_name, variant, preset)
            tts = load_model(checkpoint_dir(variant, preset), device, dtype, attn)
            res, recs = run_impl(tts, ref, include=GEN_TAPS)
            _RUNS[key] = (ref, res, recs)
        return _RUNS[key]

    return get
