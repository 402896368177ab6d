"""`<lora:…>` prompt tags with A1111 semantics.

A1111 (``modules/extra_networks.py`` + ``extensions-builtin/Lora/extra_networks_lora.py``):

- tags match ``<(\\w+):([^>]+)>``; the argument text is split on ``:`` (so names can't contain ``:`` or ``>``);
- an item is *named* when ``item.split('=', 2)`` gives exactly two parts, otherwise positional;
- positional: ``name[:te[:unet[:dyn]]]``; named ``te=``, ``unet=``, ``dyn=`` override the positional values;
- te defaults to 1.0, unet defaults to te (after ``te=`` is applied), dyn to None.

Differences (all friendlier, none changes a tag A1111 accepts):

- the first item is always the name (A1111 takes the first *positional* item, so ``<lora:a=b>`` has no name there);
- surrounding whitespace of the name and the numbers is stripped; an empty positional number means "default";
- unknown named args (``lbw=``, ``start=``, ``stop=`` from sd-webui-lora-block-weight) are kept in
  ``LoraRef.named`` and reported by ``LoraRef.notes()`` as ignored; extra positional args are reported too;
- a bad number raises ``LoraTagError`` naming the tag, where A1111 shows a bare ``ValueError``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

MAX_WEIGHT = 100.0  # beyond: refused (only NaN comes of it)
LARGE_WEIGHT = 5.0  # beyond: applied, with a note

try:  # share the engine's error base when formats is importable; the parser itself needs nothing from it
    from ..formats.errors import LoraError as _ErrorBase
except ImportError:  # formats missing or broken: the parser stays usable standalone
    _ErrorBase = Exception

TAG_RE = re.compile(r"<(\w+):([^>]+)>")
# `lyco` is the alias the built-in registers for old LyCORIS-extension prompts.
LORA_TAG_KINDS = ("lora", "lyco")
KNOWN_NAMED = ("te", "unet", "dyn")


class LoraTagError(_ErrorBase, ValueError):
    """A `<lora:…>` tag whose arguments can't be read; the message quotes the tag."""


@dataclass
class LoraRef:
    name: str
    te: float = 1.0
    unet: float = 1.0
    dyn: int | None = None
    named: dict[str, str] = field(default_factory=dict)  # unknown named args, kept verbatim, not applied
    extra_positional: list[str] = field(default_factory=list)  # positional items after dyn, ignored
    tag: str = ""  # the tag as written, for messages

    def notes(self) -> list[str]:
        """Human-readable notes about what was ignored in this tag."""
        out = []
        if self.named:
            args = ", ".join(f"{k}={v}" for k, v in self.named.items())
            out.append(f"{self.tag or self.name}: ignored unsupported argument(s) {args}")
        if self.extra_positional:
            out.append(f"{self.tag or self.name}: ignored extra argument(s) {':'.join(self.extra_positional)}")
        big = [w for w in (self.te, self.unet) if abs(w) > LARGE_WEIGHT]
        if big:
            out.append(f"{self.tag or self.name}: weight {big[0]:g} is far outside the usual -2 to 2; expect a "
                       "broken or black image")
        return out


def _tag_text(items, kind: str = "lora") -> str:
    return f"<{kind}:" + ":".join(str(x) for x in items) + ">"


def _float(value, what: str, tag: str) -> float | None:
    """``what``: whose multiplier ('' = the tag's one weight for both)."""
    label = f"the {what} multiplier" if what else "the weight"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        v = float(value)
    else:
        s = str(value).strip()
        if s == "":
            return None
        try:
            v = float(s)
        except ValueError:
            raise LoraTagError(f"{tag}: {label} '{s}' is not a number (expected e.g. 0.8)") from None
    if not math.isfinite(v):
        raise LoraTagError(f"{tag}: {label} '{value}' is not a finite number")
    if abs(v) > MAX_WEIGHT:  # only NaN images come of it (A1111 then stops the job with advice that misleads)
        raise LoraTagError(f"{tag}: {label} {value} is far beyond what a LoRA takes (usually -2 to 2; at most "
                           f"±{MAX_WEIGHT:g} here); the tag was not applied")
    return v


def _dyn(value, tag: str) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool):
        v = value
    else:
        s = str(value).strip()
        if s == "" or s.lower() == "none":
            return None
        try:
            f = float(s)
        except ValueError:
            raise LoraTagError(f"{tag}: dyn '{s}' is not a whole number (it is the rank to keep, e.g. dyn=8)") from None
        if not math.isfinite(f) or f != int(f):
            raise LoraTagError(f"{tag}: dyn '{s}' is not a whole number (it is the rank to keep, e.g. dyn=8)")
        v = int(f)
    if v <= 0:
        raise LoraTagError(f"{tag}: dyn must be a positive rank, got {v}")
    return v


def parse_params(items, kind: str = "lora") -> LoraRef:
    """Read one tag's items (A1111 ``ExtraNetworkParams.items``: name first, then ':'-separated args)."""
    items = list(items)
    tag = _tag_text(items, kind)
    if not items or str(items[0]).strip() == "":
        raise LoraTagError(f"{tag}: the tag has no LoRA name")
    name = str(items[0]).strip()
    positional: list = []
    named: dict[str, str] = {}
    for item in items[1:]:
        # A1111 passes floats for the auto-added default LoRA (opts.extra_networks_default_multiplier).
        parts = item.split("=", 2) if isinstance(item, str) else [item]
        if len(parts) == 2:
            named[parts[0].strip()] = parts[1].strip()
        else:
            positional.append(item)

    te = _float(positional[0], "text-encoder" if len(positional) > 1 else "", tag) if positional else None
    te = 1.0 if te is None else te
    if "te" in named:
        v = _float(named["te"], "text-encoder (te=)", tag)
        te = te if v is None else v
    unet = _float(positional[1], "UNet", tag) if len(positional) > 1 else None
    unet = te if unet is None else unet  # A1111: unet defaults to te (after te= is applied)
    if "unet" in named:
        v = _float(named["unet"], "UNet (unet=)", tag)
        unet = unet if v is None else v
    dyn = _dyn(positional[2], tag) if len(positional) > 2 else None
    if "dyn" in named:
        dyn = _dyn(named["dyn"], tag)

    unknown = {k: v for k, v in named.items() if k not in KNOWN_NAMED}
    extra = [str(x) for x in positional[3:]]
    return LoraRef(name=name, te=te, unet=unet, dyn=dyn, named=unknown, extra_positional=extra, tag=tag)


def parse_prompt(text: str, kinds=LORA_TAG_KINDS) -> tuple[str, list[LoraRef]]:
    """Strip the `<lora:…>` (and `<lyco:…>`) tags from ``text``; return (clean text, refs in prompt order).

    Other extra-network tags (``<hypernet:…>``) stay in the text. Like A1111, a tag is removed wherever it
    sits (inside emphasis or prompt-editing brackets) and leaves no replacement text behind. A bad tag raises
    ``LoraTagError``; use ``parse_prompt_lenient`` to collect errors instead.
    """
    refs: list[LoraRef] = []

    def repl(m: re.Match) -> str:
        if m.group(1).lower() not in kinds:
            return m.group(0)
        refs.append(parse_params(m.group(2).split(":"), m.group(1)))
        return ""

    clean = TAG_RE.sub(repl, text)
    return clean, refs


def parse_prompt_lenient(text: str, kinds=LORA_TAG_KINDS) -> tuple[str, list[LoraRef], list[str]]:
    """Like ``parse_prompt`` but bad tags are removed and reported in the third element, not raised."""
    refs: list[LoraRef] = []
    errors: list[str] = []

    def repl(m: re.Match) -> str:
        if m.group(1).lower() not in kinds:
            return m.group(0)
        try:
            refs.append(parse_params(m.group(2).split(":"), m.group(1)))
        except LoraTagError as e:
            errors.append(str(e))
        return ""

    clean = TAG_RE.sub(repl, text)
    return clean, refs, errors
