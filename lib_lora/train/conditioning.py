"""Text conditioning for training, computed from the host's own text-encoder modules.

We do not call the WebUI's prompt wrappers: they parse ``(`` and ``[`` in captions as emphasis and use a dynamic
chunk count. We tokenize like A1111 does (75-token chunks, comma backtracking, ``<BOS> 75 ids <EOS/PAD>``), but with
a fixed number of chunks per run so every batch has the same shape, then run the inner encoder modules directly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

CHUNK = 75
COMMA_BACKTRACK = 20  # A1111's opts.comma_padding_backtrack default


@dataclass
class TokenizerSpec:
    encode: callable          # str -> list[int] (no special tokens)
    bos: int
    eos: int
    pad: int
    comma: int | None


def _hf_spec(tok) -> TokenizerSpec:
    vocab = tok.get_vocab()
    return TokenizerSpec(lambda s: tok(s, truncation=False, add_special_tokens=False)["input_ids"],
                         tok.bos_token_id, tok.eos_token_id, tok.eos_token_id, vocab.get(",</w>"))


def _open_clip_spec() -> TokenizerSpec:
    from open_clip.tokenizer import _tokenizer  # the same BPE A1111's SD2/SDXL wrappers use

    enc = _tokenizer.encoder
    return TokenizerSpec(_tokenizer.encode, enc["<start_of_text>"], enc["<end_of_text>"], 0, enc.get(",</w>"))


def chunk_ids(ids: list[int], spec: TokenizerSpec, n_chunks: int) -> tuple[torch.Tensor, bool]:
    """A1111 chunking into exactly n_chunks rows of 77 ids; returns (ids [n_chunks, 77], truncated)."""
    chunks: list[list[int]] = []
    cur: list[int] = []
    last_comma = -1
    for tok in ids:
        if spec.comma is not None and tok == spec.comma:
            last_comma = len(cur)
        elif len(cur) == CHUNK and last_comma != -1 and len(cur) - last_comma <= COMMA_BACKTRACK:
            # move the words after the last comma into the next chunk (A1111 tokenize_line)
            break_at = last_comma + 1
            rest = cur[break_at:]
            chunks.append(cur[:break_at])
            cur, last_comma = rest, -1
        if len(cur) == CHUNK:
            chunks.append(cur)
            cur, last_comma = [], -1
        cur.append(tok)
    if cur or not chunks:
        chunks.append(cur)
    truncated = len(chunks) > n_chunks
    chunks = chunks[:n_chunks]
    while len(chunks) < n_chunks:
        chunks.append([])
    rows = []
    for c in chunks:
        c = c[:CHUNK]
        row = [spec.bos] + c + [spec.eos]
        row += [spec.pad] * (CHUNK + 2 - len(row))
        rows.append(row)
    return torch.tensor(rows, dtype=torch.long), truncated


def _hf_hidden(transformer, ids, layer_from_end: int, final_ln: bool):
    out = transformer(input_ids=ids, output_hidden_states=layer_from_end > 1)
    if layer_from_end <= 1:
        return out.last_hidden_state
    z = out.hidden_states[-layer_from_end]
    # (transformers 5 has no `text_model` level)
    return getattr(transformer, "text_model", transformer).final_layer_norm(z) if final_ln else z


def _open_clip_run(model, ids, stop_before: int):
    """Run the open_clip text tower; returns (hidden after `len-stop_before` blocks, last-layer output)."""
    x = model.token_embedding(ids) + model.positional_embedding.to(model.token_embedding.weight.dtype)
    batch_first = getattr(model.transformer, "batch_first", False)
    if not batch_first:
        x = x.permute(1, 0, 2)
    blocks = model.transformer.resblocks
    keep = None
    for i, r in enumerate(blocks):
        if i == len(blocks) - stop_before:
            keep = x
        x = r(x, attn_mask=model.attn_mask)
    if keep is None:
        keep = x
    if not batch_first:
        keep, x = keep.permute(1, 0, 2), x.permute(1, 0, 2)
    return keep, x


class TextEncoder:
    """Encodes captions for one host model family; output matches what the UNet gets at inference."""

    def __init__(self, sd_model, family: str, clip_skip: int = 1, max_token_length: int = 75):
        self.family = family
        self.clip_skip = max(1, int(clip_skip or 1))
        self.n_chunks = max(1, math.ceil((max_token_length or 75) / CHUNK))
        if family == "sdxl":
            emb = sd_model.conditioner.embedders
            self.te1 = getattr(emb[0], "wrapped", emb[0])
            self.te2 = getattr(emb[1], "wrapped", emb[1])
            self.spec1 = _hf_spec(self.te1.tokenizer)
            self.spec2 = _open_clip_spec()
        else:
            self.te = getattr(sd_model.cond_stage_model, "wrapped", sd_model.cond_stage_model)
            self.spec = _open_clip_spec() if family == "sd2" else _hf_spec(self.te.tokenizer)

    def modules(self) -> list[nn.Module]:
        if self.family == "sdxl":
            return [self.te1.transformer, self.te2.model]
        return [self.te.model if self.family == "sd2" else self.te.transformer]

    def tokenize(self, captions: list[str]):
        """Token ids per caption: a tensor [B, n_chunks, 77] (SDXL: a pair), plus how many were truncated."""
        truncated = 0
        if self.family == "sdxl":
            a, b = [], []
            for c in captions:
                ia, ta = chunk_ids(self.spec1.encode(c), self.spec1, self.n_chunks)
                ib, _ = chunk_ids(self.spec2.encode(c), self.spec2, self.n_chunks)
                a.append(ia)
                b.append(ib)
                truncated += ta
            return (torch.stack(a), torch.stack(b)), truncated
        rows = []
        for c in captions:
            ids, t = chunk_ids(self.spec.encode(c), self.spec, self.n_chunks)
            rows.append(ids)
            truncated += t
        return torch.stack(rows), truncated

    def encode(self, tokens, device) -> dict:
        """{'crossattn': [B, 77*n, C]} and for SDXL also {'pooled': [B, 1280]}."""
        if self.family == "sdxl":
            t1, t2 = tokens
            b, n, L = t1.shape
            h1 = _hf_hidden(self.te1.transformer, t1.reshape(b * n, L).to(device), 2, final_ln=False)
            h2, last = _open_clip_run(self.te2.model, t2.reshape(b * n, L).to(device), 1)
            ctx = torch.cat([h1, h2.to(h1.dtype)], dim=-1).reshape(b, n * L, -1)
            m = self.te2.model
            last = m.ln_final(last)
            first = t2[:, 0].to(device)
            pooled_tok = last.reshape(b, n, L, -1)[:, 0][torch.arange(b, device=device), first.argmax(-1)]
            pooled = pooled_tok @ m.text_projection
            return {"crossattn": ctx, "pooled": pooled}
        b, n, L = tokens.shape
        flat = tokens.reshape(b * n, L).to(device)
        if self.family == "sd2":
            stop = getattr(self.te, "layer_idx", 1)
            h, _ = _open_clip_run(self.te.model, flat, stop)
            h = self.te.model.ln_final(h)
        else:
            h = _hf_hidden(self.te.transformer, flat, self.clip_skip, final_ln=True)
        return {"crossattn": h.reshape(b, n * L, -1)}


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: int = 10000) -> torch.Tensor:
    """sgm's sinusoidal embedding (cos first), as used by its size/crop embedders."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def sdxl_vector(pooled: torch.Tensor, original_size, crop_top_left, target_size) -> torch.Tensor:
    """y = [pooled 1280, emb(orig h,w), emb(crop top,left), emb(target h,w)] = 2816 (sd-scripts/sgm order)."""
    b = pooled.shape[0]
    dev = pooled.device

    def emb(pairs):
        t = torch.as_tensor(pairs, dtype=torch.float32, device=dev).reshape(b, 2)
        return timestep_embedding(t.flatten(), 256).reshape(b, 512)

    return torch.cat([pooled.float(), emb(original_size), emb(crop_top_left), emb(target_size)], dim=-1).to(pooled.dtype)
