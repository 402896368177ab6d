"""sd-scripts' loss and noise switches against the formulas written out here (training-anchors §2)."""

import math
import random

import numpy as np
import pytest
import torch

from lib_lora.train.loss import LossOptions, NoiseSchedule, denoising_loss, input_noise, sample_noise


def _schedule(param="eps"):
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
    return NoiseSchedule(torch.from_numpy(np.cumprod(1 - betas)), param), np.cumprod(1 - betas)


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g), torch.tensor([10, 500, 990])


@pytest.mark.parametrize("kind,schedule_name", [("huber", "snr"), ("smooth_l1", "snr"), ("huber", "constant"),
                                                 ("huber", "exponential"), ("l1", "snr")])
def test_loss_types(kind, schedule_name):
    sch, ac = _schedule()
    p, y, t = _data()
    opts = LossOptions(loss_type=kind, huber_schedule=schedule_name, huber_c=0.1, huber_scale=1.5)
    got = denoising_loss(p, y, t, sch, reduce=False, opts=opts).numpy()
    pn, yn = p.double().numpy(), y.double().numpy()
    want = []
    for i, ti in enumerate(t.tolist()):
        if schedule_name == "snr":
            sigma = math.sqrt((1 - ac[ti]) / ac[ti])
            c = (1 - 0.1) / (1 + sigma) ** 2 + 0.1
        elif schedule_name == "constant":
            c = 0.1 * 1.5
        else:
            c = math.exp(-(-math.log(0.1) / 1000) * ti) * 1.5
        d = pn[i] - yn[i]
        if kind == "l1":
            v = np.abs(d)
        elif kind == "huber":
            v = 2 * c * (np.sqrt(d ** 2 + c ** 2) - c)
        else:
            v = 2 * (np.sqrt(d ** 2 + c ** 2) - c)
        want.append(v.mean())
    np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.parametrize("param", ["eps", "v"])
def test_post_processing_order_and_weights(param):
    sch, ac = _schedule(param)
    p, y, t = _data()
    opts = LossOptions(min_snr_gamma=5.0, scale_v_pred_loss_like_noise_pred=True, v_pred_like_loss=0.2,
                       debiased_estimation_loss=True)
    got = denoising_loss(p, y, t, sch, reduce=False, opts=opts).numpy()
    base = ((p - y) ** 2).double().mean(dim=(1, 2, 3)).numpy()
    snr = ac[t.numpy()] / (1 - ac[t.numpy()])
    w = np.minimum(snr, 5.0) / (snr + 1 if param == "v" else snr)   # min-SNR
    loss = base * w
    s = np.minimum(snr, 1000)
    loss = loss * s / (s + 1)                                        # scale v-pred like noise-pred
    loss = loss + loss / (s / (s + 1)) * 0.2                         # v-pred-like loss
    loss = loss * (1 / (s + 1) if param == "v" else 1 / np.sqrt(s))  # debiased estimation
    np.testing.assert_allclose(got, loss, rtol=1e-5)


def test_noise_offset_adaptive_and_multires():
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    plain = sample_noise(x0, torch.Generator().manual_seed(5), opts=LossOptions())
    assert torch.equal(plain, torch.randn(x0.shape, generator=torch.Generator().manual_seed(5)))
    # adaptive offset: o + a*|mean_HW(latents)| per sample and channel, times a per-channel gaussian
    g = torch.Generator().manual_seed(5)
    got = sample_noise(x0, g, opts=LossOptions(noise_offset=0.1, adaptive_noise_scale=0.5))
    g2 = torch.Generator().manual_seed(5)
    n = torch.randn(x0.shape, generator=g2)
    off = (0.1 + 0.5 * x0.mean(dim=(2, 3), keepdim=True).abs()).clamp(min=0)
    torch.testing.assert_close(got, n + off * torch.randn(2, 4, 1, 1, generator=g2))
    # multires: coarser noise added and the result normalised to unit std
    m = sample_noise(x0, torch.Generator().manual_seed(5), opts=LossOptions(multires_noise_iterations=6,
                                                                              multires_noise_discount=0.3),
                     host_rng=random.Random(3))
    assert abs(float(m.std()) - 1.0) < 1e-5 and not torch.equal(m, plain)


def test_ip_noise_gamma_changes_only_the_input():
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    assert input_noise(noise, torch.Generator().manual_seed(1), LossOptions()) is noise
    g = torch.Generator().manual_seed(1)
    got = input_noise(noise, g, LossOptions(ip_noise_gamma=0.1))
    torch.testing.assert_close(got, noise + 0.1 * torch.randn(noise.shape, generator=torch.Generator().manual_seed(1)))
