"""Writes kohya_oft_reference.safetensors: what sd-scripts' own OFTModule (networks/oft.py) does on three layers, for
the tests of networks.oft training (tests/test_train_kohya_oft.py).

sd-scripts is not installed in CI, so the result is committed. Run with an sd-scripts checkout::

    python tests/data/kohya_oft_reference.py /path/to/sd-scripts

For each layer (Linear 24->40 in 4 blocks, Conv2d 16->32 3x3 stride 2 in 4 blocks, Conv2d 16->48 1x1 in 8 blocks),
each constraint (network_alpha 1e-3: the norm cap bites; 10: it does not) and multiplier (1, 0.7): oft_blocks set
to random values, the module's output for a fixed input and the gradient of sum(y·cos(y)) with respect to
oft_blocks.
"""
import os
import sys

import torch
import torch.nn as nn

LAYERS = {
    "linear": (lambda: nn.Linear(24, 40), 4),
    "conv3_stride2": (lambda: nn.Conv2d(16, 32, 3, stride=2, padding=1), 4),
    "conv1x1": (lambda: nn.Conv2d(16, 48, 1), 8),
}


def module_class(root):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from sd_scripts_module import load
    return load(root, "oft").OFTModule


def main(root):
    OFTModule = module_class(root)
    out = {}
    for layer_name, (make, blocks) in LAYERS.items():
        for alpha in (1e-3, 10.0):
            for multiplier in (1.0, 0.7):
                key = f"{layer_name}.a{alpha:g}.m{multiplier:g}"
                torch.manual_seed(0)
                layer = make()
                m = OFTModule("x", layer, multiplier, blocks, alpha)
                g = torch.Generator().manual_seed(5)
                with torch.no_grad():
                    m.oft_blocks.copy_(torch.randn(m.oft_blocks.shape, generator=g) * 0.2)
                m.apply_to()
                x = (torch.randn((3, 7, 24), generator=g) if layer_name == "linear"
                     else torch.randn((2, 16, 9, 9), generator=g))
                y = layer(x)
                (y * y.detach().cos()).sum().backward()
                out[f"{layer_name}.layer_weight"] = layer.weight.detach().clone()  # (the same in every case)
                out[f"{layer_name}.layer_bias"] = layer.bias.detach().clone()
                out[f"{layer_name}.x"] = x
                out[f"{key}.oft_blocks"] = m.oft_blocks.detach().clone()
                out[f"{key}.y"] = y.detach().clone()
                out[f"{key}.grad"] = m.oft_blocks.grad.clone()
    from safetensors.torch import save_file
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kohya_oft_reference.safetensors")
    save_file({k: v.contiguous() for k, v in out.items()}, path)
    print(path, len(out), "tensors")


if __name__ == "__main__":
    main(sys.argv[1])
