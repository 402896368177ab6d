"""A1111/kohya-compatible LoRA hashes.

- addnet hash (A1111 `modules/hashes.py: addnet_hash_safetensors`, kohya `train_util.addnet_hash_safetensors`):
  sha256 of every byte after the safetensors header, so editing metadata does not change it. Civitai's AutoV3.
- full sha256 of the file; `shorthash` = first 12 hex chars (what A1111 shows for LoRAs).
- legacy 8-hex model hash (A1111 `sd_models.model_hash`, kohya `addnet_hash_legacy`): sha256 of the 64 KiB at
  offset 1 MiB.
- sd-scripts `precalculate_safetensors_hashes(tensors, metadata)`: the same two hashes computed on an in-memory
  serialisation that keeps only the `ss_*` metadata keys; written as `sshs_model_hash` / `sshs_legacy_hash`.
"""
import hashlib
import io
import os

from .errors import LoraFileError
from .safetensors_io import read_header, refuse_pickle

BLOCK = 1024 * 1024
LEGACY_OFFSET = 0x100000
LEGACY_LENGTH = 0x10000


def _addnet_hash_stream(b):
    """kohya/A1111 algorithm on a seekable binary stream: skip 8 + n header bytes, sha256 the rest."""
    h = hashlib.sha256()
    b.seek(0)
    n = int.from_bytes(b.read(8), "little")
    b.seek(n + 8)
    for chunk in iter(lambda: b.read(BLOCK), b""):
        h.update(chunk)
    return h.hexdigest()


def _legacy_hash_stream(b):
    h = hashlib.sha256()
    b.seek(LEGACY_OFFSET)
    h.update(b.read(LEGACY_LENGTH))
    return h.hexdigest()[:8]


def _open(path):
    try:
        return open(path, "rb")
    except OSError as e:
        raise LoraFileError(f"cannot read {os.path.basename(os.fspath(path))} to hash it: {e.strerror or e}. "
                            f"Check that the file exists and is readable.", path) from e


def addnet_hash(path):
    """A1111's LoRA hash for safetensors (full hex sha256 of the bytes after the header)."""
    read_header(path)  # a corrupt file gets a clear error instead of a hash of garbage
    with _open(path) as f:
        return _addnet_hash_stream(f)


def sha256_file(path):
    """Full-file sha256 (hex)."""
    h = hashlib.sha256()
    with _open(path) as f:
        for chunk in iter(lambda: f.read(BLOCK), b""):
            h.update(chunk)
    return h.hexdigest()


def legacy_model_hash(path):
    """A1111's old 8-hex model hash: sha256 of the 64 KiB at offset 1 MiB (empty input for files under 1 MiB)."""
    with _open(path) as f:
        return _legacy_hash_stream(f)


def shorthash(h):
    """The 12-character short form A1111 shows and puts in infotext ("Lora hashes")."""
    return h[:12]


def precalculate_safetensors_hashes(tensors, metadata):
    """(sshs_model_hash, sshs_legacy_hash) exactly as kohya sd-scripts `train_util.precalculate_safetensors_hashes`.

    Only `ss_*` metadata is kept (so user metadata edits don't change the hashes), the dict is serialised in memory
    with `safetensors.torch.save`, then the addnet and legacy hashes are taken of that byte string.
    """
    import safetensors.torch
    ss_meta = {k: v for k, v in (metadata or {}).items() if k.startswith("ss_")}
    b = io.BytesIO(safetensors.torch.save(tensors, ss_meta))
    return _addnet_hash_stream(b), _legacy_hash_stream(b)


def sshs_hashes(tensors, metadata):
    """The metadata entries {'sshs_model_hash': ..., 'sshs_legacy_hash': ...} a trainer writes into the file."""
    model_hash, legacy_hash = precalculate_safetensors_hashes(tensors, metadata)
    return {"sshs_model_hash": model_hash, "sshs_legacy_hash": legacy_hash}


def lora_hash(path, metadata=None):
    """The hash A1111 uses for a LoRA: metadata `sshs_model_hash` if present, else the addnet hash of the file."""
    refuse_pickle(path)
    if metadata is None:
        metadata = read_header(path).get("__metadata__") or {}
    h = metadata.get("sshs_model_hash")
    return h if h else addnet_hash(path)
