"""Test fake of A1111 v1.10.1 ``modules/processing.py``, written from the documented order of a job (reference
§1.4, §4.2, §4.3): ``before_process``, prompts, ``process``; then per batch ``before_process_batch``, tag parsing
(``p.prompts`` stripped, ``p.all_prompts`` untouched), ``extra_networks.activate`` (unless
``disable_extra_networks``), ``process_batch``, sampling, and with hires fix a second activation with the hires
prompt's tags while ``p.is_hr_pass`` is True; finally ``deactivate`` with the last batch's data, only if it is
non-empty. Sampling is whatever the test passes as ``sample(p)``; ``Processed.images`` holds what it returned, or
one blank ``width`` x ``height`` image per prompt when it returned nothing. ``close()`` only marks ``p.closed``."""
import torch
from PIL import Image

from modules import devices, extra_networks


class StableDiffusionProcessing:
    cached_uc = [None, None]  # A1111's cond cache: (cache key, conditioning), shared by every job
    cached_c = [None, None]

    def __init__(self, prompt="", negative_prompt="", n_iter=1, batch_size=1, disable_extra_networks=False,
                 enable_hr=False, hr_prompt="", extra_generation_params=None, override_settings=None,
                 sd_model=None, seed=-1, steps=50, width=512, height=512, cfg_scale=7.0, sampler_name=None,
                 scheduler=None, do_not_save_grid=False, do_not_save_samples=False):
        self.sd_model = sd_model
        self.seed = seed
        self.steps = steps
        self.width = width
        self.height = height
        self.cfg_scale = cfg_scale
        self.sampler_name = sampler_name
        self.scheduler = scheduler
        self.do_not_save_grid = do_not_save_grid
        self.do_not_save_samples = do_not_save_samples
        self.closed = False
        self.prompt = prompt
        self.negative_prompt = negative_prompt
        self.n_iter = n_iter
        self.batch_size = batch_size
        self.disable_extra_networks = disable_extra_networks
        self.enable_hr = enable_hr
        self.hr_prompt = hr_prompt
        self.extra_generation_params = extra_generation_params or {}
        self.override_settings = override_settings or {}
        self.comments = {}
        self.scripts = None
        self.script_args = []
        self.all_prompts = None
        self.all_hr_prompts = None
        self.prompts = None
        self.extra_network_data = None
        self.hr_extra_network_data = None
        self.is_hr_pass = False
        self.iteration = 0
        self.seeds = []
        self.subseeds = []
        self.cached_uc = StableDiffusionProcessing.cached_uc
        self.cached_c = StableDiffusionProcessing.cached_c

    def comment(self, text):
        self.comments[text] = 1

    def close(self):
        self.closed = True

    def setup_prompts(self):
        self.all_prompts = [self.prompt] * (self.n_iter * self.batch_size)
        if self.enable_hr:
            self.all_hr_prompts = [self.hr_prompt or self.prompt] * (self.n_iter * self.batch_size)

    def parse_extra_network_prompts(self):
        self.prompts, self.extra_network_data = extra_networks.parse_prompts(self.prompts)


class StableDiffusionProcessingTxt2Img(StableDiffusionProcessing):
    cached_hr_uc = [None, None]
    cached_hr_c = [None, None]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.cached_hr_uc = StableDiffusionProcessingTxt2Img.cached_hr_uc
        self.cached_hr_c = StableDiffusionProcessingTxt2Img.cached_hr_c


class Processed:
    def __init__(self, p, images=None):
        self.images = images if images is not None else [
            Image.new("RGB", (int(p.width), int(p.height))) for _ in p.all_prompts]
        for img in self.images:  # (A1111 with its default enable_pnginfo: the infotext rides on the picture)
            if isinstance(img, Image.Image):
                img.info["parameters"] = (f"{p.prompt}\nSteps: {p.steps}, Sampler: {p.sampler_name}, Schedule type: "
                                          f"{p.scheduler}, Seed: {p.seed}")
        self.all_prompts = p.all_prompts
        self.comments = "".join(f"{text}\n" for text in p.comments)
        self.extra_generation_params = p.extra_generation_params


def process_images(p, sample=None):
    """A1111's override_settings handling: set for the picture, put back afterwards, but only the options that
    were in opts.data (config.json) before: one left at its default stays changed (A1111 1.10.1's own way)."""
    from modules import shared
    opts = shared.opts
    stored = {k: opts.data[k] for k in p.override_settings if k in opts.data}
    try:
        for k, v in p.override_settings.items():
            opts.set(k, v, is_api=True, run_callbacks=False)
        return _process_images(p, sample)
    finally:
        for k, v in stored.items():
            opts.data[k] = v


def _process_images(p, sample=None):
    def hook(name, **kwargs):
        if p.scripts is not None:
            getattr(p.scripts, name)(p, **kwargs)

    def activate(data):
        if not p.disable_extra_networks:
            extra_networks.activate(p, data)

    from modules import sd_models, sd_samplers
    sd_samplers.fix_p_invalid_sampler_and_scheduler(p)
    if sd_models.model_data.chosen is not None:  # (A1111: the checkpoint setting differs from the loaded model)
        sd_models.reload_model_weights(info=sd_models.model_data.chosen)
    images = []
    hook("before_process")
    p.setup_prompts()
    hook("process")
    for n in range(p.n_iter):
        p.iteration = n
        p.prompts = p.all_prompts[n * p.batch_size:(n + 1) * p.batch_size]
        batch = dict(batch_number=n, prompts=p.prompts, seeds=p.seeds, subseeds=p.subseeds)
        hook("before_process_batch", **batch)
        p.parse_extra_network_prompts()
        activate(p.extra_network_data)
        hook("process_batch", **batch)
        from modules import shared
        shared.total_tqdm.update()  # (A1111's samplers, once per step)
        if sample is not None:
            images += sample(p) or []
            if images and isinstance(images[-1], torch.Tensor):
                devices.test_for_nans(images[-1], "unet")  # (processing.py checks the samples so)
        if p.enable_hr:
            _, p.hr_extra_network_data = extra_networks.parse_prompts(
                p.all_hr_prompts[n * p.batch_size:(n + 1) * p.batch_size])
            p.is_hr_pass = True
            activate(p.hr_extra_network_data)
            if sample is not None:
                sample(p)
            p.is_hr_pass = False
    if p.extra_network_data and not p.disable_extra_networks:
        extra_networks.deactivate(p, p.extra_network_data)
    return Processed(p, images or None)
