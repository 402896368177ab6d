"""Image files for training: which files count, their size, decoding to RGB uint8, resize + crop to a bucket.

sd-scripts rules followed (train_util.py @48d368fa): extensions ``.png .jpg .jpeg .webp .bmp`` (``IMAGE_EXTENSIONS``,
plus ``.avif`` when a Pillow plugin can read it), images are found non-recursively, sorted by path (``glob_images``),
decoded with ``Image.convert("RGB")`` (``load_image``), resized with area averaging when shrinking and Lanczos when
enlarging (``utils.resize_image``), then the overflow is trimmed: centre crop, or a random offset with ``random_crop``
(``trim_and_resize_if_required``).

Where we differ on purpose (each difference is reported by the dataset plan, never silent):

- extensions match in any case (``.Jpg`` too); sd-scripts on Linux globs only all-lower or all-upper ones;
- the EXIF orientation is applied (``ImageOps.exif_transpose``) before the size is read and the pixels used; sd-scripts
  reads the raw size with ``imagesize`` and the raw pixels, so a phone photo tagged "rotate 90" trains sideways there;
- 16-bit greyscale (``I;16*``/``I``) is scaled to 8 bits (value / 257, rounded); ``convert("RGB")`` would clip every
  value above 255 to white. 32-bit float ``F`` is clipped to 0..255.
- RGBA / LA / PA / palette-with-transparency: the alpha channel is dropped exactly as ``convert("RGB")`` does (no
  compositing on white: transparent pixels keep whatever colour they store, often black).
- shrinking uses Pillow's BOX filter (area average, what ``cv2.INTER_AREA`` computes) because OpenCV is not a
  dependency; enlarging uses Pillow's LANCZOS, as sd-scripts does.
"""

from __future__ import annotations

import os
import random
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps

# Same set as sd-scripts' IMAGE_EXTENSIONS; compared lower-case.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

EXIF_ORIENTATION_TAG = 0x0112
# Orientation values 5..8 swap width and height (transpose / rotate 90 / transverse / rotate 270).
_SWAPPING_ORIENTATIONS = (5, 6, 7, 8)

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def image_extensions() -> tuple[str, ...]:
    """The accepted extensions, with ``.avif`` when an installed Pillow plugin registers it (as sd-scripts does)."""
    exts = list(IMAGE_EXTENSIONS)
    if ".avif" in Image.registered_extensions():
        exts.append(".avif")
    return tuple(exts)


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in image_extensions()


def sd_scripts_would_glob(name: str) -> bool:
    """sd-scripts globs ``*.png`` and ``*.PNG`` etc.; on a case-sensitive filesystem ``x.Png`` is missed."""
    ext = os.path.splitext(name)[1]
    return ext.lower() in image_extensions() and (ext == ext.lower() or ext == ext.upper())


def list_images(directory: str | os.PathLike) -> list[Path]:
    """Image files directly inside ``directory`` (not recursive), sorted by path as ``glob_images`` sorts them."""
    d = Path(directory)
    out = [p for p in d.iterdir() if p.is_file() and is_image_name(p.name)]
    out.sort(key=lambda p: str(p))
    return out


@dataclass
class ImageProbe:
    """What the plan needs to know about one image file without keeping its pixels."""

    path: Path
    ok: bool
    size: tuple[int, int] = (0, 0)  # (width, height) after the EXIF orientation is applied
    raw_size: tuple[int, int] = (0, 0)  # (width, height) as stored, what sd-scripts' imagesize reads
    mode: str = ""
    format: str = ""
    orientation: int = 1
    error: str = ""  # why the file cannot be used (when not ok)
    notes: list[str] = field(default_factory=list)

    @property
    def exif_rotated(self) -> bool:
        return self.orientation not in (0, 1)


def _orientation(img: Image.Image, notes: list[str]) -> int:
    try:
        with warnings.catch_warnings(record=True) as caught:  # (Pillow warns "Corrupt EXIF data" and goes on)
            warnings.simplefilter("always")
            value = img.getexif().get(EXIF_ORIENTATION_TAG, 1)
        corrupt = any(issubclass(w.category, UserWarning) for w in caught)
    except Exception:  # malformed EXIF must not make the picture unusable
        corrupt, value = True, 1
    if corrupt:
        notes.append("unreadable EXIF block ignored: used as stored, without EXIF rotation")
    try:
        value = int(value)
    except (TypeError, ValueError):
        return 1
    return value if 1 <= value <= 8 else 1


def probe_image(path: str | os.PathLike, check_pixels: bool = True) -> ImageProbe:
    """Open ``path`` and report its oriented size and mode; with ``check_pixels`` the whole file is decoded so a
    truncated or corrupt file is caught now rather than mid-training. Never raises for a bad image."""
    p = Path(path)
    notes: list[str] = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # (said below as a note)
            with Image.open(p) as img:
                raw = img.size
                mode = img.mode
                fmt = img.format or ""
                if check_pixels:  # (first: a PNG's getexif() decodes the pixels and reports their damage as EXIF's)
                    img.load()
                orientation = _orientation(img, notes)
                has_transparency = "transparency" in img.info
    except Image.DecompressionBombError as e:
        m = re.search(r"\((\d+) pixels\)", str(e))
        size = f" ({int(m.group(1)) / 1e6:,.0f} megapixels)" if m else ""
        limit = 2 * (Image.MAX_IMAGE_PIXELS or 0) / 1e6  # (Pillow refuses at twice the pixels it warns at)
        return ImageProbe(p, ok=False, error=f"is too large to open{size}, beyond the image library's safety limit "
                                             f"({limit:,.0f} megapixels): downscale it; a training image needs no "
                                             "more than a few times the training resolution")
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        # OSError covers UnidentifiedImageError and "image file is truncated".
        reason = str(e) or e.__class__.__name__
        if p.stat().st_size == 0:
            reason = "the file is empty (0 bytes)"
        return ImageProbe(p, ok=False, error=f"cannot be read as an image: {reason}")
    if check_pixels and ImageFile.LOAD_TRUNCATED_IMAGES and _looks_truncated(p, fmt):
        # the host (e.g. the WebUI) lets Pillow pad truncated files silently; catch the common cases ourselves
        return ImageProbe(p, ok=False, error=f"cannot be read as an image: the {fmt} file is truncated")
    w, h = raw
    size = (h, w) if orientation in _SWAPPING_ORIENTATIONS else (w, h)
    probe = ImageProbe(p, ok=True, size=size, raw_size=raw, mode=mode, format=fmt, orientation=orientation,
                       notes=notes)
    if Image.MAX_IMAGE_PIXELS and w * h > Image.MAX_IMAGE_PIXELS:
        probe.notes.append(f"very large ({w}x{h}, {w * h / 1e6:,.0f} megapixels): each decode takes seconds and "
                           "gigabytes; downscale it unless latents are cached")
    if w <= 0 or h <= 0:
        probe.ok = False
        probe.error = f"has an invalid size {w}x{h}"
    if probe.exif_rotated:
        probe.notes.append(
            f"EXIF orientation {orientation} applied: used as {size[0]}x{size[1]} (stored {w}x{h}; sd-scripts ignores "
            "the EXIF orientation and would train it unrotated)"
        )
    if mode in _SIXTEEN_BIT_MODES:
        probe.notes.append(
            f"16-bit greyscale ({mode}) scaled to 8 bits (value/257); sd-scripts' convert('RGB') would clip it to white"
        )
    elif mode == "F":
        probe.notes.append("32-bit float greyscale clipped to 0..255")
    elif mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and has_transparency):
        probe.notes.append(f"{mode} image: the alpha channel is dropped (convert('RGB'), as sd-scripts), not composited")
    return probe


def _looks_truncated(p: Path, fmt: str) -> bool:
    """End-marker check for JPEG (EOI) and PNG (IEND), used only when Pillow is told to accept truncated files."""
    try:
        with open(p, "rb") as f:
            f.seek(0, os.SEEK_END)
            n = f.tell()
            f.seek(max(0, n - 4096))
            tail = f.read()
    except OSError:
        return True
    if fmt == "JPEG":
        return b"\xff\xd9" not in tail
    if fmt == "PNG":
        return b"IEND" not in tail[-64:]
    return False


def to_rgb_array(img: Image.Image) -> np.ndarray:
    """Convert a PIL image of any mode to an HxWx3 uint8 array (rules in the module docstring)."""
    mode = img.mode
    if mode == "RGB":
        return np.asarray(img, dtype=np.uint8).copy()
    if mode in _SIXTEEN_BIT_MODES:
        a = np.asarray(img).astype(np.float64)
        g = np.clip(np.rint(np.clip(a, 0, 65535) / 257.0), 0, 255).astype(np.uint8)
        return np.repeat(g[:, :, None], 3, axis=2)
    if mode == "F":
        a = np.asarray(img).astype(np.float64)
        g = np.clip(np.rint(a), 0, 255).astype(np.uint8)
        return np.repeat(g[:, :, None], 3, axis=2)
    with warnings.catch_warnings():
        # Pillow warns about palette transparency; dropping alpha is the documented behaviour here.
        warnings.simplefilter("ignore", UserWarning)
        return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()


def _decode_oriented(path: str | os.PathLike) -> Image.Image:
    """The decoded picture with its EXIF orientation applied. Pillow's warnings about a very large picture or a
    corrupt EXIF block stay off the console: the plan says them once, and this runs at every decode."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        warnings.simplefilter("ignore", UserWarning)
        with Image.open(path) as img:
            img.load()
            return ImageOps.exif_transpose(img)


class ImageReadError(OSError):
    """A training image that cannot be decoded (damaged, or changed on disk since the dataset was checked)."""

    user_error = True  # (the message names the file and what to do: no traceback in the job's notes)


def load_image_rgb(path: str | os.PathLike) -> np.ndarray:
    """Decode ``path`` with its EXIF orientation applied, as an HxWx3 uint8 RGB array.

    Raises ``OSError`` naming the file when it cannot be decoded (the plan lists such files beforehand)."""
    try:
        return to_rgb_array(_decode_oriented(path))
    except OSError as e:
        raise ImageReadError(f"cannot read training image {os.fspath(path)!r}: {e}. Remove or re-save the file.") from e


def load_image_alpha(path: str | os.PathLike) -> np.ndarray | None:
    """The alpha channel (HxW uint8, EXIF orientation applied) for ``alpha_mask``, or None when the image has
    none (sd-scripts converts such images to RGBA: a mask of ones, i.e. no masking)."""
    try:
        oriented = _decode_oriented(path)
    except OSError as e:
        raise ImageReadError(f"cannot read training image {os.fspath(path)!r}: {e}. Remove or re-save the file.") from e
    if oriented.mode in ("RGBA", "LA", "PA") or (oriented.mode == "P" and "transparency" in oriented.info):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return np.asarray(oriented.convert("RGBA"), dtype=np.uint8)[:, :, 3].copy()
    return None


def color_aug(img: np.ndarray, rng) -> np.ndarray:
    """sd-scripts' ``color_aug`` (AugHelper.color_aug): with probability 0.33, half the time a hue shift of up to
    ±8 on OpenCV's 0..180 hue scale (of the array read as BGR, as sd-scripts passes it), else a gamma in
    [0.95, 1.05] applied to the 0..255 values as they are. OpenCV when importable (the WebUI has it), else the
    same conversion in numpy (within a level or two of OpenCV's fixed-point rounding)."""
    if rng.random() > 0.33:
        return img
    if rng.random() > 0.5:
        shift = rng.uniform(-8, 8)
        if shift < 0:
            shift = 180 + shift
        try:
            import cv2
        except ImportError:  # headless without OpenCV
            hsv = _bgr_to_hsv8(img)
            hsv[:, :, 0] = (hsv[:, :, 0] + shift) % 180
            return _hsv8_to_bgr(hsv)
        hsv = cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_BGR2HSV)
        hsv[:, :, 0] = (hsv[:, :, 0] + shift) % 180
        return cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)
    gamma = rng.uniform(0.95, 1.05)
    return np.clip(img ** gamma, 0, 255).astype(np.uint8)


_HSV_SHIFT = 12
_SDIV = np.array([0] + [int(np.rint((255 << _HSV_SHIFT) / i)) for i in range(1, 256)], dtype=np.int64)
_HDIV180 = np.array([0] + [int(np.rint((180 << _HSV_SHIFT) / (6.0 * i))) for i in range(1, 256)], dtype=np.int64)


def _bgr_to_hsv8(img: np.ndarray) -> np.ndarray:
    """OpenCV's 8-bit BGR -> HSV in its own fixed-point arithmetic (H 0..179 = degrees / 2, S and V 0..255): a
    hue level is 2 degrees, so anything less exact moves saturated colours by up to ~9 levels after a shift."""
    x = img.astype(np.int64)
    b, g, r = x[..., 0], x[..., 1], x[..., 2]
    v = x.max(axis=-1)
    diff = v - x.min(axis=-1)
    half = 1 << (_HSV_SHIFT - 1)
    s = (diff * _SDIV[v] + half) >> _HSV_SHIFT
    h = np.where(v == r, g - b, np.where(v == g, b - r + 2 * diff, r - g + 4 * diff))
    h = (h * _HDIV180[diff] + half) >> _HSV_SHIFT
    h = np.where(h < 0, h + 180, h)
    return np.stack([h, s, v], axis=-1).astype(np.uint8)


def _hsv8_to_bgr(hsv: np.ndarray) -> np.ndarray:
    """OpenCV's 8-bit HSV -> BGR (H 0..179)."""
    h = hsv[..., 0].astype(np.float64) * 2.0 / 60.0
    s = hsv[..., 1].astype(np.float64) / 255.0
    v = hsv[..., 2].astype(np.float64) / 255.0
    i = np.floor(h).astype(np.int64) % 6
    f = h - np.floor(h)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    r = np.choose(i, [v, q, p, p, t, v])
    g = np.choose(i, [t, v, v, q, p, p])
    b = np.choose(i, [p, p, t, v, v, q])
    return np.clip(np.rint(np.stack([b, g, r], axis=-1) * 255.0), 0, 255).astype(np.uint8)


def _resize(img: np.ndarray, size: tuple[int, int], interpolation: str | None) -> np.ndarray:
    h, w = img.shape[:2]
    tw, th = int(size[0]), int(size[1])
    if interpolation is None:
        # sd-scripts: "area" when shrinking in both directions, else "lanczos".
        interpolation = "area" if (w >= tw and h >= th) else "lanczos"
    filters = {
        "area": Image.Resampling.BOX,
        "box": Image.Resampling.BOX,
        "lanczos": Image.Resampling.LANCZOS,
        "lanczos4": Image.Resampling.LANCZOS,
        "nearest": Image.Resampling.NEAREST,
        "bilinear": Image.Resampling.BILINEAR,
        "linear": Image.Resampling.BILINEAR,
        "bicubic": Image.Resampling.BICUBIC,
        "cubic": Image.Resampling.BICUBIC,
    }
    if interpolation not in filters:
        raise ValueError(f"unknown resize_interpolation {interpolation!r}; use one of {sorted(filters)}")
    cv2 = _cv2()
    if cv2 is not None and interpolation in _CV2_FLAGS:  # (sd-scripts: cv2 for these, PIL for lanczos and box)
        return np.ascontiguousarray(cv2.resize(img, (tw, th), interpolation=getattr(cv2, _CV2_FLAGS[interpolation])))
    pil = Image.fromarray(img)
    return np.asarray(pil.resize((tw, th), resample=filters[interpolation]), dtype=np.uint8)


# sd-scripts' get_cv2_interpolation: OpenCV's area average shrinks every image it makes smaller by default
_CV2_FLAGS = {"area": "INTER_AREA", "bilinear": "INTER_LINEAR", "linear": "INTER_LINEAR", "bicubic": "INTER_CUBIC",
              "cubic": "INTER_CUBIC", "nearest": "INTER_NEAREST_EXACT"}
_CV2_MODULE: list = []


def _cv2():
    """OpenCV when importable (the WebUI always has it): sd-scripts resizes with it. Without it (a bare headless
    install) PIL's nearest filters are used, a few grey levels apart (``RESIZE_TAG`` keeps the latent caches
    apart)."""
    if not _CV2_MODULE:
        try:
            import cv2
        except ImportError:
            cv2 = None
        _CV2_MODULE.append(cv2)
    return _CV2_MODULE[0]


def resize_tag() -> str:
    """Part of the latent cache key: latents made with OpenCV's resizing are not those made with PIL's."""
    return "|cv2" if _cv2() is not None else ""


def get_crop_ltrb(bucket_reso: tuple[int, int], image_size: tuple[int, int]) -> tuple[float, float, float, float]:
    """The crop box sd-scripts stores for SDXL conditioning (``BucketManager.get_crop_ltrb``).

    It is computed as if the image were scaled to FIT inside the bucket and centred (Stability's preprocessing), not
    from the actual crop; sd-scripts says so itself. Values may be floats; callers take ``int()``."""
    bw, bh = bucket_reso
    image_ar = image_size[0] / image_size[1]
    if bw / bh > image_ar:
        rw, rh = bh * image_ar, bh
    else:
        rw, rh = bw, bw / image_ar
    left = (bw - rw) // 2
    top = (bh - rh) // 2
    return left, top, left + rw, top + rh


@dataclass
class PreparedImage:
    pixels: np.ndarray  # HxWx3 uint8, exactly bucket size
    original_size: tuple[int, int]  # (w, h) before resizing
    crop_ltrb: tuple[float, float, float, float]
    crop_offset: tuple[int, int]  # (x, y) of the actual trim, for debugging/inspection


def resize_and_crop(
    img: np.ndarray,
    bucket_reso: tuple[int, int],
    resized_size: tuple[int, int],
    random_crop: bool = False,
    rng: random.Random | None = None,
    interpolation: str | None = None,
) -> PreparedImage:
    """Scale ``img`` to ``resized_size`` (which covers the bucket) and trim the overflow to ``bucket_reso``.

    Centre trim uses ``overflow // 2``; with ``random_crop`` the offset is ``rng.randint(0, overflow)`` per axis,
    width first, as sd-scripts draws them."""
    h, w = img.shape[:2]
    original_size = (w, h)
    if (w, h) != tuple(resized_size):
        img = _resize(img, resized_size, interpolation)
    h, w = img.shape[:2]
    bw, bh = bucket_reso
    x = y = 0
    if w > bw:
        trim = w - bw
        x = (rng or random).randint(0, trim) if random_crop else trim // 2
        img = img[:, x : x + bw]
    if h > bh:
        trim = h - bh
        y = (rng or random).randint(0, trim) if random_crop else trim // 2
        img = img[y : y + bh]
    if img.shape[0] != bh or img.shape[1] != bw:
        raise ValueError(
            f"internal error: image resized to {resized_size} does not cover bucket {bucket_reso} "
            f"(got {img.shape[1]}x{img.shape[0]})"
        )
    return PreparedImage(np.ascontiguousarray(img), original_size, get_crop_ltrb(bucket_reso, original_size), (x, y))


def face_from_name(path: str | os.PathLike) -> tuple[int, int, int, int] | None:
    """The face box sd-scripts reads from a file name ``name_cx_cy_w_h.png`` (``load_image_with_face_info``): the
    last four ``_``-separated parts of the stem, centre x/y and width/height in the image's pixels. None when the
    name carries none (sd-scripts stops on a name whose last parts are not numbers; here such an image is simply
    not face-cropped, and the plan counts it) or the centre x is 0 (sd-scripts' "no face" value)."""
    tokens = Path(path).stem.split("_")
    if len(tokens) < 5:
        return None
    try:
        cx, cy, fw, fh = (int(t) for t in tokens[-4:])
    except ValueError:
        return None
    return (cx, cy, fw, fh) if cx > 0 else None


def face_crop_box(size: tuple[int, int], face: tuple[int, int, int, int], target: tuple[int, int],
                  aug_range: tuple[float, float], random_crop: bool = False,
                  rng: random.Random | None = None) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """sd-scripts' ``crop_target`` (face_crop_aug_range, datasets without buckets) as geometry: the size the image is
    scaled to and the (x, y) of the ``target`` crop in it, or None for an image already of the target size. The
    scale puts the face's longer side between ``target short side / aug_range[1]`` and ``/ aug_range[0]`` (never
    enlarging), drawn with ``rng.uniform``; the crop centres the face, jittered by +-face/20 when the range is a
    range, or moved by a wide random offset with ``random_crop``; draws in sd-scripts' order (scale, then y, x).
    An image smaller than the target (sd-scripts stops there) is scaled up just enough to cover it."""
    rng = rng or random
    width, height = size
    tw, th = target
    if (width, height) == (tw, th):
        return None
    cx, cy, fw, fh = face
    face_size = max(fw, fh)
    short = min(th, tw)
    cover = max(th / height, tw / width)
    lo = min(1.0, max(cover, short / (face_size * aug_range[1])))
    hi = min(1.0, max(lo, short / (face_size * aug_range[0])))
    scale = lo if lo >= hi else rng.uniform(lo, hi)
    if cover > 1.0:
        scale = cover
    nh, nw = int(height * scale + 0.5), int(width * scale + 0.5)
    nh, nw = max(nh, th), max(nw, tw)  # (a cover scale rounded down by a pixel)
    centre = (int(cy * scale + 0.5), int(cx * scale + 0.5))
    at = []
    for want, length, face_p in zip((th, tw), (nh, nw), centre):
        p1 = face_p - want // 2
        if random_crop:  # off the centre more often than not, to bring in the background
            span = max(length - face_p, face_p)
            p1 = p1 + (rng.randint(0, span) + rng.randint(0, span)) - span
        elif aug_range[0] != aug_range[1] and face_size > short // 10 and face_size >= 40:
            p1 = p1 + rng.randint(-face_size // 20, face_size // 20)
        at.append(max(0, min(p1, length - want)))
    return (nw, nh), (at[1], at[0])


def face_crop(img: np.ndarray, face: tuple[int, int, int, int], target: tuple[int, int],
              aug_range: tuple[float, float], random_crop: bool = False, rng: random.Random | None = None,
              interpolation: str | None = None) -> PreparedImage:
    """The image (or an alpha channel: the same ``rng`` state gives the same box) cropped around its face by
    ``face_crop_box``. As in sd-scripts the SDXL size numbers are those of the crop (original size = target,
    crop box 0)."""
    h, w = img.shape[:2]
    box = face_crop_box((w, h), face, target, aug_range, random_crop, rng)
    x = y = 0
    if box is not None:
        (nw, nh), (x, y) = box
        if (nw, nh) != (w, h):
            img = _resize(img, (nw, nh), interpolation)
        img = img[y : y + target[1], x : x + target[0]]
    return PreparedImage(np.ascontiguousarray(img), tuple(target), (0, 0, 0, 0), (x, y))


def sdxl_size_conditioning(
    original_size: tuple[int, int],
    crop_ltrb: tuple[float, float, float, float],
    bucket_reso: tuple[int, int],
    flipped: bool = False,
) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """``(original_size_hw, crop_top_left, target_size_hw)`` as sd-scripts feeds SDXL's size embedding.

    ``original_size`` is (w, h) before resizing; under horizontal flip the left crop becomes ``target_w - right``."""
    tw, th = bucket_reso
    left = tw - crop_ltrb[2] if flipped else crop_ltrb[0]
    return (
        (int(original_size[1]), int(original_size[0])),
        (int(crop_ltrb[1]), int(left)),
        (int(th), int(tw)),
    )


def is_upscaled(image_size: tuple[int, int], resized_size: tuple[int, int]) -> bool:
    """True when the image is enlarged on the way to its bucket (sd-scripts then uses Lanczos)."""
    return not (image_size[0] >= resized_size[0] and image_size[1] >= resized_size[1])


__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageProbe",
    "PreparedImage",
    "get_crop_ltrb",
    "image_extensions",
    "is_image_name",
    "is_upscaled",
    "list_images",
    "load_image_rgb",
    "probe_image",
    "resize_and_crop",
    "sd_scripts_would_glob",
    "sdxl_size_conditioning",
    "to_rgb_array",
]
