"""The denoising loss on the host's own noise schedule (ε or v targets, min-SNR, noise offset, prior weight).

Everything stays on the device as tensors: no ``.item()`` or host sync inside a step, so a step can be captured.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class NoiseSchedule:
    def __init__(self, alphas_cumprod: torch.Tensor, parameterization: str = "eps"):
        if parameterization not in ("eps", "v"):
            raise ValueError(f"unsupported parameterization {parameterization!r} (eps or v)")
        ac = alphas_cumprod.detach().to(torch.float64)
        self.parameterization = parameterization
        self.num_timesteps = ac.shape[0]
        self.sqrt_ac = ac.sqrt().float()
        self.sqrt_1m_ac = (1 - ac).sqrt().float()
        self.snr = (ac / (1 - ac)).float()

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


def sample_noise(latents: torch.Tensor, generator: torch.Generator | None, noise_offset: float = 0.0):
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    if noise_offset:
        noise = noise + noise_offset * torch.randn(latents.shape[0], latents.shape[1], 1, 1, generator=generator,
                                                   device=latents.device, dtype=latents.dtype)
    return noise


def sample_timesteps(batch: int, generator: torch.Generator | None, device, min_t: int = 0, max_t: int = 1000):
    return torch.randint(min_t, max_t, (batch,), generator=generator, device=device)


def denoising_loss(pred: torch.Tensor, target: torch.Tensor, t: torch.Tensor, schedule: NoiseSchedule,
                   loss_weights: torch.Tensor | None = None, min_snr_gamma: float | None = None,
                   reduce: bool = True) -> torch.Tensor:
    loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if loss_weights is not None:
        loss = loss * loss_weights
    if min_snr_gamma:
        loss = loss * schedule.min_snr_weight(t, min_snr_gamma)
    return loss.mean() if reduce else loss
