"""Writes lycoris_targets_reference.json: the modules LyCORIS' own kohya wrapper (``lycoris.kohya.create_network``)
trains on sd-scripts' own UNets, and the tensors it saves for each, per preset and algorithm.

sd-scripts is not installed in CI, so the result is committed. Run with an sd-scripts checkout (its ``library/``)
and lycoris-lora installed::

    python tests/data/lycoris_targets_reference.py /path/to/sd-scripts

The UNets are built on the meta device at full size (SD1.5, SD2 v-model layout, SDXL); only names and shapes are
read. Text encoders are not here: the tests run LyCORIS on the tiny models' own CLIP text encoders directly.

The ia3 preset is run as written with its names anchored as suffixes (``ia3_preset``): LyCORIS 4 matches preset
names with re.match from the start of the module path, so "to_k" finds no layer of a real UNet and the preset as
shipped trains nothing; the suffix form is what its names say (and what its name_algo_map means by ff.net.2).
"""
import json
import logging
import os
import sys

import torch

PRESETS = ("full", "full-lin", "attn-mlp", "attn-only", "unet-only", "unet-transformer-only", "unet-convblock-only")
ALGOS = {"locon": {}, "loha": {}, "lokr": {}, "lokr_f8_both": {"factor": 8, "decompose_both": True},
         "locon_tucker": {"use_tucker": True}, "loha_tucker": {"use_tucker": True}, "lokr_tucker": {"use_tucker": True}}
DIM, ALPHA, CONV_DIM, CONV_ALPHA = 8, 4, 4, 1
# shapes kept where they say something new (LoKr's factorisation depends on the layer sizes); SD2's layers are SD1's
KEEP_TENSORS = {"sd1": set(ALGOS), "sd2": set(), "sdxl": {"lokr", "lokr_f8_both"}}


def unets(root):
    sys.path.insert(0, root)
    from library import original_unet, sdxl_original_unet
    with torch.device("meta"):  # (the LyCORIS modules are made outside: they read sizes with .item())
        return [("sd1", original_unet.UNet2DConditionModel(sample_size=64, attention_head_dim=8,
                                                           cross_attention_dim=768)),
                ("sd2", original_unet.UNet2DConditionModel(sample_size=96, attention_head_dim=[5, 10, 20, 20],
                                                           cross_attention_dim=1024, use_linear_projection=True)),
                ("sdxl", sdxl_original_unet.SdxlUNet2DConditionModel())]


def _without_anima(preset):
    """LyCORIS 4 lists Anima's ``TimestepEmbedding`` class among its full presets' UNet modules. sd-scripts' SD1/SD2
    UNet has a module of that class too (time_embedding), also named in the same presets, so create_network stops
    on a duplicated name there. Without the class the presets are what they were written for SD UNets."""
    from lycoris.config import PRESET
    p = {k: (list(v) if isinstance(v, list) else v) for k, v in PRESET[preset].items()}
    if "TimestepEmbedding" in p.get("unet_target_module", []):
        p["unet_target_module"].remove("TimestepEmbedding")
    PRESET["_ref"] = p
    return "_ref"


def ia3_preset(use: bool = True):
    """LyCORIS' ia3 preset with its names as suffix patterns ("*.to_k"), registered as "_ia3"; ``use=False``
    puts back the class defaults it changes (the wrapper keeps the last preset's settings)."""
    import lycoris.kohya as lk
    from lycoris.config import PRESET
    if not use:
        lk.LycorisNetworkKohya.USE_FNMATCH = False
        lk.LycorisNetworkKohya.NAME_ALGO_MAP = {}
        return None
    p = dict(PRESET["ia3"])
    for key in ("unet_target_name", "text_encoder_target_name"):
        p[key] = ["*." + n for n in p[key]]
    p["name_algo_map"] = {"*." + k: v for k, v in p["name_algo_map"].items()}
    p["use_fnmatch"] = True
    PRESET["_ia3"] = p
    return "_ia3"


def main(root):
    import lycoris.kohya as lk
    logging.disable(logging.WARNING)
    from importlib.metadata import version
    out = {"lycoris": version("lycoris-lora"),
           "dim": DIM, "alpha": ALPHA, "conv_dim": CONV_DIM, "conv_alpha": CONV_ALPHA, "families": {}}
    for family, unet in unets(root):
        fam = out["families"][family] = {"presets": {}, "tensors": {}}
        for preset in PRESETS:
            for algo, extra in ALGOS.items():
                if preset != "full" and algo != "locon":
                    continue
                # the class keeps the last preset: reset to the library default each time
                net = lk.create_network(1.0, DIM, ALPHA, None, None, unet, algo=algo.split("_")[0],
                                        preset=_without_anima(preset),
                                        conv_dim=CONV_DIM, conv_alpha=CONV_ALPHA, **extra)
                if algo == "locon":
                    fam["presets"][preset] = sorted(m.lora_name for m in net.unet_loras)
                if preset == "full" and algo in KEEP_TENSORS[family]:  # (full: locon's layers)
                    fam["tensors"][algo] = {
                        m.lora_name: {k: list(v.shape) for k, v in m.state_dict().items() if k != "scalar"}
                        for m in net.unet_loras}
                    fam["tensors"][algo + ":alpha"] = {m.lora_name: round(m.scale * m.lora_dim, 6)
                                                       for m in net.unet_loras}
        fam["norms"] = {}  # train_norm: the GroupNorm/LayerNorm layers that get a NormModule
        for preset in PRESETS:
            net = lk.create_network(1.0, DIM, ALPHA, None, None, unet, algo="locon", preset=_without_anima(preset),
                                    conv_dim=CONV_DIM, conv_alpha=CONV_ALPHA, train_norm=True)
            fam["norms"][preset] = sorted(m.lora_name for m in net.unet_loras if type(m).__name__ == "NormModule")
        net = lk.create_network(1.0, DIM, ALPHA, None, None, unet, algo="ia3", preset=ia3_preset())
        ia3_preset(False)
        fam["presets"]["ia3"] = sorted(m.lora_name for m in net.unet_loras)
        fam["tensors"]["ia3:on_input"] = {m.lora_name: int(m.on_input) for m in net.unet_loras}
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lycoris_targets_reference.json")
    with open(path, "w") as f:
        json.dump(out, f, separators=(",", ":"), sort_keys=True)
    print("wrote", path, os.path.getsize(path), "bytes")


if __name__ == "__main__":
    main(sys.argv[1])
