"""Writing trained LoRAs the way sd-scripts does: kohya keys, ``ss_*`` + ``modelspec.*`` metadata, ``sshs_*``
hashes, sd-scripts file naming, keep-last-N pruning, atomic writes; plus the full training state for resume."""

from __future__ import annotations

import datetime
import json
import os
import random
import re
import time

import numpy as np
import torch

from ..formats.hashes import precalculate_safetensors_hashes
from ..formats.safetensors_io import save_file_atomic, write_atomic

SAVE_DTYPES = {"fp16": torch.float16, "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
               "fp32": torch.float32, "float": torch.float32, "float32": torch.float32}

BASE_MODEL_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sd2v": "sd_v2_v", "sdxl": "sdxl_base_v1-0"}
ARCHITECTURE = {"sd1": "stable-diffusion-v1/lora", "sd2": "stable-diffusion-v2-512/lora",
                "sd2v": "stable-diffusion-v2-768-v/lora", "sdxl": "stable-diffusion-xl-v1-base/lora"}


def ckpt_name(output_name: str, epoch_or_step: int | None, ext: str = ".safetensors") -> str:
    """sd-scripts naming: name-000002.safetensors for epoch saves, name.safetensors for the final file."""
    if epoch_or_step is None:
        return output_name + ext
    return f"{output_name}-{epoch_or_step:06d}{ext}"


def step_ckpt_name(output_name: str, step: int, ext: str = ".safetensors") -> str:
    return f"{output_name}-step{step:08d}{ext}"


def metadata_strings(values: dict) -> dict[str, str]:
    """sd-scripts stores str(v) for scalars and JSON for dicts/lists."""
    out = {}
    for k, v in values.items():
        if isinstance(v, (dict, list)):
            out[k] = json.dumps(v, ensure_ascii=False)
        else:
            out[k] = str(v)
    return out


def modelspec(family_key: str, title: str, resolution: tuple[int, int], prediction: str, clip_skip, started: float,
              extra: dict | None = None) -> dict[str, str]:
    md = {
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": ARCHITECTURE[family_key],
        "modelspec.implementation": ("https://github.com/Stability-AI/generative-models" if family_key == "sdxl"
                                     else "diffusers"),
        "modelspec.title": title,
        "modelspec.resolution": f"{resolution[0]}x{resolution[1]}",
        "modelspec.date": datetime.datetime.fromtimestamp(started).isoformat(timespec="seconds"),
        "modelspec.prediction_type": "v" if prediction == "v" else "epsilon",
        "modelspec.implementation_version": "lora-studio",
    }
    if clip_skip not in (None, 1):
        md["modelspec.encoder_layer"] = str(clip_skip)
    for k, v in (extra or {}).items():
        if v not in (None, ""):
            md[f"modelspec.{k}"] = str(v)
    return md


def save_lora(path: str, tensors: dict[str, torch.Tensor], ss_metadata: dict[str, str],
              spec: dict[str, str] | None = None) -> dict[str, str]:
    """Atomic write with sshs hashes computed like sd-scripts (over the tensors + ss_* keys only)."""
    md = dict(ss_metadata)
    model_hash, legacy_hash = precalculate_safetensors_hashes(tensors, md)
    md["sshs_model_hash"] = model_hash
    md["sshs_legacy_hash"] = legacy_hash
    if spec:
        md.update(spec)
    save_file_atomic(tensors, path, md)
    return md


# what sd-scripts writes with --no_metadata (train_util.SS_METADATA_MINIMUM_KEYS)
MINIMUM_METADATA_KEYS = ("ss_v2", "ss_base_model_version", "ss_network_module", "ss_network_dim", "ss_network_alpha",
                         "ss_network_args")


def prune_old_steps(folder: str, output_name: str, step: int, keep_steps: int, ext: str = ".safetensors") -> list[str]:
    """``save_last_n_steps``: remove this run's step saves older than ``keep_steps`` steps before ``step`` (as
    sd-scripts keeps the files of the last S steps); other files are never touched."""
    if not keep_steps or keep_steps <= 0:
        return []
    pat = re.compile(re.escape(output_name) + r"-step(\d{8})" + re.escape(ext) + "$")
    removed = []
    for f in sorted(os.listdir(folder)):
        m = pat.match(f)
        if m and int(m.group(1)) < step - keep_steps:
            os.remove(os.path.join(folder, f))
            removed.append(f)
    return removed


def prune_old(folder: str, output_name: str, keep_last: int, ext: str = ".safetensors",
              with_state: bool = True) -> list[str]:
    """Keep the newest N numbered saves of this run (``ext`` "-state.pt": its epoch states); never touches other
    files. ``with_state``: a removed LoRA takes its epoch's state along (sd-scripts' default when
    save_last_n_epochs_state is not set)."""
    if not keep_last or keep_last <= 0:
        return []
    pat = re.compile(re.escape(output_name) + r"-(\d{6})" + re.escape(ext) + "$")
    found = sorted((int(m.group(1)), f) for f in os.listdir(folder) if (m := pat.match(f)))
    removed = []
    for _, f in found[:-keep_last]:
        os.remove(os.path.join(folder, f))
        state = os.path.join(folder, f[: -len(ext)] + "-state.pt")
        if with_state and os.path.exists(state):
            os.remove(state)
        removed.append(f)
    return removed


# ---- full training state -------------------------------------------------------------------------------------
def rng_state() -> dict:
    st = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict):
    torch.set_rng_state(st["torch"])
    np.random.set_state(st["numpy"])
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def save_state(path: str, state: dict):
    """torch.save to a temp file in the same folder, then rename: a kill mid-save never leaves a broken state."""
    write_atomic(path, lambda f: torch.save(state, f), binary=True, suffix=".pt", fsync=True)


def load_state(path: str) -> dict:
    # our own file, written by save_state; weights_only=False because it holds RNG and optimizer objects
    return torch.load(path, map_location="cpu", weights_only=False)


class CsvLog:
    """``logging_dir``: the run's numbers as ``<logging_dir>/<log_prefix><YYYYmmddHHMMSS>/losses.csv`` (sd-scripts'
    folder naming; TensorBoard itself is not among the WebUI's packages). One row per logged step or validation,
    flushed as written, so a crashed or cancelled run keeps its log."""

    COLUMNS = ("step", "epoch", "loss", "avg_loss", "lr", "val_loss", "keys_scaled", "max_key_norm")

    def __init__(self, logging_dir: str, prefix: str | None, started: float):
        self.folder = os.path.join(logging_dir, f"{prefix or ''}{time.strftime('%Y%m%d%H%M%S', time.localtime(started))}")
        os.makedirs(self.folder, exist_ok=True)
        self.path = os.path.join(self.folder, "losses.csv")
        self._f = open(self.path, "a", encoding="utf-8", newline="")
        if self._f.tell() == 0:
            self._f.write(",".join(self.COLUMNS) + "\n")

    def event(self, e):
        if e.kind == "step":
            row = {"step": e.step, "epoch": e.epoch, "loss": e.loss, "avg_loss": e.avg_loss, "lr": e.lr,
                   "keys_scaled": e.extra.get("keys_scaled"), "max_key_norm": e.extra.get("max_key_norm")}
        elif e.kind == "validation":
            row = {"step": e.step, "epoch": e.epoch, "val_loss": e.loss}
        else:
            return
        self._f.write(",".join("" if row.get(c) is None else (f"{row[c]:.6g}" if isinstance(row[c], float)
                                                              else str(row[c])) for c in self.COLUMNS) + "\n")
        self._f.flush()

    def close(self):
        self._f.close()
