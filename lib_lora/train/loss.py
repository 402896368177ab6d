"""The denoising loss on the host's own noise schedule (ε or v targets, min-SNR, noise offset, prior weight).

Everything stays on the device as tensors: no ``.item()`` or host sync inside a step, so a step can be captured.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def zero_terminal_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """``zero_terminal_snr``: Lin et al. 2305.08891's rescale, as sd-scripts applies it to the betas
    (fix_noise_scheduler_betas_for_zero_terminal_snr): sqrt(ᾱ) shifted and scaled so ᾱ_T = 0 and ᾱ_0 is kept."""
    ac = alphas_cumprod.detach().to(torch.float64)
    betas = 1 - torch.cat([ac[:1], ac[1:] / ac[:-1]])
    alphas_bar_sqrt = torch.cumprod(1 - betas, 0).sqrt()
    first, last = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * (first / (first - last))
    alphas_bar = alphas_bar_sqrt ** 2
    alphas = torch.cat([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return torch.cumprod(alphas, 0)


class NoiseSchedule:
    """``snr_from``: the ᾱ the SNR weights (min-SNR, debiased, v-pred scalings) are computed from, if not these.
    sd-scripts builds its SNR table before the zero-terminal-SNR rescale, so its weights keep the original
    schedule's (and never divide by the new zero at t = T)."""

    def __init__(self, alphas_cumprod: torch.Tensor, parameterization: str = "eps",
                 snr_from: torch.Tensor | None = None):
        if parameterization not in ("eps", "v"):
            raise ValueError(f"unsupported parameterization {parameterization!r} (eps or v)")
        ac = alphas_cumprod.detach().to(torch.float64)
        self.parameterization = parameterization
        self.num_timesteps = ac.shape[0]
        self.sqrt_ac = ac.sqrt().float()
        self.sqrt_1m_ac = (1 - ac).sqrt().float()
        src = ac if snr_from is None else snr_from.detach().to(torch.float64)
        self.snr = (src / (1 - src)).float()

    def to(self, device):
        for k in ("sqrt_ac", "sqrt_1m_ac", "snr"):
            setattr(self, k, getattr(self, k).to(device))
        return self

    def add_noise(self, x0, noise, t):
        a = self.sqrt_ac[t].view(-1, 1, 1, 1).to(x0.dtype)
        s = self.sqrt_1m_ac[t].view(-1, 1, 1, 1).to(x0.dtype)
        return a * x0 + s * noise

    def target(self, x0, noise, t):
        if self.parameterization == "eps":
            return noise
        a = self.sqrt_ac[t].view(-1, 1, 1, 1).to(x0.dtype)
        s = self.sqrt_1m_ac[t].view(-1, 1, 1, 1).to(x0.dtype)
        return a * noise - s * x0  # v = α_t ε − σ_t x0 (ldm get_v)

    def min_snr_weight(self, t, gamma: float):
        snr = self.snr[t]
        w = torch.clamp(snr, max=gamma)
        return w / (snr + 1) if self.parameterization == "v" else w / snr


@dataclass
class LossOptions:
    """sd-scripts' noise and loss switches (train_util / custom_train_functions, training-anchors §2)."""
    noise_offset: float = 0.0
    noise_offset_random_strength: bool = False
    adaptive_noise_scale: float | None = None
    multires_noise_iterations: int | None = None
    multires_noise_discount: float = 0.3
    ip_noise_gamma: float | None = None
    ip_noise_gamma_random_strength: bool = False
    loss_type: str = "l2"
    huber_schedule: str = "snr"
    huber_c: float = 0.1
    huber_scale: float = 1.0
    min_snr_gamma: float | None = None
    scale_v_pred_loss_like_noise_pred: bool = False
    v_pred_like_loss: float | None = None
    debiased_estimation_loss: bool = False

    @classmethod
    def from_config(cls, c) -> "LossOptions":
        return cls(**{k: getattr(c, k) for k in cls.__dataclass_fields__ if getattr(c, k, None) is not None})


def sample_noise(latents: torch.Tensor, generator: torch.Generator | None, noise_offset: float = 0.0,
                 opts: LossOptions | None = None, host_rng: random.Random | None = None):
    """Noise for one batch: gaussian, plus sd-scripts' offset / adaptive offset / pyramid (multires) noise."""
    dev, dt = latents.device, latents.dtype
    noise = torch.randn(latents.shape, generator=generator, device=dev, dtype=dt)
    o = opts.noise_offset if opts is not None else noise_offset
    if o:
        off = torch.full((1,), float(o), device=dev, dtype=dt)
        if opts is not None and opts.noise_offset_random_strength:
            off = torch.rand(1, generator=generator, device=dev, dtype=dt) * o
        if opts is not None and opts.adaptive_noise_scale:
            off = (off + opts.adaptive_noise_scale * latents.mean(dim=(2, 3), keepdim=True).abs()).clamp(min=0)
        else:
            off = off.view(1, 1, 1, 1)
        noise = noise + off * torch.randn(latents.shape[0], latents.shape[1], 1, 1, generator=generator, device=dev,
                                          dtype=dt)
    if opts is not None and opts.multires_noise_iterations:
        noise = pyramid_noise(noise, generator, opts.multires_noise_iterations, opts.multires_noise_discount,
                              host_rng or random.Random(0))
    return noise


def pyramid_noise(noise: torch.Tensor, generator, iterations: int, discount: float, host_rng: random.Random):
    """sd-scripts' multires noise: add upsampled coarser noise (scale 1/r^i, r ~ U(2,4)) times discount^i, then
    normalise by the std. r is drawn on the host from a seeded Random: no device sync."""
    b, c, h, w = noise.shape
    for i in range(int(iterations)):
        r = host_rng.random() * 2 + 2
        hn, wn = max(1, int(h / (r ** i))), max(1, int(w / (r ** i)))
        coarse = torch.randn(b, c, hn, wn, generator=generator, device=noise.device, dtype=noise.dtype)
        noise = noise + F.interpolate(coarse, size=(h, w), mode="bilinear") * discount ** i
        if hn == 1 or wn == 1:
            break
    return noise / noise.std()


def input_noise(noise: torch.Tensor, generator, opts: LossOptions | None):
    """Input perturbation (ip_noise_gamma): the model sees noise + γ·ε', the target stays ``noise``."""
    if opts is None or not opts.ip_noise_gamma:
        return noise
    g = opts.ip_noise_gamma
    extra = torch.randn(noise.shape, generator=generator, device=noise.device, dtype=noise.dtype)
    if opts.ip_noise_gamma_random_strength:
        g = torch.rand(1, generator=generator, device=noise.device, dtype=noise.dtype) * g
    return noise + g * extra


def sample_timesteps(batch: int, generator: torch.Generator | None, device, min_t: int = 0, max_t: int = 1000):
    if min_t >= max_t:  # (sd-scripts' get_timesteps: min_timestep = max_timestep trains at that one step)
        return torch.full((batch,), max_t, device=device, dtype=torch.long)
    return torch.randint(min_t, max_t, (batch,), generator=generator, device=device)


def _huber_c(t: torch.Tensor, schedule: NoiseSchedule, opts: LossOptions) -> torch.Tensor:
    if opts.huber_schedule == "constant":
        return torch.full(t.shape, opts.huber_c * opts.huber_scale, device=t.device)
    if opts.huber_schedule == "exponential":
        alpha = -torch.log(torch.tensor(opts.huber_c, device=t.device)) / schedule.num_timesteps
        return torch.exp(-alpha * t.float()) * opts.huber_scale
    sigma = schedule.sqrt_1m_ac[t] / schedule.sqrt_ac[t]  # snr schedule
    return (1 - opts.huber_c) / (1 + sigma) ** 2 + opts.huber_c


def denoising_loss(pred: torch.Tensor, target: torch.Tensor, t: torch.Tensor, schedule: NoiseSchedule,
                   loss_weights: torch.Tensor | None = None, min_snr_gamma: float | None = None,
                   reduce: bool = True, opts: LossOptions | None = None,
                   mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample loss (l2 / l1 / huber / smooth_l1), prior weights, then sd-scripts' post-processing in its order:
    min-SNR, v-pred scaling like noise-pred, v-pred-like loss, debiased estimation."""
    p, y = pred.float(), target.float()
    kind = (opts.loss_type if opts is not None else "l2") or "l2"
    if kind == "l2":
        loss = F.mse_loss(p, y, reduction="none")
    elif kind == "l1":
        loss = (p - y).abs()
    else:
        c = _huber_c(t, schedule, opts).view(-1, 1, 1, 1)
        root = torch.sqrt((p - y) ** 2 + c ** 2) - c
        loss = 2 * c * root if kind == "huber" else 2 * root
    if mask is not None:  # alpha_mask: [B, 1, h, w] at latent size (sd-scripts' apply_masked_loss, same order)
        loss = loss * mask.to(loss.dtype)
    loss = loss.mean(dim=(1, 2, 3))
    if loss_weights is not None:
        loss = loss * loss_weights
    gamma = opts.min_snr_gamma if opts is not None else min_snr_gamma
    if gamma:
        loss = loss * schedule.min_snr_weight(t, gamma)
    if opts is not None:
        snr = schedule.snr[t].clamp(max=1000)
        if opts.scale_v_pred_loss_like_noise_pred:
            loss = loss * (snr / (snr + 1))
        if opts.v_pred_like_loss:
            loss = loss + loss / (snr / (snr + 1)) * opts.v_pred_like_loss
        if opts.debiased_estimation_loss:
            loss = loss * (1 / (snr + 1) if schedule.parameterization == "v" else 1 / snr.sqrt())
    return loss.mean() if reduce else loss
