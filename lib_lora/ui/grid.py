"""The checkpoint x strength x seed grid without gradio: the tab, the headless backend and ``python -m lib_lora
grid`` share it."""

from __future__ import annotations

import os

from PIL import Image, ImageDraw, ImageFont


def prompt_tags_problem(prompt: str, negative: str = "", on_top: str | None = None) -> str | None:
    """A grid renders one LoRA file at a time and applies no <lora:...> (or other extra network) tag of its
    prompt, while the pictures' PNG info would carry them to txt2img, which applies them: said, not rendered.
    ``on_top``: how this grid judges a LoRA on top of another, when it can."""
    from ..apply.parser import TAG_RE

    tags = [m.group(0) for m in TAG_RE.finditer(f"{prompt or ''} {negative or ''}")]
    if not tags:
        return None
    return (f"the prompt has {', '.join(tags[:3])}: a grid merges one LoRA file at a time and applies no tag of its "
            "prompt, while its pictures' PNG info would make txt2img apply it. Take the tag out; to judge a LoRA "
            "on top of another, " + (on_top or "bake the other into the checkpoint first (python -m lib_lora "
                                              "merge, or the WebUI's Checkpoint Merger) and render on that"))


def new_folder(path: str) -> str:
    """``path``, or ``path-2``, ``-3``... when it exists: two grids in the same second get folders of their own."""
    for n in range(1, 1000):
        candidate = path if n == 1 else f"{path}-{n}"
        try:
            os.makedirs(candidate)
            return candidate
        except FileExistsError:
            continue
    raise FileExistsError(path)


def compose_grid(images: list[list[list[Image.Image]]], file_labels: list[str], strengths: list[float],
                 seeds: list[int], cell: int = 192) -> Image.Image:
    """One labelled picture: a row per (file, strength), a column per seed."""
    font = ImageFont.load_default()
    rows = [(fl, s, row) for fl, per_file in zip(file_labels, images) for s, row in zip(strengths, per_file)]
    sample = rows[0][2][0]
    cw = min(cell, sample.width)
    ch = max(1, round(sample.height * cw / sample.width))
    d = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    # (the label column fits the longest label: run names cut short made rows of two epochs look alike)
    label_w = max(150, 12 + max(int(d.textlength(t, font=font)) for fl, s, _ in rows
                                 for t in (fl, f"strength {s:g}")) if rows else 150)
    head_h, pad = 22, 4
    W = label_w + len(seeds) * (cw + pad)
    H = head_h + len(rows) * (ch + pad)
    grid = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(grid)
    for k, seed in enumerate(seeds):
        d.text((label_w + k * (cw + pad) + 4, 6), f"seed {seed}", fill="black", font=font)
    for r, (fl, s, row) in enumerate(rows):
        y = head_h + r * (ch + pad)
        d.text((4, y + ch // 2 - 12), fl, fill="black", font=font)
        d.text((4, y + ch // 2 + 2), f"strength {s:g}", fill="black", font=font)
        for k, img in enumerate(row):
            grid.paste(img.convert("RGB").resize((cw, ch), Image.LANCZOS), (label_w + k * (cw + pad), y))
    return grid


def render_rows(host, files: list[str], strengths: list[float], render, progress=None, should_stop=None,
                on_network=None, under: list[tuple[str, float]] = ()):
    """``rows[file][strength] = render(file, strength)`` with each LoRA merged at that strength (text encoder and
    UNet) into the host's model; the model is put back afterwards, on an error too. Between rows ``should_stop()`` may end it:
    returns (rows of the files rendered in full, rows done, rows in all, stopped). ``on_network(path, result)``
    gets each file's first apply result (its matched and unmatched layers). ``under``: (file, weight) LoRAs merged
    beneath every row, to judge a LoRA on top of them."""
    from ..apply import Patcher, layer_mapping, load_network

    mapping = layer_mapping(host.sd_model)
    patcher = Patcher(cache_mb=0)
    out: list[list] = []
    total, done = len(files) * len(strengths), 0
    base = [(load_network(f, host.family), float(w)) for f, w in under]
    try:
        for f in files:
            net = load_network(f, host.family)
            rows = []
            for s in strengths:
                if should_stop and should_stop():
                    return out, done, total, True
                result = patcher.apply(mapping, [(n, w, w, None) for n, w in base] + [(net, float(s), float(s), None)])
                if on_network is not None and not rows:
                    on_network(f, result)
                rows.append(render(f, s))
                done += 1
                if progress:
                    progress(done, total)
            out.append(rows)
    finally:
        patcher.restore()
    return out, done, total, False
