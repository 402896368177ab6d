"""Test fake of the built-in Lora's ``network.py`` (A1111 v1.10.1, reference §9.2/§9.5): a ``Network`` holds
per-layer modules and the multipliers it was activated with. ``FixedDeltaModule`` is the test's stand-in for a
network module: its ΔW is a given tensor times the UNet multiplier."""


class Network:
    def __init__(self, name, network_on_disk=None):
        self.name = name
        self.network_on_disk = network_on_disk
        self.te_multiplier = 1.0
        self.unet_multiplier = 1.0
        self.dyn_dim = None
        self.modules = {}  # layer name -> module with calc_updown(weight) -> (delta, extra bias)
        self.mentioned_name = None


class FixedDeltaModule:
    def __init__(self, net, delta):
        self.network = net
        self.delta = delta

    def calc_updown(self, target):
        return self.delta.to(target.device, dtype=target.dtype) * self.network.unet_multiplier, None
