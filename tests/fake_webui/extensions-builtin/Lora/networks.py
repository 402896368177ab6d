"""Test fake of the built-in Lora's ``networks`` module (A1111 v1.10.1), written from the documented behaviour
(reference §9.4, §9.6):

- ``assign_network_names_to_compvis_modules``: every module of the text encoder(s) and of ``sd_model.model`` gets
  ``network_layer_name`` (its ``named_modules()`` path with ``.`` → ``_``; SDXL embedders prefixed ``{i}_``) and
  ``sd_model.network_layer_mapping`` maps the names back;
- the merge path: the patched ``forward`` of a named layer compares the wanted ``(name, te, unet, dyn)`` tuple built
  from the module-global ``loaded_networks`` with the layer's ``network_current_names``; when they differ it backs
  the weights up to the CPU (first use, only when something is wanted), restores them from that backup and adds
  every loaded network's ΔW in place; the patched ``_load_from_state_dict`` forgets the backups.

Loading is faked: tests put ``network.Network`` objects in ``fake_files``. Only layers with a ``weight`` are merged
(the tests have no MultiheadAttention layers).
"""
import torch

import network  # noqa: F401  (as in the real one, this also puts `network` in sys.modules; tests import it)
from modules import devices

fake_files: "dict[str, network.Network]" = {}  # test hook
loaded_networks = []
available_network_hash_lookup = {}  # shorthash -> NetworkOnDisk, filled as the built-in hashes files
originals = None       # lora_patches.LoraPatches, set by scripts/lora_script.py
extra_network_lora = None


def assign_network_names_to_compvis_modules(sd_model):
    if getattr(sd_model, "is_sdxl", False):
        roots = [(f"{i}_", e.wrapped) for i, e in enumerate(sd_model.conditioner.embedders) if hasattr(e, "wrapped")]
    else:
        text_encoder = sd_model.cond_stage_model
        roots = [("", getattr(text_encoder, "wrapped", text_encoder))]
    roots.append(("", sd_model.model))
    mapping = {}
    for prefix, root in roots:
        for path, module in root.named_modules():
            module.network_layer_name = prefix + path.replace(".", "_")
            mapping[module.network_layer_name] = module
    sd_model.network_layer_mapping = mapping


def load_networks(names, te_multipliers=None, unet_multipliers=None, dyn_dims=None):
    loaded_networks.clear()
    for i, name in enumerate(names):
        net = fake_files.get(name)
        if net is None:
            continue
        net.mentioned_name = name
        net.te_multiplier = te_multipliers[i] if te_multipliers else 1.0
        net.unet_multiplier = unet_multipliers[i] if unet_multipliers else 1.0
        net.dyn_dim = dyn_dims[i] if dyn_dims else None
        loaded_networks.append(net)


def _cpu_copy(t):
    return None if t is None else t.detach().to(devices.cpu, copy=True)


def network_restore_weights_from_backup(self):
    with torch.no_grad():
        for field in ("weight", "bias"):
            backup = getattr(self, f"network_{field}s_backup", None)
            if backup is not None:
                getattr(self, field).copy_(backup)


def network_reset_cached_weight(self):
    self.network_current_names = ()
    self.network_weights_backup = None
    self.network_bias_backup = None


def network_apply_weights(self):
    layer_name = getattr(self, "network_layer_name", None)
    if layer_name is None or getattr(self, "weight", None) is None:
        return
    wanted = tuple((net.name, net.te_multiplier, net.unet_multiplier, net.dyn_dim) for net in loaded_networks)
    if wanted == getattr(self, "network_current_names", ()):
        return
    if wanted and getattr(self, "network_weights_backup", None) is None:
        self.network_weights_backup = _cpu_copy(self.weight)
        self.network_bias_backup = _cpu_copy(getattr(self, "bias", None))
    network_restore_weights_from_backup(self)
    with torch.no_grad():
        for net in loaded_networks:
            module = net.modules.get(layer_name)
            if module is not None:
                delta, _ = module.calc_updown(self.weight)
                self.weight.add_(delta.to(self.weight.dtype))
    self.network_current_names = wanted


def _patched(class_name):
    """The replacement forward / _load_from_state_dict for one torch class; the originals live in ``originals``."""
    def forward(self, *args, **kwargs):
        network_apply_weights(self)
        return originals.original(class_name, "forward")(self, *args, **kwargs)

    def load_state_dict(self, *args, **kwargs):
        network_reset_cached_weight(self)
        return originals.original(class_name, "_load_from_state_dict")(self, *args, **kwargs)

    return forward, load_state_dict


network_Linear_forward, network_Linear_load_state_dict = _patched("Linear")
network_Conv2d_forward, network_Conv2d_load_state_dict = _patched("Conv2d")
network_GroupNorm_forward, network_GroupNorm_load_state_dict = _patched("GroupNorm")
network_LayerNorm_forward, network_LayerNorm_load_state_dict = _patched("LayerNorm")
network_MultiheadAttention_forward, network_MultiheadAttention_load_state_dict = _patched("MultiheadAttention")


def infotext_pasted(infotext, params):
    pass
