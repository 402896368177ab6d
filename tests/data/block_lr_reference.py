"""Writes block_lr_reference.json: what sd-scripts' own functions in networks/lora.py give for block learning-rate
weights, block ranks and the block index of every UNet LoRA module of the tiny SD1 / SDXL test models (whose
block layout is the full models'). Run with a checkout of kohya-ss/sd-scripts:

    python tests/data/block_lr_reference.py /path/to/sd-scripts

Only the pure-Python functions are taken from that file (parse_block_lr_kwargs, get_block_lr_weight,
get_block_dims_and_alphas, remove_block_dims_and_alphas, get_block_index and the block counts), so no torch,
diffusers or transformers of sd-scripts' own environment is needed. tests/test_train_blocks.py compares
lib_lora.train.blocks with these numbers; it never runs this.
"""
import ast
import json
import logging
import os
import re
import subprocess
import sys
from typing import Dict, List, Optional, Union

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

FUNCS = ("parse_block_lr_kwargs", "get_block_lr_weight", "get_block_dims_and_alphas", "remove_block_dims_and_alphas",
         "get_block_index")


def load_sd_scripts(path: str) -> dict:
    src_path = os.path.join(path, "networks", "lora.py")
    src = open(src_path, encoding="utf-8").read()
    tree = ast.parse(src)
    counts = {}
    body = []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name in FUNCS:
            body.append(node)
        elif isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "RE_UPDOWN" for t in node.targets):
            body.append(node)
        elif isinstance(node, ast.ClassDef) and node.name == "LoRANetwork":
            for item in node.body:
                if isinstance(item, ast.Assign) and "BLOCKS" in getattr(item.targets[0], "id", ""):
                    counts[item.targets[0].id] = ast.literal_eval(item.value)
    ns = {"re": re, "logger": logging.getLogger("sd-scripts"), "Dict": Dict, "List": List, "Optional": Optional,
          "Union": Union, "LoRANetwork": type("LoRANetwork", (), counts)}
    exec(compile(ast.Module(body=body, type_ignores=[]), src_path, "exec"), ns)
    try:
        commit = subprocess.run(["git", "-C", path, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    return ns, commit


def unet_names(family: str) -> list[str]:
    import models
    from lib_lora.train.targets import unet_targets

    m = models.make_sd1() if family == "sd1" else models.make_sdxl()
    return [t.kohya_name for t in unet_targets(m.model.diffusion_model, family, conv=True)]


LR_CASES = [
    {"down_lr_weight": "cosine"}, {"down_lr_weight": "sine", "up_lr_weight": "linear"},
    {"up_lr_weight": "reverse_linear+.25", "mid_lr_weight": "0.5"}, {"down_lr_weight": "zeros+0.1"},
    {"down_lr_weight": "1,0.5,,0.25", "block_lr_zero_threshold": "0.3"},
    # (a too-long up list alone crashes sd-scripts: it truncates down_lr_weight too, which is None then)
    {"down_lr_weight": "cosine", "up_lr_weight": "1,1,1,1,1,1,1,1,1,1,1,1,1,1,1", "mid_lr_weight": "0,2,3,4"},
    {"mid_lr_weight": "0"},
]


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    ns, commit = load_sd_scripts(sys.argv[1])
    out = {"sd_scripts_commit": commit, "families": {}}
    for family, is_sdxl in (("sd1", False), ("sdxl", True)):
        names = unet_names(family)
        lr = [ns["parse_block_lr_kwargs"](is_sdxl, dict(c)) for c in LR_CASES]
        dims = []
        for case in ({"block_dims": None, "lr": 2, "conv_dim": None}, {"block_dims": "dims", "lr": None, "conv_dim": 4},
                     {"block_dims": "dims", "lr": 6, "conv_dim": None, "conv_block": True}):
            n = 23 if is_sdxl else 25
            bd = ",".join(str(1 + i % 5) for i in range(n)) if case["block_dims"] else None
            ba = ",".join(str(0.5 * (1 + i % 3)) for i in range(n)) if case["block_dims"] else None
            cbd = ",".join(str(i % 3) for i in range(n)) if case.get("conv_block") else None
            d = ns["get_block_dims_and_alphas"](is_sdxl, bd, ba, 8, 4.0, cbd, None, case["conv_dim"],
                                                2.0 if case["conv_dim"] else None)
            w = lr[case["lr"]] if case["lr"] is not None else None
            d = ns["remove_block_dims_and_alphas"](is_sdxl, *d, w)
            dims.append({"args": {k: v for k, v in (("block_dims", bd), ("block_alphas", ba),
                                                    ("conv_block_dims", cbd)) if v is not None},
                         "network_dim": 8, "network_alpha": 4.0, "conv_dim": case["conv_dim"],
                         "conv_alpha": 2.0 if case["conv_dim"] else None, "lr_case": case["lr"],
                         "result": [list(x) if x is not None else None for x in d]})
        out["families"][family] = {
            "block_index": {n: ns["get_block_index"](n, is_sdxl) for n in names},
            "lr_cases": [{"args": c, "weights": w} for c, w in zip(LR_CASES, lr)],
            "dim_cases": dims,
        }
    path = os.path.join(HERE, "block_lr_reference.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(out, f, indent=0)
    print(path)


if __name__ == "__main__":
    main()
