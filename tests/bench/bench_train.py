"""Training-step benchmark: our step (plain and fast paths) vs a plain-PyTorch reference step, same model, same run.

Full-size SD1.5-shaped ldm UNet with random weights (speed does not depend on values), 512 px (64x64 latents),
LoRA dim 32 / alpha 16 on kohya's 192 targets, frozen bf16 base under autocast, SDPA attention, latents and text
conditioning already on the device. Prints images/s, peak memory and the ratio against the reference for each
batch size and each of our modes: ``eager`` (fast_path = false), ``fast`` (flat LoRA buffer, fused AdamW, cached
timestep frequencies) and, with --capture on CUDA, ``graph`` (fast + the whole step replayed from a CUDA graph).

    python tests/bench/bench_train.py                          # cuda if available, batches 1 2 4
    python tests/bench/bench_train.py --capture --profile-ops --match --job  # a GPU session: everything
    python tests/bench/bench_train.py --quick --device cpu --profile-ops   # smoke run on a tiny model

--profile-ops counts the aten ops each step dispatches (torch.profiler; "top" = launched from Python/autograd,
"all" = with nested ones) and lists any op that waits for the device inside a step. On CUDA the fast and graph
steps also run under torch.cuda.set_sync_debug_mode("error") to catch any hidden sync. --match compares the LoRA
weights after 50 steps of each mode with the plain eager step's (same init, same seeds). --job then runs
bench_job.py: the seed's 2,500-step reference job end to end and the peak-memory jobs. tests/bench/gpu_check.sh
runs all of it in one device call. Not collected by pytest.
"""

import argparse
import os
import sys
import time

import torch
import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

from lib_lora.train.attention import sdpa_attention  # noqa: E402
from lib_lora.train.fastpath import (STEP_MARK, FlatParams, StepBatch, StepRunner,  # noqa: E402
                                     cached_timestep_embedding, fused_adamw_supported, step_ops)
from lib_lora.train.lora_net import LoRANetwork  # noqa: E402
from lib_lora.train.loss import NoiseSchedule  # noqa: E402
from lib_lora.train.optim import make_optimizer, make_scheduler  # noqa: E402


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


COMPILE_BACKEND = "inductor"


def our_step_fn(unet, device, dtype, dim, alpha, batch, lat_hw, mode="fast", seed=0):
    """Our StepRunner as the trainer wires it. mode: eager (fast_path = false) | fast | graph (fast + CUDA graphs)
    | compile (fast + torch.compile) | cgraph (fast + torch.compile + CUDA graphs). Returns (step, close, net)."""
    fast = mode != "eager"
    net = LoRANetwork(_Host(unet), "sd1", dim=dim, alpha=alpha, train_text_encoder=False)
    torch.manual_seed(seed)
    for pair in net.pairs.values():
        nn.init.kaiming_uniform_(pair.lora_down.weight, a=5 ** 0.5)
    net.to(device)
    groups = net.param_groups(1e-4, 0)
    flat = FlatParams(groups) if fast else None
    args = {"fused": True} if fast and fused_adamw_supported(device) else {}
    opt, _ = make_optimizer("AdamW", flat.param_groups() if flat else groups, lr=1e-4, args=args, device=device)
    sched = make_scheduler(opt, "constant", 0, 10 ** 6)
    sch = NoiseSchedule(schedule(), "eps").to(device)
    amp = dtype if dtype != torch.float32 else None
    runner = StepRunner(unet, sch, opt, sched, device=device, flat=flat,
                        params=[p for g in groups for p in g["params"]], amp_dtype=amp, max_grad_norm=1.0,
                        capture=mode in ("graph", "cgraph"), on_note=print,
                        compile_backend=COMPILE_BACKEND if mode in ("compile", "cgraph") else None)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(batch, 4, lat_hw, lat_hw, generator=g).to(device)
    ctx = torch.randn(batch, 77, 768, generator=g).to(device)
    w = torch.ones(batch, device=device)
    emb = cached_timestep_embedding(unet)
    if fast:
        emb.__enter__()
    net.attach()
    net.train()
    n = [0]

    def step():
        n[0] += 1
        return runner.step(StepBatch(x0, w, {"crossattn": ctx}, 1000 + n[0], 2000 + n[0]))

    def close():
        net.detach()
        if fast:
            emb.__exit__(None, None, None)

    step.runner = runner
    return step, close, net


def count_ops(step, n=3):
    """Per-step aten op counts and sync ops for a step function (warm it up first)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts) as prof:
        for _ in range(n):
            with torch.autograd.profiler.record_function(STEP_MARK):
                step()
    c = step_ops(prof)
    return c.top / n, c.total / n, sorted(set(c.syncs)), len(c.host_data) / n


def sync_check(step, device, n=3):
    """Run steps with CUDA's sync debug mode set to error: any op that waits for the GPU raises."""
    if device.type != "cuda":
        return "n/a (cpu)"
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(n):
            step()
        return "no sync"
    except RuntimeError as e:
        return f"SYNC: {str(e).splitlines()[0][:160]}"
    finally:
        torch.cuda.set_sync_debug_mode("default")


def lora_vector(net):
    return torch.cat([p.detach().float().reshape(-1) for p in net.parameters()])


def match_check(unet, device, dtype, batch, lat, modes, steps=50):
    """Same init, same seeds, ``steps`` steps: each mode's LoRA weights against the plain eager step's (relative
    norm of the difference, lora_up and lora_down apart: up starts at zero, so it shows what was learned)."""
    out = {}
    for mode in ["eager"] + [m for m in modes if m != "eager"]:
        step, close, net = our_step_fn(unet, device, dtype, 32, 16, batch, lat, mode=mode, seed=3)
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        ups = torch.cat([p.lora_up.weight.detach().float().reshape(-1) for p in net.pairs.values()])
        downs = torch.cat([p.lora_down.weight.detach().float().reshape(-1) for p in net.pairs.values()])
        out[mode] = (ups, downs, dict(getattr(step.runner, "graph_stats", {})))
        close()
    ref_up, ref_down, _ = out.pop("eager")
    rows = []
    for mode, (up, down, stats) in out.items():
        rows.append((mode, ((up - ref_up).norm() / ref_up.norm()).item(),
                     ((down - ref_down).norm() / ref_down.norm()).item(), stats))
    return rows


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
    ap.add_argument("--modes", default="eager,fast",
                    help="ours: eager (fast_path=false), fast, graph, compile, cgraph (compile + graph)")
    ap.add_argument("--compile-backend", default="inductor", help="dynamo backend of the compile modes")
    ap.add_argument("--capture", action="store_true", help="add the CUDA-graph mode (CUDA only) and its checks")
    ap.add_argument("--profile-ops", action="store_true", help="count aten ops per step with torch.profiler")
    ap.add_argument("--match", action="store_true", help="LoRA weights after 50 steps: fast (and graph) vs eager")
    ap.add_argument("--job", action="store_true", help="then the reference job and memory jobs (bench_job.py)")
    ap.add_argument("--attention", choices=("sdpa", "einsum"), default=None,
                    help="UNet attention (default: sdpa on cuda; einsum on cpu, where bf16 SDPA is very slow)")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)  # the shared CPU machines: more threads make steps erratic
    dtype = torch.bfloat16 if (device.type == "cuda" or args.quick) else torch.float32
    lat = 8 if args.quick else 64
    n = args.steps or (3 if args.quick else 30)
    modes = [m for m in args.modes.split(",") if m]
    if args.capture and "graph" not in modes:
        modes.append("graph")
    global COMPILE_BACKEND
    COMPILE_BACKEND = args.compile_backend
    for m in ("graph", "cgraph"):
        if m in modes and device.type != "cuda":
            print(f"# {m} mode needs CUDA; skipped")
            modes.remove(m)
    unet = build_unet(args.quick).to(device)
    if device.type == "cuda":
        unet = unet.to(torch.bfloat16)
    attention = args.attention or ("sdpa" if device.type == "cuda" else "einsum")
    sdpa = sdpa_attention(unet, enabled=attention == "sdpa")
    print(f"# bench_train: device={device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}) "
          f"torch {torch.__version__} dtype={dtype} latents {lat}x{lat} dim 32 alpha 16 "
          f"attention={attention}")
    print(f"{'batch':>5} {'mode':>7} {'s/step':>8} {'img/s':>8} {'x ref':>6} {'peak GiB':>8}"
          + (f" {'ops top':>8} {'ops all':>8} {'host->dev':>9}  syncs in step" if args.profile_ops else ""))
    with sdpa:
        for b in [int(x) for x in args.batches.split(",")]:
            rows = []
            ref, close = reference_step_fn(unet, device, dtype, 32, 16, b, lat)
            rows.append(("ref", ref) + timeit(ref, 2, n, device) + ((count_ops(ref),) if args.profile_ops else ()))
            close()
            for mode in modes:
                step, close, _ = our_step_fn(unet, device, dtype, 32, 16, b, lat, mode=mode)
                t_first = time.perf_counter()
                step()  # the compile modes compile here (minutes with a cold cache): timed apart
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if mode in ("compile", "cgraph"):
                    print(f"# b{b} {mode}: first step (compile) {time.perf_counter() - t_first:.1f} s")
                r = (mode, step) + timeit(step, 3, n, device)
                if args.profile_ops:
                    r += (count_ops(step),)
                if mode != "eager" and device.type == "cuda":
                    print(f"# b{b} {mode}: cuda sync debug over 3 steps: {sync_check(step, device)}")
                if mode in ("graph", "cgraph"):
                    print(f"# b{b} {mode}: {step.runner.graph_stats}; blockers {step.runner.capture_blockers or '-'}")
                rows.append(r)
                close()
            t_ref = rows[0][2]
            for r in rows:
                mode, _, t, peak = r[:4]
                line = f"{b:>5} {mode:>7} {t:>8.4f} {b / t:>8.2f} {t_ref / t:>6.2f} {peak:>8.2f}"
                if args.profile_ops:
                    top, total, syncs, h2d = r[4]
                    line += f" {top:>8.0f} {total:>8.0f} {h2d:>9.0f}  {', '.join(syncs) or '-'}"
                print(line)
    if args.match:
        steps = 5 if args.quick else 50
        for mode, up, down, stats in match_check(unet, device, dtype, 2, lat, modes, steps):
            print(f"# match b2, {steps} steps, {mode} vs eager: lora_up rel diff {up:.2e}, lora_down {down:.2e}"
                  + (f"; graphs {stats}" if mode == "graph" else ""))
    del unet
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if args.job:
        import bench_job
        bench_job.main(["--device", str(device)] + (["--quick"] if args.quick else []))


if __name__ == "__main__":
    main()
