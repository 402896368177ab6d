"""Text conditioning for training, computed from the host's own text-encoder modules.

We do not call the WebUI's prompt wrappers: they parse ``(`` and ``[`` in captions as emphasis (here only with
weighted_captions, scaled the way sd-scripts does) and use a dynamic chunk count. We tokenize like A1111 does
(75-token chunks, comma backtracking, ``<BOS> 75 ids <EOS/PAD>``), but with
a fixed number of chunks per run so every batch has the same shape, then run the inner encoder modules directly.
"""

from __future__ import annotations

import math
import re
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
    # (verbose=False: a long caption is chunked here, not fed whole to CLIP, so transformers' "indexing errors"
    # warning about it would only alarm)
    return TokenizerSpec(lambda s: tok(s, truncation=False, add_special_tokens=False, verbose=False)["input_ids"],
                         tok.bos_token_id, tok.eos_token_id, tok.eos_token_id, vocab.get(",</w>"))


def _open_clip_spec() -> TokenizerSpec:
    from open_clip.tokenizer import _tokenizer  # the same BPE A1111's SD2/SDXL wrappers use

    enc = _tokenizer.encoder
    return TokenizerSpec(_tokenizer.encode, enc["<start_of_text>"], enc["<end_of_text>"], 0, enc.get(",</w>"))


# A1111's emphasis syntax (modules/prompt_parser.py; sd-scripts' weighted_captions reads the same, without the
# spaces A1111 allows around the number)
_RE_ATTENTION = re.compile(r"""
\\\(|\\\)|\\\[|\\]|\\\\|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|]|[^\\()\[\]:]+|:
""", re.X)


_RE_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
BREAK_ID = -1  # (in a token list: A1111's BREAK, which starts a new 75-token chunk)


def parse_prompt_attention(text: str, breaks: bool = False) -> list[tuple[str, float]]:
    """``(word)`` x1.1, ``[word]`` /1.1, ``(word:1.3)`` x1.3, nesting multiplies, ``\\(`` is a literal bracket,
    unclosed brackets still count; runs of equal weight are merged. ``breaks``: A1111's ``BREAK`` comes out as
    ("BREAK", -1), as its prompt parser gives it."""
    res: list[list] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply(start: int, factor: float):
        for item in res[start:]:
            item[1] *= factor

    for m in _RE_ATTENTION.finditer(text):
        tok, weight = m.group(0), m.group(1)
        if tok.startswith("\\"):
            res.append([tok[1:], 1.0])
        elif tok == "(":
            round_open.append(len(res))
        elif tok == "[":
            square_open.append(len(res))
        elif weight is not None and round_open:
            multiply(round_open.pop(), float(weight))
        elif tok == ")" and round_open:
            multiply(round_open.pop(), 1.1)
        elif tok == "]" and square_open:
            multiply(square_open.pop(), 1 / 1.1)
        elif breaks:
            for i, part in enumerate(_RE_BREAK.split(tok)):
                if i:
                    res.append(["BREAK", -1.0])
                res.append([part, 1.0])
        else:
            res.append([tok, 1.0])
    for start in round_open:
        multiply(start, 1.1)
    for start in square_open:
        multiply(start, 1 / 1.1)
    if not res:
        res = [["", 1.0]]
    merged = [res[0]]
    for item in res[1:]:
        if item[1] == merged[-1][1]:
            merged[-1][0] += item[0]
        else:
            merged.append(item)
    return [(t, w) for t, w in merged]


def weighted_ids(text: str, spec: TokenizerSpec, breaks: bool = False) -> tuple[list[int], list[float]]:
    """Token ids of a caption with emphasis, and each token's weight (each emphasised piece tokenized alone, as
    A1111 and sd-scripts do); with ``breaks`` a BREAK is BREAK_ID."""
    ids: list[int] = []
    weights: list[float] = []
    for piece, w in parse_prompt_attention(text, breaks):
        if breaks and piece == "BREAK" and w == -1:
            ids.append(BREAK_ID)
            weights.append(1.0)
            continue
        toks = spec.encode(piece)
        ids += toks
        weights += [w] * len(toks)
    return ids, weights


def split_chunks(ids: list[int], weights: list[float] | None, spec: TokenizerSpec) -> list[list[tuple]]:
    """A1111's tokenize_line: (id, weight) runs of at most 75, the words after a nearby comma moved on, a new
    chunk at each BREAK_ID."""
    ws = weights if weights is not None else [1.0] * len(ids)
    chunks: list[list[tuple[int, float]]] = []
    cur: list[tuple[int, float]] = []
    last_comma = -1
    for item in zip(ids, ws):
        tok = item[0]
        if tok == BREAK_ID:
            chunks.append(cur)
            cur, last_comma = [], -1
            continue
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
        cur.append(item)
    if cur or not chunks:
        chunks.append(cur)
    return chunks


def _chunks(ids: list[int], weights: list[float] | None, spec: TokenizerSpec, n_chunks: int):
    """A1111 chunking into exactly n_chunks rows of 77 ids, and with ``weights`` the tokens' weights in the same
    layout (1 for BOS/EOS/padding; None without)."""
    chunks = split_chunks(ids, weights, spec)
    truncated = len(chunks) > n_chunks
    chunks = chunks[:n_chunks]
    while len(chunks) < n_chunks:
        chunks.append([])
    rows, wrows = [], []
    for c in chunks:
        c = c[:CHUNK]
        row = [spec.bos] + [t for t, _ in c] + [spec.eos]
        rows.append(row + [spec.pad] * (CHUNK + 2 - len(row)))
        if weights is not None:  # (plain captions skip this: it runs for every batch when the TE trains)
            wrows.append([1.0] + [w for _, w in c] + [1.0] * (CHUNK + 1 - len(c)))
    return (torch.tensor(rows, dtype=torch.long),
            torch.tensor(wrows, dtype=torch.float32) if weights is not None else None, truncated)


def chunk_ids(ids: list[int], spec: TokenizerSpec, n_chunks: int) -> tuple[torch.Tensor, bool]:
    """A1111 chunking into exactly n_chunks rows of 77 ids; returns (ids [n_chunks, 77], truncated)."""
    rows, _, truncated = _chunks(ids, None, spec, n_chunks)
    return rows, truncated


def _hf_hidden(transformer, ids, layer_from_end: int, final_ln: bool):
    out = transformer(input_ids=ids, output_hidden_states=layer_from_end > 1)
    if layer_from_end <= 1:
        return out.last_hidden_state
    z = out.hidden_states[-layer_from_end]
    # (transformers 5 has no `text_model` level)
    return getattr(transformer, "text_model", transformer).final_layer_norm(z) if final_ln else z


def _open_clip_run(model, ids, stop_before: int):
    """Run the open_clip text tower; returns (hidden after `len-stop_before` blocks, last-layer output)."""
    emb = model.token_embedding
    # in the WebUI the embedding is wrapped by its textual-inversion hijack (EmbeddingsWithFixes: no .weight)
    x = emb(ids) + model.positional_embedding.to(getattr(emb, "wrapped", emb).weight.dtype)
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

    def __init__(self, sd_model, family: str, clip_skip: int = 1, max_token_length: int = 75,
                 weighted: bool = False, emphasis: bool = False):
        self.family = family
        # emphasis: A1111's prompt reading for pictures, (word:1.2) weights with each chunk's mean kept (its
        # "Original" emphasis) and BREAK
        self.emphasis = emphasis
        weighted = weighted or emphasis
        # weighted_captions: (word:1.2) emphasis scales that word's hidden states, as sd-scripts does; the tokens
        # then carry their weights (SD: (ids, w); SDXL: (ids1, ids2, w1, w2))
        self.weighted = weighted
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
            if family == "sd1":
                layers = len(getattr(self.te.transformer, "text_model", self.te.transformer).encoder.layers)
                if self.clip_skip > layers:
                    raise ValueError(f"clip_skip = {self.clip_skip} is more than the text encoder's {layers} "
                                     "layers (1 = the last layer, 2 = the one before, as A1111's 'Clip skip')")

    def modules(self) -> list[nn.Module]:
        if self.family == "sdxl":
            return [self.te1.transformer, self.te2.model]
        return [self.te.model if self.family == "sd2" else self.te.transformer]

    def tokenize(self, captions: list[str]):
        """Token ids per caption: a tensor [B, n_chunks, 77] (SDXL: a pair), plus how many were truncated (those
        captions, with their token counts, in ``last_truncated``)."""
        truncated = 0
        self.last_truncated: list[tuple[str, int]] = []
        specs = [self.spec1, self.spec2] if self.family == "sdxl" else [self.spec]
        ids: list[list] = [[] for _ in specs]
        ws: list[list] = [[] for _ in specs]
        for c in captions:
            for k, spec in enumerate(specs):
                toks, weights = weighted_ids(c, spec, self.emphasis) if self.weighted else (spec.encode(c), None)
                rows, wrows, t = _chunks(toks, weights, spec, self.n_chunks)
                ids[k].append(rows)
                ws[k].append(wrows)
                if t and k == 0:
                    truncated += 1
                    self.last_truncated.append((c, len(toks)))
        out = [torch.stack(x) for x in ids] + ([torch.stack(x) for x in ws] if self.weighted else [])
        return (out[0] if len(out) == 1 else tuple(out)), truncated

    def _weigh(self, h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        out = h * w.reshape(h.shape[0], -1, 1).to(h.device, h.dtype)
        if not self.emphasis:
            return out
        # A1111's EmphasisOriginal: each prompt's chunk keeps its mean (it encodes a prompt's chunks one by one)
        b, n = h.shape[0], self.n_chunks
        before = h.reshape(b, n, -1).mean(-1, keepdim=True)
        after = out.reshape(b, n, -1).mean(-1, keepdim=True)
        return (out.reshape(b, n, -1) * (before / after)).reshape(h.shape)

    def encode(self, tokens, device) -> dict:
        """{'crossattn': [B, 77*n, C]} and for SDXL also {'pooled': [B, 1280]}."""
        if self.family == "sdxl":
            t1, t2 = tokens[:2]
            b, n, L = t1.shape
            h1 = _hf_hidden(self.te1.transformer, t1.reshape(b * n, L).to(device), 2, final_ln=False)
            h2, last = _open_clip_run(self.te2.model, t2.reshape(b * n, L).to(device), 1)
            h1, h2 = h1.reshape(b, n * L, -1), h2.reshape(b, n * L, -1)
            if self.weighted:  # the pooled output stays unweighted (sd-scripts)
                h1, h2 = self._weigh(h1, tokens[2]), self._weigh(h2, tokens[3])
            ctx = torch.cat([h1, h2.to(h1.dtype)], dim=-1)
            m = self.te2.model
            last = m.ln_final(last)
            first = t2[:, 0].to(device)
            pooled_tok = last.reshape(b, n, L, -1)[:, 0][torch.arange(b, device=device), first.argmax(-1)]
            pooled = pooled_tok @ m.text_projection
            return {"crossattn": ctx, "pooled": pooled}
        weights = None
        if self.weighted:
            tokens, weights = tokens
        b, n, L = tokens.shape
        flat = tokens.reshape(b * n, L).to(device)
        if self.family == "sd2":
            stop = getattr(self.te, "layer_idx", 1)
            h, _ = _open_clip_run(self.te.model, flat, stop)
            h = self.te.model.ln_final(h)
        else:
            h = _hf_hidden(self.te.transformer, flat, self.clip_skip, final_ln=True)
        h = h.reshape(b, n * L, -1)
        return {"crossattn": self._weigh(h, weights) if weights is not None else h}


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
