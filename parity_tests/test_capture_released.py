"""Issue 16, item 4: released-size capture in bounded memory, and its recorded measurement.

- ``reference_export.upstream.read_weights`` (upstream's loader reads each tensor through one bounded buffer into
  its final dtype) gives exactly what safetensors' own reader gives followed by ``.to(dtype)``, across chunk
  boundaries, with integer tensors kept;
- ``reference_export.measure_capture``: the weights' bytes from a header, and the JSON record (a run of the same
  configuration replaces the older one);
- ``reports.capture_perf``: the VALIDATION.md section from a hand-made JSON (rows, budget verdicts, the grid's
  missing configurations, an unreadable file in one line).

The measurement itself (a released-size capture, minutes to hours) is opt-in: ``python -m reference_export
measure-capture``; nothing here runs it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from reference_export import measure_capture, upstream
from reports.capture_perf import capture_perf_section


@pytest.fixture
def st_file(tmp_path: Path) -> Path:
    g = torch.Generator().manual_seed(0)
    tensors = {"a.weight": torch.randn(37, 11, generator=g), "b.bias": torch.randn(5, generator=g),
               "c.idx": torch.arange(7, dtype=torch.int64), "d.half": torch.randn(3, 9, generator=g).bfloat16(),
               "e.flag": torch.tensor([True, False])}
    p = tmp_path / "model.safetensors"
    save_file(tensors, str(p))
    return p


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("chunk", [8, 12, 1 << 24], ids=["chunk8", "chunk12", "chunk16M"])
def test_read_weights_equals_safetensors_then_cast(st_file, monkeypatch, dtype, chunk):
    monkeypatch.setattr(upstream, "_CHUNK", chunk)  # 8 and 12 bytes: every tensor spans several reads
    got = upstream.read_weights(st_file, "cpu", dtype)
    want = load_file(str(st_file))
    assert sorted(got) == sorted(want)
    for k, w in want.items():
        w = w.to(dtype) if w.is_floating_point() else w  # what Module.to(dtype) does after a load
        assert got[k].dtype == w.dtype, k
        assert got[k].shape == w.shape, k
        assert torch.equal(got[k], w), k


def test_read_weights_maps_lookup_tables_copy_on_write(st_file):
    """A lookup table in the file's own dtype is a view of a private mapping: same values, and a write to it (a test
    mutating a weight) changes neither the file nor a second load."""
    before = st_file.read_bytes()
    got = upstream.read_weights(st_file, "cpu", torch.float32, map_keys=frozenset({"a.weight", "d.half"}))
    want = load_file(str(st_file))
    assert torch.equal(got["a.weight"], want["a.weight"])
    assert got["d.half"].dtype == torch.float32 and torch.equal(got["d.half"], want["d.half"].float())  # cast: read
    got["a.weight"].add_(1.0)
    assert st_file.read_bytes() == before
    again = upstream.read_weights(st_file, "cpu", torch.float32, map_keys=frozenset({"a.weight"}))
    assert torch.equal(again["a.weight"], want["a.weight"])


@pytest.mark.parametrize("chunk", [8, 1 << 24], ids=["chunk8", "chunk16M"])
def test_read_weights_cast_lookup_tables_are_mapped_copies(st_file, monkeypatch, chunk, tmp_path):
    """A lookup table in another dtype is cast into an unlinked temporary file and mapped: the values equal the
    whole-tensor cast, a write stays private, and no temporary file is left behind."""
    monkeypatch.setattr(upstream, "_CHUNK", chunk)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    got = upstream.read_weights(st_file, "cpu", torch.bfloat16, map_keys=frozenset({"a.weight", "c.idx"}))
    want = load_file(str(st_file))
    assert got["a.weight"].dtype == torch.bfloat16 and torch.equal(got["a.weight"], want["a.weight"].bfloat16())
    assert got["c.idx"].dtype == torch.int64 and torch.equal(got["c.idx"], want["c.idx"])
    got["a.weight"].mul_(0)
    assert torch.equal(upstream.read_weights(st_file, "cpu", torch.bfloat16)["a.weight"], want["a.weight"].bfloat16())
    assert list(tmp.iterdir()) == []


def test_read_weights_truncated_file_is_one_line(st_file, tmp_path):
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(st_file.read_bytes()[:-20])
    with pytest.raises(Exception) as e:
        upstream.read_weights(bad, "cpu", torch.float32)
    assert "\n" not in str(e.value).strip()
    with pytest.raises(FileNotFoundError, match="weights not found"):
        upstream.read_weights(tmp_path / "absent.safetensors", "cpu", torch.float32)


def test_weight_bytes_from_header(st_file):
    # Floating tensors in the capture dtype, the others as stored: counted by hand from the shapes above.
    floats = 37 * 11 + 5 + 3 * 9
    others = 7 * 8 + 2 * 1
    assert measure_capture.weight_bytes(st_file, "float32") == floats * 4 + others
    assert measure_capture.weight_bytes(st_file, "bfloat16") == floats * 2 + others


def _run(preset="0.6b", dtype="float32", taps=(), peak=5.0e9, weights=4.0e9, **kw) -> dict:
    r = {"preset": preset, "variant": "custom_voice", "dtype": dtype, "codec_dtype": "float32", "taps": list(taps),
         "frames_requested": 100, "frames_ran": [100], "stop_reason": ["budget"], "decode_steps": 101,
         "wall_s": 754.2, "peak_rss_bytes": int(peak), "weights_bytes": int(weights),
         "peak_over_weights": round(peak / weights, 3), "budget": 1.3, "output_bytes": 654_000_000,
         "tap_calls_written": 12345,
         "provenance": {"git": "0123456789abcdef+dirty", "date_utc": "2026-01-01T00:00:00+00:00", "cpu": "Test CPU",
                        "cores": 2, "mem_total_gb": 23.5, "load_average_1m": 3.5, "load_average_1m_after": 3.9,
                        "torch": "2.x", "transformers": "4.57.3", "qwen_tts": "0.1.1",
                        "command": "python -m reference_export measure-capture --preset 0.6b",
                        "checkpoint": {"synthetic": True, "preset": preset, "variant": "custom_voice"}}}
    r.update(kw)
    return r


def test_record_replaces_the_same_configuration(tmp_path):
    p = tmp_path / "capture-released.json"
    measure_capture.record(p, _run(wall_s=1.0))
    measure_capture.record(p, _run(dtype="bfloat16", wall_s=2.0))
    measure_capture.record(p, _run(wall_s=3.0))  # same preset/dtype/frames/taps as the first: replaces it
    measure_capture.record(p, _run(taps=["talker.model.layers.0*"], wall_s=4.0))
    runs = json.loads(p.read_text())["runs"]
    assert [(r["dtype"], r["taps"], r["wall_s"]) for r in runs] == [
        ("float32", [], 3.0), ("float32", ["talker.model.layers.0*"], 4.0), ("bfloat16", [], 2.0)]
    p.write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a capture measurement file"):
        measure_capture.record(p, _run())


def test_section_renders_rows_verdicts_and_missing(tmp_path):
    noted = _run(taps=["talker.model.layers.0*"], peak=4.4e9, output_bytes=12_300_000)
    noted["provenance"] = dict(noted["provenance"], note="a synth ran alongside")
    runs = [_run(), noted,
            _run(dtype="bfloat16", peak=3.5e9, weights=2.35e9)]
    (tmp_path / "capture-released.json").write_text(json.dumps({"runs": runs}))
    text = "\n".join(capture_perf_section(tmp_path))
    assert "## Capture at released sizes (recorded)" in text
    assert "1.25× (within 1.3×)" in text  # 5.0 / 4.0
    assert "1.10× (within 1.3×)" in text  # 4.4 / 4.0
    assert "1.49× (**over** 1.3×)" in text  # 3.5 / 2.35: over the budget says so
    assert "12 min 34 s" in text and "654.0" in text and "12.3" in text
    assert "100 / 100 (budget)" in text
    assert "**Not measured:** 0.6b bfloat16 (one layer), 1.7b float32 (all), 1.7b float32 (one layer), " \
           "1.7b bfloat16 (all), 1.7b bfloat16 (one layer)." in text
    assert "synthetic checkpoint (random weights, 0.6b custom_voice layout)" in text
    assert "load average 3.50 before, 3.90 after" in text
    assert text.count("Note: a synth ran alongside") == 1
    # the freshness flag of the bench section: this sha is unknown to the repository
    assert "Possibly stale" in text and "0123456789" in text


def test_section_absent_or_unreadable(tmp_path):
    assert capture_perf_section(tmp_path) == []
    (tmp_path / "capture-released.json").write_text("{not json")
    lines = capture_perf_section(tmp_path)
    bad = [ln for ln in lines if "unreadable" in ln]
    assert len(bad) == 1 and "capture-released.json" in bad[0]
    (tmp_path / "capture-released.json").write_text(json.dumps({"runs": [{"preset": "0.6b"}]}))
    text = "\n".join(capture_perf_section(tmp_path))
    assert "run 0 lacks key" in text


def test_capture_measured_paths_cover_its_imports(checkpoint_dir, tmp_path):
    """A capture row goes stale only when code it runs changes (``reports.capture_perf.CAPTURE_MEASURED_PATHS``):
    every repository module that ``measure-capture`` or its ``capture --request`` child imports must be listed.
    Python's import log (``PYTHONPROFILEIMPORTTIME``, inherited by the child) of a tiny measure-capture says which."""
    import os
    import subprocess
    import sys

    from reports.capture_perf import CAPTURE_MEASURED_PATHS

    root = Path(__file__).resolve().parent.parent
    ck = checkpoint_dir("custom_voice")
    speaker = next(iter(json.loads((ck / "config.json").read_text())["talker_config"]["spk_id"]))
    cmd = [sys.executable, "-m", "reference_export", "measure-capture", "--preset", "tiny", "--checkpoint", str(ck),
           "--frames", "2", "--speaker", speaker, "--json", str(tmp_path / "m.json"), "--out", str(tmp_path / "c.h5")]
    r = subprocess.run(cmd, cwd=root, capture_output=True, text=True, env={**os.environ, "PYTHONPROFILEIMPORTTIME": "1"},
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(json.loads((tmp_path / "m.json").read_text())["runs"]) == 1
    names = {ln.rsplit("|", 1)[1].strip() for ln in r.stderr.splitlines() if ln.startswith("import time:")}
    ours = {n for n in names if n.split(".")[0] in ("impl", "reference_export")}
    assert {"impl.config", "reference_export.capture"} <= ours, "the import log was not read from both processes"
    files = []
    for n in sorted(ours):
        base = root.joinpath(*n.split("."))
        f = base / "__init__.py" if base.is_dir() else base.with_suffix(".py")
        assert f.is_file(), f"{n}: no file {f}"
        files.append(f.relative_to(root).as_posix())
    missing = [f for f in files if not any(f == p or f.startswith(p + "/") for p in CAPTURE_MEASURED_PATHS)]
    assert not missing, f"imported by a capture measurement but not in CAPTURE_MEASURED_PATHS: {missing}"
