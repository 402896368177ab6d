"""LyCORIS preset files (``network_args = ["preset=my_preset.toml"]``) on the WebUI's ldm/sgm model.

LyCORIS' kohya wrapper picks layers by the class names and dotted paths of sd-scripts' own models: diffusers-tree
UNets for SD1/SD2 (``down_blocks.1.attentions.0...``, ``Transformer2DModel``, ``ResnetBlock2D``), sgm paths with
those class names for SDXL, and transformers' ``CLIPTextModel`` for every text encoder (SD2's and SDXL's second
one converted from open_clip). The WebUI holds other modules, so the rules run here on a *view*: every host module
listed under the path and class it has in sd-scripts, plus the containers only sd-scripts has (``down_blocks.1``,
``CrossAttnDownBlock2D``). The selection itself is LyCORIS' ``create_modules`` (class matches take the whole
subtree, names match with ``re.match`` or fnmatch, ``exclude_name`` skips a module but not its children), with
``module_algo_map`` / ``name_algo_map`` giving a layer its own rank, alpha and LoKr shape (one algorithm per
network). tests/data/lycoris_preset_reference.json.gz holds what LyCORIS builds on sd-scripts' UNets for a set of
preset files.
"""

from __future__ import annotations

import fnmatch
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import torch.nn as nn

NORM_CLASSES = (nn.GroupNorm, nn.LayerNorm)
# keys LyCORIS' PresetConfig accepts; target_module / target_name / lora_prefix are its generic wrapper's and the
# kohya wrapper sd-scripts uses ignores them
VALID_KEYS = ("enable_conv", "target_module", "target_name", "module_algo_map", "name_algo_map", "lora_prefix",
              "use_fnmatch", "unet_target_module", "unet_target_name", "text_encoder_target_module",
              "text_encoder_target_name", "exclude_name")
_LIST_KEYS = ("unet_target_module", "unet_target_name", "text_encoder_target_module", "text_encoder_target_name",
              "exclude_name")
# LyCORIS' kohya wrapper defaults (what a preset file leaves out keeps these): the SD entries of its lists
DEFAULT_UNET_MODULES = ("Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D")
DEFAULT_UNET_NAMES = ("conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2")
DEFAULT_TE_MODULES = ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP")
# transformers names CLIP's attention class after its kernel (4.30, the WebUI's: CLIPAttention; sd-scripts' newer
# transformers: CLIPSdpaAttention): a preset naming one means the attention layers whichever is loaded
_CLIP_ATTENTION = {"CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2"}


class PresetError(ValueError):
    pass


@dataclass
class CustomPreset:
    path: str
    enable_conv: bool = True
    unet_modules: tuple = DEFAULT_UNET_MODULES
    unet_names: tuple = DEFAULT_UNET_NAMES
    te_modules: tuple = DEFAULT_TE_MODULES
    te_names: tuple = ()
    exclude: tuple = ()
    use_fnmatch: bool = False
    module_map: dict = field(default_factory=dict)  # class name -> override (module_algo_map)
    name_map: dict = field(default_factory=dict)  # path or pattern -> override (name_algo_map)
    notes: list = field(default_factory=list)

    def entries(self) -> list[dict]:
        """Every map entry (module_algo_map's and name_algo_map's)."""
        return [*self.module_map.values(), *self.name_map.values()]

    def algos(self) -> set:
        return {o["algo"] for o in self.entries() if "algo" in o}


# what a map entry may set (LyCORIS passes the rest to the module, which ignores what it does not know)
OVERRIDE_KEYS = {"algo": str, "dim": int, "alpha": float, "factor": int, "decompose_both": bool, "full_matrix": bool,
                 "unbalanced_factorization": bool}


def _override(entry, where: str, fname: str) -> dict:
    if not isinstance(entry, dict):
        raise PresetError(f"preset file {fname}: {where} must be a table of settings, e.g. dim = 8")
    out = {}
    for k, v in entry.items():
        kind = OVERRIDE_KEYS.get(k)
        if kind is None:
            raise PresetError(f"preset file {fname}: {where} sets {k}, which is not trained per layer here; a map "
                              f"entry may set {', '.join(OVERRIDE_KEYS)} (the rest comes from network_args)")
        ok = (isinstance(v, bool) if kind is bool else isinstance(v, str) if kind is str
              else isinstance(v, (int, float)) and not isinstance(v, bool) and (kind is float or v == int(v)))
        if not ok or kind is int and (v == 0 or v < -1) or k == "dim" and v < 1 or k == "alpha" and v < 0:
            want = {"dim": "a whole number of 1 or more", "factor": "-1 or a whole number of 1 or more",
                    "alpha": "a number of 0 or more", "algo": "an algorithm name"}.get(k, "true or false")
            raise PresetError(f"preset file {fname}: {where} {k} = {v!r}: use {want}")
        out[k] = kind(v) if kind in (int, float) else v
    return out


def read_preset(path: Path, shown: str) -> CustomPreset:
    """A LyCORIS preset file; PresetError says what is wrong and what to do."""
    if not path.is_file():
        raise PresetError(f"network_args preset={shown}: no such file ({path}); give the path of a LyCORIS preset "
                          "TOML file (a relative path is read from the config file's folder, or from the WebUI's "
                          "folder when the settings come from the tab) or a built-in preset")
    try:
        with open(path, "rb") as f:
            raw = f.read()
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise PresetError(f"network_args preset={shown}: {path.name} is not a TOML file ({e}); LyCORIS reads preset "
                          "files as TOML, e.g. unet_target_module = [\"Transformer2DModel\"]") from None
    except OSError as e:
        raise PresetError(f"network_args preset={shown}: {path} cannot be read ({e.strerror})") from None
    unknown = sorted(k for k in data if k not in VALID_KEYS)
    if unknown:
        raise PresetError(f"preset file {path.name}: unknown keys {', '.join(unknown)} (LyCORIS stops on them too); "
                          f"valid keys: {', '.join(VALID_KEYS)}")
    p = CustomPreset(str(path))
    for key in _LIST_KEYS:
        if key in data:
            v = data[key]
            if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
                raise PresetError(f"preset file {path.name}: {key} must be a list of strings, e.g. {key} = "
                                  "[\"Transformer2DModel\"]")
    for key in ("enable_conv", "use_fnmatch"):
        if key in data and not isinstance(data[key], bool):
            raise PresetError(f"preset file {path.name}: {key} must be true or false")
    for key, attr in (("module_algo_map", "module_map"), ("name_algo_map", "name_map")):
        m = data.get(key) or {}
        if not isinstance(m, dict):
            raise PresetError(f"preset file {path.name}: {key} must be a table, e.g. [{key}.CrossAttention]")
        setattr(p, attr, {k: _override(v, f"{key}.{k}", path.name) for k, v in m.items()})
    p.enable_conv = data.get("enable_conv", True)
    p.use_fnmatch = data.get("use_fnmatch", False)
    for key, attr in (("unet_target_module", "unet_modules"), ("unet_target_name", "unet_names"),
                      ("text_encoder_target_module", "te_modules"), ("text_encoder_target_name", "te_names"),
                      ("exclude_name", "exclude")):
        if key in data:
            setattr(p, attr, tuple(data[key]))
    # (LyCORIS reads presets with the toml package, which keeps the backslashes of a double-quoted key)
    quoted = re.findall(r'name_algo_map\.("[^"\n]*\\[^"\n]*")', raw.decode("utf-8", "replace"))
    if quoted:
        p.notes.append(f"preset file {path.name}: name_algo_map key {quoted[0]} is read as TOML says (\\\\. is a "
                       "regex \\.); LyCORIS' own reader keeps both backslashes, so under sd-scripts that entry "
                       "matches nothing. Write it as a literal key in single quotes to mean the same in both")
    ignored = [k for k in ("target_module", "target_name", "lora_prefix") if k in data]
    if ignored:
        p.notes.append(f"preset file {path.name}: {', '.join(ignored)} are read by LyCORIS' generic wrapper, not by "
                       "the sd-scripts one (lycoris.kohya): they change nothing, as in sd-scripts; use "
                       "unet_target_module / unet_target_name / text_encoder_target_module / text_encoder_target_name")
    if not p.use_fnmatch:
        for pat in p.unet_names + p.te_names + p.exclude + tuple(p.name_map):
            try:
                re.compile(pat)
            except re.error as e:
                raise PresetError(f"preset file {path.name}: {pat!r} is not a regular expression ({e}); set "
                                  "use_fnmatch = true for shell-style patterns like \"*.attn2.*\"") from None
    return p


# ---- the view: host modules under their sd-scripts path and class ---------------------------------------------

@dataclass
class ViewRow:
    path: str                # sd-scripts' dotted path ("" is the model itself)
    cls: str                 # sd-scripts' class name
    module: nn.Module | None  # the host module (None: a container only sd-scripts has)
    host: str = ""           # the host module's own dotted path
    part: str | None = None  # open_clip: the projection of a MultiheadAttention (q, k, v, out)


_SGM_CLASSES = {"SpatialTransformer": "Transformer2DModel", "ResBlock": "ResnetBlock2D",
                "Downsample": "Downsample2D", "Upsample": "Upsample2D",
                "MemoryEfficientCrossAttention": "CrossAttention", "TimestepEmbedSequential": "ModuleList"}
_RES_CHILDREN = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
                 "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}


def _cls(mod: nn.Module, sd12: bool) -> str:
    name = type(mod).__name__
    if sd12 and name == "GroupNorm32":  # (diffusers' resnets hold plain GroupNorm; sgm's SDXL keeps GroupNorm32)
        return "GroupNorm"
    return _SGM_CLASSES.get(name, name)


def _subtree(prefix: str, mod: nn.Module, host: str, sd12: bool, rename=None) -> list[ViewRow]:
    rows = []
    for name, m in mod.named_modules():
        if name and rename is not None:
            name = rename(name)
            if name is None:
                continue
        if sd12 and name.endswith("to_out") and isinstance(m, nn.Sequential):
            cls = "ModuleList"
        else:
            cls = _cls(m, sd12)
        rows.append(ViewRow(".".join(p for p in (prefix, name) if p), cls, m,
                            ".".join(p for p in (host, name) if p) if name else host))
    return rows


def _resnet_rename(name: str) -> str | None:
    # (None: the in_layers / emb_layers / out_layers containers, SiLU, Dropout, which diffusers' resnet lacks)
    return _RES_CHILDREN.get(name)


def unet_view(diffusion_model: nn.Module, family: str) -> list[ViewRow]:
    """The UNet as sd-scripts holds it (names and classes; tests/data/lycoris_preset_reference.json.gz)."""
    if family == "sdxl":  # sd-scripts' SDXL UNet keeps sgm's paths
        rows = _subtree("", diffusion_model, "", False)
        rows[0].cls = "SdxlUNet2DConditionModel"
        return rows
    rows = [ViewRow("", "UNet2DConditionModel", diffusion_model), ViewRow("time_proj", "Timesteps", None)]
    dm = diffusion_model
    te = dm.time_embed
    rows.append(ViewRow("time_embedding", "TimestepEmbedding", te, "time_embed"))
    for i, tail in ((0, "linear_1"), (1, "act"), (2, "linear_2")):
        rows.append(ViewRow(f"time_embedding.{tail}", _cls(te[i], True), te[i], f"time_embed.{i}"))
    rows.append(ViewRow("conv_in", _cls(dm.input_blocks[0][0], True), dm.input_blocks[0][0], "input_blocks.0.0"))

    def block(kind: str, level: int, members: list) -> None:
        """One diffusers down/up block from its ldm members [(ldm path, child module, position)]."""
        has_attn = any(type(m).__name__ in ("SpatialTransformer", "SpatialVideoTransformer") for _, m, _ in members)
        base = f"{kind}_blocks.{level}"
        cls = ("CrossAttn" if has_attn else "") + ("DownBlock2D" if kind == "down" else "UpBlock2D")
        rows.append(ViewRow(base, cls, None))
        for sub in ("attentions", "resnets", "downsamplers" if kind == "down" else "upsamplers"):
            if any(_member_kind(m) == sub for _, m, _ in members):
                rows.append(ViewRow(f"{base}.{sub}", "ModuleList", None))
        for host, m, j in members:
            sub = _member_kind(m)
            if sub in ("downsamplers", "upsamplers"):
                rows.extend(_subtree(f"{base}.{sub}.0", m, host, True,
                                     lambda n: {"op": "conv"}.get(n, n)))
            elif sub == "resnets":
                rows.extend(_subtree(f"{base}.resnets.{j}", m, host, True, _resnet_rename))
            else:
                rows.extend(_subtree(f"{base}.attentions.{j}", m, host, True))

    rows.append(ViewRow("down_blocks", "ModuleList", None))
    level, j, members = 0, 0, []
    for n in range(1, len(dm.input_blocks)):
        for k, m in enumerate(dm.input_blocks[n]):
            members.append((f"input_blocks.{n}.{k}", m, j))
        if any(_member_kind(m) == "downsamplers" for m in dm.input_blocks[n]):
            block("down", level, members)
            level, j, members = level + 1, 0, []
        else:
            j += 1
    if members:
        block("down", level, members)
    rows.append(ViewRow("up_blocks", "ModuleList", None))
    level, j, members = 0, 0, []
    for n in range(len(dm.output_blocks)):
        for k, m in enumerate(dm.output_blocks[n]):
            members.append((f"output_blocks.{n}.{k}", m, j))
        j += 1
        if any(_member_kind(m) == "upsamplers" for m in dm.output_blocks[n]):
            block("up", level, members)
            level, j, members = level + 1, 0, []
    if members:
        block("up", level, members)
    rows += [ViewRow("mid_block", "UNetMidBlock2DCrossAttn", None), ViewRow("mid_block.attentions", "ModuleList", None),
             ViewRow("mid_block.resnets", "ModuleList", None)]
    r = 0
    for k, m in enumerate(dm.middle_block):
        if _member_kind(m) == "resnets":
            rows.extend(_subtree(f"mid_block.resnets.{r}", m, f"middle_block.{k}", True, _resnet_rename))
            r += 1
        else:
            rows.extend(_subtree("mid_block.attentions.0", m, f"middle_block.{k}", True))
    for i, tail in ((0, "conv_norm_out"), (1, "conv_act"), (2, "conv_out")):
        rows.append(ViewRow(tail, _cls(dm.out[i], True), dm.out[i], f"out.{i}"))
    return rows


def _member_kind(m: nn.Module) -> str:
    name = type(m).__name__
    return {"ResBlock": "resnets", "Downsample": "downsamplers", "Upsample": "upsamplers"}.get(name, "attentions")


def hf_clip_view(transformer: nn.Module, root_cls: str | None = None) -> list[ViewRow]:
    """transformers' CLIPTextModel (SD1's text encoder, SDXL's first): its own tree, in the 4.x layout."""
    from ..formats.keymap import hf_clip_name
    rows = []
    for name, m in transformer.named_modules():
        path = hf_clip_name(name)  # (the WebUI's layer names use the 4.x paths too)
        rows.append(ViewRow(path, type(m).__name__ if name or root_cls is None else root_cls, m, path))
    return rows


def open_clip_view(model: nn.Module, n_layers: int, with_projection: bool) -> list[ViewRow]:
    """open_clip's text tower (SD2's text encoder, SDXL's second) as sd-scripts loads it: a transformers
    CLIPTextModel (CLIPTextModelWithProjection for SDXL) of the layers the model reads."""
    rows = [ViewRow("", "CLIPTextModelWithProjection" if with_projection else "CLIPTextModel", model),
            ViewRow("text_model", "CLIPTextTransformer", None),
            ViewRow("text_model.embeddings", "CLIPTextEmbeddings", None),
            ViewRow("text_model.embeddings.token_embedding", "Embedding", model.token_embedding, "token_embedding"),
            ViewRow("text_model.embeddings.position_embedding", "Embedding", None),
            ViewRow("text_model.encoder", "CLIPEncoder", model.transformer, "transformer"),
            ViewRow("text_model.encoder.layers", "ModuleList", model.transformer.resblocks, "transformer.resblocks")]
    for i, blk in enumerate(model.transformer.resblocks):
        if i >= n_layers:
            break
        b, h = f"text_model.encoder.layers.{i}", f"transformer.resblocks.{i}"
        rows += [ViewRow(b, "CLIPEncoderLayer", blk, h),
                 ViewRow(f"{b}.self_attn", "CLIPAttention", blk.attn, f"{h}.attn")]
        for part in ("k", "v", "q", "out"):
            rows.append(ViewRow(f"{b}.self_attn.{part}_proj", "Linear", blk.attn, f"{h}.attn", part))
        rows += [ViewRow(f"{b}.layer_norm1", "LayerNorm", blk.ln_1, f"{h}.ln_1"),
                 ViewRow(f"{b}.mlp", "CLIPMLP", blk.mlp, f"{h}.mlp"),
                 ViewRow(f"{b}.mlp.activation_fn", "GELUActivation", None),
                 ViewRow(f"{b}.mlp.fc1", "Linear", blk.mlp.c_fc, f"{h}.mlp.c_fc"),
                 ViewRow(f"{b}.mlp.fc2", "Linear", blk.mlp.c_proj, f"{h}.mlp.c_proj"),
                 ViewRow(f"{b}.layer_norm2", "LayerNorm", blk.ln_2, f"{h}.ln_2")]
    rows.append(ViewRow("text_model.final_layer_norm", "LayerNorm", model.ln_final, "ln_final"))
    if with_projection:  # (open_clip holds the projection as a bare tensor: no module to train)
        rows.append(ViewRow("text_projection", "Linear", None))
    return rows


# ---- LyCORIS' selection ---------------------------------------------------------------------------------------

def _cls_in(cls: str, names) -> str | None:
    """The entry of ``names`` naming class ``cls`` (CLIP's attention under any of its kernel names)."""
    if cls in names:
        return cls
    if cls in _CLIP_ATTENTION:
        return next((m for m in names if m in _CLIP_ATTENTION), None)
    return None


def select(rows: list[ViewRow], modules: tuple, names: tuple, exclude: tuple, use_fnmatch: bool,
           matched: set | None = None, module_map: dict | None = None,
           name_map: dict | None = None) -> list[tuple[ViewRow, dict]]:
    """The rows LyCORIS' create_modules hands to create_single_module, in its order, each once (LyCORIS stops on
    a layer picked twice, e.g. by two nested target classes; it is trained once here), with the map entry each
    gets: in a picked class's subtree the innermost mapped class below it (the layer's own included), else the
    picked class's own; for a picked name its name_algo_map entry, else its class's. ``matched`` collects the
    class names and patterns that picked something (LyCORIS warns about the others)."""
    module_map, name_map = module_map or {}, name_map or {}

    def match(pat: str, name: str) -> bool:
        return fnmatch.fnmatch(name, pat) if use_fnmatch else re.match(pat, name) is not None

    def excluded(path: str) -> bool:
        return bool(path) and bool(exclude) and (path in exclude or any(match(t, path) for t in exclude))

    def class_conf(cls: str) -> dict | None:
        key = _cls_in(cls, module_map)
        return None if key is None else module_map[key]

    seen: dict[str, tuple[ViewRow, dict]] = {}
    matched = matched if matched is not None else set()
    # mapped classes, innermost first (one LyCORIS recurses into unless excluded itself; its subtree takes its entry)
    mapped_all = sorted(((r.path, c) for r in rows if (c := class_conf(r.cls)) is not None and not excluded(r.path)),
                        key=lambda pc: -len(pc[0]))
    for row in rows:
        if excluded(row.path):
            continue
        hit = _cls_in(row.cls, modules)
        name_hits = [t for t in names if t == row.path or match(t, row.path)]
        if hit and not name_hits:
            matched.add(hit)
            base = class_conf(row.cls) or {}
            prefix = row.path + "."
            inner = [r for r in rows if (not row.path or r.path.startswith(prefix))]
            mapped = [(p, c) for p, c in mapped_all if not row.path or p.startswith(prefix)]
            for sub in [row] + inner:
                if sub.path in seen or excluded(sub.path):
                    continue
                conf = next((c for p, c in mapped if sub.path == p or sub.path.startswith(p + ".")), base)
                seen[sub.path] = (sub, conf)
        elif name_hits:
            matched.update(name_hits)
            if row.path not in seen:
                conf = name_map.get(row.path)
                if conf is None:
                    conf = next((c for k, c in name_map.items() if match(k, row.path)), None)
                seen[row.path] = (row, conf if conf is not None else class_conf(row.cls) or {})
    return list(seen.values())


def trainable(row: ViewRow, conv: bool, train_norm: bool, conf: dict | None = None) -> bool:
    """LyCORIS' create_single_module: Linear layers, 1x1 convs, kxk convs with conv layers on (or a rank from the
    map), norm layers with train_norm (its test: "Norm" in the class name)."""
    m = row.module
    if m is None:
        return False
    if row.part is not None:
        return True
    if train_norm and "Norm" in row.cls:
        return isinstance(m, NORM_CLASSES)
    if isinstance(m, nn.Linear):
        return True
    if isinstance(m, nn.Conv2d):
        return m.kernel_size == (1, 1) or conv or bool((conf or {}).get("dim"))
    return False


# ---- TrainTargets -----------------------------------------------------------------------------------------------

def _unmatched(where: str, modules: tuple, names: tuple, matched: set, rows: list[ViewRow]) -> list[str]:
    """LyCORIS' warnings for target classes and names that matched nothing (a class this model has none of is
    named with what it has)."""
    out = []
    lost_cls = [m for m in modules if m not in matched and not (m in _CLIP_ATTENTION and matched & _CLIP_ATTENTION)]
    if lost_cls:
        have = sorted({r.cls for r in rows if r.cls not in ("ModuleList", "Sequential", "SiLU", "Identity",
                                                              "Dropout", "Linear", "Conv2d")})
        out.append(f"{where}: no module of class {', '.join(lost_cls)} (sd-scripts' model has {', '.join(have)})")
    lost_names = [n for n in names if n not in matched]
    if lost_names:
        out.append(f"{where}: no module path matches {', '.join(lost_names)}")
    return out


def custom_targets(sd_model, family: str, preset: CustomPreset, conv: bool, train_unet: bool, train_te: bool,
                   train_norm: bool, notes: list[str]):
    """The layers a preset file picks on the loaded model, as TrainTargets; PresetError when it picks none."""
    from .targets import TrainTarget, unet_target_named
    out: list = []
    conv = conv and preset.enable_conv
    name = Path(preset.path).name
    if train_unet:
        rows = unet_view(sd_model.model.diffusion_model, family)
        matched: set = set()
        for row, conf in select(rows, preset.unet_modules, preset.unet_names, preset.exclude, preset.use_fnmatch,
                                matched, preset.module_map, preset.name_map):
            if trainable(row, conv, train_norm, conf):
                t = unet_target_named("lora_unet_" + row.path.replace(".", "_"), row.host, row.module, family)
                t.override = conf or None
                out.append(t)
        notes += _unmatched(f"preset file {name}, UNet", preset.unet_modules, preset.unet_names, matched, rows)
    if train_te:
        for view, kprefix, hprefix, component in _te_views(sd_model, family):
            matched = set()
            mha: dict = {}
            for row, conf in select(view, preset.te_modules, preset.te_names, preset.exclude, preset.use_fnmatch,
                                    matched, preset.module_map, preset.name_map):
                if row.module is None and row.cls == "Linear":  # (SDXL's text_projection: a bare tensor here)
                    notes.append(f"preset file {name}: {kprefix}{row.path.replace('.', '_')} is a Linear layer in "
                                 "sd-scripts' model but a plain tensor in the WebUI's: it is not trained")
                if not trainable(row, False, train_norm, conf):
                    continue
                under = row.path.replace(".", "_")
                if isinstance(row.module, NORM_CLASSES):  # (train_norm: LyCORIS' NormModule, as in the UNet)
                    out.append(TrainTarget(kprefix + under, hprefix + row.host.replace(".", "_"), row.module,
                                           component, "norm"))
                elif row.part is not None:  # open_clip: one MultiheadAttention holds q, k, v and out
                    kname = kprefix + under.rsplit("_", 2)[0]  # (..._self_attn)
                    t = mha.get(kname)
                    if t is None:
                        t = mha[kname] = TrainTarget(kname, hprefix + row.host.replace(".", "_"), row.module,
                                                     component, "mha", parts=(), override=conf or None)
                        out.append(t)
                    elif (conf or None) != t.override:  # (the four share one module here)
                        raise PresetError(f"preset file {name}: the projections of {kname} get different map "
                                          "entries; on the open_clip text encoder q, k, v and out_proj are one "
                                          "layer here: give them the same settings")
                    t.parts = tuple(p for p in ("q", "k", "v", "out") if p in t.parts + (row.part,))
                else:
                    out.append(TrainTarget(kprefix + under, hprefix + row.host.replace(".", "_"), row.module,
                                           component, "linear", override=conf or None))
            notes += _unmatched(f"preset file {name}, text encoder {component[-1]}", preset.te_modules,
                                preset.te_names, matched, view)
    if not out:
        raise PresetError(f"preset file {name} picks no layer of this {family.upper()} model; its class names and "
                          "paths are matched against sd-scripts' model (Transformer2DModel, ResnetBlock2D, "
                          "CrossAttention, down_blocks.1.attentions.0 for SD1/SD2; input_blocks.4.1 for SDXL; "
                          "CLIPAttention, CLIPMLP, text_model.encoder.layers.0 for the text encoders)"
                          + "".join(f"; {n[len(f'preset file {name}'):].lstrip(',: ')}" for n in notes
                                    if n.startswith(f"preset file {name}")))
    return out


def _te_views(sd_model, family: str):
    """(view, kohya prefix, host name prefix, component) per text encoder, as sd-scripts loads them."""
    if family == "sdxl":
        emb = sd_model.conditioner.embedders
        te1, te2 = (getattr(e, "wrapped", e) for e in (emb[0], emb[1]))
        return [(hf_clip_view(te1.transformer), "lora_te1_", "0_transformer_", "te1"),
                (open_clip_view(te2.model, len(te2.model.transformer.resblocks), True), "lora_te2_", "1_model_", "te2")]
    cond = getattr(sd_model.cond_stage_model, "wrapped", sd_model.cond_stage_model)
    if family == "sd2":  # (sd-scripts converts the layers SD2 reads: 23 of 24)
        n = len(cond.model.transformer.resblocks) - getattr(cond, "layer_idx", 1)
        return [(open_clip_view(cond.model, n, False), "lora_te_", "model_", "te1")]
    return [(hf_clip_view(cond.transformer), "lora_te_", "transformer_", "te1")]
