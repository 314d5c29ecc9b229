"""Capture one reference case in a process of its own (``conftest.reference_file`` on released dimensions or a
user's checkpoint): upstream loads here, writes the HDF5 file and exits, so its weights are never in memory beside
ours. The last line on stdout is JSON: the child's peak RSS and wall time, which the parent records in the results'
provenance.

    python -m parity_tests.capture_child CASE CHECKPOINT OUT [--device cpu] [--dtype float32] [--codec-dtype D]
        [--attn eager] [--seed 0] [--tf32 MC] [--threads N]

``--tf32 MC`` sets ``torch.backends.cuda.matmul.allow_tf32`` to M and ``torch.backends.cudnn.allow_tf32`` to C (0 or
1; the digits of ``conftest.capture_key_parts()["tf32"]``). The parent passes its own TF32 flags and thread count, so the file is the one an in-process capture would write
(``test_capture_child.py`` checks that dataset by dataset).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m parity_tests.capture_child", description=__doc__.split("\n\n")[0])
    p.add_argument("case")
    p.add_argument("checkpoint")
    p.add_argument("out")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--codec-dtype", default=None)
    p.add_argument("--attn", default="eager")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tf32", default=None, choices=["00", "01", "10", "11"])
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    t0 = time.time()

    import torch

    from reference_export.export import capture_case

    if a.threads:
        torch.set_num_threads(a.threads)
    if a.tf32:
        torch.backends.cuda.matmul.allow_tf32 = a.tf32[0] == "1"
        torch.backends.cudnn.allow_tf32 = a.tf32[1] == "1"
    capture_case(a.case, a.checkpoint, a.out, device=a.device, dtype=a.dtype, attn=a.attn, seed=a.seed,
                 progress=False, codec_dtype=a.codec_dtype)
    print(json.dumps({"case": a.case, "peak_rss_bytes": rss_high_water(), "wall_s": round(time.time() - t0, 1)}))
    return 0


def rss_high_water() -> int:
    """This process's peak resident set, in bytes: ``VmHWM``, which belongs to the process's own memory map.
    (``ru_maxrss`` is the fallback where /proc is absent; on Linux it carries over the parent's high-water mark
    through fork and exec, so a child started by a 10 GB pytest would report at least 10 GB.)"""
    try:
        for line in open("/proc/self/status", encoding="ascii"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_rss_high_water() -> bool:
    """Lower ``VmHWM`` to the present RSS (Linux ``/proc/self/clear_refs``, value 5), so the next reading is the
    peak of what ran since. False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def return_freed_memory() -> None:
    """Hand the C heap's freed pages back to the system (glibc ``malloc_trim``), so the resident set, and the
    high-water mark lowered to it, shows what is still held rather than what was freed into the allocator's pools
    (tensors under glibc's mmap threshold, up to 32 MB, are freed there). A no-op without glibc."""
    try:
        import ctypes

        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


if __name__ == "__main__":
    sys.exit(main())
