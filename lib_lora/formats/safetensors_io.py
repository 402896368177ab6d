"""Reading and writing LoRA files: safetensors only.

The header is parsed here (8-byte little-endian length + JSON) so that metadata and shapes can be read without
touching the tensor bytes, and so that a corrupt or truncated file gives a message that names the file and says
what to do instead of a bare library error.
"""
import contextlib
import errno
import json
import math
import os
import re
import struct
import tempfile

from .errors import LoraError, LoraFileError

# Extensions of pickle-based formats. Loading a pickle can execute arbitrary code, so we never open them.
PICKLE_EXTENSIONS = (".pt", ".ckpt", ".bin", ".pth", ".pkl", ".pickle")

# safetensors dtype name -> bytes per element (safetensors 0.4 spec).
DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}

# The safetensors library refuses headers above 100 MB; a bigger length means a corrupt file.
MAX_HEADER_BYTES = 100_000_000
# A network tensor beyond this is a diverged run's (fp16 overflows at 65504 once it is multiplied out); alpha is a
# plain scale, where a large value is unusual, not absurd.
ABSURD_VALUE, ABSURD_ALPHA = 1e4, 1e5

_REDOWNLOAD = "Download it again or re-export it; the file cannot be used as it is."


def _name(path):
    return os.path.basename(os.fspath(path))


def refuse_pickle(path):
    """Raise LoraFileError for .pt/.ckpt/.bin files: unpickling can run code hidden in the file."""
    ext = os.path.splitext(os.fspath(path))[1].lower()
    if ext in PICKLE_EXTENSIONS:
        raise LoraFileError(
            f"{_name(path)}: '{ext}' files are Python pickles, and loading a pickle file can run code hidden in it, "
            f"so LoRA Studio does not open them. Convert it to .safetensors with a tool you trust (for example "
            f"kohya's sd-scripts or a one-off `torch.load` + `safetensors.torch.save_file` on a file whose source "
            f"you trust), or get the .safetensors version from the author.", path)


def _sniff_kind(first_bytes):
    if first_bytes.startswith(b"PK\x03\x04"):
        return "a zip archive (a torch .pt/.ckpt pickle saved with a .safetensors name)"
    if first_bytes[:1] == b"\x80" and first_bytes[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "a Python pickle saved with a .safetensors name"
    return None


def read_header(path):
    """Parse and validate the safetensors header; return the raw JSON dict (with '__metadata__' if present).

    Tensor bytes are never read. Every tensor entry is checked: known dtype, non-negative shape, offsets inside
    the file, byte length == numel * itemsize, and the entries tile the data section exactly (as the safetensors
    library itself requires).
    """
    refuse_pickle(path)
    name = _name(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                raise LoraFileError(f"{name} is empty (0 bytes). {_REDOWNLOAD}", path)
            prefix = f.read(8)
            if len(prefix) < 8:
                raise LoraFileError(f"{name} is only {size} bytes long, too short to be a safetensors file "
                                    f"(truncated download?). {_REDOWNLOAD}", path)
            (n,) = struct.unpack("<Q", prefix)
            # a JSON header of a length that fits means safetensors, whatever the length's bytes look like (a header
            # of 0x30480 bytes begins 80 04, as a protocol-4 pickle does); only then are those bytes sniffed
            raw = f.read(n) if 2 <= n <= min(MAX_HEADER_BYTES, size - 8) else b""
            kind = None if raw[:1] == b"{" else _sniff_kind(prefix)
            if kind is not None:
                raise LoraFileError(f"{name} is not a safetensors file: it looks like {kind}. Pickle files can run "
                                    f"code when loaded, so it is refused; convert it to real .safetensors.", path)
            if n < 2 or n > MAX_HEADER_BYTES:
                raise LoraFileError(f"{name} is not a valid safetensors file (header length field is {n}). "
                                    f"{_REDOWNLOAD}", path)
            if 8 + n > size:
                raise LoraFileError(f"{name} is truncated: its header says {n} header bytes but the file has only "
                                    f"{size - 8} after the length field (incomplete download or copy?). "
                                    f"{_REDOWNLOAD}", path)
    except OSError as e:
        raise LoraFileError(f"cannot read {name}: {e.strerror or e}. Check that the file exists and is readable.",
                            path) from e
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise LoraFileError(f"{name} has a corrupt safetensors header (not valid JSON: {e}). {_REDOWNLOAD}",
                            path) from e
    if not isinstance(header, dict):
        raise LoraFileError(f"{name} has a corrupt safetensors header (JSON is not an object). {_REDOWNLOAD}", path)
    _validate_header(header, size - 8 - n, path)
    return header


def _validate_header(header, data_len, path):
    name = _name(path)
    meta = header.get("__metadata__")
    if meta is not None:
        if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
            raise LoraFileError(f"{name}: the '__metadata__' of the header must map strings to strings. "
                                f"{_REDOWNLOAD}", path)
    spans = []
    for key, info in header.items():
        if key == "__metadata__":
            continue
        bad = f"{name}: tensor '{key}' has a corrupt header entry"
        if not isinstance(info, dict):
            raise LoraFileError(f"{bad}. {_REDOWNLOAD}", path)
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in DTYPE_SIZES:
            raise LoraFileError(f"{bad} (unknown dtype {dtype!r}). {_REDOWNLOAD}", path)
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise LoraFileError(f"{bad} (shape {shape!r}). {_REDOWNLOAD}", path)
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and o >= 0 for o in offsets) or offsets[0] > offsets[1]):
            raise LoraFileError(f"{bad} (data_offsets {offsets!r}). {_REDOWNLOAD}", path)
        begin, end = offsets
        if end > data_len:
            raise LoraFileError(f"{name} is truncated or corrupt: tensor '{key}' ends at byte {end} of the data "
                                f"section but the file holds only {data_len} data bytes. {_REDOWNLOAD}", path)
        want = math.prod(shape) * DTYPE_SIZES[dtype]
        if end - begin != want:
            raise LoraFileError(f"{bad}: {end - begin} bytes stored but shape {shape} of {dtype} needs {want}. "
                                f"{_REDOWNLOAD}", path)
        spans.append((begin, end, key))
    spans.sort()
    pos = 0
    for begin, end, key in spans:
        if begin != pos:
            raise LoraFileError(f"{name} is corrupt: tensor '{key}' starts at byte {begin} of the data section, "
                                f"expected {pos} (overlapping or missing data). {_REDOWNLOAD}", path)
        pos = end
    if pos != data_len:
        raise LoraFileError(f"{name} is corrupt: {data_len - pos} unexpected bytes after the last tensor. "
                            f"{_REDOWNLOAD}", path)


def read_metadata(path):
    """The file's `__metadata__` (dict[str, str]); {} when it has none. Tensor bytes are not read."""
    return dict(read_header(path).get("__metadata__") or {})


def read_shapes(path):
    """{tensor key: shape tuple} from the header, without reading tensor bytes."""
    return {k: tuple(v["shape"]) for k, v in read_header(path).items() if k != "__metadata__"}


def load_tensors(path, device="cpu", *, copy=False):
    """Load every tensor of a validated safetensors file onto `device`. On the CPU safetensors maps the file:
    ``copy`` for tensors that are kept (a cache), so that a file the user deletes frees its disk space."""
    read_header(path)
    from safetensors.torch import load_file
    try:
        tensors = load_file(os.fspath(path), device=str(device))
    except Exception as e:  # safetensors raises its own SafetensorError type (Rust); torch may raise RuntimeError
        raise LoraFileError(f"could not load the tensors of {_name(path)}: {e}. {_REDOWNLOAD}", path) from e
    if copy and str(device).split(":")[0] == "cpu":
        tensors = {k: v.clone() for k, v in tensors.items()}
    return tensors


def _check_metadata(metadata, path):
    if metadata is None:
        return None
    bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise LoraError(f"cannot save {_name(path)}: safetensors metadata values must be strings; "
                        f"convert these keys with str()/json.dumps first: {', '.join(map(str, bad[:10]))}", path)
    return dict(metadata)


def write_atomic(path, write, *, binary=False, prefix=None, suffix=".tmp", fsync=False):
    """Write a file through ``write(f)`` into a temp file beside ``path``, then os.replace it onto ``path``: readers
    never see half a file. On any failure the temp file is removed and the error raised. ``fsync`` for files a
    power cut must not lose (training state), the rename included; text is UTF-8. The temp file is named after
    ``path`` (``.name.XXXXXXXX.tmp``), so one a kill leaves behind can be traced and cleaned."""
    path = os.fspath(path)
    if prefix is None:
        prefix = f".{os.path.basename(path)}."
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=os.path.dirname(os.path.abspath(path)))
    try:
        with os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding="utf-8") as f:
            write(f)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, _file_mode(path))  # (mkstemp makes 0600: a caption or picture others cannot read)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    if fsync:
        _fsync_dir(os.path.dirname(os.path.abspath(path)))


_TEMP = re.compile(r"\.(?P<of>.+)\.[a-z0-9_]{8}\.tmp")  # (tempfile's 8 random characters)


def leftover_temps(folder: str, of) -> list[str]:
    """Temp files of this module's atomic writes in ``folder`` (a kill mid-write leaves one) whose target file
    name matches ``of`` (a compiled pattern, or a name); hidden files, so said and removed by their owners."""
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    match = of.fullmatch if hasattr(of, "fullmatch") else of.__eq__
    out = []
    for n in sorted(names):
        m = _TEMP.fullmatch(n)
        if m and match(m.group("of")) and os.path.isfile(os.path.join(folder, n)):
            out.append(os.path.join(folder, n))
    return out


def remove_files(paths: list[str]) -> tuple[int, int]:
    """(how many, bytes) removed; a file that cannot be removed is left."""
    n = size = 0
    for p in paths:
        try:
            b = os.path.getsize(p)
            os.remove(p)
        except OSError:
            continue
        n, size = n + 1, size + b
    return n, size


def write_error_reason(e: OSError) -> str:
    """Why a write failed, in the words our messages use."""
    return "the disk is full" if e.errno == errno.ENOSPC else (e.strerror or str(e))


def _file_mode(path) -> int:
    """The mode a rewritten file keeps, and a new one gets (0644, as a plain open() under the usual umask)."""
    try:
        return os.stat(path).st_mode & 0o777
    except FileNotFoundError:
        return 0o644


def save_file_atomic(tensors, path, metadata=None):
    """Write `tensors` (+ string `metadata`) to `path` as safetensors, atomically.

    The data goes to a temporary file in the same folder, is fsync'ed, then renamed over `path` with
    os.replace, so a crash or a full disk never leaves a half-written file under the final name.
    """
    path = os.fspath(path)
    refuse_pickle(path)
    name = _name(path)
    metadata = _check_metadata(metadata, path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise LoraFileError(f"cannot save {name}: the folder {folder} does not exist. Create it or pick another "
                            f"output path.", path)
    import safetensors.torch
    try:
        cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        data = safetensors.torch.save(cpu, metadata)
    except (RuntimeError, ValueError, TypeError) as e:
        raise LoraError(f"cannot save {name}: the tensors could not be serialised ({e}). Tensors that share "
                        f"memory must be cloned first.", path) from e
    mode = _file_mode(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        if e.errno == errno.ENOSPC:
            msg = (f"the disk is full: could not write {name} to {folder}. Nothing was overwritten (any existing "
                   f"{name} is unchanged). Free some space and try again.")
        else:
            msg = (f"could not write {name} to {folder}: {e.strerror or e}. Nothing was overwritten (any existing "
                   f"{name} is unchanged). Check the folder's permissions and free space.")
        raise LoraFileError(msg, path) from e
    finally:
        if tmp is not None:
            # Best effort: a failing cleanup must not hide the original error, which is what the user needs.
            with contextlib.suppress(OSError):
                os.remove(tmp)
    _fsync_dir(folder)
    return path


def _fsync_dir(folder):
    """Persist the rename itself. Not possible on Windows (directories cannot be opened); the data is safe anyway."""
    if os.name != "posix":
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # unreadable folder: the rename already happened; durability of the dir entry is best effort
    try:
        # Some filesystems (certain network mounts) reject fsync on directories; the file itself is complete.
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)
