"""Released-size runs: references captured in a child process, one model of ours shared, memory in the provenance.

- ``conftest.capture_in_child`` writes the file an in-process capture writes (every dataset bit for bit, every
  attribute but the capture's own timing), charges the child's peak RSS to the running test, and fails in one line
  naming the case when the child fails (a missing reference is a failure, never a pass).
- ``helpers.load_model`` under ``ONE_MODEL`` (set for ``--preset 0.6b|1.7b`` and ``--checkpoint``) keeps one model in
  memory: loading another frees the first.
- ``helpers_codec.bf16_decode_skip_reason``: when a released-size bf16 decode is skipped.
- ``Results.watch_rss`` charges each test the high-water mark reached since the previous one (the mark is lowered
  after each reading), so a light test after a heavy one reads light.
- ``conftest.memory_provenance``, ``reports.merge.combined_memory`` and ``reports.render.memory_line`` (the peak
  memory line of a recorded section) on fixed numbers.
"""

from __future__ import annotations

import gc
import weakref

import h5py
import numpy as np
import pytest
import torch

import conftest
from parity_tests import capture_child, helpers
from reports.merge import combined_memory
from reports.render import memory_line

CASE, VARIANT = "talker_stack", "custom_voice"


def _datasets(path) -> dict:
    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda n, o: out.__setitem__(n, (o[()], dict(o.attrs))) if isinstance(o, h5py.Dataset) else None)
        out["/attrs"] = (None, dict(f.attrs))
    return out


def _same(a, b) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        a, b = np.asarray(a), np.asarray(b)
        return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    return a == b


def test_child_capture_writes_the_in_process_file(checkpoint_dir, tmp_path, monkeypatch):
    from reference_export.export import capture_case

    ckpt = checkpoint_dir(VARIANT)
    inproc, child = tmp_path / "inproc.h5", tmp_path / "child.h5"
    capture_case(CASE, ckpt, inproc, seed=conftest.SEED, progress=False, codec_dtype="float32")
    monkeypatch.setattr(conftest._RESULTS, "current", "test-capture-child")
    stats = conftest.capture_in_child(CASE, ckpt, child, device="cpu", dtype="float32", codec_dtype="float32",
                                      attn="eager")
    assert stats["case"] == CASE and stats["peak_rss_gb"] > 0 and stats["wall_s"] > 0
    charged = conftest._RESULTS.take("test-capture-child")  # charged to the running test, removed here again
    assert charged and charged["captures"] == [{**stats, "nodeid": "test-capture-child"}]
    a, b = _datasets(inproc), _datasets(child)
    assert sorted(a) == sorted(b) and len(a) > 20
    for name in a:
        (va, aa), (vb, ab) = a[name], b[name]
        assert _same(va, vb), name
        keys = set(aa) | set(ab)
        differ = sorted(k for k in keys if not _same(aa.get(k), ab.get(k)))
        # the capture's own wall-clock stamps are the only attributes allowed to differ
        assert all("time" in k or "created" in k for k in differ), (name, differ)


def test_a_failed_child_capture_is_one_line_naming_the_case(checkpoint_dir, tmp_path):
    out = tmp_path / "x.h5"
    with pytest.raises(conftest.CaptureChildError, match=r"^capture of lm_cp_teacher on .* in a child process failed "
                                                         r"\(exit [1-9]\d*\): .*voice_design") as e:
        conftest.capture_in_child("lm_cp_teacher", checkpoint_dir("voice_design"), out, device="cpu",
                                  dtype="float32", codec_dtype="float32", attn="eager")
    assert "\n" not in str(e.value) and not out.exists()


def test_one_model_keeps_one_model_in_memory(checkpoint_dir, monkeypatch):
    monkeypatch.setattr(helpers, "ONE_MODEL", [True])
    monkeypatch.setattr(helpers, "_MODELS", {})
    monkeypatch.setattr(helpers, "_RUNS", {"a run": ()})
    ckpt = checkpoint_dir(VARIANT)
    first = helpers.load_model(ckpt, "cpu", torch.float32, "eager")
    assert helpers.load_model(ckpt, "cpu", torch.float32, "eager") is first  # shared, not loaded again
    gone = weakref.ref(first)
    del first
    second = helpers.load_model(ckpt, "cpu", torch.float32, "sdpa")
    gc.collect()
    assert gone() is None and list(helpers._MODELS.values()) == [second] and helpers._RUNS == {}


def test_memory_provenance_line_and_merge():
    peaks = [{"bytes": 5_000_000_000, "nodeid": "t::a"}, {"bytes": 6_000_000_000, "nodeid": "t::b"}, {}]
    caps = [{"case": "c1", "peak_rss_gb": 4.2, "wall_s": 10.0}, {"case": "c2", "peak_rss_gb": 3.9, "wall_s": 5.5}]
    mem = conftest.memory_provenance(peaks, {"/x/small": 1_000_000_000, "/x/big": 4_000_000_000}, caps)
    assert mem == {"peak_rss_gb": 6.0, "peak_rss_test": "t::b", "weights_gb": 4.0, "weights_checkpoint": "/x/big",
                   "peak_over_weights": 1.5, "capture_children": 2, "capture_children_peak_rss_gb": 4.2,
                   "capture_children_wall_s": 15.5}
    assert conftest.memory_provenance([{}], {}, []) is None
    peaks[1]["top"] = [[6_000_000_000, "t::b"], [2_000_000_000, "t::d"]]
    peaks[0]["top"] = [[5_000_000_000, "t::a"]]
    assert conftest.memory_provenance(peaks, {}, [])["heaviest_tests"] == [[6.0, "t::b"], [5.0, "t::a"], [2.0, "t::d"]]
    assert memory_line(mem) == ("pytest 6.00 GB peak RSS = 1.50× the weights of the largest checkpoint used "
                                "(4.00 GB), reached in `t::b`; upstream references captured in 2 child processes, "
                                "peak 4.20 GB, 16 s in all")
    assert memory_line(None) == "" and memory_line({"peak_rss_gb": 0}) == ""
    other = {"peak_rss_gb": 5.0, "peak_rss_test": "t::c", "weights_gb": 4.0, "peak_over_weights": 1.25,
             "capture_children": 1, "capture_children_peak_rss_gb": 4.5, "capture_children_wall_s": 2.0}
    both = combined_memory([mem, other, None])
    assert both["peak_rss_test"] == "t::b" and both["peak_rss_gb"] == 6.0
    assert (both["capture_children"], both["capture_children_peak_rss_gb"], both["capture_children_wall_s"]) == \
        (3, 4.5, 17.5)
    assert combined_memory([None, {}]) is None


def test_each_test_is_charged_its_own_peak():
    if not capture_child.reset_rss_high_water():
        pytest.skip("this kernel does not let a process lower its VmHWM (/proc/self/clear_refs)")
    res = conftest.Results()
    res.watch_rss("t::before")  # whatever ran before this test
    big = np.ones(400_000_000 // 8)  # 400 MB, touched
    del big
    res.watch_rss("t::heavy")
    res.watch_rss("t::light")
    got = {nid: b for b, nid in res.peak["top"]}
    assert got["t::heavy"] - got["t::light"] > 300_000_000, got
    assert res.peak["nodeid"] in ("t::heavy", "t::before")


def test_bf16_decode_is_skipped_only_where_it_cannot_finish(monkeypatch):
    """A released-size bf16 codec decode is skipped only on released dimensions, on a CPU, where bf16 Conv1d is
    more than the limit slower than fp32; the reason carries the measured ratio."""
    from parity_tests import helpers_codec

    monkeypatch.setattr(helpers_codec, "bf16_conv_slowdown", lambda: 75.0)
    monkeypatch.setattr(helpers, "ONE_MODEL", [False])
    assert helpers_codec.bf16_decode_skip_reason("cpu") is None  # tiny: always run
    monkeypatch.setattr(helpers, "ONE_MODEL", [True])
    assert "75x slower than fp32" in helpers_codec.bf16_decode_skip_reason("cpu")
    assert helpers_codec.bf16_decode_skip_reason("cuda") is None
    monkeypatch.setattr(helpers_codec, "bf16_conv_slowdown", lambda: 1.3)
    assert helpers_codec.bf16_decode_skip_reason("cpu") is None
