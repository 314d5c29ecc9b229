"""Fixtures the parity test files share (the session-wide options, checkpoints, references and the results
collector are in the root ``conftest.py``)."""

from __future__ import annotations

import pytest

from .helpers import _MODELS, _RUNS, ONE_MODEL, load_model, run_impl


@pytest.fixture(scope="module")
def gen_run(checkpoint_dir, reference, device, dtype, attn):
    """``gen_run(case_name) -> (ref, result, records)``, one impl run per case and module."""

    def get(case_name: str, variant: str, preset: str | None = None):
        key = (case_name, variant, preset, device, dtype, attn)
        if key not in _RUNS:
            if preset is not None:
                _RUNS.clear()  # released sizes: one run in memory at a time
                _MODELS.clear()
            elif ONE_MODEL[0]:
                # A whole released or checkpoint run: each cached run holds our recorded activations of every tap
                # of the case (upstream's side of the same taps is a 1.6-2.1 GB HDF5 file per generation case at
                # 0.6b); with four runs of one model cached, test_prompt.py reached 17 GB. One run at a time: a case
                # asked for again after another one ran is generated again.
                _RUNS.clear()
            ref = reference(case_name, variant, preset)
            tts = load_model(checkpoint_dir(variant, preset), device, dtype, attn)
            res, recs = run_impl(tts, ref)
            _RUNS[key] = (ref, res, recs)
        return _RUNS[key]

    return get
