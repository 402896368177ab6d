"""Training-step benchmark: our step vs a plain-PyTorch reference step, same model, same run.

Full-size SD1.5-shaped ldm UNet with random weights (speed does not depend on values), 512 px (64x64 latents),
LoRA dim 32 / alpha 16 on kohya's 192 targets, frozen bf16 base under autocast, latents and text conditioning
already on the device. Prints images/s, peak memory and the ratio against the reference for each batch size.

    python tests/bench/bench_train.py                    # cuda if available, batches 1 2 4
    python tests/bench/bench_train.py --quick --device cpu   # smoke run on a tiny model

Not collected by pytest.
"""

import argparse
import os
import sys
import time

import torch
import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

from lib_lora.train.lora_net import LoRANetwork  # noqa: E402
from lib_lora.train.loss import NoiseSchedule, denoising_loss, sample_noise, sample_timesteps  # noqa: E402
from lib_lora.train.optim import make_optimizer  # noqa: E402


class _Host(nn.Module):
    """Just enough of an ldm model for LoRANetwork: .model.diffusion_model, no text encoder trained."""

    def __init__(self, unet):
        super().__init__()
        self.model = nn.Module()
        self.model.diffusion_model = unet


def build_unet(quick: bool):
    from ldm.modules.diffusionmodules.openaimodel import UNetModel
    if quick:
        cfg = dict(image_size=8, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[4, 2, 1],
                   num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_heads=8, use_spatial_transformer=True,
                   transformer_depth=1, context_dim=768, use_checkpoint=False, legacy=False)
    else:
        cfg = dict(image_size=64, in_channels=4, out_channels=4, model_channels=320, attention_resolutions=[4, 2, 1],
                   num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_heads=8, use_spatial_transformer=True,
                   transformer_depth=1, context_dim=768, use_checkpoint=False, legacy=False)
    unet = UNetModel(**cfg)
    with torch.no_grad():
        for p in unet.parameters():
            p.normal_(0, 0.02)
    return unet.eval().requires_grad_(False)


def schedule():
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


def reference_step_fn(unet, device, dtype, dim, alpha, batch, lat_hw):
    """A plain eager loop: LoRA as forward hooks on the same targets, non-fused AdamW, loss read every step."""
    from lib_lora.train.targets import unet_targets

    loras = nn.ModuleList()
    hooks = []
    for t in unet_targets(unet, "sd1"):
        m = t.module
        if isinstance(m, nn.Linear):
            down, up = nn.Linear(m.in_features, dim, bias=False), nn.Linear(dim, m.out_features, bias=False)
        else:
            down, up = nn.Conv2d(m.in_channels, dim, 1, bias=False), nn.Conv2d(dim, m.out_channels, 1, bias=False)
        nn.init.zeros_(up.weight)
        pair = nn.ModuleList([down, up]).to(device)
        loras.append(pair)
        hooks.append(m.register_forward_hook(lambda mod, inp, out, pair=pair: out + pair[1](pair[0](inp[0])) * (alpha / dim)))
    opt = torch.optim.AdamW(loras.parameters(), lr=1e-4)
    ac = schedule().to(device)
    x0 = torch.randn(batch, 4, lat_hw, lat_hw, device=device)
    ctx = torch.randn(batch, 77, 768, device=device)

    def step():
        t = torch.randint(0, 1000, (batch,), device=device)
        noise = torch.randn_like(x0)
        a = ac[t].float().sqrt().view(-1, 1, 1, 1)
        s = (1 - ac[t]).float().sqrt().view(-1, 1, 1, 1)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            pred = unet(a * x0 + s * noise, t, context=ctx)
            loss = nn.functional.mse_loss(pred.float(), noise)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss.item()

    def close():
        for h in hooks:
            h.remove()

    return step, close


def our_step_fn(unet, device, dtype, dim, alpha, batch, lat_hw):
    net = LoRANetwork(_Host(unet), "sd1", dim=dim, alpha=alpha, train_text_encoder=False).to(device)
    opt, _ = make_optimizer("AdamW", net.param_groups(1e-4, 0), lr=1e-4, device=device)
    sch = NoiseSchedule(schedule(), "eps").to(device)
    x0 = torch.randn(batch, 4, lat_hw, lat_hw, device=device)
    ctx = torch.randn(batch, 77, 768, device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    net.attach()
    net.train()

    def step():
        noise = sample_noise(x0, gen)
        t = sample_timesteps(batch, gen, device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            pred = unet(sch.add_noise(x0, noise, t), t, context=ctx)
            loss = denoising_loss(pred, noise, t, sch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()  # no host sync: read back every N steps by the loop

    return step, net.detach


def timeit(step, n_warm, n, device):
    for _ in range(n_warm):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(n):
        out = step()
    if isinstance(out, torch.Tensor):
        out.item()
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / n
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else float("nan")
    return dt, peak


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batches", default="1,2,4")
    ap.add_argument("--quick", action="store_true", help="tiny UNet, few steps (CPU smoke run)")
    ap.add_argument("--steps", type=int, default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    dtype = torch.bfloat16 if (device.type == "cuda" or args.quick) else torch.float32
    lat = 8 if args.quick else 64
    n = args.steps or (3 if args.quick else 30)
    unet = build_unet(args.quick).to(device)
    if device.type == "cuda":
        unet = unet.to(torch.bfloat16)
    print(f"# bench_train: device={device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}) "
          f"torch {torch.__version__} dtype={dtype} latents {lat}x{lat} dim 32 alpha 16")
    print(f"{'batch':>5} {'ref s/step':>10} {'ours s/step':>11} {'ref img/s':>9} {'ours img/s':>10} {'ratio':>6} "
          f"{'ref peak GiB':>12} {'ours peak GiB':>13}")
    for b in [int(x) for x in args.batches.split(",")]:
        ref, close = reference_step_fn(unet, device, dtype, 32, 16, b, lat)
        t_ref, p_ref = timeit(ref, 2, n, device)
        close()
        ours, detach = our_step_fn(unet, device, dtype, 32, 16, b, lat)
        t_ours, p_ours = timeit(ours, 2, n, device)
        detach()
        print(f"{b:>5} {t_ref:>10.4f} {t_ours:>11.4f} {b / t_ref:>9.2f} {b / t_ours:>10.2f} {t_ref / t_ours:>6.2f} "
              f"{p_ref:>12.2f} {p_ours:>13.2f}")


if __name__ == "__main__":
    main()
