"""Test fake of the built-in Lora's ``lora_patches.py`` (A1111 v1.10.1, reference §9.6): CLASS-level patches of
``forward`` and ``_load_from_state_dict`` on torch's Linear, Conv2d, GroupNorm, LayerNorm and MultiheadAttention,
for the whole process, with ``networks.network_<Class>_forward`` / ``…_load_state_dict``. ``undo()`` puts the
classes back exactly as they were (the built-in calls it from ``on_script_unloaded``)."""
import torch

import networks

TARGETS = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.GroupNorm, torch.nn.LayerNorm, torch.nn.MultiheadAttention)
REPLACEMENTS = {"forward": "forward", "_load_from_state_dict": "load_state_dict"}  # attribute -> name suffix


class LoraPatches:
    def __init__(self):
        self._originals = {}  # (class name, attribute) -> function to call
        self._undo = []       # (class, attribute, what the class itself defined, or None if it was inherited)
        for cls in TARGETS:
            for attr, suffix in REPLACEMENTS.items():
                self._originals[(cls.__name__, attr)] = getattr(cls, attr)
                self._undo.append((cls, attr, cls.__dict__.get(attr)))
                setattr(cls, attr, getattr(networks, f"network_{cls.__name__}_{suffix}"))

    def original(self, class_name, attr):
        return self._originals[(class_name, attr)]

    def undo(self):
        for cls, attr, own in reversed(self._undo):
            if own is None:
                delattr(cls, attr)
            else:
                setattr(cls, attr, own)
        self._undo = []
