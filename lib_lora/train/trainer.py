"""The training loop: our own step on the host's loaded model (no sd-scripts, diffusers, peft or accelerate).

Data flows one way: config + dataset plan -> latent / text caches -> steps with the LoRA attached to the host's
modules -> kohya-format files. Every randomness of a step (caption processing, noise, timesteps, LoRA dropout) is
seeded from (seed, step), and the data order from (seed, epoch), so a resumed run makes the same steps as an
uninterrupted one. The host comes back exactly as it was on every exit path (``host_guard``).

The step itself (forward, backward, optimizer; no host sync inside) is ``fastpath.StepRunner``; the loop feeds it
device tensors and reads the loss back every ``log_every`` steps. Its fast paths are on unless ``fast_path = false``
(config), ``LORA_STUDIO_FAST_PATH=0`` (environment) or ``Trainer(fast=False)``; see fastpath.py.
"""

from __future__ import annotations

import ast
import copy
import errno
import hashlib
import inspect
import json
import math
import os
import random
import time
import traceback
from contextlib import ExitStack, contextmanager, nullcontext, suppress
from dataclasses import dataclass, field

import numpy as np
import torch

from ..formats.errors import LoraError, LoraFileError
from ..formats.safetensors_io import (ABSURD_VALUE, leftover_temps, load_tensors, read_metadata, remove_files,
                                      save_file_atomic, write_error_reason)
from .attention import sdpa_attention
from .captions import process_caption
from .conditioning import TextEncoder
from .host_guard import guarded
from .images import (ImageReadError, color_aug, face_crop, face_from_name, load_image_alpha, load_image_rgb,
                     resize_and_crop, resize_tag, sdxl_size_conditioning)
from .fp8 import compute_dtype, fp8_parts, fp8_storage, text_encoder_root
from .fastpath import (FastPath, FlatParams, InputCache, InStepCond, StepBatch, StepRunner,
                       cached_timestep_embedding, elementwise_optimizer, fused_adamw_supported, load_optimizer_state,
                       sync_free_clip_mask, to_device_async, unused_text_encoder_params)
from .lora_net import LoRANetwork, NetworkShapeError
from .lyco_preset import PresetError
from .sd_latents import load_latent
from .support import (CPU_FP16_NOTE, base_dims, block_settings, kohya_oft_switches, lyco_settings, network_args,
                      part_lrs, resume_data_notes, wrong_family_message)
from .loss import LossOptions, NoiseSchedule, zero_terminal_snr
from .optim import (OptimizerGroupsError, OptimizerNameError, effective_optimizer, is_schedule_free, make_optimizer,
                    make_scheduler, make_torch_scheduler, shown_lr)
from .saving import (BASE_MODEL_VERSION, MINIMUM_METADATA_KEYS, SAVE_DTYPES, STATE_EXT, CsvLog, RunLock,
                     RunLockedError, StateFileError, ckpt_name, ensure_output_dir, load_state, metadata_strings,
                     modelspec, prune_old, prune_old_steps, rng_state, run_files, run_space_problems, save_lora,
                     save_state, set_rng_state, step_ckpt_name)


class TrainingError(RuntimeError):
    """A problem the user can fix; the message says what happened and what to do."""

    user_error = True  # the queue shows the message without a traceback


_PART_NAMES = {"unet": "UNet", "te": "text encoder", "te1": "text encoder 1", "te2": "text encoder 2"}


class Cancelled(Exception):
    pass


_REMEDIES = {errno.ENOSPC: "free some space", getattr(errno, "EDQUOT", errno.ENOSPC): "free some space",
             errno.ENOENT: "make the folder available again"}


class SaveWriteError(TrainingError):
    """A file of the run could not be written (full disk, folder gone or read-only); ``why`` says which in words,
    ``remedy`` what the user does about it (from the OS error's code)."""

    def __init__(self, message: str, why: str, code: int | None = None):
        super().__init__(message)
        self.why = why
        self.remedy = _REMEDIES.get(code, "make the folder writable again")


def _write_cause(e: BaseException) -> OSError | None:
    """The OS error behind a failed save when the disk or folder is to blame (not the data), else None."""
    cause = e if isinstance(e, OSError) else e.__cause__
    return cause if isinstance(cause, OSError) else None


def _write_failure(e: BaseException) -> str | None:
    """Why a save failed, in words, when the disk or folder is to blame, else None."""
    cause = _write_cause(e)
    return None if cause is None else write_error_reason(cause)


def _mask_path(entry) -> str | None:
    return str(entry.mask_path) if entry.mask_path is not None else None


@dataclass
class Sample:
    """One distinct image of the dataset plan with what a step needs to know about it."""
    path: str
    caption: str
    bucket: tuple[int, int]          # (w, h)
    resized: tuple[int, int]         # size the image is scaled to before the crop
    is_reg: bool = False
    caption_options: object = None   # captions.CaptionOptions
    flip_aug: bool = False
    alpha_mask: bool = False         # the image's alpha channel weights its loss (sd-scripts alpha_mask)
    random_crop: bool = False        # cropped anew every step (so encoded every step, never cached)
    color_aug: bool = False          # colours jittered every step (likewise)
    mask_path: str | None = None     # masked_loss: a mask image whose R channel weights the loss
    face: tuple | None = None        # face_crop_aug_range: (cx, cy, w, h) from the file name
    face_range: tuple | None = None  # (its range; only in datasets without buckets, as in sd-scripts)
    latent: object = None            # sd_latents.LatentFile: sd-scripts' cached latent stands in for the image

    @property
    def masked(self) -> bool:
        return self.alpha_mask or self.mask_path is not None

    @property
    def per_step(self) -> bool:
        """Augmented anew every step, so encoded every step instead of cached (sd-scripts refuses to cache them)."""
        return self.random_crop or self.color_aug or self.face_cropped_per_step

    @property
    def face_cropped_per_step(self) -> bool:
        """A face crop draws its scale and position every step unless the range is one value (no random_crop)."""
        return self.face is not None and (self.random_crop or self.face_range[0] != self.face_range[1])


@dataclass
class TrainEvent:
    kind: str  # start | cache | step | validation | epoch | save | state | sample | note | done | cancelled | error
    step: int = 0
    total: int = 0
    epoch: int = 0
    epochs: int = 0
    loss: float | None = None
    avg_loss: float | None = None
    lr: float | None = None
    eta_s: float | None = None
    message: str = ""
    path: str | None = None
    extra: dict = field(default_factory=dict)


@dataclass
class TrainResult:
    status: str               # done | cancelled
    files: list[str]
    final: str | None
    steps: int
    losses: list[tuple[int, float]]
    notes: list[str]
    state_file: str | None = None
    val_losses: list[tuple[int, float]] = field(default_factory=list)  # (step, validation loss)


def _latent_mask(alpha: np.ndarray, flip: bool, full: float = 255.0) -> torch.Tensor:
    """An alpha channel at pixel size (uint8, cropped like the image; or 0..1 with ``full`` 1) -> [1, h/8, w/8]
    loss weights, averaged over each latent pixel's 8x8 block (sd-scripts: F.interpolate(mode="area") to the loss
    size)."""
    a = alpha[:, ::-1].copy() if flip else alpha
    t = torch.from_numpy(a.astype(np.float32) / full)[None, None]
    return torch.nn.functional.interpolate(t, size=(t.shape[2] // 8, t.shape[3] // 8), mode="area")[0]


def _face(entry, sub, ds) -> tuple:
    """(face box, range) for a face-cropped image, else (None, None)."""
    rng = getattr(sub, "face_crop_aug_range", None)
    if rng is None or getattr(ds, "enable_bucket", True):
        return None, None
    face = face_from_name(entry.path)
    return (face, tuple(rng)) if face is not None else (None, None)


def _alpha(sub, lat) -> bool:
    return bool(getattr(sub, "alpha_mask", False)) and (lat is None or lat.alpha)


def _written_by(path: str, started, step: int) -> bool:
    """Whether the LoRA at ``path`` is the one the run that began at ``started`` saved at ``step`` (a later run of
    the same name may have replaced it since)."""
    try:
        md = read_metadata(path) or {}
        return (float(md.get("ss_training_started_at")) == float(started)
                and int(md.get("ss_steps")) == int(step))
    except (OSError, TypeError, ValueError, LoraError):
        return False


def _seed_for(*parts) -> int:
    h = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


class PlanData:
    """The dataset plan seen as the loop needs it: distinct images (cached once) and each epoch's batches of
    indices into them, in the order sd-scripts' bucket shuffles give (``DatasetPart.epoch_batches``)."""

    def __init__(self, plan):
        self.plan = plan
        self.samples: list[Sample] = []
        self._index: dict[int, int] = {}
        for part in plan.datasets:
            for e in part.used_entries():
                sub = part.subsets[e.subset_index].spec
                self._index[id(e)] = len(self.samples)
                lat = e.latent  # (a cached latent flips and masks only as far as the file holds them)
                self.samples.append(Sample(str(e.path), e.caption, tuple(e.bucket), tuple(e.resized_size), e.is_reg,
                                           sub.captions,
                                           bool(getattr(sub, "flip_aug", False)) and (lat is None or lat.flipped),
                                           _alpha(sub, lat),
                                           bool(getattr(sub, "random_crop", False)) and lat is None,
                                           bool(getattr(sub, "color_aug", False)) and lat is None, _mask_path(e),
                                           *(_face(e, sub, part.spec) if lat is None else (None, None)), latent=lat))
        # held-out images (validation_split): plain captions, no flip, for the validation loss
        self.validation: list[Sample] = [
            Sample(str(e.path), e.caption, tuple(e.bucket), tuple(e.resized_size), False, None, False,
                   _alpha(sub.spec, e.latent), mask_path=_mask_path(e), latent=e.latent)
            for part in plan.datasets for sub in part.subsets for e in sub.validation_images
            if e.bucket is not None]

    def epoch_batches(self, seed: int, epoch: int) -> list[list[int]]:
        batches = []
        for part in self.plan.datasets:
            batches += [[self._index[id(e)] for e in b] for b in part.epoch_batches(seed, epoch)]
        if len(self.plan.datasets) > 1:  # several datasets: interleave their batches
            random.Random(_seed_for(seed, "datasets", epoch)).shuffle(batches)
        return batches


class Trainer:
    final_save_wait_s = 600.0  # how long a finished run waits for room for its final LoRA
    final_save_retry_s = 10.0

    def __init__(self, host, cfg, plan, *, on_event=None, should_cancel=None, device: torch.device | None = None,
                 sample_fn=None, fast=None):
        self.host = host
        self.cfg = cfg
        self.plan = plan
        self.data = PlanData(plan)
        self.samples = self.data.samples
        self.validation = self.data.validation
        self.epochs = plan.steps.num_epochs
        self.total_steps = plan.steps.max_train_steps
        start = getattr(plan, "start", None)  # (initial_epoch without skip_until_initial_step stops earlier)
        self.end_step = start.end_step if start is not None else self.total_steps
        self.metadata_extra = plan.ss_dataset_metadata()
        self.on_event = on_event or (lambda e: None)
        self.should_cancel = should_cancel or (lambda: False)
        self.sample_fn = sample_fn
        self.sd_model = host.sd_model
        self.family = host.family
        self.device = device or host.device
        self.notes: list[str] = list(getattr(cfg, "notes", []) or [])
        self.files: list[str] = []
        self._told_skipped = False  # the "fp16 loss scaling skipped a step" note is said once
        self._told_absurd = False   # as is the "weights far beyond a LoRA's range" one
        self._told_vae_nan = False
        self._samples_cut = False  # the last sample set stopped early on a cancel
        self._vae32 = None
        self._told_truncated = False  # and the one about captions cut at max_token_length
        self.losses: list[tuple[int, float]] = []
        self.val_losses: list[tuple[int, float]] = []
        # reading the loss back syncs the host with the GPU: do it every N steps there
        self.log_every = 1 if self.device.type == "cpu" else 10
        # fast paths (fastpath.py): fast=False / "capture" here, env LORA_STUDIO_FAST_PATH, config fast_path
        try:
            self.fast = FastPath.resolve(fast, cfg, host)
        except ValueError as e:
            raise TrainingError(str(e)) from e
        self.fast_desc = ""
        self.runner = None
        self.fp8 = False  # base weights stored in FP8 during the run (the host's or fp8_base)

    # ---- helpers ------------------------------------------------------------------------------------------
    def _emit(self, kind, **kw):
        self.on_event(TrainEvent(kind, total=self.end_step, epochs=self.epochs, **kw))

    def _note(self, text, console: bool = False):
        """``console``: also for the WebUI's console (a finished job waiting for disk room says so there)."""
        if text in self.notes:  # (the pre-flight check and the run may both find it)
            return
        self.notes.append(text)
        self._emit("note", message=text, extra={"console": True} if console else {})

    def _precision(self, fp8: bool = False):
        mp = (self.cfg.mixed_precision or "no").lower()
        dev = self.device.type
        if mp == "fp16" and dev != "cuda":
            if not fp8:
                self._note(CPU_FP16_NOTE)
            mp = "no"
        if mp == "bf16" and dev == "cuda" and not torch.cuda.is_bf16_supported():
            self._note("this GPU has no bf16; using fp16 mixed precision instead.")
            mp = "fp16"
        if fp8 and mp == "no":  # sd-scripts refuses fp8_base without mixed precision; A1111 computes FP8 like this
            mp = "bf16" if compute_dtype(self.device) == torch.bfloat16 else "fp16"
            self._note(f"FP8 weights are computed in {mp} autocast: mixed_precision = {mp} is used for this run "
                       f"(mixed_precision was {self.cfg.mixed_precision or 'no'!r})")
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mp)
        return mp, dtype

    def _fp8_plan(self) -> tuple[list, list[str]]:
        """(the model parts to store in FP8 for this run, the parts the host already holds in FP8)."""
        c = self.cfg
        held = fp8_parts(self.sd_model)
        if held:
            self._note(f"the loaded model's {' and '.join(held)} Linear/Conv weights are stored in FP8 (the WebUI's "
                       "Settings -> Optimizations -> FP8 weight): training computes with them as stored and does "
                       "not change them")
        roots = []
        if c.fp8_base or c.fp8_base_unet:
            if "UNet" not in held:
                roots.append(self.sd_model.model.diffusion_model)
            te = text_encoder_root(self.sd_model)
            if not c.fp8_base_unet and te is not None and "text encoder" not in held:
                roots.append(te)
            if c.fp8_base_unet and "text encoder" in held:
                self._note("fp8_base_unet: the text encoder stays in FP8 too (the WebUI's FP8 weight setting "
                           "stores it so)")
        return roots, held

    @contextmanager
    def _base_weights_merged(self):
        """base_weights: the files merged into the model for this job (sd-scripts merges them before it builds
        the network), through the same patcher as <lora:>, so every format it reads works and the weights come
        back bit for bit on every exit. A file that does not fit the model stops the job before training."""
        from ..apply.layers import layer_mapping
        from ..apply.loader import load_network
        from ..apply.patcher import Patcher
        from ..formats.errors import LoraError

        c = self.cfg
        mults = list(c.base_weights_multiplier or [])
        if len(mults) > len(c.base_weights):
            self._note(f"base_weights_multiplier has {len(mults)} values for {len(c.base_weights)} file(s); the "
                       "extra values are not used")
        mapping = layer_mapping(self.sd_model)
        wanted = []
        for i, path in enumerate(c.base_weights):
            m = mults[i] if i < len(mults) else 1.0  # sd-scripts: a missing multiplier is 1.0
            try:
                net = load_network(str(c.resolve(path)), self.family, cache=None, layer_names=set(mapping))
            except LoraError as e:
                raise TrainingError(f"base_weights {path}: {e}") from None
            rep = net.report
            if not rep.matched:
                raise TrainingError(f"base_weights {path}: none of its {rep.total_modules} modules fit the loaded "
                                    f"model ({rep.summary()}); is it a LoRA for this model?")
            if len(rep.matched) != rep.total_modules:
                self._note(f"base_weights {os.path.basename(path)}: {rep.summary()}\n{rep.details()}")
            wanted.append((net, m, m))
        patcher = Patcher(cache_mb=0)
        try:
            res = patcher.apply(mapping, wanted)
            if not res.ok:
                raise TrainingError("base_weights could not be merged: " + "; ".join(res.messages[:5]))
            self._note("base_weights merged into the model for this job (put back after it): " + "; ".join(
                f"{os.path.basename(p)} x{w[1]:g} ({n.matched} layers)"
                for p, w, n in zip(c.base_weights, wanted, res.networks)))
            yield
        finally:
            patcher.restore()

    def _load_start_weights(self, net: LoRANetwork, sd: dict):
        """network_weights: continue from a file; what does not fit is said, never dropped quietly."""
        path = self.cfg.network_weights
        try:
            missing = net.load_kohya_state_dict(sd)
        except ValueError as e:
            raise TrainingError(f"network_weights {path}: {e}") from None
        total = sum(1 for p in net.parameters())
        if len(missing) == total:
            from ..formats.family import detect_family
            fam = detect_family({k: tuple(v.shape) for k, v in sd.items()}, {})
            if fam.family and self.family and fam.family != self.family:
                raise TrainingError(wrong_family_message("network_weights", path, fam.family, self.family))
            raise TrainingError(f"network_weights {path}: none of its tensors belong to this network (e.g. "
                                f"{', '.join(sorted(sd)[:2])}); it is another network type (LoRA / LoHa / LoKr, "
                                "DoRA) or for another model. Set network_module and network_args as the file was "
                                "trained, or leave network_weights empty to start fresh")
        self._note(f"started from {path} ({len(missing)} tensors not in that file)")
        unused = net.unused_tensors(sd)
        if unused:
            why = ("the file has DoRA magnitudes (dora_scale): continue it with network_module = lycoris.kohya "
                   "and network_args dora_wd=True" if any(k.endswith(".dora_scale") for k in unused) else
                   "the file has modules or tensor kinds this network does not create (another network type, "
                   "preset, conv_dim or trained part)")
            self._note(f"{len(unused)} tensors of {path} are not used (e.g. {', '.join(unused[:2])}): {why}")

    def _refuse_non_finite(self, net: LoRANetwork, step: int, file: str | None, loss: float | None = None):
        """A LoRA whose weights turned NaN/inf renders black images: stop with the causes instead of training on
        or writing it (files already written stay). Weights finite but far out (a run diverging) are said once,
        at the first file that has them; a non-finite loss with finite weights is a step fp16 loss scaling
        skipped: said once too."""
        # (one pass: the largest magnitude is NaN or inf exactly when a value is; it also finds absurd weights)
        peaks = [(float(p.detach().abs().max()), n.removeprefix("pairs.")) for n, p in net.named_parameters()
                 if p.numel()]
        bad = [n for m, n in peaks if not math.isfinite(m)]
        written = [os.path.basename(f) for f in self.files]
        kept = f"the last file written, {written[-1]}, is fine" if written else "no LoRA file was written yet"
        c = self.cfg
        if bad:
            what = f"the loss is {loss} and " if loss is not None else ""
            raise TrainingError(
                f"training diverged at step {step}: {what}{len(bad)} LoRA tensors are NaN or infinite (e.g. "
                f"{bad[0]}), so the run stops here{f' and {file} is not written' if file else ''}; {kept}. Usual "
                f"causes: a learning rate too high for {c.optimizer_type or 'AdamW'} (this run: "
                f"{c.unet_lr if c.unet_lr is not None else c.learning_rate} for the UNet), fp16 overflow (try "
                "mixed_precision = bf16 on GPUs that have it), or NaN latents from a half-precision VAE (SDXL: "
                "start the WebUI with --no-half-vae). The WebUI's model is unchanged.")
        if file is not None and not self._told_absurd:
            top = max(peaks, default=(0.0, ""))
            if top[0] > ABSURD_VALUE:
                self._told_absurd = True
                self._note(f"{file}: the LoRA's weights reached {top[0]:.3g} (e.g. {top[1]}), "
                           "far beyond a LoRA's usual range: the run is diverging, and files from here on may render "
                           f"black or stop the WebUI with a NaN error; {kept}. Lower the learning rate.")
        if loss is not None and not self._told_skipped:
            self._told_skipped = True
            self._note(f"step {step}: the loss was not finite but the LoRA weights are, so that step was skipped "
                       "(fp16 loss scaling does this now and then); training goes on")

    # dim_from_weights: a tensor each module of a LyCORIS algorithm has (for LoKr: one of two); IA3 and full have
    # no rank, their marker only says which modules the file has
    _RANK_KEYS = {"loha": (".hada_w1_b",), "glora": (".a2.weight",), "ia3": (".on_input",), "full": (".diff",),
                  "lokr": (".lokr_w1", ".lokr_w1_a"), "diag-oft": (".oft_blocks",), "boft": (".oft_blocks",)}

    @staticmethod
    def _file_algos(sd: dict) -> dict[str, list[str]]:
        """Algorithm -> the file's module names of it (diag-oft and boft share a key: 3-d vs 4-d blocks)."""
        markers = {"lora": (".lora_down.weight",), **Trainer._RANK_KEYS}
        out: dict[str, list[str]] = {}
        for k, v in sd.items():
            for algo, ends in markers.items():
                end = next((e for e in ends if k.endswith(e)), None)
                if end is None or (algo in ("diag-oft", "boft") and v.dim() != (3 if algo == "diag-oft" else 4)):
                    continue
                out.setdefault(algo, []).append(k[: -len(end)])
        return out

    @staticmethod
    def _from_file(algo: str, sd: dict, name: str) -> tuple:
        """(rank, alpha[, from_file]) of one LyCORIS module of the file, as LyCORIS' make_module_from_state_dict
        reads it: LoKr's factor shapes and whole / decomposed / Tucker factors, OFT's block size, constraint
        (alpha) and rescale; a DoRA magnitude (dora_scale) and its axis."""
        got = Trainer._from_file_shape(algo, sd, name)
        ds = sd.get(f"{name}.dora_scale")
        if algo in ("ia3", "full", "diag-oft", "boft"):
            return got
        extra = dict(got[2]) if len(got) > 2 else {}
        # (a module without dora_scale is no DoRA module, whatever dora_wd says: LyCORIS builds it from the keys)
        extra["dora"] = ds is not None
        if ds is not None:  # (LyCORIS lays the magnitude out per output row (O, 1, ...) or per input column)
            extra["wd_on_output"] = ds.dim() < 2 or ds.shape[1] == 1
        return got[0], got[1], extra

    @staticmethod
    def _from_file_shape(algo: str, sd: dict, name: str) -> tuple:
        get = lambda key: sd.get(f"{name}.{key}")  # noqa: E731
        alpha = get("alpha")
        if algo == "lora":  # (LoCon: a Tucker core on a 3x3 conv, or none)
            rank = int(get("lora_down.weight").shape[0])
            return rank, float(alpha) if alpha is not None else float(rank), {"tucker": get("lora_mid.weight")
                                                                              is not None}
        if algo in ("ia3", "full"):
            return 1, 1.0
        if algo in ("diag-oft", "boft"):
            blocks = get("oft_blocks")
            return (int(blocks.shape[-1]), None, {"constraint": float(alpha) if alpha is not None else 0.0,
                                                    "rescaled": get("rescale") is not None})
        if algo == "lokr":
            w1, w1a, w1b = get("lokr_w1"), get("lokr_w1_a"), get("lokr_w1_b")
            w2, w2b, t2 = get("lokr_w2"), get("lokr_w2_b"), get("lokr_t2")
            if w1 is None and (w1a is None or w1b is None) or w2 is None and w2b is None:
                raise TrainingError(f"dim_from_weights: {name} in the network_weights file lacks LoKr factors "
                                    "(lokr_w1 or lokr_w1_a/_b, and lokr_w2 or lokr_w2_a/_b): the file is damaged")
            out_l, in_m = (w1.shape if w1 is not None else (w1a.shape[0], w1b.shape[1]))
            rank = int(w1a.shape[1]) if w1a is not None else int(w2b.shape[0]) if w2 is None else 1
            layout = {"out_l": int(out_l), "in_m": int(in_m), "use_w1": w1 is not None, "use_w2": w2 is not None,
                      "tucker": t2 is not None}
            return rank, float(alpha) if alpha is not None else float(rank), {"layout": layout}
        rank = int(get(Trainer._RANK_KEYS[algo][0][1:]).shape[0])
        return rank, float(alpha) if alpha is not None else float(rank)

    def _lyco_dims_from_weights(self, sd: dict, found: dict, algo: str, lyco):
        """dim_from_weights for a LyCORIS network: every module of the file as the file has it (its algorithm,
        rank, alpha, shapes), as LyCORIS' create_network_from_weights builds it whatever network_args say."""
        c = self.cfg
        per_module = {}
        for a, names in found.items():
            for name in names:
                rank, alpha, *extra = self._from_file(a, sd, name)
                extra = dict(extra[0]) if extra else {}
                if a != algo:
                    extra["algo"] = "locon" if a == "lora" else a
                per_module[name] = (rank, alpha, extra) if extra else (rank, alpha)
        counts = ", ".join(f"{len(v)} {a if a != 'lora' else 'LoRA/LoCon'}" for a, v in sorted(found.items()))
        plain = sum(1 for v in per_module.values() if len(v) > 2 and v[2].get("dora") is False)
        if lyco.dora and plain:
            self._note(f"dim_from_weights: {plain} module(s) of {c.network_weights} have no DoRA magnitude "
                       "(dora_scale) and train without DoRA, whatever dora_wd says (as LyCORIS builds them from the "
                       "file); train a new network to add DoRA")
        self._note(f"dim_from_weights: each module of {c.network_weights} ({counts}) keeps its own algorithm, "
                   "ranks, alpha and shapes (LoKr factors, OFT blocks, constraint, rescale, Tucker cores, DoRA "
                   "magnitudes), and layers "
                   "it does not have get none (as LyCORIS' create_network_from_weights)"
                   + (f"; it holds no algo={lyco.algo} module, so network_args algo={lyco.algo} trains nothing"
                      if algo not in found else ""))
        # (a conv rank only so that the file's 3x3 conv modules are looked for; each takes its own)
        return int(c.network_dim or 4), c.network_alpha, int(c.network_dim or 4), None, per_module

    def _dims_from_weights(self, sd: dict, lyco=None):
        """``dim_from_weights``: network_dim / alpha (and conv_dim / conv_alpha for 3x3 LoCon modules) taken from
        the network_weights file ``sd``. A file with several ranks (block_dims, resized LoRAs) gives each module its
        own rank and alpha instead (the returned per-module dict; None for one rank per kind). LyCORIS networks
        (LoHa, LoKr, GLoRA, IA3, full, OFT, BOFT): always per module, each as the file has it, as LyCORIS'
        create_network_from_weights builds them."""
        c = self.cfg
        algo = lyco.algo if lyco is not None and lyco.weight_path else "lora"
        found = self._file_algos(sd)
        if lyco is not None and found and (set(found) != {algo} or algo != "lora"
                                           or any(k.endswith((".lora_mid.weight", ".dora_scale")) for k in sd)):
            return self._lyco_dims_from_weights(sd, found, algo, lyco)
        if algo not in found:
            if algo == "lora" and not found:
                raise TrainingError(f"dim_from_weights: {c.network_weights} holds no kohya LoRA (lora_down) weights")
            first = sorted(found)[0] if found else None
            have = (f"{first} modules, not {algo} ones: train them with network_module = \"lycoris.kohya\" and "
                    f"network_args algo={first}" if first else f"no {algo} modules")
            raise TrainingError(f"dim_from_weights: {c.network_weights} holds {have} (LyCORIS takes each module's "
                                "type from the file)")
        if len(found) > 1:
            self._note(f"dim_from_weights: {c.network_weights} also holds "
                       f"{', '.join(a for a in sorted(found) if a != 'lora')} modules (LyCORIS types); only its LoRA "
                       "modules train here. Train with network_module = \"lycoris.kohya\" to keep them all")
        ranks: dict[str, set] = {"linear": set(), "conv": set()}
        alphas: dict[str, set] = {"linear": set(), "conv": set()}
        per_module: dict[str, tuple[int, float]] = {}
        for k, v in sd.items():
            if not k.endswith(".lora_down.weight"):
                continue
            kind = "conv" if v.dim() == 4 and v.shape[2:] != (1, 1) else "linear"
            r = int(v.shape[0])
            a = sd.get(k[: -len(".lora_down.weight")] + ".alpha")
            a = float(a) if a is not None else float(r)
            ranks[kind].add(r)
            alphas[kind].add(a)
            per_module[k[: -len(".lora_down.weight")]] = (r, a)
        if not ranks["linear"]:
            raise TrainingError(f"dim_from_weights: {c.network_weights} holds no kohya LoRA (lora_down) weights")
        if any(len(ranks[kind]) > 1 or len(alphas[kind]) > 1 for kind in ranks):
            used = ", ".join(map(str, sorted(ranks["linear"] | ranks["conv"])))
            self._note(f"dim_from_weights: {c.network_weights} uses several ranks ({used}); each of its "
                       f"{len(per_module)} modules keeps its own rank and alpha, and modules it does not have get no "
                       "LoRA (as sd-scripts' create_network_from_weights)")
            conv_dim = max(ranks["conv"]) if ranks["conv"] else None  # only to look for the conv layers
            return int(c.network_dim or 4), c.network_alpha, conv_dim, None, per_module
        dim, alpha = next(iter(ranks["linear"])), next(iter(alphas["linear"]))
        conv = (next(iter(ranks["conv"])), next(iter(alphas["conv"]))) if ranks["conv"] else (None, None)
        self._note(f"dim_from_weights: network_dim {dim}, network_alpha {alpha:g}"
                   + (f", conv_dim {conv[0]}, conv_alpha {conv[1]:g}" if conv[0] else "") + " from the file")
        return dim, alpha, conv[0], conv[1], None

    def _check_disk_space(self, net, out_dir: str, resumed_at: int = 0) -> None:
        """Refuse a run whose final LoRA (and resume state) cannot fit on the disk; note when all its planned
        saves would not. (A full disk mid-run costs the saves it blocks; the final LoRA waits for room.)"""
        n = sum(p.numel() for pair in net.pairs.values() for p in pair.parameters())
        problem, note = run_space_problems(out_dir, n, self.cfg, self.epochs, self.end_step, resumed_at)
        if problem:
            raise TrainingError(problem + (". Nothing was written" if resumed_at >= self.end_step else
                                           ". Nothing was trained"))
        if note:
            self._note(note)

    def _compile_backend(self) -> str | None:
        """torch_compile from the config, else the host's setting (WebUI: Settings -> LoRA Studio); off by default."""
        on = self.cfg.torch_compile
        if on is None:
            on = getattr(self.host, "torch_compile", None)
        if not on:
            return None
        return (self.cfg.dynamo_backend or "inductor").lower()

    def _network_args(self) -> dict:
        try:
            return network_args(self.cfg)
        except ValueError as e:
            raise TrainingError(str(e)) from None

    # ---- caches -------------------------------------------------------------------------------------------
    def _vae_encode(self, pixels) -> torch.Tensor:
        """Latents of one HxWx3 image, or of a list of same-sized images in one VAE call (vae_batch_size)."""
        m = self.sd_model
        vae = m.first_stage_model
        dtype = next(vae.parameters()).dtype
        if self.cfg.no_half_vae and dtype != torch.float32:
            vae, dtype = self._vae_fp32(vae), torch.float32
        stack = [pixels] if isinstance(pixels, np.ndarray) else pixels
        # (torch.tensor copies: decoded images are often read-only arrays, which from_numpy warns about)
        x = torch.stack([torch.tensor(p).permute(2, 0, 1) for p in stack]).float().div(127.5).sub(1.0)
        with torch.no_grad():
            post = vae.encode(x.to(self.device, dtype))
            # ldm returns a distribution; newer sgm returns the latent tensor itself (which also has .mode())
            z = post if isinstance(post, torch.Tensor) else post.mode()
            if not torch.isfinite(z).all() and dtype != torch.float32:
                # fp16 VAEs overflow on some images (SDXL especially): redo this one in fp32
                if not self._told_vae_nan:
                    self._told_vae_nan = True
                    self._note("the VAE produced NaN in half precision; re-encoding such images in fp32 (set "
                               "no_half_vae = true to encode every image in fp32)")
                z = self._vae_fp32(vae).encode(x.to(self.device, torch.float32))
                z = z if isinstance(z, torch.Tensor) else z.mode()
        scale = float(getattr(m, "scale_factor", 0.18215))
        return (z.float() * scale).cpu()

    def _vae_fp32(self, vae):
        """A private fp32 copy of the host's half-precision VAE, made once per run: the host's VAE is never
        converted in place."""
        if self._vae32 is None:
            self._vae32 = copy.deepcopy(vae).float()
        return self._vae32

    def _latent_key(self, s: Sample, flip: bool) -> str:
        st = os.stat(s.path)
        return hashlib.sha256(
            f"{os.path.abspath(s.path)}|{st.st_size}|{st.st_mtime_ns}|{s.bucket}|{s.resized}|{flip}|"
            f"{self.cfg.resize_interpolation}|{self.host.model_id}"
            # (a fixed face crop is another picture of the file: keys without it stay as they were)
            f"{f'|face {s.face} {s.face_range}' if s.face is not None else ''}"
            f"{resize_tag()}{'|vae32' if self.cfg.no_half_vae else ''}".encode()).hexdigest()[:32]

    def _cache_latents(self, cache_dir: str | None):
        self.latents: dict[tuple[int, bool], torch.Tensor] = {}
        self.size_cond: dict[tuple[int, bool], tuple] = {}
        self.val_latents: dict[int, tuple[torch.Tensor, tuple]] = {}
        self.masks: dict = {}      # (i, flip) -> [1, h, w] loss weights at latent size, for alpha_mask samples
        self.val_masks: dict = {}
        done = {}
        jobs = [(self.latents, self.size_cond, (i, flip), s, flip) for i, s in enumerate(self.samples)
                if not s.per_step for flip in ((False, True) if s.flip_aug else (False,))]
        val: dict[int, tuple] = {}
        jobs += [(None, val, i, s, False) for i, s in enumerate(self.validation)]
        n = len(jobs)
        keys = [self._latent_key(s, flip) for _, _, _, s, flip in jobs]
        batch = max(1, int(self.cfg.vae_batch_size or 1))
        if n:  # (the first image can take a while on a slow VAE: the job list says what the job is doing)
            self._emit("cache", step=0, message=f"caching latents 0/{n} (the VAE encodes each training image once)",
                       extra={"n": n})
        for k, (lat, conds, index, s, flip) in enumerate(jobs, 1):
            key = keys[k - 1]
            if key not in done:
                if self.should_cancel():
                    raise Cancelled()
                if batch > 1 and self._needs_vae(s, key, cache_dir):
                    done.update(self._encode_batch(jobs, keys, k - 1, batch, done, cache_dir))
                else:
                    done[key] = self._encode_cached(s, flip, key, cache_dir)
                self._emit("cache", step=k, message=f"caching latents {k}/{n}", extra={"n": n})
            z, cond, mask = done[key]
            if lat is not None:
                lat[index], conds[index] = z, cond
                if mask is not None:
                    self.masks[index] = mask
            else:
                conds[index] = (z, cond)
                if mask is not None:
                    self.val_masks[index] = mask
        self.val_latents = val

    def _prepare(self, s, flip: bool, rng_seed: int | None = None):
        """One sample's pixels, SDXL size conditioning and alpha mask, as sd-scripts prepares them: centre crop, or
        for a per-step sample (``rng_seed`` given) a random crop and colour jitter as its subset asks; then the
        flip (sd-scripts' order: crop, colours, flip)."""
        fresh = rng_seed is not None
        prep = self._crop(load_image_rgb(s.path), s, rng_seed)
        px = prep.pixels
        if fresh and s.color_aug:
            px = color_aug(px, random.Random(_seed_for(rng_seed, "color")))
        px = px[:, ::-1].copy() if flip else px
        cond = sdxl_size_conditioning(prep.original_size, prep.crop_ltrb, s.bucket, flipped=flip)
        return px, cond, self._alpha_mask(s, flip, rng_seed) if s.masked else None

    def _encode_cached(self, s, flip: bool, key: str, cache_dir: str | None):
        """The latent (from the disk cache when there is a good file), SDXL size numbers and alpha mask. A cache
        hit does not decode the image: the size numbers are kept in the file's metadata (only an alpha mask needs
        the image again)."""
        if s.latent is not None:
            return self._sd_scripts_latent(s, flip)
        z = cond = None
        path = os.path.join(cache_dir, key + ".safetensors") if cache_dir else None
        if path and os.path.exists(path):
            try:
                z = load_tensors(path)["latent"]
                saved = read_metadata(path).get("size_cond")
                cond = tuple(tuple(int(v) for v in pair) for pair in json.loads(saved)) if saved else None
            except Exception:  # a damaged cache file is rebuilt, never trusted
                self._note(f"latent cache file {os.path.basename(path)} in {os.path.dirname(path)} is damaged (a "
                           "write cut short?); its image is encoded again and the file rewritten")
                z = cond = None
        if z is not None and cond is not None:
            return z, cond, self._alpha_mask(s, flip) if s.masked else None
        px, cond, mask = self._prepare(s, flip)
        if z is None:
            z = self._vae_encode(px)[0]
        if path:  # (a file from an older version without the size numbers is rewritten with them)
            self._write_latent(path, z.contiguous(), s, cond)
        return z, cond, mask

    def _write_latent(self, path: str, z, s, cond) -> None:
        """cache_latents_to_disk saves time on the next run; a file it cannot write (full disk) costs only that."""
        try:
            save_file_atomic({"latent": z}, path, {"image": os.path.basename(s.path), "size_cond": json.dumps(cond)})
        except LoraFileError as e:
            why = _write_failure(e)
            if why is None:
                raise
            self._note(f"the latent disk cache in {os.path.dirname(path)} could not be written ({why}); this run "
                       "keeps its latents in memory, the next one encodes the missing ones again")

    @staticmethod
    def _needs_vae(s, key: str, cache_dir: str | None) -> bool:
        return s.latent is None and not (cache_dir and os.path.exists(os.path.join(cache_dir, key + ".safetensors")))

    def _encode_batch(self, jobs, keys, start: int, batch: int, done: dict, cache_dir: str | None) -> dict:
        """vae_batch_size: the image at ``start`` and the next ones of its bucket that need the VAE, encoded in one
        call (as sd-scripts batches by bucket); results and disk cache files as _encode_cached gives them."""
        bucket = jobs[start][3].bucket
        picked, seen = [], set()
        for j in range(start, len(jobs)):
            s, flip, key = jobs[j][3], jobs[j][4], keys[j]
            if key in done or key in seen or s.bucket != bucket or not self._needs_vae(s, key, cache_dir):
                continue
            picked.append((s, flip, key))
            seen.add(key)
            if len(picked) == batch:
                break
        prepared = [self._prepare(s, flip) for s, flip, _ in picked]
        zs = self._vae_encode([px for px, _, _ in prepared])
        out = {}
        for (s, flip, key), (_, cond, mask), z in zip(picked, prepared, zs):
            z = z.contiguous()
            if cache_dir:
                self._write_latent(os.path.join(cache_dir, key + ".safetensors"), z, s, cond)
            out[key] = (z, cond, mask)
        return out

    def _sd_scripts_latent(self, s, flip: bool):
        """An sd-scripts cached latent (its image is gone): scaled by the model's factor as sd-scripts does at
        train time, SDXL size numbers and alpha mask from the file."""
        try:
            z, alpha = load_latent(s.latent, flip)
        except (OSError, ValueError, KeyError) as e:  # (checked when planned; changed since)
            raise TrainingError(f"cached latent {s.path} cannot be read any more ({e})") from None
        z = torch.from_numpy(z) * float(getattr(self.sd_model, "scale_factor", 0.18215))
        cond = sdxl_size_conditioning(s.latent.original_size, s.latent.crop_ltrb, s.bucket, flipped=flip)
        return z, cond, _latent_mask(alpha, False, 1.0) if s.alpha_mask and alpha is not None else None

    def _alpha_mask(self, s, flip: bool, rng_seed: int | None = None):
        """The alpha channel cropped and scaled like the pixels (the same random offsets for a per-step sample),
        then averaged over each latent pixel's 8x8 block: what sd-scripts' apply_masked_loss gets from
        F.interpolate(mode="area") at loss time. None for an image without alpha (no masking). masked_loss mask
        images give their R channel instead (sd-scripts' apply_masked_loss), cropped like the image too."""
        alpha = load_image_rgb(s.mask_path)[:, :, 0] if s.mask_path else load_image_alpha(s.path)
        if alpha is None:
            return None
        return _latent_mask(self._crop(alpha, s, rng_seed).pixels, flip)

    def _crop(self, img, s, rng_seed: int | None):
        """Scale and crop to the sample's bucket: around its face (face_crop_aug_range), else centred or, for a
        per-step sample, at random_crop's offset. The same ``rng_seed`` gives the same box (pixels and mask)."""
        fresh = rng_seed is not None
        if s.face is not None:  # (a one-value range without random_crop draws nothing: cached like any image)
            return face_crop(img, s.face, s.bucket, s.face_range, s.random_crop, random.Random(rng_seed or 0),
                             self.cfg.resize_interpolation)
        return resize_and_crop(img, s.bucket, s.resized, random_crop=fresh and s.random_crop,
                               rng=random.Random(rng_seed) if fresh else None,
                               interpolation=self.cfg.resize_interpolation)

    def _loss_weight(self, i: int) -> float:
        """prior_loss_weight for regularisation images, 1 for the others."""
        return self.cfg.prior_loss_weight if self.samples[i].is_reg else 1.0

    def _batch_inputs(self, keys, seed: int, epoch: int, b_idx: int, inputs):
        """x0, loss weights, SDXL size numbers (a device tensor on the fast path, else host lists) and alpha masks
        of one batch: gathered from the input cache on the fast path, else stacked here; per-step samples
        (random_crop / color_aug) are prepared and encoded now, the others come from the latent cache."""
        if inputs is not None and not any(self.samples[i].per_step for i, _ in keys):
            got = inputs.gather(keys)
            return got["x0"], got["w"], got.get("sizes"), None, got.get("mask")
        zs, conds, masks = [], [], []
        for i, flip in keys:
            if self.samples[i].per_step:
                px, cond, m = self._prepare(self.samples[i], flip, _seed_for(seed, "crop", epoch, b_idx, i))
                z = self._vae_encode(px)[0]
            else:
                z, cond, m = self.latents[(i, flip)], self.size_cond[(i, flip)], self.masks.get((i, flip))
            zs.append(z)
            conds.append(cond)
            masks.append(m)
        x0 = torch.stack(zs).to(self.device)
        weights = torch.tensor([self._loss_weight(i) for i, _ in keys], device=self.device)
        mask = None
        if any(m is not None for m in masks) or self.masks:
            mask = torch.stack([m if m is not None else torch.ones(1, *x0.shape[2:]) for m in masks]).to(self.device)
        sizes = size_cond = None
        if self.family == "sdxl":
            if inputs is not None:
                sizes = torch.tensor([[float(v) for pair in cd for v in pair] for cd in conds],
                                     dtype=torch.float32).to(self.device)
            else:
                size_cond = conds
        return x0, weights, sizes, size_cond, mask

    # ---- the run ------------------------------------------------------------------------------------------
    def run(self, resume_state: str | None = None) -> TrainResult:
        try:
            return self._run(resume_state)
        finally:
            self._vae32 = None  # (no_half_vae's or the NaN fallback's VAE copy)

    def _run(self, resume_state: str | None) -> TrainResult:
        c = self.cfg
        if not self.samples:
            raise TrainingError("the dataset has no usable images; check the training folder (see the dataset report)")
        out_dir = str(c.resolve(c.output_dir)) if c.output_dir else None
        if not out_dir:
            raise TrainingError("output_dir is not set: choose the folder the LoRA files are written to")
        try:
            ensure_output_dir(out_dir)
        except ValueError as e:
            raise TrainingError(str(e)) from None
        name = c.output_name or "lora"
        # (-1 is "random" in the WebUI's seed fields, as the tab reads it)
        seed = int(c.seed if c.seed is not None and c.seed >= 0 else random.randint(0, 2 ** 31 - 1))
        if (c.seed is None or c.seed < 0) and not resume_state:  # (a resume takes its run's seed)
            self._note(f"seed {'not set' if c.seed is None else f'= {c.seed}'}: a random seed was drawn, {seed} "
                       f"(also in the file's ss_seed); set seed = {seed} to repeat this run")
        self.seed = seed
        unet_lr, te_lr = part_lrs(c)
        if not unet_lr and not te_lr:
            raise TrainingError("both learning rates are 0, so nothing would train; set unet_lr or text_encoder_lr")
        fp8_roots, fp8_held = self._fp8_plan()
        self.fp8 = bool(fp8_roots or fp8_held)
        mp, amp_dtype = self._precision(self.fp8)
        nargs = self._network_args()
        started = time.time()

        with ExitStack() as stack:
            try:
                stack.enter_context(RunLock(out_dir, name, getattr(self.host, "runs_as", "")))
            except RunLockedError as e:
                raise TrainingError(f"{e}. Nothing was trained") from None
            left, size = remove_files(leftover_temps(out_dir, run_files(name)))
            if left:  # (ours: no other run of this name is live, the lock says)
                self._note(f"removed {left} unfinished file(s) ({size / 2**20:.1f} MiB) an interrupted save of an "
                           f"earlier '{name}' run left in {out_dir}")
            if c.logging_dir:
                try:
                    log = CsvLog(str(c.resolve(c.logging_dir)), c.log_prefix, started)
                except ValueError as e:
                    raise TrainingError(str(e)) from None
                stack.callback(log.close)
                inner = self.on_event

                def on_event(e, inner=inner):
                    told = log.failed
                    log.event(e)
                    inner(e)
                    if log.failed and not told:
                        self._note(f"the loss log {log.path} stopped at step {e.step} ({log.failed}); training "
                                   "goes on")
                self.on_event = on_event
                stack.callback(setattr, self, "on_event", inner)
                self._note(f"logging_dir: the losses are written to {log.path} (CSV; no TensorBoard event files "
                           "are written)")
            # everything that holds the model, apart: a final LoRA waiting for disk room gives it back early
            held = stack.enter_context(ExitStack())
            held.enter_context(self.host.lock())
            held.enter_context(guarded([self.sd_model]))
            notes: list[str] = []
            try:
                lyco = lyco_settings(c.network_module, nargs, [], c)  # (its notes came with check_support's)
            except ValueError as e:
                raise TrainingError(str(e)) from None
            dim, alpha, conv_dim, conv_alpha = base_dims(c, nargs, lyco=lyco is not None)
            if c.base_weights:
                held.enter_context(self._base_weights_merged())
            if c.dim_from_weights and not c.network_weights:
                raise TrainingError("dim_from_weights needs network_weights: the file whose ranks are to be used")
            start_sd = load_tensors(str(c.resolve(c.network_weights))) if c.network_weights else None
            module_dims = None
            if c.dim_from_weights:
                dim, alpha, conv_dim, conv_alpha, module_dims = self._dims_from_weights(start_sd, lyco)
            # (per-module ranks: no single conv rank goes into the metadata)
            self._net_dims = (dim, alpha, None if module_dims else conv_dim, conv_alpha)
            self._lyco = lyco
            # LyCORIS reads its neuron dropout from network_args dropout=, not from network_dropout
            self._dropout = (float(nargs["dropout"]) if lyco is not None and "dropout" in nargs
                             else c.network_dropout)
            try:
                block_lr, blocks, loraplus = block_settings(
                    c, self.family, notes, (dim, alpha, conv_dim, conv_alpha) if c.dim_from_weights else None)
            except ValueError as e:
                raise TrainingError(str(e)) from None
            for n in notes:
                self._note(n)
            lora_fa = c.network_module == "networks.lora_fa"
            dylora = int(nargs.get("unit", 1)) if c.network_module == "networks.dylora" else None
            # sd-scripts' networks.oft: dim blocks, network_alpha the constraint, every layer alike
            kohya_oft = kohya_oft_switches(nargs) if c.network_module == "networks.oft" else None
            if kohya_oft:
                conv_dim = dim
            # sd-scripts' DyLoRA and OFT: no dropout of any kind, no max-norm (it warns and trains without one),
            # network_alpha for the 3x3 convs too
            sd_scripts_plain = not (dylora or kohya_oft)
            if not sd_scripts_plain:
                self._dropout, conv_alpha = None, alpha
            max_norm = c.scale_weight_norms if sd_scripts_plain else None
            try:
                net = LoRANetwork(
                    self.sd_model, self.family, dim=dim, alpha=alpha, conv_dim=conv_dim, conv_alpha=conv_alpha,
                    train_unet=bool(unet_lr), train_text_encoder=bool(te_lr), dropout=self._dropout,
                    rank_dropout=(float(nargs["rank_dropout"]) if "rank_dropout" in nargs and sd_scripts_plain
                                  else None),
                    module_dropout=(float(nargs["module_dropout"]) if "module_dropout" in nargs and sd_scripts_plain
                                    else None),
                    blocks=None if module_dims else blocks, module_dims=module_dims, lyco=lyco,
                    lora_fa=lora_fa, dylora_unit=dylora, kohya_oft=kohya_oft,
                    lyco_max_norm=bool(max_norm) and lyco is not None)
            except (NetworkShapeError, PresetError) as e:  # (a layer size the type cannot split; a preset file
                raise TrainingError(str(e)) from None      # that picks nothing here)
            for n in net.notes:
                self._note(n)
            why = ("are not in the network_weights file" if module_dims else
                   "have rank 0 or a block learning-rate weight of 0")
            if not net.pairs:
                raise TrainingError(f"no module is left to train: all {len(net.skipped)} modules {why} (network_args "
                                    "block_dims / down_lr_weight / mid_lr_weight / up_lr_weight, or dim_from_weights)")
            if net.skipped:
                self._note(f"{len(net.skipped)} module(s) get no LoRA: they {why} (e.g. "
                           f"{', '.join(net.skipped[:3])})")
            resumed_at = 0
            if resume_state:  # (memory-mapped: the step only; an unreadable state is said when it is loaded)
                with suppress(Exception):
                    resumed_at = int(load_state(resume_state, check_only=True).get("step") or 0)
            self._check_disk_space(net, out_dir, resumed_at)
            torch.manual_seed(_seed_for(seed, "init"))
            for pair in net.pairs.values():  # deterministic kohya / LyCORIS init from the run's seed
                pair.reset_parameters()
            net.to(self.device)
            if c.network_weights:
                self._load_start_weights(net, start_sd)
            kind = ("LoRA-FA (lora_down frozen)" if lora_fa else f"DyLoRA (unit {dylora})" if dylora
                    else f"OFT ({dim} blocks per layer, constraint {alpha:g})" if kohya_oft else "LoRA")
            if lyco is not None:
                kind = f"{lyco.kind} (LyCORIS preset {'file ' if lyco.custom else ''}{lyco.preset})"
                if lyco.dora and self.family == "sd2" and any(t.save_4d for t in net.targets):
                    self._note("DoRA on SD2: the proj_in/proj_out magnitudes are saved 4-D, as sd-scripts and "
                               "LyCORIS write them (they train those layers as 1x1 convs). A1111's built-in Lora "
                               "(1.10) skips such layers with a shape error in its log; this extension's <lora:> "
                               "applies them")
                mha = [t for t in net.targets if t.kind == "mha"]
                partial = any(len(t.parts) < 4 for t in mha)
                if mha and (partial or lyco.algo == "full"):
                    self._note(f"{lyco.kind} on the open_clip text encoder: A1111's built-in Lora (1.10) applies "
                               "its attention modules only when q, k, v and out are all in the file, and leaves "
                               "out q/k/v bias differences, so there that part of the file "
                               + ("is not used" if partial else "applies without those biases")
                               + "; this extension's <lora:>, LyCORIS and ComfyUI apply all of it")
            # (step: where a resumed run starts, for the job list while latents are cached)
            counts = net.counts()
            names = dict(_PART_NAMES, **({} if "te2" in counts else {"te1": "text encoder"}))
            parts = ", ".join(f"{names.get(k, k)} {n}" for k, n in counts.items())
            self._emit("start", step=resumed_at,
                       message=f"{kind} for {sum(counts.values())} modules ({parts}); seed {seed}")

            cache_dir = None
            if c.cache_latents_to_disk:
                cache_dir = (getattr(self.host, "latent_cache_dir", None)
                             or os.path.join(out_dir, ".lora-studio-cache", "latents"))
                old = os.path.join(out_dir, ".lora-studio-cache")
                if os.path.isdir(old) and os.path.abspath(os.path.dirname(cache_dir)) != os.path.abspath(old):
                    self._note(f"{old} holds latents cached by an earlier version; this run caches in {cache_dir}. "
                               "In the WebUI's LoRA folder its files show up as LoRAs: delete that folder")
            if cache_dir:
                try:
                    os.makedirs(cache_dir, exist_ok=True)
                except OSError as e:
                    self._note(f"the latent disk cache {cache_dir} could not be made ({_write_failure(e)}); this "
                               "run keeps its latents in memory")
                    cache_dir = None
            unet = self.sd_model.model.diffusion_model
            if fp8_roots:
                # after the network is built: DoRA starts from the full-precision weight (as under sd-scripts)
                held.enter_context(self.host.fp8_weights())
                n = held.enter_context(fp8_storage(fp8_roots))
                self._note(f"{'fp8_base_unet' if c.fp8_base_unet else 'fp8_base'}: {n} Linear/Conv weights of the "
                           f"{' and '.join('UNet' if r is unet else 'text encoder' for r in fp8_roots)} are "
                           "stored in FP8 for this run; the originals wait in CPU memory and are put back after it")
            try:
                self._cache_latents(cache_dir)
            except Cancelled:  # (before the first step: nothing new to keep; a resumed run's state is untouched)
                kept = resume_state if resume_state and os.path.isfile(resume_state) else None
                at = resumed_at if kept else 0  # (the step it resumes at, for the job list)
                self._emit("cancelled", step=at, path=kept, message="cancelled while caching latents, before the "
                           "first step" + (f"; resume again with {kept}" if kept else "; nothing was trained"))
                return TrainResult("cancelled", self.files, None, at, self.losses, self.notes, kept, self.val_losses)
            n_fresh = sum(1 for s in self.samples if s.per_step)
            if n_fresh:
                kinds = {"random_crop": lambda s: s.random_crop, "color_aug": lambda s: s.color_aug,
                         "face_crop_aug_range": lambda s: s.face_cropped_per_step}
                what = " and ".join(k for k, has in kinds.items() if any(has(s) for s in self.samples))
                faces = any(s.face_cropped_per_step for s in self.samples)
                self._note(f"{what}: {n_fresh} image(s) are augmented anew and encoded by the VAE every step (their "
                           "latents cannot be cached)" + (
                               "; cache_latents does not apply to them (sd-scripts refuses random_crop and color_aug "
                               "with it" + (", and with it trains uncropped latents instead of face crops)" if faces
                                            else ")") if c.cache_latents else ""))

            try:
                te = TextEncoder(self.sd_model, self.family, clip_skip=c.clip_skip or 1,
                                 max_token_length=c.max_token_length or 75, weighted=bool(c.weighted_captions))
            except ValueError as e:
                raise TrainingError(str(e)) from None
            base_ac = (getattr(self.sd_model, "alphas_cumprod_original", None)
                       if getattr(self.sd_model, "alphas_cumprod_original", None) is not None
                       else self.sd_model.alphas_cumprod)
            prediction = getattr(self.sd_model, "parameterization", "eps")
            if c.zero_terminal_snr:
                if prediction != "v":
                    self._note("zero_terminal_snr is meant for v-prediction models (sd-scripts warns the same): with "
                               "this eps model the last timestep learns to predict noise from pure noise")
                schedule = NoiseSchedule(zero_terminal_snr(base_ac), prediction, snr_from=base_ac).to(self.device)
            else:
                schedule = NoiseSchedule(base_ac, prediction).to(self.device)
            fast = self.fast
            # the recomputed forward must redraw the same LoRA dropout masks; without dropout the RNG state need not
            # be saved (which also keeps the step capturable: reading the CUDA RNG state is refused while capturing)
            lora_random = bool(net.dropout or net.rank_dropout)
            held.enter_context(_grad_checkpointing(self.sd_model, c.gradient_checkpointing, lora_random))
            # the WebUI has its own attention hijack; headless we switch the stock einsum attention to SDPA
            held.enter_context(sdpa_attention(self.sd_model.model, getattr(self.host, "use_sdpa", True)))
            held.enter_context(net.attached())
            if fast.enabled:
                held.enter_context(cached_timestep_embedding(unet))
                held.enter_context(sync_free_clip_mask())  # the text encoder runs inside the step when trained
            net.train()

            groups = net.param_groups(unet_lr, te_lr, block_lr, loraplus)
            if block_lr is not None or any(r is not None for r in loraplus):
                self._note("optimizer groups: " + ", ".join(f"{g['name']} lr {g['lr']:.3g}" for g in groups))
            opt_args = {}
            for item in c.optimizer_args or []:
                k, v = item.split("=", 1)
                try:
                    opt_args[k.strip()] = ast.literal_eval(v.strip())  # numbers, tuples, bools
                except (ValueError, SyntaxError):
                    opt_args[k.strip()] = v.strip()
            flat, fast_desc = None, []
            module_dropout = net.module_dropout is not None and net.module_dropout > 0
            opt_name = effective_optimizer(c.optimizer_type)  # AdamW8bit without bitsandbytes trains as AdamW
            if fast.enabled and elementwise_optimizer(opt_name) and not module_dropout and not dylora:
                # (module_dropout, DyLoRA: a dropped module's / an untrained rank's weights get no gradient and no
                # update that step; a flat buffer would give them a zero gradient, and AdamW still moves them)
                skip = set()
                if te_lr:
                    probe_tokens = te.tokenize([""])[0]
                    def probe():  # (under the step's autocast: FP8 weights compute only there)
                        with torch.autocast(self.device.type, dtype=amp_dtype) if amp_dtype else nullcontext():
                            return te.encode(probe_tokens, self.device)
                    skip = unused_text_encoder_params(net, probe,
                                                      [p for g in groups if g["name"].startswith("text_encoder")
                                                       for p in g["params"]])
                try:
                    flat = FlatParams(groups, skip)
                    fast_desc.append(f"flat LoRA buffer ({len(flat.groups)} group(s))")
                except ValueError as e:
                    self._note(f"LoRA weights not packed into one buffer ({e}); training goes on per weight")
            if (fast.enabled and opt_name in ("adamw", "adamw32bit", "adam") and "fused" not in opt_args
                    and "foreach" not in opt_args and fused_adamw_supported(self.device)):
                opt_args["fused"] = True
                fast_desc.append("fused AdamW")
            opt_notes: list[str] = []  # an 8-bit optimizer without bitsandbytes trains as its 32-bit twin
            try:
                optimizer, opt_desc = make_optimizer(c.optimizer_type or "AdamW",
                                                     flat.param_groups() if flat else groups, lr=unet_lr or te_lr,
                                                     args=opt_args, device=self.device, notes=opt_notes)
            except (OptimizerNameError, OptimizerGroupsError) as e:
                raise TrainingError(str(e)) from None
            except (TypeError, ValueError) as e:  # an argument the optimizer does not take, or a bad value
                raise TrainingError(f"optimizer {c.optimizer_type or 'AdamW'} refused optimizer_args "
                                    f"{c.optimizer_args or []}: {e}") from None
            for n in opt_notes:
                self._note(n)
            schedule_free = is_schedule_free(c.optimizer_type) and callable(getattr(optimizer, "eval", None))
            own_lr = bool(optimizer.param_groups[0].get("relative_step"))  # Adafactor computes its LR itself
            scheduler_name = c.lr_scheduler
            if schedule_free or own_lr:
                what = ("schedule-free optimizers take no LR schedule (give a warm-up as optimizer_args "
                        "warmup_steps=N)" if schedule_free else "Adafactor with relative_step (its default) "
                        "computes its own LR from its step count; learning_rate is its starting point only")
                unused = [k for k, bad in (("lr_scheduler", (c.lr_scheduler or "constant") not in (
                    "constant", "adafactor")), ("lr_warmup_steps", bool(c.lr_warmup_steps)),
                    ("lr_scheduler_type", bool(c.lr_scheduler_type))) if bad]
                self._note(what + (f": {', '.join(unused)} not used" if unused else "") + " (as in sd-scripts)")
                if own_lr and (len({g["lr"] for g in groups}) > 1):
                    self._note("Adafactor with relative_step: unet_lr / text_encoder_lr and block or LoRA+ ratios "
                               "are not used (as in sd-scripts); set relative_step=False in optimizer_args to use "
                               "them")
                scheduler_name = "adafactor" if own_lr else "constant"
            warmup = c.lr_warmup_steps
            warmup = int(warmup * self.total_steps) if isinstance(warmup, float) and warmup < 1 else int(warmup)
            # (a warm-up as long as the run is a warning of the dataset plan, shown once with the others)
            decay = c.lr_decay_steps or 0  # sd-scripts: a fraction below 1 is a share of the run
            decay = int(decay * self.total_steps) if isinstance(decay, float) and decay < 1 else int(decay)
            sched_args = {}
            for item in c.lr_scheduler_args or []:
                k, _, v = item.partition("=")
                sched_args[k.strip()] = v.strip()
            if c.lr_scheduler_timescale and "timescale" not in sched_args:
                sched_args["timescale"] = str(c.lr_scheduler_timescale)
            try:
                if schedule_free or own_lr:
                    scheduler = make_scheduler(optimizer, scheduler_name, 0, self.total_steps)
                elif c.lr_scheduler_type:  # sd-scripts: the class wins over lr_scheduler
                    scheduler = make_torch_scheduler(optimizer, c.lr_scheduler_type, c.lr_scheduler_args)
                else:
                    # (a warm-up with constant: sd-scripts stops; check_support's note says it warms up instead)
                    sched = "constant_with_warmup" if (c.lr_scheduler or "constant") == "constant" and warmup \
                        else c.lr_scheduler
                    scheduler = make_scheduler(optimizer, sched, warmup, self.total_steps,
                                               c.lr_scheduler_num_cycles, c.lr_scheduler_power,
                                               min_lr_ratio=c.lr_scheduler_min_lr_ratio, decay_steps=decay,
                                               args=sched_args, lr_init=c.learning_rate)
            except ValueError as e:
                raise TrainingError(str(e)) from e
            scaler = torch.cuda.amp.GradScaler() if mp == "fp16" else None

            step, first_epoch, skip_batches = 0, 1, 0
            done_before = False  # (resumed from the state a finished run saved at its end)
            if resume_state:
                try:
                    st = load_state(resume_state)
                except StateFileError as e:
                    raise TrainingError(str(e)) from None
                try:
                    net.load_kohya_state_dict(st["network"])
                except ValueError as e:  # (another network_dim / algorithm than the run that wrote it)
                    raise TrainingError(f"cannot resume from {os.path.basename(resume_state)}: its network does not "
                                        f"fit this config's: {str(e).split('. Set the same')[0]}. Resume with the "
                                        "network settings (network_module, network_dim, conv_dim, network_args) of "
                                        "the run that wrote it") from None
                try:  # state files hold the optimizer per weight, whichever path wrote them
                    load_optimizer_state(optimizer, flat.state_dict_flat(st["optimizer"]) if flat else st["optimizer"])
                except ValueError as e:
                    raise TrainingError(f"cannot resume the optimizer from {os.path.basename(resume_state)}: {e}. "
                                        "Resume with the same network settings, or set fast_path = false") from e
                scheduler.load_state_dict(st["scheduler"])
                if schedule_free:
                    optimizer.train()  # (states are written in eval mode, with the eval weights)
                if scaler is not None and st.get("scaler"):
                    scaler.load_state_dict(st["scaler"])
                step, first_epoch, skip_batches = st["step"], st["epoch"], st["batch_in_epoch"]
                # a run that stopped short of its schedule (initial_epoch) stops there again; otherwise this
                # config's length counts, so a run resumed with more epochs trains (and counts) to the new end
                # (initial_epoch / initial_step of this config are not used with resume)
                st_end, st_total = st.get("end_step"), st.get("total_steps")
                self.end_step = (int(st_end) if st_end and st_total and int(st_end) < int(st_total) == self.total_steps
                                 else self.total_steps)
                if step >= self.end_step and not os.path.exists(os.path.join(out_dir, ckpt_name(name, None))):
                    self._note(f"the state was saved after the last step ({step}), before the final LoRA was "
                               "written (a cancel while it waited for room): only the LoRA is written now")
                elif step >= self.end_step:
                    self._note(f"the state is at the end of this run (step {step} of {self.end_step}): nothing is "
                               "left to train; raise max_train_epochs or max_train_steps to continue it")
                    done_before = True
                if st_total and int(st_total) != self.total_steps and step < self.end_step:
                    self._note(f"the state's run was {int(st_total)} step(s) long, this one is {self.total_steps}: the "
                               "learning-rate schedule is stretched to the new length from here on (an exact "
                               "continuation keeps max_train_epochs / max_train_steps as they were)")
                self.losses = list(st.get("losses", []))
                set_rng_state(st["rng"])
                if c.seed is not None and c.seed >= 0 and c.seed != st["seed"]:
                    self._note(f"resume: the state's run has seed {st['seed']}, this config says {c.seed}; the run "
                               "goes on with its own seed (its data order and noise)")
                own = os.path.basename(resume_state)
                if not own.startswith(name + "-"):
                    self._note(f"resume: {own} is not of a run named '{name}'; it is continued and saved as "
                               f"'{name}' (check that it is the run you mean)")
                for n in resume_data_notes(own, st, self.plan):
                    self._note(n)
                seed = self.seed = st["seed"]
                started = st.get("started", started)  # (the same run: its files keep one session id)
                self._note(f"resumed from {os.path.basename(resume_state)} at step {step}, "
                           + ("the end of its run" if step >= self.end_step else f"epoch {first_epoch}"))
                if c.initial_epoch is not None or c.initial_step is not None:
                    self._note("initial_epoch / initial_step are not used with resume: the state file continues "
                               f"its run exactly where it stopped (step {step})")
            elif self.plan.start is not None and self.plan.start.explanation:
                start = self.plan.start  # (its end_step is self.end_step already)
                step, first_epoch, skip_batches = start.step, start.first_epoch, start.skip_batches
                self._note(f"start: {start.explanation}")

            prefixes = net.trained_prefixes(unet_lr, te_lr)
            accum = max(1, int(c.gradient_accumulation_steps or 1))
            runner = StepRunner(
                unet, schedule, optimizer, scheduler, device=self.device, flat=flat,
                params=[p for g in groups for p in g["params"]], amp_dtype=amp_dtype, scaler=scaler,
                max_grad_norm=c.max_grad_norm, noise_offset=c.noise_offset, min_timestep=c.min_timestep,
                max_timestep=c.max_timestep, min_snr_gamma=c.min_snr_gamma, accum=accum,
                sdxl=self.family == "sdxl", capture=fast.enabled and fast.capture, module_dropout=module_dropout,
                on_note=self._note, loss_opts=LossOptions.from_config(c), capture_asked=fast.capture_asked,
                host_blockers=tuple(getattr(self.host, "graph_blockers", ()) or ())
                + (("gradient checkpointing with LoRA dropout (the recompute reads the RNG state)",)
                   if c.gradient_checkpointing and lora_random else ())
                + (("networks.dylora draws its trained ranks on the host",) if dylora else ()),
                pre_micro=(lambda b: net.new_draws(_seed_for(b.step_seed, "dylora"))) if dylora else None,
                compile_backend=self._compile_backend() if fast.enabled else None,
                post_update=((lambda: net.max_norm_regularize(float(max_norm), prefixes)) if max_norm else None))
            self.runner = runner
            inputs = None
            if fast.enabled:
                inputs = InputCache(self.latents, {k: self._loss_weight(k[0]) for k in self.latents},
                                    self.size_cond if self.family == "sdxl" else None, self.device,
                                    masks=self.masks)
                fast_desc.append("inputs on the device" if inputs.on_device else "inputs in pinned host memory")
                if runner.graphs is not None:
                    fast_desc.append("CUDA graphs per bucket shape")
                if runner.compiled:
                    fast_desc.append(f"torch.compile ({self._compile_backend()})")
            self.fast_desc = ", ".join(fast_desc) if fast.enabled else f"off ({fast.source})"
            # kept with the job's notes: which speed-ups a run used is part of its record
            self.notes.append(f"training step: fast path {self.fast_desc}")
            self._emit("note", message=self.notes[-1], extra={"fast_path": self.fast_desc})
            loss_acc = None
            t0 = time.time()
            t_steps0 = step
            te_cache: dict[str, dict] = {}
            cache_te = not te_lr and not any(getattr(s.caption_options, "changes_per_step", False) for s in self.samples)
            # sd-scripts: no save_precision keeps the training dtype (fp32 LoRA weights)
            save_dtype = SAVE_DTYPES[(c.save_precision or "float").lower()]

            @contextmanager
            def eval_weights():
                """Schedule-free optimizers train on one point and average another: files, samples and
                validation use the average (sd-scripts' optimizer_eval_fn / optimizer_train_fn)."""
                if not schedule_free:
                    yield
                    return
                optimizer.eval()
                try:
                    yield
                finally:
                    optimizer.train()

            def sample(epoch_no, at_step, by_step=False):
                # the file saved with these weights (the samples name it in their <lora:> tag), if one is
                if by_step:
                    saved = step_ckpt_name(name, at_step) if (c.save_every_n_steps and at_step < self.end_step and
                                                              at_step % c.save_every_n_steps == 0) else None
                elif epoch_no and (at_step >= self.total_steps or epoch_no == self.epochs):
                    saved = ckpt_name(name, None)
                elif epoch_no and save_every_epochs and epoch_no % save_every_epochs == 0:
                    saved = ckpt_name(name, epoch_no)
                else:
                    saved = None
                with eval_weights():
                    self._sample(net, epoch_no, at_step, by_step=by_step,
                                 lora=os.path.splitext(saved)[0] if saved else None)

            def save(path_name, epoch_no, final=False):
                with eval_weights():
                    return save_now(path_name, epoch_no)

            def folder_back():
                """An output folder removed or renamed mid-run is made again, so the run is not lost with it."""
                if os.path.isdir(out_dir):
                    return
                try:
                    os.makedirs(out_dir)
                except OSError as e:
                    raise SaveWriteError(f"the output folder {out_dir} is gone and cannot be made again",
                                         f"the folder is gone and cannot be made again ({write_error_reason(e)})",
                                         errno.ENOENT) from None
                self._note(f"the output folder {out_dir} was gone (removed or renamed while training); it was made "
                           "again and this run's files are saved in it from now on", console=True)

            def save_now(path_name, epoch_no):
                folder_back()
                path = os.path.join(out_dir, path_name)
                md = self._metadata(net, epoch_no, step, started, seed, opt_desc, unet_lr, te_lr, mp, dim)
                if c.no_metadata:  # sd-scripts keeps only these (SS_METADATA_MINIMUM_KEYS); modelspec stays
                    md = {k: v for k, v in md.items() if k in MINIMUM_METADATA_KEYS}
                spec = modelspec(self._family_key(), name, self._spec_resolution(),
                                 getattr(self.sd_model, "parameterization", "eps"), c.clip_skip, started,
                                 {"title": c.metadata_title, "author": c.metadata_author,
                                  "description": c.metadata_description, "license": c.metadata_license,
                                  "tags": c.metadata_tags}, timesteps=(c.min_timestep, c.max_timestep))
                if c.metadata_title:
                    spec["modelspec.title"] = c.metadata_title
                self._refuse_non_finite(net, step, path_name)
                sd = net.kohya_state_dict(save_dtype, prefixes)
                over = [k for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v).all()]
                if over:  # fp16's range (65504) is too small for these weights: bf16 keeps fp32's range
                    sd = net.kohya_state_dict(torch.bfloat16, prefixes)
                    self._note(f"{path_name}: {len(over)} tensors (e.g. {over[0]}) exceed the range of "
                               f"save_precision = {c.save_precision} and would turn infinite (a black-image LoRA); "
                               "this file is written in bf16 instead")
                try:
                    save_lora(path, sd, md, spec)
                except LoraFileError as e:
                    cause = _write_cause(e)
                    if cause is None:
                        raise
                    raise SaveWriteError(str(e), write_error_reason(cause), cause.errno) from None
                self.files.append(path)
                self._emit("save", step=step, epoch=epoch_no, path=path,
                           message=f"saved {path_name}; {self._match_summary(path)}")
                return path

            def save_or_go_on(fn, *args, what: str, last: bool = False):
                """An intermediate save that cannot be written costs that file, not the run: said, then on.
                ``last``: the state after the final LoRA, which no later save tries again."""
                try:
                    return fn(*args)
                except SaveWriteError as e:
                    if last:
                        self._note(f"could not write {what} to {out_dir}: {e.why}. The final LoRA is saved; the run "
                                   "cannot be resumed from its end (its newest state, if any, is an earlier one)")
                        return None
                    self._note(f"could not write {what} to {out_dir}: {e.why}. Training goes on and the next save "
                               f"tries again; {e.remedy} before the run ends, or the final LoRA cannot be "
                               "written either")
                    return None

            def save_final():
                """The run's result: on a full disk (or a folder that cannot be written) it waits for the user to
                make room, trying again, rather than throw the finished training away."""
                fname = ckpt_name(name, None)
                if done_before and _written_by(os.path.join(out_dir, fname), started, step):
                    self._note(f"{fname} is kept as that run wrote it (no step was trained)")
                    self.files.append(os.path.join(out_dir, fname))
                    return self.files[-1]
                end = time.monotonic() + self.final_save_wait_s
                given_back = False
                while True:
                    try:
                        return save(fname, self.epochs, final=True)
                    except SaveWriteError as e:
                        if time.monotonic() >= end:
                            kept = (f"the newest saved file is {os.path.basename(self.files[-1])}"
                                    if self.files else "no file of this run was saved")
                            raise TrainingError(
                                f"the final LoRA {fname} could not be written to {out_dir}: {e.why}, still after "
                                f"{self.final_save_wait_s / 60:g} minutes of waiting; {kept}. "
                                f"{e.remedy.capitalize()} (or choose another output folder) and train again"
                            ) from None
                        if not given_back:  # (the file and state are written from the network alone)
                            held.close()
                            given_back = True
                        webui = getattr(self.host, "runs_as", "") == "a WebUI job"
                        self._note(f"could not write the final LoRA {fname} to {out_dir}: {e.why}. The training is "
                                   f"finished and kept in memory: {e.remedy} and it is written, trying again "
                                   f"every {self.final_save_retry_s:g} s for up to {self.final_save_wait_s / 60:g} "
                                   "minutes. Cancel (Ctrl-C on the command line) to give up (it saves a resumable "
                                   "state if there is room for it). The model is given back meanwhile"
                                   + (": image generation goes on" if webui else ""), console=True)
                    pause = time.monotonic() + self.final_save_retry_s
                    while time.monotonic() < min(pause, end):
                        if self.should_cancel():
                            raise Cancelled()
                        time.sleep(0.05)

            save_every_epochs = c.save_every_n_epochs
            if c.save_n_epoch_ratio:  # sd-scripts: at least this many saves over the run; overrides the above
                save_every_epochs = math.floor(self.epochs / c.save_n_epoch_ratio) or 1

            def validate(epoch_no):
                with eval_weights():
                    v = self._validation_loss(net, te, runner, seed)
                self.val_losses.append((step, v))
                recent = [lv for _, lv in self.losses[-50:]]
                div = v - sum(recent) / len(recent) if recent else float("nan")
                self._emit("validation", step=step, epoch=epoch_no, loss=v,
                           message=f"validation loss {v:.4f} ({len(self.validation)} held-out images)",
                           extra={"divergence": div})

            def save_resume(epoch_no, batch_in_epoch, tag, averaged=True):
                # (a cancel keeps the training point as it is: the run it resumes never switched there, and a
                # switch there and back is exact only to float rounding)
                with eval_weights() if averaged else nullcontext():
                    return save_resume_now(epoch_no, batch_in_epoch, tag)

            def save_resume_now(epoch_no, batch_in_epoch, tag):
                folder_back()
                path = os.path.join(out_dir, f"{name}-{tag}{STATE_EXT}")
                opt_sd = flat.state_dict_per_weight(optimizer.state_dict()) if flat else optimizer.state_dict()
                try:
                    save_state(path, {
                        "network": net.kohya_state_dict(torch.float32, raw=True), "optimizer": opt_sd,
                        "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler else None,
                        "step": step, "epoch": epoch_no, "batch_in_epoch": batch_in_epoch, "seed": seed,
                        "end_step": self.end_step, "total_steps": self.total_steps,
                        "losses": self.losses, "rng": rng_state(), "config_source": c.source, "started": started,
                        "data": self.plan.signature()})
                except StateFileError as e:  # (a full disk, a folder gone read-only: said, not a traceback)
                    raise SaveWriteError(str(e), getattr(e, "why", None) or str(e), getattr(e, "errno", None)) from None
                # (the queue keeps the newest: a job cut off by a WebUI restart continues from it)
                self._emit("state", step=step, epoch=epoch_no, path=path)
                return path

            status, state_file = "done", None
            cur_epoch, window_start = first_epoch, skip_batches
            try:
                if self.sample_fn and c.sample_at_first and (step == 0 or not resume_state):  # before any step
                    sample(0, 0)
                for epoch in range(first_epoch, self.epochs + 1):
                    batches = self.data.epoch_batches(seed, epoch)
                    start_b = skip_batches if epoch == first_epoch else 0
                    cur_epoch, window_start = epoch, start_b
                    for b_idx in range(start_b, len(batches)):
                        if step >= self.total_steps:
                            break
                        if loss_acc is None:
                            window_start = b_idx  # a cancel resumes from the start of this accumulation window
                        if self.should_cancel():
                            raise Cancelled()
                        batch = batches[b_idx]
                        micro = (b_idx + 1)
                        crng = random.Random(_seed_for(seed, "caption", epoch, b_idx))
                        flips = [self.samples[i].flip_aug and crng.random() < 0.5 for i in batch]
                        keys = list(zip(batch, flips))
                        caps = [process_caption(self.samples[i].caption, self.samples[i].caption_options, crng,
                                                epoch=epoch, step=step, max_train_steps=self.total_steps)
                                if self.samples[i].caption_options is not None else self.samples[i].caption
                                for i in batch]
                        x0, weights, sizes, size_cond, mask = self._batch_inputs(keys, seed, epoch, b_idx, inputs)
                        cond = self._cond(te, caps, te_cache if cache_te else None, bool(te_lr), runner)
                        sb = StepBatch(x0, weights, cond, _seed_for(seed, "step", epoch, b_idx),
                                       _seed_for(seed, "noise", epoch, b_idx), sizes, size_cond, mask)
                        if accum == 1:
                            loss = runner.step(sb)  # forward, backward, optimizer: no host sync inside
                        else:
                            loss = runner.micro(sb)
                        loss_acc = loss if loss_acc is None else loss_acc + loss
                        if micro % accum != 0 and b_idx != len(batches) - 1:
                            continue
                        if accum != 1:
                            runner.update()
                        step += 1
                        # one host sync per logged step keeps the GPU queue full; the CPU path is cheap anyway
                        if step % max(1, getattr(self, "log_every", 1)) == 0 or step == self.end_step:
                            lv = float(loss_acc) / accum
                            if not math.isfinite(lv):
                                self._refuse_non_finite(net, step, None, lv)
                            self.losses.append((step, lv))
                            avg = sum(v for _, v in self.losses[-50:]) / len(self.losses[-50:])
                            rate = (time.time() - t0) / max(1, step - t_steps0)
                            extra = None
                            if runner.post_result is not None:  # scale_weight_norms, as sd-scripts logs it
                                ks, mean_n, max_n = (float(v) for v in runner.post_result)
                                extra = {"keys_scaled": int(ks), "average_key_norm": mean_n, "max_key_norm": max_n}
                            self._emit("step", step=step, epoch=epoch, loss=lv, avg_loss=avg,
                                       # the part's base LR (the first group may be a block's or LoRA+'s)
                                       lr=(shown_lr(optimizer, 0.0) if own_lr
                                           else scheduler.get_last_lr()[0] / groups[0]["lr_scale"]),
                                       eta_s=rate * (self.end_step - step),
                                       extra=extra or {})
                        loss_acc = None
                        if c.save_every_n_steps and step % c.save_every_n_steps == 0 and step < self.end_step:
                            save_or_go_on(save, step_ckpt_name(name, step), epoch, what=step_ckpt_name(name, step))
                            if c.save_last_n_steps:
                                for f in prune_old_steps(out_dir, name, step, c.save_last_n_steps):
                                    self._note(f"removed old save {f} (keep saves of the last "
                                               f"{c.save_last_n_steps} steps)")
                            if c.save_state:  # sd-scripts saves the state with each step save too
                                at = (epoch, b_idx + 1) if b_idx + 1 < len(batches) else (epoch + 1, 0)
                                save_or_go_on(save_resume, *at, f"step{step:08d}",
                                              what=f"the state of step {step}")
                                keep = c.save_last_n_steps_state or c.save_last_n_steps
                                for f in prune_old_steps(out_dir, name, step, keep or 0, ext=STATE_EXT):
                                    self._note(f"removed old state {f} (keep states of the last {keep} steps)")
                        if (self.validation and c.validate_every_n_steps
                                and step % c.validate_every_n_steps == 0):
                            validate(epoch)
                        # sd-scripts: sample_every_n_epochs wins over sample_every_n_steps
                        if (self.sample_fn and c.sample_every_n_steps and not c.sample_every_n_epochs
                                and step % c.sample_every_n_steps == 0 and step < self.end_step):
                            sample(epoch, step, by_step=True)
                    skip_batches = 0
                    last = step >= self.total_steps or epoch == self.epochs
                    self._emit("epoch", step=step, epoch=epoch, message=f"epoch {epoch}/{self.epochs} done")
                    # sd-scripts validates every epoch unless validate_every_n_epochs says otherwise
                    if self.validation and (last or not c.validate_every_n_epochs
                                            or epoch % c.validate_every_n_epochs == 0):
                        validate(epoch)
                    if self.sample_fn and (c.sample_every_n_epochs or c.sample_every_n_steps) and (
                            last or (c.sample_every_n_epochs and epoch % c.sample_every_n_epochs == 0)):
                        sample(epoch, step)
                    if last:
                        break
                    if save_every_epochs and epoch % save_every_epochs == 0:
                        save_or_go_on(save, ckpt_name(name, epoch), epoch, what=ckpt_name(name, epoch))
                        if c.save_state:
                            save_or_go_on(save_resume, epoch + 1, 0, f"{epoch:06d}",
                                          what=f"the state of epoch {epoch}")
                        if c.save_last_n_epochs:
                            for f in prune_old(out_dir, name, c.save_last_n_epochs,
                                               with_state=not c.save_last_n_epochs_state):
                                self._note(f"removed old save {f} (keep last {c.save_last_n_epochs})")
                        if c.save_state and c.save_last_n_epochs_state:
                            for f in prune_old(out_dir, name, c.save_last_n_epochs_state, ext=STATE_EXT):
                                self._note(f"removed old state {f} (keep last {c.save_last_n_epochs_state})")
                net.eval()
                final = save_final()
                if c.save_state or c.save_state_on_train_end:  # (the LoRA is saved: a missing state is said)
                    state_file = save_or_go_on(save_resume, self.epochs + 1, 0, "final", what="the final state",
                                               last=True)
                if self.should_cancel():  # (asked for during the last step or the last samples: nothing was left)
                    self._note(f"the cancel came after the last training step, so the run finished: all {step} "
                               "steps are trained and the final LoRA is saved"
                               + ("; the last sample images were cut short by it" if self._samples_cut else ""))
            except ImageReadError as e:  # (changed on disk mid-run, or damaged past what the check decodes)
                if not step:
                    raise
                try:
                    kept = save_resume(cur_epoch, window_start, "cancelled", averaged=False)
                except TrainingError:
                    raise TrainingError(f"{e} The {step} step(s) trained so far could not be kept (no room for a "
                                        "resumable state)") from None
                raise TrainingError(f"{e} The {step} step(s) trained so far are kept as a resumable state, "
                                    f"{kept}: fix, replace or remove the image, then resume from it") from None
            except Cancelled:
                status = "cancelled"
                final = None
                # keep what was learned: a resumable state, so cancelling never loses work
                try:
                    state_file = save_resume(cur_epoch, window_start, "cancelled", averaged=False)
                except TrainingError as e:
                    raise TrainingError(f"cancelled at step {step}, but {e}; the run so far could not be kept "
                                        "(earlier saved files are unchanged)") from None
                self._emit("cancelled", step=step, message=f"cancelled at step {step}; resume with {state_file}",
                           path=state_file)
            finally:
                net.eval()
        if status == "done" and resume_state:
            self._drop_used_cancel_state(resume_state, out_dir, name)
        result = TrainResult(status, self.files, final, step, self.losses, self.notes, state_file,
                             self.val_losses)
        if status == "done":
            self._emit("done", step=step, path=final, message=f"finished: {final}")
        return result

    def _drop_used_cancel_state(self, resume_state: str, out_dir: str, name: str) -> None:
        """A cancel's state (name-cancelled-state.lsstate in this run's folder) has done its work once the run it
        continued has finished: removed, so that it is neither resumed again over the finished files nor left
        taking space. States the user asked for (save_state) are kept."""
        mine = os.path.join(out_dir, f"{name}-cancelled{STATE_EXT}")
        try:
            if os.path.exists(mine) and os.path.samefile(resume_state, mine):
                os.remove(mine)
                self._note(f"removed {os.path.basename(mine)}: the run it continued has finished")
        except OSError as e:  # (kept: only space is lost)
            self._note(f"could not remove {os.path.basename(mine)} ({e.strerror or e}); delete it by hand")

    # ---- pieces -------------------------------------------------------------------------------------------
    def _cond(self, te: TextEncoder, caps: list[str], cache: dict | None, grad: bool, runner) -> dict:
        """The step's text conditioning: from the cache, computed now (no grad), or, when the text encoder is
        trained, a function the step calls (tokens are made and sent to the device here, outside the step)."""
        if cache is not None and all(cp in cache for cp in caps):
            return {k: torch.cat([cache[cp][k] for cp in caps]) for k in cache[caps[0]]}
        tokens, truncated = te.tokenize(caps)
        if truncated and not self._told_truncated:
            self._told_truncated = True
            cap, n = te.last_truncated[0]
            limit = te.n_chunks * 75
            more = ("; set max_token_length = 150 or 225 (as in sd-scripts), or shorten it" if limit < 225 else
                    "; shorten it (225 is the most sd-scripts allows)")
            self._note(f"captions longer than max_token_length ({limit} tokens) are cut, the rest of them not "
                       f"trained: e.g. {cap[:60]!r}{'…' if len(cap) > 60 else ''} has {n} tokens{more}")
        if self.fast.enabled:
            tokens = (tuple(to_device_async(t, self.device) for t in tokens) if isinstance(tokens, tuple)
                      else to_device_async(tokens, self.device))
        if grad:
            return InStepCond(lambda tk: te.encode(tk, self.device), tokens)
        with torch.no_grad(), runner.amp():
            out = te.encode(tokens, self.device)
        if cache is not None:
            for j, cp in enumerate(caps):
                cache[cp] = {k: v[j:j + 1].detach() for k, v in out.items()}
        return out

    def _validation_loss(self, net, te, runner, seed: int) -> float:
        """sd-scripts' validation loss: the held-out images at 4 fixed timesteps (200, 400, 600, 800 of 1000) with
        noise from the validation seed, so the numbers of different steps and runs compare; LoRA dropout off. The
        run's own RNGs are not touched (a generator of its own)."""
        c = self.cfg
        by_bucket: dict[tuple, list[int]] = {}
        for i, s in enumerate(self.validation):
            by_bucket.setdefault(s.bucket, []).append(i)
        bs = max(1, int(c.train_batch_size or 1))
        batches = [idx[k:k + bs] for idx in by_bucket.values() for k in range(0, len(idx), bs)]
        if c.max_validation_steps:
            batches = batches[:int(c.max_validation_steps)]
        T = runner.schedule.num_timesteps
        fixed = [T * k // 5 for k in (1, 2, 3, 4)]
        vseed = c.validation_seed if c.validation_seed is not None else seed
        gen = torch.Generator(device=self.device)
        was = net.training
        net.eval()
        total, count = None, 0
        try:
            with torch.no_grad():
                for bi, batch in enumerate(batches):
                    x0 = torch.stack([self.val_latents[i][0] for i in batch]).to(self.device)
                    vmask = (torch.stack([self.val_masks.get(i, torch.ones(1, *x0.shape[2:])) for i in batch])
                             .to(self.device) if self.val_masks else None)
                    with runner.amp():
                        tokens, _ = te.tokenize([self.validation[i].caption for i in batch])
                        cond = te.encode(tokens, self.device)
                    sb = StepBatch(x0, torch.ones(len(batch), device=self.device), cond, 0, 0,
                                   size_cond=[self.val_latents[i][1] for i in batch])
                    y = runner._y(sb, cond)
                    for tv in fixed:
                        gen.manual_seed(_seed_for(vseed, "validation", bi, tv))
                        noise = torch.randn(x0.shape, generator=gen, device=self.device, dtype=x0.dtype)
                        t = torch.full((len(batch),), tv, device=self.device, dtype=torch.long)
                        with runner.amp():
                            loss = runner._loss(x0, cond["crossattn"], y, sb.weights, noise, t, mask=vmask).float()
                        total = loss if total is None else total + loss
                        count += 1
        finally:
            net.train(was)
        return float(total) / count if count else float("nan")

    def _match_summary(self, path: str) -> str:
        """Load the file we just wrote the way <lora:> will, and say how much of it matches the model."""
        from ..apply.layers import layer_mapping
        from ..apply.loader import load_network

        try:
            # (not kept in the apply cache: a cached file held its disk space after the user deleted it)
            rep = load_network(path, self.family, cache=None, layer_names=set(layer_mapping(self.sd_model))).report
        except Exception as e:  # reported, never fatal: the file itself was written
            return f"could not check the saved file against the model: {e}"
        if len(rep.matched) != rep.total_modules:
            self._note(f"the saved file does not fully match the model: {rep.summary()}\n{rep.details()}")
        return rep.summary()

    def _sample(self, net, epoch, step, by_step: bool = False, lora: str | None = None):
        """One sample set; a step-based one is named by its step (epoch=None to the sample function). ``lora``: the
        name of the file saved with these weights, for the pictures' <lora:> tag."""
        was = net.training
        net.eval()
        kwargs = {"epoch": None if by_step else epoch, "step": step}
        try:
            params = inspect.signature(self.sample_fn).parameters
            if "should_cancel" in params:
                kwargs["should_cancel"] = self.should_cancel  # stops between images on a cancel
            if "lora" in params:
                kwargs["lora"] = lora
        except (TypeError, ValueError):  # a callable without a signature: called the plain way
            pass
        try:
            with torch.no_grad():
                paths = self.sample_fn(**kwargs)
            self._samples_cut = "should_cancel" in kwargs and self.should_cancel()
            for p in paths or []:
                self._emit("sample", step=step, epoch=epoch, path=p)
        except Cancelled:
            raise
        except OSError as e:  # (sample pictures are a nicety: a full disk costs them, not the run)
            why = _write_failure(e)
            self._note(f"the sample images of {self._at(epoch, step, by_step)} could not be written ({why}); "
                       "training goes on")
        except Exception as e:  # (nor does a prompt the model cannot render, or memory running out there)
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            self._note(f"the sample images of {self._at(epoch, step, by_step)} failed ({type(e).__name__}: "
                       f"{first[:300]}); training goes on without them. Check the sample prompts' sizes and "
                       "options, or turn samples off", console=True)
            traceback.print_exc()  # (for a report, should it be a bug)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        finally:
            net.train(was)

    @staticmethod
    def _at(epoch, step, by_step: bool) -> str:
        return f"step {step}" if by_step else f"epoch {epoch}"

    def _spec_resolution(self) -> tuple[int, int]:
        """modelspec.resolution: the training resolution (a dataset TOML's first dataset when the config has none),
        else sd-scripts' default for the model (its determine_resolution)."""
        reso = self.cfg.resolution or next((d.spec.resolution for d in self.plan.datasets if d.spec.resolution), None)
        if reso:
            return tuple(reso)
        return {"sdxl": (1024, 1024), "sd2v": (768, 768)}.get(self._family_key(), (512, 512))

    def _family_key(self):
        if self.family == "sd2" and getattr(self.sd_model, "parameterization", "eps") == "v":
            return "sd2v"
        return self.family

    def _metadata(self, net, epoch_no, step, started, seed, opt_desc, unet_lr, te_lr, mp, dim) -> dict[str, str]:
        c = self.cfg
        v = {
            "ss_session_id": _seed_for(started, seed) % (2 ** 31),
            "ss_training_started_at": started,
            "ss_output_name": c.output_name or "lora",
            "ss_learning_rate": c.learning_rate,
            "ss_text_encoder_lr": te_lr,
            "ss_unet_lr": unet_lr,
            "ss_num_epochs": self.epochs,
            "ss_gradient_checkpointing": bool(c.gradient_checkpointing),
            "ss_gradient_accumulation_steps": c.gradient_accumulation_steps,
            "ss_max_train_steps": self.total_steps,
            "ss_lr_warmup_steps": c.lr_warmup_steps,
            "ss_lr_scheduler": c.lr_scheduler,
            # (any other network_module was refused before the run)
            "ss_network_module": "lycoris.kohya" if self._lyco is not None else c.network_module or "networks.lora",
            "ss_network_dim": dim,
            "ss_network_alpha": float(self._net_dims[1] if self._net_dims[1] is not None else dim),
            "ss_network_dropout": self._dropout,
            "ss_mixed_precision": mp,
            "ss_full_fp16": False,
            "ss_v2": self.family == "sd2",
            "ss_base_model_version": BASE_MODEL_VERSION[self._family_key()],
            "ss_clip_skip": c.clip_skip,
            "ss_max_token_length": c.max_token_length,
            "ss_cache_latents": True,
            "ss_seed": seed,
            "ss_lowram": False,
            "ss_noise_offset": c.noise_offset,
            "ss_multires_noise_iterations": c.multires_noise_iterations,
            "ss_multires_noise_discount": c.multires_noise_discount,
            "ss_adaptive_noise_scale": c.adaptive_noise_scale,
            "ss_zero_terminal_snr": c.zero_terminal_snr,
            "ss_training_comment": c.training_comment,
            "ss_num_validation_images": len(self.validation),
            "ss_validation_seed": c.validation_seed,
            "ss_validation_split": c.validation_split,
            "ss_max_validation_steps": c.max_validation_steps,
            "ss_validate_every_n_epochs": c.validate_every_n_epochs,
            "ss_validate_every_n_steps": c.validate_every_n_steps,
            "ss_sd_scripts_commit_hash": "lora-studio",
            "ss_optimizer": opt_desc,
            "ss_max_grad_norm": c.max_grad_norm,
            "ss_caption_dropout_rate": c.caption_dropout_rate,
            "ss_caption_dropout_every_n_epochs": c.caption_dropout_every_n_epochs,
            "ss_caption_tag_dropout_rate": c.caption_tag_dropout_rate,
            "ss_face_crop_aug_range": c.face_crop_aug_range,
            "ss_prior_loss_weight": c.prior_loss_weight,
            "ss_min_snr_gamma": c.min_snr_gamma,
            "ss_scale_weight_norms": c.scale_weight_norms,
            "ss_ip_noise_gamma": c.ip_noise_gamma,
            "ss_debiased_estimation": c.debiased_estimation_loss,
            "ss_noise_offset_random_strength": c.noise_offset_random_strength,
            "ss_ip_noise_gamma_random_strength": c.ip_noise_gamma_random_strength,
            "ss_loss_type": c.loss_type,
            "ss_huber_schedule": c.huber_schedule,
            "ss_huber_scale": c.huber_scale,
            "ss_huber_c": c.huber_c,
            "ss_fp8_base": bool(self.fp8),
            "ss_fp8_base_unet": bool(c.fp8_base_unet and self.fp8),
            "ss_resize_interpolation": c.resize_interpolation,
            "ss_steps": step,
            "ss_epoch": epoch_no,
            "ss_training_finished_at": time.time(),
            # (sd-scripts: the checkpoint's file name, extension included)
            "ss_sd_model_name": (os.path.basename(self.host.model_path) if getattr(self.host, "model_path", None)
                                 else self.host.model_name),
        }
        net_args = dict(a.split("=", 1) for a in (c.network_args or []))
        if c.dim_from_weights and self._net_dims[2]:  # the conv rank came from the file
            net_args.update(conv_dim=str(self._net_dims[2]), conv_alpha=f"{self._net_dims[3]:g}")
        if net_args:
            v["ss_network_args"] = net_args
        if getattr(self.host, "model_legacy_hash", None):
            v["ss_sd_model_hash"] = self.host.model_legacy_hash
        if getattr(self.host, "model_sha256", None):
            v["ss_new_sd_model_hash"] = self.host.model_sha256
        v.update(self.metadata_extra)
        return metadata_strings(v)


class _grad_checkpointing:
    """Checkpoint each UNet block with torch's non-reentrant checkpoint.

    ldm's own ``checkpoint`` passes only the block's own parameters to autograd, so LoRA weights living outside the
    block would get no gradient; the non-reentrant torch version follows whatever the forward uses.
    """

    def __init__(self, sd_model, enabled: bool, preserve_rng: bool = True):
        self.blocks = []
        if not enabled:
            return
        unet = sd_model.model.diffusion_model
        from torch.utils.checkpoint import checkpoint

        for block in list(unet.input_blocks) + [unet.middle_block] + list(unet.output_blocks):
            org = type(block).forward.__get__(block)

            def fwd(*args, _org=org, **kwargs):
                if torch.is_grad_enabled():
                    return checkpoint(_org, *args, use_reentrant=False, preserve_rng_state=preserve_rng, **kwargs)
                return _org(*args, **kwargs)

            if "forward" in block.__dict__:
                continue
            block.forward = fwd
            self.blocks.append(block)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for b in self.blocks:
            b.__dict__.pop("forward", None)
        self.blocks = []
        return False
