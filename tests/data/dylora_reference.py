"""Writes dylora_reference.safetensors: what sd-scripts' own DyLoRAModule (networks/dylora.py) does on three layers,
for the tests of networks.dylora training (tests/test_train_dylora.py).

sd-scripts is not installed in CI, so the result is committed. Run with an sd-scripts checkout::

    python tests/data/dylora_reference.py /path/to/sd-scripts

For each layer (Linear 24->40, Conv2d 16->32 3x3 stride 2, Conv2d 16->48 1x1) and unit (1, 2), rank 4, alpha 2:
the module made after ``torch.manual_seed(11)`` (its start), lora_B then set to random values (so lora_A gets
gradients), ``random.seed(123)`` (the module draws its trained rank with Python's ``random``), and four AdamW
steps (lr 0.05, weight_decay 0.1, ``zero_grad(set_to_none=True)`` as sd-scripts' train_network does) on the loss
sum(y·cos(y)) of fixed inputs. Saved: the start, the random lora_B, the inputs, each step's output and trained
rank, and the tensors after the last step, under kohya's names (lora_down / lora_up: the rows concatenated, as the
module's own state_dict writes them).
"""
import os
import random
import sys

import torch
import torch.nn as nn

LAYERS = {
    "linear": lambda: nn.Linear(24, 40),
    "conv3_stride2": lambda: nn.Conv2d(16, 32, 3, stride=2, padding=1),
    "conv1x1": lambda: nn.Conv2d(16, 48, 1),
}
DIM, ALPHA, STEPS = 4, 2.0, 4


def module_class(root):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from sd_scripts_module import load
    return load(root, "dylora").DyLoRAModule


def main(root):
    DyLoRAModule = module_class(root)
    out = {}
    for layer_name, make in LAYERS.items():
        for unit in (1, 2):
            key = f"{layer_name}.unit{unit}"
            torch.manual_seed(0)
            layer = make()
            out[f"{key}.layer_weight"] = layer.weight.detach().clone()
            out[f"{key}.layer_bias"] = layer.bias.detach().clone()
            torch.manual_seed(11)
            m = DyLoRAModule("x", layer, 1.0, DIM, ALPHA, unit)
            sd = m.state_dict()
            out[f"{key}.start.lora_down.weight"] = sd["x.lora_down.weight"].clone()
            out[f"{key}.start.lora_up.weight"] = sd["x.lora_up.weight"].clone()
            g = torch.Generator().manual_seed(5)
            with torch.no_grad():
                for b in m.lora_B:
                    b.copy_(torch.randn(b.shape, generator=g) * 0.2)
            out[f"{key}.random.lora_up.weight"] = m.state_dict()["x.lora_up.weight"].clone()
            m.apply_to()
            opt = torch.optim.AdamW(m.parameters(), lr=0.05, weight_decay=0.1)
            random.seed(123)
            ranks = []
            for step in range(STEPS):
                x = (torch.randn((3, 7, 24), generator=g) if layer_name == "linear"
                     else torch.randn((2, 16, 9, 9), generator=g))
                y = layer(x)
                ranks.append(next(i for i, a in enumerate(m.lora_A) if a.requires_grad))
                opt.zero_grad(set_to_none=True)
                (y * y.detach().cos()).sum().backward()
                opt.step()
                out[f"{key}.x{step}"] = x
                out[f"{key}.y{step}"] = y.detach().clone()
            out[f"{key}.ranks"] = torch.tensor(ranks)
            sd = m.state_dict()
            out[f"{key}.end.lora_down.weight"] = sd["x.lora_down.weight"].clone()
            out[f"{key}.end.lora_up.weight"] = sd["x.lora_up.weight"].clone()
    from safetensors.torch import save_file
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dylora_reference.safetensors")
    save_file({k: v.contiguous() for k, v in out.items()}, path)
    print(path, len(out), "tensors")


if __name__ == "__main__":
    main(sys.argv[1])
