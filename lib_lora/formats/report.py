"""How well a LoRA's keys matched the loaded model (lora-formats.md §6.1: never a silent no-op)."""
import os
from dataclasses import dataclass, field

from .keymap import FOREIGN_PREFIXES, PREFIXES, Target, component_of, group_modules, label, \
    map_module_key_with_reason

# Prefix component code -> the Target component it lands on (for counting unmatched keys per component).
_COMPONENT_OF_CODE = {"unet": "unet", "te": "te1", "te1": "te1", "te2": "te2", "te_h": "te1"}
COMPONENT_ORDER = ("unet", "te1", "te2")


@dataclass
class MatchReport:
    file: str
    family: str | None                  # the LoRA's family (detect_family), None if unknown
    model_family: str | None            # the loaded model's family
    total_modules: int = 0
    matched: list = field(default_factory=list)         # module keys that found a layer
    unmatched: dict = field(default_factory=dict)       # module key -> reason
    by_component: dict = field(default_factory=dict)    # matched count per 'unet'|'te1'|'te2'
    family_evidence: str = ""
    refused: str | None = None          # unsupported family name (SD3, Flux, ...) when refused
    notes: list = field(default_factory=list)
    targets: dict = field(default_factory=dict)         # module key -> Target, for matched keys
    totals_by_component: dict = field(default_factory=dict)  # all module keys per component ('other' = unknown)

    @classmethod
    def build(cls, file, module_keys, model_family, family_info=None, available=None):
        """Map every module key for `model_family`; with `available` (names of the model's layers, a set or the
        layer mapping), a mapped name that the model lacks is unmatched too."""
        rep = cls(file=os.fspath(file), family=getattr(family_info, "family", None), model_family=model_family,
                  family_evidence=getattr(family_info, "evidence", "") or "",
                  refused=getattr(family_info, "refused", None))
        for mk in module_keys:
            rep.total_modules += 1
            comp = _COMPONENT_OF_CODE.get(component_of(mk), "other")
            rep.totals_by_component[comp] = rep.totals_by_component.get(comp, 0) + 1
            target, reason = map_module_key_with_reason(mk, model_family)
            if target is not None and available is not None and target.name not in available:
                target, reason = None, f"the loaded model has no layer '{target.name}'"
            if target is None:
                rep.unmatched[mk] = reason
            else:
                rep.add_match(mk, target)
        return rep

    def add_match(self, module_key, target: Target):
        self.matched.append(module_key)
        self.targets[module_key] = target
        self.by_component[target.component] = self.by_component.get(target.component, 0) + 1

    @property
    def name(self):
        return os.path.splitext(os.path.basename(self.file))[0]

    @property
    def family_mismatch(self):
        """'this LoRA is for SDXL, the loaded model is SD1.5', or None when they agree or one is unknown."""
        if self.family and self.model_family and self.family != self.model_family:
            return f"this LoRA is for {label(self.family)}, the loaded model is {label(self.model_family)}"
        return None

    @property
    def ok(self):
        return not self.unmatched and not self.family_mismatch and not self.refused

    def _component_text(self):
        counts = {c: self.by_component.get(c, 0) for c in COMPONENT_ORDER if self.by_component.get(c)}
        if set(counts) == {"unet", "te1"} or set(counts) == {"te1"}:
            if self.model_family != "sdxl":
                counts["te"] = counts.pop("te1")
        return ", ".join(f"{c} {n}" for c, n in counts.items())

    def summary(self):
        """One line, e.g. "lora 'x': 264/264 modules matched (unet 192, te 72)"."""
        if self.refused:
            return f"lora '{self.name}': not loaded, it is a {self.refused} LoRA; SD1.x, SD2.x and SDXL only"
        line = f"lora '{self.name}': {len(self.matched)}/{self.total_modules} modules matched"
        comp = self._component_text()
        if comp:
            line += f" ({comp})"
        if self.family_mismatch:
            line += f" - {self.family_mismatch}"
        elif self.unmatched:
            line += f", {len(self.unmatched)} not matched"
        return line

    def warning(self):
        """A message worth showing the user, or None when everything matched."""
        if self.ok:
            return None
        if self.refused:
            return self.summary()
        if self.total_modules and not self.matched:
            return f"{self.summary()}: the LoRA has no effect"
        return self.summary()

    def details(self, limit=20):
        """Multi-line: summary, family evidence, per-component counts, the first `limit` unmatched keys + count."""
        lines = [self.summary()]
        if self.family or self.family_evidence:
            lines.append(f"  family: {label(self.family) if self.family else 'unknown'}"
                         f" (loaded model: {label(self.model_family) if self.model_family else 'unknown'})"
                         + (f"; evidence: {self.family_evidence}" if self.family_evidence else ""))
        for comp in COMPONENT_ORDER + ("other",):
            total = self.totals_by_component.get(comp)
            if total:
                lines.append(f"  {comp}: {self.by_component.get(comp, 0)}/{total} matched")
        lines.extend(f"  note: {n}" for n in self.notes)
        if self.unmatched:
            lines.append(f"  not matched ({len(self.unmatched)}):")
            items = list(self.unmatched.items())
            for mk, reason in items[:limit]:
                lines.append(f"    {mk}: {reason}")
            if len(items) > limit:
                lines.append(f"    ... and {len(items) - limit} more")
        return "\n".join(lines)


_CHECKPOINT_ROOTS = ("first_stage_model.", "cond_stage_model.", "conditioner.embedders.", "model_ema.")
_EMBEDDING_ROOTS = {"emb_params", "string_to_param", "string_to_token", "clip_l", "clip_g", "name", "step",
                    "sd_checkpoint", "sd_checkpoint_name"}


def not_a_lora(keys, metadata=None) -> str | None:
    """What a file of the LoRA folder is when it is no network at all, and where it belongs; None otherwise.
    `keys`: the header's tensor names, or {name: shape} (shapes let plain UNet/text-encoder weights be told from
    IA3's 1-D vectors). One classifier for the WebUI, its cards and the command line. (A ComfyUI
    ``model.diffusion_model.*.diff`` file is a network.)"""
    shapes = keys if isinstance(keys, dict) else None
    keys = [k for k in keys if k != "__metadata__"]
    if not keys:
        return "it holds no tensors"
    if any(k.startswith(_CHECKPOINT_ROOTS) for k in keys) or "alphas_cumprod" in keys:
        return ("it is a full Stable Diffusion checkpoint, not a LoRA: move it to models/Stable-diffusion and choose "
                "it in the checkpoint list")
    if any(k.startswith(("encoder.down.", "decoder.up.", "encoder.down_blocks.", "decoder.up_blocks."))
           for k in keys) and any(k.startswith(("quant_conv.", "post_quant_conv.")) for k in keys):
        return "it is a VAE, not a LoRA: move it to models/VAE and choose it in the VAE setting"
    if {k.split(".", 1)[0] for k in keys} <= _EMBEDDING_ROOTS:
        return ("it is a textual-inversion embedding, not a LoRA: move it to the embeddings folder and write its "
                "name in the prompt")
    groups = group_modules(keys)
    if shapes is not None:
        # a layer's own weight matrix/kernel with no network tensor beside it (IA3's 'weight' is a 1-D vector)
        plain = [mk for mk, sfx in groups.items()
                 if set(sfx) <= {"weight", "bias"} and len(shapes.get(sfx.get("weight"), ())) >= 2]
        if len(plain) >= max(2, len(groups) // 2):
            return (f"it holds plain model weights ({len(plain)} layers such as {plain[0]}), not a LoRA: a UNet or "
                    "text-encoder file. A1111 loads only full checkpoints, from models/Stable-diffusion")
    known = tuple(p for p, *_ in PREFIXES) + tuple(p for p, _ in FOREIGN_PREFIXES)
    if not any(mk.startswith(known) for mk in groups):
        from .family import detect_family
        if detect_family(shapes or {k: () for k in keys}, metadata or {}).refused:
            return None  # a LoRA of another model: the family refusal names it
        names = (f"its only tensor name ({keys[0]}) is not" if len(keys) == 1 else
                 f"none of its {len(keys)} tensor names (e.g. {', '.join(sorted(keys)[:3])}) is")
        return (f"{names} a LoRA layer of SD1.x/SD2.x/SDXL: it is not a LoRA, or one for a model this extension "
                "cannot apply")
    return None
