"""Test fake of A1111 v1.10.1 ``modules/initialize.py``: the part of ``initialize_rest`` that matters here, in the
documented order (reference §1.5): load the scripts (their module-level code runs), then re-initialise the card
pages and the extra-network registries, which CLEARS what scripts registered at import time, then add the
defaults (``hypernet``)."""
from modules import extra_networks, scripts, ui_extra_networks


def initialize_rest(extension_roots, *, reload_script_modules=False):
    scripts.load_scripts(extension_roots)
    ui_extra_networks.initialize()
    ui_extra_networks.register_default_pages()
    extra_networks.initialize()
    extra_networks.register_default_extra_networks()
