"""Small generated datasets in kohya layout for training tests (real image files, fixed seeds)."""

import os

import numpy as np
from PIL import Image


def _smooth(rng, w, h):
    """A smooth random colour field: what a 'class' photo looks like to a tiny model."""
    base = rng.rand(3, 3, 3)
    img = Image.fromarray((base * 255).astype("uint8")).resize((w, h), Image.BICUBIC)
    return np.asarray(img).astype("float32")


def concept_image(seed, w=64, h=64):
    """The concept: saturated magenta/green stripes with a random phase, nothing like the smooth 'class' images."""
    rng = np.random.RandomState(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    phase = rng.randint(0, 8)
    stripes = ((xx + yy + phase) // 4) % 2
    a = np.where(stripes[..., None] == 1, [230, 20, 230], [20, 220, 60]).astype("float32")
    a += rng.randn(1, 1, 3) * 10
    return Image.fromarray(a.clip(0, 255).astype("uint8"))


def class_image(seed, w=64, h=64):
    return Image.fromarray(_smooth(np.random.RandomState(1000 + seed), w, h).clip(0, 255).astype("uint8"))


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
