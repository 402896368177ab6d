"""Training on the WebUI's loaded model: the queue lock, progress bar, attention and low-VRAM handling, samples.

``modules.*`` is imported inside functions only (this module is part of the one adapter to the WebUI).
"""

from __future__ import annotations

import copy
import os
from contextlib import contextmanager, nullcontext

import torch

from .base import ModelHost
from .webui import cmd_opt, data_dir, forge_info, loaded_model, opt, process_own, sampler_fields, shared

# attention replacements that support backward without surprises; others are swapped for the stock one
_TRAINABLE_ATTENTION = ("sdp", "sdp-no-mem", "xformers")


class WebUINotReady(RuntimeError):
    user_error = True


class WebUIHost(ModelHost):
    """The model the WebUI has loaded, as the trainer sees it."""

    runs_as = "a WebUI job"

    def __init__(self, session, job_id: str | None = None):
        forge = forge_info()
        if forge:
            raise WebUINotReady(f"{forge} Training needs A1111's ldm/sgm model objects; use A1111 v1.10.x or the "
                                f"command line (python -m lib_lora train).")
        model = loaded_model()
        if model is None:
            raise WebUINotReady("no checkpoint is loaded: choose one in the WebUI's checkpoint list first")
        if cmd_opt("lowvram", False):
            raise WebUINotReady("--lowvram moves every UNet block on and off the GPU per step, which training "
                                "cannot do; restart without --lowvram (--medvram is fine)")
        info = getattr(model, "sd_checkpoint_info", None)
        from modules import devices

        super().__init__(model, name=getattr(info, "name_for_extra", "model"), path=getattr(info, "filename", None),
                         device=devices.device, sha256=getattr(info, "sha256", None),
                         legacy_hash=getattr(info, "hash", None))
        self.session = session
        self.job_id = job_id
        self.trains = False  # set on the copy for_job() hands a training job
        self.holds_model = False  # inside lock(): only then is A1111's Interrupt meant for this job
        self.use_sdpa = False  # the WebUI's own attention optimisation stays in charge

    def for_job(self, job_id: str) -> "WebUIHost":
        """This host for one training job: its lock() also enters training() (the trainer only calls lock())."""
        h = copy.copy(self)
        h.job_id, h.trains = job_id, True
        return h

    @contextmanager
    def lock(self):
        """Hold the WebUI's queue lock for the whole job: no image generation runs meanwhile."""
        from modules import call_queue, devices

        st = shared().state
        with call_queue.queue_lock:
            # no <lora:> merge, the built-in's (on top, so first) or ours, may be trained into (and later restored
            # over) a new LoRA
            self.session.release_builtin(self.sd_model)
            self.session.restore()
            st.begin(job="lora-studio")
            self.holds_model = True
            try:
                with self.training() if self.trains else nullcontext():
                    yield
            finally:
                self.holds_model = False
                st.end()
                st.interrupted = False  # as wrap_gradio_gpu_call: an Interrupt ends this job, not the next one
                devices.torch_gc()

    @property
    def latent_cache_dir(self) -> str:
        """Beside A1111's own caches, not in the LoRA folder: the WebUI lists every .safetensors there as a LoRA
        and every subfolder as a button on the card pages. (Keys hold the image, its settings and the model.)"""
        return os.path.join(data_dir(), "latents")

    # the trainer reads these when the training config leaves them unset (Settings -> LoRA Studio)
    def _speed(self):
        from .session import SPEED_CHOICES, SPEED_FLAGS
        return SPEED_FLAGS.get(opt("lora_studio_train_speed", SPEED_CHOICES[0]), SPEED_FLAGS[SPEED_CHOICES[0]])

    @property
    def fast_path(self) -> bool:
        return self._speed()[0]

    @property
    def cuda_graphs(self) -> bool | None:
        return self._speed()[1]

    @property
    def torch_compile(self) -> bool:
        return bool(opt("lora_studio_torch_compile", False))

    @property
    def graph_blockers(self) -> list[str]:
        """Why the training step must not be captured as a CUDA graph in this WebUI (read by the trainer)."""
        if getattr(self.sd_model, "lowvram", False):
            # its hooks may move model parts inside a step, and graph memory is what --medvram users lack
            return ["--medvram (the WebUI moves model parts between devices)"]
        return []

    @contextmanager
    def training(self):
        """Inside lock(), for a training job: attention that supports backward, the model on the GPU (medvram)."""
        from modules import devices, sd_hijack

        method = getattr(sd_hijack.model_hijack, "optimization_method", None)
        undo_attention = method is not None and method not in _TRAINABLE_ATTENTION
        medvram = bool(getattr(self.sd_model, "lowvram", False))
        undone = moved = False
        try:  # the setup is inside: a failed move (OOM) still gives the attention and devices back
            if undo_attention:
                sd_hijack.undo_optimizations()
                undone = True
            if medvram:
                from modules import lowvram
                lowvram.send_everything_to_cpu()
                moved = True
                for part in self._parts():
                    part.to(devices.device)
            yield
        finally:
            try:
                if moved:
                    from modules import lowvram
                    for part in self._parts():
                        part.to(devices.cpu)
                    lowvram.send_everything_to_cpu()
            finally:
                if undone:
                    sd_hijack.apply_optimizations()

    @contextmanager
    def fp8_weights(self):
        """fp8_base on a model loaded without FP8: the WebUI's own flag, so its samples compute FP8 weights as with
        its FP8 weight setting (devices.autocast: bf16 on a CPU, manual casting for fp32 inference)."""
        from modules import devices

        was = devices.fp8
        devices.fp8 = True
        try:
            yield
        finally:
            devices.fp8 = was

    def _parts(self):
        m = self.sd_model
        parts = [m.model, m.first_stage_model]
        parts.append(m.conditioner if hasattr(m, "conditioner") else m.cond_stage_model)
        return parts

    def interrupted(self) -> bool:
        return bool(shared().state.interrupted)

    # ---- samples with the WebUI's own sampler ------------------------------------------------------------
    def make_sample_fn(self, cfg, folder: str):
        """Samples into ``folder`` (the backend's samples_dir)."""
        from ..train.sampling import config_prompts, prompt_notes

        prompts = config_prompts(cfg)
        if prompts is None:
            return None
        notes = prompt_notes(cfg, prompts)  # (an unknown sampler name stops the job at its start)
        name = cfg.output_name or "lora"
        # the run's clip_skip, as sd-scripts samples with it (A1111 restores its own setting after each picture);
        # SDXL's conditioner has a fixed layer in both
        overrides = {"CLIP_stop_at_last_layers": int(cfg.clip_skip)} if (
            cfg.clip_skip and int(cfg.clip_skip) >= 1 and self.family != "sdxl") else {}

        def sample_fn(epoch: int | None, step: int, should_cancel=None, lora: str | None = None):
            from modules import processing

            from ..train.sampling import sample_tag, save_png, tagged_infotext

            os.makedirs(folder, exist_ok=True)
            tag = sample_tag(epoch, step)
            paths = []
            cpu_rng = torch.get_rng_state()
            try:
                for i, sp in enumerate(prompts):
                    if should_cancel is not None and should_cancel():  # a cancel does not wait for the whole set
                        break
                    p = processing.StableDiffusionProcessingTxt2Img(
                        sd_model=self.sd_model, prompt=sp.prompt, negative_prompt=sp.negative, steps=sp.steps,
                        width=sp.width, height=sp.height, cfg_scale=sp.cfg_scale,
                        seed=sp.seed if sp.seed is not None else -1,
                        do_not_save_grid=True, do_not_save_samples=True, override_settings=dict(overrides),
                        **sampler_fields(sp.sampler or cfg.sample_sampler))
                    res = process_own(p, keep=overrides)  # (the LoRA being trained is attached already)
                    for j, img in enumerate(res.images):
                        path = os.path.join(folder, f"{name}_{tag}_{i:02d}{'_' + str(j) if j else ''}.png")
                        # (A1111's infotext for its PNG Info tab; through a temp file, as on a full disk)
                        text = (getattr(img, "info", None) or {}).get("parameters")
                        # (with the tag of the file saved with these weights: PNG Info -> txt2img renders it)
                        paths.append(save_png(img, path, tagged_infotext(text, sp.prompt, f"<lora:{lora}:1>")
                                              if lora else text))
            finally:
                torch.set_rng_state(cpu_rng)
            return paths

        sample_fn.notes = notes
        return sample_fn
