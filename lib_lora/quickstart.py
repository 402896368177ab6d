"""``python -m lib_lora quickstart``: the whole pipeline once, on CPU, in about a minute, with nothing downloaded.

1. builds the embedded tiny SD1.5-shaped model (``host/tiny.py``; random weights, so images are abstract);
2. writes a small dataset in kohya layout (``dataset/img/10_svs cat/*.png`` + ``.txt`` captions);
3. trains a LoRA with the normal training engine (``run_training``) and saves it (kohya format + metadata);
4. measures the denoising loss before and after at fixed timesteps and fixed noise on the training images;
5. applies the saved file the way a prompt does: ``<lora:NAME:1>`` → ``parse_prompt`` → ``load_network`` →
   ``Patcher.apply`` on ``layer_mapping(model)``, and after use restores it, checking the weights came back
   bit-exact;
6. writes a loss plot and a before/after sample grid (same seeds, our DDIM sampler) and prints a summary.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .formats.errors import LoraError

MARKER = ".lora-studio-quickstart"
DEFAULT_OUT = "lora-studio-quickstart"
DEFAULT_STEPS = 80
NAME = "svs_cat"
TRIGGER = "svs cat"
CAPTIONS = ["svs cat, magenta square, stripes", "svs cat, stripes", "svs cat, magenta square", "svs cat"]
EVAL_TIMESTEPS = (50, 150, 300, 450, 600, 750, 900)
GRID_PROMPTS = ("svs cat", "svs cat, magenta square")
GRID_SEEDS = (1, 2)
GRID_STEPS = 15


class QuickstartError(LoraError):
    """The quickstart cannot run as asked (e.g. the output folder holds other files)."""


@dataclass
class QuickstartResult:
    out_dir: str
    lora_path: str
    loss_before: float
    loss_after: float
    matched: int
    total: int
    restored_exact: bool
    plot_path: str
    grid_path: str
    steps: int
    train_seconds: float
    seconds: float
    files: list[str] = field(default_factory=list)
    apply_summary: str = ""
    kept_config: str | None = None  # keep_model: a config for `train` on the saved tiny model

    def summary(self) -> str:
        drop = (1 - self.loss_after / self.loss_before) * 100 if self.loss_before else 0.0
        pct = 100.0 * self.matched / self.total if self.total else 0.0
        return "\n".join([
            f"LoRA:          {self.lora_path}",
            f"loss:          {self.loss_before:.4f} before -> {self.loss_after:.4f} after ({drop:.1f}% lower; fixed "
            f"timesteps {', '.join(map(str, EVAL_TIMESTEPS))} and fixed noise on the training images)",
            f"applied:       <lora:{NAME}:1> -> {self.matched}/{self.total} modules matched ({pct:.0f}%); "
            f"{self.apply_summary}",
            f"restored:      {'weights bit-exact after restore' if self.restored_exact else 'NOT bit-exact'}",
            f"loss plot:     {self.plot_path}",
            f"sample grid:   {self.grid_path} (rows: dataset images, base model, with the LoRA; same seeds)",
            f"time:          {self.seconds:.0f} s ({self.steps} training steps in {self.train_seconds:.0f} s)",
        ])


# ---------------------------------------------------------------------------------------------------------------
# dataset

def smooth_field(rng, w, h):
    """A smooth random colour field (float32 HxWx3, 0..255): what a 'class' photo looks like to a tiny model."""
    from PIL import Image

    base = rng.rand(3, 3, 3)
    img = Image.fromarray((base * 255).astype("uint8")).resize((w, h), Image.BICUBIC)
    return np.asarray(img).astype("float32")


def concept_image(seed: int, w: int = 64, h: int = 64):
    """A smooth colour field with magenta stripes and a magenta square: an easy, visible 'concept'."""
    from PIL import Image

    rng = np.random.RandomState(seed)
    a = smooth_field(rng, w, h)
    a[:, ::8] = [255, 0, 255]
    x, y = rng.randint(8, w // 2), rng.randint(8, h // 2)
    a[y:y + h // 3, x:x + w // 3] = [255, 0, 200]
    return Image.fromarray(a.clip(0, 255).astype("uint8"))


def make_dataset(root: str, n_images: int = 4, repeats: int = 10, size: int = 64) -> str:
    """``root/img/{repeats}_svs cat/c{i}.png`` with ``.txt`` captions; returns the ``img`` folder."""
    folder = os.path.join(root, "img", f"{repeats}_{TRIGGER}")
    os.makedirs(folder, exist_ok=True)
    for i in range(n_images):
        concept_image(i, size, size).save(os.path.join(folder, f"c{i}.png"))
        with open(os.path.join(folder, f"c{i}.txt"), "w", encoding="utf-8") as f:
            f.write(CAPTIONS[i % len(CAPTIONS)])
    return os.path.join(root, "img")


# ---------------------------------------------------------------------------------------------------------------
# measurements

class FixedLoss:
    """Denoising loss of the model as it is now, at fixed timesteps with fixed noise, on fixed images+captions."""

    def __init__(self, host, images: list[str], captions: list[str], seed: int = 1234):
        from .train.conditioning import TextEncoder
        from .train.images import load_image_rgb
        from .train.loss import NoiseSchedule

        m = host.sd_model
        self.m, self.dev = m, host.device
        vae = m.first_stage_model
        lat = []
        with torch.no_grad():
            for p in images:
                px = torch.from_numpy(load_image_rgb(p)).permute(2, 0, 1)[None].float().div(127.5).sub(1)
                post = vae.encode(px.to(self.dev))
                z = post if isinstance(post, torch.Tensor) else post.mode()
                lat.append(z.float() * float(getattr(m, "scale_factor", 0.18215)))
        x0 = torch.cat(lat)
        n, k = x0.shape[0], len(EVAL_TIMESTEPS)
        self.x0 = x0.repeat_interleave(k, 0)
        self.t = torch.tensor(EVAL_TIMESTEPS * n, device=self.dev)
        g = torch.Generator().manual_seed(seed)
        self.noise = torch.randn(self.x0.shape, generator=g).to(self.dev)
        self.schedule = NoiseSchedule(m.alphas_cumprod, getattr(m, "parameterization", "eps")).to(self.dev)
        self.te = TextEncoder(m, host.family)
        self.captions = [c for c in captions for _ in range(k)]

    @torch.no_grad()
    def __call__(self) -> float:
        tokens, _ = self.te.tokenize(self.captions)  # encoded each time: a text-encoder LoRA changes it
        ctx = self.te.encode(tokens, self.dev)["crossattn"]
        noisy = self.schedule.add_noise(self.x0, self.noise, self.t)
        pred = self.m.model.diffusion_model(noisy, self.t, context=ctx)
        target = self.schedule.target(self.x0, self.noise, self.t)
        return float(torch.nn.functional.mse_loss(pred.float(), target.float()))


def _grid(rows: list[list], row_labels: list[str], col_labels: list[str], path: str, scale: int = 3) -> str:
    from PIL import Image, ImageDraw

    from .train.sampling import save_png

    w, h = rows[0][0].size
    cw, ch = w * scale, h * scale
    left, top = 70, 34
    grid = Image.new("RGB", (left + cw * len(rows[0]), top + ch * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for j, lab in enumerate(col_labels):  # (a label's lines: the prompt, then the seed)
        draw.multiline_text((left + j * cw + 4, 4), lab, fill="black", spacing=3)
    for i, (row, lab) in enumerate(zip(rows, row_labels)):
        draw.text((4, top + i * ch + ch // 2 - 6), lab, fill="black")
        for j, img in enumerate(row):
            grid.paste(img.resize((cw, ch), Image.NEAREST), (left + j * cw, top + i * ch))
    return save_png(grid, path)


def _plot(losses: list[tuple[int, float]], before: float, after: float, path: str) -> str:
    # Figure + Agg canvas directly: no pyplot, so no global backend is set in the caller's process
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    steps = [s for s, _ in losses]
    vals = [v for _, v in losses]
    ax.plot(steps, vals, color="#9ab", lw=1, label="training loss (per step)")
    if len(vals) >= 5:
        k = max(2, len(vals) // 10)
        avg = np.convolve(vals, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1:], avg, color="#157", lw=2, label=f"moving average ({k} steps)")
    ax.axhline(before, color="#c33", ls="--", label=f"fixed-noise loss before: {before:.4f}")
    ax.axhline(after, color="#3a3", ls="--", label=f"fixed-noise loss after: {after:.4f}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (MSE)")
    ax.set_title("LoRA Studio quickstart")
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------------------------------------------------
# the run

def _check_out_dir(out: str) -> None:
    if os.path.exists(out) and not os.path.isdir(out):
        raise QuickstartError(f"{out} is a file; choose a folder with --out")
    if os.path.isdir(out) and os.listdir(out) and not os.path.exists(os.path.join(out, MARKER)):
        raise QuickstartError(f"{out} already holds other files; choose an empty or new folder with --out "
                              "(the quickstart only reuses folders it made itself)")


def command_prefix() -> str:
    """How to run ``lib_lora`` again from this folder: a virtual environment's Python by its path (the quickstart
    runs in ``.venv``, where a plain ``python`` has no torch), else ``python``."""
    if sys.prefix == sys.base_prefix or not sys.executable:
        return "python -m lib_lora"
    rel = os.path.relpath(sys.executable)
    return f"{sys.executable if rel.startswith('..') else rel} -m lib_lora"


def keep_model(model, out: str) -> str:
    """The embedded model as a checkpoint file (``model/tiny-sd15.safetensors``) and ``train.toml``, an sd-scripts
    style config for the quickstart's dataset, so ``train`` can be tried offline, with no download."""
    from .formats.safetensors_io import save_file_atomic
    os.makedirs(os.path.join(out, "model"), exist_ok=True)
    save_file_atomic({k: v.detach().contiguous() for k, v in model.state_dict().items()},
                     os.path.join(out, "model", "tiny-sd15.safetensors"))
    path = os.path.join(out, "train.toml")
    prog = command_prefix()
    with open(path, "w", encoding="utf-8") as f:
        f.write(f"""# The quickstart's dataset on its tiny model (random weights): try the command line with
#   {prog} train {path} --dry-run
# and once trained, compare its epochs with
#   {prog} grid {os.path.join(out, "my-lora")} --model {os.path.join(out, "model", "tiny-sd15.safetensors")}
# Relative paths are read from this file's folder.
[model]
pretrained_model_name_or_path = "model/tiny-sd15.safetensors"

[dataset]
train_data_dir = "dataset/img"
resolution = "64"
train_batch_size = 2
caption_extension = ".txt"

[network]
network_module = "networks.lora"
network_dim = 8
network_alpha = 4

[training]
optimizer_type = "AdamW"
unet_lr = 1e-3
text_encoder_lr = 5e-4
lr_scheduler = "constant"
max_train_epochs = 4
save_every_n_epochs = 2
save_state = true
mixed_precision = "no"
seed = 1

[output]
output_dir = "my-lora"
output_name = "{NAME}_mine"
save_precision = "fp16"
""")
    return path


def run_quickstart(out_dir: str = DEFAULT_OUT, steps: int | None = None, seed: int = 0, log=print,
                   on_event=None, should_cancel=None, keep: bool = False) -> QuickstartResult:
    """Run the quickstart into ``out_dir``; ``log`` gets progress lines, ``on_event`` the trainer's events;
    ``keep``: also write the tiny model and a config for ``train`` (``keep_model``)."""
    from .apply.layers import layer_mapping
    from .apply.loader import load_network
    from .apply.parser import parse_prompt
    from .apply.patcher import Patcher
    from .host.base import ModelHost
    from .host.tiny import make_tiny_sd15, quiet_third_party
    from .train.config import parse_train_config
    from .train.run import plan_for, run_training
    from .train.sampling import SamplePrompt, generate

    t0 = time.time()
    steps = int(steps or DEFAULT_STEPS)
    if steps < 1:
        raise QuickstartError("--steps must be at least 1")
    out = os.path.abspath(out_dir)
    _check_out_dir(out)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, MARKER), "w", encoding="utf-8") as f:
        f.write("made by `python -m lib_lora quickstart`; safe to delete\n")

    log("1/6 building the embedded tiny SD1.5-shaped model (random weights, CPU)")
    with quiet_third_party():
        model = make_tiny_sd15(seed)
    host = ModelHost(model, name="tiny-sd15 (embedded)", device=torch.device("cpu"))

    log("2/6 writing a small dataset (kohya layout)")
    img_dir = make_dataset(os.path.join(out, "dataset"))
    lora_dir = os.path.join(out, "lora")
    cfg = parse_train_config({
        "train_data_dir": img_dir, "resolution": "64", "train_batch_size": 2, "caption_extension": ".txt",
        "output_dir": lora_dir, "output_name": NAME, "network_module": "networks.lora", "network_dim": 8,
        "network_alpha": 4, "learning_rate": 1e-3, "unet_lr": 1e-3, "text_encoder_lr": 5e-4,
        "max_train_steps": steps, "seed": seed, "lr_scheduler": "constant", "optimizer_type": "AdamW",
        "save_precision": "fp16", "metadata_title": "LoRA Studio quickstart",
    }, source="quickstart", base_dir=out)
    plan = plan_for(host, cfg)
    log(plan.report())

    images = sorted(os.path.join(r, f) for r, _, fs in os.walk(img_dir) for f in fs if f.endswith(".png"))
    captions = []
    for p in images:
        with open(os.path.splitext(p)[0] + ".txt", encoding="utf-8") as f:
            captions.append(f.read().strip())
    fixed = FixedLoss(host, images, captions)
    before_fp = weights_fingerprint(model)
    loss_before = fixed()
    prompts = [SamplePrompt(prompt=p, negative="", width=64, height=64, steps=GRID_STEPS, seed=s, cfg_scale=5.0)
               for p in GRID_PROMPTS for s in GRID_SEEDS]
    base_imgs = [img for img, _, _ in generate(host, prompts)]

    log(f"3/6 training {steps} steps (fixed-noise loss before: {loss_before:.4f})")
    t_train = time.time()
    res = run_training(host, cfg, on_event=on_event, should_cancel=should_cancel, plan=plan)
    train_s = time.time() - t_train
    if res.status != "done":
        raise QuickstartError(f"training was cancelled at step {res.steps}; run the quickstart again")
    if weights_fingerprint(model) != before_fp:
        raise QuickstartError("internal error: training changed the model's own weights")

    log("4/6 applying the LoRA the way a prompt does: <lora:...> -> parse -> load -> patch")
    clean, refs = parse_prompt(f"{TRIGGER} <lora:{NAME}:1>")
    ref = refs[0]
    path = os.path.join(lora_dir, ref.name + ".safetensors")
    mapping = layer_mapping(model)
    net = load_network(path, host.family, cache=None, layer_names=set(mapping))
    patcher = Patcher(cache_mb=0)
    try:
        result = patcher.apply(mapping, [(net, ref.te, ref.unet, ref.dyn)])
        if not result.ok:
            raise QuickstartError("applying the LoRA failed: " + "; ".join(result.messages[:3]))
        loss_after = fixed()
        lora_imgs = [img for img, _, _ in generate(host, prompts)]
    finally:
        patcher.restore()
    restored = weights_fingerprint(model) == before_fp

    log("5/6 writing the loss plot and the before/after grid")
    plot = _plot(res.losses, loss_before, loss_after, os.path.join(out, "loss.png"))
    cols = [f"{p}\nseed {s}" for p in GRID_PROMPTS for s in GRID_SEEDS]
    from PIL import Image
    data = [Image.open(p).convert("RGB") for p in images[:len(cols)]]
    rows, labels = [base_imgs, lora_imgs], ["base", "+ LoRA"]
    if len(data) == len(cols):  # the training images on top, for reference
        rows, labels = [data] + rows, ["training"] + labels
    grid = _grid(rows, labels, cols, os.path.join(out, "before_after.png"))

    kept = None
    if keep:
        kept = keep_model(model, out)
        log(f"kept the tiny model as {os.path.join(out, 'model', 'tiny-sd15.safetensors')} and a config for it: {kept}")
    log("6/6 done")
    return QuickstartResult(kept_config=kept, out_dir=out, lora_path=res.final, loss_before=loss_before,
                            loss_after=loss_after,
                            matched=len(net.report.matched), total=net.report.total_modules,
                            restored_exact=restored, plot_path=plot, grid_path=grid, steps=res.steps,
                            train_seconds=train_s, seconds=time.time() - t0, files=list(res.files),
                            apply_summary=f"{result.modules_merged} layers merged, then restored")


def weights_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over the names, dtypes and raw bytes of every parameter and buffer: equal means bit-exact."""
    import hashlib

    h = hashlib.sha256()
    for kind, items in (("p", model.named_parameters()), ("b", model.named_buffers())):
        for name, t in items:
            h.update(f"{kind}:{name}:{t.dtype}:{tuple(t.shape)}".encode())
            if t.numel():
                h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
