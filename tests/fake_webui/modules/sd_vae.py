"""Test fake of A1111 v1.10.1 ``modules/sd_vae.py``: a VAE change leaves the UNet and text encoder alone but
still fires ``on_model_loaded`` for the whole model (reference §2)."""
from modules import script_callbacks


def reload_vae_weights(sd_model=None, vae_file="auto"):
    script_callbacks.model_loaded_callback(sd_model)
    return sd_model
