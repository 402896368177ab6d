"""Infotext: the "Lora hashes" field, written as the built-in writes it and read back on paste.

Written: ``Lora hashes: "name: 0123456789ab, other: …"`` — the name as mentioned in the prompt with ':' and ','
removed, the 12-hex short hash (addnet sha256 for safetensors). On a hires pass the dict is merged, not replaced.
Pasted: every ``<lora:NAME:`` (and ``<lyco:``/``<lorastudio:``) whose NAME has a hash in the field is rewritten to
the local file with that hash, so images made elsewhere (other names/aliases) point at the right local file.
"""
from __future__ import annotations

import re

HASHES_KEY = "Lora hashes"               # the built-in's key; ours when we own <lora:…>
OWN_HASHES_KEY = "LoRA Studio hashes"    # when the built-in keeps <lora:…> and we handle <lorastudio:…>
WARNINGS_KEY = "LoRA Studio warnings"
_REMOVE = str.maketrans("", "", ":,")
_TAG_RE = re.compile(r"<(lora|lyco|lorastudio):([^:>]+)(?=[:>])")


def clean_name(name: str) -> str:
    return str(name).translate(_REMOVE)


def format_hashes(hashes: dict[str, str]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in hashes.items())


def parse_hashes(text: str) -> dict[str, str]:
    """The built-in's parser: "a: h1, b: h2" → {a: h1, b: h2}; malformed parts are skipped."""
    out = {}
    for part in str(text or "").split(","):
        if ":" not in part:
            continue
        name, h = part.strip().split(":", 1)
        name, h = name.strip(), h.strip()
        if name and h:
            out[name] = h
    return out


def record_hashes(p, names_and_hashes: list[tuple[str, str]], key: str):
    """Put the hashes of this activation into ``p.extra_generation_params[key]`` (merged across the hires pass)."""
    if not getattr(p, "is_hr_pass", False) or not isinstance(getattr(p, "lora_studio_hashes", None), dict):
        p.lora_studio_hashes = {}
    for name, h in names_and_hashes:
        if h:
            p.lora_studio_hashes[clean_name(name)] = h[:12]
    if p.lora_studio_hashes:
        p.extra_generation_params[key] = format_hashes(p.lora_studio_hashes)
    elif not getattr(p, "is_hr_pass", False):
        p.extra_generation_params.pop(key, None)


def rewrite_prompt(prompt: str, hashes: dict[str, str], find_by_shorthash, tag_name_for,
                   already=None) -> tuple[str, list[str]]:
    """Rewrite tag names to the local files with matching hashes. Returns (prompt, notes for names not found).
    ``already(name, shorthash)``: True when the name as written reaches a file of that hash here (then it stays:
    another file of the same content must not rename the tag)."""
    missing = []

    def repl(m):
        kind, name = m.group(1), m.group(2)
        h = hashes.get(clean_name(name))
        if not h or (already is not None and already(name, h)):
            return m.group(0)
        entry = find_by_shorthash(h)
        if entry is None:
            missing.append(f"{name} ({h})")
            return m.group(0)
        return f"<{kind}:{tag_name_for(entry)}"

    return _TAG_RE.sub(repl, prompt), missing


def infotext_pasted(session, infotext: str, params: dict):
    hashes = {}
    for key in (HASHES_KEY, OWN_HASHES_KEY):
        hashes.update(parse_hashes(params.get(key)))
    if not hashes:
        return
    notes = []
    for field in ("Prompt", "Hires prompt"):
        text = params.get(field)
        if isinstance(text, str) and text:
            params[field], missing = rewrite_prompt(
                text, hashes, session.discovery.find_by_shorthash,
                lambda entry: session.tag_name_for(entry), lambda name, h: _reaches(session, name, h))
            notes.extend(missing)
    if notes:
        # Not an error: the file may simply not be hashed yet; the name is kept as written.
        session.host.console("pasted infotext names LoRA(s) with no local file of that hash (kept the names as "
                             "written): " + ", ".join(sorted(set(notes))))


def _reaches(session, name: str, shorthash: str) -> bool:
    entry = session.discovery.resolve(name, rescan=False)
    return entry is not None and (entry.shorthash or session.discovery.read_hash(entry)[:12]) == shorthash.lower()
