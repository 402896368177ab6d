"""Buckets, image->bucket assignment, resize/crop, SDXL size conditioning, batches and steps.

Every expected number is written out as a literal, with the arithmetic of sd-scripts' documented rule in a comment
(training-anchors.md §1.5, §2 "Gradient accumulation"; sd-scripts model_util.make_bucket_resolutions,
train_util.BucketManager, train_network.py L799-805)."""

import math
import random

import numpy as np
import pytest

from lib_lora.train.buckets import (
    BucketManager,
    BucketSettingsError,
    adjust_min_max_bucket_reso,
    batches_per_epoch,
    compute_steps,
    make_bucket_resolutions,
)
from lib_lora.train.images import get_crop_ltrb, resize_and_crop, sdxl_size_conditioning


def _with_transposes(pairs, square):
    out = {square}
    for a, b in pairs:
        out.add((a, b))
        out.add((b, a))
    return sorted(out)


def test_bucket_list_512_256_1024_64_is_the_documented_17():
    # area 512*512 = 262144; square floor(512/64)*64 = 512.
    # w=256: 262144//256=1024 -> 1024 | 320: 819//64=12 -> 768 | 384: 682 -> 640 | 448: 585 -> 576 | 512 -> 512
    # 576: 455 -> 448 | 640: 409 -> 384 | 704: 372 -> 320 | 768: 341 -> 320 | 832..1024: 315,292,273,256 -> 256
    expected = [
        (256, 832), (256, 896), (256, 960), (256, 1024), (320, 704), (320, 768), (384, 640), (448, 576),
        (512, 512), (576, 448), (640, 384), (704, 320), (768, 320), (832, 256), (896, 256), (960, 256), (1024, 256),
    ]
    assert make_bucket_resolutions((512, 512), 256, 1024, 64) == expected
    assert len(expected) == 17  # training-anchors §8: "17 buckets"


def test_bucket_list_1024_256_2048_64():
    # area 1048576, square 1024. h(w) = min(2048, floor((1048576//w)/64)*64):
    # 256..512 -> 2048 (capped); 576: 1820 -> 1792; 640: 1638 -> 1600; 704: 1489 -> 1472; 768: 1365 -> 1344;
    # 832: 1260 -> 1216; 896: 1170 -> 1152; 960: 1092 -> 1088; 1280: 819 -> 768 (new pair 768x1280);
    # 1408: 744 -> 704; 1536: 682 -> 640; 1664: 630 -> 576; 1728: 606 -> 576; 1856/1920/1984: 564/546/528 -> 512.
    pairs = [(256, 2048), (320, 2048), (384, 2048), (448, 2048), (512, 2048), (576, 1792), (640, 1600), (704, 1472),
             (768, 1344), (832, 1216), (896, 1152), (960, 1088), (768, 1280), (704, 1408), (640, 1536), (576, 1664),
             (576, 1728), (512, 1856), (512, 1920), (512, 1984)]
    expected = _with_transposes(pairs, (1024, 1024))
    assert len(expected) == 41  # 20 pairs x 2 + the square
    assert make_bucket_resolutions((1024, 1024), 256, 2048, 64) == expected


def test_bucket_list_rectangular_768x512():
    # area 393216; square floor(627.06/64)*64 = 576.
    # 256: 1536 -> capped 1024 | 320: 1228 -> 1216 -> 1024 | 384: 1024 | 448: 877 -> 832 | 512: 768 | 576: 682 -> 640
    # 704: 558 -> 512 | 896: 438 -> 384 | 960: 409 -> 384 (others repeat earlier pairs transposed)
    pairs = [(256, 1024), (320, 1024), (384, 1024), (448, 832), (512, 768), (576, 640), (512, 704), (384, 896),
             (384, 960)]
    expected = _with_transposes(pairs, (576, 576))
    assert len(expected) == 19
    assert make_bucket_resolutions((768, 512), 256, 1024, 64) == expected


@pytest.mark.parametrize("reso,lo,hi,step", [((512, 512), 256, 1024, 64), ((1024, 1024), 512, 2048, 32),
                                             ((640, 448), 320, 960, 64), ((512, 512), 64, 512, 64)])
def test_bucket_list_matches_an_independent_rederivation(reso, lo, hi, step):
    # Written from the docs' wording, not from our code: "always the square floor(sqrt(area)/step)*step; then for
    # each w in min..max by step the tallest h <= max with w*h <= area, h a multiple of step, h >= min; both ways".
    area = reso[0] * reso[1]
    want = {(math.isqrt(area) // step * step,) * 2}
    for w in range(lo, hi + 1, step):
        h = max((h for h in range(step, hi + 1, step) if (area // w) >= h), default=0)
        if h >= lo:
            want |= {(w, h), (h, w)}
    assert make_bucket_resolutions(reso, lo, hi, step) == sorted(want)


def test_min_max_rounding_and_refusals():
    # 250 -> 250 - 250 % 64 = 192; 1000 -> 1000 + 64 - 1000 % 64 = 1024
    lo, hi, notes = adjust_min_max_bucket_reso((512, 512), 250, 1000, 64)
    assert (lo, hi) == (192, 1024) and len(notes) == 2
    # below one step it would round to 0 (sd-scripts then divides by it): the smallest side is one step
    lo, _, notes = adjust_min_max_bucket_reso((64, 64), 32, 1024, 64)
    assert lo == 64 and "smallest bucket side is 64" in notes[0]
    with pytest.raises(BucketSettingsError, match="min_bucket_reso 768"):
        adjust_min_max_bucket_reso((512, 512), 768, 1024, 64)
    with pytest.raises(BucketSettingsError, match="max_bucket_reso 512"):
        adjust_min_max_bucket_reso((768, 768), 256, 512, 64)


def _mgr(no_upscale=False):
    return BucketManager(no_upscale, (512, 512), 256, 1024, 64)


@pytest.mark.parametrize("size,bucket,resized", [
    # 600x400 (ar 1.5): nearest ar among 640/384=1.667 (err .167) and 576/448=1.286 (err .214) -> 640x384;
    # image narrower than bucket -> scale = 640/600 -> (640, int(426.67+.5)=427)
    ((600, 400), (640, 384), (640, 427)),
    # 400x600 (ar .667): 384/640=.6 (err .067) vs 448/576=.778 (err .111) -> 384x640; scale 640/600 -> (427, 640)
    ((400, 600), (384, 640), (427, 640)),
    # exact size in the list -> that bucket, no resize
    ((512, 512), (512, 512), (512, 512)),
    # 1024x768 (1.333): 576/448=1.2857 (err .048) -> wider than bucket -> scale 448/768 -> (int(597.33+.5)=597, 448)
    ((1024, 768), (576, 448), (597, 448)),
    # 2000x500 (ar 4.0) = 1024/256 exactly; not wider -> scale 1024/2000 -> (1024, 256)
    ((2000, 500), (1024, 256), (1024, 256)),
    # 300x300 -> square bucket, upscaled 512/300 -> (512, 512)
    ((300, 300), (512, 512), (512, 512)),
])
def test_select_bucket_nearest_aspect(size, bucket, resized):
    c = _mgr().select_bucket(*size)
    assert c.reso == bucket and c.resized_size == resized
    assert c.ar_error == pytest.approx(bucket[0] / bucket[1] - size[0] / size[1])


@pytest.mark.parametrize("size,bucket,resized", [
    # not larger than 512^2: keep size, bucket = size floored to 64: 300 -> 256
    ((300, 300), (256, 256), (300, 300)),
    ((200, 130), (192, 128), (200, 130)),
    ((512, 512), (512, 512), (512, 512)),
    # 2000x1000 (ar 2): rw = sqrt(262144*2) = 724.08, rh = 362.04; width-rounded: 724 -> 704, h 352 -> 320, ar 2.2;
    # height-rounded: 362 -> 320, w 640, ar 2.0 -> closer -> resized (640, 320), bucket (640, 320)
    ((2000, 1000), (640, 320), (640, 320)),
    # 1000x700 (ar 1.4286): rw 611.96 -> 612 -> 576, h 403.2 -> 403 -> 384, ar 1.5 (err .071);
    # rh 428.37 -> 428 -> 384, w 548.6 -> 549 -> 512, ar 1.333 (err .095) -> width wins:
    # resized (576, int(403.2+.5)=403), bucket (576, 403-19=384)
    ((1000, 700), (576, 384), (576, 403)),
])
def test_select_bucket_no_upscale(size, bucket, resized):
    c = _mgr(no_upscale=True).select_bucket(*size)
    assert c.reso == bucket and c.resized_size == resized


def test_crop_ltrb_and_sdxl_conditioning():
    # bucket 640x384 (ar 1.667) wider than image 600x400 (ar 1.5): fit height -> 576x384;
    # left = (640-576)//2 = 32, top = 0, right = 608, bottom = 384
    ltrb = get_crop_ltrb((640, 384), (600, 400))
    assert ltrb == (32, 0, 608, 384)
    # SDXL gets (h, w) pairs: original (400, 600), crop top-left (0, 32), target (384, 640)
    assert sdxl_size_conditioning((600, 400), ltrb, (640, 384)) == ((400, 600), (0, 32), (384, 640))
    # flipped: left = target_w - right = 640 - 608 = 32
    assert sdxl_size_conditioning((600, 400), ltrb, (640, 384), flipped=True)[1] == (0, 32)
    # image 300x200 in 512x512: bucket narrower -> fit width: 512 x 341.33; top = (512-341.33)//2 = 85
    l, t, r, b = get_crop_ltrb((512, 512), (300, 200))
    assert (l, t, r) == (0, 85, 512) and b == pytest.approx(85 + 512 / 1.5)
    # width 384*1.3 = 499.2 -> left (640-499.2)//2 = 70, right 569.2 -> flipped left 640-569.2 = 70.8 -> int 70
    ltrb = get_crop_ltrb((640, 384), (650, 500))
    assert sdxl_size_conditioning((650, 500), ltrb, (640, 384), flipped=True)[1] == (0, 70)


def test_resize_and_crop_center_and_random():
    rows = (np.arange(427) % 256).astype(np.uint8)[:, None, None]  # row index (mod 256) encodes position
    img = np.broadcast_to(rows, (427, 640, 3)).copy()
    # already at resized size (640, 427): only the 43 overflow rows are trimmed, 43//2 = 21 from the top
    out = resize_and_crop(img, (640, 384), (640, 427))
    assert out.pixels.shape == (384, 640, 3)
    assert out.crop_offset == (0, 21)
    assert out.pixels[0, 0, 0] == 21 and out.pixels[-1, 0, 0] == (21 + 383) % 256
    assert out.original_size == (640, 427)
    # random crop draws randint(0, overflow) with the given rng
    wide = np.zeros((384, 700, 3), np.uint8)
    out = resize_and_crop(wide, (640, 384), (700, 384), random_crop=True, rng=random.Random(3))
    assert out.crop_offset == (random.Random(3).randint(0, 60), 0)
    # real resize: 600x400 -> (640, 427) then trim to 640x384
    out = resize_and_crop(np.full((400, 600, 3), 200, np.uint8), (640, 384), (640, 427))
    assert out.pixels.shape == (384, 640, 3) and out.original_size == (600, 400)
    assert abs(int(out.pixels[100, 100, 0]) - 200) <= 1
    assert out.crop_ltrb == (32, 0, 608, 384)


def test_batches_and_steps():
    # three buckets of 10 samples at batch 2 -> 5 + 5 + 5
    assert batches_per_epoch({(512, 512): 10, (640, 384): 10, (384, 640): 10}, 2) == 15
    # partial last batch per bucket: ceil(5/2) + ceil(3/2) = 3 + 2
    assert batches_per_epoch({(512, 512): 5, (640, 384): 3}, 2) == 5
    # epochs win: 4 x ceil(15/1) = 60
    st = compute_steps(15, 1, 1600, 4)
    assert (st.max_train_steps, st.num_epochs, st.updates_per_epoch) == (60, 4, 15)
    # grad accum 2: ceil(15/2) = 8 per epoch -> 4 x 8 = 32
    assert compute_steps(15, 2, 1600, 4).max_train_steps == 32
    # steps only: 100 steps, ceil(100/15) = 7 epochs
    st = compute_steps(15, 1, 100, None)
    assert (st.max_train_steps, st.num_epochs, st.from_epochs) == (100, 7, False)
    # sd-scripts default: 1600 steps; ceil(15/4) = 4 per epoch -> 400 epochs
    st = compute_steps(15, 4, 1600, None)
    assert (st.max_train_steps, st.num_epochs) == (1600, 400)


def test_images_are_resized_with_the_filters_sd_scripts_uses():
    """sd-scripts' resize_image: OpenCV's INTER_AREA when shrinking (the default), Lanczos (PIL) when enlarging,
    OpenCV for bilinear/bicubic/nearest and PIL for box; PIL's BOX filter stood in for INTER_AREA, 2-4 grey levels
    apart on a photo and visibly sharper."""
    cv2 = pytest.importorskip("cv2")
    from PIL import Image
    from lib_lora.train import images as I
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (97, 131, 3), dtype=np.uint8)
    assert np.array_equal(I._resize(img, (120, 88), None), cv2.resize(img, (120, 88), interpolation=cv2.INTER_AREA))
    up = np.asarray(Image.fromarray(img).resize((150, 111), resample=Image.Resampling.LANCZOS))
    assert np.array_equal(I._resize(img, (150, 111), None), up)
    for name, flag in (("bilinear", cv2.INTER_LINEAR), ("bicubic", cv2.INTER_CUBIC),
                       ("nearest", cv2.INTER_NEAREST_EXACT)):
        assert np.array_equal(I._resize(img, (120, 88), name), cv2.resize(img, (120, 88), interpolation=flag)), name
    box = np.asarray(Image.fromarray(img).resize((120, 88), resample=Image.Resampling.BOX))
    assert np.array_equal(I._resize(img, (120, 88), "box"), box)
    assert I.resize_tag() == "|cv2"
