"""The comparison engine (reports/compare.py): metrics, tiers, exact comparison, failure messages."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from reports.compare import TIERS, compare, compare_exact, tier_for

floats = st.floats(-1e3, 1e3, allow_nan=False, width=32)


@settings(max_examples=60, deadline=None)
@given(st.lists(floats, min_size=1, max_size=64))
def test_identical_tensors_pass_every_close_tier(xs):
    t = torch.tensor(xs)
    for tier in ("op", "block", "stack"):
        r = compare("x", t, t.clone(), tier)
        assert r and r.max_abs == 0 and r.needed_atol == 0 and r.n_mismatch == 0


@settings(max_examples=60, deadline=None)
@given(st.lists(floats, min_size=1, max_size=64), st.integers(0, 63), st.floats(1e-3, 10))
def test_a_perturbation_beyond_tolerance_fails_and_is_located(xs, i, delta):
    ref = torch.tensor(xs, dtype=torch.float64)
    got = ref.clone()
    i = i % len(xs)
    got[i] += delta + 2 * TIERS["op"].rtol * abs(float(ref[i]))
    r = compare("x", got, ref, "op")
    assert not r
    assert r.worst_index == [i]
    assert math.isclose(r.max_abs, float((got - ref).abs().max()), rel_tol=1e-9)
    # the recorded "smallest passing" tolerances really pass
    assert compare("x", got, ref, TIERS["op"].__class__("t", rtol=TIERS["op"].rtol, atol=r.needed_atol * (1 + 1e-9)))


def test_metrics_values():
    ref = torch.tensor([1.0, -2.0, 4.0])
    got = torch.tensor([1.0, -2.0, 4.5])
    r = compare("x", got, ref, "block")
    assert not r
    assert r.max_abs == 0.5 and math.isclose(r.max_rel, 0.125)
    assert math.isclose(r.nmse, 0.25 / 21)
    assert math.isclose(r.snr_db, 10 * math.log10(21 / 0.25))
    assert "1/3" in r.message and "(2,)" in r.message


def test_nan_inf_shape_and_empty_fail():
    a = torch.tensor([1.0, float("nan")])
    assert not compare("x", a, torch.tensor([1.0, 2.0]), "stack")
    assert not compare("x", torch.ones(2), torch.ones(3), "stack")
    assert "zero elements" in compare("x", torch.ones(0), torch.ones(0), "stack").message
    assert "zero elements" in compare_exact("x", torch.ones(0), torch.ones(0)).message


def test_exact_reports_first_difference_by_axis_names():
    ref = torch.arange(48).view(3, 16)
    got = ref.clone()
    got[1, 5] = -1
    got[2, 0] = -1
    r = compare_exact("codes", got, ref, axes=("frame", "codebook"))
    assert not r and r.first_diff == [1, 5] and r.n_mismatch == 2
    assert "frame=1, codebook=5" in r.message
    assert compare_exact("codes", ref, ref.clone())


def test_integer_tensors_are_compared_exactly_whatever_the_tier():
    r = compare("ids", torch.tensor([1, 2]), torch.tensor([1, 3]), "stack")
    assert r.tier == "exact" and not r


def test_nmse_is_required_in_stack_tier():
    ref = torch.full((1000,), 1e-3)
    got = ref + 5e-5  # inside atol 1e-4 elementwise, but NMSE = 2.5e-3
    r = compare("x", got, ref, "stack")
    assert not r and r.n_mismatch == 0 and "NMSE" in r.message


def test_referee_tier():
    ref = torch.randn(100, generator=torch.Generator().manual_seed(0))
    ours = ref + 0.01
    assert compare("x", ours, ref, "referee", referee_ref_err=0.01)
    assert not compare("x", ours, ref, "referee", referee_ref_err=0.001)
    assert not compare("x", ours, ref, "referee")  # no upstream error given: cannot judge


def test_tier_overrides_by_glob():
    ov = {"*.attn_probs": "block", "talker.model.layers.*": "stack"}
    assert tier_for("talker.model.layers.3:out", "op", ov).name == "stack"
    assert tier_for("x.attn_probs", "op", ov).name == "block"
    assert tier_for("other", "op", ov).name == "op"


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_exact_tier_fails_on_nan_and_inf_even_when_both_sides_agree(bad):
    """NaN/Inf is a failure in every tier: NaN == NaN (or inf == inf) on both sides is no evidence of parity."""
    t = torch.tensor([1.0, bad, 3.0])
    for r in (compare_exact("x", t, t.clone()), compare("x", t, t.clone(), "exact")):
        assert not r and "non-finite" in r.message
    assert compare_exact("ids", torch.tensor([1, 2]), torch.tensor([1, 2]))  # integers: no NaN to worry about
