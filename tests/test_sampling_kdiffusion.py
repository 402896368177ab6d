"""The headless k-diffusion samplers against k-diffusion 0.0.16 itself (the version A1111 1.10.1 pins), run the way
A1111's KDiffusionSampler runs it: CompVisDenoiser (or CompVisVDenoiser) on the model's float32 alphas_cumprod,
the sigmas of its 'Automatic' schedule per sampler, x = noise * sigma_max, and the ancestral noise drawn on from
the picture's CPU generator."""

import importlib.util
import os
import sys
import types

import pytest
import torch

from lib_lora.train.sampling import KSchedule, k_denoiser, k_sample


def _k_diffusion():
    """k_diffusion's sampling/external modules without its package __init__ (which imports its training stack)."""
    if "_kdiff_ref" in sys.modules:
        return sys.modules["_kdiff_ref"]
    spec = importlib.util.find_spec("k_diffusion")
    assert spec is not None, "k-diffusion==0.0.16 is a test requirement (.ci/env.sh)"
    root = os.path.dirname(spec.origin)
    pkg = types.ModuleType("_kdiff_ref")
    pkg.__path__ = [root]
    sys.modules["_kdiff_ref"] = pkg
    for name in ("utils", "sampling", "external"):
        s = importlib.util.spec_from_file_location(f"_kdiff_ref.{name}", os.path.join(root, f"{name}.py"))
        m = importlib.util.module_from_spec(s)
        sys.modules[s.name] = m
        s.loader.exec_module(m)
        setattr(pkg, name, m)
    return pkg


def _alphas_cumprod():  # SD's scaled-linear schedule in float32, as ldm registers it
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float()


class _Model(torch.nn.Module):
    """A CompVis-style model (alphas_cumprod + apply_model) whose output depends on x and t nonlinearly."""

    def __init__(self, v=False):
        super().__init__()
        self.register_buffer("alphas_cumprod", _alphas_cumprod())
        g = torch.Generator().manual_seed(7)
        self.w = torch.randn(4, 4, generator=g) * 0.5
        self.parameterization = "v" if v else "eps"

    def apply_model(self, x, t, cond=None):
        t = t.float().view(-1, 1, 1, 1)
        mix = torch.einsum("oc,bchw->bohw", self.w, x)
        return torch.tanh(mix) * (0.5 + t / 1000) + 0.3 * torch.sin(t / 97.0) * x


# (A1111 1.10: sd_samplers_kdiffusion.samplers_k_diffusion, with scheduler 'Automatic')
_A1111 = {"Euler": ("sample_euler", None, False), "Euler a": ("sample_euler_ancestral", None, False),
          "Heun": ("sample_heun", None, False), "LMS": ("sample_lms", None, False),
          "DPM2": ("sample_dpm_2", "karras", True), "DPM2 a": ("sample_dpm_2_ancestral", "karras", True),
          "DPM++ 2M": ("sample_dpmpp_2m", "karras", False)}


def _a1111_sigmas(kd, den, scheduler, discard, steps):
    steps += 1 if discard else 0
    if scheduler == "karras":
        sigmas = kd.sampling.get_sigmas_karras(steps, den.sigmas[0].item(), den.sigmas[-1].item())
    else:
        sigmas = den.get_sigmas(steps)
    return torch.cat([sigmas[:-2], sigmas[-1:]]) if discard else sigmas


@pytest.mark.parametrize("v", [False, True], ids=["eps", "v"])
@pytest.mark.parametrize("label", list(_A1111))
@pytest.mark.parametrize("steps", [5, 20])
def test_each_sampler_matches_k_diffusion(label, steps, v):
    kd = _k_diffusion()
    model = _Model(v)
    den = (kd.external.CompVisVDenoiser if v else kd.external.CompVisDenoiser)(model)
    func, scheduler, discard = _A1111[label]
    sigmas = _a1111_sigmas(kd, den, scheduler, discard, steps)
    shape = (1, 4, 8, 8)

    g = torch.Generator().manual_seed(1234)
    noise = torch.randn(shape, generator=g)
    extra = {}
    if "ancestral" in func:
        extra["noise_sampler"] = lambda s, s_next: torch.randn(shape, generator=g)
    want = getattr(kd.sampling, func)(den, noise * sigmas[0], sigmas, extra_args={"cond": None}, disable=True,
                                      **extra)

    schedule = KSchedule(model.alphas_cumprod)
    ours_sigmas = schedule.for_sampler(label, steps)
    torch.testing.assert_close(ours_sigmas, sigmas, rtol=1e-6, atol=0)

    def eps_fn(x_in, t, a):  # what ModelSampler gives: the model's eps (v turned into eps)
        out = model.apply_model(x_in, torch.full((x_in.shape[0],), t))
        if v:
            out = a ** 0.5 * out + (1 - a) ** 0.5 * x_in
        return out

    calls = []
    g2 = torch.Generator().manual_seed(1234)
    noise2 = torch.randn(shape, generator=g2)
    got = k_sample(label, k_denoiser(eps_fn, schedule), noise2 * ours_sigmas[0], ours_sigmas,
                   noise=lambda: torch.randn(shape, generator=g2), callback=lambda i, n: calls.append((i, n)))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert calls[-1] == (len(sigmas) - 1, len(sigmas) - 1)
    # the ancestral ones drew the same noise (the generators are at the same place)
    assert torch.equal(torch.randn(1, generator=g), torch.randn(1, generator=g2))


def test_sigma_to_t_matches_k_diffusion_between_and_at_the_table_entries():
    kd = _k_diffusion()
    model = _Model()
    den = kd.external.CompVisDenoiser(model)
    schedule = KSchedule(model.alphas_cumprod)
    sig = torch.cat([den.sigmas[::37], torch.tensor([0.05, 0.5, 3.3, 14.0])])
    for s in sig:
        torch.testing.assert_close(schedule.sigma_to_t(s), den.sigma_to_t(s), rtol=1e-6, atol=1e-5)
