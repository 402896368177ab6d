"""Host safety: the WebUI's model comes back exactly as it was after every job, finished, cancelled or failed.

We record each module's training flag and each parameter's ``requires_grad`` and device before a job and put them
back in ``finally``. The weights themselves are never written by training (the LoRA lives in separate modules
attached through instance-level forwards, removed on exit); the tests prove it with a hash of the state dict.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch.nn as nn


class HostSnapshot:
    def __init__(self, modules: list[nn.Module]):
        self.modules = modules
        self.training = [(m, m.training) for root in modules for m in root.modules()]
        self.params = [(p, p.requires_grad, p.device) for root in modules for p in root.parameters()]
        self.buffers = [(b, b.device) for root in modules for b in root.buffers()]
        self.forwards = {id(m): m.__dict__.get("forward") for root in modules for m in root.modules()}

    def restore(self):
        problems = []
        for m, was in self.training:
            m.training = was  # per module, not .train(), which would recurse over children
            # an instance-level forward we did not find at the start is a leftover patch
            if "forward" in m.__dict__ and self.forwards.get(id(m)) is None:
                del m.__dict__["forward"]
                problems.append(f"removed a leftover forward patch on {type(m).__name__}")
        for p, rg, dev in self.params:
            if p.requires_grad != rg:
                p.requires_grad_(rg)
            if p.device != dev:
                p.data = p.data.to(dev)
                problems.append(f"moved a parameter back to {dev}")
            p.grad = None
        for b, dev in self.buffers:
            if b.device != dev:
                b.data = b.data.to(dev)
        return problems


@contextmanager
def guarded(modules: list[nn.Module]):
    """Freeze the host for a job and restore its flags/devices on every exit path."""
    snap = HostSnapshot(modules)
    for root in modules:
        for p in root.parameters():
            p.requires_grad_(False)
    try:
        yield snap
    finally:
        snap.restore()
