"""Writes sd_scripts_latents/*.npz: latent cache files made by sd-scripts' own code, for
tests/test_train_metadata_dataset.py (fine-tuning keys whose images are gone).

sd-scripts is not installed in CI, so the files are committed. Run with an sd-scripts checkout::

    python tests/data/sd_scripts_latents_reference.py /path/to/sd-scripts

library/strategy_base.py is loaded as it is (its logging set-up stubbed), and SdSdxlLatentsCachingStrategy is
compiled from library/strategy_sd.py alone (the rest of that module needs the training stack). The strategy names
each file (get_latents_npz_path) and writes it (save_latents_to_disk); the arrays are seeded numbers that the test
makes again with ``arrays(name)``.
"""
import ast
import importlib.util
import os
import sys
import types

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "sd_scripts_latents")

# key -> (image size (w, h) the name records, bucket (w, h), original_size, crop_ltrb, sdxl, flipped, alpha)
CASES = {
    "cat": ((100, 200), (64, 128), (100, 200), (2, 0, 66, 128), False, True, True),
    "dog": ((128, 64), (128, 64), (128, 64), (0, 0, 128, 64), True, False, False),
    "odd": ((96, 96), (96, 96), (96, 96), (0, 0, 96, 96), False, False, False),
}


def arrays(name: str, bucket):
    rng = np.random.default_rng(sum(map(ord, name)))
    w, h = bucket
    z = rng.standard_normal((4, h // 8, w // 8)).astype(np.float32)
    zf = rng.standard_normal((4, h // 8, w // 8)).astype(np.float32)
    alpha = rng.random((h, w)).astype(np.float32)
    return z, zf, alpha


def strategy_class(root):
    sys.modules.setdefault("library", types.ModuleType("library"))
    sys.modules.setdefault("library.utils", types.SimpleNamespace(setup_logging=lambda *a, **k: None))
    spec = importlib.util.spec_from_file_location("sds_strategy_base", os.path.join(root, "library", "strategy_base.py"))
    base = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(base)
    src = open(os.path.join(root, "library", "strategy_sd.py"), encoding="utf-8").read()
    node = next(n for n in ast.parse(src).body if isinstance(n, ast.ClassDef) and n.name == "SdSdxlLatentsCachingStrategy")
    ns = {"os": os, "LatentsCachingStrategy": base.LatentsCachingStrategy, "Tuple": tuple, "List": list, "Any": object,
          "torch": torch, "train_util": None}
    exec(compile(ast.Module(body=[node], type_ignores=[]), "strategy_sd.py", "exec"), ns)
    return ns["SdSdxlLatentsCachingStrategy"]


def main(root):
    cls = strategy_class(root)
    os.makedirs(OUT, exist_ok=True)
    for f in os.listdir(OUT):
        os.remove(os.path.join(OUT, f))
    for name, (size, bucket, orig, crop, sdxl, flipped, alpha) in CASES.items():
        strategy = cls(not sdxl, True, 1, False)
        path = strategy.get_latents_npz_path(os.path.join(OUT, name + ".png"), size)
        z, zf, a = arrays(name, bucket)
        strategy.save_latents_to_disk(path, torch.from_numpy(z), orig, crop, torch.from_numpy(zf) if flipped else None,
                                      torch.from_numpy(a) if alpha else None)
        assert strategy.is_disk_cached_latents_expected(bucket, path, flipped, alpha)
        assert strategy.get_image_size_from_disk_cache_path(path, path) == size
        print(os.path.basename(path))
    # prepare_buckets_latents.py's name: <key>.npz (the same arrays, written by the same method)
    strategy = cls(True, True, 1, False)
    z, _, _ = arrays("old", (64, 64))
    strategy.save_latents_to_disk(os.path.join(OUT, "old.npz"), torch.from_numpy(z), (64, 64), (0, 0, 64, 64))
    print("old.npz")


if __name__ == "__main__":
    main(sys.argv[1])
