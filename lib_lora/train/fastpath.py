"""The training step as one object (``StepRunner``) and the fast paths around it.

A step is: seed the run's RNGs, noise + timesteps drawn on the device, UNet forward under autocast, loss, backward,
then (every ``accum`` micro-batches) unscale, clip, optimizer, LR schedule, zero grads. Nothing in it reads a device
value back to the host (no ``.item()``, no Python ``if`` on a tensor, no data-dependent shapes, no tensor built from
host data): the GPU queue never drains inside a step, and the loop reads the loss back every ``log_every`` steps.
``SYNC_OPS`` lists the aten ops that make the host wait for the device; the tests profile steps on the CPU and
assert none of them (and no host-data tensor) runs inside a step.

Fast paths (``fast_path``, on by default; each one keeps results within float tolerance of the plain step):
- LoRA weights of each optimizer group live in one flat buffer (the modules' weights are views into it; their
  grads are gathered into its grad by one op), so AdamW and clipping touch one tensor per group, not two per module;
- AdamW uses its fused kernel where torch has one for the device (CUDA; CPU from torch 2.4);
- cached latents, loss weights and SDXL size numbers are stacked per bucket once and gathered per step by one
  ``index_select`` (kept on the GPU when they fit ``DEVICE_CACHE_BYTES``); token ids go over in pinned memory;
- the UNet's sinusoidal timestep embedding uses frequencies computed once (ldm builds them on the CPU and copies
  them to the device on every call, a blocking copy that also forbids CUDA-graph capture).

``cuda_graphs`` (on where it can work, ``false`` turns it off): on CUDA, each bucket shape's whole step (text
encoder when trained, UNet forward, backward, GradScaler with a fused AdamW, clip, AdamW) is captured lazily as one
CUDA graph after ``GRAPH_WARMUP`` eager steps and replayed. The first replay of every graph is checked against the
eager step from the same state; a graph that differs, or fails to capture, is dropped with a note and that shape
runs eagerly. Settings that decide on the host block capture (``StepRunner.capture_blockers``). Everything around
the torch.cuda calls (``CudaGraphs``) is tested on the CPU with an emulation; the GPU figures come from
tests/bench/bench_train.py.
"""

from __future__ import annotations

import math
import os
import sys
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
from torch.autograd.profiler import record_function

from .conditioning import timestep_embedding as _sin_embedding
from .conditioning import sdxl_vector
import random

from .loss import LossOptions, denoising_loss, input_noise, sample_noise, sample_timesteps

STEP_MARK = "lora_studio::step"

# aten ops that wait for the device (CUDA): scalar reads (.item(), float(t), `if t:` -> is_nonzero), data-dependent
# output shapes (nonzero and what calls it: boolean-mask indexing, torch.where(cond), masked_select, unique ...,
# repeat_interleave without output_size, bincount / histc sizing themselves from the data), comparisons returning a
# Python bool. A device->host copy (.cpu(), .tolist()) syncs too but looks like any copy on the CPU; the GPU check
# (torch.cuda.set_sync_debug_mode) catches those.
SYNC_OPS = frozenset({
    "aten::item", "aten::_local_scalar_dense", "aten::is_nonzero", "aten::nonzero", "aten::nonzero_numpy",
    "aten::masked_select", "aten::unique", "aten::_unique", "aten::_unique2", "aten::unique_dim",
    "aten::unique_consecutive", "aten::bincount", "aten::histc", "aten::repeat_interleave", "aten::equal",
    "aten::allclose",
})
# a tensor made from host data (torch.tensor / as_tensor / from_numpy): on a GPU, a blocking host->device copy
HOST_DATA_OPS = frozenset({"aten::lift_fresh", "aten::lift_fresh_copy"})
# the CPU fused-optimizer kernels read their step counter with an item() inside the kernel; the CUDA kernels read
# it on the device (the GPU check is torch.cuda.set_sync_debug_mode in tests/bench/bench_train.py)
KERNEL_INTERNAL = frozenset({"aten::_fused_adamw_", "aten::_fused_adam_", "aten::_fused_sgd_", "aten::_fused_adagrad_"})

# cached inputs are kept on the GPU up to this size, and 1/16 of its memory (SD1.5 512px: 64 KiB per latent)
DEVICE_CACHE_BYTES = 1 << 30

# element-wise optimizers: one flat tensor per group gives the same update as one tensor per LoRA weight
_ELEMENTWISE = ("adamw", "adamw32bit", "adam", "sgdnesterov", "lion")
_IMPL_KEYS = ("fused", "foreach", "capturable", "differentiable")


# ---- options ------------------------------------------------------------------------------------------------
def _flag(value) -> bool | str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return value
    s = str(value).strip().lower()
    if s in ("capture", "cuda_graphs", "graphs"):
        return "capture"
    if s in ("0", "false", "off", "no", "eager"):
        return False
    if s in ("1", "true", "on", "yes", "fast"):
        return True
    raise ValueError(f"fast path setting {value!r} not understood: use true, false or capture")


@dataclass
class FastPath:
    """Which fast paths a run uses. ``enabled`` False gives the plain eager step. ``capture``: CUDA graphs where
    they can work; ``capture_asked``: somebody set them explicitly (then a reason they are off is a note)."""
    enabled: bool = True
    capture: bool = True
    source: str = "default"
    capture_asked: bool = False

    @classmethod
    def resolve(cls, override=None, cfg=None, host=None) -> "FastPath":
        """Precedence: the engine call (``Trainer(fast=...)``), env ``LORA_STUDIO_FAST_PATH`` (0 | 1 | capture),
        config keys ``fast_path`` / ``cuda_graphs``, the host's ``fast_path`` attribute, then on (graphs where
        possible). ``cuda_graphs = false`` keeps the other fast paths and turns graphs off."""
        if isinstance(override, FastPath):
            return override
        graphs = getattr(cfg, "cuda_graphs", None)
        if graphs is None:
            graphs = getattr(host, "cuda_graphs", None)
        capture = graphs is not False
        env = "LORA_STUDIO_FAST_PATH"
        for value, src in ((override, "engine option"), (os.environ.get(env), env)):
            f = _flag(value)
            if f is not None:
                return cls(bool(f), f == "capture" or (bool(f) and capture), src, f == "capture" or bool(graphs))
        f = _flag(getattr(cfg, "fast_path", None))
        if f is None:
            f = _flag(getattr(host, "fast_path", None))
            src = "host" if f is not None else ("config" if graphs is not None else "default")
        else:
            src = "config"
        if f is None:
            f = True
        return cls(bool(f), bool(f) and (capture or f == "capture"), src, bool(graphs) or f == "capture")


def elementwise_optimizer(name: str | None) -> bool:
    return (name or "AdamW").lower().replace("_", "").replace("-", "") in _ELEMENTWISE


_FUSED_OK: dict[str, bool] = {}


def fused_adamw_supported(device: torch.device) -> bool:
    """torch has a fused AdamW kernel for CUDA, and for the CPU from 2.4; try it once per device type."""
    key = device.type
    if key not in _FUSED_OK:
        try:
            p = torch.zeros(2, device=device, requires_grad=True)
            p.grad = torch.ones(2, device=device)
            torch.optim.AdamW([p], lr=1e-3, fused=True).step()
            _FUSED_OK[key] = True
        except (RuntimeError, TypeError, ValueError):  # no kernel for this device / torch version
            _FUSED_OK[key] = False
    return _FUSED_OK[key]


# ---- flat parameters ----------------------------------------------------------------------------------------
class FlatGroup:
    """One optimizer group's LoRA weights as views into one flat fp32 buffer.

    Autograd gives each weight its own gradient as usual; before the update one ``_foreach_copy_`` gathers them
    into the flat gradient, so the optimizer (and clipping) see one tensor per group instead of two per module.
    (Gradients as views of the flat gradient would cost one in-place add per weight in every backward.)
    ``skip``: weights that never get a gradient (text encoder layers after the clip-skip layer); they stay out of
    the buffer and the optimizer, as the plain step never updates them either.
    """

    def __init__(self, group: dict, skip: set[int] = frozenset()):
        self.group = group
        self.params: list[nn.Parameter] = list(group["params"])
        self.used = [j for j, p in enumerate(self.params) if id(p) not in skip]
        if not self.used:
            raise ValueError(f"optimizer group {group.get('name')!r} has no trainable LoRA weight")
        first = self.params[self.used[0]]
        for j in self.used:
            p = self.params[j]
            if p.device != first.device or p.dtype != first.dtype:
                raise ValueError("LoRA weights on several devices or dtypes cannot share one flat buffer")
        self.numel = sum(self.params[j].numel() for j in self.used)
        data = torch.empty(self.numel, device=first.device, dtype=first.dtype)
        self.offsets: dict[int, tuple[int, int]] = {}
        o = 0
        for j in self.used:
            p = self.params[j]
            n = p.numel()
            data[o:o + n].copy_(p.detach().reshape(-1))
            self.offsets[j] = (o, n)
            o += n
        self.param = nn.Parameter(data)
        self.param.grad = torch.zeros_like(data)
        self.weights = [self.params[j] for j in self.used]
        for j, (o, n) in self.offsets.items():
            p = self.params[j]
            p.data = self.param.data[o:o + n].view(p.shape)
            p.grad = None
        self._grad_views = [self.param.grad[o:o + n].view(self.params[j].shape)
                            for j, (o, n) in self.offsets.items()]

    def gather_grads(self):
        if self.param.grad is None:  # someone set it to None: a new buffer and new views
            self.param.grad = torch.zeros_like(self.param)
            self._grad_views = [self.param.grad[o:o + n].view(self.params[j].shape)
                                for j, (o, n) in self.offsets.items()]
        grads = [p.grad for p in self.weights]
        if _foreach_copy is not None and all(g is not None for g in grads):
            _foreach_copy(self._grad_views, grads)
            return
        for v, g in zip(self._grad_views, grads):  # a weight without gradient this step contributes zeros
            if g is None:
                v.zero_()
            else:
                v.copy_(g)

    def zero_grad(self):
        for p in self.weights:
            p.grad = None

    def optimizer_group(self) -> dict:
        return {**{k: v for k, v in self.group.items() if k != "params"}, "params": [self.param]}


_foreach_copy = getattr(torch, "_foreach_copy_", None)


class FlatParams:
    """The flat buffers of all optimizer groups, and the conversion of optimizer state to and from the per-weight
    layout (state files are always written per weight, so either path can resume the other's state)."""

    def __init__(self, groups: list[dict], skip: set[int] = frozenset()):
        self.groups = [FlatGroup(g, skip) for g in groups]

    def param_groups(self) -> list[dict]:
        return [g.optimizer_group() for g in self.groups]

    def grad_params(self) -> list[nn.Parameter]:
        return [g.param for g in self.groups]

    def gather_grads(self):
        for g in self.groups:
            g.gather_grads()

    def zero_grad(self):
        for g in self.groups:
            g.zero_grad()

    def state_dict_per_weight(self, sd: dict) -> dict:
        state, groups, base = {}, [], 0
        for fg, g in zip(self.groups, sd["param_groups"]):
            fst = sd["state"].get(g["params"][0], {})
            for j, (o, n) in fg.offsets.items():
                shape = fg.params[j].shape
                st = {}
                for k, v in fst.items():
                    if torch.is_tensor(v) and v.dim() > 0 and v.numel() == fg.numel:
                        st[k] = v[o:o + n].view(shape).clone()
                    else:
                        st[k] = v.clone() if torch.is_tensor(v) else v
                if st:
                    state[base + j] = st
            groups.append({**g, "params": list(range(base, base + len(fg.params)))})
            base += len(fg.params)
        return {"state": state, "param_groups": groups}

    def state_dict_flat(self, sd: dict) -> dict:
        if len(sd["param_groups"]) != len(self.groups):
            raise ValueError(f"the saved optimizer has {len(sd['param_groups'])} parameter groups, this run "
                             f"{len(self.groups)}")
        state, groups = {}, []
        for gi, (fg, g) in enumerate(zip(self.groups, sd["param_groups"])):
            ids = list(g["params"])
            if len(ids) != len(fg.params):
                raise ValueError(f"the saved optimizer group {gi} holds {len(ids)} weights, this run {len(fg.params)}")
            per = [sd["state"].get(ids[j]) for j in fg.used]
            have = [s for s in per if s]
            if have:
                st = {}
                shaped = [(s, fg.params[j].shape) for j, s in zip(fg.used, per) if s]
                for k, v0 in have[0].items():
                    # per-element state (exp_avg...) has each weight's shape; a 0-dim weight's (use_scalar's
                    # scalar) is 0-dim too, so it is told from "step" by the other weights of the group
                    if all(torch.is_tensor(s[k]) and s[k].shape == shp for s, shp in shaped) and any(
                            len(shp) for _, shp in shaped):
                        parts = []
                        for j, s in zip(fg.used, per):
                            p = fg.params[j]
                            parts.append(s[k].reshape(-1) if s else torch.zeros(p.numel(), dtype=v0.dtype,
                                                                              device=v0.device))
                        st[k] = torch.cat(parts)
                    else:
                        vals = {float(s[k]) for s in have}
                        if len(vals) > 1:
                            raise ValueError(f"the saved optimizer state has different {k!r} values per weight, "
                                             "which one flat buffer cannot hold")
                        st[k] = v0.clone() if torch.is_tensor(v0) else v0
                state[gi] = st
            groups.append({**g, "params": [gi]})
        return {"state": state, "param_groups": groups}


def load_optimizer_state(optimizer, sd: dict):
    """``load_state_dict`` but keep this optimizer's implementation flags (fused / foreach / capturable): torch
    would take them from the file, turning a fused optimizer back into a per-tensor one."""
    impl = [{k: g[k] for k in _IMPL_KEYS if k in g} for g in optimizer.param_groups]
    optimizer.load_state_dict(sd)
    for g, keep in zip(optimizer.param_groups, impl):
        g.update(keep)


def unused_text_encoder_params(net, encode: Callable[[], dict], params: list[torch.Tensor]) -> set[int]:
    """ids of the LoRA weights a text-encoder forward gives no gradient to (layers after the clip-skip layer):
    one small forward/backward with dropout off, grads put back as they were."""
    saved = [p.grad for p in params]
    was = net.training
    for p in params:
        p.grad = None
    net.eval()
    try:
        with torch.enable_grad():
            out = encode()
            total = sum(v.float().sum() for v in out.values() if torch.is_tensor(v) and v.requires_grad)
            if torch.is_tensor(total):
                total.backward()
        return {id(p) for p in params if p.grad is None}
    finally:
        for p, g in zip(params, saved):
            p.grad = g
        net.train(was)


# ---- timestep embedding -------------------------------------------------------------------------------------
@contextmanager
def _swapped(mod, name: str, fn):
    """``mod.<name> = fn`` while inside; put back on exit unless somebody else replaced it meanwhile."""
    orig = getattr(mod, name)
    setattr(mod, name, fn)
    try:
        yield
    finally:
        if getattr(mod, name, None) is fn:
            setattr(mod, name, orig)


@contextmanager
def cached_timestep_embedding(unet: nn.Module):
    """Replace the ``timestep_embedding`` the UNet's module calls by one that keeps ldm's frequency table (same
    CPU formula, same values) on the timesteps' device, for integer timesteps; anything else goes to whatever was
    there (the WebUI's own wrapper included). Put back on exit."""
    mod = sys.modules.get(type(unet).__module__)
    orig = getattr(mod, "timestep_embedding", None) if mod is not None else None
    if not callable(orig):
        yield False
        return
    cache: dict = {}

    def timestep_embedding(timesteps, dim, max_period=10000, repeat_only=False, *args, **kwargs):
        if (repeat_only or args or kwargs or not torch.is_tensor(timesteps) or timesteps.dim() != 1
                or timesteps.dtype not in (torch.int64, torch.int32)):
            return orig(timesteps, dim, max_period, repeat_only, *args, **kwargs)
        key = (dim, max_period, timesteps.device)
        freqs = cache.get(key)
        if freqs is None:
            half = dim // 2
            freqs = torch.exp(-math.log(max_period) * torch.arange(start=0, end=half, dtype=torch.float32) / half)
            freqs = cache[key] = freqs.to(timesteps.device)[None]
        args_ = timesteps[:, None].float() * freqs
        emb = torch.cat([torch.cos(args_), torch.sin(args_)], dim=-1)
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    with _swapped(mod, "timestep_embedding", timestep_embedding):
        yield True


@contextmanager
def sync_free_clip_mask():
    """transformers' CLIP (4.30, the WebUI's pin) builds its causal mask with ``torch.full(..., torch.tensor(min,
    device=d))``: a host->device copy and an ``.item()`` in every text-encoder forward, i.e. two syncs per step when
    the text encoder is trained. Same mask, made once per (length, dtype, device) without either; used only if it
    gives the original's exact values, put back on exit."""
    mod = sys.modules.get("transformers.models.clip.modeling_clip")
    orig = getattr(mod, "_make_causal_mask", None) if mod is not None else None
    if not callable(orig):
        yield False
        return
    cache: dict = {}

    def _make_causal_mask(input_ids_shape, dtype, device, past_key_values_length=0):
        bsz, tgt_len = input_ids_shape
        if past_key_values_length:
            return orig(input_ids_shape, dtype, device, past_key_values_length)
        key = (tgt_len, dtype, torch.device(device))
        mask = cache.get(key)
        if mask is None:
            mask = torch.full((tgt_len, tgt_len), torch.finfo(dtype).min, device=device)
            cond = torch.arange(tgt_len, device=device)
            mask.masked_fill_(cond < (cond + 1).view(tgt_len, 1), 0)
            mask = cache[key] = mask.to(dtype)
        return mask[None, None, :, :].expand(bsz, 1, tgt_len, tgt_len)

    try:
        same = all(torch.equal(_make_causal_mask((2, 5), dt, "cpu"), orig((2, 5), dt, "cpu"))
                   for dt in (torch.float32, torch.float16))
    except Exception:  # a transformers version with another signature: leave it alone
        same = False
    cache.clear()
    if not same:
        yield False
        return
    with _swapped(mod, "_make_causal_mask", _make_causal_mask):
        yield True


# ---- inputs -------------------------------------------------------------------------------------------------
def to_device_async(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host tensor -> device without a blocking copy (pinned memory, non_blocking) on CUDA."""
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class InputCache:
    """The cached latents, per-sample loss weights and SDXL size numbers stacked per latent shape (= bucket),
    gathered per step by one ``index_select`` with an index tensor sent asynchronously; on the device when the
    whole cache fits ``budget`` bytes, else in (pinned) host memory."""

    def __init__(self, latents: dict, weights: dict, sizes: dict | None, device: torch.device,
                 budget: int = DEVICE_CACHE_BYTES, masks: dict | None = None):
        self.device = device
        by_shape: dict[tuple, list] = {}
        for key, z in latents.items():
            by_shape.setdefault(tuple(z.shape), []).append(key)
        total = sum(z.numel() * z.element_size() for z in latents.values())
        if device.type == "cuda":
            budget = min(budget, torch.cuda.get_device_properties(device).total_memory // 16)
        self.on_device = device.type == "cpu" or total <= budget
        self.where: dict = {}
        self.tables: list[dict] = []
        for b, keys in enumerate(by_shape.values()):
            tab = {"x0": torch.stack([latents[k] for k in keys]),
                   "w": torch.tensor([float(weights[k]) for k in keys], dtype=torch.float32)}
            if sizes is not None:
                tab["sizes"] = torch.tensor([[float(v) for pair in sizes[k] for v in pair] for k in keys],
                                            dtype=torch.float32)
            if masks:  # alpha_mask: images without one weigh every latent pixel 1
                z = latents[keys[0]]
                tab["mask"] = torch.stack([masks[k] if k in masks else torch.ones(1, *z.shape[1:]) for k in keys])
            for name, t in tab.items():
                if self.on_device:
                    tab[name] = t.to(device)
                elif device.type == "cuda":
                    tab[name] = t.pin_memory()
            self.tables.append(tab)
            for r, k in enumerate(keys):
                self.where[k] = (b, r)

    def gather(self, keys) -> dict:
        places = [self.where[k] for k in keys]
        b = places[0][0]
        if any(p[0] != b for p in places):
            raise ValueError("a batch mixes latents of different sizes (buckets)")
        idx = torch.tensor([p[1] for p in places], dtype=torch.long)
        tab = self.tables[b]
        if self.on_device:
            idx = to_device_async(idx, self.device)
            return {k: t.index_select(0, idx) for k, t in tab.items()}
        return {k: to_device_async(t.index_select(0, idx), self.device) for k, t in tab.items()}


def sdxl_y(pooled: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """``conditioning.sdxl_vector`` from a [B, 6] device tensor (original h,w, crop top,left, target h,w):
    same values, no tensor built from host data inside the step."""
    b = pooled.shape[0]
    embs = [_sin_embedding(sizes[:, k:k + 2].flatten(), 256).reshape(b, 512) for k in (0, 2, 4)]
    return torch.cat([pooled.float(), *embs], dim=-1).to(pooled.dtype)


@dataclass
class StepBatch:
    """What one micro-batch needs, already on the device. ``cond``: {'crossattn', SDXL 'pooled'} or a function
    computing it inside the step (text encoder trained). SDXL: ``sizes`` [B, 6] (fast) or ``size_cond`` (the
    (original, crop, target) pairs per sample, for ``sdxl_vector``)."""
    x0: torch.Tensor
    weights: torch.Tensor
    cond: dict | Callable[[], dict]
    step_seed: int
    noise_seed: int
    sizes: torch.Tensor | None = None
    size_cond: list | None = None
    mask: torch.Tensor | None = None  # alpha_mask loss weights [B, 1, h, w]


# ---- the step -----------------------------------------------------------------------------------------------
class InStepCond:
    """Text conditioning the step computes itself (text encoder trained): ``encode(tokens)``, tokens already on the
    device (a tensor, or a tuple of them for SDXL's two encoders). Callable, for the eager step."""

    def __init__(self, encode: Callable, tokens):
        self.encode, self.tokens = encode, tokens

    def __call__(self) -> dict:
        return self.encode(self.tokens)

    def token_list(self) -> list[torch.Tensor]:
        return list(self.tokens) if isinstance(self.tokens, tuple) else [self.tokens]

    def rebuild(self, toks: list[torch.Tensor]):
        return tuple(toks) if isinstance(self.tokens, tuple) else toks[0]


class CudaGraphs:
    """The torch.cuda calls of the graph path, in one place: the CPU tests put an emulation in its place
    (tests/test_train_graphs.py) to check everything around them without a GPU."""

    def available(self, device: torch.device) -> bool:
        return device.type == "cuda" and torch.cuda.is_available()

    def synchronize(self):
        torch.cuda.synchronize()

    @contextmanager
    def side_stream(self):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            yield
        torch.cuda.current_stream().wait_stream(side)

    def capture(self, body: Callable[[], torch.Tensor], pool):
        """Record ``body`` (Python runs once, kernels are recorded, not run); returns (graph, output, pool)."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
            out = body()
        return graph, out, graph.pool()


@dataclass
class _Graph:
    graph: object
    inputs: dict
    loss: torch.Tensor
    checked: bool = False
    post: dict = field(default_factory=dict)  # post_update's outputs as the body made them (static on a GPU)


# warm-up steps per shape before capture (torch's recipe: let lazy state, cuDNN/cuBLAS choices settle first)
GRAPH_WARMUP = 2
# the first replay of each graph is checked against an eager step from the same state (relative difference of the
# weight update, of the loss): a graph that does not reproduce the eager step is dropped, never trained with
GRAPH_CHECK_TOL = 2e-2


class StepRunner:
    """Forward + backward (+ optimizer every ``accum`` micro-batches) with no host sync inside.

    ``flat``: a ``FlatParams`` whose buffers the optimizer holds (per-weight grads gathered into them before the
    update), else ``params`` are the LoRA weights the optimizer holds. ``capture``: CUDA graphs per input shape
    (module doc); only whole steps (``step``) are replayed, the rest runs eagerly. ``graphs_backend``: the
    ``CudaGraphs`` calls (tests emulate them on the CPU).
    """

    def __init__(self, unet, schedule, optimizer, scheduler, *, device: torch.device, params=None,
                 flat: FlatParams | None = None, amp_dtype=None, scaler=None, max_grad_norm=0.0, noise_offset=0.0,
                 min_timestep=0, max_timestep=None, min_snr_gamma=None, accum=1, sdxl=False, capture=False,
                 module_dropout=False, on_note=None, loss_opts: LossOptions | None = None, host_blockers=(),
                 graphs_backend: CudaGraphs | None = None, capture_asked: bool = True, compile_backend=None,
                 post_update: Callable[[], object] | None = None,
                 pre_micro: Callable[[StepBatch], object] | None = None):
        self.unet, self.schedule, self.optimizer, self.scheduler = unet, schedule, optimizer, scheduler
        self.device = torch.device(device)
        self.flat = flat
        self.params = list(params) if params is not None else []
        self.grad_params = flat.grad_params() if flat is not None else self.params
        self.amp_dtype, self.scaler = amp_dtype, scaler
        self.max_grad_norm = float(max_grad_norm or 0.0)
        self.noise_offset = float(noise_offset or 0.0)
        self.min_t = int(min_timestep or 0)
        self.max_t = int(max_timestep or schedule.num_timesteps)
        self.min_snr_gamma = min_snr_gamma
        # sd-scripts' noise/loss switches; None keeps the plain ε/v MSE (+ min-SNR, noise offset above)
        self.loss_opts = loss_opts
        self.accum = max(1, int(accum))
        self.sdxl = sdxl
        self.note = on_note or (lambda text: None)
        self.gen = torch.Generator(device=self.device)  # one per run, re-seeded per step
        self.cg = graphs_backend or CudaGraphs()
        if hasattr(self.cg, "bind"):  # the CPU emulation in the tests watches the runner's state
            self.cg.bind(self)
        # device-only work after every optimizer step (scale_weight_norms); its result is kept for the log
        self.post_update, self.post_result = post_update, None
        self.pre_micro = pre_micro  # host work before each eager micro-batch (networks.dylora's rank draws)
        # torch.compile of the UNet (``compile_backend``: 'inductor' or another dynamo backend); the module itself
        # is untouched, the compiled wrapper only lives in this runner. A first call that fails to compile falls
        # back to the plain UNet with a note.
        self.unet_call = unet
        self.compiled = None
        if compile_backend:
            try:
                self.unet_call = torch.compile(unet, backend=compile_backend, dynamic=False)
                self.compiled = "pending"
            except Exception as e:  # no compiler stack in this torch build
                self.note(f"torch_compile off: {type(e).__name__}: {e}")
        self.graphs: dict[tuple, _Graph | None] | None = None
        self.graph_stats = {"captured": 0, "replays": 0, "eager": 0, "dropped": 0}
        self._warm: dict[tuple, int] = {}
        self._pool = None
        self._lr_t: list[torch.Tensor] = []
        self.capture_blockers = (self._capture_blockers(module_dropout) + list(host_blockers)
                                 if capture else ["not asked for"])
        if capture:
            if self.capture_blockers:
                if capture_asked or self.device.type == "cuda":  # default on a CPU: nothing to say
                    self.note("CUDA graphs off: " + "; ".join(self.capture_blockers) + " (the eager step is used)")
            else:
                self.graphs = {}
                for g in optimizer.param_groups:  # state["step"] on the device, graph-safe step()
                    g["capturable"] = True
                self._lr_t = [torch.tensor(float(g["lr"]), device=self.device) for g in optimizer.param_groups]

    # ---- eager -------------------------------------------------------------------------------------------
    def amp(self, cache_enabled: bool = True):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype, cache_enabled=cache_enabled)

    def _draw(self, b: StepBatch):
        torch.manual_seed(b.step_seed)  # LoRA dropout and anything else on the global generators
        self.gen.manual_seed(b.noise_seed)
        noise = sample_noise(b.x0, self.gen, self.noise_offset, self.loss_opts, random.Random(b.noise_seed))
        t = sample_timesteps(b.x0.shape[0], self.gen, self.device, self.min_t, self.max_t)
        self._in_noise = input_noise(noise, self.gen, self.loss_opts)  # ip_noise_gamma: what the model sees
        return noise, t

    def _y(self, b: StepBatch, cond: dict):
        if not self.sdxl:
            return None
        if b.sizes is not None:
            return sdxl_y(cond["pooled"], b.sizes)
        sc = b.size_cond
        return sdxl_vector(cond["pooled"], [s[0] for s in sc], [s[1] for s in sc], [s[2] for s in sc])

    def _loss(self, x0, ctx, y, weights, noise, t, in_noise=None, mask=None):
        noisy = self.schedule.add_noise(x0, noise if in_noise is None else in_noise, t)
        unet = self.unet_call
        pred = unet(noisy, t, context=ctx, y=y) if y is not None else unet(noisy, t, context=ctx)
        return denoising_loss(pred, self.schedule.target(x0, noise, t), t, self.schedule, weights,
                              self.min_snr_gamma, opts=self.loss_opts, mask=mask)

    def micro(self, b: StepBatch) -> torch.Tensor:
        """Forward and backward of one micro-batch; returns its loss (a detached device tensor)."""
        if self.compiled == "pending":
            return self._first_compiled_micro(b)
        with record_function(STEP_MARK):
            if self.pre_micro is not None:
                self.pre_micro(b)
            noise, t = self._draw(b)
            with self.amp():
                cond = b.cond() if callable(b.cond) else b.cond
                loss = self._loss(b.x0, cond["crossattn"], self._y(b, cond), b.weights, noise, t, self._in_noise,
                                  b.mask)
            scaled = loss / self.accum if self.accum != 1 else loss
            (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            return loss.detach()

    def _first_compiled_micro(self, b: StepBatch) -> torch.Tensor:
        """The compile happens in the first forward and backward: if it fails, say why and run this micro-batch
        (and the rest of the run) with the plain UNet. Nothing was updated yet, only gradients may be partial."""
        self.compiled = "running"
        try:
            loss = self.micro(b)
        except Exception as e:  # any compiler failure (no C++/Triton toolchain, unsupported op, ...)
            if isinstance(e, torch.cuda.OutOfMemoryError):
                raise
            inner = getattr(e, "inner_exception", None) or e.__cause__ or e  # dynamo wraps the compiler's error
            text = str(inner).strip().splitlines()
            self.note(f"torch_compile failed ({type(inner).__name__}: {text[0][:300] if text else ''}); "
                      "training goes on with the plain UNet")
            self.unet_call, self.compiled = self.unet, None
            if self.flat is not None:
                self.flat.zero_grad()
            for p in self.params:
                p.grad = None
            return self.micro(b)
        self.compiled = True
        return loss

    def update(self):
        """Unscale, clip, optimizer step, LR schedule, zero grads."""
        with record_function(STEP_MARK):
            self._update_core()
            self.scheduler.step()

    def _update_core(self):
        if self.flat is not None:
            self.flat.gather_grads()
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.max_grad_norm:
            # no error_if_nonfinite: that check reads the norm back to the host
            torch.nn.utils.clip_grad_norm_(self.grad_params, self.max_grad_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # no sync with a fused AdamW; torch reads found_inf back otherwise
            self.scaler.update()
        else:
            self.optimizer.step()
        if self.flat is not None:
            self.flat.zero_grad()
        else:
            self.optimizer.zero_grad(set_to_none=True)
        if self.post_update is not None:
            self.post_result = self.post_update()

    def step(self, b: StepBatch) -> torch.Tensor:
        """A whole step (accum 1): replayed from a CUDA graph when capture is on and possible."""
        if self.graphs is not None:
            return self._graph_step(b)
        return self._eager_step(b)

    def _eager_step(self, b):
        loss = self.micro(b)
        self.update()
        return loss

    # ---- CUDA graphs: one per input shape, captured lazily, each checked once against the eager step ---------
    def _capture_blockers(self, module_dropout: bool) -> list[str]:
        out = []
        if not self.cg.available(self.device):
            out.append("needs a CUDA device")
        fused = bool(self.optimizer.defaults.get("fused")) or all(g.get("fused") for g in self.optimizer.param_groups)
        if self.scaler is not None and not fused:
            out.append("fp16 GradScaler reads found_inf back unless AdamW is fused")
        if self.accum != 1:
            out.append("gradient_accumulation_steps > 1")
        if module_dropout:
            out.append("module_dropout decides on the host")
        if not isinstance(self.optimizer, torch.optim.AdamW):
            out.append("only torch AdamW is captured")
        if self.loss_opts is not None and self.loss_opts.ip_noise_gamma:
            out.append("ip_noise_gamma feeds a second noise tensor")
        return out

    def _sources(self, b: StepBatch, noise, t) -> dict:
        """The step's inputs by name; the graph copies them into its own buffers before each replay."""
        src = {"x0": b.x0, "w": b.weights, "noise": noise, "t": t}
        if isinstance(b.cond, InStepCond):
            src.update({f"tok{i}": tk for i, tk in enumerate(b.cond.token_list())})
        else:
            src["ctx"] = b.cond["crossattn"]
            if self.sdxl:
                src["pooled"] = b.cond["pooled"]
        if self.sdxl:
            src["sizes"] = b.sizes
        if b.mask is not None:
            src["mask"] = b.mask
        return src

    def _graph_key(self, b: StepBatch):
        """Inputs of one shape share a graph; None: this batch cannot be replayed (runs eagerly)."""
        if self.sdxl and b.sizes is None:  # sizes as host lists (fast path off): not graph-safe
            return None
        if isinstance(b.cond, InStepCond):
            parts = tuple(tuple(tk.shape) for tk in b.cond.token_list())
        elif callable(b.cond):
            return None
        else:
            parts = (tuple(b.cond["crossattn"].shape), tuple(b.cond["pooled"].shape) if self.sdxl else None)
        return (tuple(b.x0.shape), b.mask is not None) + parts

    def _graph_step(self, b: StepBatch) -> torch.Tensor:
        key = self._graph_key(b)
        if key is None or (key in self.graphs and self.graphs[key] is None):
            self.graph_stats["eager"] += 1
            return self._eager_step(b)
        entry = self.graphs.get(key)
        if entry is None:
            n = self._warm.get(key, 0)
            if n < GRAPH_WARMUP:  # real steps, on a side stream as torch's capture recipe asks
                self._warm[key] = n + 1
                with self.cg.side_stream():
                    loss = self._eager_step(b)
                return loss
            entry = self.graphs[key] = self._capture(b)
            if entry is None:
                self.graph_stats["eager"] += 1
                return self._eager_step(b)
        if not entry.checked:
            return self._checked_replay(key, entry, b)
        noise, t = self._draw(b)
        self._replay(entry, b, noise, t)
        self.scheduler.step()
        return entry.loss.clone()

    def _replay(self, entry: _Graph, b: StepBatch, noise, t):
        for k, v in self._sources(b, noise, t).items():
            entry.inputs[k].copy_(v)
        for g, lt in zip(self.optimizer.param_groups, self._lr_t):
            lt.fill_(float(g["lr"]))
        entry.graph.replay()
        self.graph_stats["replays"] += 1
        if "result" in entry.post:
            self.post_result = entry.post["result"]

    def _state_tensors(self) -> list[torch.Tensor]:
        """Everything a step changes: the LoRA weights, the optimizer state, the GradScaler's scale."""
        ts = list(self.grad_params)
        for st in self.optimizer.state.values():
            ts += [v for v in st.values() if torch.is_tensor(v)]
        if self.scaler is not None:
            ts += [t for t in (getattr(self.scaler, "_scale", None), getattr(self.scaler, "_growth_tracker", None))
                   if torch.is_tensor(t)]
        return ts

    def _checked_replay(self, key, entry: _Graph, b: StepBatch) -> torch.Tensor:
        """First replay of a graph: the same step run eagerly from the same state, state put back, then the graph;
        the graph is kept only if both give the same weight update and loss (one host read, once per shape)."""
        state = self._state_tensors()
        before = [s.detach().clone() for s in state]
        loss_e = self.micro(b)  # same seeds: the same noise and timesteps as the graph gets
        self._update_core()
        after_e = [p.detach().clone() for p in self.grad_params]
        with torch.no_grad():
            for s, v in zip(state, before):
                s.copy_(v)
        noise, t = self._draw(b)  # re-seeds the global generators too (LoRA dropout inside the step)
        self._replay(entry, b, noise, t)
        with torch.no_grad():
            num = sum(((p.detach() - e) ** 2).sum() for p, e in zip(self.grad_params, after_e))
            den = sum(((e - v) ** 2).sum() for e, v in zip(after_e, before))
            rel_w = float((num / den.clamp_min(1e-30)) ** 0.5)
            rel_l = float((entry.loss.float() - loss_e.float()).abs() / loss_e.float().abs().clamp_min(1e-12))
        if not (rel_w <= GRAPH_CHECK_TOL and rel_l <= GRAPH_CHECK_TOL):
            self.note(f"CUDA graph for inputs {tuple(b.x0.shape)} does not reproduce the eager step (weight update "
                      f"differs by {rel_w:.1e}, loss by {rel_l:.1e}); that shape runs the eager step")
            with torch.no_grad():  # keep the eager step's result
                for s, v in zip(state, before):
                    s.copy_(v)
            self.graphs[key] = None
            self.graph_stats["dropped"] += 1
            loss = self._eager_step(b)
            return loss
        entry.checked = True
        self.scheduler.step()
        return entry.loss.clone()

    def _graph_body(self, i: dict, cond0) -> torch.Tensor:
        # autocast's weight cache would hand the graph tensors made outside it
        with self.amp(cache_enabled=False):
            if isinstance(cond0, InStepCond):
                cond = cond0.encode(cond0.rebuild([i[f"tok{j}"] for j in range(len(cond0.token_list()))]))
            else:
                cond = {"crossattn": i["ctx"], **({"pooled": i["pooled"]} if self.sdxl else {})}
            y = sdxl_y(cond["pooled"], i["sizes"]) if self.sdxl else None
            loss = self._loss(i["x0"], cond["crossattn"], y, i["w"], i["noise"], i["t"], mask=i.get("mask"))
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        self._update_core()
        return loss.detach()

    def _capture(self, b: StepBatch) -> _Graph | None:
        noise, t = self._draw(b)
        inputs = {k: v.detach().clone() for k, v in self._sources(b, noise, t).items()}
        groups = self.optimizer.param_groups
        cond0 = b.cond
        post: dict = {}

        def body():
            lrs = [g["lr"] for g in groups]
            for g, lt in zip(groups, self._lr_t):
                g["lr"] = lt  # the graph reads the LR from this tensor, filled before every replay
            try:
                loss = self._graph_body(inputs, cond0)
                if self.post_update is not None:
                    post["result"] = self.post_result
                return loss
            finally:
                for g, lr in zip(groups, lrs):
                    g["lr"] = lr

        try:
            for g, lt in zip(groups, self._lr_t):
                lt.fill_(float(g["lr"]))
            self.cg.synchronize()
            graph, loss, self._pool = self.cg.capture(body, self._pool)
        except Exception as e:  # reported, then this shape runs eagerly: the run goes on
            self.note(f"CUDA graph capture failed for inputs {tuple(b.x0.shape)} ({type(e).__name__}: {e}); "
                      "that shape runs the eager step")
            self.graph_stats["dropped"] += 1
            try:
                self.cg.synchronize()
            except Exception:  # the capture error is what matters; it was reported above
                pass
            return None
        self.graph_stats["captured"] += 1
        # capture records without running: the caller replays it for this step
        return _Graph(graph, inputs, loss, post=post)


# ---- counting ---------------------------------------------------------------------------------------------
@dataclass
class OpCount:
    """aten ops in the marked ranges: ``top`` = dispatched from Python or autograd (each a host-side launch on a
    GPU, bar views), ``total`` = including ops nested in them; ``syncs`` / ``host_data`` = offending ops."""
    top: float = 0.0
    total: float = 0.0
    syncs: list = field(default_factory=list)
    host_data: list = field(default_factory=list)
    kernel_internal: list = field(default_factory=list)  # sync ops inside a CPU fused-optimizer kernel
    ranges: int = 0


def step_ops(prof) -> OpCount:
    """aten ops that ran inside a ``STEP_MARK`` range of a finished ``torch.profiler.profile``, on any thread (a GPU's
    backward runs on autograd's device thread), averaged per range."""
    import bisect

    out = OpCount()
    events = list(prof.events())
    marks = sorted((e.time_range.start, e.time_range.end) for e in events if e.name == STEP_MARK)
    # merged outer ranges (micro and update of one step are separate ranges; nested ranges count once)
    ranges: list[list[int]] = []
    for s, e in marks:
        if ranges and s <= ranges[-1][1]:
            ranges[-1][1] = max(ranges[-1][1], e)
        else:
            ranges.append([s, e])
    starts = [r[0] for r in ranges]
    for e in events:
        if not e.name.startswith("aten::"):
            continue
        i = bisect.bisect_right(starts, e.time_range.start) - 1
        if i < 0 or e.time_range.end > ranges[i][1]:
            continue
        out.total += 1
        if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"):
            out.top += 1
        if e.name in SYNC_OPS:
            p = e.cpu_parent
            while p is not None and p.name not in KERNEL_INTERNAL:
                p = p.cpu_parent
            (out.syncs if p is None else out.kernel_internal).append(e.name)
        if e.name in HOST_DATA_OPS:
            out.host_data.append(e.name)
    out.ranges = len(marks)
    return out
