"""Writing trained LoRAs the way sd-scripts does: kohya keys, ``ss_*`` + ``modelspec.*`` metadata, ``sshs_*``
hashes, sd-scripts file naming, keep-last-N pruning, atomic writes; plus the full training state for resume."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import random
import re
import shutil
import tempfile
import time

import numpy as np
import torch

from ..formats.hashes import precalculate_safetensors_hashes
from ..formats.safetensors_io import save_file_atomic, write_atomic, write_error_reason

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
              extra: dict | None = None, timesteps: tuple[int | None, int | None] = (None, None)) -> dict[str, str]:
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
    if clip_skip is not None:  # (sd-scripts' sai_model_spec: written whenever clip_skip is given)
        md["modelspec.encoder_layer"] = str(clip_skip)
    if timesteps[0] is not None or timesteps[1] is not None:
        md["modelspec.timestep_range"] = f"{timesteps[0] or 0},{1000 if timesteps[1] is None else timesteps[1]}"
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
    """Keep the newest N numbered saves of this run (``ext`` STATE_EXT: its epoch states); never touches other
    files. ``with_state``: a removed LoRA takes its epoch's state along (sd-scripts' default when
    save_last_n_epochs_state is not set)."""
    if not keep_last or keep_last <= 0:
        return []
    pat = re.compile(re.escape(output_name) + r"-(\d{6})" + re.escape(ext) + "$")
    found = sorted((int(m.group(1)), f) for f in os.listdir(folder) if (m := pat.match(f)))
    removed = []
    for _, f in found[:-keep_last]:
        os.remove(os.path.join(folder, f))
        for state_ext in (STATE_EXT, OLD_STATE_EXT) if with_state else ():
            state = os.path.join(folder, f[: -len(ext)] + state_ext)
            if os.path.exists(state):
                os.remove(state)
        removed.append(f)
    return removed


# ---- full training state -------------------------------------------------------------------------------------
def output_dir_problem(path: str) -> str | None:
    """Why LoRA files could not be written into ``path`` (None when they can), without creating anything: asked
    when a job is queued, so that a run does not train to its end and then fail to save."""
    p = os.path.abspath(path)
    if os.path.exists(p) and not os.path.isdir(p):
        return f"the output folder {p} is a file, not a folder: choose a folder for the LoRA files"
    probe = p
    while not os.path.exists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        return f"the output folder {p} cannot be made: {probe} is a file"
    if not os.access(probe, os.W_OK | os.X_OK):  # (a read-only disk or mount, permissions, an immutable folder)
        what = "the output folder" if probe == p else f"the output folder {p} cannot be made there:"
        return (f"{what} {probe} cannot be written to ({'read-only disk' if _read_only(probe) else 'no permission'})"
                ": choose a folder you can write to")
    return None


def _read_only(path: str) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):  # (no statvfs on Windows)
        return False


def ensure_output_dir(path: str) -> None:
    """Make the output folder and write a test file into it, before the first step; ValueError with what to do."""
    problem = output_dir_problem(path)
    if problem:
        raise ValueError(problem)
    try:
        os.makedirs(path, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".lora-studio-write-test-", dir=path)
        os.close(fd)
        os.remove(tmp)
    except OSError as e:
        raise ValueError(f"the output folder {path} cannot be written to ({e.strerror or e}): choose a folder you "
                         "can write to. Nothing was trained") from None


def disk_space_problem(path: str, needed: int, what: str) -> str | None:
    """A message when the disk holding ``path`` has less than ``needed`` bytes free, else None."""
    try:
        free = shutil.disk_usage(path).free
    except OSError:
        return None
    if free >= needed:
        return None
    return (f"the disk holding {path} has {free / 2**20:.1f} MiB free; about {needed / 2**20:.1f} MiB is needed "
            f"for {what}. Free some space or choose another output folder")


def run_space_problems(out_dir: str, n_params: int, cfg, epochs: int, end_step: int,
                       resumed_at: int = 0) -> tuple[str | None, str | None]:
    """(problem, note) of a run whose network has ``n_params`` parameters: a problem when its final LoRA and a
    resume state cannot fit on the disk of ``out_dir``; a note when all its planned saves would not. A state saved
    after the last step (a cancel while the final LoRA waited) needs room for the LoRA only."""
    lora = int(n_params * SAVE_DTYPES[(cfg.save_precision or "float").lower()].itemsize * 1.05) + 2 ** 20
    state = n_params * 4 * 4 + 2 ** 20  # (fp32 weights and up to three optimizer slots)
    if resumed_at >= end_step:
        return disk_space_problem(out_dir, lora, "the trained LoRA"), None
    problem = disk_space_problem(out_dir, lora + state, "the trained LoRA and a resume state")
    if problem:
        return problem, None
    every = cfg.save_every_n_epochs or 0
    # (no epoch or step save at the end: the final file is that save)
    saves = 1 + ((epochs - 1) // every if every else 0) + (
        (end_step - 1) // cfg.save_every_n_steps if cfg.save_every_n_steps else 0)
    states = saves if cfg.save_state else 0
    problem = disk_space_problem(out_dir, saves * lora + states * state, f"this run's {saves} LoRA file(s)"
                                 + (f" and {states} state(s)" if states else ""))
    return None, (problem + " (files it removes on the way, save_last_n_*, are not counted)" if problem else None)


# LoRA parameters per unit of network_dim on kohya's default targets of the full-size models: (UNet, text encoder(s))
LORA_PARAMS_PER_DIM = {"sd1": (423_936, 165_888), "sd2": (432_128, 423_936), "sdxl": (2_659_840, 903_168)}


# network_args that never make a network smaller than network_dim on the default targets says
_SIZE_NEUTRAL_ARGS = {"algo", "conv_dim", "conv_alpha", "dropout", "rank_dropout", "module_dropout", "use_tucker",
                      "use_scalar", "rank_stabilized", "weight_decompose", "train_norm", "loraplus_lr_ratio",
                      "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio", "use_cp"}


def estimated_lora_params(cfg, family: str | None, train_unet: bool, train_te: bool) -> int | None:
    """Before the network is built (a dry run): about how many parameters a LoRA, LoCon or LoHa of ``cfg`` has on
    the full-size model of ``family`` (its conv layers uncounted: a lower bound); None for other network types."""
    if family not in LORA_PARAMS_PER_DIM or cfg.dim_from_weights:
        return None
    keys = {a.split("=", 1)[0].strip().lower() for a in cfg.network_args or []}
    if keys - _SIZE_NEUTRAL_ARGS:  # (block dims, block LR weights of 0, LyCORIS presets: fewer or smaller layers)
        return None
    algo = "lora"
    if cfg.network_module == "lycoris.kohya":
        algo = next((a.split("=", 1)[1].strip().lower() for a in cfg.network_args or []
                     if a.replace(" ", "").lower().startswith("algo=")), "lora")
    elif cfg.network_module not in (None, "", "networks.lora"):
        return None
    factor = {"lora": 1, "locon": 1, "loha": 2}.get(algo)
    if factor is None:
        return None
    unet, te = LORA_PARAMS_PER_DIM[family]
    return factor * int(cfg.network_dim or 4) * ((unet if train_unet else 0) + (te if train_te else 0))


STATE_EXT = "-state.lsstate"  # (not .pt: the WebUI's Lora page and other tools list every .pt as a LoRA)
OLD_STATE_EXT = "-state.pt"    # (what earlier versions wrote; still resumed)


def run_files(output_name: str) -> re.Pattern:
    """The names of the files a run of ``output_name`` writes in its output folder (LoRAs, states)."""
    n = re.escape(output_name)
    return re.compile(rf"{n}(?:-\d{{6}}|-step\d{{8}})?\.safetensors|"
                      rf"{n}-(?:\d{{6}}|step\d{{8}}|final|cancelled){re.escape(STATE_EXT)}")


class RunLockedError(ValueError):
    """Another live process is training into the same output folder under the same output_name."""


class RunLock:
    """One training at a time per output folder and output_name: ``.<name>.lock`` held with an OS lock, which
    the OS drops when its process ends however it ends (a kill -9 leaves no stale lock, only the small file,
    which the next run takes over). It names its holder for the message. A folder that takes no locks (some
    network shares) runs unlocked, as before."""

    def __init__(self, folder: str, output_name: str, by: str = ""):
        self.path = os.path.join(folder, f".{output_name}.lock")
        self.name, self.by, self.fd = output_name, by, None

    def __enter__(self):
        for _ in range(5):  # (the file may be removed by its holder between our open and our lock)
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError:
                return self
            got = _os_lock(fd)
            if got is False:
                holder = _lock_holder(fd)
                os.close(fd)
                raise RunLockedError(
                    f"another training is writing '{self.name}' files in {os.path.dirname(self.path)} right now"
                    f"{f' ({holder})' if holder else ''}; two runs there would write over each other's files. Wait "
                    "for it to end, or give this run another output_name or output_dir")
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except OSError:
                same = False
            if same or got is None:
                break
            _os_unlock(fd)
            os.close(fd)
        else:
            return self
        self.fd = fd
        with contextlib.suppress(OSError):
            info = {"pid": os.getpid(), "host": _hostname(), "by": self.by,
                    "started": datetime.datetime.now().isoformat(timespec="seconds")}
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, json.dumps(info).encode())
        return self

    def __exit__(self, *exc):
        if self.fd is None:
            return
        with contextlib.suppress(OSError):  # (removed while held: a waiting opener then sees another file)
            os.remove(self.path)
        _os_unlock(self.fd)
        os.close(self.fd)
        self.fd = None


def _hostname() -> str:
    import socket
    try:
        return socket.gethostname()
    except OSError:
        return "?"


def _lock_holder(fd) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        info = json.loads(os.read(fd, 4096).decode("utf-8") or "{}")
    except (OSError, ValueError):
        return ""
    if not isinstance(info, dict) or "pid" not in info:
        return ""
    where = "" if info.get("host") == _hostname() else f" on {info.get('host')}"
    by = f"{info['by']}, " if info.get("by") else ""
    return f"{by}process {info['pid']}{where}, started {str(info.get('started', '?')).replace('T', ' ')}"


def _os_lock(fd):
    """True: locked; False: another process holds it; None: this filesystem takes no locks."""
    try:
        import fcntl
    except ImportError:
        fcntl = None
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        else:  # Windows: a byte far past the data, so the holder's note stays readable
            import msvcrt
            os.lseek(fd, 1 << 30, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        return True
    except BlockingIOError:
        return False
    except OSError as e:
        import errno
        return False if e.errno in (errno.EACCES, errno.EAGAIN, getattr(errno, "EDEADLOCK", errno.EDEADLK)) else None
    except ImportError:
        return None


def _os_unlock(fd) -> None:
    with contextlib.suppress(Exception):
        try:
            import fcntl
            fcntl.flock(fd, fcntl.LOCK_UN)
        except ImportError:
            import msvcrt
            os.lseek(fd, 1 << 30, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)


def rng_state() -> dict:
    # (numpy's key as a tensor: the state file then loads with torch's restricted, weights-only unpickler)
    name, keys, pos, has_gauss, cached = np.random.get_state()
    st = {"torch": torch.get_rng_state(), "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos),
                                                   int(has_gauss), float(cached)], "python": random.getstate()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict):
    torch.set_rng_state(st["torch"])
    name, keys, *rest = st["numpy"]
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else keys
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    py = st["python"]  # (a weights-only load gives the inner tuple back as a list)
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def save_state(path: str, state: dict):
    """torch.save to a temp file in the same folder, then rename: a kill mid-save never leaves a broken state."""
    try:
        write_atomic(path, lambda f: torch.save(state, f), binary=True, fsync=True)
    except OSError as e:
        folder = os.path.dirname(os.path.abspath(path))
        why = write_error_reason(e)
        err = StateFileError(f"could not write the resumable state {os.path.basename(path)} to {folder}: {why}. "
                             "Free some space or make the folder writable")
        err.why, err.errno = why, e.errno
        raise err from None


class StateFileError(ValueError):
    """A resume state that cannot be read; the message says why and what to do."""


def load_state(path: str, check_only: bool = False) -> dict:
    """A state file, through torch's weights-only unpickler (nothing in it can run code). torch.serialization.load
    is called directly: the WebUI swaps torch.load for a checker that turns current torch's zip layout down and
    answers None. Files of earlier versions hold numpy's RNG key as an array, allowed here by name.
    ``check_only``: the tensors are memory-mapped, not read (a check before the model loads)."""
    if os.path.isdir(path):  # (sd-scripts' save_state writes an Accelerate folder, <name>-state)
        raise StateFileError(f"{path} is a folder: sd-scripts' save_state folders (Accelerate's format) cannot be "
                             f"resumed here; resume from a *{STATE_EXT} file that LoRA Studio wrote, or start a new "
                             "run from the LoRA saved at that point with network_weights = that .safetensors file")
    if not os.path.isfile(path):
        auto = ("; 'auto' is the command line's --resume auto: over HTTP give the job's resume_state (GET "
                "/jobs/{id}/files lists it as kind \"state\")" if os.path.basename(path).lower() == "auto" else "")
        raise StateFileError(f"the state file {path} does not exist; resume from a *{STATE_EXT} (or *{OLD_STATE_EXT}) "
                             f"file that a cancelled or save_state run wrote{auto}")

    what = _not_a_state(path)
    if what and path.endswith((STATE_EXT, OLD_STATE_EXT)):  # (named as a state: a damaged one)
        raise StateFileError(f"the state file {os.path.basename(path)} cannot be read as a LoRA Studio resume "
                             f"state (it is {what}). Resume from another state file, or start again from the last "
                             "saved LoRA with network_weights")
    if what:
        raise StateFileError(f"{os.path.basename(path)} is {what}, not a resume state: resume from a "
                             f"*{STATE_EXT} file that a cancelled or save_state run wrote (beside its LoRA files)")

    def read():
        if check_only:
            try:
                return torch.serialization.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception:  # (mmap needs torch's zip layout: read it the ordinary way and say what is wrong)
                pass
        return torch.serialization.load(path, map_location="cpu", weights_only=True)

    try:
        try:
            st = read()
        except Exception as first:
            allow = getattr(torch.serialization, "safe_globals", None)
            if allow is None or "numpy" not in str(first):
                raise
            with allow(_numpy_rng_globals()):
                st = read()
    except Exception as e:  # (a damaged file, or one that is not ours)
        why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        if "Weights only load failed" in why:  # (torch's long advice about weights_only is not for this case)
            why = "it holds Python objects that a state file does not, left unloaded as they could run code"
        raise StateFileError(f"the state file {os.path.basename(path)} cannot be read as a LoRA Studio resume "
                             f"state ({why}). Resume from another state file, or start again from the last saved "
                             "LoRA with network_weights")
    if not isinstance(st, dict) or not {"network", "optimizer", "step", "rng"} <= set(st):
        raise StateFileError(f"{os.path.basename(path)} is not a LoRA Studio resume state (it lacks the network, "
                             "optimizer, step or RNG entries)")
    return st


def _not_a_state(path: str) -> str | None:
    """What a file given as a state plainly is instead ("a LoRA .safetensors file", "a text file"), from its first
    bytes; None for a zip (torch's layout) or an old-style pickle, which the unpickler judges."""
    with open(path, "rb") as f:
        head = f.read(16)
    if not head:
        return "an empty file, perhaps a save cut short"
    if head[:2] == b"PK" or head[:1] == b"\x80":
        return None
    if len(head) >= 9 and head[8:9] == b"{":
        return ("a LoRA .safetensors file (to train on from its weights, give it as network_weights)"
                if path.lower().endswith(".safetensors") else "a safetensors file")
    if any(b < 9 or 13 < b < 32 for b in head):
        return "a binary file of another kind"
    return "a text file" + (" (a training config?)" if path.lower().endswith((".toml", ".json")) else "")


def _numpy_rng_globals() -> list:
    from numpy.core.multiarray import _reconstruct
    return [_reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


class CsvLog:
    """``logging_dir``: the run's numbers as ``<logging_dir>/<log_prefix><YYYYmmddHHMMSS>/losses.csv`` (sd-scripts'
    folder naming; TensorBoard itself is not among the WebUI's packages). One row per logged step or validation,
    flushed as written, so a crashed or cancelled run keeps its log."""

    COLUMNS = ("step", "epoch", "loss", "avg_loss", "lr", "val_loss", "keys_scaled", "max_key_norm")

    def __init__(self, logging_dir: str, prefix: str | None, started: float):
        self.folder = os.path.join(logging_dir, f"{prefix or ''}{time.strftime('%Y%m%d%H%M%S', time.localtime(started))}")
        self.path = os.path.join(self.folder, "losses.csv")
        self.failed: str | None = None  # why the log stopped (a full disk mid-run): the run goes on without it
        try:
            os.makedirs(self.folder, exist_ok=True)
            self._f = open(self.path, "a", encoding="utf-8", newline="")
            if self._f.tell() == 0:
                self._f.write(",".join(self.COLUMNS) + "\n")
        except OSError as e:
            raise ValueError(f"logging_dir: the loss log {self.path} cannot be written ({write_error_reason(e)}); choose a "
                             "folder you can write to, or leave logging_dir empty. Nothing was trained") from None

    def event(self, e):
        if e.kind == "step":
            row = {"step": e.step, "epoch": e.epoch, "loss": e.loss, "avg_loss": e.avg_loss, "lr": e.lr,
                   "keys_scaled": e.extra.get("keys_scaled"), "max_key_norm": e.extra.get("max_key_norm")}
        elif e.kind == "validation":
            row = {"step": e.step, "epoch": e.epoch, "val_loss": e.loss}
        else:
            return
        if self.failed:
            return
        try:
            self._f.write(",".join("" if row.get(c) is None else (f"{row[c]:.6g}" if isinstance(row[c], float)
                                                                  else str(row[c])) for c in self.COLUMNS) + "\n")
            self._f.flush()
        except OSError as e:
            self.failed = write_error_reason(e)

    def close(self):
        with contextlib.suppress(OSError):  # (rows that did not fit were said when they failed)
            self._f.close()

