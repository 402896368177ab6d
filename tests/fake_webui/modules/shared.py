"""Test fake of A1111 v1.10.1 ``modules/shared.py`` (reference §3, §6.1, §7): ``cmd_opts``, ``opts`` over
``options_templates``, ``OptionInfo``/``options_section``, ``state`` (the job state), and ``sd_model`` as a module
property that loads the model on first access. Tests that must not trigger a load look at
``sd_models.model_data.sd_model`` instead."""
import sys

from modules import options, shared_cmd_options, shared_state

cmd_opts = shared_cmd_options.cmd_opts
state = shared_state.State()  # the real one is created by shared_init.initialize() at startup
OptionInfo = options.OptionInfo
options_section = options.options_section

# The few WebUI settings LoRA Studio and the fakes read.
options_templates = {}
options_templates.update(options_section(("saving-images", "Saving images", "saving"), {
    "samples_format": OptionInfo("png", "Image file format"),
}))
options_templates.update(options_section(("system", "System", "system"), {
    "list_hidden_files": OptionInfo(True, "List files inside hidden folders"),
}))
options_templates.update(options_section(("sd", "Stable Diffusion", "sd"), {
    "CLIP_stop_at_last_layers": OptionInfo(1, "Clip skip"),
}))
options_templates.update(options_section(("extra_networks", "Extra Networks", "sd"), {
    "extra_networks_default_multiplier": OptionInfo(1.0, "Weight cards insert by default"),
}))

opts = options.Options(options_templates, set())


class _TotalTQDM:
    """A1111's console "Total progress" bar (shared_total_tqdm.TotalTQDM): each sampling step updates it, and
    txt2img/img2img clear it after their images; ``open`` says whether a bar is left counting."""
    def __init__(self):
        self.open = False

    def update(self):
        self.open = True

    def updateTotal(self, new_total):
        pass

    def clear(self):
        self.open = False


total_tqdm = _TotalTQDM()  # (created by shared_init.initialize() at startup)


class _SharedModule(type(sys.modules[__name__])):
    @property
    def sd_model(self):
        from modules import sd_models
        return sd_models.model_data.get_sd_model()

    @sd_model.setter
    def sd_model(self, value):
        from modules import sd_models
        sd_models.model_data.set_sd_model(value)


sys.modules[__name__].__class__ = _SharedModule
