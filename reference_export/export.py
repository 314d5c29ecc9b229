"""Run one case on upstream and write its reference file (the ``capture`` command)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import torch

from .capture import capture
from .cases import CaseEnv, get_case
from .h5io import write_refs
from .registry import expected_taps, missing_taps
from .synth import checkpoint_sha256
from .upstream import UPSTREAM_VERSION, load_upstream, versions

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float64": torch.float64, "fp64": torch.float64}


def codec_dtype_for(dtype: str) -> str:
    """The codec's dtype when a capture runs the language model in ``dtype``: float64 captures run everything in
    float64 (the fp64 tier's truth); otherwise the codec stays float32, as upstream's config says."""
    return "float64" if DTYPES[dtype] == torch.float64 else "float32"


def device_info(device: str) -> dict:
    """Provenance of the device a run used: for CUDA the GPU, driver, CUDA and cuDNN versions and the TF32 flags
    (which decide fp32 rounding there); for CPU the thread count."""
    info: dict = {"device": device, "torch": str(torch.__version__), "threads": torch.get_num_threads()}
    if not str(device).startswith("cuda"):
        return info
    import subprocess

    idx = torch.device(device).index or 0
    info.update(gpu=torch.cuda.get_device_name(idx), cuda=torch.version.cuda,
                cudnn=torch.backends.cudnn.version(),
                tf32_matmul=bool(torch.backends.cuda.matmul.allow_tf32), tf32_cudnn=bool(torch.backends.cudnn.allow_tf32),
                capability=".".join(map(str, torch.cuda.get_device_capability(idx))))
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        info["driver"] = out.stdout.strip().splitlines()[idx] if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError, IndexError):
        info["driver"] = "unknown"
    return info


class CaptureError(RuntimeError):
    pass


# The code whose uncommitted change makes a provenance sha "+dirty": what reports.results.CODE_GLOBS hashes.
CODE_PATHS = ("impl", "reference_export", "parity_tests", "reports/*.py", "conftest.py")


def git_sha(root: str | Path | None = None) -> str:
    """The harness's HEAD commit, with ``+dirty`` appended when the code in ``CODE_PATHS`` differs from it (a
    tracked file changed, or a new file not ignored): numbers recorded then were not made by that commit alone.
    One ``git status`` limited to those paths (milliseconds). "unknown" outside a git checkout."""
    cwd = Path(root) if root is not None else Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                             cwd=cwd).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", *CODE_PATHS], capture_output=True, text=True,
                               check=True, cwd=cwd).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + ("+dirty" if dirty else "")


def capture_case(case_name: str, checkpoint: str | Path, out: str | Path, *, device: str = "cpu",
                 dtype: str = "float32", attn: str = "eager", seed: int = 0, progress: bool = True,
                 upstream=None, codec_dtype: str | None = None) -> Path:
    """Capture ``case_name`` from upstream on ``checkpoint`` into ``out`` (HDF5, atomic).

    ``dtype`` is the talker/speaker-encoder dtype; ``codec_dtype`` the speech tokenizer's (default
    ``codec_dtype_for(dtype)``). ``upstream``, when given, must already be on ``device`` in those dtypes."""
    case = get_case(case_name)
    checkpoint = Path(checkpoint)
    cfg = json.loads((checkpoint / "config.json").read_text())
    st_cfg = json.loads((checkpoint / "speech_tokenizer" / "config.json").read_text())
    variant = cfg.get("tts_model_type")
    if variant not in case.variants:
        raise CaptureError(f"case {case_name!r} does not apply to variant {variant!r} (only {case.variants})")
    if dtype not in DTYPES:
        raise CaptureError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    codec_dtype = codec_dtype or codec_dtype_for(dtype)
    if codec_dtype not in DTYPES:
        raise CaptureError(f"codec dtype {codec_dtype!r} is not one of {sorted(DTYPES)}")
    use_attn = case.attn or attn
    up = upstream or load_upstream(checkpoint, device=device, dtype=DTYPES[dtype], attn=use_attn,
                                   codec_dtype=DTYPES[codec_dtype])
    torch.manual_seed(seed)
    env = CaseEnv(checkpoint=checkpoint, config=cfg, st_config=st_cfg, seed=seed)
    inputs = case.make_inputs(env)
    roots = {k: v for k, v in up.roots().items() if k in case.roots}
    with capture(roots, include=case.include, inputs=case.record_inputs) as rec:
        case.run(up, inputs, rec)
    expected = expected_taps(case.component, cfg, st_cfg, case.settings)
    missing = missing_taps(expected, set(rec.records))
    if missing:
        raise CaptureError(f"case {case_name}: upstream run did not record {len(missing)} registry tap(s), "
                           f"e.g. {missing[:5]}")
    vers = versions()
    meta = {
        "harness_git_sha": git_sha(), "versions": vers, "qwen_tts_version": vers.get("qwen-tts", UPSTREAM_VERSION),
        "transformers_version": vers.get("transformers"), "torch_version": vers.get("torch"),
        "device": device, "dtype": dtype, "codec_dtype": codec_dtype, "attn": use_attn, "seed": seed,
        "device_info": device_info(device),
        "preset": cfg.get("tts_model_size"), "variant": variant,
        "checkpoint": str(checkpoint), "checkpoint_sha256": checkpoint_sha256(checkpoint), "case_name": case_name,
        "expected_taps": expected,
    }
    settings = {"description": case.description, "component": case.component, **case.settings}
    return write_refs(out, meta=meta, case=settings, inputs=inputs, records=rec.records, steps=rec.step_of,
                      progress=progress)
