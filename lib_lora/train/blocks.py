"""Block-wise learning rates and ranks, and LoRA+: the ``network_args`` of sd-scripts' ``networks/lora.py``
(training-anchors §3.5), read the way sd-scripts reads them.

UNet blocks are numbered as A1111's LoRA block weights and sd-scripts number them:
- SD1/SD2, 25 slots: 0-11 the input blocks IN00-IN11 (IN00 is conv_in and holds no LoRA), 12 the middle block,
  13-24 the output blocks OUT00-OUT11. ``down_lr_weight`` has 12 values (IN00-IN11), ``mid_lr_weight`` 1,
  ``up_lr_weight`` 12 (OUT00-OUT11).
- SDXL, 23 slots: 0 the time/label embedding (no LoRA), 1-9 input blocks 0-8, 10-12 the middle block's three
  parts, 13-21 output blocks 0-8, 22 the output layer (no LoRA). 9 / 3 / 9 values.

A block whose learning-rate weight is 0 gets no LoRA at all (sd-scripts drops its modules), so the weights above
also decide which modules exist; the trainer reports the dropped ones.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

RE_UPDOWN = re.compile(r"(up|down)_blocks_(\d+)_(resnets|upsamplers|downsamplers|attentions)_(\d+)_")
PRESETS = ("cosine", "sine", "linear", "reverse_linear", "zeros")
LR_KEYS = ("down_lr_weight", "mid_lr_weight", "up_lr_weight", "block_lr_zero_threshold")
DIM_KEYS = ("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas")
PLUS_KEYS = ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio")
KEYS = LR_KEYS + DIM_KEYS + PLUS_KEYS


class BlockArgsError(ValueError):
    pass


def _sizes(family: str) -> tuple[int, int]:
    """(values for down / up, values for mid)."""
    return (9, 3) if family == "sdxl" else (12, 1)


def n_slots(family: str) -> int:
    side, mid = _sizes(family)
    return side * 2 + mid + (2 if family == "sdxl" else 0)


def block_index(kohya_name: str, family: str) -> int:
    """The block slot of a UNet LoRA module (-1 when the name is not a UNet block's)."""
    side, _ = _sizes(family)
    if family != "sdxl":
        m = RE_UPDOWN.search(kohya_name)
        if m:
            kind, i, sub, j = m.group(1), int(m.group(2)), m.group(3), int(m.group(4))
            idx = 3 * i + (2 if sub in ("upsamplers", "downsamplers") else j)
            return 1 + idx if kind == "down" else side + 1 + idx
        return side if "mid_block_" in kohya_name else -1
    if not kohya_name.startswith("lora_unet_"):
        return -1
    name = kohya_name[len("lora_unet_"):]
    for prefix, base in (("input_blocks_", 1), ("middle_block_", 10), ("output_blocks_", 13)):
        if name.startswith(prefix):
            return base + int(name[len(prefix):].split("_")[0])
    if name.startswith(("time_embed_", "label_emb_")):
        return 0
    return 22 if name.startswith("out_") else -1


def _preset(key: str, spec: str, n: int) -> list[float]:
    name, _, offset = spec.partition("+")
    try:
        base = float(offset) if offset else 0.0
    except ValueError:
        raise BlockArgsError(f"{key}={spec}: the part after '+' must be a number (e.g. cosine+.25)") from None
    name = name.strip()
    ramp = [i / (n - 1) for i in range(n)]
    if name in ("cosine", "sine"):
        curve = [math.sin(math.pi * r / 2) for r in ramp]
        return [v + base for v in (curve[::-1] if name == "cosine" else curve)]
    if name in ("linear", "reverse_linear"):
        return [v + base for v in (ramp if name == "linear" else ramp[::-1])]
    if name == "zeros":
        return [base] * n
    raise BlockArgsError(f"{key}={spec}: give comma-separated weights, or one of the presets "
                         f"{', '.join(PRESETS)} (optionally with +offset, e.g. cosine+.25)")


def _floats(key: str, text: str) -> list[float]:
    try:
        return [float(s) if s.strip() else 0.0 for s in text.split(",")]  # sd-scripts: an empty entry is 0
    except ValueError:
        raise BlockArgsError(f"{key}={text}: not a comma-separated list of numbers") from None


def block_lr_weights(nargs: dict, family: str, notes: list[str]) -> list[float] | None:
    """The learning-rate weight of every block slot, or None when no block LR is asked for."""
    if all(nargs.get(k) is None for k in LR_KEYS[:3]):
        return None
    side, n_mid = _sizes(family)
    try:
        threshold = float(nargs.get("block_lr_zero_threshold") or 0.0)
    except ValueError:
        raise BlockArgsError(f"block_lr_zero_threshold={nargs['block_lr_zero_threshold']}: not a number") from None
    parts = []
    for key, n in (("down_lr_weight", side), ("mid_lr_weight", n_mid), ("up_lr_weight", side)):
        text = nargs.get(key)
        if text is None:
            parts.append([1.0] * n)
            continue
        # sd-scripts: down/up without a comma name a preset; mid is always a list
        vals = _preset(key, text, n) if key != "mid_lr_weight" and "," not in text else _floats(key, text)
        if len(vals) > n:
            notes.append(f"network_args {key}: {len(vals)} values for {n} block(s); only the first {n} are used "
                         "(as in sd-scripts)")
            vals = vals[:n]
        elif len(vals) < n:
            notes.append(f"network_args {key}: {len(vals)} values for {n} blocks; the missing ones are 1 "
                         "(as in sd-scripts)")
            vals = vals + [1.0] * (n - len(vals))
        parts.append([v if v > threshold else 0.0 for v in vals])
    weights = parts[0] + parts[1] + parts[2]
    return [1.0] + weights + [1.0] if family == "sdxl" else weights


@dataclass
class BlockDims:
    dims: list[int]
    alphas: list[float]
    conv_dims: list[int] | None
    conv_alphas: list[float] | None

    def for_module(self, kohya_name: str, family: str, conv: bool) -> tuple[int, float | None]:
        i = block_index(kohya_name, family)
        if conv:
            return (self.conv_dims[i], self.conv_alphas[i]) if self.conv_dims else (0, None)
        return self.dims[i], self.alphas[i]


def block_dims(nargs: dict, family: str, dim: int, alpha: float | None, conv_dim: int | None,
               conv_alpha: float | None, lr_weights: list[float] | None) -> BlockDims | None:
    """Per-block ranks and alphas (``block_dims`` / ``block_alphas`` / ``conv_block_*``), None when neither they
    nor block learning rates are given; a block with learning-rate weight 0 gets rank 0 (no module)."""
    if nargs.get("block_dims") is None and lr_weights is None:
        return None
    n = n_slots(family)
    layout = ("0 embedding, 1-9 input blocks, 10-12 middle, 13-21 output blocks, 22 out" if family == "sdxl" else
              "0-11 input blocks IN00-IN11, 12 middle, 13-24 output blocks OUT00-OUT11")

    def listed(key, conv_type):
        text = nargs.get(key)
        if text is None:
            return None
        vals = _floats(key, text)
        if len(vals) != n:
            raise BlockArgsError(f"network_args {key} needs {n} comma-separated values for this model "
                                 f"({layout}), got {len(vals)}")
        if conv_type is int:
            if any(v != int(v) or v < 0 for v in vals):
                raise BlockArgsError(f"network_args {key}: ranks must be whole numbers >= 0")
            return [int(v) for v in vals]
        return vals

    dims = listed("block_dims", int) or [int(dim)] * n
    alphas = listed("block_alphas", float) or [alpha] * n
    conv_dims = listed("conv_block_dims", int)
    if conv_dims is not None:
        conv_alphas = listed("conv_block_alphas", float) or [1.0 if conv_alpha is None else conv_alpha] * n
    elif conv_dim:
        conv_dims, conv_alphas = [int(conv_dim)] * n, [1.0 if conv_alpha is None else conv_alpha] * n
    else:
        conv_alphas = None
    if lr_weights is not None:
        for i, w in enumerate(lr_weights):
            if w == 0:
                dims[i] = 0
                if conv_dims is not None:
                    conv_dims[i] = 0
    return BlockDims(dims, alphas, conv_dims, conv_alphas)


def loraplus_ratios(nargs: dict) -> tuple[float | None, float | None]:
    """(UNet ratio, text-encoder ratio) for the lora_up weights' learning rate; the specific keys win."""
    vals = {}
    for k in PLUS_KEYS:
        if nargs.get(k) is None:
            vals[k] = None
            continue
        try:
            vals[k] = float(nargs[k])
        except ValueError:
            raise BlockArgsError(f"network_args {k}={nargs[k]}: not a number (the LoRA+ paper suggests 16)") from None
    both = vals["loraplus_lr_ratio"]
    # sd-scripts uses `or`: a ratio of 0 for one part falls back to the common one
    return vals["loraplus_unet_lr_ratio"] or both, vals["loraplus_text_encoder_lr_ratio"] or both


__all__ = ["BlockArgsError", "BlockDims", "KEYS", "PRESETS", "block_dims", "block_index", "block_lr_weights",
           "loraplus_ratios", "n_slots"]
