"""LoRA files on disk: names, aliases, metadata, family (A1111 "sd version"), hashes.

Mirrors the built-in Lora's discovery (``extensions-builtin/Lora/networks.py: process_network_files`` and
``network.py: NetworkOnDisk``) so a prompt that works with the built-in resolves to the same file here:

- files: ``.safetensors``/``.pt``/``.ckpt`` found recursively (symlinks followed) under the LoRA dirs;
- ``name`` = file stem without subfolder (equal stems: the later one in walk order wins ``by_name``, as A1111);
- ``alias`` = metadata ``ss_output_name``, else the name; an alias shared by several files (or equal to another
  file's stem) becomes *forbidden* and the file must be addressed by name;
- ``hash`` = metadata ``sshs_model_hash`` if present, else the kohya "addnet" sha256 (bytes after the header) for
  safetensors, a full sha256 for others; ``shorthash`` = its first 12 hex chars (what "Lora hashes" holds).

Additions: a file can also be addressed by its path relative to its LoRA dir (``sub/dir/name``, with or without
extension), hashes and detected families are cached by (mtime, size) in a JSON file, and a file without kohya
metadata gets its family from its tensor shapes (formats.family) instead of "Unknown".

No ``modules.*`` import here: the session hands in the directories and the hashing policy.
"""
from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterable

LORA_EXTENSIONS = (".safetensors", ".pt", ".ckpt")
SD_VERSIONS = ("Unknown", "SD1", "SD2", "SDXL")  # A1111 network.SdVersion member names
_FAMILY_TO_VERSION = {"sd1": "SD1", "sd2": "SD2", "sdxl": "SDXL"}
VERSION_TO_FAMILY = {v: k for k, v in _FAMILY_TO_VERSION.items()}
# A1111 seeds its forbidden aliases with these (note "Addams" is compared lower-cased, so only "none" bites; kept
# verbatim so both extensions address the same files the same way).
_SEED_FORBIDDEN = ("none", "Addams")


@dataclass
class LoraEntry:
    name: str                 # file stem, no subfolder (A1111 `NetworkOnDisk.name`)
    filename: str             # absolute path
    relname: str              # path relative to its LoRA dir, '/'-separated, no extension
    root: str                 # the LoRA dir it was found in
    mtime: float
    size: int
    metadata: dict = field(default_factory=dict)   # safetensors __metadata__, '{'-values JSON-decoded like A1111
    alias: str = ""
    hash: str = ""            # full sha256 hex (addnet for safetensors), '' until known
    sd_version: str = "Unknown"
    family_evidence: str = ""
    refused_family: str | None = None   # e.g. 'flux' when the file is for a family we don't apply
    error: str | None = None  # header unreadable: shown on the card, reported on use
    not_lora: str | None = None  # e.g. "it is a full Stable Diffusion checkpoint, …": shown on the card
    damaged: str | None = None   # why its tensors were refused when last used (NaN values, cut short): on the card

    @property
    def is_safetensors(self) -> bool:
        return self.filename.lower().endswith(".safetensors")

    @property
    def shorthash(self) -> str:
        return self.hash[:12]

    @property
    def family(self) -> str | None:
        return VERSION_TO_FAMILY.get(self.sd_version)


def decode_metadata(raw: dict) -> dict:
    """A1111 `read_metadata_from_safetensors`: string values starting with '{' are JSON-decoded when they parse."""
    out = {}
    for k, v in (raw or {}).items():
        out[k] = v
        if isinstance(v, str) and v[:1] == "{":
            try:
                out[k] = json.loads(v)
            except ValueError:
                pass  # not JSON after all: keep the string, as A1111 does
    return out


def sd_version_from_metadata(metadata: dict) -> str | None:
    """A1111 `NetworkOnDisk.detect_version` for the keys that decide it; None when they don't."""
    if str(metadata.get("ss_base_model_version", "")).startswith("sdxl_"):
        return "SDXL"
    if str(metadata.get("ss_v2", "")) == "True":
        return "SD2"
    return None


class HashCache:
    """JSON file {abs path: {mtime, size, sha256, family...}}; an entry is valid while mtime and size match."""

    def __init__(self, path: str | None):
        self.path = path
        self._lock = threading.Lock()
        self._data: dict | None = None
        self._dirty = False

    def _load(self):
        if self._data is not None:
            return
        self._data = {}
        if not self.path or not os.path.exists(self.path):
            return
        try:
            with open(self.path, "r", encoding="utf8") as f:
                data = json.load(f)
            if isinstance(data, dict) and isinstance(data.get("files"), dict):
                self._data = data["files"]
        except (OSError, ValueError) as e:
            # A corrupt cache only costs re-hashing; say so and start over.
            print(f"LoRA Studio: ignoring unreadable hash cache {self.path} ({e}); hashes will be recomputed")

    def get(self, path: str, mtime: float, size: int) -> dict:
        with self._lock:
            self._load()
            rec = self._data.get(path)
            if not rec or rec.get("mtime") != mtime or rec.get("size") != size:
                return {}
            return dict(rec)

    def put(self, path: str, mtime: float, size: int, **values):
        with self._lock:
            self._load()
            rec = self._data.get(path)
            if not rec or rec.get("mtime") != mtime or rec.get("size") != size:
                rec = {"mtime": mtime, "size": size}
            rec.update({k: v for k, v in values.items() if v is not None})
            self._data[path] = rec
            self._dirty = True

    def save(self):
        with self._lock:
            if not self._dirty or not self.path:
                return
            try:
                os.makedirs(os.path.dirname(self.path), exist_ok=True)
                tmp = f"{self.path}.tmp{os.getpid()}"
                with open(tmp, "w", encoding="utf8") as f:
                    json.dump({"version": 1, "files": self._data}, f, ensure_ascii=False)
                os.replace(tmp, self.path)
                self._dirty = False
            except OSError as e:
                print(f"LoRA Studio: could not write hash cache {self.path}: {e}")


def _natural_key(s: str):
    import re
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", s)]


def walk_lora_files(root: str, list_hidden: bool = True) -> Iterable[str]:
    """As A1111 `shared.walk_files` (sorted naturally, symlinks followed, hidden dirs skipped unless list_hidden)."""
    if not root or not os.path.exists(root):
        return
    items = sorted(os.walk(root, followlinks=True), key=lambda x: _natural_key(x[0]))
    for dirpath, _, files in items:
        if not list_hidden and ("/." in dirpath or "\\." in dirpath):
            continue
        for fn in sorted(files, key=_natural_key):
            # (earlier versions' resume states, name-000002-state.pt, are not LoRAs)
            if os.path.splitext(fn)[1].lower() in LORA_EXTENSIONS and not fn.lower().endswith("-state.pt"):
                yield os.path.join(dirpath, fn)


class Discovery:
    """The LoRA library. Thread-safe: the page renders while a generation resolves names."""

    def __init__(self, dirs: Callable[[], list[str]], cache_path: str | None = None,
                 can_hash: Callable[[], bool] = lambda: True, list_hidden: Callable[[], bool] = lambda: True,
                 preferred_name: Callable[[], str] = lambda: "Alias from file"):
        self._dirs = dirs
        self._can_hash = can_hash
        self._list_hidden = list_hidden
        self._preferred_name = preferred_name
        self.cache = HashCache(cache_path)
        self._lock = threading.RLock()
        self._header_memo: dict[tuple, tuple] = {}   # (path, mtime, size) -> (metadata, shapes, error)
        self.by_name: dict[str, LoraEntry] = {}       # A1111 available_networks
        self.aliases: dict[str, LoraEntry] = {}       # A1111 available_network_aliases
        self.forbidden: dict[str, int] = {}           # A1111 forbidden_network_aliases
        self.by_relname: dict[str, LoraEntry] = {}
        self.by_path: dict[str, LoraEntry] = {}
        self.hash_lookup: dict[str, LoraEntry] = {}   # A1111 available_network_hash_lookup
        self.scanned = False

    # ------------------------------------------------------------------ scanning
    def dirs(self) -> list[str]:
        out = []
        for d in self._dirs() or []:
            if d and os.path.abspath(d) not in out:
                out.append(os.path.abspath(d))
        return out

    def refresh(self) -> int:
        """Full rescan (A1111 `list_available_networks`). Returns the number of files."""
        with self._lock:
            self.by_name, self.aliases, self.by_relname, self.by_path = {}, {}, {}, {}
            self.hash_lookup = {}
            self.forbidden = {a: 1 for a in _SEED_FORBIDDEN}
            dirs = self.dirs()
            if dirs:
                try:
                    os.makedirs(dirs[0], exist_ok=True)  # A1111 creates lora_dir too
                except OSError as e:
                    print(f"LoRA Studio: cannot create LoRA folder {dirs[0]}: {e}")
            for root in dirs:
                for path in walk_lora_files(root, self._list_hidden()):
                    if os.path.isdir(path):
                        continue
                    try:
                        entry = self._make_entry(path, root)
                    except OSError as e:
                        print(f"LoRA Studio: skipping {path}: {e}")
                        continue
                    self._add(entry)
            self.cache.save()
            self.scanned = True
            return len(self.by_path)

    def ensure_scanned(self):
        if not self.scanned:
            self.refresh()

    def _add(self, entry: LoraEntry):
        # Exactly A1111's bookkeeping, so forbidden aliases match the built-in's.
        self.by_name[entry.name] = entry
        if entry.alias in self.aliases:
            self.forbidden[entry.alias.lower()] = 1
        self.aliases[entry.name] = entry
        self.aliases[entry.alias] = entry
        self.by_relname[entry.relname] = entry
        self.by_path[entry.filename] = entry
        if entry.shorthash:
            self.hash_lookup[entry.shorthash] = entry

    def _read_header(self, path: str, mtime: float, size: int):
        key = (path, mtime, size)
        memo = self._header_memo.get(key)
        if memo is not None:
            return memo
        metadata, shapes, error = {}, {}, None
        if path.lower().endswith(".safetensors"):
            from ..formats import safetensors_io
            try:
                header = safetensors_io.read_header(path)
                metadata = dict(header.get("__metadata__") or {})
                shapes = {k: tuple(v.get("shape", ())) for k, v in header.items()
                          if k != "__metadata__" and isinstance(v, dict)}
            except Exception as e:  # LoraFileError and friends: the card shows it, use reports it
                error = str(e)
        self._header_memo[key] = (metadata, shapes, error)
        return metadata, shapes, error

    def _make_entry(self, path: str, root: str) -> LoraEntry:
        path = os.path.abspath(path)
        st = os.stat(path)
        name = os.path.splitext(os.path.basename(path))[0]
        rel = os.path.relpath(path, root)
        relname = os.path.splitext(rel)[0].replace("\\", "/")
        raw, shapes, error = self._read_header(path, st.st_mtime, st.st_size)
        metadata = decode_metadata(raw)
        entry = LoraEntry(name=name, filename=path, relname=relname, root=root, mtime=st.st_mtime,
                          size=st.st_size, metadata=metadata, error=error)
        entry.alias = str(raw.get("ss_output_name") or name)
        if shapes:
            from ..formats.report import not_a_lora
            entry.not_lora = not_a_lora(shapes, raw)
        cached = self.cache.get(path, st.st_mtime, st.st_size)
        entry.hash = str(raw.get("sshs_model_hash") or cached.get("sha256") or "").strip().lower()
        entry.sd_version, entry.family_evidence, entry.refused_family = self._detect_version(
            path, raw, shapes, cached, st)
        entry.damaged = cached.get("damaged")
        return entry

    def note_damaged(self, entry: LoraEntry, why: str):
        """A file whose tensors were refused on use (the header alone looks fine): its card says so from now on,
        until the file changes. Kept in the hash cache, so a restart does not forget it."""
        with self._lock:
            entry.damaged = why
            self.cache.put(entry.filename, entry.mtime, entry.size, damaged=why)
            self.cache.save()

    def _detect_version(self, path, raw, shapes, cached, st):
        v = sd_version_from_metadata(raw)
        if v:
            return v, "kohya metadata", None
        if "sd_version" in cached:
            return cached["sd_version"], cached.get("family_evidence", "cached"), cached.get("refused_family")
        version, evidence, refused = "Unknown", "", None
        if shapes:
            try:
                from ..formats.family import detect_family
                info = detect_family(shapes, raw)
                if info.refused:
                    refused, evidence = info.refused, info.evidence
                elif info.family in _FAMILY_TO_VERSION:
                    version, evidence = _FAMILY_TO_VERSION[info.family], info.evidence
            except Exception as e:  # detection is a nicety for the card filter; never block discovery
                evidence = f"family detection failed: {e}"
        if version == "Unknown" and not refused and raw:
            version, evidence = "SD1", "A1111 rule: has metadata, no SDXL/SD2 marker"
        self.cache.put(path, st.st_mtime, st.st_size, sd_version=version, family_evidence=evidence,
                       refused_family=refused)
        return version, evidence, refused

    # ------------------------------------------------------------------ lookup
    def entries(self) -> list[LoraEntry]:
        with self._lock:
            self.ensure_scanned()
            return list(self.by_path.values())

    def get_alias(self, entry: LoraEntry) -> str:
        """A1111 `NetworkOnDisk.get_alias`: the name to write into prompts."""
        if self._preferred_name() == "Filename" or entry.alias.lower() in self.forbidden:
            return entry.name
        return entry.alias

    def _lookup(self, name: str) -> LoraEntry | None:
        if name.lower() in self.forbidden and name in self.by_name:
            return self.by_name[name]
        if name.lower() not in self.forbidden and name in self.aliases:
            return self.aliases[name]
        rel = name.replace("\\", "/").strip("/")
        if rel in self.by_relname:
            return self.by_relname[rel]
        stem, ext = os.path.splitext(rel)
        if ext.lower() in LORA_EXTENSIONS and stem in self.by_relname:
            return self.by_relname[stem]
        if ext.lower() in LORA_EXTENSIONS and stem in self.by_name:
            return self.by_name[stem]
        return None

    def resolve(self, name: str, rescan: bool = True) -> LoraEntry | None:
        """Name, alias or relative path → entry; unknown names trigger one rescan (A1111 does too)."""
        name = str(name).strip()
        with self._lock:
            self.ensure_scanned()
            entry = self._lookup(name)
            if entry is not None and not _unchanged(entry):
                entry = None  # deleted or rewritten since the scan: its hash and metadata are read again
            if entry is None and rescan:
                self.refresh()
                entry = self._lookup(name)
            return entry

    def is_forbidden_alias(self, name: str) -> bool:
        return name.lower() in self.forbidden

    def alias_owners(self, alias: str) -> list[LoraEntry]:
        """The files whose alias (ss_output_name) or stem is ``alias``."""
        with self._lock:
            return [e for e in self.by_path.values() if alias in (e.alias, e.name)]

    def same_name(self, entry: LoraEntry) -> list[LoraEntry]:
        """Every file with ``entry``'s stem (in other subfolders or LoRA folders), ``entry`` included."""
        with self._lock:
            return [e for e in self.by_path.values() if e.name == entry.name]

    def near_names(self, name: str, limit: int = 2, family: str | None = None) -> list[str]:
        """Names a mistyped one probably meant: another case, a file in a subfolder, or a close spelling; with
        ``family``, of files not known to be for another model family (they could not apply anyway)."""
        import difflib
        with self._lock:
            files = [e for e in self.by_path.values()
                     if family is None or e.family in (None, family) and not e.refused_family]
            names = sorted({e.name for e in files} | {e.alias for e in files})
            rel = sorted(e.relname for e in files)
        low = name.lower()
        same_case = [n for n in names if n.lower() == low]
        in_sub = [r for r in rel if r.lower().endswith("/" + low)]
        close = difflib.get_close_matches(name, names, n=limit, cutoff=0.75)
        out, files = [], set()
        for n in same_case + in_sub + close:
            entry = self._lookup(n)
            if n != name and (entry is None or entry.filename not in files):
                out.append(n)
                files.add(entry.filename if entry is not None else n)
        return out[:limit]

    # ------------------------------------------------------------------ hashes
    def read_hash(self, entry: LoraEntry) -> str:
        """Full hash, computing and caching it if needed ('' when hashing is disabled or fails)."""
        if entry.hash:
            return entry.hash
        if not self._can_hash():
            return ""
        try:
            st = os.stat(entry.filename)
            from ..formats import hashes
            if entry.is_safetensors:
                value = hashes.addnet_hash(entry.filename)
            else:
                value = hashes.sha256_file(entry.filename)
        except Exception as e:  # unreadable file: no hash, the caller reports the load error
            print(f"LoRA Studio: could not hash {entry.filename}: {e}")
            return ""
        with self._lock:
            entry.hash = value
            self.cache.put(entry.filename, st.st_mtime, st.st_size, sha256=value)
            self.cache.save()
            self.hash_lookup[entry.shorthash] = entry
        return value

    def find_by_shorthash(self, shorthash: str) -> LoraEntry | None:
        with self._lock:
            self.ensure_scanned()
            return self.hash_lookup.get(str(shorthash).strip().lower()[:12])


def _unchanged(entry: LoraEntry) -> bool:
    try:
        st = os.stat(entry.filename)
    except OSError:
        return False
    return (st.st_mtime, st.st_size) == (entry.mtime, entry.size)
