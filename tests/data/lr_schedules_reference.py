"""Writes lr_schedules_reference.json: the LR multipliers transformers' own schedules give, for the schedules the
WebUI's pinned transformers (4.30.2) does not have yet. Run with transformers >= 4.45 (5.17 was used):

    python tests/data/lr_schedules_reference.py

The test (tests/test_train_optim.py) compares lib_lora's schedules with these numbers; it never runs this.
"""
import json
import os

import torch
import transformers
from transformers import optimization as T

TOTAL, WARMUP = 100, 10


def multipliers(make):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = make(opt)
    out = []
    for _ in range(TOTAL + 5):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


cases = {
    # sd-scripts: num_cycles / 2 and min_lr_rate = lr_scheduler_min_lr_ratio
    "cosine_with_min_lr": multipliers(lambda o: T.get_cosine_with_min_lr_schedule_with_warmup(
        o, WARMUP, TOTAL, num_cycles=0.5, min_lr_rate=0.1)),
    # sd-scripts: decay steps from lr_decay_steps, stable = total - warmup - decay, num_cycles / 2
    "warmup_stable_decay": multipliers(lambda o: T.get_wsd_schedule(
        o, num_warmup_steps=WARMUP, num_stable_steps=TOTAL - WARMUP - 30, num_decay_steps=30, num_cycles=0.5,
        min_lr_ratio=0.05)),
    "inverse_sqrt": multipliers(lambda o: T.get_inverse_sqrt_schedule(o, num_warmup_steps=WARMUP)),
}
path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lr_schedules_reference.json")
with open(path, "w", encoding="utf-8") as f:
    json.dump({"transformers": transformers.__version__, "total": TOTAL, "warmup": WARMUP,
               "min_lr_ratio": {"cosine_with_min_lr": 0.1, "warmup_stable_decay": 0.05}, "decay_steps": 30,
               "cases": cases}, f, indent=0)
print(path)
