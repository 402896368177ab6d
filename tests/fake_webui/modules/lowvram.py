"""Test fake of A1111 v1.10.1 ``modules/lowvram.py`` (reference §6.4): with --medvram/--lowvram the model parts
live on the CPU and forward pre-hooks move the one in use to the GPU (``module_in_gpu``);
``send_everything_to_cpu()`` evicts it. No hooks are installed here; ``calls`` counts the evictions."""
from modules import devices

module_in_gpu = None
calls = []


def send_everything_to_cpu():
    global module_in_gpu
    calls.append("send_everything_to_cpu")
    if module_in_gpu is not None:
        module_in_gpu.to(devices.cpu)
    module_in_gpu = None


def is_enabled(sd_model):
    return bool(getattr(sd_model, "lowvram", False))
