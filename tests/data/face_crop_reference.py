"""Writes face_crop_reference.json: the crops sd-scripts' own ``BaseDataset.crop_target`` (face_crop_aug_range)
makes, for tests/test_train_face_crop.py.

sd-scripts is not installed in CI, so the result is committed. Run with an sd-scripts checkout::

    python tests/data/face_crop_reference.py /path/to/sd-scripts

The method is taken from library/train_util.py as it is (its source, compiled here without the rest of the
module, which needs accelerate and the model packages) and called on images whose pixels hold their own
coordinates, with ``resize_image`` replaced by one that makes such an image at the new size: the crop it returns
then tells the scaled size and the crop's corner exactly. Each case seeds Python's ``random`` (the only RNG the
method draws from) before the call.
"""
import ast
import json
import os
import random
import sys
import types

import numpy as np

CASES = []
for (w, h) in ((1024, 768), (600, 900), (512, 512), (800, 800)):
    for face in ((500, 300, 120, 160), (100, 700, 60, 50), (300, 200, 30, 30), (700, 100, 400, 380)):
        if face[0] >= w or face[1] >= h:
            continue
        for target in ((512, 512), (384, 512), (512, 448)):
            if target[0] > w or target[1] > h:
                continue
            for rng_range in ((2.0, 4.0), (1.5, 1.5), (0.5, 8.0)):
                for random_crop in (False, True):
                    for seed in (0, 1, 2):
                        CASES.append(dict(size=[w, h], face=list(face), target=list(target), range=list(rng_range),
                                          random_crop=random_crop, seed=seed))


def crop_target(root):
    src = open(os.path.join(root, "library", "train_util.py"), encoding="utf-8").read()
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.FunctionDef) and node.name == "crop_target":
            fn = ast.Module(body=[node], type_ignores=[])
            break
    else:
        raise SystemExit("crop_target not found")
    ns = {"random": random, "BaseSubset": object, "resize_image": coord_image_resized}
    exec(compile(fn, "train_util.crop_target", "exec"), ns)
    return ns["crop_target"]


def coord_image(w, h):
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([y, x], axis=-1).astype(np.int64)


def coord_image_resized(image, width, height, nw, nh, interpolation=None):
    assert image.shape[:2] == (height, width)
    return coord_image(nw, nh)


def main(root):
    fn = crop_target(root)
    out = []
    for c in CASES:
        w, h = c["size"]
        tw, th = c["target"]
        this = types.SimpleNamespace(width=tw, height=th)
        sub = types.SimpleNamespace(face_crop_aug_range=tuple(c["range"]), random_crop=c["random_crop"],
                                    resize_interpolation=None)
        img = coord_image(w, h)
        random.seed(c["seed"])
        nh_nw = []

        def resized(image, width, height, nw, nh, interpolation=None, _rec=nh_nw):
            _rec.append((nw, nh))
            return coord_image(nw, nh)
        fn.__globals__["resize_image"] = resized
        got = fn(this, sub, img, *c["face"])
        assert got.shape[:2] == (th, tw), (c, got.shape)
        box = None if not nh_nw else [list(nh_nw[0]), [int(got[0, 0, 1]), int(got[0, 0, 0])]]
        out.append({**c, "box": box})
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "face_crop_reference.json")
    with open(path, "w") as f:
        json.dump({"source": "sd-scripts library/train_util.py BaseDataset.crop_target @48d368fa",
                   "cases": out}, f, separators=(",", ":"))
    print(f"wrote {len(out)} cases to {path}")


if __name__ == "__main__":
    main(sys.argv[1])
