"""The dataset doctor: the engine's ``DatasetPlan`` turned into what the tab shows (HTML) or prints (markdown),
plus a documented VRAM estimate for the chosen settings.

The counts are never recomputed here: they come from ``build_plan`` (sd-scripts' rules), so what the doctor says
is what the trainer does.

VRAM estimate (an estimate, not a measurement; a real run can differ by a GB or two with the attention backend,
the driver and other programs on the GPU)::

    total  = overhead + weights + lora_state + activations
    overhead    = 0.8 GB                                  CUDA context and allocator slack
    weights     = model parameters x bytes per weight     2 for fp16/bf16 (the WebUI's default), 4 for fp32
                  SD1 1.067 G (UNet 0.860, TE 0.123, VAE 0.084); SD2 1.304 G (0.866, 0.354, 0.084);
                  SDXL 3.469 G (2.567, 0.123 + 0.695, 0.084)
    lora_state  = LoRA parameters x (4 weight + 4 gradient + optimizer state) bytes
                  LoRA parameters = dim x (UNet per-dim + TE per-dim if the text encoder trains);
                  per dim (kohya's default targets, counted from the real layer shapes):
                  SD1 UNet 423,936 + TE 165,888; SD2 UNet 432,128 + TE 423,936; SDXL UNet 2,659,840 + TE 903,168
                  optimizer bytes per parameter: AdamW 8, AdamW8bit 2, Lion 4, Lion8bit 1, Prodigy 16,
                  Adafactor 4, SGDNesterov 4
    activations = per-megapixel cost x batch x megapixels of the largest bucket
                  x 2 when training in fp32 (mixed precision 'no')
                  x 0.35 with gradient checkpointing
                  + 15% when the text encoder trains
                  per-megapixel cost at fp16 with an SDP/xformers attention: SD1 16 GB, SD2 14 GB, SDXL 9 GB
                  (calibrated so SD1.5 512 px batch 1 ~ 7 GB, batch 4 fits 24 GB, and SDXL 1024 px batch 1 with
                  checkpointing ~ 11 GB, as users report)
"""
from __future__ import annotations

import html
import math
import re
from dataclasses import dataclass, field

from ..train import dataset as _dataset
from ..train.config import TrainConfig, parse_train_config
from ..train.dataset import DatasetPlan, build_plan
from ..train.saving import LORA_PARAMS_PER_DIM

GB = 1024 ** 3

WEIGHT_PARAMS = {  # parameters of the whole checkpoint: UNet, text encoder(s), VAE
    "sd1": {"unet": 859.5e6, "te": 123.1e6, "vae": 83.7e6},
    "sd2": {"unet": 865.9e6, "te": 354.0e6, "vae": 83.7e6},
    "sdxl": {"unet": 2567.5e6, "te": 817.6e6, "vae": 83.7e6},
}
LORA_PER_DIM = LORA_PARAMS_PER_DIM
OPTIMIZER_BYTES = {"adamw": 8, "adamw8bit": 2, "lion": 4, "lion8bit": 1, "prodigy": 16, "adafactor": 4,
                   "sgdnesterov": 4}
ACT_GB_PER_MP = {"sd1": 16.0, "sd2": 14.0, "sdxl": 9.0}
OVERHEAD_GB = 0.8
CHECKPOINTING_FACTOR = 0.35
TE_ACT_FACTOR = 1.15
FAMILY_LABEL = {"sd1": "SD1", "sd2": "SD2", "sdxl": "SDXL"}


@dataclass
class VramEstimate:
    family: str
    total_gb: float
    parts: dict[str, float]        # name -> GB
    explanation: str               # the formula with this run's numbers
    advice: list[str] = field(default_factory=list)


def cpu_vram_note(family: str | None) -> str:
    """Said beside the estimate when the loaded model is on the CPU (the numbers are a GPU's, for the full-size
    model of the family)."""
    return ("The model is on the CPU here: this is what a GPU would need for a full-size "
            f"{(family or '').upper() or 'SD'} model; on the CPU it is system memory.")


def trains_full(network_module: str | None, network_args: list[str] | None) -> bool:
    """LyCORIS algo=full (native fine-tuning): memory as a fine-tune, not a LoRA."""
    return network_module == "lycoris.kohya" and any(
        a.replace(" ", "").lower() == "algo=full" for a in network_args or [])


def estimate_vram(family: str | None, *, batch: int, width: int, height: int, mixed_precision: str = "fp16",
                  weight_bytes: int | None = None, gradient_checkpointing: bool = False, dim: int = 32,
                  train_unet: bool = True, train_te: bool = True, optimizer: str = "AdamW",
                  fp8: tuple[str, ...] = (), full: bool = False) -> VramEstimate:
    """The formula in the module docstring. ``weight_bytes`` is the loaded model's bytes per weight (2 for the
    WebUI's fp16); by default 4 when ``mixed_precision`` is 'no', else 2. ``fp8``: the parts ("unet", "te")
    whose weights are stored in FP8 (fp8_base, or the WebUI's FP8 weight): 1 byte each (nearly all of their
    weights are Linear/Conv ones). ``full``: LyCORIS algo=full, a trained difference as large as each trained
    part (its whole-model presets; fewer layers train with the others)."""
    fam = family if family in WEIGHT_PARAMS else "sd1"
    mp = (mixed_precision or "no").lower()
    wb = weight_bytes or (4 if mp == "no" else 2)
    if wb == 1:  # (a model loaded in FP8: its VAE is not)
        fp8, wb = fp8 or ("unet", "te"), 2
    weights = sum(n * (1 if part in fp8 else wb) for part, n in WEIGHT_PARAMS[fam].items()) / GB
    unet_pd, te_pd = LORA_PER_DIM[fam]
    if full:
        p = WEIGHT_PARAMS[fam]
        lora_params = (p["unet"] if train_unet else 0) + (p["te"] if train_te else 0)
    else:
        lora_params = dim * ((unet_pd if train_unet else 0) + (te_pd if train_te else 0))
    okey = (optimizer or "AdamW").lower().replace("_", "").replace("-", "")
    obytes = OPTIMIZER_BYTES.get(okey, 8)
    lora_state = lora_params * (8 + obytes) / GB
    mp_px = width * height / 1e6
    act = ACT_GB_PER_MP[fam] * batch * mp_px
    steps = [f"{ACT_GB_PER_MP[fam]:g} GB/MP x batch {batch} x {mp_px:.3f} MP"]
    if mp == "no":
        act *= 2
        steps.append("x 2 (fp32)")
    if gradient_checkpointing:
        act *= CHECKPOINTING_FACTOR
        steps.append(f"x {CHECKPOINTING_FACTOR} (gradient checkpointing)")
    if train_te:
        act *= TE_ACT_FACTOR
        steps.append(f"x {TE_ACT_FACTOR} (text encoder trains)")
    parts = {"overhead": OVERHEAD_GB, "model weights": weights, "LoRA + optimizer": lora_state, "activations": act}
    total = sum(parts.values())
    explanation = (
        f"{OVERHEAD_GB:g} GB overhead + {weights:.1f} GB {FAMILY_LABEL[fam]} weights ({wb} bytes each"
        f"{', FP8 ' + ' and '.join({'unet': 'UNet', 'te': 'text encoder'}[p] for p in fp8) + ' 1' if fp8 else ''}) + "
        f"{lora_state:.2f} GB {'full fine-tune' if full else 'LoRA'} and optimizer ({lora_params / 1e6:.1f} M "
        f"parameters x {8 + obytes} bytes) + "
        f"{act:.1f} GB activations ({' '.join(steps)}) = about {total:.1f} GB")
    advice = []
    if total > 8 and not gradient_checkpointing:
        with_gc = estimate_vram(family, batch=batch, width=width, height=height, mixed_precision=mixed_precision,
                                weight_bytes=weight_bytes, gradient_checkpointing=True, dim=dim,
                                train_unet=train_unet, train_te=train_te, optimizer=optimizer, fp8=fp8, full=full)
        advice.append(f"Gradient checkpointing would bring it to about {with_gc.total_gb:.1f} GB.")
    if batch > 1 and total > 12:
        advice.append("A smaller batch with gradient accumulation trains alike with less memory.")
    return VramEstimate(fam, round(total, 2), {k: round(v, 3) for k, v in parts.items()}, explanation, advice)


# ---------------------------------------------------------------------------------------------------------------
# the report


@dataclass
class FolderRow:
    name: str
    path: str
    role: str                       # 'train' | 'reg'
    images: int
    repeats: int
    instance_token: str | None
    class_token: str
    captioned: int                  # images with a caption file
    missing_trigger: list[str]
    upscaled: list[str]
    unreadable: list[str]
    samples: int                    # images x repeats
    samples_used: int               # per epoch, after reg balancing


@dataclass
class DoctorReport:
    ok: bool
    family: str | None
    folders: list[FolderRow]
    train_images: int
    reg_images: int
    train_samples: int              # per epoch
    reg_samples: int                # reg images x repeats before balancing
    reg_samples_used: int           # per epoch after balancing
    batch_size: int
    batches_per_epoch: int
    batches_without_reg: int | None
    steps_per_epoch: int | None
    total_steps: int | None
    epochs: int | None
    total_steps_without_reg: int | None
    step_explanation: str
    reg_explanation: str | None
    buckets: dict[tuple[int, int], int]
    errors: list[str]
    warnings: list[str]
    notes: list[str]
    finding_codes: list[str]
    vram: VramEstimate | None
    plan_text: str

    @property
    def unreadable(self) -> int:
        return sum(len(f.unreadable) for f in self.folders)

    @property
    def upscaled(self) -> int:
        return sum(len(f.upscaled) for f in self.folders)


def settings_findings(cfg: TrainConfig, device_type: str | None,
                      family: str | None = None) -> tuple[list[str], list[str]]:
    """Problems with the chosen settings the dataset plan does not cover: (errors, warnings)."""
    errors, warnings = [], []
    if device_type == "cpu" and (cfg.mixed_precision or "no") != "no" and not (cfg.fp8_base or cfg.fp8_base_unet):
        warnings.append(f"Mixed precision {cfg.mixed_precision} needs a GPU; the model is on the CPU, so it will "
                        "train in fp32 (slowly).")
    unet_lr = cfg.unet_lr if cfg.unet_lr is not None else cfg.learning_rate
    te_lr = cfg.text_encoder_lr if cfg.text_encoder_lr is not None else cfg.learning_rate
    if cfg.network_train_unet_only:
        te_lr = 0
    if not unet_lr and not te_lr:
        errors.append("Both learning rates are 0, so nothing would train. Set the UNet learning rate (1e-4 is a "
                      "common start).")
    if not cfg.output_dir:
        errors.append("No output folder is set. Choose where the LoRA files are written.")
    if family == "sdxl" and cfg.resolution and max(cfg.resolution) < 768:
        w, h = cfg.resolution
        warnings.append(f"SDXL models make their pictures at about 1024x1024; a LoRA trained at {w}x{h} learns "
                        "the subject at a size SDXL rarely draws and looks worse at 1024. Use 1024 (the 'SDXL "
                        "character' preset) unless you mean to.")
    from ..train.support import check_support  # the same check the trainer runs
    unsupported_errors, unsupported_notes = check_support(cfg, family)
    errors += unsupported_errors
    warnings += unsupported_notes
    return errors, warnings


def fp8_parts_of(cfg, weight_bytes: int | None) -> tuple[str, ...]:
    """The parts a run stores in FP8: a model loaded in FP8 (1 byte per weight), else fp8_base(_unet)."""
    if weight_bytes == 1 or cfg.fp8_base:
        return ("unet", "te")
    return ("unet",) if cfg.fp8_base_unet else ()


def diagnose(plan: DatasetPlan, family: str | None, *, weight_bytes: int | None = None,
             device_type: str | None = None) -> DoctorReport:
    cfg = plan.config
    rows = []
    for s in plan.subsets:
        rows.append(FolderRow(
            name=s.name, path=str(s.path), role="reg" if s.is_reg else "train", images=s.n_images,
            repeats=s.repeats, instance_token=s.instance_token, class_token=s.class_token, captioned=s.n_captioned,
            missing_trigger=list(s.missing_trigger), upscaled=list(s.upscaled),
            unreadable=[n for n, _ in s.unreadable], samples=s.samples, samples_used=s.samples_used))
    st = plan.steps
    st0 = plan.steps_without_reg
    errors = [f.message for f in plan.findings if f.level == "error"]
    warnings = [f.message for f in plan.findings if f.level == "warning"]
    notes = [f.message for f in plan.findings if f.level == "info"]
    s_err, s_warn = settings_findings(cfg, device_type, family)
    errors += s_err
    warnings += s_warn
    buckets = plan.bucket_histogram
    vram = None
    if cfg.resolution:
        # the largest bucket decides the peak; without buckets every image is the resolution
        w, h = max(buckets, key=lambda b: b[0] * b[1]) if buckets else cfg.resolution
        unet_lr = cfg.unet_lr if cfg.unet_lr is not None else cfg.learning_rate
        te_lr = 0 if cfg.network_train_unet_only else (cfg.text_encoder_lr if cfg.text_encoder_lr is not None
                                                       else cfg.learning_rate)
        vram = estimate_vram(family, batch=cfg.train_batch_size, width=w, height=h,
                             mixed_precision=cfg.mixed_precision, weight_bytes=weight_bytes,
                             gradient_checkpointing=cfg.gradient_checkpointing, dim=int(cfg.network_dim or 4),
                             train_unet=bool(unet_lr), train_te=bool(te_lr) and not cfg.network_train_unet_only,
                             optimizer=cfg.optimizer_type or "AdamW", fp8=fp8_parts_of(cfg, weight_bytes),
                             full=trains_full(cfg.network_module, cfg.network_args))
    if vram is not None and str(device_type or "").startswith("cpu"):
        vram.advice.append(cpu_vram_note(family))
    words = getattr(_dataset, "_reg_words", None)  # the engine's own wording of the reg arithmetic
    reg_words = (" ".join(w for w in (words(p) for p in plan.datasets) if w) or None) if words else None
    return DoctorReport(
        ok=not errors and st is not None,
        family=family, folders=rows,
        train_images=sum(r.images for r in rows if r.role == "train"),
        reg_images=sum(r.images for r in rows if r.role == "reg"),
        train_samples=plan.num_train_images, reg_samples=plan.num_reg_images,
        reg_samples_used=sum(d.reg_samples_used for d in plan.datasets),
        batch_size=cfg.train_batch_size,
        batches_per_epoch=plan.batches_per_epoch,
        batches_without_reg=sum(d.batches_without_reg for d in plan.datasets) if plan.num_reg_images else None,
        steps_per_epoch=st.updates_per_epoch if st else None,
        total_steps=st.max_train_steps if st else None,
        epochs=st.num_epochs if st else None,
        total_steps_without_reg=st0.max_train_steps if st0 else None,
        step_explanation=st.explanation if st else "",
        reg_explanation=reg_words,
        buckets=buckets, errors=errors, warnings=warnings, notes=notes,
        finding_codes=[f.code for f in plan.findings], vram=vram, plan_text=plan.report())


def check(cfg_dict: dict, family: str | None, *, weight_bytes: int | None = None, device_type: str | None = None,
          check_pixels: bool = True) -> DoctorReport:
    """Config dict (sd-scripts keys) -> report. Raises TrainConfigError for settings that cannot be read."""
    cfg = parse_train_config(dict(cfg_dict), source="the settings")
    return diagnose(build_plan(cfg, family=family, check_pixels=check_pixels), family, weight_bytes=weight_bytes,
                    device_type=device_type)


# ---------------------------------------------------------------------------------------------------------------
# rendering

def _e(s) -> str:
    return html.escape(str(s), quote=True)


def _names(items: list[str], n: int = 4) -> str:
    shown = ", ".join(items[:n])
    return shown + (f" and {len(items) - n} more" if len(items) > n else "")


def _folder_cells(r: FolderRow) -> list[str]:
    tokens = (f"trigger <b>{_e(r.instance_token)}</b>" if r.instance_token else "") + \
             (f" class <b>{_e(r.class_token)}</b>" if r.class_token else "")
    caps = f"{r.captioned}/{r.images}"
    trig = "-" if r.role == "reg" or not r.instance_token else (
        "all" if not r.missing_trigger else f"missing in {len(r.missing_trigger)}: {_e(_names(r.missing_trigger))}")
    return [_e(r.name), "regularisation" if r.role == "reg" else "training", str(r.images), str(r.repeats),
            tokens or "-", caps, trig,
            _e(_names(r.upscaled)) if r.upscaled else "0",
            _e(_names(r.unreadable)) if r.unreadable else "0",
            f"{r.samples}" + (f" ({r.samples_used} used)" if r.role == "reg" else "")]


_HEAD = ["Folder", "Role", "Images", "Repeats", "Tokens", "Captions", "Trigger in captions", "Enlarged",
         "Unreadable", "Samples"]


_TAB_LABELS = {"train_data_dir": "Training folder", "reg_data_dir": "Regularisation folder"}


def tab_words(msg: str) -> str:
    """The dataset checks speak sd-scripts' config keys (the command line reads them); the tab's boxes are named
    otherwise: ``give train_data_dir = 'x'`` reads "Set the Training folder to 'x'", and the folder rule is
    spelt out once."""
    keys = r"(train_data_dir|reg_data_dir)"
    msg = re.sub(r"\b([Gg])ive " + keys + " = '", lambda m: ("S" if m.group(1) == "G" else "s") + "et the "
                 + _TAB_LABELS[m.group(2)] + " to '", msg)
    msg = re.sub(r"\b" + keys + " = '", lambda m: "the " + _TAB_LABELS[m.group(1)] + " '", msg)
    msg = re.sub(r"(^|\b(?:no|the) )?(?<!')\b" + keys + r"\b",
                 lambda m: (m.group(1) or ("The " if m.start() == 0 else "the ")) + _TAB_LABELS[m.group(2)], msg)
    return msg.replace("`N_name`", "`N_name` (repeats, underscore, words: e.g. `10_svs cat`)", 1)


def to_html(rep: DoctorReport) -> str:
    out = ['<div class="lora-studio-doctor">']
    if rep.ok:
        out.append('<p class="ls-ok">The dataset can be trained.</p>')
    else:
        out.append('<p class="ls-bad">The dataset cannot be trained as it is; see the problems below.</p>')
    if rep.total_steps is not None:
        cards = [("training images", rep.train_images), ("regularisation images", rep.reg_images),
                 ("steps per epoch", rep.steps_per_epoch), ("epochs", rep.epochs), ("total steps", rep.total_steps)]
        out.append('<div class="ls-cards">' + "".join(
            f'<div class="ls-card"><span class="ls-num">{v}</span><span class="ls-lbl">{_e(k)}</span></div>'
            for k, v in cards) + "</div>")
    for title, items, cls in (("Problems", rep.errors, "ls-errors"), ("Warnings", rep.warnings, "ls-warnings")):
        if items:
            out.append(f'<div class="{cls}"><b>{title}</b><ul>' + "".join(f"<li>{_e(tab_words(m))}</li>" for m in items)
                       + "</ul></div>")
    if rep.folders:
        out.append('<table class="ls-table"><caption>Folders</caption><thead><tr>'
                   + "".join(f'<th scope="col">{h}</th>' for h in _HEAD) + "</tr></thead><tbody>")
        for r in rep.folders:
            out.append("<tr>" + "".join(f"<td>{c}</td>" for c in _folder_cells(r)) + "</tr>")
        out.append("</tbody></table>")
    if rep.total_steps is not None:
        out.append(f"<p><b>Steps.</b> {_e(rep.train_samples)} training samples per epoch"
                   + (f" + {_e(rep.reg_samples_used)} regularisation samples" if rep.reg_samples_used else "")
                   + f", batch size {rep.batch_size}: {rep.batches_per_epoch} batches per epoch. "
                   + _e(rep.step_explanation) + ".</p>")
        if rep.reg_explanation:
            out.append(f"<p><b>Regularisation doubles the steps.</b> {_e(rep.reg_explanation)} "
                       + (f"Without the regularisation images the run would be {rep.total_steps_without_reg} steps "
                          f"instead of {rep.total_steps}." if rep.total_steps_without_reg is not None else "")
                       + "</p>")
    if rep.buckets:
        top = max(rep.buckets.values())
        out.append('<table class="ls-table ls-buckets"><caption>Buckets (samples per epoch, with repeats)</caption>'
                   '<thead><tr><th scope="col">Size</th><th scope="col">Samples</th><th scope="col">Batches</th>'
                   '<th scope="col"><span class="ls-sr">Share</span></th></tr></thead><tbody>')
        for (w, h), n in rep.buckets.items():
            pct = 100.0 * n / top
            out.append(f"<tr><td>{w}x{h}</td><td>{n}</td><td>{math.ceil(n / max(1, rep.batch_size))}</td>"
                       f'<td class="ls-barcell"><span class="ls-bar" style="width:{pct:.0f}%"></span></td></tr>')
        out.append("</tbody></table>")
    if rep.vram:
        v = rep.vram
        out.append(f'<p class="ls-vram"><b>Estimated VRAM: about {v.total_gb:.1f} GB</b> (an estimate, not a '
                   f"measurement). {_e(v.explanation)}. " + " ".join(_e(a) for a in v.advice) + "</p>")
    if rep.notes:
        out.append('<details class="ls-notes"><summary>Notes (' + str(len(rep.notes)) + ")</summary><ul>"
                   + "".join(f"<li>{_e(tab_words(m))}</li>" for m in rep.notes) + "</ul></details>")
    out.append("</div>")
    return "".join(out)


def to_markdown(rep: DoctorReport) -> str:
    lines = ["**The dataset can be trained.**" if rep.ok else "**The dataset cannot be trained as it is.**", ""]
    for title, items in (("Problems", rep.errors), ("Warnings", rep.warnings)):
        if items:
            lines += [f"### {title}"] + [f"- {m}" for m in items] + [""]
    if rep.folders:
        lines.append("| " + " | ".join(_HEAD) + " |")
        lines.append("|" + "---|" * len(_HEAD))
        for r in rep.folders:
            cells = [html.unescape(c.replace("<b>", "").replace("</b>", "")) for c in _folder_cells(r)]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    if rep.total_steps is not None:
        lines.append(f"Steps: {rep.batches_per_epoch} batches per epoch at batch size {rep.batch_size}; "
                     f"{rep.step_explanation}.")
        if rep.reg_explanation:
            lines.append(f"Regularisation: {rep.reg_explanation}")
    if rep.buckets:
        lines.append("Buckets: " + ", ".join(f"{w}x{h}: {n}" for (w, h), n in rep.buckets.items()))
    if rep.vram:
        lines.append(f"Estimated VRAM: about {rep.vram.total_gb:.1f} GB ({rep.vram.explanation})."
                     + "".join(f" {a}" for a in rep.vram.advice))
    if rep.notes:
        lines += ["", "Notes:"] + [f"- {m}" for m in rep.notes]
    return "\n".join(lines)


__all__ = ["DoctorReport", "FolderRow", "VramEstimate", "check", "diagnose", "estimate_vram", "settings_findings",
           "to_html", "to_markdown"]
