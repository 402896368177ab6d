"""Optimizers and learning-rate schedules as sd-scripts offers them.

Schedules are the formulas of transformers'/diffusers' ``get_scheduler`` (which sd-scripts uses), written as
LambdaLR multipliers so their state is just the step count (resumable, no host sync).
Optional optimizers (bitsandbytes, prodigyopt, lion-pytorch) are used when importable and never installed for the
user: a missing one is a clear error that says what to install or which optimizer to pick instead.
"""

from __future__ import annotations

import ast
import difflib
import importlib
import math
import sys

import torch

SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial",
              "cosine_with_min_lr", "warmup_stable_decay", "inverse_sqrt", "piecewise_constant", "adafactor")
OPTIMIZERS = ("AdamW", "AdamW8bit", "PagedAdamW8bit", "Lion", "Lion8bit", "Prodigy", "DAdaptAdam", "Adafactor",
              "AdamWScheduleFree", "RAdamScheduleFree", "SGDNesterov")


class OptimizerUnavailable(RuntimeError):
    user_error = True


class OptimizerNameError(ValueError):
    """optimizer_type names nothing this trainer can build (or a module it must not import)."""


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


def polynomial_end_ratio(args: dict | None, lr_init: float) -> float:
    """polynomial's end LR (``lr_end`` in lr_scheduler_args, transformers' 1e-7 by default) as a share of
    ``lr_init``; ValueError where transformers stops (lr_end not below it)."""
    lr_end = float((args or {}).get("lr_end", 1e-7))
    init = float(lr_init)
    if not lr_end < init:
        raise ValueError(f"lr_scheduler = \"polynomial\" decays to lr_end = {lr_end:g}, which must be smaller than "
                         f"learning_rate ({init:g}); raise learning_rate or set lr_scheduler_args = "
                         '["lr_end=..."]')
    return lr_end / init


def make_scheduler(optimizer, name: str, warmup_steps: int, total_steps: int, num_cycles: int = 1, power: float = 1.0,
                   min_lr_ratio: float | None = None, decay_steps: int = 0, args: dict | None = None,
                   lr_init: float | None = None):
    """``lr_init``: the LR polynomial's end value is measured against; sd-scripts hands transformers the
    optimizer's default LR, its ``learning_rate`` (not unet_lr), so with unet_lr 1e-4 and learning_rate 2e-6
    the UNet ends at 1e-4 · 1e-7/2e-6 = 5e-6."""
    end_ratio = 1e-7
    if name == "polynomial":
        end_ratio = polynomial_end_ratio(args, lr_init if lr_init is not None else optimizer.defaults.get("lr") or 1.0)
    f = _lr_lambda(name, warmup_steps, total_steps, num_cycles, power, min_lr_ratio, decay_steps, args, end_ratio)
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


_IMPORT_FAILED: dict[str, str] = {}  # module -> why: the doctor checks on every edit; a broken package is tried once


def _import(module: str, what: str, hint: str):
    why = _IMPORT_FAILED.get(module)
    if why is None:
        try:
            return importlib.import_module(module)
        except Exception as e:  # an ImportError or a broken native build: both mean "not usable here"
            why = _IMPORT_FAILED[module] = str(e)
    raise OptimizerUnavailable(f"{what} needs the '{module}' package, which is not usable here ({why}). {hint} "
                               "(Restart the WebUI after installing a package.)")


# 8-bit / paged optimizers train like their 32-bit twins (more memory); an unusable bitsandbytes falls back with a note
_FALLBACK = {"adamw8bit": "AdamW", "lion8bit": "Lion", "pagedadamw8bit": "AdamW", "pagedadamw": "AdamW",
             "pagedadamw32bit": "AdamW", "pagedlion8bit": "Lion", "sgdnesterov8bit": "SGDNesterov"}
_BNB = {"adamw8bit": "AdamW8bit", "lion8bit": "Lion8bit", "pagedadamw8bit": "PagedAdamW8bit",
        "pagedadamw": "PagedAdamW", "pagedadamw32bit": "PagedAdamW32bit", "pagedlion8bit": "PagedLion8bit",
        "sgdnesterov8bit": "SGD8bit"}
# sd-scripts' names (train_util.get_optimizer) -> (module, class)
_NAMED = {
    "dadaptation": ("dadaptation.experimental", "DAdaptAdamPreprint"),
    "dadaptadampreprint": ("dadaptation.experimental", "DAdaptAdamPreprint"),
    "dadaptadagrad": ("dadaptation", "DAdaptAdaGrad"), "dadaptadam": ("dadaptation", "DAdaptAdam"),
    "dadaptadan": ("dadaptation", "DAdaptAdan"), "dadaptadanip": ("dadaptation.experimental", "DAdaptAdanIP"),
    "dadaptlion": ("dadaptation", "DAdaptLion"), "dadaptsgd": ("dadaptation", "DAdaptSGD"),
    "prodigy": ("prodigyopt", "Prodigy"),
    "radamschedulefree": ("schedulefree", "RAdamScheduleFree"),
    "adamwschedulefree": ("schedulefree", "AdamWScheduleFree"),
    "sgdschedulefree": ("schedulefree", "SGDScheduleFree"),
}
# packages whose optimizer classes a config may name as "module.Class" (sd-scripts imports any module; a job sent
# over the HTTP API must not make the WebUI import whatever it names)
DOTTED_PACKAGES = ("torch.optim", "bitsandbytes", "pytorch_optimizer", "came_pytorch", "prodigyplus", "prodigyopt",
                   "dadaptation", "schedulefree", "lion_pytorch", "transformers.optimization")


def optimizer_key(name: str | None) -> str:
    return (name or "AdamW").lower().replace("_", "").replace("-", "")


def is_schedule_free(name: str | None) -> bool:
    """sd-scripts' test (is_schedulefree_optimizer): the name ends with schedulefree; these optimizers switch
    between train and eval weights and take no LR schedule."""
    return optimizer_key(name).endswith("schedulefree")


def sets_own_lr(name: str | None, optimizer_args: list[str] | None) -> bool:
    """Schedule-free optimizers and Adafactor with relative_step (its default here and in sd-scripts) take no LR
    schedule and so no warm-up."""
    if is_schedule_free(name):
        return True
    if optimizer_key(name).rsplit(".", 1)[-1] != "adafactor":
        return False
    kw = {k.strip().lower(): v.strip().lower() for k, _, v in (str(a).partition("=") for a in optimizer_args or [])}
    return kw.get("relative_step", "true") != "false" or kw.get("warmup_init", "false") == "true"


def adapts_lr(name: str | None) -> bool:
    """D-Adaptation and Prodigy find their own step size; sd-scripts warns below lr 0.1."""
    k = optimizer_key(name).rsplit(".", 1)[-1]
    return k.startswith("dadapt") or k.startswith("prodigy")


def fallback_twin(name: str | None) -> str | None:
    """The 32-bit optimizer an 8-bit / paged one falls back to without a usable bitsandbytes (None: no twin)."""
    return _FALLBACK.get(optimizer_key(name))


def effective_optimizer(name: str | None) -> str:
    """The optimizer a run will really use, as a normalised key: an 8-bit one without a usable bitsandbytes trains
    as its 32-bit twin (``make_optimizer(..., notes=...)`` says so)."""
    key = optimizer_key(name)
    if key in _FALLBACK:
        try:
            _bnb_class(key)
        except OptimizerUnavailable:
            return _FALLBACK[key].lower()
    return key


def _bnb_class(key: str):
    bnb = _import("bitsandbytes", _BNB[key], "Install bitsandbytes into the WebUI's Python yourself, or choose "
                  f"{_FALLBACK[key]} (same results, more memory).")
    cls = getattr(getattr(bnb, "optim", None), _BNB[key], None)
    if cls is None:
        raise OptimizerUnavailable(f"{_BNB[key]} is not in this bitsandbytes ({getattr(bnb, '__version__', '?')}); "
                                   "update bitsandbytes yourself, or choose " + _FALLBACK[key])
    return cls


def optimizer_class(name: str):
    """The class a name stands for, as sd-scripts resolves it; OptimizerUnavailable when its package is missing,
    OptimizerNameError for a name nothing provides."""
    key = optimizer_key(name)
    if key in ("adamw", "adamw32bit"):
        return torch.optim.AdamW
    if key == "sgdnesterov":
        return torch.optim.SGD
    if key in _BNB:
        return _bnb_class(key)
    if key == "lion":
        try:
            return importlib.import_module("lion_pytorch").Lion
        except ImportError:
            return Lion
    if key == "adafactor":
        return _import("transformers.optimization", "Adafactor", "Choose AdamW instead.").Adafactor
    if key in _NAMED:
        module, cls = _NAMED[key]
        pkg = module.split(".")[0]
        return getattr(_import(module, name, f"Install {pkg} into the WebUI's Python yourself, or choose AdamW."),
                       cls)
    if "." in name:  # "module.Class", e.g. pytorch_optimizer.CAME
        module, _, cls = name.rpartition(".")
        if not any(module == p or module.startswith(p + ".") for p in DOTTED_PACKAGES):
            raise OptimizerNameError(f"optimizer_type {name!r}: optimizers are imported by name from these packages "
                                     f"only: {', '.join(DOTTED_PACKAGES)} (a job must not make the WebUI import "
                                     "other modules)")
        found = getattr(_import(module, name, f"Install {module.split('.')[0]} yourself, or choose AdamW."), cls,
                        None)
        if not (isinstance(found, type) and issubclass(found, torch.optim.Optimizer)):
            mod = sys.modules.get(module)
            close = _close_name(cls, {c.lower(): c for c in _optimizer_classes(mod)}) if mod is not None else None
            raise OptimizerNameError(f"optimizer_type {name!r}: {module} has no optimizer class {cls!r}"
                                     + (f"; did you mean {module}.{close}?" if close else ""))
        return found
    found = getattr(torch.optim, name, None)  # sd-scripts: any other name is a torch.optim class (case as written)
    if isinstance(found, type) and issubclass(found, torch.optim.Optimizer):
        return found
    names = {optimizer_key(n): n for n in (*_NAMED_DISPLAY, *_BNB.values(), *OPTIMIZERS)}
    names.update({c.lower(): c for c in _optimizer_classes(torch.optim) if c.lower() not in names})
    close = _close_name(optimizer_key(name), names)
    raise OptimizerNameError(f"unknown optimizer {name!r}" + (f" (did you mean {close}?)" if close else "")
                             + f"; choose one of: {', '.join(OPTIMIZERS)}, another of sd-scripts' names "
                             "(DAdaptAdaGrad, PagedLion8bit, SGDScheduleFree, ...), a torch.optim class (e.g. Adam) or "
                             "module.Class from " + ", ".join(DOTTED_PACKAGES[1:]))


# sd-scripts' spelling of the _NAMED keys (what a "did you mean" offers)
_NAMED_DISPLAY = ("DAdaptation", "DAdaptAdamPreprint", "DAdaptAdaGrad", "DAdaptAdam", "DAdaptAdan", "DAdaptAdanIP",
                  "DAdaptLion", "DAdaptSGD", "Prodigy", "RAdamScheduleFree", "AdamWScheduleFree", "SGDScheduleFree")


def _optimizer_classes(module) -> list[str]:
    return [n for n, v in vars(module).items() if isinstance(v, type) and issubclass(v, torch.optim.Optimizer)
            and v is not torch.optim.Optimizer]


def _close_name(key: str, names: dict[str, str]) -> str | None:
    """The spelling of the one known name closest to ``key`` (lower case keys), or None."""
    low = key.lower()
    if low in names:  # (the case differs only: torch.optim takes its names as written)
        return names[low]
    longer = [k for k in names if k.startswith(low)]
    if len(low) >= 4 and len(longer) == 1:  # (a name cut short: AdamW8 -> AdamW8bit, not AdamW)
        return names[longer[0]]
    close = difflib.get_close_matches(low, list(names), n=1, cutoff=0.75)
    return names[close[0]] if close else None


def shown_lr(optimizer, fallback: float) -> float:
    """The LR to show for the first group: Adafactor with relative_step computes its own (what sd-scripts'
    AdafactorSchedule reports); every other optimizer uses the group's."""
    g = optimizer.param_groups[0]
    if g.get("relative_step") and hasattr(optimizer, "_get_lr"):
        st = optimizer.state.get(g["params"][0]) or {}
        if "step" in st and "RMS" in st:
            return float(optimizer._get_lr(g, st))
    return fallback


class OptimizerGroupsError(ValueError):
    """The optimizer (Prodigy since prodigyopt 1.1) refuses a different LR per parameter group."""


def group_lrs_refused(cls, kw: dict) -> str | None:
    """Whether this optimizer version refuses two groups with different LRs: its error, found by one step on two
    throwaway parameters (the refusal comes at the first step, after latent caching)."""
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    try:
        opt = cls([{"params": [a], "lr": 1.0}, {"params": [b], "lr": 0.5}], **kw)
        a.grad, b.grad = torch.ones(1), torch.ones(1)
        opt.step()
    except Exception as e:  # (any refusal the package words its own way)
        return f"{type(e).__name__}: {e}"
    return None


def group_lrs_message(name: str, refused: str) -> str:
    return (f"{name} refuses a different learning rate per group ({refused}); give the UNet and the text encoder "
            "the same learning rate (or text_encoder_lr = 0 to train the UNet only), without LoRA+ ratios or "
            "block learning rates")


def make_optimizer(name: str, param_groups: list[dict], lr: float, args: dict | None = None,
                   device: torch.device | None = None, notes: list | None = None) -> tuple[torch.optim.Optimizer, str]:
    """(optimizer, description for ss_optimizer), built as sd-scripts' get_optimizer builds it: the class gets
    only the user's optimizer_args plus sd-scripts' own additions (SGDNesterov's momentum, Adafactor's
    relative_step), every other value is the class's default. With ``notes`` given, an unusable 8-bit optimizer is
    replaced by its 32-bit twin and the reason appended there; without, it raises OptimizerUnavailable."""
    args = dict(args or {})
    key = optimizer_key(name)
    if key in _FALLBACK and notes is not None:
        try:
            return make_optimizer(name, param_groups, lr, args, device)
        except OptimizerUnavailable as e:
            twin = _FALLBACK[key]
            notes.append(f"{e} Training with {twin} instead (the same updates, more optimizer memory).")
            return make_optimizer(twin, param_groups, lr, args, device)
    cls = optimizer_class(name)
    kw = dict(args)
    extra = {}  # passed but, as in sd-scripts, not part of the description
    if key in ("sgdnesterov", "sgdnesterov8bit"):
        kw.setdefault("momentum", 0.9)
        extra["nesterov"] = True
    if key == "adafactor":
        kw.setdefault("relative_step", True)  # sd-scripts' default: Adafactor's own step size, lr as its start
        if kw.get("warmup_init") and not kw["relative_step"]:
            kw["relative_step"] = True  # (sd-scripts: warmup_init needs relative_step)
            if notes is not None:
                notes.append("Adafactor: warmup_init = True needs relative_step, so relative_step = True is used "
                             "(as in sd-scripts)")
        if kw["relative_step"]:
            lr = None  # Adafactor computes it; the group LRs are not used
    if cls is torch.optim.AdamW and device is not None and device.type == "cuda":
        extra.setdefault("fused", True)  # one kernel for every LoRA tensor instead of one per tensor
    if adapts_lr(name):
        if notes is not None and lr is not None and lr <= 0.1:
            notes.append(f"learning rate {lr:g} is low for {name}, which finds its own step size from the LR "
                         "given: set learning_rate (and unet_lr) to about 1.0 (sd-scripts warns the same)")
        if len({g.get("lr", lr) for g in param_groups}) > 1:
            refused = group_lrs_refused(cls, kw)
            if refused:
                raise OptimizerGroupsError(group_lrs_message(name, refused))
            if notes is not None:
                notes.append(f"{name} with several learning rates (UNet / text encoder / blocks): each group's LR "
                             "multiplies the step size the optimizer finds, so they act as ratios (sd-scripts warns "
                             "that only the first one takes effect)")
    opt = cls(param_groups, lr=lr, **kw, **extra) if lr is not None else cls(param_groups, **kw, **extra)
    if hasattr(opt, "train") and callable(opt.train):
        opt.train()  # schedule-free: train mode before the first step (sd-scripts does the same)
    return opt, _describe(f"{cls.__module__}.{cls.__name__}", kw)


def _describe(cls: str, kw: dict) -> str:
    """sd-scripts' ss_optimizer: module.Class, with (k=v,...) of the arguments it passed on."""
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
