"""Command line: ``python -m lib_lora inspect FILE`` and ``python -m lib_lora merge BASE OUT --lora FILE[:W]``
(plus ``train`` / ``quickstart`` from ``train_cli.py``).

Exit codes: 0 ok, 1 error (one line on stderr, no traceback, for anything the user can fix), 2 usage.
Heavy imports (torch, the engine) happen inside the commands so ``--help`` and usage errors are instant.
Merging reuses the runtime apply path: the checkpoint's tensors are wrapped in module shells
(``apply.checkpoint``), named by ``apply.layers.layer_mapping`` and patched by ``apply.patcher.Patcher``, so a
merged checkpoint equals what the WebUI computes when the same LoRAs are active.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2
PROG = "python -m lib_lora"

PRECISIONS = ("fp16", "bf16", "fp32")
# mantissa bits decide whether a cast loses precision (bf16 < fp16 < fp32 < fp64)
_PRECISION_RANK = {"bfloat16": 1, "float16": 2, "float32": 3, "float64": 4}


class UsageError(Exception):
    """Bad arguments that argparse cannot check by itself (exit 2)."""


class CliError(Exception):
    """A user-facing failure outside the engine's own LoraError (exit 1)."""


# ----------------------------------------------------------------------------------------------------- arguments

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, description="LoRA Studio command line: inspect LoRA files, bake LoRAs into checkpoints, and "
                               "train headless.")
    from . import __version__
    p.add_argument("--version", action="version", version=f"lora-studio {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    pi = sub.add_parser(
        "inspect", help="describe a LoRA file (types, ranks, base model, training metadata)",
        description="Describe a LoRA-family .safetensors file: network types with counts, ranks, alphas, the base "
                    "model family (with the evidence), a summary of the training metadata, and with --model how "
                    "well it matches a checkpoint.")
    pi.add_argument("file", metavar="FILE", help="LoRA / LyCORIS / PEFT .safetensors file")
    pi.add_argument("--model", metavar="CKPT", help="SD1/SD2/SDXL .safetensors checkpoint to match the LoRA "
                                                    "against (only its header is read)")
    pi.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    pi.add_argument("--no-hash", action="store_true", help="skip the file hashes (faster on big files)")
    pi.set_defaults(func=cmd_inspect)

    pm = sub.add_parser(
        "merge", help="bake LoRAs into a checkpoint",
        description="Merge one or more LoRAs into an SD1/SD2/SDXL single-file checkpoint (A1111 ldm/sgm layout) "
                    "and write the result atomically. Every tensor the LoRAs do not touch (VAE, buffers, EMA) "
                    "and the base file's metadata are kept as they are.",
        epilog="examples:\n"
               f"  {PROG} merge v1-5.safetensors out.safetensors --lora style.safetensors:0.8\n"
               f"  {PROG} merge sdxl.safetensors out.safetensors --lora a.safetensors --lora b.safetensors:0.5:0.7 "
               "--precision fp16",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    pm.add_argument("base", metavar="BASE.safetensors",
                    help="checkpoint to merge into (read only, unless OUT is the same file with --overwrite)")
    pm.add_argument("out", metavar="OUT.safetensors", help="where to write the merged checkpoint")
    pm.add_argument("--lora", action="append", required=True, metavar="FILE[:WEIGHT]",
                    help="LoRA file, optionally with a weight (default 1.0), or FILE:TE:UNET for separate "
                         "text-encoder and UNet weights; repeat for several LoRAs")
    pm.add_argument("--precision", choices=PRECISIONS,
                    help="dtype of every floating tensor in the output (default: keep each tensor's dtype)")
    pm.add_argument("--overwrite", action="store_true",
                    help="allow OUT to be an existing file, including BASE itself")
    pm.set_defaults(func=cmd_merge)

    # `train` and `quickstart` live in train_cli.py, `grid` in grid_cli.py (same handler convention: func(args, out)
    # -> exit code)
    from . import grid_cli, train_cli
    train_cli.add_commands(sub)
    grid_cli.add_commands(sub)
    return p


def parse_lora_spec(spec: str) -> tuple[str, float, float]:
    """'FILE', 'FILE:W' or 'FILE:TE:UNET' -> (path, te, unet). A path that exists as given wins (so names
    containing ':' and Windows drive letters work)."""
    if os.path.exists(spec):
        return spec, 1.0, 1.0
    parts = spec.split(":")
    nums: list[float] = []
    while len(parts) > 1 and len(nums) < 2:
        try:
            value = float(parts[-1])
        except ValueError:
            break
        nums.insert(0, value)
        parts.pop()
    path = ":".join(parts)
    if not path:
        raise UsageError(f"--lora {spec!r}: missing file name")
    if not nums and len(parts) > 1 and not os.path.exists(path):
        raise UsageError(f"--lora {spec!r}: '{spec.rsplit(':', 1)[1]}' is not a number; "
                         f"use FILE, FILE:WEIGHT or FILE:TE_WEIGHT:UNET_WEIGHT")
    if not nums:
        return path, 1.0, 1.0
    if len(nums) == 1:
        return path, nums[0], nums[0]
    return path, nums[0], nums[1]


# ----------------------------------------------------------------------------------------------------- helpers

def _fmt_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def _fmt_num(x: float) -> str:
    return f"{x:g}" if abs(x) >= 1e-3 or x == 0 else f"{x:.3g}"


def _fmt_counter(counter: Counter, unit: str = "") -> str:
    """'32' when all equal, else '8 ×12, 32 ×252' (values sorted)."""
    if not counter:
        return "-"
    if len(counter) == 1:
        (v, n), = counter.items()
        return f"{v}{unit} (all {n})"

    def key(v):
        try:
            return (0, float(v))
        except (TypeError, ValueError):
            return (1, str(v))
    return ", ".join(f"{v}{unit} ×{counter[v]}" for v in sorted(counter, key=key))


def _require_file(path: str, what: str) -> None:
    if not os.path.exists(path):
        from .train.config import missing_path_hint
        raise CliError(f"{what} not found: {path}{missing_path_hint(path)}")
    if os.path.isdir(path):
        raise CliError(f"{what} is a folder, not a file: {path}")


def _family_label(family: str | None) -> str:
    from .formats.keymap import label
    return label(family) if family else "unknown"


def _adapter_config(metadata: dict) -> dict | None:
    raw = (metadata or {}).get("lora_adapter_metadata")
    if not raw:
        return None
    try:
        cfg = json.loads(raw)
    except ValueError:
        return None
    return cfg if isinstance(cfg, dict) else None


# ----------------------------------------------------------------------------------------------------- metadata

def _json_field(metadata: dict, key: str):
    raw = metadata.get(key)
    if not raw or not isinstance(raw, str) or raw[:1] not in "{[":
        return raw
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def _top_tags(metadata: dict, n: int = 10) -> list[tuple[str, int]]:
    """Most frequent caption tags over the training folders (kohya ss_tag_frequency, or ss_datasets' copy); the
    regularisation folders' tags are the class's, not what the LoRA learnt."""
    freq = _json_field(metadata, "ss_tag_frequency")
    datasets = _json_field(metadata, "ss_datasets")
    reg = _json_field(metadata, "ss_reg_dataset_dirs")
    reg = set(reg) if isinstance(reg, dict) else set()
    for ds in datasets if isinstance(datasets, list) else []:
        for sub in (ds.get("subsets") if isinstance(ds, dict) else None) or []:
            if isinstance(sub, dict) and sub.get("is_reg") and sub.get("image_dir"):
                reg.add(os.path.basename(str(sub["image_dir"]).rstrip("/\\")))
    per_dir: list[dict] = []
    if isinstance(freq, dict):
        per_dir = [v for k, v in freq.items() if isinstance(v, dict) and k not in reg]
    elif isinstance(datasets, list):
        for ds in datasets:
            tf = ds.get("tag_frequency") if isinstance(ds, dict) else None
            if isinstance(tf, dict):
                per_dir += [v for k, v in tf.items() if isinstance(v, dict) and k not in reg]
    total: Counter = Counter()
    for d in per_dir:
        for tag, count in d.items():
            try:
                total[str(tag).strip()] += int(count)
            except (TypeError, ValueError):
                continue
    return total.most_common(n)


def summarize_metadata(metadata: dict) -> dict:
    """The training facts people look for, from kohya ss_* / modelspec / diffusers adapter metadata."""
    m = metadata or {}
    out: dict = {}

    def put(name, *keys):
        for k in keys:
            v = m.get(k)
            if v not in (None, "", "None"):
                out[name] = v
                return

    put("output_name", "ss_output_name", "modelspec.title")
    put("base_model_version", "ss_base_model_version")
    put("base_model", "ss_sd_model_name")
    put("architecture", "modelspec.architecture")
    put("network_module", "ss_network_module")
    args = _json_field(m, "ss_network_args")
    if args not in (None, "", "None"):
        out["network_args"] = args
    put("network_dim", "ss_network_dim")
    put("network_alpha", "ss_network_alpha")
    put("epoch", "ss_epoch")
    put("num_epochs", "ss_num_epochs")
    put("steps", "ss_steps")
    put("max_train_steps", "ss_max_train_steps")
    put("resolution", "ss_resolution", "modelspec.resolution")
    put("learning_rate", "ss_learning_rate")
    put("unet_lr", "ss_unet_lr")  # (each overrides learning_rate for its part, which then trains at neither)
    put("text_encoder_lr", "ss_text_encoder_lr")
    put("optimizer", "ss_optimizer")
    put("clip_skip", "ss_clip_skip")
    put("training_comment", "ss_training_comment")
    put("trained_at", "ss_training_finished_at", "ss_training_started_at")
    tags = _top_tags(m)
    if tags:
        out["top_tags"] = tags
    hashes = {k: m[k] for k in ("sshs_model_hash", "sshs_legacy_hash") if m.get(k)}
    if hashes:
        out["hashes"] = hashes
    cfg = _adapter_config(m)
    if cfg:
        out["adapter_config"] = {k: cfg[k] for k in ("r", "lora_alpha", "use_rslora", "use_dora", "target_modules")
                                 if k in cfg} or cfg
    return out


def _format_metadata(summary: dict, n_keys: int) -> list[str]:
    lines = []
    if not n_keys:
        return ["metadata:   none"]
    lines.append(f"metadata:   {n_keys} key{'s' if n_keys != 1 else ''}")

    def row(label, value):
        lines.append(f"  {label:<15} {value}")

    s = summary
    if "output_name" in s:
        row("output name", s["output_name"])
    base = " ".join(x for x in (s.get("base_model_version"), f"({s['base_model']})" if "base_model" in s else None)
                    if x)
    if base:
        row("base model", base)
    if "architecture" in s:
        row("architecture", s["architecture"])
    if "network_module" in s or "network_args" in s:
        args = s.get("network_args")
        args_txt = (" " + json.dumps(args, separators=(",", ":"))) if isinstance(args, (dict, list)) else \
            (f" {args}" if args else "")
        row("network", f"{s.get('network_module', '?')}{args_txt}")
    if "network_dim" in s or "network_alpha" in s:
        row("dim / alpha", f"{s.get('network_dim', '?')} / {s.get('network_alpha', '?')}")
    if any(k in s for k in ("epoch", "num_epochs")):
        row("epochs", "/".join(str(s[k]) for k in ("epoch", "num_epochs") if k in s))
    if any(k in s for k in ("steps", "max_train_steps")):
        row("steps", "/".join(str(s[k]) for k in ("steps", "max_train_steps") if k in s))
    if "resolution" in s:
        row("resolution", s["resolution"])
    if "unet_lr" in s or "text_encoder_lr" in s:
        lr = s.get("learning_rate", "?")
        row("learning rate", f"UNet {s.get('unet_lr', lr)}, text encoder {s.get('text_encoder_lr', lr)}")
    elif "learning_rate" in s:
        row("learning rate", s["learning_rate"])
    for key, label in (("optimizer", "optimizer"), ("clip_skip", "clip skip"), ("training_comment", "comment")):
        if key in s:
            row(label, s[key])
    if "top_tags" in s:
        row("top tags", ", ".join(f"{t} ({c})" for t, c in s["top_tags"]))
    if "hashes" in s:
        row("hashes", ", ".join(f"{k}={v[:12]}" for k, v in s["hashes"].items()))
    if "adapter_config" in s:
        row("adapter config", json.dumps(s["adapter_config"], separators=(",", ":")))
    return lines


# ----------------------------------------------------------------------------------------------------- inspect

def _refuse_not_a_lora(path: str, shapes: dict, metadata: dict) -> None:
    """A checkpoint, bare model weights, a VAE, an embedding or unrelated tensors given where a LoRA belongs: said
    as such (the WebUI's words), not listed as hundreds of unreadable modules."""
    from .formats.report import not_a_lora
    kind = not_a_lora(shapes, metadata)
    if kind:
        if kind.startswith("it is a full"):  # (the WebUI's folder advice is none on the command line)
            kind = ("it is a full Stable Diffusion checkpoint, not a LoRA: it is the BASE of `merge BASE OUT --lora "
                    "FILE`, the --model of `inspect LORA --model` and of `train`")
        raise CliError(f"{os.path.basename(path)}: {kind}")


def _refuse_a_state(path: str) -> None:
    from .train.saving import OLD_STATE_EXT, STATE_EXT
    if path.endswith((STATE_EXT, OLD_STATE_EXT)):
        raise CliError(f"{os.path.basename(path)} is a LoRA Studio resume state, not a LoRA: continue its run with "
                       f"`{PROG} train CONFIG --resume {path}`; the run's LoRA files are the .safetensors beside it")


def check_lora_family(path: str, family: str, ckpt: str, advice: str):
    """A LoRA file's family info, read from its header; a state, a file that is no LoRA, a family we do not read
    and one for another family than the checkpoint's are refused (``advice`` ends that message, {} its family)."""
    from .formats.errors import FamilyMismatchError, UnsupportedFamilyError
    from .formats.family import detect_family
    from .formats.safetensors_io import read_header

    _refuse_a_state(path)
    h = read_header(path)
    shapes = {k: tuple(v["shape"]) for k, v in h.items() if k != "__metadata__"}
    _refuse_not_a_lora(path, shapes, h.get("__metadata__") or {})
    fi = detect_family(shapes, h.get("__metadata__") or {})
    if fi.refused:
        raise UnsupportedFamilyError(fi.refusal_message(path), path)
    if fi.family and fi.family != family:
        raise FamilyMismatchError(
            f"{os.path.basename(path)}: this LoRA is for {_family_label(fi.family)}, the checkpoint is "
            f"{_family_label(family)} ({os.path.basename(ckpt)}). {advice.format(_family_label(fi.family))}. "
            f"LoRA family detected from {fi.evidence}", path)
    return fi


def inspect_file(path: str, model: str | None = None, with_hashes: bool = True) -> dict:
    """Everything `inspect` prints, as plain data (the --json output)."""
    from .apply.loader import check_values, detect_writer
    from .formats.errors import LoraError
    from .formats.family import detect_family
    from .formats.hashes import addnet_hash, sha256_file, shorthash
    from .formats.keymap import FAMILIES, group_modules, map_module_key_with_reason
    from .formats.safetensors_io import load_tensors, read_header
    from .networks.base import ModuleContext
    from .networks.registry import build_module

    _require_file(path, "LoRA file")
    _refuse_a_state(path)
    header = read_header(path)
    metadata = dict(header.get("__metadata__") or {})
    shapes = {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}
    _refuse_not_a_lora(path, shapes, metadata)
    dtypes = Counter(v["dtype"] for k, v in header.items() if k != "__metadata__")
    info: dict = {"file": os.path.abspath(path), "size_bytes": os.path.getsize(path), "tensors": len(shapes),
                  "dtypes": dict(dtypes)}
    if with_hashes:
        sha = sha256_file(path)
        addnet = addnet_hash(path)
        info["hashes"] = {"sha256": sha, "addnet": addnet, "addnet_short": shorthash(addnet)}
        if metadata.get("sshs_model_hash"):
            info["hashes"]["sshs_model_hash_matches"] = metadata["sshs_model_hash"] == addnet

    fam = detect_family(shapes, metadata)
    info["family"] = {"family": fam.family, "name": _family_label(fam.family) if fam.family else None,
                      "evidence": fam.evidence, "refused": fam.refused,
                      "candidates": list(getattr(fam, "key_candidates", ()) or ())}

    tensors = load_tensors(path)
    notes: list[str] = []
    try:
        huge = check_values(path, tensors)
        if huge:
            notes.append(huge)
    except LoraError as e:  # (inspect describes a damaged file rather than refusing it)
        notes.append(str(e))
    groups = group_modules(tensors.keys())
    # A1111 reads `bundle_emb.*` as textual-inversion embeddings shipped inside the LoRA, not as network modules
    bundled = [mk for mk in groups if mk.startswith("bundle_emb")]
    for mk in bundled:
        del groups[mk]
    writer = detect_writer(metadata, list(tensors))
    adapter_cfg = _adapter_config(metadata)
    info["writer"] = writer
    kinds: Counter = Counter()
    ranks: Counter = Counter()
    alphas: Counter = Counter()
    scales: Counter = Counter()
    components: Counter = Counter()
    unreadable: dict[str, str] = {}
    # family used to name components: the detected one, else any family that knows the key
    fams_for_mapping = [fam.family] if fam.family else list(fam.key_candidates or FAMILIES)
    for module_key, suffixes in groups.items():
        t = {sfx: tensors[fk] for sfx, fk in suffixes.items()}
        ctx = ModuleContext(writer=writer, adapter_config=adapter_cfg, module_key=module_key)
        try:
            mod = build_module(t, ctx)
        except LoraError as e:
            unreadable[module_key] = str(e)
            continue
        kind = mod.kind + ("+dora" if getattr(mod, "is_dora", False) else "")
        kinds[kind] += 1
        r = mod.rank()
        ranks["-" if r is None else r] += 1
        if "alpha" in t and t["alpha"].numel() == 1:
            alphas[_fmt_num(float(t["alpha"].float().item()))] += 1
        else:
            alphas["none"] += 1
        scale = getattr(getattr(mod, "base", mod), "scale", None)  # DoRA wraps its base type
        if isinstance(scale, (int, float)):
            scales[_fmt_num(float(scale))] += 1
        for w in getattr(mod, "warnings", [])[:1]:
            if len(notes) < 6:
                notes.append(w)
        comp = None
        for f in fams_for_mapping:
            target, _why = map_module_key_with_reason(module_key, f)
            if target is not None:
                comp = target.component
                break
        components[comp or "unmapped"] += 1
    info["modules"] = sum(kinds.values())
    info["network_types"] = dict(kinds.most_common())
    info["ranks"] = {str(k): v for k, v in ranks.items()}
    info["alphas"] = dict(alphas)
    info["scales"] = dict(scales)  # effective alpha/rank (or adapter-config scale) per module
    info["components"] = dict(components)
    if bundled:
        info["bundled_embeddings"] = len(bundled)
    if unreadable:
        info["unreadable"] = unreadable
    if notes:
        info["notes"] = notes
    info["metadata"] = {"keys": len(metadata), "summary": summarize_metadata(metadata)}

    if model:
        info["model"] = match_against_checkpoint(path, fam, model)
    return info


def match_against_checkpoint(path: str, fam, ckpt: str) -> dict:
    """Match report of the LoRA against a checkpoint, from the checkpoint's header only (meta tensors)."""
    from .apply.checkpoint import CheckpointModel
    from .apply.layers import layer_mapping
    from .formats.errors import UnsupportedFamilyError
    from .formats.safetensors_io import read_header

    _require_file(ckpt, "checkpoint")
    try:
        ck = CheckpointModel.from_header(read_header(ckpt))
    except UnsupportedFamilyError as e:
        raise UnsupportedFamilyError(f"--model {os.path.basename(ckpt)}: {e}", ckpt) from None
    out: dict = {"file": os.path.abspath(ckpt), "family": ck.family, "name": _family_label(ck.family)}
    if fam.refused:
        out["compatible"] = False
        out["message"] = fam.refusal_message(path)
        return out
    if fam.family and fam.family != ck.family:
        out["compatible"] = False
        out["message"] = (f"this LoRA is for {_family_label(fam.family)}, the checkpoint is "
                          f"{_family_label(ck.family)}")
        return out
    net = _load_network(path, ck.family, layer_mapping(ck))
    report = net.report
    out["report"] = {"summary": report.summary(), "total_modules": report.total_modules,
                     "matched": len(report.matched), "unmatched": dict(report.unmatched),
                     "by_component": dict(report.by_component)}
    out["compatible"] = len(report.matched) > 0
    if not fam.family:
        out["note"] = f"the LoRA's family is ambiguous; matched as {_family_label(ck.family)} like the checkpoint"
    if not report.matched:
        out["message"] = f"no module of the LoRA matches the {_family_label(ck.family)} checkpoint"
    return out


def _load_network(path: str, family: str, layer_names):
    from .apply.loader import load_network
    return load_network(path, family, cache=None, layer_names=layer_names)


def format_inspect(info: dict) -> str:
    lines = []
    lines.append(f"file:       {info['file']}")
    dt = ", ".join(f"{k} ×{v}" for k, v in info.get("dtypes", {}).items())
    lines.append(f"size:       {_fmt_size(info['size_bytes'])}, {info['tensors']} tensors ({dt})")
    if "hashes" in info:
        h = info["hashes"]
        extra = ""
        if "sshs_model_hash_matches" in h:
            extra = ("; metadata sshs_model_hash matches" if h["sshs_model_hash_matches"]
                     else "; metadata sshs_model_hash does NOT match (tensors edited after training?)")
        lines.append(f"hashes:     addnet {h['addnet_short']}  sha256 {h['sha256']}{extra}")
    f = info["family"]
    if f["refused"]:
        lines.append(f"base model: {f['refused']} (not supported: SD1.x, SD2.x and SDXL only) - {f['evidence']}")
    elif f["family"]:
        lines.append(f"base model: {f['name']} - {f['evidence']}")
    else:
        lines.append(f"base model: undetermined - {f['evidence'] or 'no evidence in keys or metadata'}")
    types = ", ".join(f"{k} ×{v}" for k, v in info["network_types"].items()) or "none recognised"
    lines.append(f"networks:   {info['modules']} modules: {types}  (writer: {info.get('writer', '?')})")
    comps = info.get("components", {})
    if comps:
        order = ["unet", "te1", "te2", "unmapped"]
        names = {"unet": "unet", "te1": "text encoder" if "te2" not in comps else "te1 (CLIP-L)",
                 "te2": "te2 (OpenCLIP bigG)", "unmapped": "not mapped"}
        lines.append("parts:      " + ", ".join(f"{names.get(c, c)} {comps[c]}"
                                                for c in sorted(comps, key=lambda c: order.index(c)
                                                                if c in order else 9)))
    lines.append(f"rank:       {_fmt_counter(Counter(info['ranks']))}")
    lines.append(f"alpha:      {_fmt_counter(Counter(info['alphas']))}")
    if info.get("scales"):
        lines.append(f"scale:      {_fmt_counter(Counter(info['scales']))}  (alpha/rank as applied, "
                     f"before the weight)")
    if info.get("bundled_embeddings"):
        lines.append(f"embeddings: {info['bundled_embeddings']} bundled textual-inversion tensor group(s)")
    if info.get("unreadable"):
        bad = info["unreadable"]
        first = next(iter(bad.items()))
        lines.append(f"unreadable: {len(bad)} modules, e.g. {first[1]}")
    for n in info.get("notes", []):
        lines.append(f"note:       {n}")
    lines += _format_metadata(info["metadata"]["summary"], info["metadata"]["keys"])
    if "model" in info:
        m = info["model"]
        lines.append(f"checkpoint: {m['file']} ({m['name']})")
        if "report" in m:
            r = m["report"]
            lines.append(f"  match:    {r['summary']}")
            for key, why in list(r["unmatched"].items())[:10]:
                lines.append(f"    unmatched {key}: {why}")
            if len(r["unmatched"]) > 10:
                lines.append(f"    ... and {len(r['unmatched']) - 10} more unmatched")
        if m.get("note"):
            lines.append(f"  note:     {m['note']}")
        if m.get("message"):
            lines.append(f"  MISMATCH: {m['message']}")
        else:
            lines.append(f"  verdict:  {'compatible' if m.get('compatible') else 'NOT compatible'}")
    return "\n".join(lines)


def cmd_inspect(args, out) -> int:
    info = inspect_file(args.file, args.model, with_hashes=not args.no_hash)
    if args.json:
        out.write(json.dumps(info, indent=2, default=str) + "\n")
    else:
        out.write(format_inspect(info) + "\n")
    return EXIT_OK


# ----------------------------------------------------------------------------------------------------- merge

def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


def _precast(sd: dict, dtype) -> int:
    """Upcast (never downcast) floating tensors to `dtype` before merging, so the merge itself runs at the output
    precision; downcasts happen once, at write time, after the merge (one rounding either way)."""
    target = _PRECISION_RANK[str(dtype).replace("torch.", "")]
    n = 0
    for k, t in sd.items():
        if t.is_floating_point() and _PRECISION_RANK.get(str(t.dtype).replace("torch.", ""), 0) < target:
            sd[k] = t.to(dtype)
            n += 1
    return n


def _cast_for_write(sd: dict, dtype) -> tuple[dict, list[str]]:
    import torch
    out, overflow = {}, []
    for k, t in sd.items():
        if t.is_floating_point() and t.dtype != dtype:
            c = t.to(dtype)
            if dtype == torch.float16 and not torch.isfinite(c).all() and torch.isfinite(t).all():
                overflow.append(k)
            out[k] = c
        else:
            out[k] = t
    return out, overflow


def cmd_merge(args, out) -> int:
    loras = [parse_lora_spec(s) for s in args.lora]
    base, dest = args.base, args.out
    if not dest.lower().endswith(".safetensors"):
        raise UsageError(f"OUT must be a .safetensors file, got {dest!r}")
    _require_file(base, "base checkpoint")
    if os.path.exists(dest) and not args.overwrite:
        if _same_file(base, dest):
            raise UsageError(f"OUT is the base checkpoint itself ({dest}); pick another name, or pass --overwrite "
                             f"to replace the base")
        raise UsageError(f"{dest} already exists; pass --overwrite to replace it")
    for path, _, _ in loras:
        _require_file(path, "LoRA file")
    folder = os.path.dirname(os.path.abspath(dest))
    if not os.path.isdir(folder):  # (said before the merge, not after it)
        raise CliError(f"cannot write {dest}: {folder} " + ("is a file, not a folder" if os.path.exists(folder)
                                                             else "does not exist") + "; choose another OUT")
    if not os.access(folder, os.W_OK):
        raise CliError(f"cannot write {dest}: no permission to write into {folder}; choose another OUT")

    import torch
    from .apply.checkpoint import CheckpointModel, detect_checkpoint_family
    from .apply.layers import layer_mapping
    from .apply.patcher import Patcher
    from .formats.errors import FamilyMismatchError, LoraError, UnsupportedFamilyError
    from .formats.safetensors_io import leftover_temps, load_tensors, read_header, remove_files, save_file_atomic

    t0 = time.perf_counter()
    header = read_header(base)
    base_meta = dict(header.get("__metadata__") or {})
    shapes = {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}
    try:
        family = detect_checkpoint_family(shapes)
    except UnsupportedFamilyError as e:
        raise UnsupportedFamilyError(f"{os.path.basename(base)}: {e}", base) from None
    fam_label = _family_label(family)
    names = set(layer_mapping(CheckpointModel.from_header(header)))

    # Family check before reading gigabytes: a wrong-family LoRA is an error, named as such.
    infos = []
    for path, _te, _unet in loras:
        infos.append(check_lora_family(path, family, base, "Merge it into an {} checkpoint instead"))
    nets = []
    for (path, te, unet), fi in zip(loras, infos):
        net = _load_network(path, family, names)
        report = net.report
        name = os.path.basename(path)
        if not report.matched:
            raise FamilyMismatchError(
                f"{name}: no module of this LoRA matches the {fam_label} checkpoint {os.path.basename(base)}"
                + (f" ({next(iter(report.unmatched.values()))})" if report.unmatched else ""), path)
        weight = _fmt_num(te) if te == unet else f"te {_fmt_num(te)} unet {_fmt_num(unet)}"
        out.write(f"{report.summary()}  weight {weight}\n")
        if report.unmatched:
            shown = list(report.unmatched.items())[:5]
            for key, why in shown:
                out.write(f"  unmatched {key}: {why}\n")
            if len(report.unmatched) > len(shown):
                out.write(f"  ... and {len(report.unmatched) - len(shown)} more unmatched modules\n")
        if not fi.family:
            out.write(f"  note: the LoRA's family could not be determined ({fi.evidence}); "
                      f"merged as {fam_label} like the checkpoint\n")
        nets.append((net, te, unet))

    sd = load_tensors(base)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}.get(args.precision)
    if dtype is not None:
        _precast(sd, dtype)
    ck = CheckpointModel.from_state_dict(sd, family)
    mapping = layer_mapping(ck)
    own = {(id(m), attr) for m, attr in ck.slots.values()}
    versions = {k: getattr(m, attr)._version for k, (m, attr) in ck.slots.items()}
    patcher = Patcher(cache_mb=0)  # one shot: no delta cache to keep
    result = patcher.apply(mapping, [(net, te, unet, None) for net, te, unet in nets])
    errors = [e for n in result.networks for e in n.errors]
    if errors:
        raise LoraError(f"{len(errors)} layer(s) could not be merged, nothing was written; first: {errors[0]}")
    for n in result.networks:
        for u in n.unmatched[:5]:
            out.write(f"  {n.name}: not in the checkpoint: {u}\n")
    # A bias delta on a layer without bias would need a key the checkpoint layout does not have.
    for m in {m for m, _ in ck.slots.values()}:
        for pname, _t in m.named_parameters(recurse=False):
            if (id(m), pname) not in own:
                out.write(f"  warning: bias delta for {_slot_prefix(ck, m)}.{pname} dropped "
                          f"(the checkpoint has no such tensor)\n")
    # the patcher writes in place (copy_), which bumps a tensor's version counter: exactly the changed tensors
    touched = sum(1 for k, (m, attr) in ck.slots.items() if getattr(m, attr)._version != versions[k])
    merged = ck.state_dict_with(sd)
    if dtype is not None:
        merged, overflow = _cast_for_write(merged, dtype)
        if overflow:
            out.write(f"  warning: {len(overflow)} tensor(s) overflow fp16 (inf), e.g. {overflow[0]}\n")
    meta = dict(base_meta)
    meta["lora_studio_merge"] = json.dumps(
        [{"file": os.path.basename(p), "te": te, "unet": unet} for p, te, unet in loras], separators=(",", ":"))
    # an interrupted merge's hidden temp file (a checkpoint's size) that nothing is writing any more
    stale = [p for p in leftover_temps(os.path.dirname(os.path.abspath(dest)), os.path.basename(dest))
             if time.time() - os.path.getmtime(p) > 120]
    n_stale, size = remove_files(stale)
    if n_stale:
        out.write(f"  removed {n_stale} unfinished file(s) ({_fmt_size(size)}) an interrupted write of "
                  f"{os.path.basename(dest)} left\n")
    save_file_atomic(merged, dest, meta)
    dt = time.perf_counter() - t0
    out.write(f"merged {result.modules_merged} layers ({touched} tensors) of the {fam_label} checkpoint; "
              f"{len(sd) - touched} other tensors kept"
              + (f" (cast to {args.precision})" if dtype is not None else " unchanged") + "\n")
    out.write(f"wrote {dest} ({_fmt_size(os.path.getsize(dest))}) in {dt:.1f} s\n")
    return EXIT_OK


def _slot_prefix(ck, module) -> str:
    for k, (m, attr) in ck.slots.items():
        if m is module:
            return k[: -len(attr) - 1]
    return "?"


# ----------------------------------------------------------------------------------------------------- main

def main(argv: list[str] | None = None, out=None, err=None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: --help/--version (0) or a usage error (2, message already printed)
        return int(e.code or 0)
    try:
        return args.func(args, out)
    except UsageError as e:
        err.write(f"{PROG} {args.command}: error: {e}\n")
        return EXIT_USAGE
    except KeyboardInterrupt:
        err.write("interrupted\n")
        return 130
    except Exception as e:  # noqa: BLE001 - user-facing errors become one line; engine bugs keep their traceback
        from .formats.errors import LoraError
        if isinstance(e, (LoraError, CliError)):
            err.write(f"error: {e}\n")
            return EXIT_ERROR
        if isinstance(e, OSError):
            err.write(f"error: {e.strerror or e}" + (f": {e.filename}" if e.filename else "") + "\n")
            return EXIT_ERROR
        if isinstance(e, MemoryError):
            err.write("error: out of memory while loading/merging; close other programs or use a machine with "
                      "more RAM\n")
            return EXIT_ERROR
        raise
