"""Learning, not just running: the loss on the concept falls a lot; the class loss does not get worse.

The tiny model has random weights, so it is bad at denoising anything and a LoRA trained with regularisation
images also gets better on other class images: the band for the held-out class set is therefore one-sided
(it may improve, it must not get worse). Loss is measured at fixed timesteps and fixed noise.
"""

import numpy as np
import torch

import models
import train_data
from lib_lora.formats.safetensors_io import load_tensors
from lib_lora.host.base import ModelHost
from lib_lora.train.conditioning import TextEncoder
from lib_lora.train.config import parse_train_config
from lib_lora.train.lora_net import LoRANetwork
from lib_lora.train.loss import NoiseSchedule
from lib_lora.train.run import run_training


def _loss(model, net, images, caption):
    te = TextEncoder(model, "sd1")
    sch = NoiseSchedule(model.alphas_cumprod, "eps")
    ctx = te.encode(te.tokenize([caption])[0], "cpu")["crossattn"]
    unet = model.model.diffusion_model
    out = []
    with torch.no_grad(), (net.attached() if net is not None else torch.no_grad()):
        for k, im in enumerate(images):
            x = torch.from_numpy(np.asarray(im)).permute(2, 0, 1)[None].float() / 127.5 - 1
            z = model.first_stage_model.encode(x).mode() * model.scale_factor
            g = torch.Generator().manual_seed(1000 + k)
            for t in (100, 300, 500, 700, 900):
                n = torch.randn(z.shape, generator=g)
                tt = torch.tensor([t])
                out.append(((unet(sch.add_noise(z, n, tt), tt, context=ctx) - n) ** 2).mean().item())
    return float(np.mean(out))


def test_concept_loss_falls_and_class_loss_holds(tmp_path):
    model = models.make_sd1(seed=0)
    img, reg = train_data.make_dataset(str(tmp_path), n_concept=4, repeats=5, n_reg=8)
    cfg = {"train_data_dir": img, "reg_data_dir": reg, "resolution": 64, "train_batch_size": 2,
           "output_dir": str(tmp_path / "out"), "output_name": "c", "network_dim": 8, "network_alpha": 8,
           "learning_rate": 2e-3, "text_encoder_lr": 0, "max_train_epochs": 2, "seed": 1, "save_precision": "float"}
    res = run_training(ModelHost(model, "tiny"), parse_train_config(cfg))
    net = LoRANetwork(model, "sd1", dim=8, alpha=8, train_text_encoder=False)
    assert not net.load_kohya_state_dict(load_tensors(res.final))
    concept = [train_data.concept_image(i) for i in range(4)]
    held_out = [train_data.class_image(500 + i) for i in range(6)]  # never seen in training
    c0, c1 = _loss(model, None, concept, "svs cat"), _loss(model, net, concept, "svs cat")
    h0, h1 = _loss(model, None, held_out, "cat"), _loss(model, net, held_out, "cat")
    assert c1 < 0.6 * c0, (c0, c1)          # a large margin: at least 40% lower
    assert h1 < 1.05 * h0, (h0, h1)          # the class does not get worse
