"""The CLIP-L tokenizer (openai/clip-vit-large-patch14) built offline from open_clip's bundled BPE.

ldm/sgm's FrozenCLIPEmbedder calls ``CLIPTokenizer.from_pretrained("openai/clip-vit-large-patch14")``, which needs
the Hugging Face hub (or its cache). open-clip-torch ships the very same BPE (``bpe_simple_vocab_16e6.txt.gz``), so
we write the two HF files from it (test-environment.md §5): 48894 merges; a vocab of 49408 entries = 256 byte
characters, the same with ``</w>``, every merge joined, then ``<|startoftext|>`` 49406 and ``<|endoftext|>`` 49407.
The files are cached per BPE file content, so a changed open-clip pin rebuilds them.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import os
import tempfile

from ..formats.safetensors_io import write_atomic

N_VOCAB = 49408
N_MERGES = 49152 - 256 - 2
FILES = ("vocab.json", "merges.txt")


def cache_root() -> str:
    """``$LORA_STUDIO_CACHE`` or ``$XDG_CACHE_HOME/lora-studio`` (``~/.cache/lora-studio``)."""
    env = os.environ.get("LORA_STUDIO_CACHE")
    if env:
        return env
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "lora-studio")


def _bpe_path() -> str:
    try:
        from open_clip.tokenizer import default_bpe
    except ImportError as e:
        raise RuntimeError("the CLIP tokenizer is built from open-clip-torch's BPE file, and open_clip cannot be "
                           f"imported ({e}); install open-clip-torch==2.20.0 (A1111's pin)") from e
    path = default_bpe()
    if not os.path.isfile(path):
        raise RuntimeError(f"open_clip's BPE file {path} is missing; reinstall open-clip-torch")
    return path


def _build_files(bpe: str) -> tuple[list[str], list[str]]:
    from open_clip.tokenizer import bytes_to_unicode

    with gzip.open(bpe) as f:
        merges = f.read().decode("utf-8").split("\n")[1:N_MERGES + 1]
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    if len(tokens) != N_VOCAB or len(merges) != N_MERGES:
        raise RuntimeError(f"open_clip's BPE gave {len(tokens)} tokens / {len(merges)} merges, expected {N_VOCAB} / "
                           f"{N_MERGES}: not the CLIP BPE (did the open-clip-torch pin change?)")
    return tokens, merges


def _valid(folder: str) -> bool:
    try:
        with open(os.path.join(folder, "vocab.json"), encoding="utf-8") as f:
            vocab = json.load(f)
        return len(vocab) == N_VOCAB and vocab.get("<|endoftext|>") == N_VOCAB - 1 \
            and os.path.getsize(os.path.join(folder, "merges.txt")) > 0
    except (OSError, ValueError):
        return False


@functools.lru_cache(maxsize=None)
def tokenizer_dir(cache_dir: str | None = None) -> str:
    """A folder with ``vocab.json`` + ``merges.txt`` for ``CLIPTokenizer`` (built once, then reused)."""
    bpe = _bpe_path()
    with open(bpe, "rb") as f:
        tag = hashlib.sha256(f.read()).hexdigest()[:12]
    candidates = [os.path.join(cache_dir or cache_root(), f"clip-l-tokenizer-{tag}"),
                  os.path.join(tempfile.gettempdir(), f"lora-studio-clip-l-tokenizer-{tag}")]
    last_err = None
    for folder in candidates:
        if _valid(folder):
            return folder
        try:
            os.makedirs(folder, exist_ok=True)
            tokens, merges = _build_files(bpe)
            # written atomically: two processes building at once each replace a whole file
            vocab = json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False)
            write_atomic(os.path.join(folder, "vocab.json"), lambda f: f.write(vocab))
            write_atomic(os.path.join(folder, "merges.txt"),
                         lambda f: f.write("#version: 0.2\n" + "\n".join(merges) + "\n"))
            return folder
        except OSError as e:  # read-only home: fall back to the temp dir
            last_err = e
    raise RuntimeError(f"cannot write the CLIP tokenizer files (tried {', '.join(candidates)}): {last_err}")


@functools.lru_cache(maxsize=None)
def clip_tokenizer():
    """Shared HF ``CLIPTokenizer`` equal to openai/clip-vit-large-patch14's (BOS 49406, EOS = pad 49407).

    Cached and shared: do not add tokens to it; call ``new_clip_tokenizer()`` for a private one."""
    return new_clip_tokenizer()


def new_clip_tokenizer():
    from transformers import CLIPTokenizer

    d = tokenizer_dir()
    return CLIPTokenizer(os.path.join(d, "vocab.json"), os.path.join(d, "merges.txt"),
                         pad_token="<|endoftext|>", model_max_length=77)
