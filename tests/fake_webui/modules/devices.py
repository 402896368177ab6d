"""Test fake of A1111 v1.10.1 ``modules/devices.py`` (reference §6.3): the device and dtypes of a CPU-only fp32
run, ``torch_gc()`` (frees cached GPU memory; nothing to do on the CPU), and ``test_for_nans`` (A1111's check of
the sampler's and VAE's output, with --no-half's message)."""
import torch

cpu = torch.device("cpu")
device = cpu
dtype = torch.float32
dtype_vae = torch.float32
dtype_unet = torch.float32
fp8 = False  # (A1111: set while an fp8 model is loaded; its samples then compute FP8 weights)


def torch_gc():
    pass


class NansException(Exception):
    pass


def test_for_nans(x, where):
    if not torch.isnan(x[(0, ) * len(x.shape)]):
        return
    message = {"unet": "A tensor with NaNs was produced in Unet.",
               "vae": "A tensor with NaNs was produced in VAE."}.get(where, "A tensor with NaNs was produced.")
    raise NansException(message + " Use --disable-nan-check commandline argument to disable this check.")
