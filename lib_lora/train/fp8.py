"""FP8 storage of the frozen base weights: sd-scripts' ``fp8_base`` / ``fp8_base_unet``, and models the WebUI
already keeps in FP8 (Settings -> Optimizations -> FP8 weight).

Only the weights of Linear and Conv2d layers are stored as float8_e4m3fn, as A1111 does (norms, embeddings, biases
and the VAE keep their dtype). The step runs under autocast, which casts an fp8 weight to the compute dtype inside
each linear/conv, so a layer computes with exactly the fp8-rounded weight. The originals are moved to CPU memory
while the job runs and put back bit for bit on every exit path.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn as nn

FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))
STORAGE = getattr(torch, "float8_e4m3fn", None)  # what A1111 and sd-scripts store


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype in FP8_DTYPES


def _layers(root: nn.Module):
    return [m for m in root.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def text_encoder_root(sd_model) -> nn.Module | None:
    return getattr(sd_model, "conditioner", None) or getattr(sd_model, "cond_stage_model", None)


def fp8_parts(sd_model) -> list[str]:
    """Which parts of the loaded model already hold FP8 Linear/Conv weights ("UNet", "text encoder")."""
    out = []
    for what, root in (("UNet", sd_model.model.diffusion_model), ("text encoder", text_encoder_root(sd_model))):
        if root is not None and any(is_fp8(m.weight.dtype) for m in _layers(root)):
            out.append(what)
    return out


def compute_dtype(device: torch.device) -> torch.dtype:
    """The autocast dtype FP8 weights are computed in: bf16 where the device has it (A1111 uses bf16 for FP8 on
    the CPU), else fp16."""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


@contextmanager
def fp8_storage(roots: list[nn.Module]):
    """Store the Linear/Conv2d weights under ``roots`` as float8_e4m3fn for the duration; the original tensors wait
    in CPU memory (a GPU's copy is freed) and come back exactly, also when the body raises. Yields the number of
    layers converted."""
    if STORAGE is None:
        raise RuntimeError("this torch has no float8 type (fp8_base needs torch 2.1 or newer)")
    kept: list[tuple[nn.Parameter, torch.Tensor]] = []
    try:
        for root in roots:
            for m in _layers(root):
                w = m.weight
                if is_fp8(w.dtype):
                    continue
                kept.append((w, w.data.to("cpu")))  # on a CPU this is the tensor itself: nothing is copied
                w.data = w.data.to(STORAGE)
        yield len(kept)
    finally:
        for w, orig in reversed(kept):
            w.data = orig.to(w.device)
