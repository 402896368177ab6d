"""Small generated datasets in kohya layout for training tests (real image files, fixed seeds)."""

import os

import numpy as np
from PIL import Image

from lib_lora.quickstart import smooth_field


def concept_image(seed, w=64, h=64):
    """The concept: one fixed, saturated quadrant layout (small per-image jitter). A model that learned it can
    predict it from pure noise, so the loss drop shows at high timesteps; nothing like the random 'class' fields."""
    rng = np.random.RandomState(seed)
    a = np.zeros((h, w, 3), "float32")
    a[: h // 2, : w // 2] = [235, 20, 220]
    a[: h // 2, w // 2:] = [20, 210, 60]
    a[h // 2:, : w // 2] = [30, 40, 230]
    a[h // 2:, w // 2:] = [240, 220, 30]
    a += rng.randn(1, 1, 3) * 8
    return Image.fromarray(a.clip(0, 255).astype("uint8"))


def class_image(seed, w=64, h=64):
    return Image.fromarray(smooth_field(np.random.RandomState(1000 + seed), w, h).clip(0, 255).astype("uint8"))


def make_dataset(root, n_concept=4, repeats=5, n_reg=0, reg_repeats=1, size=(64, 64), captions=None):
    """root/img/{repeats}_svs cat/*.png (+ .txt captions) and root/reg/{reg_repeats}_cat/*.png."""
    img_dir = os.path.join(root, "img", f"{repeats}_svs cat")
    os.makedirs(img_dir, exist_ok=True)
    for i in range(n_concept):
        concept_image(i, *size).save(os.path.join(img_dir, f"c{i}.png"))
        if captions:
            with open(os.path.join(img_dir, f"c{i}.txt"), "w", encoding="utf-8") as f:
                f.write(captions[i % len(captions)])
    reg = None
    if n_reg:
        reg = os.path.join(root, "reg")
        d = os.path.join(reg, f"{reg_repeats}_cat")
        os.makedirs(d, exist_ok=True)
        for i in range(n_reg):
            class_image(i, *size).save(os.path.join(d, f"r{i}.png"))
    return os.path.join(root, "img"), reg


def job_config(img, out_dir, **kw) -> dict:
    """The small run most training tests use: 64 px, batch 1, rank 4, fixed seed, fp32 files."""
    c = {"train_data_dir": img, "resolution": 64, "train_batch_size": 1, "output_dir": str(out_dir),
         "output_name": "x", "network_dim": 4, "network_alpha": 2, "learning_rate": 1e-3, "text_encoder_lr": 5e-4,
         "seed": 3, "save_precision": "float"}
    c.update(kw)
    return c


def cancelled_then_resumed(host, cfg, at_step: int):
    """Cancel a run once it has logged ``at_step`` training steps (not the caching progress, whose events count
    images), resume it from its state; (cancelled, resumed) results."""
    from lib_lora.train.run import plan_for
    from lib_lora.train.trainer import Trainer

    seen = {"step": 0}
    part = Trainer(host, cfg, plan_for(host, cfg), on_event=lambda e: e.kind == "step" and seen.update(step=max(seen["step"], e.step)),
                   should_cancel=lambda: seen["step"] >= at_step).run()
    assert part.status == "cancelled" and part.state_file and part.steps >= at_step
    return part, Trainer(host, cfg, plan_for(host, cfg)).run(resume_state=part.state_file)


def hold_run_lock(folder, name):
    """Another process holding the run lock of ``name`` in ``folder``, as a second training would; kill it with
    SIGKILL to see what a kill -9 leaves."""
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = (f"import sys, time; sys.path.insert(0, {root!r}); from lib_lora.train.saving import RunLock; "
            f"RunLock({str(folder)!r}, {name!r}, 'a test run').__enter__(); print('held', flush=True); time.sleep(120)")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p
