"""Headless sample images with A1111 1.10's own samplers (DDIM, PLMS, Euler, Euler a, LMS, Heun, DPM2, DPM2 a,
DPM++ 2M Karras) and classifier-free guidance, on the ldm/sgm model the host holds (``sd_model.model.
diffusion_model`` + the text encoders through ``TextEncoder`` + ``first_stage_model.decode``), so a sample's
infotext renders the same picture in the WebUI's txt2img. Inside the WebUI its own samplers are used.

Also: sd-scripts' sample prompt files (``--sample_prompts``): ``.txt`` with one prompt per line and options
``--n negative --w 512 --h 512 --s 20 --d seed --l cfg_scale --ss sampler`` (``#`` starts a comment line), or
``.toml`` / ``.json`` with sd-scripts' key names. Each bad line is reported with its file and line number.

Conventions: noise comes from a CPU generator seeded per image, so a seed gives the same image on every device;
a prompt without ``--d`` gets ``seed + index`` (sd-scripts draws a random one), so the images of successive epochs
are comparable.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import sys
import tomllib
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch

from ..formats.errors import LoraError
from ..formats.safetensors_io import write_atomic
from .fp8 import compute_dtype, is_fp8

DEFAULTS = {"width": 512, "height": 512, "steps": 30, "cfg_scale": 7.5}  # sd-scripts' sample_image_inference
# sd-scripts' sampler names (train_util.SCHEDULER_NAMES) -> the A1111 sampler that renders them, headless and in
# the WebUI alike (A1111's DPM++ 2M stands in for diffusers' DPM solvers, its PLMS for PNDM)
WEBUI_SAMPLERS = {"ddim": "DDIM", "pndm": "PLMS", "lms": "LMS", "k_lms": "LMS", "euler": "Euler", "k_euler": "Euler",
                  "euler_a": "Euler a", "k_euler_a": "Euler a", "heun": "Heun", "dpm_2": "DPM2", "k_dpm_2": "DPM2",
                  "dpm_2_a": "DPM2 a", "k_dpm_2_a": "DPM2 a", "dpmsolver": "DPM++ 2M", "dpmsolver++": "DPM++ 2M",
                  "dpmsingle": "DPM++ 2M"}
_OTHER_ALGORITHM = {"pndm": "PNDM", "dpmsolver": "DPM-Solver", "dpmsolver++": "DPM-Solver++",
                    "dpmsingle": "DPM-Solver single-step"}
SAMPLERS = tuple(dict.fromkeys(WEBUI_SAMPLERS.values()))
# A1111 1.10's sampler options: the schedule of 'Automatic', and the DPM2s' dropped penultimate sigma
_KARRAS = {"DPM++ 2M", "DPM2", "DPM2 a"}
_DISCARD_PENULTIMATE = {"DPM2", "DPM2 a"}


class SamplePromptError(LoraError, ValueError):
    """A sample prompt (file) that cannot be used; the message names the file and line."""


@dataclass
class SamplePrompt:
    prompt: str
    negative: str = ""
    width: int = DEFAULTS["width"]
    height: int = DEFAULTS["height"]
    steps: int = DEFAULTS["steps"]
    seed: int | None = None
    cfg_scale: float = DEFAULTS["cfg_scale"]
    sampler: str | None = None          # None: the run's sample_sampler
    where: str = ""                     # "file:line" for messages
    notes: list[str] = field(default_factory=list)


def resolve_sampler(name: str | None, where: str = "") -> tuple[str, str | None]:
    """(A1111 sampler label, note or None) for an sd-scripts sampler name (or an A1111 label: 'Euler a')."""
    key = (name or "ddim").strip().lower()
    if key in WEBUI_SAMPLERS:
        label = WEBUI_SAMPLERS[key]
        if key in _OTHER_ALGORITHM:
            return label, (f"{where + ': ' if where else ''}sampler '{name}' (diffusers' {_OTHER_ALGORITHM[key]} in "
                           f"sd-scripts) renders with A1111's {label}" + (" Karras" if label in _KARRAS else ""))
        return label, None
    for label in SAMPLERS:
        if key == label.lower():
            return label, None
        if key == f"{label} karras".lower() and label in _KARRAS:  # (A1111's labels before 1.9, kohya_ss presets)
            return label, None
    raise SamplePromptError(f"{where + ': ' if where else ''}unknown sampler '{name}' (known: "
                            f"{', '.join(WEBUI_SAMPLERS)}; or A1111's {', '.join(SAMPLERS)})")


def _size(v: str, key: str, where: str, notes: list[str]) -> int:
    n = _int(v, key, where)
    # sd-scripts: max(64, n - n % 8); the latent is 1/8 of the image
    fixed = max(64, n - n % 8)
    if fixed != n:
        notes.append(f"{where}: --{key} {n} rounded to {fixed} (a multiple of 8, at least 64)")
    return fixed


def _int(v: str, key: str, where: str) -> int:
    try:
        return int(v.strip())
    except ValueError:
        raise SamplePromptError(f"{where}: --{key} needs a whole number, got {v.strip()!r}") from None


def _float(v: str, key: str, where: str) -> float:
    try:
        x = float(v.strip())
    except ValueError:
        raise SamplePromptError(f"{where}: --{key} needs a number, got {v.strip()!r}") from None
    if not math.isfinite(x):
        raise SamplePromptError(f"{where}: --{key} must be a finite number, got {v.strip()!r}")
    return x


def _set_number(sp: SamplePrompt, attr: str, v: str, key: str, where: str) -> None:
    """width/height/steps/seed/cfg_scale from text, checked alike for .txt options and .toml/.json keys."""
    if attr in ("width", "height"):
        setattr(sp, attr, _size(v, key, where, sp.notes))
    elif attr == "steps":
        sp.steps = max(1, min(1000, _int(v, key, where)))
    elif attr == "seed":
        sp.seed = _int(v, key, where)
    else:
        sp.cfg_scale = _float(v, key, where)


_OPT_NUMBERS = {"w": "width", "h": "height", "s": "steps", "d": "seed", "l": "cfg_scale"}
_NUMBERS = tuple(_OPT_NUMBERS.values())
_OPT = re.compile(r"^([a-z]+)(?:\s+(.*))?$", re.S | re.I)
# sd-scripts' options for other models than SD1/SD2/SDXL: read by it there, ignored for SD models
_OTHER_MODELS = {"g": "guidance scale for guidance-distilled models", "cn": "ControlNet image",
                 "ctr": "CFG truncation", "rcfg": "renormalised CFG", "fs": "flow shift"}
_KNOWN = "--n negative, --w width, --h height, --s steps, --d seed, --l cfg scale, --ss sampler"


_RE_AND = re.compile(r"\bAND\b")
_RE_WEIGHT = re.compile(r"^((?:\s|.)*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$")  # (A1111 prompt_parser)
_RE_EDIT = re.compile(r"\[[^\[\]]*[:|][^\[\]]*\]")


def a1111_syntax_note(text: str, where: str = "", negative: bool = False) -> str | None:
    """A note for A1111 prompt syntax that headless pictures read as plain text (emphasis and BREAK they read):
    AND and a prompt's closing ': weight' (composable prompts), [from:to:when] and [a|b] (prompt editing)."""
    what = []
    if not negative and (_RE_AND.search(text) or (_RE_WEIGHT.search(text) or [None] * 3)[2] is not None):
        what.append("AND / ': weight' (composable prompts)")
    if _RE_EDIT.search(text):
        what.append("[from:to:when] / [a|b] (prompt editing)")
    if not what:
        return None
    return (f"{where + ': ' if where else ''}{' and '.join(what)} in the {'negative ' if negative else ''}prompt: "
            "read as plain text here, while the WebUI's txt2img reads it as that syntax, so its picture differs")


def parse_prompt_line(line: str, where: str = "<prompt>") -> SamplePrompt | None:
    """One line of a sd-scripts .txt prompt file; None for blank and ``#`` comment lines."""
    text = line.strip()
    if not text or text.startswith("#"):
        return None
    parts = text.split(" --")  # sd-scripts' split: options are ' --x value'
    prompt = parts[0].strip()
    if prompt.startswith("--"):
        raise SamplePromptError(f"{where}: the line starts with an option; write the prompt first, then the options "
                                f"({_KNOWN})")
    sp = SamplePrompt(prompt=prompt, where=where)
    for raw in parts[1:]:
        m = _OPT.match(raw.strip())
        if not m:
            raise SamplePromptError(f"{where}: cannot read option '--{raw.strip()}' (known: {_KNOWN})")
        key, value = m.group(1).lower(), (m.group(2) or "")
        if key != "n" and not value.strip():
            raise SamplePromptError(f"{where}: --{key} needs a value")
        if key == "n":
            sp.negative = value.strip()
        elif key in _OPT_NUMBERS:
            _set_number(sp, _OPT_NUMBERS[key], value, key, where)
        elif key == "ss":
            sp.sampler = value.strip()
            _, note = resolve_sampler(sp.sampler, where)
            if note:
                sp.notes.append(note)
        elif key in _OTHER_MODELS:
            sp.notes.append(f"{where}: --{key} ({_OTHER_MODELS[key]}) ignored for SD models, as sd-scripts does")
        else:  # (sd-scripts skips what it does not know; a typo is said, not fatal)
            sp.notes.append(f"{where}: unknown option --{key} ignored (known: {_KNOWN})")
    if not sp.prompt:
        sp.notes.append(f"{where}: empty prompt (an unconditional sample)")
    return sp


_DICT_KEYS = {"prompt": "prompt", "negative_prompt": "negative", "width": "width", "height": "height",
              "seed": "seed", "sample_steps": "steps", "scale": "cfg_scale", "sample_sampler": "sampler",
              "enum": None, "guidance_scale": None}


def _from_dict(d: dict, where: str) -> SamplePrompt:
    if not isinstance(d, dict):
        raise SamplePromptError(f"{where}: expected a table/object with a 'prompt', got {type(d).__name__}")
    unknown = [k for k in d if k not in _DICT_KEYS and k != "subset"]
    if unknown:
        raise SamplePromptError(f"{where}: unknown key(s) {', '.join(unknown)} (known: "
                                f"{', '.join(k for k, v in _DICT_KEYS.items() if v)})")
    if not isinstance(d.get("prompt"), str):
        raise SamplePromptError(f"{where}: 'prompt' (text) is required")
    sp = SamplePrompt(prompt=d["prompt"].strip(), where=where)
    for k, attr in _DICT_KEYS.items():
        if not attr or attr == "prompt" or d.get(k) is None:
            continue
        v = str(d[k])
        if attr in _NUMBERS:
            _set_number(sp, attr, v, k, where)
        elif attr == "sampler":
            sp.sampler = v
            resolve_sampler(v, where)
        else:
            setattr(sp, attr, v)
    return sp


def parse_prompt_text(text: str, source: str = "<prompts>") -> list[SamplePrompt]:
    """The lines of a .txt prompt file. All problems are collected and raised together."""
    out, problems = [], []
    for i, line in enumerate(text.splitlines(), 1):
        try:
            sp = parse_prompt_line(line, f"{source}:{i}")
        except SamplePromptError as e:
            problems.append(str(e))
            continue
        if sp is not None:
            out.append(sp)
    if problems:
        raise SamplePromptError(f"{len(problems)} problem(s) in the sample prompts:\n" +
                                "\n".join(f"  - {p}" for p in problems))
    return out


def load_prompt_file(path: str | os.PathLike) -> list[SamplePrompt]:
    """sd-scripts' sample prompt file: .txt (lines), .toml (``[prompt]`` defaults + ``[[prompt.subset]]``) or
    .json (a list of objects, or of prompt lines)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise SamplePromptError(f"sample prompt file {path} not found")
    name = os.path.basename(path)
    ext = os.path.splitext(path)[1].lower()
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise SamplePromptError(f"{path}: not UTF-8 text ({e})") from None
    if ext == ".toml":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise SamplePromptError(f"{path}: not valid TOML: {e}") from None
        base = data.get("prompt")
        if not isinstance(base, dict) or not isinstance(base.get("subset"), list):
            raise SamplePromptError(f"{path}: expected [prompt] with [[prompt.subset]] entries (sd-scripts' layout)")
        defaults = {k: v for k, v in base.items() if k != "subset"}
        prompts = [_from_dict({**defaults, **sub}, f"{name} subset #{i + 1}") for i, sub in enumerate(base["subset"])]
    elif ext == ".json":
        try:
            data = json.loads(text)
        except ValueError as e:
            raise SamplePromptError(f"{path}: not valid JSON: {e}") from None
        if not isinstance(data, list):
            raise SamplePromptError(f"{path}: expected a JSON list of prompts")
        prompts = []
        for i, d in enumerate(data):
            if isinstance(d, str):
                sp = parse_prompt_line(d, f"{name} item #{i + 1}")
                if sp is not None:
                    prompts.append(sp)
            else:
                prompts.append(_from_dict(d, f"{name} item #{i + 1}"))
    else:
        prompts = parse_prompt_text(text, name)
    if not prompts:
        raise SamplePromptError(f"{path}: no prompts in the file (every line is blank or a # comment)")
    return prompts


# ---------------------------------------------------------------------------------------------------------------
# the samplers, as A1111 1.10 runs them, so that a headless sample's infotext renders the same picture in the WebUI
# (noise from the CPU generator, A1111's "CPU" RNG source). The k-diffusion ones follow k-diffusion 0.0.16 (MIT,
# Katherine Crowson), the version A1111 pins, with its defaults (eta 1, no churn). Pure functions of an eps
# predictor ``eps_fn(x_in, t, alpha_t) -> eps``, testable without a model.

def a1111_timesteps(steps: int) -> list[int]:
    """A1111's DDIM/PLMS timesteps (sd_samplers_timesteps.get_timesteps), lowest first: 1, 51, ... 951 for 20."""
    steps = max(1, min(int(steps), 1000))
    return [min(t + 1, 999) for t in range(0, 1000, 1000 // steps)]


def _timestep_walk(alphas_cumprod: torch.Tensor, steps: int):
    """(i, t, alpha_t, alpha_prev) of A1111's timestep samplers: from the highest timestep down to the second,
    one model call fewer than timesteps (A1111 1.10 ends at t = 1, not at x0)."""
    ac = alphas_cumprod.detach().float().cpu()
    ts = a1111_timesteps(steps)
    for i in range(len(ts) - 1):
        index = len(ts) - 1 - i
        yield i, ts[index], float(ac[ts[index]]), float(ac[ts[index - 1]]), ts[max(index - 1, 0)]


def _ddim_step(x, eps, a, a_prev):
    x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
    return math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps


@torch.no_grad()
def ddim_sample(eps_fn, alphas_cumprod: torch.Tensor, x: torch.Tensor, steps: int, callback=None) -> torch.Tensor:
    """A1111's DDIM (eta 0) from x = x_T (unit noise)."""
    n = len(a1111_timesteps(steps)) - 1
    for i, t, a, a_prev, _ in _timestep_walk(alphas_cumprod, steps):
        x = _ddim_step(x, eps_fn(x, t, a), a, a_prev)
        if callback:
            callback(i + 1, n)
    return x


@torch.no_grad()
def plms_sample(eps_fn, alphas_cumprod: torch.Tensor, x: torch.Tensor, steps: int, callback=None) -> torch.Tensor:
    """A1111's PLMS: a pseudo improved-Euler first step, then Adams-Bashforth of order 2, 3, 4 on eps."""
    n = len(a1111_timesteps(steps)) - 1
    ac = alphas_cumprod.detach().float().cpu()
    old = []
    for i, t, a, a_prev, t_next in _timestep_walk(alphas_cumprod, steps):
        e = eps_fn(x, t, a)
        if not old:
            e_next = eps_fn(_ddim_step(x, e, a, a_prev), t_next, float(ac[t_next]))
            e_prime = (e + e_next) / 2
        elif len(old) == 1:
            e_prime = (3 * e - old[-1]) / 2
        elif len(old) == 2:
            e_prime = (23 * e - 16 * old[-1] + 5 * old[-2]) / 12
        else:
            e_prime = (55 * e - 59 * old[-1] + 37 * old[-2] - 9 * old[-3]) / 24
        x = _ddim_step(x, e_prime, a, a_prev)
        old = (old + [e])[-3:]
        if callback:
            callback(i + 1, n)
    return x


class KSchedule:
    """k-diffusion's DiscreteSchedule on a model's alphas_cumprod (float32, as A1111 builds it): the sigma <-> t
    maps and the sigma lists of A1111's schedules."""

    def __init__(self, alphas_cumprod: torch.Tensor):
        ac = alphas_cumprod.detach().float().cpu()
        self.sigmas = ((1 - ac) / ac) ** 0.5
        self.log_sigmas = self.sigmas.log()

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        t = t.float()
        lo, hi, w = t.floor().long(), t.ceil().long(), t.frac()
        return ((1 - w) * self.log_sigmas[lo] + w * self.log_sigmas[hi]).exp()

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        log_sigma = sigma.log()
        dists = log_sigma - self.log_sigmas[:, None]
        lo = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=self.log_sigmas.shape[0] - 2)
        low, high = self.log_sigmas[lo], self.log_sigmas[lo + 1]
        w = ((low - log_sigma) / (low - high)).clamp(0, 1)
        return ((1 - w) * lo + w * (lo + 1)).view(sigma.shape)

    def uniform(self, n: int) -> torch.Tensor:
        """get_sigmas(n): t evenly from T-1 to 0 (A1111's 'Automatic' for Euler, Euler a, LMS, Heun)."""
        t = torch.linspace(len(self.sigmas) - 1, 0, n)
        return torch.cat([self.t_to_sigma(t), torch.zeros(1)])

    def karras(self, n: int, rho: float = 7.0) -> torch.Tensor:
        """get_sigmas_karras between the model's sigma_min and sigma_max (A1111 1.10's default for it)."""
        ramp = torch.linspace(0, 1, n)
        lo, hi = self.sigmas[0].item() ** (1 / rho), self.sigmas[-1].item() ** (1 / rho)
        return torch.cat([(hi + ramp * (lo - hi)) ** rho, torch.zeros(1)])

    def for_sampler(self, label: str, steps: int) -> torch.Tensor:
        """The sigmas A1111's KDiffusionSampler.get_sigmas gives ``label`` with scheduler 'Automatic'."""
        discard = label in _DISCARD_PENULTIMATE
        n = max(1, int(steps)) + (1 if discard else 0)
        sigmas = self.karras(n) if label in _KARRAS else self.uniform(n)
        return torch.cat([sigmas[:-2], sigmas[-1:]]) if discard else sigmas


def k_denoiser(eps_fn, schedule: KSchedule):
    """k-diffusion's CompVisDenoiser: x0 = x - sigma * eps(x / sqrt(sigma² + 1), t(sigma))."""
    def denoise(x, sigma):
        c_in = 1 / (sigma ** 2 + 1) ** 0.5
        eps = eps_fn(x * c_in, float(schedule.sigma_to_t(sigma)), float(1 / (1 + sigma ** 2)))
        return x - eps * sigma
    return denoise


def _ancestral_step(sigma_from, sigma_to):
    sigma_up = min(sigma_to, (sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2) ** 0.5)
    return (sigma_to ** 2 - sigma_up ** 2) ** 0.5, sigma_up


def _lms_coeff(order: int, t: np.ndarray, i: int, j: int) -> float:
    """The integral over [t_i, t_i+1] of the Lagrange basis polynomial j (k-diffusion integrates it numerically)."""
    roots = [t[i - k] for k in range(order) if k != j]
    denom = float(np.prod([t[i - j] - r for r in roots])) if roots else 1.0
    integral = np.polyint(np.poly(roots) if roots else np.array([1.0]))
    return float(np.polyval(integral, t[i + 1]) - np.polyval(integral, t[i])) / denom


@torch.no_grad()
def k_sample(label: str, denoise, x: torch.Tensor, sigmas: torch.Tensor, noise=None, callback=None) -> torch.Tensor:
    """k-diffusion's sampler for A1111 ``label`` from x = noise * sigmas[0]; ``noise()`` gives the ancestral
    samplers' fresh noise (A1111 draws it from the picture's generator)."""
    n = len(sigmas) - 1
    old = None
    ds = []
    t_np = sigmas.double().numpy()
    for i in range(n):
        s, s_next = sigmas[i], sigmas[i + 1]
        den = denoise(x, s)
        d = (x - den) / s
        if label == "Euler" or (label in ("Heun", "DPM2") and s_next == 0):
            x = x + d * (s_next - s)
        elif label == "Heun":
            x_2 = x + d * (s_next - s)
            d_2 = (x_2 - denoise(x_2, s_next)) / s_next
            x = x + (d + d_2) / 2 * (s_next - s)
        elif label == "DPM2":
            mid = s.log().lerp(s_next.log(), 0.5).exp()
            x_2 = x + d * (mid - s)
            x = x + (x_2 - denoise(x_2, mid)) / mid * (s_next - s)
        elif label == "Euler a":
            down, up = _ancestral_step(s, s_next)
            x = x + d * (down - s)
            if s_next > 0:
                x = x + noise() * up
        elif label == "DPM2 a":
            down, up = _ancestral_step(s, s_next)
            if down == 0:
                x = x + d * (down - s)
            else:
                mid = s.log().lerp(down.log(), 0.5).exp()
                x_2 = x + d * (mid - s)
                x = x + (x_2 - denoise(x_2, mid)) / mid * (down - s)
                x = x + noise() * up
        elif label == "LMS":
            ds = (ds + [d])[-4:]
            order = min(i + 1, 4)
            x = x + sum(_lms_coeff(order, t_np, i, j) * dj for j, dj in enumerate(reversed(ds)))
        elif label == "DPM++ 2M":
            t, t_next = -s.log(), -s_next.log()
            h = t_next - t
            if old is not None and s_next != 0:
                r = (t - (-sigmas[i - 1].log())) / h
                den_d = (1 + 1 / (2 * r)) * den - (1 / (2 * r)) * old
            else:
                den_d = den
            x = ((-t_next).exp() / (-t).exp()) * x - (-h).expm1() * den_d
            old = den
        else:
            raise ValueError(f"not a k-diffusion sampler: {label}")
        if callback:
            callback(i + 1, n)
    return x


# ---------------------------------------------------------------------------------------------------------------
# on a model

def _chunk_count(te, text: str) -> int:
    """The 75-token chunks A1111 gives a prompt (emphasis pieces tokenized alone, BREAK, comma backtracking)."""
    from .conditioning import split_chunks, weighted_ids

    spec = te.spec1 if te.family == "sdxl" else te.spec
    ids, weights = weighted_ids(text, spec, breaks=True)
    return len(split_chunks(ids, weights, spec))


class _TorchCatToSkip:
    """``torch`` for an ldm/sgm UNet module, whose ``cat`` brings the upsampled half to its skip connection's size,
    as A1111's sd_hijack_unet does: sizes that are multiples of 8 but not of 64 (96x64) then sample as in the
    WebUI instead of failing with a size mismatch."""
    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def cat(tensors, *args, **kwargs):
        if len(tensors) == 2 and tensors[0].shape[-2:] != tensors[1].shape[-2:]:
            a, b = tensors
            tensors = (torch.nn.functional.interpolate(a, b.shape[-2:], mode="nearest"), b)
        return torch.cat(tensors, *args, **kwargs)


@contextmanager
def skips_of_any_size(unet):
    mod = sys.modules.get(type(unet).__module__)
    if mod is None or getattr(mod, "th", None) is not torch:  # (not ldm/sgm, or already hijacked by the WebUI)
        yield
        return
    mod.th = _TorchCatToSkip()
    try:
        yield
    finally:
        mod.th = torch


class ModelSampler:
    """Text encoding + guided UNet calls + VAE decode for one host model (the LoRA attached or merged, or not)."""

    def __init__(self, sd_model, family: str, device, clip_skip: int = 1):
        from .conditioning import TextEncoder

        self.m = sd_model
        self.family = family
        self.device = torch.device(device)
        self.te = TextEncoder(sd_model, family, clip_skip=clip_skip or 1, emphasis=True)
        self.unet = sd_model.model.diffusion_model
        self.unet_dtype = next(self.unet.parameters()).dtype
        if is_fp8(self.unet_dtype):  # FP8 storage computes in bf16/fp16 under autocast, as the WebUI does
            self.unet_dtype = compute_dtype(self.device)
        self.v = getattr(sd_model, "parameterization", "eps") == "v"
        ac = getattr(sd_model, "alphas_cumprod_original", None)
        self.alphas_cumprod = (ac if ac is not None else sd_model.alphas_cumprod).detach().float().cpu()

    def _autocast(self):
        """Half-precision weights run under autocast, as the WebUI samples (ldm's timestep embedding is fp32)."""
        from contextlib import nullcontext
        if self.unet_dtype == torch.float32:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.unet_dtype)

    def _encode(self, text: str, width: int, height: int, zero: bool = False):
        """(crossattn, SDXL vector or None) of one prompt, read as A1111 reads it (emphasis, BREAK), with as
        many chunks as it needs: A1111 encodes prompt and negative prompt apart, and leaves them unpadded."""
        from .conditioning import sdxl_vector

        self.te.n_chunks = _chunk_count(self.te, text)
        tokens, _ = self.te.tokenize([text])
        with self._autocast():
            out = self.te.encode(tokens, self.device)
        ctx = out["crossattn"]
        y = None
        if self.family == "sdxl":
            pooled = out["pooled"]
            if zero:  # A1111 zeroes an all-empty SDXL negative prompt (crossattn and pooled)
                ctx, pooled = ctx * 0, pooled * 0
            y = sdxl_vector(pooled, [(height, width)], [(0, 0)], [(height, width)]).to(self.unet_dtype)
        return ctx.to(self.unet_dtype), y

    @torch.no_grad()
    def image(self, sp: SamplePrompt, seed: int, sampler: str = "ddim", callback=None):
        from PIL import Image

        w, h = sp.width, sp.height
        ctx_u, y_u = self._encode(sp.negative, w, h, zero=self.family == "sdxl" and sp.negative == "")
        ctx_c, y_c = self._encode(sp.prompt, w, h)
        scale = float(sp.cfg_scale)

        def model_eps(xin, t, a, ctx, y):
            tt = torch.full((xin.shape[0],), t, device=self.device,
                            dtype=torch.long if isinstance(t, int) else torch.float32)
            with self._autocast():
                out = (self.unet(xin, tt, context=ctx, y=y) if y is not None
                       else self.unet(xin, tt, context=ctx)).float()
            if self.v:  # eps = sqrt(a)·v + sqrt(1-a)·x_t
                out = math.sqrt(a) * out + math.sqrt(1 - a) * xin.float()
            return out

        def eps_fn(x, t, a):
            xin = x.to(self.device, self.unet_dtype)
            if ctx_u.shape[1] == ctx_c.shape[1]:  # one batch of two, as A1111 runs them
                y = torch.cat([y_u, y_c]) if y_u is not None else None
                u, c = model_eps(torch.cat([xin, xin]), t, a, torch.cat([ctx_u, ctx_c]), y).chunk(2)
            else:  # (prompts of different chunk counts: A1111 runs them apart)
                u, c = model_eps(xin, t, a, ctx_u, y_u), model_eps(xin, t, a, ctx_c, y_c)
            return (u + scale * (c - u)).to(x.device)

        g = torch.Generator().manual_seed(int(seed))
        shape = (1, 4, h // 8, w // 8)
        noise = torch.randn(shape, generator=g).to(self.device)
        label, _ = resolve_sampler(sampler)
        with skips_of_any_size(self.unet) if (h // 8) % 8 or (w // 8) % 8 else nullcontext():
            if label in ("DDIM", "PLMS"):
                run = ddim_sample if label == "DDIM" else plms_sample
                z = run(eps_fn, self.alphas_cumprod, noise, sp.steps, callback)
            else:
                schedule = KSchedule(self.alphas_cumprod)
                sigmas = schedule.for_sampler(label, sp.steps)
                # (the ancestral samplers' noise goes on from the picture's generator, as A1111's does)
                z = k_sample(label, k_denoiser(eps_fn, schedule), noise * sigmas[0], sigmas,
                             noise=lambda: torch.randn(shape, generator=g).to(self.device), callback=callback)
        return Image.fromarray(self.decode(z)[0])

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> np.ndarray:
        vae = self.m.first_stage_model
        scale = float(getattr(self.m, "scale_factor", 0.18215))
        img = vae.decode((z / scale).to(self.device, next(vae.parameters()).dtype)).float()
        img = ((img + 1) / 2).clamp(0, 1).mul(255).to(torch.uint8)  # (truncated, as A1111 does)
        return img.permute(0, 2, 3, 1).cpu().numpy()


def infotext(sp: SamplePrompt, seed: int, sampler: str, model_name: str | None = None, clip_skip: int = 1) -> str:
    """A1111's PNG 'parameters' text, so the WebUI's PNG Info tab reads our samples."""
    lines = [sp.prompt]
    if sp.negative:
        lines.append(f"Negative prompt: {sp.negative}")
    extra = f", Model: {model_name}" if model_name else ""
    extra += f", Clip skip: {clip_skip}" if clip_skip and clip_skip > 1 else ""  # (A1111 writes it when not 1)
    label, _ = resolve_sampler(sampler)
    schedule = ", Schedule type: Karras" if label in _KARRAS else ""  # (A1111 writes its sampler's default)
    lines.append(f"Steps: {sp.steps}, Sampler: {label}{schedule}, CFG scale: "
                 f"{sp.cfg_scale:g}, Seed: {seed}, Size: {sp.width}x{sp.height}{extra}")
    return "\n".join(lines)


def tagged_infotext(text: str | None, prompt: str, tag: str, lora_files: list[str] | None = None) -> str | None:
    """A picture's infotext with the LoRA tag(s) it was rendered with (the LoRA was attached or merged, not named
    in the prompt), so PNG Info -> Send to txt2img renders it again. ``lora_files``: the files the tags name (by
    their stems), whose hashes go in "Lora hashes" as the WebUI writes them: image sites find the LoRA by it, and
    a paste finds the file by it under another name."""
    if not text:
        return None
    if prompt and text.startswith(prompt):
        text = f"{prompt} {tag}{text[len(prompt):]}"
    else:
        text = f"{tag} {text}"
    return _with_lora_hashes(text, lora_files) if lora_files else text


@functools.lru_cache(maxsize=64)
def _short_lora_hash(path: str, _stamp: tuple) -> str:  # (a grid's cells share their files: hashed once each)
    from ..formats.hashes import lora_hash, shorthash
    return shorthash(lora_hash(path))


def _with_lora_hashes(text: str, lora_files: list[str]) -> str:
    lines = text.split("\n")
    if not lines[-1].startswith("Steps: ") or "Lora hashes: " in lines[-1]:
        return text
    try:
        hashes = {}
        for f in lora_files:
            st = os.stat(f)
            hashes[os.path.splitext(os.path.basename(f))[0].translate(str.maketrans("", "", ":,"))] = \
                _short_lora_hash(os.path.abspath(f), (st.st_mtime_ns, st.st_size))
    except Exception:  # (a file gone or damaged since it rendered: the picture keeps its tags, without hashes)
        return text
    # A1111's form: the names as in the tags without ':' and ',', quoted as its infotext quotes such values, among
    # the extra parameters, before Version
    field = "Lora hashes: " + json.dumps(", ".join(f"{k}: {v}" for k, v in hashes.items()), ensure_ascii=False)
    head, sep, version = lines[-1].partition(", Version: ")
    lines[-1] = f"{head}, {field}{sep}{version}"
    return "\n".join(lines)


def save_png(img, path: str, text: str | None = None) -> str:
    from PIL import PngImagePlugin

    info = None
    if text:
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", text)
    # (a full disk leaves no half picture nor temp file behind)
    write_atomic(path, lambda f: img.save(f, format="PNG", pnginfo=info), binary=True)
    return path


def generate(host, prompts: list[SamplePrompt], *, sampler: str = "ddim", clip_skip: int = 1, base_seed: int = 0,
             callback=None, should_cancel=None) -> list[tuple[object, int, str]]:
    """(image, seed, sampler) per prompt, on the host's model as it is now (LoRA attached/merged or not);
    ``should_cancel`` is asked before each image (a cancel returns the images made so far)."""
    ms = ModelSampler(host.sd_model, host.family, host.device, clip_skip)
    out = []
    for i, sp in enumerate(prompts):
        if should_cancel is not None and should_cancel():
            break
        seed = sp.seed if sp.seed is not None else base_seed + i
        name, _ = resolve_sampler(sp.sampler or sampler, sp.where)
        out.append((ms.image(sp, seed, name, callback), seed, name))
    return out


def sample_tag(epoch, step) -> str:
    """File name part of a sample set: ``e000002`` after an epoch, ``s000100`` for a step-based set."""
    return f"e{int(epoch):06d}" if epoch is not None else f"s{int(step or 0):06d}"


def config_prompts(cfg) -> list[SamplePrompt] | None:
    """The config's sample prompts: its prompt file, or the prompt text of a kohya_ss GUI preset; None for
    neither."""
    if cfg.sample_prompts:
        return load_prompt_file(str(cfg.resolve(cfg.sample_prompts)))
    if cfg.sample_prompt_text:
        return parse_prompt_text(cfg.sample_prompt_text, "the preset's sample_prompts")
    return None


def prompt_notes(cfg, prompts: list[SamplePrompt]) -> list[str]:
    """What the run's sample prompts and sample_sampler are noted for (the job says them once, at its start); an
    unknown sampler name raises."""
    _, note = resolve_sampler(cfg.sample_sampler or "ddim", "sample_sampler")
    notes = [note] if note and any(not sp.sampler for sp in prompts) else []  # (a prompt's own --ss: its own)
    for sp in prompts:
        notes.extend(sp.notes)
    return notes


def make_sample_fn(host, cfg, out_dir: str, prompts: list[SamplePrompt] | None = None, on_note=None,
                   folder: str | None = None):
    """The trainer's ``sample_fn(epoch=, step=)``, with ``.notes``: renders cfg.sample_prompts (or ``prompts``)
    with the LoRA as it is attached, into ``<out_dir>/samples/<name>_e000002_00.png`` (``_s000100_`` for a step-based call), or into
    ``folder`` when given."""
    if prompts is None:
        prompts = config_prompts(cfg)
        if prompts is None:
            raise SamplePromptError("sample_prompts is not set: write a prompt file (one prompt per line)")
    sampler = cfg.sample_sampler or "ddim"
    notes = prompt_notes(cfg, prompts) + [n for sp in prompts for n in (
        a1111_syntax_note(sp.prompt, sp.where), a1111_syntax_note(sp.negative, sp.where, negative=True)) if n]
    for n in notes:
        (on_note or (lambda _m: None))(n)
    folder = folder or os.path.join(out_dir, "samples")
    name = cfg.output_name or "lora"
    base_seed = int(cfg.seed) if cfg.seed is not None else 0
    clip_skip = cfg.clip_skip or 1

    def sample_fn(epoch=None, step=None, should_cancel=None, lora=None):
        os.makedirs(folder, exist_ok=True)
        tag = sample_tag(epoch, step)
        paths = []
        # a cancel does not wait for the whole set
        for i, (img, seed, used) in enumerate(generate(host, prompts, sampler=sampler, clip_skip=clip_skip,
                                                       base_seed=base_seed, should_cancel=should_cancel)):
            path = os.path.join(folder, f"{name}_{tag}_{i:02d}.png")
            text = infotext(prompts[i], seed, used, getattr(host, "model_name", None), clip_skip)
            paths.append(save_png(img, path, tagged_infotext(text, prompts[i].prompt, f"<lora:{lora}:1>")
                                  if lora else text))
        return paths

    sample_fn.notes = notes  # (run_training notes them in the job)
    return sample_fn
