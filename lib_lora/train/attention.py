"""SDPA attention for the UNet's CrossAttention modules during a headless job.

ldm/sgm's stock CrossAttention materialises the full attention matrix with einsum; torch's
scaled_dot_product_attention picks flash / memory-efficient kernels. Inside the WebUI its own attention hijack
(sdp, xformers, ...) is already in place, so the WebUI host leaves this off. Instance-level forwards, removed on
exit: the classes are never touched.
"""

from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F

_CLASSES = ("CrossAttention", "MemoryEfficientCrossAttention")


def _sdpa_forward(attn):
    def forward(x, context=None, mask=None, **kwargs):
        h = attn.heads
        q = attn.to_q(x)
        context = x if context is None else context
        k, v = attn.to_k(context), attn.to_v(context)
        b, n, _ = q.shape
        q, k, v = (t.reshape(b, t.shape[1], h, -1).transpose(1, 2) for t in (q, k, v))
        if mask is not None:
            mask = mask.reshape(b, 1, 1, -1).bool()
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = out.transpose(1, 2).reshape(b, n, -1)
        return attn.to_out(out)
    return forward


class sdpa_attention:
    """Context manager: SDPA forwards on every stock CrossAttention under ``root`` (no-op when disabled)."""

    def __init__(self, root: nn.Module, enabled: bool = True):
        self.mods = []
        if not enabled:
            return
        for m in root.modules():
            if type(m).__name__ in _CLASSES and hasattr(m, "to_q") and "forward" not in m.__dict__:
                m.forward = _sdpa_forward(m)
                self.mods.append(m)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for m in self.mods:
            m.__dict__.pop("forward", None)
        self.mods = []
        return False
