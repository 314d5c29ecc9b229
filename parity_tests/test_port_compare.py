"""``python -m reports compare``: an outside port's HDF5 against a reference, first divergence in execution order."""

from __future__ import annotations

from collections import OrderedDict

import torch

from reference_export.h5io import write_refs
from reports.port_compare import compare_files


def _file(path, records):
    return write_refs(path, meta={}, case={}, inputs={}, records=records, progress=False)


def test_first_divergence_follows_execution_order_and_missing_taps_count(tmp_path):
    g = torch.Generator().manual_seed(0)
    recs = OrderedDict((f"z.layer{i}:out", [torch.randn(4, generator=g)]) for i in range(4))
    recs["a.late:out"] = [torch.randn(3, generator=g)]  # recorded last, sorts first by name
    ref = _file(tmp_path / "ref.h5", recs)
    ours_recs = OrderedDict((k, [v[0].clone()]) for k, v in recs.items())
    ours_recs["z.layer2:out"][0][1] += 1.0
    ours_recs["a.late:out"][0][0] += 1.0
    del ours_recs["z.layer3:out"]
    ours = _file(tmp_path / "ours.h5", ours_recs)
    results, missing = compare_files(ours, ref, "op")
    assert [r.name for r in results if not r] == ["z.layer2:out", "a.late:out"]  # upstream order, not by name
    assert missing == ["z.layer3:out"]


def test_first_divergence_is_earliest_in_time_across_decode_steps(tmp_path):
    """A tap that first ran in the prefill but diverges only at decode step 1 comes *after* a later-ordered tap that
    diverges in the prefill (step 0): the first divergence is the earliest in time, by (step, order)."""
    from reports.port_compare import check_port

    g = torch.Generator().manual_seed(0)
    recs = OrderedDict([("m.early:out", [torch.randn(4, generator=g), torch.randn(4, generator=g)]),
                        ("m.late:out", [torch.randn(4, generator=g)])])
    ref = write_refs(tmp_path / "ref.h5", meta={}, case={}, inputs={}, records=recs,
                     steps={"m.early:out": [0, 1], "m.late:out": [0]}, progress=False)
    ours = OrderedDict((k, [t.clone() for t in v]) for k, v in recs.items())
    ours["m.early:out"][1][0] += 1.0  # step 1
    ours["m.late:out"][0][0] += 1.0  # step 0, later in execution order
    c = check_port(_file(tmp_path / "ours.h5", ours), ref, "op")
    assert [t.label for t in c.checks if not t.result] == ["m.early:out@step_1", "m.late:out"]
    assert c.first_divergence.label == "m.late:out", c.first_divergence.label
