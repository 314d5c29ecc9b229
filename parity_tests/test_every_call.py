"""Every call of a multi-call module is compared, not only the first (``helpers.Calls``, ``helpers.compare_calls``).

The rows used to read ``records[name][0]``: a module that ran more than once in a case had its later calls never
compared, and a module ours ran once more (or once less) than upstream went unnoticed. These tests show what each
piece catches:

- ``compare_calls`` pairs calls by index (a second call that differs is red where reading call 0 was green) and
  fails on a different number of calls on the two sides, in either direction, and on a tap missing on either side;
- the same on a real reference file whose tap was recorded twice (``RefFile.tap_steps`` over HDF5 call groups);
- ``Calls`` (what ``run_stack``, ``teacher_run`` and ``run_end_to_end`` return) refuses to hand a single-call reader
  (``rows.compare_row``, the bf16 judges) one call of a tap recorded several times;
- mutation self-test on tiny: the talker applying its final RMSNorm a second time to its own output. The first
  call of ``talker.model.norm:out`` still equals upstream's (the old ``[0]`` reading was green); the row turns red;
- the codec decoder's fed rows feed every recorded input call and judge each output call.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from reference_export.h5io import RefFile, write_refs

from .helpers import Calls, build_talker, compare_calls, compare_row_calls, run_stack
from .helpers_codec import D, load_codec, row_results
from .rows import Row, compare_row


class FakeRef:
    """The two methods ``compare_calls`` reads from a reference, over ``{tap: [tensor per call]}``."""

    def __init__(self, calls: dict[str, list[torch.Tensor]]):
        self.calls = calls
        self.path = SimpleNamespace(name="fake.h5")

    def has(self, name: str) -> bool:
        return name in self.calls

    def tap_steps(self, name: str) -> list[torch.Tensor]:
        return self.calls[name]


def _calls(n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, 5, generator=g) for _ in range(n)]


def test_compare_calls_pairs_every_call():
    want = _calls(3)
    ok = compare_calls("m:out", {"m:out": [t.clone() for t in want]}, FakeRef({"m:out": want}), "block")
    assert [r.name for r in ok] == [f"m:out [call {i} of 3]" for i in range(3)] and all(ok)
    one = compare_calls("m:out", {"m:out": want[:1]}, FakeRef({"m:out": want[:1]}), "block")
    assert [r.name for r in one] == ["m:out"] and all(one), "a tap recorded once keeps its name"
    bad = [t.clone() for t in want]
    bad[1][0, 3] += 1e-3  # the second call differs
    res = compare_calls("m:out", {"m:out": bad}, FakeRef({"m:out": want}), "block")
    assert [bool(r) for r in res] == [True, False, True], [r.message for r in res]
    assert "[call 1 of 3]" in res[1].message
    assert compare_calls("m:out", {"m:out": bad[:1]}, FakeRef({"m:out": want[:1]}), "block")[0], \
        "reading call 0 alone (the old v[0]) passes this case: only the later call shows it"


@pytest.mark.parametrize("n_ours,n_ref", [(2, 1), (1, 2), (3, 4)])
def test_compare_calls_fails_on_a_different_call_count(n_ours, n_ref):
    want = _calls(max(n_ours, n_ref))
    res = compare_calls("m:out", {"m:out": want[:n_ours]}, FakeRef({"m:out": want[:n_ref]}), "block")
    assert len(res) == 1 and not res[0] and res[0].judged_by == "call count"
    assert f"impl recorded {n_ours} calls, the reference fake.h5 {n_ref}" in res[0].message


def test_compare_calls_fails_on_a_missing_tap():
    x = _calls(1)
    assert not compare_calls("m:out", {}, FakeRef({"m:out": x}), "block")[0], "missing in impl"
    assert not compare_calls("m:out", {"m:out": x}, FakeRef({}), "block")[0], "missing in the reference"


def test_a_real_reference_whose_second_call_differs(tmp_path):
    """A reference file (the real writer and reader) with a tap recorded twice: ours equal on both calls is green
    on both; ours whose second call differs, or that recorded one call, is red."""
    calls = _calls(2)
    path = write_refs(tmp_path / "two_calls.h5", meta={"checkpoint_sha256": "x"}, case={}, inputs={},
                      records={"m:out": calls, "n:out": calls[:1]}, steps={"m:out": [0, 1]}, progress=False)
    with RefFile(path) as ref:
        assert len(ref.tap_steps("m:out")) == 2
        assert all(compare_calls("m:out", {"m:out": [t.clone() for t in calls]}, ref, "block"))
        late = [calls[0].clone(), calls[1] + 1e-3]
        assert [bool(r) for r in compare_calls("m:out", {"m:out": late}, ref, "block")] == [True, False]
        assert not compare_calls("m:out", {"m:out": calls[:1]}, ref, "block")[0]
        assert not compare_calls("n:out", {"n:out": calls}, ref, "block")[0], "ours twice, the reference once"


def test_calls_refuses_a_single_call_read_of_a_multi_call_tap():
    x, y = _calls(2)
    got = Calls({"a:out": [x], "b:out": [x, y]})
    assert torch.equal(got["a:out"], x) and "b:out" in got and got.get("c:out") is None and len(got) == 2
    with pytest.raises(AssertionError, match=r"b:out: impl recorded 2 calls; reading one of them would leave"):
        got["b:out"]


# ------------------------------------------------------------------------------------------ mutation self-test

VARIANT = "custom_voice"
NORM = "talker.model.norm:out"


def _norm_twice(talker) -> None:
    """The bug: the decoder stack's final RMSNorm applied again to its own output (instance attribute only)."""
    model = talker.model
    inner = model.forward
    model.forward = lambda *a, **k: model.norm(inner(*a, **k))


@pytest.mark.mutation
def test_mutation_final_norm_run_twice(checkpoint_dir, reference, record):
    ckpt = checkpoint_dir(VARIANT)
    ref = reference("talker_stack", VARIANT)
    row = Row("Talker final norm", (NORM,), "block")
    clean = run_stack(build_talker(ckpt), ref, "cpu", "eager")
    assert all(compare_row_calls(row, clean, ref)), "the final norm row must be green before mutating"
    talker = build_talker(ckpt)
    _norm_twice(talker)
    got = run_stack(talker, ref, "cpu", "eager")
    assert len(got.calls[NORM]) == 2
    first = compare_calls(NORM, {NORM: got.calls[NORM][:1]}, ref, "block")
    assert all(first), "the mutation's first norm call equals upstream's: the old [0] reading saw nothing"
    red = compare_row_calls(row, got, ref)
    for r in red:
        record(r, row="mutation final-norm-run-twice → Talker final norm", component="Mutation self-test",
               variant=VARIANT, expect_fail=True,
               notes="call 0 of talker.model.norm:out equals upstream's; reading only call 0 left this row green")
    assert not any(red), "the final norm run twice left the row green: later calls are not compared"
    with pytest.raises(AssertionError, match="impl recorded 2 calls"):
        compare_row(row, got, ref)  # the single-call reader fails too, rather than reading call 0


# ------------------------------------------------------------------------------------------ codec: fed rows


def test_codec_fed_row_feeds_every_call(checkpoint_dir, reference, tmp_path):
    """The codec decoder's fed rows (``helpers_codec.row_results``) feed our module every input call upstream
    recorded and pair each output with upstream's: on a reference holding the SnakeBeta ``decoder.5`` twice (the
    real first call, then the same input with its output changed in one sample) the row is green on call 0 and
    red on call 1; with the real single call it is green."""
    codec = load_codec(checkpoint_dir("base"))
    real = reference("codec_decoder", "base")
    name_in, name_out = f"{D}.decoder.5:in", f"{D}.decoder.5:out"
    x, y = real.tap(name_in), real.tap(name_out)
    y2 = y.clone()
    y2.view(-1)[7] += 1e-2
    row = Row("SnakeBeta", (), "op", driver="fed", modules=("decoder.5",))
    path = write_refs(tmp_path / "twice.h5", meta={"checkpoint_sha256": "x"}, case={}, inputs={},
                      records={name_in: [x, x.clone()], name_out: [y, y2]}, progress=False)
    with RefFile(path) as ref:
        res = row_results(row, codec, ref, "eager")
    assert [r.name for r in res] == [f"{name_out} [call 0 of 2]", f"{name_out} [call 1 of 2]"]
    assert [bool(r) for r in res] == [True, False], [r.message for r in res]
    assert all(row_results(row, codec, real, "eager")), "the real reference (one call) is green"
