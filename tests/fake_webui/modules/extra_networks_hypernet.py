"""Test fake of A1111 v1.10.1 ``modules/extra_networks_hypernet.py``: the default ``hypernet`` extra network
(reference §4.1: ``register_default_extra_networks()`` adds only this one). It does nothing."""
from modules import extra_networks


class ExtraNetworkHypernet(extra_networks.ExtraNetwork):
    def __init__(self):
        super().__init__("hypernet")

    def activate(self, p, params_list):
        pass

    def deactivate(self, p):
        pass
