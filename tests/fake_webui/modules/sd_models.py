"""Test fake of A1111 v1.10.1 ``modules/sd_models.py``, written from the documented behaviour (reference §2,
§4.3, §6.1): ``model_data.sd_model`` is None until a model is loaded; ``load_model`` fires ``on_model_loaded`` and
then runs the empty-prompt conditioning, which calls ``extra_networks.activate(p, {})`` with ``p.scripts=None``;
``reload_model_weights`` with the same config loads weights into the same modules (``load_state_dict``) and fires
``on_model_loaded`` again. A "load" is whatever the test puts in ``model_data.loader``; a state dict passed as
``info`` stands for a checkpoint."""
from modules import extra_networks, processing, script_callbacks


class SdModelData:
    def __init__(self):
        self.sd_model = None
        self.loader = None  # test hook: () -> model
        self.chosen = None  # test hook: a state dict standing for a checkpoint picked in the settings, not loaded
        self.was_loaded_at_least_once = False

    def get_sd_model(self):
        if self.sd_model is None and not self.was_loaded_at_least_once and self.loader is not None:
            load_model()
        return self.sd_model

    def set_sd_model(self, v, already_loaded=False):
        self.sd_model = v


model_data = SdModelData()


def get_empty_cond(sd_model):
    extra_networks.activate(processing.StableDiffusionProcessingTxt2Img(), {})


def load_model(checkpoint_info=None, already_loaded_state_dict=None):
    if model_data.sd_model is not None:
        model_data.sd_model.to(device="meta")  # the replaced model is unloaded
    sd_model = model_data.loader()
    model_data.set_sd_model(sd_model)
    model_data.was_loaded_at_least_once = True
    script_callbacks.model_loaded_callback(sd_model)
    get_empty_cond(sd_model)
    return sd_model


def reload_model_weights(sd_model=None, info=None, forced_reload=False):
    sd_model = sd_model or model_data.sd_model
    if isinstance(info, dict):
        sd_model.load_state_dict(info, strict=False)
    script_callbacks.model_loaded_callback(sd_model)
    model_data.set_sd_model(sd_model)
    return sd_model
