"""Writes lycoris_preset_reference.json.gz: what LyCORIS' kohya wrapper (``lycoris.kohya.create_network`` with
``preset=<file>.toml``) trains on sd-scripts' own SD1 / SD2 / SDXL UNets for a set of preset files, and the
module tree (path, class) those presets are matched against.

sd-scripts is not installed in CI, so the result is committed. Run with an sd-scripts checkout (its ``library/``)
and lycoris-lora installed::

    python tests/data/lycoris_preset_reference.py /path/to/sd-scripts

The presets never name a class inside another named class: LyCORIS stops with "duplicated lora name" there (the
test checks our union separately). What a file leaves out takes the wrapper's defaults, less Anima's
``TimestepEmbedding`` class (sd-scripts' SD1/SD2 UNet has one, which the default names pick again: LyCORIS stops
on the duplicate; lycoris_targets_reference.py says more). Nor do they name the model's own class: LyCORIS then
writes keys with a doubled underscore ("lora_unet__conv_in") that no loader maps.
"""
import gzip
import json
import logging
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lycoris_targets_reference import unets  # noqa: E402

DIM, ALPHA, CONV_DIM, CONV_ALPHA = 8, 4, 4, 1
# (the class names of both trees are listed where a preset means "these blocks" on every family)
PRESETS = {
    "attention_class": {"unet_target_module": ["CrossAttention"], "unet_target_name": []},
    "block_classes": {"unet_target_module": ["CrossAttnDownBlock2D", "UNetMidBlock2DCrossAttn", "Downsample2D"],
                      "unet_target_name": ["conv_out", "out\\.2"], "enable_conv": False},
    "regex_names": {"unet_target_module": [],
                    "unet_target_name": ["down_blocks\\.1\\..*", ".*attn2\\.to_[kv]$", "mid_block\\.resnets\\.0\\.conv1",
                                         "input_blocks\\.[45]\\..*", "middle_block\\.0\\.in_layers\\.2",
                                         "time_embed"]},
    "fnmatch_exclude": {"use_fnmatch": True, "unet_target_module": ["Transformer2DModel", "ResnetBlock2D"],
                        "unet_target_name": ["up_blocks.3.*", "output_blocks.8.*"],
                        "exclude_name": ["*.ff.net.*", "down_blocks.0.*", "input_blocks.1.*", "*.proj_in"]},
    "regex_exclude_no_conv": {"unet_target_module": ["ResnetBlock2D", "FeedForward", "Upsample2D"],
                              "exclude_name": ["up_blocks\\.1\\.", ".*time_emb_proj", "output_blocks\\.2\\.1\\.conv"],
                              "enable_conv": False},
    "defaults": {},
    "leaf_classes": {"unet_target_module": ["GEGLU", "Conv2d"], "unet_target_name": ["conv_in", "input_blocks\\.0\\.0"]},
    "linear_class": {"unet_target_module": ["Linear"], "unet_target_name": []},
}
# module_algo_map / name_algo_map (the same algorithm as the network, other ranks, alphas and LoKr factors): the
# first is the layout of Kohaku-XL-Delta's published lyco_config.toml (full-rank LoKr, factor per class). Patterns
# as map keys are TOML literal strings ('a\.b'): LyCORIS reads presets with the toml package, which keeps the
# backslashes of a quoted key in double quotes ("a\\.b" stays a\\.b, matching nothing), where TOML and Python's
# tomllib give a\.b
MAP_PRESETS = {
    "lokr_full_rank": ("lokr", r"""enable_conv = true
unet_target_module = ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"]
unet_target_name = [".*time_embed\\..+", ".*label_emb\\..+", ".*input_blocks\\.0.+", "^out\\..+", "conv_in",
                    "conv_out", "time_embedding\\..+"]
[module_algo_map]
[module_algo_map.CrossAttention]
algo = "lokr"
dim = 10000
alpha = 10000
factor = 4
[module_algo_map.FeedForward]
algo = "lokr"
dim = 10000
alpha = 10000
factor = 2
"""),
    "locon_ranks": ("locon", r"""enable_conv = false
unet_target_module = ["Transformer2DModel", "ResnetBlock2D"]
unet_target_name = ["conv_in", "input_blocks\\.0\\.0", "down_blocks\\.1\\.downsamplers\\.0\\.conv",
                    "input_blocks\\.6\\.0\\.op", "mid_block\\.resnets\\.0\\.conv1", "middle_block\\.0\\.in_layers\\.2"]
[module_algo_map.ResnetBlock2D]
dim = 2
alpha = 1
[module_algo_map.CrossAttention]
dim = 6
[name_algo_map.'down_blocks\.1\.downsamplers\.0\.conv']
dim = 3
alpha = 3
[name_algo_map.'input_blocks\.6\.0\.op']
dim = 3
alpha = 3
"""),
    "lokr_factors": ("lokr", r"""unet_target_module = ["Transformer2DModel", "Upsample2D"]
unet_target_name = ["output_blocks\\.[0-5]\\.0\\..*", "up_blocks\\.[01]\\.resnets\\..*"]
[module_algo_map.ResnetBlock2D]
factor = 8
decompose_both = true
[module_algo_map.GEGLU]
dim = 2
[module_algo_map.CrossAttention]
factor = 2
full_matrix = true
[name_algo_map.'output_blocks\.[0-2]\..*']
factor = 4
[name_algo_map.'up_blocks\.0\..*']
factor = 4
dim = 4
"""),
}
NORM_PRESETS = ("fnmatch_exclude", "defaults")  # also run with train_norm=True
KEEP_CLASSES = {"Linear", "Conv2d", "GroupNorm", "GroupNorm32", "LayerNorm", "Transformer2DModel",
                "BasicTransformerBlock", "CrossAttention", "FeedForward", "GEGLU", "ResnetBlock2D", "Downsample2D",
                "Upsample2D", "TimestepEmbedding", "CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnUpBlock2D",
                "UpBlock2D", "UNetMidBlock2DCrossAttn", "UNet2DConditionModel", "SdxlUNet2DConditionModel"}


def _toml(preset: dict) -> str:
    def val(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        return "[" + ", ".join(json.dumps(s) for s in v) + "]"
    return "".join(f"{k} = {val(v)}\n" for k, v in preset.items())


def main(root):
    import lycoris.kohya as lk
    logging.disable(logging.WARNING)
    from importlib.metadata import version
    cls = lk.LycorisNetworkKohya
    defaults = {k: getattr(cls, k) for k in ("ENABLE_CONV", "UNET_TARGET_REPLACE_MODULE", "UNET_TARGET_REPLACE_NAME",
                                              "MODULE_ALGO_MAP", "NAME_ALGO_MAP", "USE_FNMATCH",
                                              "TARGET_EXCLUDE_NAME")}
    defaults["UNET_TARGET_REPLACE_MODULE"] = [m for m in defaults["UNET_TARGET_REPLACE_MODULE"]
                                              if m != "TimestepEmbedding"]
    out = {"lycoris": version("lycoris-lora"), "dim": DIM, "conv_dim": CONV_DIM, "presets": PRESETS,
           "families": {}}
    tmp = tempfile.mkdtemp()
    for family, unet in unets(root):
        fam = out["families"][family] = {
            "tree": [[n, type(m).__name__] for n, m in unet.named_modules() if type(m).__name__ in KEEP_CLASSES],
            "picked": {}, "picked_norms": {}}
        for name, preset in PRESETS.items():
            path = os.path.join(tmp, name + ".toml")
            with open(path, "w") as f:
                f.write(_toml(preset))
            for train_norm in (False, True):
                if train_norm and name not in NORM_PRESETS:
                    continue
                for k, v in defaults.items():  # (the class keeps what the last preset set)
                    setattr(cls, k, v)
                net = lk.create_network(1.0, DIM, ALPHA, None, None, unet, algo="locon", preset=path,
                                        conv_dim=CONV_DIM, conv_alpha=CONV_ALPHA, train_norm=train_norm)
                # (as indices into the module list, to keep the file small)
                index = {"lora_unet_" + n.replace(".", "_"): i for i, (n, _) in enumerate(fam["tree"])}
                (fam["picked_norms"] if train_norm else fam["picked"])[name] = sorted(index[m.lora_name]
                                                                                       for m in net.unet_loras)
        fam["maps"] = {}  # per preset: {index: [scale, {tensor: shape}]}
        for name, (algo, text) in MAP_PRESETS.items():
            path = os.path.join(tmp, name + ".toml")
            with open(path, "w") as f:
                f.write(text)
            for k, v in defaults.items():
                setattr(cls, k, v)
            net = lk.create_network(1.0, DIM, ALPHA, None, None, unet, algo=algo, preset=path,
                                    conv_dim=CONV_DIM, conv_alpha=CONV_ALPHA)
            index = {"lora_unet_" + n.replace(".", "_"): i for i, (n, _) in enumerate(fam["tree"])}
            fam["maps"][name] = {index[m.lora_name]: [round(float(m.scale), 6),
                                                      {k: list(v.shape) for k, v in m.state_dict().items()
                                                       if k != "scalar"}] for m in net.unet_loras}
    out["map_presets"] = MAP_PRESETS
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lycoris_preset_reference.json.gz")
    with gzip.open(path, "wt") as f:
        json.dump(out, f, separators=(",", ":"), sort_keys=True)
    print("wrote", path, os.path.getsize(path), "bytes")


if __name__ == "__main__":
    torch.manual_seed(0)
    main(sys.argv[1])
