"""A checkpoint state dict seen as a model, so the normal apply path (layer_mapping + Patcher) can merge into it.

`CheckpointModel.from_state_dict(sd)` builds a tree of torch module *shells* (Linear, Conv2d, LayerNorm, GroupNorm,
Embedding, MultiheadAttention) whose parameters ARE the checkpoint tensors (no copies), laid out like the model
A1111 builds from that checkpoint:

- ``.model.diffusion_model``                 <- ``model.diffusion_model.*``                (all families)
- ``.cond_stage_model``                      <- ``cond_stage_model.*``                     (SD1 HF CLIP, SD2 open_clip)
- ``.conditioner.embedders[i].wrapped``      <- ``conditioner.embedders.<i>.*``            (SDXL)

so ``named_modules()`` paths give the canonical A1111 target names (``diffusion_model_input_blocks_1_1_...``,
``transformer_text_model_encoder_layers_0_self_attn_q_proj``, ``model_transformer_resblocks_0_attn``,
``0_transformer_text_model_...``, ``1_model_transformer_resblocks_...``). Everything else in the file (VAE,
buffers, EMA copies, position_ids) is not part of the tree and is never touched.

`CheckpointModel.from_header(header)` builds the same tree on the meta device from a safetensors header, for
checking a LoRA against a checkpoint without reading its tensors.
"""

from __future__ import annotations

import torch
from torch import nn

from ..formats.errors import UnsupportedFamilyError

UNET_PREFIX = "model.diffusion_model."
SD_TE_PREFIX = "cond_stage_model."
SDXL_TE_PREFIX = "conditioner.embedders."

# safetensors header dtype -> torch dtype (only what SD checkpoints carry; others fall back to float32 shells)
_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        _ST_DTYPES[_name] = getattr(torch, _attr)

# old (transformers < 4.x era) SD1 checkpoints lack the `text_model.` level; A1111 renames them on load
_OLD_SD1_TE = ("cond_stage_model.transformer.embeddings.", "cond_stage_model.transformer.encoder.",
               "cond_stage_model.transformer.final_layer_norm.")


def detect_checkpoint_family(shapes: dict[str, tuple]) -> str:
    """'sd1' | 'sd2' | 'sdxl' from checkpoint keys (text-encoder prefixes, else the UNet's cross-attention width).

    Raises UnsupportedFamilyError for checkpoints that are not ldm/sgm Stable Diffusion 1/2/XL single files."""
    keys = list(shapes)
    if not any(k.startswith(UNET_PREFIX) for k in keys):
        hint = ""
        if any(k.startswith(("double_blocks.", "single_blocks.", "model.diffusion_model.double_blocks."))
               for k in keys):
            hint = " (it looks like a Flux model)"
        elif any(k.startswith(("joint_blocks.", "model.diffusion_model.joint_blocks.")) for k in keys):
            hint = " (it looks like an SD3 model)"
        elif any(k.startswith(("down_blocks.", "unet.")) for k in keys):
            hint = " (it looks like a diffusers-format UNet; use a single-file A1111 checkpoint)"
        elif any(k.startswith(("lora_unet_", "lora_te", "lycoris_")) for k in keys):
            hint = (" (it is a LoRA: the checkpoint is the model it applies to, e.g. v1-5-pruned-emaonly.safetensors; "
                    "give the LoRA as --lora, network_weights or a <lora:> tag)")
        raise UnsupportedFamilyError(
            f"no 'model.diffusion_model.*' keys: not an SD1.x/SD2.x/SDXL single-file checkpoint{hint}")
    if any(k.startswith(SDXL_TE_PREFIX) for k in keys):
        if not any(k.startswith(SDXL_TE_PREFIX + "1.model.") for k in keys) or \
                not any(k.startswith(SDXL_TE_PREFIX + "0.transformer.") for k in keys):
            raise UnsupportedFamilyError(
                "SDXL refiner-style checkpoint (one OpenCLIP text encoder only): not supported; "
                "merge into the SDXL base instead")
        return "sdxl"
    if any(k.startswith(SD_TE_PREFIX + "model.") for k in keys):
        return "sd2"
    if any(k.startswith(SD_TE_PREFIX + "transformer.") for k in keys):
        return "sd1"
    # UNet-only file: decide from the cross-attention context width (attn2.to_k in-features)
    for k, shape in shapes.items():
        if k.startswith(UNET_PREFIX) and k.endswith("attn2.to_k.weight") and len(shape) == 2:
            ctx = {768: "sd1", 1024: "sd2", 2048: "sdxl"}.get(int(shape[1]))
            if ctx:
                return ctx
            raise UnsupportedFamilyError(
                f"UNet cross-attention width {shape[1]} is not SD1 (768), SD2 (1024) or SDXL (2048)")
    raise UnsupportedFamilyError("cannot tell the checkpoint's family: no text encoder and no cross-attention keys")


def _norm(path: str, component: str, c: int) -> nn.Module:
    # in the ldm/sgm UNet only the transformer blocks use LayerNorm; GroupNorm(32) elsewhere. TEs use LayerNorm.
    if component == "unet" and "transformer_blocks" not in path:
        return nn.GroupNorm(32 if c % 32 == 0 else 1, c, device="meta")
    return nn.LayerNorm(c, device="meta")


def _shell(path: str, component: str, leaves: dict[str, torch.Tensor]) -> nn.Module | None:
    """A module of the right type for the tensors under one module path, or None (left out of the tree)."""
    if "in_proj_weight" in leaves:
        w = leaves["in_proj_weight"]
        if w.ndim != 2 or w.shape[0] != 3 * w.shape[1]:
            return None
        m = nn.MultiheadAttention(int(w.shape[1]), 1, bias="in_proj_bias" in leaves, device="meta")
        return m
    if "weight" not in leaves or not set(leaves) <= {"weight", "bias"}:
        return None
    w = leaves["weight"]
    bias = "bias" in leaves
    if w.ndim == 4:
        o, i, kh, kw = (int(s) for s in w.shape)
        return nn.Conv2d(i, o, (kh, kw), bias=bias, device="meta")
    if w.ndim == 2:
        if path.endswith("embedding") and not bias:
            # _weight skips the random init (on meta that would pull in torch._dynamo: seconds of import)
            return nn.Embedding(int(w.shape[0]), int(w.shape[1]), _weight=w, _freeze=True)
        return nn.Linear(int(w.shape[1]), int(w.shape[0]), bias=bias, device="meta")
    if w.ndim == 1:
        return _norm(path, component, int(w.shape[0]))
    return None


class _Node(nn.Module):
    """Plain container; children are added by name (digits allowed, like nn.Sequential indices)."""


class CheckpointModel(nn.Module):
    """See the module docstring. `slots` maps checkpoint key -> (module, attribute) of every tensor in the tree."""

    def __init__(self, family: str):
        super().__init__()
        self.family = family
        self.is_sd1 = family == "sd1"
        self.is_sd2 = family == "sd2"
        self.is_sdxl = family == "sdxl"
        self.model = _Node()
        self.model.diffusion_model = _Node()
        if self.is_sdxl:
            self.conditioner = _Node()
            self.conditioner.embedders = nn.ModuleList([_Node(), _Node()])
            for e in self.conditioner.embedders:
                e.wrapped = _Node()
        else:
            self.cond_stage_model = _Node()
        self.slots: dict[str, tuple[nn.Module, str]] = {}

    # -- construction ------------------------------------------------------------------------------------------
    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor], family: str | None = None) -> "CheckpointModel":
        family = family or detect_checkpoint_family({k: tuple(v.shape) for k, v in sd.items()})
        self = cls(family)
        self._build(sd)
        return self

    @classmethod
    def from_header(cls, header: dict) -> "CheckpointModel":
        """Meta-device tree from a raw safetensors header (no tensor data read)."""
        shapes = {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}
        family = detect_checkpoint_family(shapes)
        fake = {k: torch.empty(shapes[k], dtype=_ST_DTYPES.get(header[k].get("dtype"), torch.float32),
                               device="meta") for k in shapes}
        self = cls(family)
        self._build(fake)
        return self

    def _root_for(self, key: str) -> tuple[nn.Module, str, str] | None:
        """(root module, path below it, component) for a checkpoint key, or None if not a model part we patch."""
        if key.startswith(UNET_PREFIX):
            return self.model.diffusion_model, key[len(UNET_PREFIX):], "unet"
        if self.is_sdxl:
            if key.startswith(SDXL_TE_PREFIX):
                idx, _, rest = key[len(SDXL_TE_PREFIX):].partition(".")
                if idx in ("0", "1"):
                    return self.conditioner.embedders[int(idx)].wrapped, rest, "te1" if idx == "0" else "te2"
            return None
        if key.startswith(SD_TE_PREFIX):
            if key.startswith(_OLD_SD1_TE):
                key = key.replace("cond_stage_model.transformer.", "cond_stage_model.transformer.text_model.", 1)
            return self.cond_stage_model, key[len(SD_TE_PREFIX):], "te1"
        return None

    def _build(self, sd: dict[str, torch.Tensor]) -> None:
        groups: dict[tuple[int, str], dict[str, tuple[str, torch.Tensor]]] = {}
        roots: dict[int, tuple[nn.Module, str]] = {}
        for key, t in sd.items():
            where = self._root_for(key)
            if where is None:
                continue
            root, path, component = where
            mpath, _, leaf = path.rpartition(".")
            if not mpath:
                continue
            roots[id(root)] = (root, component)
            groups.setdefault((id(root), mpath), {})[leaf] = (key, t)
        # parents before children, so an MHA exists before its out_proj is put into it
        for (rid, mpath) in sorted(groups, key=lambda g: (g[1].count("."), g[1])):
            root, component = roots[rid]
            entries = groups[(rid, mpath)]
            leaves = {leaf: t for leaf, (_, t) in entries.items()}
            shell = _shell(mpath, component, leaves)
            if shell is None:
                continue
            for leaf, (key, t) in entries.items():
                # Parameter(t) shares t's storage: patching the shell patches the checkpoint tensor
                setattr(shell, leaf, nn.Parameter(t, requires_grad=False))
                self.slots[key] = (shell, leaf)
            if isinstance(shell, nn.MultiheadAttention) and not any(
                    k.startswith(mpath + ".out_proj.") for (r, k) in groups if r == rid):
                shell.out_proj = nn.Linear(1, 1, device="meta")  # no out_proj in file: keep a harmless stub
            parent = root
            parts = mpath.split(".")
            for p in parts[:-1]:
                child = parent._modules.get(p)
                if child is None:
                    child = _Node()
                    parent.add_module(p, child)
                parent = child
            parent.add_module(parts[-1], shell)

    # -- results -----------------------------------------------------------------------------------------------
    def current_tensors(self) -> dict[str, torch.Tensor]:
        """Checkpoint key -> the tensor now held by the tree (after patching), as a plain tensor."""
        return {k: getattr(m, attr).detach() for k, (m, attr) in self.slots.items()}

    def state_dict_with(self, base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`base` with every tree tensor replaced by its current value; all other entries are the same objects."""
        out = dict(base)
        for k, t in self.current_tensors().items():
            if k in out:
                out[k] = t
        return out

    def component_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for k in self.slots:
            where = self._root_for(k)
            if where:
                counts[where[2]] = counts.get(where[2], 0) + 1
        return counts

