"""Test fake of A1111 v1.10.1 ``modules/devices.py`` (reference §6.3): the device and dtypes of a CPU-only fp32
run, and ``torch_gc()`` (frees cached GPU memory; nothing to do on the CPU)."""
import torch

cpu = torch.device("cpu")
device = cpu
dtype = torch.float32
dtype_vae = torch.float32
dtype_unet = torch.float32


def torch_gc():
    pass
