"""``python -m reference_export bench`` (``reference_export/bench.py`` around ``impl/bench.py``, upstream timed by
``reference_export/upstream_bench.py``), ``python -m impl bench`` (ours only) and the report section
(``reports/perf.py``). A tiny smoke run checks the command end to end and the JSON layout; no timing is ever
asserted (timings depend on the machine and its load), only what must hold on any machine: the static step's codes
equal the eager loop's, and greedy fp32 codes equal upstream's.
"""

from __future__ import annotations

import json

import pytest

from impl.__main__ import main as impl_main
from reference_export.bench import main as bench_main
from reports.perf import performance_section


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as e:
        impl_main(["bench", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for opt in ("--model", "--device", "--dtype", "--frames", "--batch", "--json"):
        assert opt in out


@pytest.mark.parametrize("argv,needle", [
    pytest.param(["--model", "/nonexistent/folder"], "config.json", id="no-folder"),
    pytest.param(["--model", ".", "--frames", "0"], "--frames 0", id="zero-frames"),
])
def test_bad_input_is_one_line(argv, needle, capsys):
    assert bench_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err


def test_bad_batch_list_is_refused(capsys):
    with pytest.raises(SystemExit) as e:
        bench_main(["--model", ".", "--batch", "1,x"])
    assert e.value.code == 2
    assert "'1,x'" in capsys.readouterr().err


def test_smoke_run_writes_the_layout(checkpoint_dir, tmp_path, capsys):
    out = tmp_path / "bench-cpu-tiny.json"
    rc = bench_main(["--model", str(checkpoint_dir("custom_voice")), "--frames", "3", "--repeats", "1",
                     "--warmup", "0", "--batch", "1", "--chunks", "1", "--json", str(out)])
    assert rc == 0, capsys.readouterr().err
    data = json.loads(out.read_text())
    prov = data["provenance"]
    for key in ("cpu", "torch", "torch_threads", "dtype", "warmup", "repeats", "read_bandwidth_gbs", "git"):
        assert key in prov, key
    assert prov["checkpoint"] == {"synthetic": True, "variant": "custom_voice", "preset": "tiny"}
    assert "--model <path>" in prov["command"] and str(tmp_path) not in prov["command"], prov["command"]
    (run,) = data["runs"]
    assert (run["device"], run["dtype"], run["preset"], run["batch"], run["frames"]) == ("cpu", "float32", "tiny", 1, 3)
    for key in ("frames_per_s", "rtf", "first_audio_ms_chunk1", "peak_mem_gb", "x_read_floor"):
        assert key in run["ours"], key
    assert "frames_per_s" in run["upstream"] and "peak_mem_gb" in run["upstream"]
    assert run["fast_equals_eager"] is True, "the static step must give the eager loop's codes"
    assert run["codes_equal"] is True, "greedy fp32 codes must equal upstream's on the same folder"
    # The report section renders it (and flags a broken file instead of skipping it).
    (tmp_path / "bench-cpu-broken.json").write_text("{not json")
    md = "\n".join(performance_section(tmp_path))
    assert "bench-cpu-tiny.json" in md and "| float32 |" in md
    assert "bench-cpu-broken.json`: unreadable" in md


def test_recorded_bench_is_flagged_stale_and_shows_no_machine_path(tmp_path):
    """A bench file gets the recorded sections' freshness check: a sha this repository does not know (or one before
    the last change to the measured code) is flagged, and a recorded absolute path is shown as <path>."""
    run = {"device": "cpu", "dtype": "float32", "preset": "tiny", "batch": 1, "frames": 3, "fast_mode": "eager",
           "ours": {"frames_per_s": 1.0}, "upstream": {"frames_per_s": 1.0}, "ratios": {}}
    prov = {"git": "0" * 40, "date_utc": "2026-01-01T00:00:00Z", "cpu": "x",
            "command": "python -m impl bench --model /home/someone/ckpt --json /tmp/b.json"}
    (tmp_path / "bench-cpu-tiny.json").write_text(json.dumps({"provenance": prov, "runs": [run]}))
    md = "\n".join(performance_section(tmp_path))
    assert "Possibly stale" in md and "is unknown here" in md, md
    assert "/home/someone" not in md and "--model <path> --json <path>" in md, md
    assert "checkpoint kind not recorded" in md
