"""sd-scripts' disk-cached latents (``.npz``), for fine-tuning datasets whose images are gone.

sd-scripts writes them next to the images: ``<stem>_<WWWW>x<HHHH>_sd.npz`` / ``_sdxl.npz`` (cache_latents_to_disk,
strategy_sd.py @48d368fa) or ``<stem>.npz`` (prepare_buckets_latents.py and older cache_latents_to_disk). Each holds
``latents`` [4, h, w] as the VAE gives them (not yet scaled by the model's scale factor), ``original_size`` (w, h),
``crop_ltrb``, and when made with flip_aug / alpha_mask ``latents_flipped`` and ``alpha_mask`` [H, W] in 0..1
(strategy_base.save_latents_to_disk). The latent's own size is the image's bucket.
"""

from __future__ import annotations

import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .images import image_extensions

_NEW_NAME = re.compile(r"_(\d{4,})x(\d{4,})_(sd|sdxl)\.npz$")


@dataclass(frozen=True)
class LatentFile:
    path: Path
    bucket: tuple[int, int]          # (w, h) in pixels: the latent's size x 8
    original_size: tuple[int, int]   # (w, h) of the image before it was resized, for SDXL's size embedding
    crop_ltrb: tuple[float, float, float, float]  # (sd-scripts' numbers, fractions kept: the flip uses them)
    flipped: bool                    # holds latents_flipped (flip_aug)
    alpha: bool                      # holds alpha_mask
    made_for: str | None             # 'sd' | 'sdxl' from the file name; None for <stem>.npz


class LatentFileError(ValueError):
    """A cached latent that cannot be used; the message says why."""


def find_latent(key: str, image_dir: str | None) -> list[Path]:
    """The cached latents sd-scripts would have written for a metadata key whose image is missing, best first:
    ``<stem>.npz`` (sd-scripts prefers it too), then ``<stem>_<W>x<H>_sd(xl).npz`` in name order."""
    k = Path(key)
    base = k if k.is_absolute() or not image_dir else Path(image_dir) / key
    if base.suffix.lower() in image_extensions():
        base = base.with_suffix("")
    found = [base.parent / f"{base.name}.npz"] if (base.parent / f"{base.name}.npz").is_file() else []
    try:
        near = sorted(base.parent.glob(f"{_escape(base.name)}_*x*_sd*.npz"), key=str)
    except OSError:
        near = []
    # (the glob already gave the stem; the rest must be exactly _<W>x<H>_sd(xl).npz, not another key's longer name)
    found += [p for p in near if _NEW_NAME.fullmatch(p.name[len(base.name):])]
    return found


def _escape(name: str) -> str:
    return re.sub(r"([\[\]*?])", r"[\1]", name)


def read_latent(path: Path) -> LatentFile:
    """What a cached latent holds, checked; LatentFileError when it cannot be trained on."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            keys = set(npz.files)
            if "latents" not in keys:
                raise LatentFileError(
                    "not an sd-scripts latent cache (no 'latents' array"
                    + ("; an old-format file from before 2023: make it again with the images" if "arr_0" in keys
                       else "") + ")")
            z = npz["latents"]
            if z.ndim != 3 or z.shape[0] != 4 or min(z.shape[1:]) < 1:
                raise LatentFileError(f"its latents have shape {list(z.shape)}, not [4, h, w] (an SD/SDXL VAE's)")
            if not np.isfinite(z).all():
                raise LatentFileError("its latents hold NaN or infinite values (a VAE overflow when it was made)")
            if "latents_flipped" in keys and npz["latents_flipped"].shape != z.shape:
                raise LatentFileError("its flipped latents have another shape than its latents")
            bucket = (int(z.shape[2]) * 8, int(z.shape[1]) * 8)
            # (without original_size, from older tools, the bucket stands in for it)
            orig = tuple(int(v) for v in npz["original_size"].tolist()) if "original_size" in keys else bucket
            crop = tuple(float(v) for v in npz["crop_ltrb"].tolist()) if "crop_ltrb" in keys else (0, 0, *bucket)
            alpha = "alpha_mask" in keys
            if alpha and tuple(npz["alpha_mask"].shape) != (bucket[1], bucket[0]):
                raise LatentFileError(f"its alpha_mask is {list(npz['alpha_mask'].shape)}, not the latent's "
                                      f"{bucket[1]}x{bucket[0]} pixels")
    except LatentFileError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as e:
        raise LatentFileError(f"cannot be read as .npz ({e})") from None
    if len(orig) != 2 or len(crop) != 4:
        raise LatentFileError("its original_size / crop_ltrb are not (w, h) / (left, top, right, bottom)")
    m = _NEW_NAME.search(path.name)
    return LatentFile(path, bucket, orig, crop, "latents_flipped" in keys, alpha, m.group(3) if m else None)


def load_latent(lat: LatentFile, flip: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """(latents [4, h, w] float32 as the VAE gave them, alpha [H, W] in 0..1 or None), flipped as asked: the cached
    flipped latent, and the alpha mask mirrored (as sd-scripts' dataset does)."""
    with np.load(lat.path, allow_pickle=False) as npz:
        z = np.asarray(npz["latents_flipped" if flip else "latents"], dtype=np.float32)
        a = np.asarray(npz["alpha_mask"], dtype=np.float32) if lat.alpha else None
    if a is not None and flip:
        a = a[:, ::-1].copy()
    return z, a


def name_size(path: Path) -> tuple[int, int] | None:
    """(w, h) of the image from a ``_<W>x<H>_sd.npz`` name (what sd-scripts buckets such an entry by)."""
    m = _NEW_NAME.search(path.name)
    return (int(m.group(1)), int(m.group(2))) if m else None
