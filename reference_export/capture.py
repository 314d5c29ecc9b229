"""Capture upstream activations by module path.

Forward hooks on every module under the given roots record ``<root>.<path>:out`` (first tensor of the output)
and, with ``inputs=True``, ``<root>.<path>:in``. What no module returns is reached by wrapping functions for the
duration of the capture:

- ``q_rope``/``k_rope``/``attn_probs`` of the talker, code-predictor and codec-decoder attentions: upstream calls
  the module-level ``eager_attention_forward`` (or ``ALL_ATTENTION_FUNCTIONS[impl]``) with q/k after RoPE; the
  wrapper records them under the attention module that is running (a stack kept by pre/post hooks). Keys are
  recorded for the new positions only (``key[..., -T:, :]``), matching ``impl``'s taps taken before the cache.
  Probabilities exist only on the eager path.
- Mimi's attention is chosen at construction; ``transformers.models.mimi.modeling_mimi.apply_rotary_pos_emb``
  is wrapped to record q/k after RoPE.

Hooks returning nothing do not change what upstream computes. Recording is the harness's own
(:mod:`reference_export.recorder`), never ``impl.taps``: the side under test and the reference share no recorder.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from .recorder import Recorder
from .upstream import import_upstream


@contextlib.contextmanager
def capture(roots: dict[str, nn.Module], include: tuple[str, ...] = ("*",), inputs: bool = False,
            rec: Recorder | None = None) -> Iterator[Recorder]:
    """Hook ``roots`` for the ``with`` body; yield the recorder (``rec``, or a new in-memory one keeping
    ``include``)."""
    up = import_upstream()
    rec = rec if rec is not None else Recorder(include=include)
    stack: list[str] = []
    handles = []
    for root, model in roots.items():
        for name, mod in model.named_modules():
            path = f"{root}.{name}" if name else root

            def pre(m, args, _p=path):
                stack.append(_p)

            def post(m, args, out, _p=path):
                stack.pop()
                rec.add_io(_p, args, out, inputs)

            handles.append(mod.register_forward_pre_hook(pre))
            handles.append(mod.register_forward_hook(post))

    if "talker" in roots:
        # One talker forward per generation step (0 = prefill; the code predictor runs inside it for the previous
        # frame), so its call index is the decode step every tap recorded during it carries.
        calls = [0]

        def step_hook(m, args):
            rec.step = calls[0]
            rec.in_loop = True  # a request capture clears it when generation returns (codec decode follows)
            calls[0] += 1

        handles.append(roots["talker"].register_forward_pre_hook(step_hook))

    def current_attention() -> str:
        for p in reversed(stack):
            if p.endswith("self_attn") or p.endswith(".attn"):
                return p
        return stack[-1] if stack else "unknown"

    def record_qk(q: torch.Tensor, k: torch.Tensor) -> None:
        where = current_attention()
        rec.add(f"{where}:q_rope", q)
        rec.add(f"{where}:k_rope", k[..., -q.shape[-2]:, :])  # new positions only (cache excluded)

    def wrap_attention(fn):
        def wrapped(module, query, key, value, attention_mask, *args, **kwargs):
            record_qk(query, key)
            out, weights = fn(module, query, key, value, attention_mask, *args, **kwargs)
            if weights is not None:
                rec.add(f"{current_attention()}:attn_probs", weights)
            return out, weights

        return wrapped

    patches: list[tuple[object, str, object]] = []

    def patch(obj, attr, new):
        patches.append((obj, attr, getattr(obj, attr)))
        setattr(obj, attr, new)

    for mod in (up.M, up.T):
        if hasattr(mod, "eager_attention_forward"):
            patch(mod, "eager_attention_forward", wrap_attention(mod.eager_attention_forward))
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    saved_attn = {k: ALL_ATTENTION_FUNCTIONS[k] for k in list(ALL_ATTENTION_FUNCTIONS.keys())}
    for k, fn in saved_attn.items():
        ALL_ATTENTION_FUNCTIONS[k] = wrap_attention(fn)
    import transformers.models.mimi.modeling_mimi as mimi

    orig_rope = mimi.apply_rotary_pos_emb

    def mimi_rope(q, k, cos, sin, *a, **kw):
        q2, k2 = orig_rope(q, k, cos, sin, *a, **kw)
        record_qk(q2, k2)
        return q2, k2

    patch(mimi, "apply_rotary_pos_emb", mimi_rope)
    try:
        yield rec
    finally:
        for obj, attr, old in reversed(patches):
            setattr(obj, attr, old)
        for k, fn in saved_attn.items():
            ALL_ATTENTION_FUNCTIONS[k] = fn
        for h in handles:
            h.remove()
