"""Read a LoRA file into network modules keyed by A1111 layer name (formats + networks), with a small cache."""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field

from ..formats.errors import FamilyMismatchError, LoraError, LoraFileError, UnsupportedFamilyError
from ..formats.family import detect_family
from ..formats.keymap import FAMILIES, Target, group_modules, label
from ..formats.report import MatchReport, not_a_lora
from ..formats.safetensors_io import ABSURD_ALPHA, ABSURD_VALUE, load_tensors, read_header, refuse_pickle
from ..networks import ModuleContext, build_module
from .cache import LRU

log = logging.getLogger("lora_studio.apply")

# A LoadedNetwork holds its tensors on the CPU (about the file's size in RAM): at most 8 files and 2 GiB, so a few
# multi-GB "full" LoRAs do not stay in memory (the delta cache keeps what switching needs).
DEFAULT_CACHE = LRU(max_items=8, max_bytes=2 << 30, size_of=lambda net: getattr(net, "size", 0))

_KOHYA_MODULE_PREFIX = ("networks.",)
_LYCORIS_MODULE_PREFIX = ("lycoris",)


@dataclass
class LoadedNetwork:
    name: str  # file stem
    path: str
    mtime: float
    mtime_ns: int
    size: int
    family: str | None  # the LoRA's own family (detected), None if unknown
    model_family: str  # the family it was mapped for
    modules: dict[str, list[tuple[Target, object]]]  # A1111 layer name -> [(Target, NetworkModule)]
    report: MatchReport
    metadata: dict[str, str]
    writer: str = "unknown"
    errors: dict[str, str] = field(default_factory=dict)  # module key -> why it could not be built
    # textual-inversion embeddings saved in the file (sd-scripts' bundle_emb.<name>.*), in the form A1111's
    # create_embedding_from_data takes: {name: {"string_to_param": {"*": tensor}} or {"clip_l": …, "clip_g": …}}
    bundle_embeddings: dict[str, dict] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    family_mismatch: str | None = None  # set when loaded with on_mismatch='flag' despite a mismatch
    huge_values: str | None = None  # the warning when tensors hold absurd (diverged-run) values

    @property
    def key(self):
        """Identity of the file's content as the patcher/delta cache see it."""
        return (self.path, self.mtime_ns, self.size)

    @property
    def module_count(self) -> int:
        return sum(len(v) for v in self.modules.values())

    def summary(self) -> str:
        return self.report.summary()


def detect_writer(metadata: dict, keys) -> str:
    """'kohya' | 'lycoris' | 'peft' | 'unknown' (decides the alpha == 0 rule and the DoRA formula)."""
    mod = (metadata.get("ss_network_module") or "").strip()
    if mod.startswith(_LYCORIS_MODULE_PREFIX):
        return "lycoris"
    if mod.startswith(_KOHYA_MODULE_PREFIX) or mod:
        return "kohya"
    for k in keys:
        if ".lora_A." in k or ".lora_B." in k or k.endswith((".lora_A.weight", ".lora_B.weight")):
            return "peft"
    return "unknown"


def _adapter_config(metadata: dict, warnings: list[str]):
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return None
    if isinstance(raw, dict):
        return raw
    try:
        cfg = json.loads(raw)
    except ValueError as e:
        warnings.append(f"metadata 'lora_adapter_metadata' is not valid JSON ({e}); ignored, scale defaults to 1")
        return None
    return cfg if isinstance(cfg, dict) else None


def _file_identity(path: str):
    st = os.stat(path)
    return st.st_mtime, st.st_mtime_ns, st.st_size


def load_network(path, family: str, cache: LRU | None = DEFAULT_CACHE, *, on_mismatch: str = "raise",
                 layer_names=None) -> LoadedNetwork:
    """Load ``path`` (safetensors) for a model of ``family`` ('sd1'|'sd2'|'sdxl').

    - A file detected as another supported family raises ``FamilyMismatchError`` ("this LoRA is for SDXL, the
      loaded model is SD1.5 …"); ``on_mismatch='flag'`` maps it anyway and sets ``.family_mismatch``.
    - SD3/Flux/Cascade files raise ``UnsupportedFamilyError``; pickles and corrupt files ``LoraFileError``.
    - Keys that name no layer are listed in ``.report.unmatched`` (with a reason); modules whose tensors fit no
      network type are moved there too and listed in ``.errors``.
    - ``layer_names`` (e.g. the layer mapping): targets the model lacks also count as unmatched.
    - Cached by (real path, mtime, size, family, layer names): a rewritten file is reloaded.
    """
    if family not in FAMILIES:
        raise UnsupportedFamilyError(f"unknown model family {family!r}; expected one of {', '.join(FAMILIES)}")
    if on_mismatch not in ("raise", "flag"):
        raise ValueError("on_mismatch must be 'raise' or 'flag'")
    given = os.fspath(path)  # messages name the file as the user knows it (a link, not its target)
    path = os.path.realpath(given)
    refuse_pickle(path)
    if not os.path.isfile(path):
        raise LoraError(f"LoRA file not found: {path}", path)
    mtime, mtime_ns, size = _file_identity(path)
    names_key = None if layer_names is None else hash(frozenset(layer_names))
    ckey = (path, mtime_ns, size, family, names_key)
    if cache is not None:
        hit = cache.get(ckey)
        if hit is not None and (on_mismatch == "flag" or hit.family_mismatch is None):
            return hit

    header = read_header(path)
    metadata = {k: v for k, v in (header.get("__metadata__") or {}).items()}
    shapes = {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}
    kind = not_a_lora(shapes, metadata)  # (before reading gigabytes of a checkpoint)
    if kind:
        raise LoraError(f"{os.path.basename(given)}: {kind}", given)
    info = detect_family(shapes, metadata)
    if info.refused:
        raise UnsupportedFamilyError(info.refusal_message(path), path)
    mismatch = None
    if info.family and info.family != family:
        mismatch = f"this LoRA is for {label(info.family)}, the loaded model is {label(family)}"
        if on_mismatch == "raise":
            raise FamilyMismatchError(
                f"{os.path.basename(given)}: {mismatch}. Load an {label(info.family)} checkpoint to use it.", given,
                detail=f"{label(info.family)} detected from {info.evidence}")

    tensors = load_tensors(path, copy=cache is not None)  # (a cached map would hold a deleted file's space)
    huge = check_values(given, tensors)
    warnings: list[str] = [huge] if huge else []
    writer = detect_writer(metadata, tensors.keys())
    adapter_cfg = _adapter_config(metadata, warnings)

    groups = group_modules(tensors.keys())
    bundled = [mk for mk in groups if mk.startswith("bundle_emb")]
    for mk in bundled:
        del groups[mk]
    report = MatchReport.build(path, list(groups), family, info, available=layer_names)
    bundles = bundled_embeddings(tensors)
    if mismatch:
        report.notes.append(mismatch)

    modules: dict[str, list[tuple[Target, object]]] = {}
    errors: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for mk in list(report.matched):
        target = report.targets[mk]
        t = {suffix: tensors[fk] for suffix, fk in groups[mk].items()}
        ctx = ModuleContext(writer=writer, adapter_config=adapter_cfg, module_key=mk)
        try:
            netmod = build_module(t, ctx)
        except LoraError as e:
            errors[mk] = str(e)
            _unmatch(report, mk, f"could not be read: {e}")
            continue
        warnings.extend(getattr(netmod, "warnings", []) or [])
        slot = (target.name, target.part)
        if slot in seen:
            warnings.append(f"keys '{seen[slot]}' and '{mk}' both target {target.name}"
                            + (f"[{target.part}]" if target.part else "") + "; both are applied")
        seen[slot] = mk
        modules.setdefault(target.name, []).append((target, netmod))
    if errors:
        warnings.append(f"{len(errors)} module(s) could not be read; first: {next(iter(errors.values()))}")

    net = LoadedNetwork(
        name=os.path.splitext(os.path.basename(path))[0], path=path, mtime=mtime, mtime_ns=mtime_ns, size=size,
        family=info.family, model_family=family, modules=modules, report=report, metadata=metadata, writer=writer,
        errors=errors, warnings=warnings, family_mismatch=mismatch, bundle_embeddings=bundles, huge_values=huge)
    if report.unmatched:
        log.info("%s", report.summary())
    if cache is not None:
        cache.put(ckey, net)
    return net


def bundled_embeddings(tensors: dict) -> dict[str, dict]:
    """``bundle_emb.<name>.string_to_param.<k>`` / ``bundle_emb.<name>.<vec>`` keys grouped per embedding, as the
    built-in Lora reads them (networks.py load_network)."""
    out: dict[str, dict] = {}
    for key, t in tensors.items():
        root, _, rest = key.partition(".")
        if root != "bundle_emb" or "." not in rest:
            continue
        name, vec = rest.split(".", 1)
        emb = out.setdefault(name, {})
        if vec.split(".")[0] == "string_to_param":
            emb["string_to_param"] = {vec.split(".", 1)[1] if "." in vec else "*": t}
        else:
            emb[vec] = t
    return out


def check_values(path: str, tensors: dict) -> str | None:
    """A NaN or infinity in a file only gives black images, and A1111 then stops the job with advice that does not
    name the LoRA: say it here, once per file (the result is cached). Finite but absurd values (1e18 from a run
    that diverged) are loaded, with the warning returned."""
    bad, huge = [], []
    for k, t in tensors.items():
        if not t.is_floating_point() or t.numel() == 0:
            continue
        m = float((t.float() if t.element_size() == 1 else t).abs().max())  # (NaN propagates through max)
        if not math.isfinite(m):
            bad.append(k)
        elif m > (ABSURD_ALPHA if k.endswith("alpha") else ABSURD_VALUE):
            huge.append((m, k))
    if bad:
        raise LoraFileError(f"{os.path.basename(path)}: {len(bad)} tensor(s) hold NaN or infinite values (e.g. "
                            f"{bad[0]}): the file is damaged, or it was saved from a training run that diverged. "
                            "Download it again, or use an earlier epoch's file.", path)
    if huge:
        m, k = max(huge)
        return (f"{len(huge)} tensor(s) hold values up to {m:.3g} (e.g. {k}), where a LoRA's weights stay well "
                f"below {ABSURD_VALUE:g}: the file was probably saved from a training run that diverged, so expect "
                "black images or a NaN error; use an earlier epoch's file")
    return None


def _unmatch(report: MatchReport, module_key: str, reason: str) -> None:
    """Move a matched key to unmatched (its tensors fit no network type) so counts stay honest."""
    target = report.targets.pop(module_key, None)
    if module_key in report.matched:
        report.matched.remove(module_key)
    if target is not None:
        n = report.by_component.get(target.component, 0) - 1
        if n > 0:
            report.by_component[target.component] = n
        else:
            report.by_component.pop(target.component, None)
    report.unmatched[module_key] = reason


def clear_cache(cache: LRU | None = DEFAULT_CACHE) -> None:
    if cache is not None:
        cache.clear()
