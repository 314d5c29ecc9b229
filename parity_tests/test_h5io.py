"""The reference HDF5 schema: round trips, atomic writes, clear failures."""

from __future__ import annotations

import h5py
import pytest
import torch

from reference_export.h5io import SCHEMA_VERSION, ReferenceError_, RefFile, write_refs


def _write(path, **kw):
    args = dict(meta={"checkpoint_sha256": "abc", "versions": {"torch": "x"}}, case={"text": "hi", "n": 3, "l": [1, 2]},
                inputs={"ids": torch.tensor([[1, 2, 3]])},
                records={"a.b:out": [torch.randn(2, 3)], "a.b:q_rope": [torch.randn(1), torch.randn(1)],
                         "c:out": [torch.randn(4).to(torch.bfloat16)]},
                steps={"a.b:q_rope": [0, 1]}, progress=False)
    args.update(kw)
    return write_refs(path, **args)


def test_round_trip_keeps_values_dtypes_and_steps(tmp_path):
    recs = {"a.b:out": [torch.randn(2, 3)], "a.b:q_rope": [torch.randn(1), torch.randn(1)],
            "c:out": [torch.randn(4).to(torch.bfloat16)]}
    p = _write(tmp_path / "r.h5", records=recs)
    with RefFile(p, expect_checkpoint_sha256="abc") as r:
        assert r.meta["schema_version"] == SCHEMA_VERSION and r.meta["versions"] == {"torch": "x"}
        assert r.case == {"text": "hi", "n": 3, "l": [1, 2]}
        assert torch.equal(r.input("ids"), torch.tensor([[1, 2, 3]]))
        assert torch.equal(r.tap("a.b:out"), recs["a.b:out"][0])
        steps = r.tap_steps("a.b:q_rope")
        assert len(steps) == 2 and torch.equal(steps[1], recs["a.b:q_rope"][1])
        bf = r.tap("c:out")
        assert bf.dtype == torch.bfloat16 and torch.equal(bf, recs["c:out"][0])
        assert r.names() == ["a.b:out", "a.b:q_rope", "c:out"]
    with h5py.File(p) as f:
        ds = f["taps/a.b/q_rope/step_00001"]
        assert ds.attrs["step"] == 1 and ds.attrs["finite"]


def test_missing_tap_and_wrong_checkpoint_are_errors(tmp_path):
    p = _write(tmp_path / "r.h5")
    with RefFile(p) as r:
        with pytest.raises(ReferenceError_, match="no reference tap 'a.b:nope'"):
            r.tap("a.b:nope")
        with pytest.raises(ReferenceError_, match="recorded 2 times"):
            r.tap("a.b:q_rope")
    with pytest.raises(ReferenceError_, match="re-capture"):
        RefFile(p, expect_checkpoint_sha256="def")
    with pytest.raises(ReferenceError_, match="not found"):
        RefFile(tmp_path / "absent.h5")


def test_schema_version_is_checked(tmp_path):
    p = _write(tmp_path / "r.h5")
    with h5py.File(p, "a") as f:
        f.attrs["schema_version"] = 99
    with pytest.raises(ReferenceError_, match="schema_version 99"):
        RefFile(p)


def test_failed_write_leaves_no_partial_file_and_keeps_the_old_one(tmp_path):
    p = _write(tmp_path / "r.h5")
    before = p.read_bytes()

    class Boom:
        shape = (1,)

    with pytest.raises((TypeError, AttributeError)):
        _write(p, records={"x:out": [Boom()]})
    assert p.read_bytes() == before
    assert [q.name for q in tmp_path.iterdir()] == ["r.h5"]
