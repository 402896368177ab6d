"""Learning, not just running (loss measured at fixed timesteps and fixed noise).

1. On the random tiny model the concept loss falls by a large margin and the class loss does not get worse (a
   random base also gets better at denoising class images, so that band is one-sided there).
2. On a base first fine-tuned on the class, regularisation holds the held-out class loss within a small two-sided
   band, while the same run without regularisation lets it drift, and the concept loss still falls.
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


def _class_image(seed):
    """A 'class' that a tiny base can learn quickly: one smooth gradient layout with a small colour jitter."""
    from PIL import Image
    rng = np.random.RandomState(seed)
    yy, xx = np.mgrid[0:64, 0:64] / 63.0
    a = np.stack([200 * xx + 30, 180 * yy + 40, 120 + 60 * xx * yy], -1) + rng.randn(1, 1, 3) * 8
    return Image.fromarray(a.clip(0, 255).astype("uint8"))


def test_regularisation_keeps_the_class_loss_in_a_band(tmp_path):
    """With a base that already knows the class (fine-tuned on it here), regularisation holds the held-out class
    loss within a small band, while the same run without it moves the class loss away; the concept loss falls."""
    model = models.make_sd1(seed=0)
    sch = NoiseSchedule(model.alphas_cumprod, "eps")
    te = TextEncoder(model, "sd1")
    unet = model.model.diffusion_model

    def latent(im):
        x = torch.from_numpy(np.asarray(im)).permute(2, 0, 1)[None].float() / 127.5 - 1
        with torch.no_grad():
            return model.first_stage_model.encode(x).mode() * model.scale_factor

    # make the base competent on the class: plain full fine-tune of the UNet on class images, prompt "cat"
    cls = torch.cat([latent(_class_image(100 + i)) for i in range(16)])
    with torch.no_grad():
        ctx = te.encode(te.tokenize(["cat"])[0], "cpu")["crossattn"]
    params = list(unet.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=2e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        idx = torch.randint(0, 16, (8,), generator=g)
        z, n, t = cls[idx], torch.randn(8, 4, 8, 8, generator=g), torch.randint(0, 1000, (8,), generator=g)
        loss = ((unet(sch.add_noise(z, n, t), t, context=ctx.expand(8, -1, -1)) - n) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    for p in params:
        p.requires_grad_(False)

    img, _ = train_data.make_dataset(str(tmp_path), n_concept=4, repeats=5)
    reg = tmp_path / "reg" / "1_cat"
    reg.mkdir(parents=True)
    for i in range(8):
        _class_image(i).save(reg / f"r{i}.png")
    concept = [train_data.concept_image(i) for i in range(4)]
    held_out = [_class_image(500 + i) for i in range(6)]
    c0, h0 = _loss(model, None, concept, "svs cat"), _loss(model, None, held_out, "cat")
    result = {}
    for use_reg in (True, False):
        cfg = {"train_data_dir": img, "resolution": 64, "train_batch_size": 2,
               "output_dir": str(tmp_path / f"out{use_reg}"), "output_name": "c", "network_dim": 8,
               "network_alpha": 8, "learning_rate": 5e-3, "text_encoder_lr": 0, "max_train_epochs": 4, "seed": 1,
               "save_precision": "float"}
        if use_reg:
            cfg["reg_data_dir"] = str(tmp_path / "reg")
        res = run_training(ModelHost(model, "tiny"), parse_train_config(cfg))
        net = LoRANetwork(model, "sd1", dim=8, alpha=8, train_text_encoder=False)
        net.load_kohya_state_dict(load_tensors(res.final))
        result[use_reg] = (_loss(model, net, concept, "svs cat"), _loss(model, net, held_out, "cat"))
    (c_reg, h_reg), (c_free, h_free) = result[True], result[False]
    assert abs(h_reg / h0 - 1) < 0.03, (h0, h_reg)     # with regularisation: within +-3%
    assert h_free / h0 > 1.08, (h0, h_free)            # without: the class drifts (prior not preserved)
    assert c_reg < 0.95 * c0 and c_free < 0.95 * c0, (c0, c_reg, c_free)
