"""``python -m lib_lora grid``: the Results tab's checkpoint x strength x seed grid from the command line, to pick
the best epoch of a headless run (a rented GPU, a batch of runs) without a WebUI.

Each saved LoRA file is merged at each strength into the checkpoint (put back after) and rendered with A1111's
sampler of the given name for each seed; every picture is kept with its infotext and the ``<lora:name:strength>``
tag it was rendered with (PNG Info -> txt2img renders it again), beside one labelled grid.png. Handlers follow
cli.py's convention ``func(args, out) -> exit code``.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import re
import time

from .formats.errors import LoraError

EXIT_OK, EXIT_CANCELLED = 0, 130
STRENGTHS = "0.5, 0.7, 0.8, 1.0"  # (the Results tab's default)
_STATE_EXTS = (".lsstate", ".pt", ".ckpt", ".bin")


class GridCliError(LoraError):
    """A grid problem the user can fix."""


def add_commands(subparsers) -> None:
    from .cli import PROG
    from .train_cli import add_model_args

    pg = subparsers.add_parser(
        "grid", help="render saved LoRA files x strengths x seeds, to pick the best epoch",
        description="Render each LoRA file at each strength for each seed on a checkpoint, with A1111's sampler "
                    "of that name, into one labelled grid.png and a picture per cell (its PNG info holds the "
                    "<lora:name:strength> tag it was rendered with). A folder stands for the LoRA files in it, "
                    "in epoch order (the final file last).",
        epilog="examples:\n"
               f"  {PROG} grid out/ --model v1-5.safetensors\n"
               f"  {PROG} grid out/svs_cat-000004.safetensors out/svs_cat.safetensors --model v1-5.safetensors "
               "--prompt 'svs cat, on a sofa' --strengths 0.6,0.8,1 --seeds 1,2,3",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    pg.add_argument("loras", nargs="+", metavar="LORA", help="LoRA .safetensors files, or folders of them")
    pg.add_argument("--model", required=True, metavar="CKPT", help="SD1/SD2/SDXL .safetensors checkpoint")
    pg.add_argument("--prompt", help="prompt with the trigger word (default: the instance and class words of the "
                                     "LoRA's training folder, e.g. 'svs cat' from '20_svs cat')")
    pg.add_argument("--negative", default="", metavar="TEXT", help="negative prompt")
    pg.add_argument("--with", dest="under", action="append", default=[], metavar="LORA[:WEIGHT]",
                    help="a LoRA merged beneath every row (default weight 1), to judge the files on top of it, "
                         "e.g. a style on a character LoRA; repeat for more")
    pg.add_argument("--strengths", default=STRENGTHS, metavar="LIST",
                    help=f"default: {STRENGTHS}; a list that starts with a minus needs '=': --strengths=-1,0,1")
    pg.add_argument("--seeds", default="1, 2", metavar="LIST", help="default: 1, 2")
    pg.add_argument("--width", type=int, metavar="W", help="default: the LoRA's training resolution, else 512 "
                                                           "(1024 for SDXL)")
    pg.add_argument("--height", type=int, metavar="H", help="default: the training height, or --width when only "
                                                           "that is given")
    pg.add_argument("--steps", type=int, default=20, help="sampling steps (default: 20)")
    pg.add_argument("--cfg", type=float, default=7.0, help="CFG scale (default: 7)")
    pg.add_argument("--sampler", default="DPM++ 2M", help="A1111's sampler name or sd-scripts' (euler_a, ddim...); "
                                                          "default: DPM++ 2M, A1111's default")
    pg.add_argument("--clip-skip", type=int, default=None, metavar="N",
                    help="default: the LoRA's training clip skip (SD1/SD2), else 1")
    pg.add_argument("--out", metavar="DIR", help="default: grids/<name>-<time>/ beside the LoRA files (for files in "
                                                 "a WebUI's models/Lora: its outputs/lora-studio/grids/)")
    add_model_args(pg, "auto: the CUDA GPU when torch sees one, else the CPU")
    pg.set_defaults(func=cmd_grid)


# ---------------------------------------------------------------------------------------------------------------
# the files

_EPOCH = re.compile(r"-(\d{6})$")
_STEP = re.compile(r"-step(\d+)$")


def _run_name(path: str) -> str:
    stem = os.path.splitext(os.path.basename(path))[0]
    m = _STEP.search(stem) or _EPOCH.search(stem)
    return stem[: m.start()] if m else stem


def _order(path: str):
    """A run's files in training order (by the step each was saved at), the final file (no suffix) last."""
    stem = os.path.splitext(os.path.basename(path))[0]
    m = _STEP.search(stem) or _EPOCH.search(stem)
    return (_run_name(path), m is None, _int(_metadata(path).get("ss_steps"), int(m.group(1)) if m else 0))


def _not_a_lora(path: str) -> str | None:
    from .formats.report import not_a_lora

    h = _header(path)
    return not_a_lora({k: tuple(v["shape"]) for k, v in h.items() if k != "__metadata__"},
                      h.get("__metadata__") or {})


def lora_files(args: list[str], notes: list[str] | None = None) -> list[str]:
    """Files as given; a folder's LoRA files in epoch order (card pictures, states and other files left out, and
    other .safetensors, e.g. an embedding, with a note)."""
    from .train.config import missing_path_hint

    files: list[str] = []
    for a in args:
        path = os.path.expanduser(a)
        if os.path.isdir(path):
            found = [os.path.join(path, n) for n in sorted(os.listdir(path))
                     if n.endswith(".safetensors") and os.path.isfile(os.path.join(path, n))]
            others = {f: why for f in found for why in [_not_a_lora(f)] if why}
            for f, why in others.items():
                if notes is not None:
                    notes.append(f"{os.path.basename(f)} left out: {why}")
            found = sorted((f for f in found if f not in others), key=_order)
            if not found:
                raise GridCliError(f"{path}: no LoRA .safetensors file in this folder (give the folder a training "
                                   "run wrote its LoRA files to, or the files themselves)")
            files += found
        elif os.path.isfile(path):
            if path.endswith(_STATE_EXTS):
                raise GridCliError(f"{path}: not a LoRA .safetensors file (a resume state or pickle); give the LoRA "
                                   "files a run saved")
            files.append(path)
        else:
            raise GridCliError(f"LoRA file not found: {path}" + missing_path_hint(path, None))
    seen = set()
    return [f for f in files if not (os.path.realpath(f) in seen or seen.add(os.path.realpath(f)))]


def _header(path: str) -> dict:
    """The file's safetensors header, read once per version of the file (the sort, the checks, the labels and the
    prompts all ask)."""
    st = os.stat(path)
    return _read_header(os.path.realpath(path), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=256)
def _read_header(path: str, mtime_ns: int, size: int) -> dict:
    from .formats.safetensors_io import read_header

    return read_header(path)


def _with_file(spec: str) -> tuple[str, float]:
    """--with FILE[:WEIGHT] (a weight only after the last colon, so C:\\ paths stay whole)."""
    from .cli import UsageError
    from .train.config import missing_path_hint

    path, weight = spec, 1.0
    head, sep, tail = spec.rpartition(":")
    if sep and head:
        try:
            path, weight = head, float(tail)
        except ValueError:
            pass
    if not math.isfinite(weight):
        raise UsageError(f"--with {spec}: give the weight as a number, e.g. {path}:0.8")
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        raise GridCliError(f"--with {spec}: LoRA file not found: {path}" + missing_path_hint(path, None))
    why = _not_a_lora(path)
    if why:
        raise GridCliError(f"--with {spec}: {why}")
    return path, weight


def _metadata(path: str) -> dict:
    return dict(_header(path).get("__metadata__") or {})


def default_size(meta: dict, family: str) -> tuple[int, int]:
    """The LoRA's training resolution (ss_resolution "(512, 768)"), else the model's usual size."""
    nums = re.findall(r"\d+", str(meta.get("ss_resolution") or ""))
    if len(nums) >= 2:
        return int(nums[0]), int(nums[1])
    return (1024, 1024) if family == "sdxl" else (512, 512)


def default_out(lora_file: str) -> str:
    """grids/<name>-<time>/ beside the file; for a file in a WebUI's models/Lora folder, in its
    outputs/lora-studio/grids/ as the tab does (a subfolder there would be a folder button on the card pages)."""
    stem = os.path.splitext(os.path.basename(lora_file))[0]
    folder = os.path.dirname(os.path.abspath(lora_file))
    name = f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    rel, d = [], folder
    while os.path.dirname(d) != d:
        if os.path.basename(d).lower() in ("lora", "lycoris") and os.path.basename(os.path.dirname(d)) == "models":
            return os.path.join(os.path.dirname(os.path.dirname(d)), "outputs", "lora-studio", "grids", *rel, name)
        rel.insert(0, os.path.basename(d))
        d = os.path.dirname(d)
    return os.path.join(folder, "grids", name)


_CELL = re.compile(r"\d{2}_[-+0-9.e]+_\d+\.png|grid\.png")


def _grid_pictures(folder: str) -> list[str]:
    """A grid's pictures in the folder (cells 00_0.8_1.png, grid.png), as this command names them."""
    try:
        return sorted(n for n in os.listdir(folder) if _CELL.fullmatch(n))
    except OSError:
        return []


def _int(v, default: int) -> int:
    try:
        return int(str(v))
    except ValueError:  # (sd-scripts writes "None" for an unset value)
        return default


def mixed_runs(files: list[str]) -> list[str]:
    """Notes for files of one name that come from different training runs (their ss_session_id differs), as a run
    started again over a killed one leaves them: their rows are not one run's epochs."""
    by_run: dict[str, dict[str, list[str]]] = {}
    for f in files:
        sid = _metadata(f).get("ss_session_id")
        if sid:
            by_run.setdefault(_run_name(f), {}).setdefault(sid, []).append(os.path.splitext(os.path.basename(f))[0])
    return [f"the '{run}' files come from {len(ids)} different training runs (their ss_session_id differs): "
            + " | ".join(", ".join(names) for names in ids.values())
            + "; their rows are not one run's epochs (a run started again over another one writes this mix)"
            for run, ids in by_run.items() if len(ids) > 1]


def row_labels(files: list[str]) -> list[str]:
    """'epoch 2' / 'step 500' / 'final (epoch 10)' per file; with the run's name when the files are of several."""
    from .ui.backend import describe_file

    runs = {_run_name(f) for f in files}
    labels = []
    for f in files:
        what = describe_file(f)
        if what == "final":
            epoch = _int(_metadata(f).get("ss_epoch"), 0)
            what = f"final (epoch {epoch})" if epoch else what
        labels.append(f"{_run_name(f)} {what}" if len(runs) > 1 else what)
    return labels


def _numbers(text: str, kind, what: str) -> list:
    from .ui.backend import UiError, parse_numbers

    try:
        return parse_numbers(text, kind, what)
    except UiError as e:
        from .cli import UsageError
        raise UsageError(str(e)) from None


# ---------------------------------------------------------------------------------------------------------------
# the command

def cmd_grid(args, out) -> int:
    import signal
    import threading

    from .host.tiny import quiet_third_party

    def stop(signum, frame):  # SIGTERM (a rented machine stopping, docker stop) as Ctrl-C: the rows done are kept
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, stop) if threading.current_thread() is threading.main_thread() else None
    made: list[str] = []
    try:
        with quiet_third_party():
            return _grid(args, out, made)
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)
        for d in made:  # (a load that failed or was stopped leaves no empty grid folder behind)
            if os.path.isdir(d) and not os.listdir(d):
                os.rmdir(d)


def _grid(args, out, made: list[str]) -> int:
    import torch

    from .cli import UsageError, check_lora_family
    from .formats.safetensors_io import write_error_reason
    from .host.headless import load_checkpoint
    from .train.config import missing_path_hint
    from .train.sampling import (SamplePrompt, a1111_syntax_note, generate, infotext, resolve_sampler, save_png,
                                 tagged_infotext)
    from .train_cli import model_family, pick_device
    from .ui.grid import compose_grid, new_folder, prompt_tags_problem, render_rows

    t0 = time.perf_counter()
    left_out: list[str] = []
    files = lora_files(args.loras, left_out)
    ckpt = os.path.expanduser(args.model)
    if not os.path.isfile(ckpt):
        raise GridCliError(f"--model {ckpt} is a folder: give the checkpoint file itself" if os.path.isdir(ckpt)
                           else f"checkpoint not found: {ckpt}" + missing_path_hint(ckpt, None))
    family = model_family(ckpt, args.webui)  # (said now, not after the checks and the output folder)
    under = [_with_file(w) for w in args.under]
    for f in files + [u for u, _ in under]:  # (before the checkpoint loads)
        check_lora_family(f, family, ckpt, "Render it on an {} checkpoint (--model)")
    strengths = _numbers(args.strengths, float, "strengths")
    seeds = _numbers(args.seeds, int, "seeds")
    if args.steps < 1 or args.steps > 1000:
        raise UsageError("--steps must be between 1 and 1000")
    if not math.isfinite(args.cfg):
        raise UsageError(f"--cfg {args.cfg}: give a number such as 7")
    try:
        sampler, note = resolve_sampler(args.sampler, "--sampler")
    except LoraError as e:
        raise UsageError(str(e)) from None
    meta = _metadata(files[0])
    # each run its own training folder's words, unless --prompt says
    from .train.folders import trained_words
    own = {f: (args.prompt if args.prompt is not None else trained_words(_metadata(f))) for f in files}
    prompt = own[files[0]] or next((p for p in own.values() if p), None)
    prompts = {f: own[f] or prompt for f in files}
    problem = prompt_tags_problem(prompt or "", args.negative, "give the other as --with FILE:WEIGHT")
    if problem:
        raise UsageError(problem[0].upper() + problem[1:])
    if not (prompt or "").strip():
        raise UsageError(f"{os.path.basename(files[0])} does not say its training folder's words: give --prompt "
                         "with the trigger word")
    w, h = default_size(meta, family)
    w = args.width or (args.height if args.height and not args.width else w)
    h = args.height or (args.width if args.width and not args.height else h)
    if args.width == 0 or args.height == 0 or w < 64 or h < 64 or w % 8 or h % 8:
        raise UsageError(f"--width/--height {w}x{h}: use multiples of 8 from 64 up")
    clip_skip = args.clip_skip if args.clip_skip is not None else _int(meta.get("ss_clip_skip"), 1)
    if family == "sdxl":
        if args.clip_skip not in (None, 1):
            out.write(f"note: --clip-skip {args.clip_skip} is not used on SDXL (its text encoders give a fixed "
                      "layer, in the WebUI too)\n")
        clip_skip = 1
    if args.out:
        out_dir = os.path.expanduser(args.out)
        earlier = _grid_pictures(out_dir)
        if earlier:  # (its same-named cells would be replaced and the others mixed in with this grid's)
            raise UsageError(f"--out {out_dir} holds an earlier grid ({len(earlier)} picture(s), e.g. "
                             f"{earlier[0]}): give a new folder, or leave --out out and each grid gets its own")
        if not os.path.isdir(out_dir):
            made.append(out_dir)
        os.makedirs(out_dir, exist_ok=True)  # (a folder it cannot write is said before the model loads)
    else:
        wanted = default_out(files[-1])
        parent = os.path.dirname(wanted)
        had_parent = os.path.isdir(parent)
        os.makedirs(parent, exist_ok=True)
        out_dir = new_folder(wanted)
        made += [out_dir] if had_parent else [out_dir, parent]  # (removed in this order when left empty)

    out.write(f"{len(files)} file(s) x {len(strengths)} strength(s) x {len(seeds)} seed(s) = "
              f"{len(files) * len(strengths) * len(seeds)} pictures at {w}x{h}, {args.steps} steps, {sampler}, "
              f"CFG {args.cfg:g}; prompt: {prompt}\n")
    if under:
        out.write("on top of " + ", ".join(f"{os.path.basename(u)} at {w:g}" for u, w in under) + " in every row\n")
    for n in left_out + mixed_runs(files):
        out.write(f"note: {n}\n")
    if args.prompt is None:
        runs = {_run_name(f): prompts[f] for f in files}
        out.write("note: the prompt is the LoRA's training folder words; give --prompt to change it\n"
                  if len(set(runs.values())) == 1 else
                  "note: each run's prompt is its training folder words: "
                  + "; ".join(f"{r}: {p}" for r, p in runs.items()) + " (--prompt sets one for all)\n")
    for n in (note, a1111_syntax_note(prompt, "--prompt"), a1111_syntax_note(args.negative, "--negative", True)):
        if n:
            out.write(f"note: {n}\n")
    device = pick_device(args.device, out)
    out.write(f"loading {ckpt} ...\n")
    out.flush()
    # (half precision on a GPU, as the WebUI renders by default)
    host = load_checkpoint(ckpt, webui=args.webui, device=device,
                           dtype=torch.float16 if device == "cuda" else torch.float32)
    out.write(host.load_report.summary() + "\n")

    sps = {p: [SamplePrompt(p, negative=args.negative, width=w, height=h, steps=args.steps, seed=s,
                            cfg_scale=args.cfg) for s in seeds] for p in set(prompts.values())}
    model_name = os.path.splitext(os.path.basename(ckpt))[0]

    told_under = []

    def said(path, result):
        names = [u for u, _ in under] + [path]
        for i, n in enumerate(result.networks):
            if i < len(under) and told_under:  # (the LoRAs beneath are the same in every row: said once)
                continue
            out.write(f"{os.path.basename(names[min(i, len(under))])}: {n.summary()}\n")
            for u in n.unmatched[:5]:
                out.write(f"  not in the model: {u}\n")
            if len(n.unmatched) > 5:
                out.write(f"  ... and {len(n.unmatched) - 5} more\n")
            for e in n.errors[:3]:
                out.write(f"  failed: {e}\n")
        told_under.append(True)

    done: dict[str, list[list]] = {}  # file -> its rows' pictures, each saved as soon as it is rendered

    written = [0]

    def write(img, name, info=None):
        """A picture into the grid's folder; a full disk (or a folder gone) is said with what was kept."""
        try:
            path = save_png(img, os.path.join(out_dir, name), info)
        except OSError as e:
            raise GridCliError(f"could not write {name} to {out_dir}: {write_error_reason(e)}; the "
                               f"{written[0]} picture(s) written before it are there. Free some space (or give "
                               "--out on another disk) and render the grid again") from None
        written[0] += 1
        return path

    beneath = "".join(f"<lora:{os.path.splitext(os.path.basename(u))[0]}:{w:g}> " for u, w in under)

    def render(f, s):
        tag = beneath + f"<lora:{os.path.splitext(os.path.basename(f))[0]}:{s:g}>"
        row = []
        batch = sps[prompts[f]]
        for sp, (img, seed, used) in zip(batch, generate(host, batch, sampler=sampler, clip_skip=clip_skip)):
            write(img, f"{files.index(f):02d}_{s:g}_{seed}.png",
                  tagged_infotext(infotext(sp, seed, used, model_name, clip_skip), sp.prompt, tag,
                                  lora_files=[u for u, _ in under] + [f]))
            row.append(img)
        done.setdefault(f, []).append(row)
        return row

    total = len(files) * len(strengths)
    try:
        render_rows(host, files, strengths, render, on_network=said, under=under,
                    progress=lambda d, t: out.write(f"row {d}/{t} rendered\n") or out.flush())
        stopped = False
    except KeyboardInterrupt:  # (a long grid on a rented GPU: what is rendered is kept, with its grid)
        stopped = True
    rendered = [f for f in files if f in done]
    if not rendered:
        out.write("stopped before the first row was rendered; nothing was written\n")
        return EXIT_CANCELLED
    labels = row_labels(rendered)
    grid = compose_grid([done[f] for f in rendered], labels, strengths, seeds)
    grid_path = write(grid, "grid.png")
    n_rows = sum(len(r) for r in done.values())
    if stopped:
        out.write(f"stopped after {n_rows} of {total} rows: wrote {grid_path} with those and their "
                  f"{n_rows * len(seeds)} pictures in {out_dir}\n")
        return EXIT_CANCELLED
    out.write(f"wrote {grid_path} (rows: {', '.join(labels)} at strengths "
              f"{', '.join(f'{s:g}' for s in strengths)}; columns: seeds {', '.join(map(str, seeds))}) and "
              f"{total * len(seeds)} pictures in {out_dir} in {time.perf_counter() - t0:.0f} s\n")
    out.write("each picture's PNG info holds its <lora:name:strength> tag: PNG Info -> Send to txt2img renders "
              "it again with the LoRA file in the WebUI's LoRA folder\n")
    return EXIT_OK
