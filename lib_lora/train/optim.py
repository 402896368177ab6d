"""Optimizers and learning-rate schedules as sd-scripts offers them.

Schedules are the formulas of transformers'/diffusers' ``get_scheduler`` (which sd-scripts uses), written as
LambdaLR multipliers so their state is just the step count (resumable, no host sync).
Optional optimizers (bitsandbytes, prodigyopt, lion-pytorch) are used when importable and never installed for the
user: a missing one is a clear error that says what to install or which optimizer to pick instead.
"""

from __future__ import annotations

import ast
import importlib
import math

import torch

SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial",
              "cosine_with_min_lr", "warmup_stable_decay", "inverse_sqrt", "piecewise_constant", "adafactor")
OPTIMIZERS = ("AdamW", "AdamW8bit", "Lion", "Lion8bit", "Prodigy", "Adafactor", "SGDNesterov")


class OptimizerUnavailable(RuntimeError):
    user_error = True


def _lr_lambda(name: str, warmup: int, total: int, cycles: float = 1, power: float = 1.0,
               min_lr_ratio: float | None = None, decay_steps: int = 0, args: dict | None = None,
               lr_end_ratio: float = 1e-7):
    """The LR multiplier per step, as transformers' schedules compute it (diffusers' for piecewise_constant). The
    newer ones get the arguments sd-scripts hands them: num_cycles / 2, min_lr_ratio, lr_decay_steps,
    lr_scheduler_args (tests/data/lr_schedules_reference.json holds transformers 5.17's numbers for them)."""
    warmup = max(0, int(warmup))
    total = max(1, int(total))
    args = args or {}

    def warm(step):
        return float(step) / float(max(1, warmup))

    def cosine(half: float, mn: float):
        def f(step):
            if step < warmup:
                return warm(step)
            progress = float(step - warmup) / float(max(1, total - warmup))
            factor = 0.5 * (1.0 + math.cos(math.pi * half * 2.0 * progress))
            return max(0.0, factor * (1 - mn) + mn)
        return f

    if name in ("constant", "adafactor"):  # adafactor: transformers' AdafactorSchedule, the optimizer sets its LR
        return lambda step: 1.0
    if name == "constant_with_warmup":
        return lambda step: warm(step) if step < warmup else 1.0
    if name == "linear":
        return lambda step: warm(step) if step < warmup else max(0.0, float(total - step) / float(max(1, total - warmup)))
    if name == "cosine":
        return cosine(0.5, 0.0)
    if name == "cosine_with_min_lr":
        return cosine(float(cycles or 1) / 2, float(min_lr_ratio or 0.0))
    if name == "cosine_with_restarts":
        def f(step):
            if step < warmup:
                return warm(step)
            progress = float(step - warmup) / float(max(1, total - warmup))
            if progress >= 1.0:
                return 0.0
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((float(cycles) * progress) % 1.0))))
        return f
    if name == "polynomial":
        def f(step):
            if step < warmup:
                return warm(step)
            if step > total:
                return lr_end_ratio
            remaining = 1 - (step - warmup) / max(1, total - warmup)
            return (1 - lr_end_ratio) * remaining ** power + lr_end_ratio
        return f
    if name == "warmup_stable_decay":
        half, mn = float(cycles or 1) / 2, float(min_lr_ratio or 0.0)
        decay = int(decay_steps)
        stable = total - warmup - decay
        if stable < 0:
            raise ValueError(f"lr_decay_steps {decay} + lr_warmup_steps {warmup} are more than the run's {total} "
                             "steps: shorten one of them")

        def f(step):
            if step < warmup:
                return max(0.0, warm(step) * (1.0 - mn) + mn)
            if step < warmup + stable:
                return 1.0
            if step < warmup + stable + decay:
                progress = float(step - warmup - stable) / float(max(1, decay))
                value = 0.5 * (1.0 + math.cos(math.pi * half * 2.0 * progress))
                return max(0.0, value * (1.0 - mn) + mn)
            return mn
        return f
    if name == "inverse_sqrt":
        timescale = float(args.get("timescale") or (warmup or 10_000))

        def f(step):
            if step < warmup:
                return warm(step)
            return 1.0 / math.sqrt((step + timescale - warmup) / timescale)
        return f
    if name == "piecewise_constant":
        rules = str(args.get("step_rules") or "").strip()
        if not rules:
            raise ValueError('lr_scheduler = "piecewise_constant" needs lr_scheduler_args = ["step_rules=1:10,0.1:20,'
                             '0.01"] (LR multiple:until step, ..., last multiple)')
        try:
            parts = rules.split(",")
            steps_values = sorted((int(r.split(":")[1]), float(r.split(":")[0])) for r in parts[:-1])
            last = float(parts[-1])
        except (ValueError, IndexError):
            raise ValueError(f"step_rules {rules!r} not understood: write e.g. 1:10,0.1:20,0.01") from None

        def f(step):
            for until, value in steps_values:
                if step < until:
                    return value
            return last
        return f
    raise ValueError(f"unknown lr_scheduler {name!r}; choose one of: {', '.join(SCHEDULERS)}")


def make_scheduler(optimizer, name: str, warmup_steps: int, total_steps: int, num_cycles: int = 1, power: float = 1.0,
                   min_lr_ratio: float | None = None, decay_steps: int = 0, args: dict | None = None):
    f = _lr_lambda(name, warmup_steps, total_steps, num_cycles, power, min_lr_ratio, decay_steps, args)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, [f] * len(optimizer.param_groups))


# torch schedulers a config cannot build: they need Python callables, other schedulers or a metric at every step
_TORCH_SCHEDULERS_REFUSED = {"LRScheduler", "_LRScheduler", "LambdaLR", "MultiplicativeLR", "SequentialLR",
                             "ChainedScheduler", "ReduceLROnPlateau"}
_TORCH_PREFIX = "torch.optim.lr_scheduler."


def torch_schedulers() -> list[str]:
    mod = torch.optim.lr_scheduler
    return sorted(n for n in dir(mod) if not n.startswith("_") and n not in _TORCH_SCHEDULERS_REFUSED
                  and isinstance(getattr(mod, n), type) and issubclass(getattr(mod, n), mod.LRScheduler))


def torch_scheduler_class(type_name: str):
    """sd-scripts' ``lr_scheduler_type``: a torch.optim.lr_scheduler class, by name or dotted path. Classes of
    other packages are not imported (a config sent over the HTTP API must not be able to run any module's code);
    ValueError says what to use instead."""
    name = type_name.strip()
    if name.startswith(_TORCH_PREFIX):
        name = name[len(_TORCH_PREFIX):]
    choices = torch_schedulers()
    if name not in choices:
        why = ("only torch's own schedulers (torch.optim.lr_scheduler) can be named here; classes of other "
               "packages are not imported" if "." in name else
               "this is not one of torch's schedulers that a config can build")
        raise ValueError(f"lr_scheduler_type = {type_name!r}: {why}. Choose one of {', '.join(choices)}, or leave "
                         f"lr_scheduler_type empty and set lr_scheduler to one of {', '.join(SCHEDULERS)}")
    return getattr(torch.optim.lr_scheduler, name)


def literal_args(items) -> dict:
    """``key=value`` strings with Python-literal values, as sd-scripts reads lr_scheduler_args (ast.literal_eval;
    a value that is no literal stays a string)."""
    out = {}
    for item in items or []:
        key, sep, value = str(item).partition("=")
        if not sep:
            raise ValueError(f"lr_scheduler_args entry {item!r} is not key=value")
        try:
            out[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            out[key.strip()] = value.strip()
    return out


def make_torch_scheduler(optimizer, type_name: str, args_items):
    cls = torch_scheduler_class(type_name)
    kwargs = literal_args(args_items)
    try:
        return cls(optimizer, **kwargs)
    except (TypeError, ValueError, KeyError) as e:
        raise ValueError(f"lr_scheduler_type {cls.__name__} refused lr_scheduler_args {list(args_items or [])}: {e} "
                         f"(it takes what torch.optim.lr_scheduler.{cls.__name__} takes, e.g. T_max=1000 for "
                         "CosineAnnealingLR)") from None


def _import(module: str, what: str, hint: str):
    try:
        return importlib.import_module(module)
    except Exception as e:  # an ImportError or a broken native build: both mean "not usable here"
        raise OptimizerUnavailable(f"{what} needs the '{module}' package, which is not usable here ({e}). {hint}") from e


# 8-bit optimizers train like their 32-bit twins (more memory); a missing bitsandbytes falls back with a note
_FALLBACK = {"adamw8bit": "AdamW", "lion8bit": "Lion"}


def effective_optimizer(name: str | None) -> str:
    """The optimizer a run will really use, as a normalised key: an 8-bit one without a usable bitsandbytes trains
    as its 32-bit twin (``make_optimizer(..., notes=...)`` says so)."""
    key = (name or "AdamW").lower().replace("_", "").replace("-", "")
    if key in _FALLBACK:
        try:
            _import("bitsandbytes", key, "")
        except OptimizerUnavailable:
            return _FALLBACK[key].lower()
    return key


def make_optimizer(name: str, param_groups: list[dict], lr: float, weight_decay: float = 0.01, args: dict | None = None,
                   device: torch.device | None = None, notes: list | None = None) -> tuple[torch.optim.Optimizer, str]:
    """Returns (optimizer, description for ss_optimizer). With ``notes`` given, an unusable 8-bit optimizer is
    replaced by its 32-bit twin and the reason appended there; without, it raises OptimizerUnavailable."""
    args = dict(args or {})
    key = name.lower().replace("_", "").replace("-", "")
    if key in _FALLBACK and notes is not None:
        try:
            return make_optimizer(name, param_groups, lr, weight_decay, args, device)
        except OptimizerUnavailable as e:
            twin = _FALLBACK[key]
            notes.append(f"{e} Training with {twin} instead (the same updates, more optimizer memory).")
            return make_optimizer(twin, param_groups, lr, weight_decay, args, device)
    if key in ("adamw", "adamw32bit", "adam"):
        kw = {"weight_decay": weight_decay, **args}
        if device is not None and device.type == "cuda":
            kw.setdefault("fused", True)  # one kernel for every LoRA tensor instead of one per tensor
        opt = torch.optim.AdamW(param_groups, lr=lr, **kw)
        return opt, _describe("torch.optim.adamw.AdamW", kw)
    if key == "adamw8bit":
        bnb = _import("bitsandbytes", "AdamW8bit",
                      "Install bitsandbytes into the WebUI's Python yourself, or choose AdamW (same results, more memory).")
        kw = {"weight_decay": weight_decay, **args}
        return bnb.optim.AdamW8bit(param_groups, lr=lr, **kw), _describe("bitsandbytes.optim.adamw.AdamW8bit", kw)
    if key == "lion8bit":
        bnb = _import("bitsandbytes", "Lion8bit", "Install bitsandbytes yourself, or choose Lion.")
        kw = {"weight_decay": weight_decay, **args}
        return bnb.optim.Lion8bit(param_groups, lr=lr, **kw), _describe("bitsandbytes.optim.lion.Lion8bit", kw)
    if key == "lion":
        kw = {"weight_decay": weight_decay, **args}
        try:
            lion = importlib.import_module("lion_pytorch")
            return lion.Lion(param_groups, lr=lr, **kw), _describe("lion_pytorch.lion_pytorch.Lion", kw)
        except ImportError:
            return Lion(param_groups, lr=lr, **kw), _describe("lib_lora.train.optim.Lion", kw)
    if key == "prodigy":
        prodigy = _import("prodigyopt", "Prodigy", "Install prodigyopt yourself, or choose AdamW.")
        kw = {"weight_decay": weight_decay, **args}
        return prodigy.Prodigy(param_groups, lr=lr, **kw), _describe("prodigyopt.prodigy.Prodigy", kw)
    if key == "adafactor":
        tr = _import("transformers.optimization", "Adafactor", "Choose AdamW instead.")
        # sd-scripts defaults: relative_step off when an lr is given
        kw = {"scale_parameter": False, "relative_step": False, "warmup_init": False, **args}
        return tr.Adafactor(param_groups, lr=lr, weight_decay=weight_decay, **kw), _describe(
            "transformers.optimization.Adafactor", kw)
    if key == "sgdnesterov":
        kw = {"momentum": 0.9, "nesterov": True, "weight_decay": weight_decay, **args}
        return torch.optim.SGD(param_groups, lr=lr, **kw), _describe("torch.optim.sgd.SGD", kw)
    raise ValueError(f"unknown optimizer {name!r}; choose one of: {', '.join(OPTIMIZERS)}")


def _describe(cls: str, kw: dict) -> str:
    shown = {k: v for k, v in kw.items() if k != "fused"}
    return cls + ("(" + ",".join(f"{k}={v}" for k, v in shown.items()) + ")" if shown else "")


class Lion(torch.optim.Optimizer):
    """Lion (Chen et al. 2023), the update lion-pytorch implements; used when that package is absent."""

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                m = state["exp_avg"]
                p.mul_(1 - group["lr"] * group["weight_decay"])
                update = (m * b1 + p.grad * (1 - b1)).sign_()
                p.add_(update, alpha=-group["lr"])
                m.mul_(b2).add_(p.grad, alpha=1 - b2)
        return loss
