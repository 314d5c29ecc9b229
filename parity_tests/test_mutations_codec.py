"""Harness self-tests for the codec decoder: plant a bug other ports really shipped into ``impl``, re-run the
parity row that should catch it, and require that row to turn red (tests ``test_codec_decoder.py`` itself).

| mutation | bug it stands for | row that must fail |
| --- | --- | --- |
| trans conv trimmed on both sides | qwen-tts < 0.1.0, and ports that followed it (143445 vs 144000 samples) | CausalTransConv1d |
| RVQ halves summed before one projection | a "mirror bug": one output_proj for all 16 codebooks | Quantizer decode |
| window 71 / 73 instead of 72 | off-by-one in the sliding-window mask | Pre-transformer |
| SnakeBeta without the log scale | alpha/beta used directly instead of exp(alpha)/exp(beta) | SnakeBeta |

Each test first checks the row is green without the mutation (a row that is always red proves nothing).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from impl.codec import conv as conv_mod
from impl.codec import quantizer as quant_mod
from impl.codec.conv import Streamed, TransConvState

from .helpers_codec import VARIANT, load_codec, row_results, rows

pytestmark = pytest.mark.mutation


@pytest.fixture
def env(checkpoint_dir, reference, device, attn):
    import json

    ckpt = checkpoint_dir(VARIANT)
    st_cfg = json.loads((ckpt / "speech_tokenizer" / "config.json").read_text())
    codec = load_codec(ckpt, device, attn)  # fresh per test: instance mutations never leak
    return codec, reference("codec_decoder", VARIANT), {r.name: r for r in rows(st_cfg)}, attn


def _red(row_name: str, env) -> list:
    codec, ref, by_name, attn = env
    results = row_results(by_name[row_name], codec, ref, attn)
    return [r for r in results if not r]


def _green_then(row_name: str, env, mutate) -> list:
    """Row green, mutate, row red -- red by numbers or shapes, not merely by a tap the mutant failed to emit."""
    assert not _red(row_name, env), f"{row_name} must be green before the mutation"
    mutate()
    bad = _red(row_name, env)
    return [r for r in bad if "not recorded" not in r.message]


def test_symmetric_trans_conv_trim(env, monkeypatch):
    def symmetric(self, x, state=None):
        # The pre-0.1.0 trim: k - s samples cut from BOTH ends (output T*s - (k - s) instead of T*s).
        full = F.conv_transpose1d(x, self.conv.weight, self.conv.bias, stride=self.stride)
        pad = self.right_pad
        y = full[..., pad: full.shape[-1] - pad] if pad else full
        return Streamed(y, TransConvState(full[..., :0]))

    bad = _green_then("CausalTransConv1d", env,
                      lambda: monkeypatch.setattr(conv_mod.CausalTransConv1d, "forward", symmetric))
    assert bad, "a both-sides trans-conv trim went unnoticed"


def test_rvq_halves_summed_before_one_projection(env, monkeypatch):
    def summed(self, codes):
        rvqs = [self.rvq_first, self.rvq_rest]
        layers = [vq for r in rvqs for vq in r.vq.layers]
        emb = sum(vq.decode(codes[:, i]) for i, vq in enumerate(layers))  # (B, d, F): all 16 summed
        return self.rvq_first.output_proj(emb)  # ... through ONE projection

    bad = _green_then("Quantizer decode", env,
                      lambda: monkeypatch.setattr(quant_mod.SplitResidualVectorQuantizer, "forward", summed))
    assert bad, "summing the RVQ halves before one projection went unnoticed"


@pytest.mark.parametrize("window", [71, 73])
def test_window_off_by_one(env, window):
    codec = env[0]
    assert codec.decoder.pre_transformer.window == 72

    def mutate():
        codec.decoder.pre_transformer.window = window

    bad = _green_then("Pre-transformer", env, mutate)
    assert bad, f"a {window}-frame attention window went unnoticed"


def test_snakebeta_without_log_scale(env, monkeypatch):
    def linear_scale(self, x):
        alpha, beta = self.alpha[None, :, None], self.beta[None, :, None]  # no exp(): the bug
        return x + (1.0 / (beta + self.eps)) * torch.pow(torch.sin(x * alpha), 2)

    bad = _green_then("SnakeBeta", env, lambda: monkeypatch.setattr(conv_mod.SnakeBeta, "forward", linear_scale))
    assert bad, "SnakeBeta without exp(alpha)/exp(beta) went unnoticed"
