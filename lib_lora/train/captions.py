"""Caption files and caption processing, following sd-scripts (train_util.py @48d368fa).

- ``read_caption_file``: ``DreamBoothDataset.read_caption``: ``<stem><caption_extension>``, then the face-crop name
  (stem with its last four ``_`` fields dropped, when it has at least five); UTF-8; first line only unless
  ``enable_wildcard`` (then all non-empty lines joined by newlines). sd-scripts builds the face-crop candidate from the
  whole path (directory underscores included); we use the file stem only, which is what the rule is for.
- ``process_caption``: ``BaseDataset.process_caption``, step for step and drawing from the given ``random.Random`` in
  the same order sd-scripts draws from the ``random`` module.
- ``tag_frequency``: ``BaseDataset.set_tag_frequency`` (``ss_tag_frequency``).
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from pathlib import Path


class CaptionFileError(ValueError):
    """A caption file that cannot train as meant: empty or not UTF-8 (sd-scripts stops on those), blank or UTF-16
    without a byte-order mark (sd-scripts trains them as garbage: ``sd_scripts_stops`` False)."""

    def __init__(self, message: str, sd_scripts_stops: bool = True):
        super().__init__(message)
        self.sd_scripts_stops = sd_scripts_stops


@dataclass(frozen=True)
class CaptionOptions:
    """Per-subset caption settings; defaults are sd-scripts' argparse defaults."""

    shuffle_caption: bool = False
    caption_separator: str = ","
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    secondary_separator: str | None = None
    enable_wildcard: bool = False
    caption_prefix: str | None = None
    caption_suffix: str | None = None
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0
    token_warmup_min: int = 1
    token_warmup_step: float = 0

    @property
    def changes_per_step(self) -> bool:
        """True when the caption differs between fetches (text-encoder outputs then cannot be cached)."""
        return bool(
            self.shuffle_caption
            or self.token_warmup_step > 0
            or self.caption_tag_dropout_rate > 0
            or self.caption_dropout_rate > 0
            or self.caption_dropout_every_n_epochs > 0
            or self.enable_wildcard
        )


def caption_candidates(image_path: str | Path, caption_extension: str) -> list[Path]:
    p = Path(image_path)
    stem = p.stem
    out = [p.with_name(stem + caption_extension)]
    fields = stem.split("_")
    if len(fields) >= 5:
        face = p.with_name("_".join(fields[:-4]) + caption_extension)
        if face != out[0]:
            out.append(face)
    return out


def read_caption_file(path: str | Path, enable_wildcard: bool = False) -> str:
    """The caption text of one caption file. Raises ``CaptionFileError`` for an empty, blank or non-UTF-8 file."""
    try:
        with open(path, "rt", encoding="utf-8-sig") as f:  # (a BOM from Notepad is not part of the caption)
            lines = f.readlines()
    except UnicodeDecodeError as e:
        raise CaptionFileError(f"caption file {str(path)!r} is not UTF-8 ({e.reason}); re-save it as UTF-8") from e
    if not lines:
        raise CaptionFileError(f"caption file {str(path)!r} is empty; write a caption in it or delete it")
    if any("\0" in line for line in lines):  # (UTF-16 without its byte-order mark decodes as UTF-8 + NULs)
        raise CaptionFileError(f"caption file {str(path)!r} holds NUL bytes: it is probably UTF-16 text; re-save it "
                               "as UTF-8", sd_scripts_stops=False)
    if not any(line.strip() for line in lines):  # (sd-scripts trains it as an empty caption)
        raise CaptionFileError(f"caption file {str(path)!r} holds only blank space; write a caption in it or "
                               "delete it", sd_scripts_stops=False)
    if enable_wildcard:
        return "\n".join(line.strip() for line in lines if line.strip() != "")
    return lines[0].strip()


def unused_lines(path: str | Path) -> int:
    """Non-blank lines after the first one of a caption file: what sd-scripts drops without enable_wildcard."""
    try:
        with open(path, "rt", encoding="utf-8", errors="replace") as f:
            return sum(1 for line in f.readlines()[1:] if line.strip())
    except OSError:
        return 0


def find_caption(image_path: str | Path, caption_extension: str, enable_wildcard: bool = False) -> tuple[str | None, Path | None]:
    """``(caption, caption_path)`` for an image, or ``(None, None)`` when no caption file exists."""
    for cand in caption_candidates(image_path, caption_extension):
        if cand.is_file():
            return read_caption_file(cand, enable_wildcard), cand
    return None, None


def _split_tags(text: str, sep: str) -> list[str]:
    return [t.strip() for t in text.split(sep) if t.strip()]


def process_caption(
    caption: str,
    opts: CaptionOptions,
    rng: random.Random,
    epoch: int = 0,
    step: int = 0,
    max_train_steps: int = 0,
) -> str:
    """The caption a sample is trained with this time.

    ``epoch`` is 1-based as in sd-scripts' loop (``current_epoch = epoch + 1``): with
    ``caption_dropout_every_n_epochs = N`` captions are empty on epochs N, 2N, ...; ``step`` and ``max_train_steps``
    drive token warmup. Order: prefix/suffix (joined with a space), caption dropout, wildcard or first line, then -
    if shuffling, warmup or tag dropout is on - split on ``caption_separator``, keep the fixed part, warm up, shuffle,
    drop tags, re-join with ``", "``; finally ``secondary_separator`` becomes ``caption_separator``."""
    if opts.caption_prefix:
        caption = opts.caption_prefix + " " + caption
    if opts.caption_suffix:
        caption = caption + " " + opts.caption_suffix

    dropped = opts.caption_dropout_rate > 0 and rng.random() < opts.caption_dropout_rate
    dropped = dropped or (opts.caption_dropout_every_n_epochs > 0 and epoch % opts.caption_dropout_every_n_epochs == 0)
    if dropped:
        return ""

    if opts.enable_wildcard:
        if "\n" in caption:
            caption = rng.choice(caption.split("\n"))
        # "{{" / "}}" escape literal braces: park them on markers absent from the caption
        open_m, close_m = "\u2985", "\u2986"
        while open_m in caption or close_m in caption:
            open_m += "\u2985"
            close_m += "\u2986"
        caption = caption.replace("{{", open_m).replace("}}", close_m)
        caption = re.sub(r"\{([^}]+)\}", lambda m: rng.choice(m.group(1).split("|")), caption)
        caption = caption.replace(open_m, "{").replace(close_m, "}")
    else:
        caption = caption.split("\n")[0]

    warmup_step = opts.token_warmup_step
    if opts.shuffle_caption or warmup_step > 0 or opts.caption_tag_dropout_rate > 0:
        sep = opts.caption_separator
        fixed: list[str] = []
        suffix: list[str] = []
        kts = opts.keep_tokens_separator
        if kts and kts in caption:
            fixed_part, flex_part = caption.split(kts, 1)
            if kts in flex_part:
                flex_part, suffix_part = flex_part.split(kts, 1)
                suffix = _split_tags(suffix_part, sep)
            fixed = _split_tags(fixed_part, sep)
            flex = _split_tags(flex_part, sep)
        else:
            # note: this branch keeps empty tags (sd-scripts does not filter them here)
            tokens = [t.strip() for t in caption.strip().split(sep)]
            flex = tokens[:]
            if opts.keep_tokens > 0:
                fixed = flex[: opts.keep_tokens]
                flex = tokens[opts.keep_tokens :]

        if warmup_step < 1:
            # a fraction means "of max_train_steps"; sd-scripts rewrites the subset once, we compute it each time
            warmup_step = math.floor(warmup_step * max_train_steps)
        if warmup_step and step < warmup_step:
            n = math.floor(step * ((len(flex) - opts.token_warmup_min) / warmup_step)) + opts.token_warmup_min
            flex = flex[:n]

        if opts.shuffle_caption:
            rng.shuffle(flex)
        if opts.caption_tag_dropout_rate > 0:
            flex = [t for t in flex if rng.random() >= opts.caption_tag_dropout_rate]
        caption = ", ".join(fixed + flex + suffix)

    if opts.secondary_separator:
        caption = caption.replace(opts.secondary_separator, opts.caption_separator)
    return caption


def tag_frequency(captions, into: dict[str, int] | None = None) -> dict[str, int]:
    """Tag -> count over raw captions: split on ``,``, stripped, lower-cased, empty tags skipped
    (``ss_tag_frequency`` counts the caption each image has before any processing, folder fallback included)."""
    freq = {} if into is None else into
    for caption in captions:
        for tag in caption.split(","):
            tag = tag.strip()
            if tag:
                tag = tag.lower()
                freq[tag] = freq.get(tag, 0) + 1
    return freq


def contains_word(caption: str, word: str) -> bool:
    """Whether ``word`` appears in ``caption`` as a whole word, ignoring case (CLIP lower-cases prompts)."""
    if not word:
        return True
    return re.search(r"(?<![\w])" + re.escape(word.lower()) + r"(?![\w])", caption.lower()) is not None


__all__ = [
    "CaptionFileError",
    "CaptionOptions",
    "caption_candidates",
    "contains_word",
    "find_caption",
    "process_caption",
    "read_caption_file",
    "unused_lines",
    "tag_frequency",
]
