"""Whole training jobs through the engine (latent caching, saving, everything), timed on an already-loaded model.

- ``reference``: the seed's tutorial config (tests/data/seed_config.toml) as users paste it: 50 images x 10 repeats
  x 10 epochs at batch 2 = 2,500 steps, fp16, text encoder trained, AdamW8bit (AdamW without bitsandbytes), save
  every 2 epochs; only the data and output folders are ours. The standard tool needs ~11.6 min on an H100.
- ``memory``: peak GPU memory of short jobs: batch 1 fp16 with gradient checkpointing (target: within 6 GiB), and
  batch 4 bf16 UNet-only (the standard tool: 7.3 GiB).

The model is SD1.5-shaped at full size (UNet 860M, CLIP-L 12 layers, VAE 128 channels) with random weights, fp16
like the WebUI keeps it; --quick uses the embedded tiny model and a tiny dataset (a CPU smoke run of the same code).

    python tests/bench/bench_job.py --quick --device cpu
    python tests/bench/bench_job.py                     # on the GPU: reference job + memory jobs
"""

import argparse
import copy
import math
import os
import sys
import tempfile
import time
import tomllib

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

from lib_lora.host.base import ModelHost  # noqa: E402
from lib_lora.host.tiny import (clip_l_text_config, freeze_, make_tiny_sd15, offline_clip,  # noqa: E402
                                set_family_flags, skip_default_init, tiny_sd15_config, vae_config)
from lib_lora.quickstart import make_dataset  # noqa: E402
from lib_lora.train.config import parse_train_config  # noqa: E402
from lib_lora.train.run import plan_for, run_training  # noqa: E402

SEED_TOML = os.path.join(ROOT, "tests", "data", "seed_config.toml")


def full_sd15_config() -> dict:
    """v1-inference.yaml's sizes: UNet model_channels 320, VAE ch 128 x2 res blocks, CLIP-L text."""
    cfg = copy.deepcopy(tiny_sd15_config())
    p = cfg["params"]
    p["image_size"] = 64
    p["unet_config"]["params"].update(model_channels=320, image_size=64)
    p["first_stage_config"] = vae_config(ch=128, num_res_blocks=2, resolution=256)
    return cfg


@torch.no_grad()
def build_model(device: torch.device, quick: bool, dtype=torch.float16):
    """The model the WebUI would have loaded: eval, frozen, on the device, UNet + text encoder in ``dtype``."""
    if quick:
        return make_tiny_sd15(0)
    from ldm.util import instantiate_from_config
    from omegaconf import OmegaConf

    with offline_clip(clip_l_text_config(layers=12)), skip_default_init():
        model = instantiate_from_config(OmegaConf.create(full_sd15_config()))
    model = model.to(device)
    g = torch.Generator(device=device).manual_seed(0)
    for name, p in model.named_parameters():  # speed does not depend on values; keep activations O(1)
        if p.ndim >= 2:
            p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()), generator=g)
        elif name.endswith("weight") and "norm" in name:
            p.fill_(1.0)
        else:
            p.normal_(0.0, 0.02, generator=g)
    model.model.to(dtype)
    model.cond_stage_model.to(dtype)
    set_family_flags(freeze_(model), "sd1")
    return model


def seed_config(data: str, out: str, **override):
    """The seed TOML as written, our folders, plus overrides."""
    with open(SEED_TOML, "rb") as f:
        sections = tomllib.load(f)
    raw = {k: v for sec in sections.values() for k, v in sec.items()}
    if "train_batch_size" in override:
        raw.pop("batch_size", None)
    raw.update(train_data_dir=data, output_dir=out, **override)
    raw.pop("pretrained_model_name_or_path")  # the loaded model is trained
    return parse_train_config({k: v for k, v in raw.items() if v is not None}, source="seed config", base_dir=out)


def run_job(host, cfg, device, label, log=print):
    """One job; returns (seconds, steps, peak GiB, result, notes)."""
    plan = plan_for(host, cfg)
    events = {"notes": []}

    every = max(1, plan.steps.max_train_steps // 10)

    def on_event(e):
        if e.kind == "note":
            events["notes"].append(e.message)
        elif e.kind == "step" and e.step % every == 0:  # a run cut short by a time limit still tells its pace
            log(f"#   step {e.step}/{e.total} at {time.perf_counter() - t0:.1f} s, loss {e.loss:.4f}")

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    res = run_training(host, cfg, on_event=on_event, plan=plan)
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else float("nan")
    fast = next((n for n in events["notes"] if n.startswith("training step")), "")
    log(f"# {label}: {res.status}, {res.steps} steps in {dt:.1f} s ({res.steps / dt:.2f} steps/s), "
        f"peak {peak:.2f} GiB; {fast}")
    for n in events["notes"]:
        if n is not fast and not n.startswith(("saved ", "epoch ")):
            log(f"#   note: {n.splitlines()[0][:200]}")
    return dt, res.steps, peak, res, events["notes"]


def main(argv=None, log=print):
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="tiny model, tiny dataset (CPU smoke run)")
    ap.add_argument("--jobs", default="reference,memory", help="reference, memory")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    jobs = [j for j in args.jobs.split(",") if j]
    work = args.workdir or tempfile.mkdtemp(prefix="lora-studio-bench-job-")
    t0 = time.perf_counter()
    model = build_model(device, args.quick)
    model.to(device)
    host = ModelHost(model, name="sd15-shaped random", device=device)
    log(f"# model built and on {device} in {time.perf_counter() - t0:.1f} s "
        f"({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters)")
    size, n_img, repeats = (64, 4, 2) if args.quick else (512, 50, 10)
    data = make_dataset(os.path.join(work, "data"), n_images=n_img, repeats=repeats, size=size)
    out = {}
    tiny = dict(min_bucket_reso=64, max_bucket_reso=128) if args.quick else {}
    if "reference" in jobs:
        kw = dict(resolution=f"{size}", max_train_epochs=2, **tiny) if args.quick else {}
        cfg = seed_config(data, os.path.join(work, "out-ref"), **kw)
        dt, steps, peak, res, _ = run_job(host, cfg, device, "reference job (seed config as written)", log)
        out["reference"] = (dt, steps, peak)
        log(f"reference job: {steps} steps, {dt / 60:.2f} min end to end (target <= 2.5 min; the standard tool "
            f"~11.6 min on an H100)")
    if "memory" in jobs:
        n = 6 if args.quick else 40
        # (max_train_epochs would win over max_train_steps, as in sd-scripts)
        small = dict(resolution=f"{size}", max_train_steps=n, max_train_epochs=None, save_every_n_epochs=None,
                     save_state=False, lr_warmup_steps=0, **tiny)
        cfg = seed_config(data, os.path.join(work, "out-m1"), train_batch_size=1, gradient_checkpointing=True,
                          **small)
        _, _, p1, _, _ = run_job(host, cfg, device, "batch 1 fp16 + gradient checkpointing", log)
        cfg = seed_config(data, os.path.join(work, "out-m4"), train_batch_size=4, mixed_precision="bf16",
                          network_train_unet_only=True, optimizer_type="AdamW", **small)
        _, _, p4, _, _ = run_job(host, cfg, device, "batch 4 bf16 UNet only", log)
        out["memory"] = (p1, p4)
        log(f"peak memory: b1 fp16 + checkpointing {p1:.2f} GiB (target <= 6), b4 bf16 {p4:.2f} GiB "
            f"(the standard tool 7.3)")
    return out


if __name__ == "__main__":
    main()
