"""Benchmark: LoRA switch latency and sampling-step cost on a full-size SD1.5-shaped model.

    python tests/bench/bench_apply.py                 # cuda if available (fp16), else cpu (fp32)
    python tests/bench/bench_apply.py --quick         # CPU smoke run: fewer repeats
    python tests/bench/bench_apply.py --device cpu --threads 4

Model: ldm UNetModel with SD1.5's config (model_channels 320, channel_mult 1,2,4,4, num_res_blocks 2,
attention_resolutions 4,2,1, 8 heads, context 768, depth 1; 860 M params) and the real-width CLIP-L text model
(12 layers, 123 M), random weights (nothing downloaded). LoRAs: rank-32 kohya files (fp16, alpha 16) over kohya's
default targets (every Linear / 1x1 conv in the UNet transformer blocks + TE attention and MLP: 264 modules),
written to a temp folder and loaded through the normal path (formats -> networks -> loader).

Switch latency (Patcher, merge mode) for 1 and 5 LoRAs: apply from nothing, re-apply the same set, switch to a
different set, switch back (delta cache), restore. Step time: one UNet forward at 64x64 latents, batch 1, with no
LoRA, with 1 and with 5 LoRAs merged, measured in the same run; ratios are against the no-LoRA baseline.
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
from torch import nn  # noqa: E402

SD15_UNET = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, attention_resolutions=[4, 2, 1],
                 num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_heads=8, use_spatial_transformer=True,
                 transformer_depth=1, context_dim=768, use_checkpoint=False, legacy=False)
RANK, ALPHA = 32, 16.0


# ------------------------------------------------------------------------------------------------- model

@torch.no_grad()
def _fill_random_(module: nn.Module, seed: int) -> None:
    """N(0, 1/fan_in) matrices, 1 + 0.1·N norm weights, small biases: finite activations in fp16."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    for mod in module.modules():
        for name, p in mod.named_parameters(recurse=False):
            if p.ndim >= 2:
                std = p[0].numel() ** -0.5
                mean = 0.0
            elif isinstance(mod, (nn.GroupNorm, nn.LayerNorm)) and name == "weight":
                std, mean = 0.1, 1.0
            else:
                std, mean = 0.02, 0.0
            if p.device.type == "cpu":
                p.normal_(mean, std, generator=g)
            else:
                p.normal_(mean, std)


def build_model(device: torch.device, dtype: torch.dtype, with_te: bool):
    """An SD1-shaped object as layer_mapping/model_family see it: `.model.diffusion_model`,
    `.cond_stage_model.transformer` (HF CLIPTextModel), `is_sd1`."""
    from ldm.modules.diffusionmodules.openaimodel import UNetModel
    t0 = time.perf_counter()
    with torch.device("meta"):
        unet = UNetModel(**SD15_UNET)
    unet = unet.to_empty(device=device).to(dtype)
    _fill_random_(unet, 0)
    root = nn.Module()
    root.model = nn.Module()
    root.model.diffusion_model = unet.eval().requires_grad_(False)
    root.is_sd1, root.is_sd2, root.is_sdxl = True, False, False
    if with_te:
        from transformers import CLIPTextConfig, CLIPTextModel
        cfg = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                             num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu")
        te = CLIPTextModel(cfg)  # real init: position_ids buffer must be right; 123 M params, a few seconds
        _fill_random_(te, 1)
        root.cond_stage_model = nn.Module()
        root.cond_stage_model.transformer = te.to(device=device, dtype=dtype).eval().requires_grad_(False)
    n = sum(p.numel() for p in root.parameters())
    return root, n, time.perf_counter() - t0


# ------------------------------------------------------------------------------------------------- LoRA files

def write_loras(root, folder: str, count: int) -> tuple[list[str], int]:
    """`count` rank-32 kohya files over kohya's default SD1 targets (names from the trainer's target table)."""
    from safetensors.torch import save_file

    from lib_lora.train.targets import text_encoder_targets, unet_targets
    targets = unet_targets(root.model.diffusion_model, "sd1")
    if hasattr(root, "cond_stage_model"):
        targets += text_encoder_targets(root, "sd1")
    paths = []
    for i in range(count):
        g = torch.Generator().manual_seed(100 + i)
        tensors = {}
        for t in targets:
            w = t.module.weight
            o, fan_in = w.shape[0], w[0].numel()
            down = torch.randn(RANK, fan_in, generator=g) * fan_in ** -0.5
            up = torch.randn(o, RANK, generator=g) * 0.01
            if isinstance(t.module, nn.Conv2d):
                down, up = down.reshape(RANK, fan_in, 1, 1), up.reshape(o, RANK, 1, 1)
            tensors[f"{t.kohya_name}.lora_down.weight"] = down.half().contiguous()
            tensors[f"{t.kohya_name}.lora_up.weight"] = up.half().contiguous()
            tensors[f"{t.kohya_name}.alpha"] = torch.tensor(ALPHA, dtype=torch.float16)
        path = os.path.join(folder, f"bench_lora_{i}.safetensors")
        save_file(tensors, path, {"ss_network_module": "networks.lora", "ss_base_model_version": "sd_v1",
                                  "ss_network_dim": str(RANK), "ss_network_alpha": str(ALPHA)})
        paths.append(path)
    return paths, len(targets)


# ------------------------------------------------------------------------------------------------- timing

def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - t0, out


def bench_switching(root, mapping, nets, n, device, cache_mb):
    """Switch-latency rows for sets of `n` networks: A = nets[:n], B = nets[n:2n] (or A at other weights)."""
    from lib_lora.apply.patcher import Patcher
    patcher = Patcher(cache_mb=cache_mb)
    set_a = [(net, 0.8, 0.8, None) for net in nets[:n]]
    if len(nets) >= 2 * n:
        set_b = [(net, 0.8, 0.8, None) for net in nets[n:2 * n]]
        b_label = f"switch to {n} other LoRA{'s' if n > 1 else ''}"
    else:
        set_b = [(net, 0.6, 0.6, None) for net in nets[:n]]
        b_label = f"switch weights of the {n} LoRAs"
    rows = []

    def step(label, wanted):
        dt, res = timed(lambda: patcher.apply(mapping, wanted), device)
        rows.append((label, dt, res.modules_merged, res.deltas_computed, res.cache_hits))
        return res

    res = step("apply from nothing", set_a)
    assert res.ok and res.modules_merged > 0, res.summary()
    step("re-apply same set", set_a)
    step(b_label, set_b)
    step("switch back", set_a)
    dt, res = timed(patcher.restore, device)
    rows.append(("restore", dt, res.modules_restored, 0, 0))
    return patcher, rows


def _step_fn(unet, device, dtype):
    x = torch.randn(1, 4, 64, 64, device=device, dtype=dtype)
    t = torch.tensor([500], device=device)
    ctx = torch.randn(1, 77, 768, device=device, dtype=dtype)

    def step():
        with torch.no_grad():
            return unet(x, timesteps=t, context=ctx)
    return step


def _delta_bytes(net, mapping) -> int:
    """fp32 bytes of one network's ΔWs (what the delta cache must hold per network and multiplier)."""
    return sum(mapping[name].weight.numel() * 4 for name in net.modules if name in mapping)


def _free_bytes(device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        import psutil
        return psutil.virtual_memory().available
    except ImportError:
        return 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), help="default: fp16 on cuda, fp32 on cpu")
    ap.add_argument("--quick", action="store_true", help="fewer repeats (CPU smoke run)")
    ap.add_argument("--repeats", type=int, help="timed UNet forwards per configuration (default 10, quick 2)")
    ap.add_argument("--no-te", action="store_true", help="skip the text encoder (UNet targets only)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but CUDA is not available")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[
        args.dtype or ("fp16" if device.type == "cuda" else "fp32")]
    repeats = args.repeats or (2 if args.quick else 10)

    from lib_lora.apply.layers import layer_mapping
    from lib_lora.apply.loader import load_network
    from lib_lora.apply.patcher import Patcher

    default_cache_mb = Patcher().cache.max_bytes / 2 ** 20
    root, n_params, t_build = build_model(device, dtype, with_te=not args.no_te)
    mapping = layer_mapping(root)
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({args.threads} thread(s))"
    print(f"# bench_apply: SD1.5-shaped ldm UNet + {'no TE' if args.no_te else 'CLIP-L TE (12 layers)'}, "
          f"{n_params / 1e6:.0f} M params, {str(dtype).replace('torch.', '')} on {dev_name}; built in {t_build:.1f} s")
    print(f"# torch {torch.__version__}; step repeats {repeats}" + (" (quick)" if args.quick else ""))

    with tempfile.TemporaryDirectory(prefix="lora-bench-") as folder:
        t0 = time.perf_counter()
        paths, n_modules = write_loras(root, folder, 10)
        print(f"# wrote 10 rank-{RANK} kohya LoRAs ({n_modules} modules each, "
              f"{os.path.getsize(paths[0]) / 2 ** 20:.1f} MB each) in {time.perf_counter() - t0:.1f} s")
        t0 = time.perf_counter()
        nets = [load_network(p, "sd1", cache=None, layer_names=mapping) for p in paths]
        t_load = (time.perf_counter() - t0) / len(nets)
        assert all(len(n.report.matched) == n_modules for n in nets), nets[0].report.details()
        per_net = _delta_bytes(nets[0], mapping)
        print(f"# load_network: {t_load * 1000:.0f} ms per file (read + parse + build modules); one LoRA's deltas "
              f"are {per_net / 2 ** 20:.0f} MB in fp32 (Patcher default delta cache: {default_cache_mb:.0f} MB)")

        print()
        print("## switch latency (merge into weights; Patcher)")
        print()
        print("| LoRAs | delta cache | operation | time (ms) | modules written | deltas computed | cache hits |")
        print("|---:|---:|---|---:|---:|---:|---:|")
        skipped = []
        for n in (1, 5):
            # the default cache, and one big enough for both sets (so 'switch back' can hit)
            big_mb = 2.2 * n * per_net / 2 ** 20
            for cache_mb in (default_cache_mb, big_mb):
                if cache_mb > default_cache_mb and big_mb * 2 ** 20 > 0.6 * _free_bytes(device):
                    skipped.append(f"{n} LoRA(s) with a {big_mb:.0f} MB cache (not enough free memory)")
                    continue
                _p, rows = bench_switching(root, mapping, nets, n, device, cache_mb)
                for label, dt, mods, comp, hits in rows:
                    print(f"| {n} | {cache_mb:.0f} MB | {label} | {dt * 1000:.0f} | {mods} | {comp} | {hits} |")
                del _p
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        for s_ in skipped:
            print(f"\n# skipped: {s_}")

        print()
        print("## sampling step (one UNet forward, 64x64 latents, batch 1)")
        print()
        step = _step_fn(root.model.diffusion_model, device, dtype)
        timed(step, device)  # warm-up (allocator, kernels)
        configs = [("no LoRA", 0), ("1 LoRA merged", 1), ("5 LoRAs merged", 5)]
        results = {label: [] for label, _ in configs}
        # rounds visit every configuration once (rotating the order), so load drift hits all of them alike;
        # the set switches in between are not timed
        # the 1-LoRA set is nets[0], part of the 5-LoRA set: 5 networks' deltas cover every configuration
        big = Patcher(cache_mb=5.5 * per_net / 2 ** 20 if 5.5 * per_net < 0.6 * _free_bytes(device)
                      else default_cache_mb)
        for r in range(repeats):
            for label, n in configs[r % 3:] + configs[:r % 3]:
                big.apply(mapping, [(net, 0.8, 0.8, None) for net in nets[:n]])
                results[label].append(timed(step, device)[0])
        big.restore()
        base_med, base_min = statistics.median(results["no LoRA"]), min(results["no LoRA"])
        print("| configuration | median (ms) | min (ms) | ratio vs no LoRA (median) | ratio (min) |")
        print("|---|---:|---:|---:|---:|")
        for label, _ in configs:
            ts = results[label]
            med = statistics.median(ts)
            print(f"| {label} | {med * 1000:.0f} | {min(ts) * 1000:.0f} | {med / base_med:.3f} | "
                  f"{min(ts) / base_min:.3f} |")
        if device.type == "cuda":
            print(f"\n# peak CUDA memory {torch.cuda.max_memory_allocated(device) / 2 ** 30:.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
