"""Writes lycoris_targets_reference.json: the modules LyCORIS' own kohya wrapper (``lycoris.kohya.create_network``)
trains on sd-scripts' own UNets, and the tensors it saves for each, per preset and algorithm.

sd-scripts is not installed in CI, so the result is committed. Run with an sd-scripts checkout (its ``library/``)
and lycoris-lora installed::

    python tests/data/lycoris_targets_reference.py /path/to/sd-scripts

The UNets are built on the meta device at full size (SD1.5, SD2 v-model layout, SDXL); only names and shapes are
read. Text encoders are not here: the tests run LyCORIS on the tiny models' own CLIP text encoders directly.
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
                if preset == "full" and algo in KEEP_TENSORS[family]:
                    fam["tensors"][algo] = {
                        m.lora_name: {k: list(v.shape) for k, v in m.state_dict().items() if k != "scalar"}
                        for m in net.unet_loras}
                    fam["tensors"][algo + ":alpha"] = {m.lora_name: round(m.scale * m.lora_dim, 6)
                                                       for m in net.unet_loras}
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lycoris_targets_reference.json")
    with open(path, "w") as f:
        json.dump(out, f, separators=(",", ":"), sort_keys=True)
    print("wrote", path, os.path.getsize(path), "bytes")


if __name__ == "__main__":
    main(sys.argv[1])
