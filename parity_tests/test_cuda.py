"""CUDA three-way rows (issue: CUDA and bf16): ours on CUDA and upstream on CUDA, both against the truth (upstream
fp32 on CPU), judged by the ``three_way`` tier (``reports.compare.compare_three_way``).

Two row sets, each with TF32 set explicitly on both sides (never PyTorch's defaults, which differ between matmuls
and cuDNN convolutions): fp32 with TF32 off (precision "float32") and with TF32 on (precision "tf32"). The CUDA
references are captured in the test, under the TF32 setting of the row, into a temporary folder: the cached
references do not key on TF32. bf16 three-way rows on CUDA are ``test_bf16.py`` run with ``--device cuda``.

Every test here skips with its reason on a machine without CUDA; VALIDATION.md then lists them as skipped, and its
"CUDA runs" section says "not measured on this machine".
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from conftest import set_tf32

from .helpers import LAYER0_ROWS, build_talker, load_model, run_stack, teacher_run
from .rows import Row, assert_row, compare_row_three_way

pytestmark = pytest.mark.cuda

CP_TAPS = ("talker.code_predictor.small_to_mtp_projection:out", "talker.code_predictor.model.norm:out",
           "talker.code_predictor:teacher_logits")


@pytest.fixture(scope="module")
def cuda():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device on this machine: CUDA three-way rows are not measured here")
    return "cuda"


@contextlib.contextmanager
def tf32(enabled: bool):
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    set_tf32(enabled)
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def cuda_reference(case: str, ckpt, out_dir, tf32_on: bool, dtype: str = "float32"):
    """Upstream on CUDA, captured now under the row's TF32 setting (uncached: the cache does not key on TF32)."""
    from reference_export.export import capture_case
    from reference_export.h5io import RefFile

    with tf32(tf32_on):
        path = capture_case(case, ckpt, out_dir / f"{case}-tf32{int(tf32_on)}-{dtype}.h5", device="cuda",
                            dtype=dtype, progress=False)
    return RefFile(path)


PRECISIONS = [pytest.param(False, id="fp32-tf32-off"), pytest.param(True, id="tf32")]


@pytest.mark.parametrize("tf32_on", PRECISIONS)
@pytest.mark.parametrize("impl_attn", ["eager", "sdpa"])
def test_layer0_cuda_three_way(tf32_on, impl_attn, cuda, checkpoint_dir, reference, tmp_path, record):
    variant = "custom_voice"
    ckpt = checkpoint_dir(variant)
    truth = reference("talker_stack", variant, device="cpu")
    dev_ref = cuda_reference("talker_stack", ckpt, tmp_path, tf32_on)
    with tf32(tf32_on):
        got = run_stack(build_talker(ckpt, cuda), dev_ref, cuda, impl_attn)
    precision = "tf32" if tf32_on else "float32"
    results = []
    for row in LAYER0_ROWS:
        if row.name == "Attention (probabilities)" and impl_attn != "eager":
            continue
        for r in compare_row_three_way(row, got, dev_ref, truth, precision, f"cuda {precision}"):
            record(r, row=f"{row.name} (CUDA {precision}, {impl_attn})", component="Talker layer 0, CUDA three-way",
                   variant=variant, notes=f"ours cuda vs upstream cuda vs upstream fp32 CPU; TF32 {'on' if tf32_on else 'off'}")
            results.append(r)
    assert_row(f"CUDA {precision} layer 0", results)


@pytest.mark.parametrize("tf32_on", PRECISIONS)
def test_code_predictor_cuda_three_way(tf32_on, cuda, checkpoint_dir, reference, tmp_path, record, attn):
    variant = "base"
    ckpt = checkpoint_dir(variant)
    truth = reference("lm_cp_teacher", variant, device="cpu")
    dev_ref = cuda_reference("lm_cp_teacher", ckpt, tmp_path, tf32_on)
    with tf32(tf32_on):
        got = teacher_run(load_model(ckpt, cuda, torch.float32, attn), dev_ref)
    precision = "tf32" if tf32_on else "float32"
    results = compare_row_three_way(Row("teacher-forced", CP_TAPS, "three_way"), got, dev_ref, truth, precision,
                                    f"cuda {precision}")
    for r in results:
        record(r, row=f"teacher-forced logits (CUDA {precision})", component="Code predictor, CUDA three-way",
               variant=variant, notes="ours cuda vs upstream cuda vs upstream fp32 CPU")
    assert_row(f"CUDA {precision} code predictor", results)
