"""Test fake of the built-in Lora's ``extra_networks_lora.py`` (A1111 v1.10.1, reference §9.3): the ``lora``
extra network. ``<lora:NAME[:TE[:UNET[:DYN]]]>`` or ``te=``/``unet=``/``dyn=``; TE defaults to 1.0, UNET to TE,
DYN to None; ``activate`` hands the lists to ``networks.load_networks``; ``deactivate`` does nothing."""
import networks
from modules import extra_networks


class ExtraNetworkLora(extra_networks.ExtraNetwork):
    def __init__(self):
        super().__init__("lora")

    def activate(self, p, params_list):
        names, te, unet, dyn = [], [], [], []
        for params in params_list:
            args = params.positional
            te_value = float(params.named.get("te", args[1] if len(args) > 1 else 1.0))
            names.append(args[0])
            te.append(te_value)
            unet.append(float(params.named.get("unet", args[2] if len(args) > 2 else te_value)))
            dyn_value = params.named.get("dyn", args[3] if len(args) > 3 else None)
            dyn.append(None if dyn_value is None else int(dyn_value))
        networks.load_networks(names, te, unet, dyn)

    def deactivate(self, p):
        pass
