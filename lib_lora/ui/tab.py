"""The LoRA Studio tab (gradio 3.41.2 as A1111 v1.10.1 ships it).

``build_tab(backend)`` returns a standalone ``gr.Blocks``; the glue returns ``[(blocks, "LoRA Studio",
"lora_studio")]`` from ``on_ui_tabs`` and the WebUI renders it inside ``#tab_lora_studio``. Every handler shows its
errors in the tab, in plain words (``error_html``); nothing is reported only in the console.

Pieces that are pure functions (HTML of the job table, the loss plot, the results grid) live at module level so
they can be tested without a browser.
"""
from __future__ import annotations

import functools
import html
import inspect
import os
import queue as _queue
import re
import threading
import time
import traceback

import gradio as gr
from PIL import Image

from ..train.config import TrainConfigError, output_stem
from ..train.folders import parse_folder_name
from ..train.images import is_image_name
from ..train.sampling import tagged_infotext
from ..train.support import loaded_model_notes
from . import dataset_helper as dh
from . import doctor as doc
from .backend import (GridStopped, UiError, card_words, describe_file, image_size, parse_numbers, row_label, same_model,
                      training_at, write_sample_prompts)
from .grid import compose_grid, prompt_tags_problem
from .presets import (FIELDS, FIELD_BY_KEY, GROUPS, PATH_KEYS, PRESET_NOTES, PRESETS, collect_config, config_to_ui,
                      export_toml, form_defaults, preset_for_family)

TAB_TITLE = "LoRA Studio"
TAB_ID = "lora_studio"
STRENGTHS = "0.5, 0.7, 0.8, 1.0"
SEEDS = "1, 2, 3, 4, 5"


# ---------------------------------------------------------------------------------------------------------------
# messages


def _e(s) -> str:
    return html.escape(str(s), quote=True)


def error_html(e: BaseException) -> str:
    """What happened and what to do, for any exception a handler lets through."""
    try:
        from ..formats.errors import LoraError
    except ImportError:  # pragma: no cover - the formats package is part of the extension
        LoraError = UiError
    from ..train.trainer import TrainingError

    if isinstance(e, (UiError, TrainConfigError, LoraError, TrainingError)):
        msg = str(e)
    elif isinstance(e, FileNotFoundError):
        msg = (f"A file or folder was not found: {e.filename or e}. Check the path (it is read on the machine the "
               "WebUI runs on).")
    elif isinstance(e, PermissionError):
        msg = f"No permission to read or write {e.filename or e}. Choose a folder the WebUI may write to."
    elif isinstance(e, OSError):
        msg = f"A file could not be read or written: {e}. Check the path and the free disk space."
    elif isinstance(e, (ValueError, KeyError)):
        msg = f"{e}. Check the value and try again."
    else:
        traceback.print_exc()
        msg = (f"Something unexpected went wrong ({type(e).__name__}: {e}). This is a bug in LoRA Studio; the "
               "details are in the WebUI's console. Please report them.")
    return f'<div class="ls-msg ls-error" role="alert"><b>Error:</b> {_e(msg).replace(chr(10), "<br>")}</div>'


def ok_html(msg: str) -> str:
    return f'<div class="ls-msg ls-ok" role="status">{_e(msg)}</div>'


def info_html(msg: str) -> str:
    return f'<div class="ls-msg ls-info" role="status">{_e(msg)}</div>'


def warn_html(msg: str) -> str:
    return f'<div class="ls-msg ls-warn" role="status">{_e(msg)}</div>'


def guarded(status):
    """Wrap a handler so an exception becomes an error message in ``status`` (also for generator handlers)."""
    def deco(fn):
        if inspect.isgeneratorfunction(fn):
            @functools.wraps(fn)
            def gen(*args, **kwargs):
                try:
                    yield from fn(*args, **kwargs)
                except Exception as e:  # shown in the tab; the queue and the WebUI keep running
                    yield {status: error_html(e)}
            return gen

        @functools.wraps(fn)
        def call(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except Exception as e:  # shown in the tab; the queue and the WebUI keep running
                return {status: error_html(e)}
        return call
    return deco


# ---------------------------------------------------------------------------------------------------------------
# the source model


FAMILY_NAMES = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL"}


def model_mismatches(info: dict, jobs: list[dict]) -> list[str]:
    """Waiting or running jobs queued while another checkpoint was loaded."""
    out = []
    if not info.get("loaded"):
        return out
    for j in jobs:
        m = j.get("model") or {}
        if j["status"] not in ("queued", "interrupted", "running") or not m.get("name"):
            continue
        if not same_model(m, info):
            out.append(f"Job '{j['name']}' was queued with {m.get('name')} [{m.get('hash') or '?'}], but "
                       f"{info.get('name')} [{info.get('hash') or '?'}] is loaded now: it will train on the loaded "
                       "model. Load the other checkpoint first if that is not what you want.")
    return out


IMPORTED = "Imported config"  # (the preset box's entry while the form holds an imported config's values)


def preset_hint(info: dict, preset: str | None) -> str | None:
    """The form holds another model family's preset (the checkpoint changed after the page was built)."""
    if not info.get("loaded") or not preset or preset not in PRESETS:
        return None
    want = preset_for_family(info.get("family"), info.get("parameterization"))
    if preset == want or preset.split(" ")[0] == want.split(" ")[0]:  # (SD1.5 style is fine on SD1.5)
        return None
    fam = FAMILY_NAMES.get(info.get("family"), info.get("family") or "?")
    return (f"The Parameters tab holds the '{preset}' preset's settings, but {fam} is loaded: choose the '{want}' "
            "preset there (it fills in the size and settings that model wants), or keep yours if you chose them.")


def model_html(info: dict, jobs: list[dict] | None = None, preset: str | None = None) -> str:
    if info.get("problem"):  # a model is loaded but cannot be trained here (--lowvram, Forge)
        body = f'<span class="ls-bad">Training is not available:</span> {_e(info["problem"])}'
    elif not info.get("loaded"):
        body = ('<span class="ls-bad">No checkpoint is loaded.</span> Choose one in the WebUI\'s checkpoint list; '
                "training uses the model that is loaded.")
    else:
        fam = FAMILY_NAMES.get(info.get("family"), info.get("family") or "?")
        param = {"eps": "epsilon", "v": "v"}.get(info.get("parameterization"), info.get("parameterization"))
        bits = [f"<b>{_e(info.get('name'))}</b>", f"hash {_e(info.get('hash') or 'unknown')}", _e(fam),
                f"{_e(param)} prediction" if param else ""]
        if info.get("dtype"):
            bits.append(f"{_e(info['dtype'])} on {_e(info.get('device') or '?')}")
        body = "Trains on the loaded checkpoint: " + " &middot; ".join(b for b in bits if b)
    hint = preset_hint(info, preset)
    warn = "".join(f'<div class="ls-msg ls-warn" role="alert">{_e(w)}</div>'
                   for w in model_mismatches(info, jobs or []) + ([hint] if hint else []))
    return f'<div class="ls-model">{body}</div>{warn}'


# ---------------------------------------------------------------------------------------------------------------
# jobs


def fmt_eta(s) -> str:
    if s is None:
        return ""
    s = int(max(0, s))
    if s >= 3600:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s}s"


def _queued_at(j: dict) -> str:
    created = j.get("created")
    return time.strftime("%b %d %H:%M", time.localtime(created)) if created else ""


def job_label(j: dict) -> str:
    # no status in it: a label that changes as the job runs would make every poll rewrite the selection, and a
    # poll that started before the user picked another job would then put the old one back. The time it was
    # queued tells apart the runs of one name in a long history.
    when = _queued_at(j)
    return f"{j['name']}{' · ' + when if when else ''} [{j['id']}]"


_ID_RE = re.compile(r"\[([0-9a-f]+)\]\s*$")


def job_id_of(label: str | None) -> str | None:
    m = _ID_RE.search(label or "")
    return m.group(1) if m else None


STATUS_WORDS = {"queued": "waiting", "running": "training", "done": "finished", "cancelled": "cancelled",
                "failed": "failed", "interrupted": "waiting (interrupted, resumes)"}


def _continued(jobs: list[dict]) -> dict[str, dict]:
    """{job id: the job it continues}. A resume from the tab is a new job whose resume file is the state an earlier
    job kept (the newest such one: a resumed job cancelled again keeps its state under the same name). Indexed once
    per table: the table is drawn on every poll and the list keeps every finished job."""
    by_state: dict[str, list[dict]] = {}
    for o in jobs:
        if o.get("resume_state"):
            by_state.setdefault(o["resume_state"], []).append(o)
    out = {}
    for j in jobs:
        before = [o for o in by_state.get((j.get("config") or {}).get("resume"), ())
                  if o is not j and (o.get("created") or 0) <= (j.get("created") or 0)]
        if before:
            out[j["id"]] = max(before, key=lambda o: o.get("created") or 0)
    return out


def jobs_table_html(jobs: list[dict], selected: str | None = None) -> str:
    active = any(j["status"] in ("queued", "running", "interrupted") for j in jobs)
    if not jobs:
        return (f'<div class="ls-jobs" data-active="{int(active)}"><p class="ls-muted">No jobs yet. Set up the '
                "dataset and press Train.</p></div>")
    rows = []
    waiting = 0
    continues = _continued(jobs)
    for j in jobs:
        origin = continues.get(j["id"])
        cont = (f'<br><span class="ls-muted">continues {_e(origin["name"])} [{_e(origin["id"])}]</span>'
                if origin is not None else "")
        pos = ""
        if j["status"] in ("queued", "interrupted"):
            waiting += 1
            pos = str(waiting)
        prog = f"{j['step']}/{j['total']}" if j["total"] else ""
        loss = f"{j['avg_loss']:.4f}" if j.get("avg_loss") is not None else ""
        eta = fmt_eta(j.get("eta_s")) if j["status"] == "running" else ""
        sel = ' class="ls-selected" aria-current="true"' if j["id"] == selected else ""
        rows.append(f"<tr{sel}><td>{pos}</td><td>{_e(j['name'])}{cont}</td><td>{_e(_queued_at(j))}</td>"
                    f'<td><span class="ls-status ls-st-{_e(j["status"])}">{_e(STATUS_WORDS.get(j["status"], j["status"]))}'
                    f"</span></td><td>{prog}</td><td>{loss}</td><td>{eta}</td></tr>")
    return (f'<div class="ls-jobs" data-active="{int(active)}"><table class="ls-table"><caption>Jobs (one trains at '
            "a time; the list is kept when the WebUI restarts)</caption><thead><tr>"
            '<th scope="col">Next</th><th scope="col">Name</th><th scope="col">Queued</th><th scope="col">Status</th><th scope="col">Steps</th>'
            '<th scope="col">Loss</th><th scope="col">Time left</th></tr></thead><tbody>' + "".join(rows)
            + "</tbody></table></div>")


def job_progress_html(j: dict | None) -> str:
    if j is None:
        return '<div class="ls-progress"><p class="ls-muted">No job selected.</p></div>'
    pct = 100.0 * j["step"] / j["total"] if j["total"] else 0.0
    parts = []
    if j["total"]:
        parts.append(f"step {j['step']} of {j['total']} ({pct:.0f}%)")
    if j.get("epochs"):
        parts.append(f"epoch {j['epoch']} of {j['epochs']}")
    if j.get("loss") is not None:
        parts.append(f"loss {j['loss']:.4f} (average {j['avg_loss']:.4f})" if j.get("avg_loss") is not None
                     else f"loss {j['loss']:.4f}")
    if j.get("lr") is not None:
        parts.append(f"learning rate {j['lr']:.2e}")
    if j["status"] == "running" and j.get("eta_s") is not None:
        parts.append(f"about {fmt_eta(j['eta_s'])} left")
    head = f"<b>{_e(j['name'])}</b>: {_e(STATUS_WORDS.get(j['status'], j['status']))}"
    msg = ""
    if j["status"] == "failed":
        why = j.get("message") or j.get("error") or "unknown error"
        if "out of memory" in why.lower():
            why += (" - The GPU ran out of memory: turn on gradient checkpointing, or lower the batch size or the "
                    "resolution, then train again.")
        msg = f'<div class="ls-msg ls-error" role="alert"><b>Training failed:</b> {_e(why)}</div>'
    elif j.get("message"):
        msg = f'<p class="ls-muted">{_e(j["message"])}</p>'
    files = ""
    if j.get("files"):
        files = "<p>Saved: " + ", ".join(_e(os.path.basename(f)) for f in j["files"]) + "</p>"
    return (f'<div class="ls-progress" data-status="{_e(j["status"])}"><p>{head}</p>'
            f'<div class="ls-pbar" role="progressbar" aria-valuemin="0" aria-valuemax="100" '
            f'aria-valuenow="{pct:.0f}"><div style="width:{pct:.1f}%"></div></div>'
            f"<p>{_e(' · '.join(parts))}</p>{msg}{files}</div>")


def job_log(j: dict | None) -> str:
    if j is None:
        return ""
    lines = []
    if j.get("error"):
        lines.append(f"Error: {j['error']}")
    for n in j.get("notes", [])[-30:]:
        if n.startswith("Traceback"):
            continue  # the full trace is in the console; the message above says what happened
        lines.append(f"- {n}")
    return "\n".join(lines)


def smooth(values: list[float], weight: float = 0.9) -> list[float]:
    """TensorBoard-style exponential moving average with bias correction."""
    out, last, n = [], 0.0, 0
    for v in values:
        n += 1
        last = last * weight + (1 - weight) * v
        out.append(last / (1 - weight ** n))
    return out


def render_loss_png(losses: list, path: str, title: str = "", val_losses: list | None = None) -> str:
    """Raw and smoothed loss over steps as a PNG (matplotlib's Agg canvas: no global backend change), with the
    validation loss (held-out images, fixed timesteps and noise) as points when there is one."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(6.4, 2.8), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(111)
    steps = [s for s, _ in losses]
    vals = [v for _, v in losses]
    ax.plot(steps, vals, color="#f59e0b", alpha=0.35, linewidth=1, label="loss")
    ax.plot(steps, smooth(vals), color="#c2410c", linewidth=2, label="smoothed")
    if val_losses:
        ax.plot([s for s, _ in val_losses], [v for _, v in val_losses], color="#2563eb", marker="o",
                markersize=4, linewidth=1.5, label="validation")
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # (steps are whole: no 2.5 on a short run)
    ax.set_ylabel("loss")
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp.png"
    fig.savefig(tmp)
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------------------------------------------------
# results grid


def gallery_columns(n_seeds: int, about: int = 6) -> int:
    """Thumbnails per gallery line: whole (epoch, strength) rows of seeds, about ``about`` of them (one column per
    seed made two seeds two posters, 2 of 16 pictures in view; more made the captions unreadable)."""
    n = max(1, int(n_seeds))
    return n * max(1, round(about / n))


def grid_index(idx: int, n_strengths: int, n_seeds: int) -> tuple[int, int, int]:
    """Gallery index -> (file, strength, seed) indices; the gallery lists files, then strengths, then seeds."""
    per_file = n_strengths * n_seeds
    return idx // per_file, (idx % per_file) // n_seeds, idx % n_seeds


# ---------------------------------------------------------------------------------------------------------------
# the tab


SETTING_KEYS = [f.key for f in FIELDS] + list(PATH_KEYS)
COLUMNS = (("network", "length", "lr", "captions"), ("batch", "optimizer", "precision", "advanced"))
WIDE_KINDS = ("text", "args")


def _component(f, value):
    common = dict(label=f.label, info=f.info, elem_id=f"lora_studio_{f.key}")
    if f.kind not in WIDE_KINDS:
        common["min_width"] = 180
    if f.kind == "bool":
        return gr.Checkbox(value=bool(value), **common)
    if f.kind == "choice":
        v = value if value in f.choices or (f.custom and value) else f.choices[0]
        return gr.Dropdown(choices=list(f.choices), value=v, allow_custom_value=f.custom, **common)
    if f.kind == "int":
        # (no gradio minimum: its check runs before the handler and shows a toast that names no field, and a
        # Train click's progress bar would wait for a job that never comes; collect_config names the field)
        return gr.Number(value=value, precision=0, **common)
    if f.kind == "float":
        return gr.Number(value=value, step=0.00001 if "lr" in f.key else 0.01, **common)
    lines = 3 if f.key == "ui_extra_toml" else (2 if f.key == "ui_sample_prompt" else 1)
    return gr.Textbox(value=value if value is not None else "", lines=lines, **common)


def _split_settings(args) -> tuple[dict, dict]:
    vals = dict(zip(SETTING_KEYS, args))
    ui_values = {k: vals[k] for k in SETTING_KEYS if k in FIELD_BY_KEY}
    paths = {k: (str(vals[k]).strip() if vals[k] is not None else "") for k in PATH_KEYS}
    return ui_values, paths


def _weight_bytes(info: dict) -> int | None:
    sizes = {"float16": 2, "bfloat16": 2, "float32": 4, "float8_e4m3fn": 1, "float8_e5m2": 1}
    return sizes.get(info.get("dtype") or "")


def _default_prompt(train_dir: str) -> str:
    """'svs bear' from the first `N_svs bear` folder (what the folder captions say)."""
    try:
        for sub in sorted(os.listdir(train_dir)):
            parsed = parse_folder_name(sub)
            if parsed and parsed[0] >= 1 and os.path.isdir(os.path.join(train_dir, sub)) and parsed[1].strip():
                return parsed[1].strip()
    except OSError:
        pass
    return ""


def build_tab(backend) -> gr.Blocks:
    """The tab as a standalone Blocks (``gr.Blocks(analytics_enabled=False)``). ``backend`` implements
    ``lib_lora.ui.backend.Backend``."""
    info0 = backend.model_info()
    preset0 = preset_for_family(info0.get("family"), info0.get("parameterization"))
    defaults = form_defaults(preset0)
    comps: dict[str, gr.components.Component] = {}

    with gr.Blocks(analytics_enabled=False, title=TAB_TITLE) as ui:
        with gr.Column(elem_id="lora_studio_root", elem_classes=["lora-studio"]):
            with gr.Row(elem_classes=["ls-header"]):
                model_box = gr.HTML(model_html(info0, backend.jobs()), elem_id="lora_studio_model")
                model_refresh = gr.Button("Refresh model", elem_id="lora_studio_model_refresh", size="sm",
                                          scale=0, min_width=140)
            queue_note = backend.queue_problem()
            if queue_note:
                gr.HTML(f'<div class="ls-msg ls-warn" role="alert">{_e(queue_note)}</div>')

            with gr.Tabs(elem_id="lora_studio_tabs"):
                # ================================================================ dataset
                with gr.Tab("Dataset", id="ls_dataset", elem_id="lora_studio_tab_dataset"):
                    with gr.Row():
                        comps["train_data_dir"] = gr.Textbox(
                            label="Training folder", elem_id="lora_studio_train_dir", scale=3,
                            placeholder="/path/to/dataset/img",
                            info="The folder that holds `repeats_trigger class` folders, e.g. img/ with 10_svs bear/ "
                                 "inside (not the image folder itself).")
                        comps["reg_data_dir"] = gr.Textbox(
                            label="Regularisation folder (optional)", elem_id="lora_studio_reg_dir", scale=3,
                            placeholder="/path/to/dataset/reg",
                            info="The folder that holds `repeats_class` folders, e.g. reg/ with 1_bear/ inside.")
                        check_btn = gr.Button("Check dataset", variant="primary", elem_id="lora_studio_check",
                                              scale=1, min_width=140)
                    doctor_box = gr.HTML(info_html("Enter the training folder and press Check dataset: the report "
                                                   "counts images, repeats, captions and steps before anything "
                                                   "trains."), elem_id="lora_studio_doctor")

                # ================================================================ dataset helper
                with gr.Tab("Dataset helper", id="ls_helper", elem_id="lora_studio_tab_helper"):
                    gr.Markdown("Make the folder layout the trainer expects from a plain folder of pictures. Your "
                                "pictures are **copied**; the originals are never moved or changed.")
                    with gr.Accordion("1. Folder layout", open=True, elem_id="lora_studio_h_layout_acc"):
                        with gr.Row():
                            h_src = gr.Textbox(label="Folder with your images", elem_id="lora_studio_h_src",
                                               info="A plain folder of pictures (not searched recursively).")
                            h_dest = gr.Textbox(label="New dataset folder", elem_id="lora_studio_h_dest",
                                                info="Created if missing; img/ and reg/ are made inside it.")
                        with gr.Row():
                            h_trigger = gr.Textbox(label="Trigger word", elem_id="lora_studio_h_trigger",
                                                   info="A rare word the LoRA learns, e.g. svs.")
                            h_class = gr.Textbox(label="Class word", elem_id="lora_studio_h_class",
                                                 info="What the subject is, e.g. bear, woman, watercolor style.")
                            h_repeats = gr.Number(label="Repeats", value=10, precision=0,
                                                  elem_id="lora_studio_h_repeats",
                                                  info="Each image is seen this many times per epoch.")
                            h_reg_repeats = gr.Number(label="Regularisation repeats", value=1, precision=0,
                                                      elem_id="lora_studio_h_reg_repeats",
                                                      info="1 is usual; the trainer balances the count anyway.")
                        h_create = gr.Button("Create layout (copy images)", variant="primary",
                                             elem_id="lora_studio_h_create")
                    with gr.Accordion("2. Captions", open=True, elem_id="lora_studio_h_captions_acc"):
                        with gr.Row():
                            h_method = gr.Radio(["BLIP", "DeepBooru"], value="BLIP", label="Captioner",
                                                elem_id="lora_studio_h_method",
                                                info="BLIP writes a sentence, DeepBooru anime-style tags.")
                            h_overwrite = gr.Checkbox(label="Replace existing captions", value=False,
                                                      elem_id="lora_studio_h_overwrite")
                            h_put_trigger = gr.Checkbox(label="Put the trigger word first", value=True,
                                                        elem_id="lora_studio_h_put_trigger")
                        with gr.Row():
                            h_caption_all = gr.Button("Caption all images", elem_id="lora_studio_h_caption_all")
                            h_insert = gr.Button("Insert trigger word into all captions",
                                                 elem_id="lora_studio_h_insert")
                            h_reload = gr.Button("Reload image list", elem_id="lora_studio_h_reload")
                        with gr.Row():
                            with gr.Column(scale=1):
                                h_image = gr.Dropdown(label="Image", choices=[], elem_id="lora_studio_h_image",
                                                      info="An image of the training folder.")
                                with gr.Row():
                                    h_prev = gr.Button("Previous", size="sm", elem_id="lora_studio_h_prev")
                                    h_next = gr.Button("Next", size="sm", elem_id="lora_studio_h_next")
                                h_preview = gr.Image(label="Preview", interactive=False, height=240, type="filepath",
                                                     elem_id="lora_studio_h_preview")
                            with gr.Column(scale=1):
                                h_caption = gr.Textbox(label="Caption", lines=4, elem_id="lora_studio_h_caption",
                                                       info="Saved as a .txt file next to the copy. Empty = the "
                                                            "folder's tokens are the caption.")
                                h_save = gr.Button("Save caption", elem_id="lora_studio_h_save")
                                h_shown = gr.State({})  # {"path", "text"}: the caption as shown, to keep edits
                    with gr.Accordion("3. Regularisation images", open=False, elem_id="lora_studio_h_reg_acc"):
                        with gr.Row():
                            h_reg_prompt = gr.Textbox(label="Class prompt", elem_id="lora_studio_h_reg_prompt",
                                                      info="The class without your subject, e.g. 'a photo of a bear'.")
                            h_reg_count = gr.Number(label="Number of images", value=50, precision=0,
                                                    elem_id="lora_studio_h_reg_count",
                                                    info="Default: 5 per training image.")
                            h_reg_seed = gr.Number(label="First seed", value=1, precision=0,
                                                   elem_id="lora_studio_h_reg_seed")
                            h_reg_w = gr.Number(label="Width", value=512, precision=0,
                                                elem_id="lora_studio_h_reg_w")
                            h_reg_h = gr.Number(label="Height", value=512, precision=0,
                                                elem_id="lora_studio_h_reg_h")
                        h_reg_dir = gr.Textbox(label="Regularisation image folder", elem_id="lora_studio_h_reg_dir",
                                               info="An `N_class` folder, filled in by Create layout.")
                        with gr.Row():
                            h_reg_go = gr.Button("Generate regularisation images with the loaded model",
                                                 elem_id="lora_studio_h_reg_go", scale=3)
                            h_reg_stop = gr.Button("Stop", elem_id="lora_studio_h_reg_stop", scale=1)
                    h_status = gr.HTML(elem_id="lora_studio_h_status")

                # ================================================================ parameters
                with gr.Tab("Parameters", id="ls_params", elem_id="lora_studio_tab_params"):
                    with gr.Row():
                        preset = gr.Dropdown(choices=list(PRESETS), value=preset0, label="Preset",
                                             elem_id="lora_studio_preset", scale=1,
                                             info="Fills every field below with tried values; edit them after.")
                        preset_note = gr.Markdown(PRESET_NOTES[preset0], elem_id="lora_studio_preset_note")
                    with gr.Row():
                        for col_groups in COLUMNS:
                            with gr.Column():
                                for gkey in col_groups:
                                    with gr.Accordion(dict(GROUPS)[gkey], open=gkey not in ("advanced", "captions"),
                                                      elem_id=f"lora_studio_group_{gkey}"):
                                        fields = [f for f in FIELDS if f.group == gkey]
                                        with gr.Row():  # short fields wrap two or three to a line
                                            for f in fields:
                                                if f.kind not in WIDE_KINDS:
                                                    comps[f.key] = _component(f, defaults.get(f.key))
                                        for f in fields:
                                            if f.kind in WIDE_KINDS:
                                                comps[f.key] = _component(f, defaults.get(f.key))
                    vram_box = gr.HTML(elem_id="lora_studio_vram")
                    with gr.Accordion("Import / export sd-scripts TOML", open=False, elem_id="lora_studio_toml_acc"):
                        toml_text = gr.Textbox(label="Training config (TOML)", lines=12, elem_id="lora_studio_toml",
                                               info="sd-scripts' train_network.py --config_file format; [sections] "
                                                    "are merged as sd-scripts does.")
                        with gr.Row():
                            toml_file = gr.File(label="Or load a .toml file (or a kohya_ss GUI .json preset)",
                                                file_types=[".toml", ".json"], type="file", height=120,
                                                elem_id="lora_studio_toml_file")
                            toml_download = gr.File(label="Exported file", interactive=False, height=120,
                                                    elem_id="lora_studio_toml_download")
                        with gr.Row():
                            import_btn = gr.Button("Import into the form", elem_id="lora_studio_import")
                            export_btn = gr.Button("Export the form", elem_id="lora_studio_export")
                        toml_status = gr.HTML(elem_id="lora_studio_toml_status")

                # ================================================================ train
                with gr.Tab("Train", id="ls_train", elem_id="lora_studio_tab_train"):
                    with gr.Row():
                        comps["output_name"] = gr.Textbox(label="LoRA name", value="my_lora", scale=1,
                                                          elem_id="lora_studio_output_name",
                                                          info="File name; use it as <lora:name:1> in prompts.")
                        comps["output_dir"] = gr.Textbox(label="Output folder", value=backend.default_output_dir(),
                                                         scale=2, elem_id="lora_studio_output_dir",
                                                         info="Where the LoRA files are written (your Lora folder "
                                                              "makes them appear as cards).")
                    with gr.Row():
                        task_id = gr.Textbox(visible=False, elem_id="lora_studio_task_id")
                        train_btn = gr.Button("Train", variant="primary", elem_id="lora_studio_train")
                        queue_btn = gr.Button("Add to queue", elem_id="lora_studio_queue")
                        cancel_btn = gr.Button("Cancel selected job", variant="stop", elem_id="lora_studio_cancel")
                    train_status = gr.HTML(elem_id="lora_studio_train_status")
                    with gr.Row():
                        with gr.Column(scale=3):
                            gr.HTML('<div id="lora_studio_progressbar" class="ls-progressbar-anchor"></div>')
                            progress_box = gr.HTML(job_progress_html(None), elem_id="lora_studio_progress")
                            loss_plot = gr.Image(label="Loss (raw and smoothed)", interactive=False, type="filepath",
                                                 elem_id="lora_studio_loss", height=280)
                            samples = gr.Gallery(label="Samples of each saved epoch", columns=4, height=220,
                                                 elem_id="lora_studio_samples", preview=False)
                        with gr.Column(scale=2):
                            jobs_box = gr.HTML(jobs_table_html(backend.jobs()), elem_id="lora_studio_jobs")
                            job_select = gr.Dropdown(label="Selected job", choices=[], elem_id="lora_studio_job",
                                                     info="The job the buttons and the progress refer to.")
                            with gr.Row():
                                up_btn = gr.Button("Move up", size="sm", elem_id="lora_studio_up")
                                down_btn = gr.Button("Move down", size="sm", elem_id="lora_studio_down")
                                remove_btn = gr.Button("Remove", size="sm", elem_id="lora_studio_remove")
                                resume_btn = gr.Button("Resume", size="sm", elem_id="lora_studio_resume")
                                clear_btn = gr.Button("Clear finished", size="sm", elem_id="lora_studio_clear")
                            with gr.Row():
                                # (read by javascript/lora_studio.js, which polls while it is ticked)
                                gr.Checkbox(label="Update automatically", value=True, elem_id="lora_studio_auto")
                                refresh_btn = gr.Button("Refresh", size="sm", elem_id="lora_studio_refresh")
                            log_box = gr.Textbox(label="Job messages", lines=6, max_lines=12, interactive=False,
                                                 elem_id="lora_studio_log")
                    poll_state = gr.State({})

                # ================================================================ results
                with gr.Tab("Results", id="ls_results", elem_id="lora_studio_tab_results") as results_tab:
                    with gr.Row():
                        r_job = gr.Dropdown(label="Training job", choices=[], elem_id="lora_studio_r_job", scale=3,
                                            info="A finished (or cancelled) job with saved files.")
                        r_reload = gr.Button("Reload", size="sm", elem_id="lora_studio_r_reload", scale=0,
                                             min_width=100)
                    r_files = gr.CheckboxGroup(label="Saved epochs to compare", choices=[],
                                               elem_id="lora_studio_r_files")
                    with gr.Row():
                        r_prompt = gr.Textbox(label="Prompt", elem_id="lora_studio_r_prompt", scale=3,
                                              info="Use the trigger word; the LoRA tag is added for you.")
                        r_negative = gr.Textbox(label="Negative prompt", elem_id="lora_studio_r_negative", scale=2)
                    with gr.Row():
                        r_strengths = gr.Textbox(label="Strengths", value=STRENGTHS, elem_id="lora_studio_r_strengths",
                                                 info="LoRA weights to try, separated by commas.")
                        r_seeds = gr.Textbox(label="Seeds", value=SEEDS, elem_id="lora_studio_r_seeds",
                                             info="At least 5 seeds show what is luck and what is the LoRA.")
                        r_w = gr.Number(label="Width", value=512, precision=0, elem_id="lora_studio_r_w")
                        r_h = gr.Number(label="Height", value=512, precision=0, elem_id="lora_studio_r_h")
                        r_steps = gr.Number(label="Sampling steps", value=20, precision=0,
                                            elem_id="lora_studio_r_steps")
                    with gr.Row():
                        r_render = gr.Button("Render grid", variant="primary", elem_id="lora_studio_r_render",
                                             scale=3)
                        r_stop = gr.Button("Stop", elem_id="lora_studio_r_stop", scale=1)
                    r_status = gr.HTML(elem_id="lora_studio_r_status")
                    r_gallery = gr.Gallery(label="Click the image you like best", columns=5, height=640,
                                           elem_id="lora_studio_r_gallery", preview=False)
                    with gr.Row():
                        r_pick_file = gr.Dropdown(label="LoRA file", choices=[], elem_id="lora_studio_r_pick_file")
                        r_pick_strength = gr.Dropdown(label="Strength", choices=[],
                                                      elem_id="lora_studio_r_pick_strength")
                        r_pick_seed = gr.Dropdown(label="Seed", choices=[], elem_id="lora_studio_r_pick_seed")
                        r_use = gr.Button("Use this one", variant="primary", elem_id="lora_studio_r_use")
                    r_use_status = gr.HTML(elem_id="lora_studio_r_use_status")
                    with gr.Accordion("The whole grid as one labelled picture", open=False,
                                      elem_id="lora_studio_r_grid_acc"):
                        r_grid = gr.Image(label="Grid: a row per epoch and strength, a column per seed",
                                          interactive=False, type="filepath", elem_id="lora_studio_r_grid")
                    r_tag = gr.Textbox(visible=False, elem_id="lora_studio_r_tag")
                    r_state = gr.State({})

        settings = [comps[k] for k in SETTING_KEYS]

        # ------------------------------------------------------------------------ model
        def refresh_model(preset_name):
            return model_html(backend.model_info(), backend.jobs(), preset_name)

        model_refresh.click(refresh_model, [preset], model_box, queue=False)

        # ------------------------------------------------------------------------ doctor
        @guarded(doctor_box)
        def run_doctor(*args):
            ui_values, paths = _split_settings(args)
            if not paths["train_data_dir"]:
                return info_html("Enter the training folder first.")
            cfg, _ = collect_config(ui_values, paths)
            cfg.setdefault("output_dir", paths["output_dir"] or backend.default_output_dir())
            info = backend.model_info()
            rep = doc.check(cfg, info.get("family"), weight_bytes=_weight_bytes(info),
                            device_type=info.get("device"))
            return doc.to_html(rep)

        check_btn.click(run_doctor, settings, doctor_box)
        comps["train_data_dir"].submit(run_doctor, settings, doctor_box)
        comps["train_data_dir"].blur(run_doctor, settings, doctor_box)
        comps["reg_data_dir"].submit(run_doctor, settings, doctor_box)
        comps["reg_data_dir"].blur(run_doctor, settings, doctor_box)

        # ------------------------------------------------------------------------ VRAM on the parameters tab
        vram_keys = ["train_batch_size", "resolution", "mixed_precision", "gradient_checkpointing", "network_dim",
                     "optimizer_type", "text_encoder_lr", "unet_lr", "network_train_unet_only", "fp8_base",
                     "network_module", "network_args", "ui_extra_toml"]

        @guarded(vram_box)
        def vram(*args):
            v = dict(zip(vram_keys, args))
            from ..train.config import parse_resolution
            try:
                (w, h), _ = parse_resolution(str(v["resolution"] or "512"))
            except Exception:
                return info_html("Write the resolution as 512 or 512,768 to see the memory estimate.")
            info = backend.model_info()
            try:  # (fp8_base_unet has no field: it can only come from the other-keys box)
                extra, _ = collect_config({"ui_extra_toml": v["ui_extra_toml"]})
            except Exception:  # (bad TOML: the doctor and Train say so)
                extra = {}
            fp8 = (("unet", "te") if v["fp8_base"] or extra.get("fp8_base")
                   else ("unet",) if extra.get("fp8_base_unet") else ())
            est = doc.estimate_vram(info.get("family"), batch=int(v["train_batch_size"] or 1), width=w, height=h,
                                    mixed_precision=v["mixed_precision"], weight_bytes=_weight_bytes(info),
                                    gradient_checkpointing=bool(v["gradient_checkpointing"]),
                                    dim=int(v["network_dim"] or 4), train_unet=bool(v["unet_lr"]),
                                    train_te=bool(v["text_encoder_lr"]) and not v["network_train_unet_only"],
                                    optimizer=v["optimizer_type"], fp8=fp8,
                                    full=doc.trains_full(v["network_module"],
                                                         str(v["network_args"] or "").split()))
            cpu = " " + doc.cpu_vram_note(info.get("family")) if str(info.get("device") or "").startswith("cpu") \
                else ""
            return (f'<p class="ls-vram"><b>Estimated VRAM: about {est.total_gb:.1f} GB</b> at the resolution, '
                    f"without larger buckets (an estimate, not a measurement). {_e(est.explanation)}. "
                    + " ".join(_e(a) for a in est.advice) + _e(cpu) + "</p>")

        vram_inputs = [comps[k] for k in vram_keys]
        for c in vram_inputs:
            c.change(vram, vram_inputs, vram_box, queue=False, show_progress="hidden")
        ui.load(vram, vram_inputs, vram_box, queue=False)

        # ------------------------------------------------------------------------ presets
        field_comps = [comps[f.key] for f in FIELDS]

        @guarded(toml_status)
        def apply_preset(name, *current):
            if name == IMPORTED:  # (set by Import: the form holds the imported values)
                return {preset_note: gr.update()}  # (an empty dict reads as one missing value in gradio 3.41)
            if name not in PRESETS:
                return {toml_status: info_html("Choose a preset from the list.")}
            vals = form_defaults(name)
            cur = dict(zip([f.key for f in FIELDS], current))
            vals["ui_sample_prompt"] = cur.get("ui_sample_prompt", "")  # the prompt is the user's, not the preset's
            out = {comps[k]: vals[k] for k in vals if k in comps}
            out[preset_note] = PRESET_NOTES[name]
            out[toml_status] = ok_html(f"Preset '{name}' applied: {PRESET_NOTES[name]}")
            return out

        preset.change(apply_preset, [preset] + field_comps, field_comps + [preset_note, toml_status])

        def follow_model(name, *current):
            """On page load: the page was built for the checkpoint loaded at start-up; a fresh form starts from the
            preset of the one loaded now (a changed form, on Refresh model, only gets a hint)."""
            info = backend.model_info()
            want = preset_for_family(info.get("family"), info.get("parameterization"))
            if not info.get("loaded") or info.get("problem") or want == name:
                return {model_box: model_html(info, backend.jobs(), name)}
            out = apply_preset(want, *current)
            out.pop(toml_status, None)
            out[preset] = want
            out[model_box] = model_html(info, backend.jobs(), want)
            return out

        followed = ui.load(follow_model, [preset] + field_comps, [preset, model_box, preset_note] + field_comps,
                           queue=False)

        # ------------------------------------------------------------------------ TOML
        def _prompt_file(cfg: dict, prompt: str) -> dict:
            if prompt.strip() and cfg.get("sample_every_n_epochs") and cfg.get("output_dir"):
                name = cfg.get("output_name") or "lora"
                cfg["sample_prompts"] = write_sample_prompts(
                    os.path.join(backend.samples_dir(cfg["output_dir"], name), f"{name}-prompts.txt"),
                    _sample_line(cfg, prompt))
            return cfg

        def _sample_line(cfg: dict, prompt: str) -> str:
            """Samples at the training size and the tab's step count unless the prompt says otherwise
            (sd-scripts' own defaults, 512 px and 30 steps, would be slow for small runs)."""
            from ..train.config import parse_resolution
            line = prompt.strip()
            (w, h), _ = parse_resolution(cfg.get("resolution") or 512)
            for flag, value in (("w", w), ("h", h), ("s", getattr(backend, "sample_steps", 20))):
                if f" --{flag} " not in f" {line} ":
                    line += f" --{flag} {value}"
            return line

        @guarded(toml_status)
        def do_export(*args):
            ui_values, paths = _split_settings(args)
            cfg, prompt = collect_config(ui_values, paths)
            cfg = _prompt_file(cfg, prompt)
            text = export_toml(cfg, model_path=backend.model_info().get("path"))
            out_dir = os.path.join(getattr(backend, "store_dir", None) or backend.default_output_dir(), "exports")
            os.makedirs(out_dir, exist_ok=True)
            path = os.path.join(out_dir, f"{cfg.get('output_name') or 'lora'}.toml")
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
            return {toml_text: text, toml_download: path,
                    toml_status: ok_html("Exported. sd-scripts reads this file the same way: "
                                         "accelerate launch train_network.py --config_file=" + path)}

        export_btn.click(do_export, settings, [toml_text, toml_download, toml_status])

        @guarded(toml_status)
        def do_import(text, file):
            from ..train.config import parse_train_config_text
            base_dir, source = None, "the pasted config"
            if file is not None:
                path = getattr(file, "name", file)
                with open(path, encoding="utf-8") as f:
                    text = f.read()
                base_dir, source = os.path.dirname(os.path.abspath(path)), os.path.basename(path)
            if not str(text or "").strip():
                return {toml_status: info_html("Paste a TOML config into the box (or choose a .toml file or a kohya_ss "
                                               "GUI .json preset) first.")}
            cfg = parse_train_config_text(text, source=source, base_dir=base_dir)
            values, paths, extra = config_to_ui(cfg)
            for k in ("train_data_dir", "reg_data_dir", "output_dir"):
                if paths[k]:
                    paths[k] = str(cfg.resolve(paths[k]))
            values["ui_extra_toml"] = extra
            if cfg.sample_prompts:
                try:
                    with open(cfg.resolve(cfg.sample_prompts), encoding="utf-8") as f:
                        values["ui_sample_prompt"] = f.read().strip()
                except OSError:
                    values["ui_sample_prompt"] = ""
            elif cfg.sample_prompt_text:  # a kohya_ss GUI preset holds the prompts themselves
                values["ui_sample_prompt"] = cfg.sample_prompt_text
            out = {comps[k]: v for k, v in values.items() if k in comps}
            out.update({comps[k]: v for k, v in paths.items() if v})
            notes = loaded_model_notes(cfg, backend.model_info()) + list(cfg.notes)
            msg = "Imported into the form." + ("" if not notes else " Notes: " + " ".join(
                f"({i + 1}) {n}" for i, n in enumerate(notes)))
            out[toml_status] = ok_html(msg)
            # (the preset box no longer names where the values came from)
            out[preset] = gr.update(choices=list(PRESETS) + [IMPORTED], value=IMPORTED)
            out[preset_note] = (f"The fields hold the values of {source}. Choosing a preset replaces them (your "
                                "sample prompt stays).")
            return out

        import_btn.click(do_import, [toml_text, toml_file], settings + [toml_status, preset, preset_note])

        # ------------------------------------------------------------------------ jobs
        def _pick(jobs, selected_label):
            ids = {j["id"]: j for j in jobs}
            sid = job_id_of(selected_label)
            if sid in ids:
                return ids[sid]
            running = [j for j in jobs if j["status"] == "running"]
            if running:
                return running[0]
            return jobs[-1] if jobs else None

        plots: dict[str, tuple[int, str]] = {}
        plot_lock = threading.Lock()

        def poll(selected_label, state, preset_name=None):
            state = dict(state or {})
            jobs = backend.jobs()
            job = _pick(jobs, selected_label)
            labels = [job_label(j) for j in jobs]
            value = job_label(job) if job else None
            out = {jobs_box: jobs_table_html(jobs, job["id"] if job else None),
                   progress_box: job_progress_html(job),
                   model_box: model_html(backend.model_info(), jobs, preset_name)}
            kept = job is not None and job["id"] == job_id_of(selected_label)
            if kept and labels != state.get("labels"):
                # the choices only: the selection this poll read may be older than what the user has picked since
                out[job_select] = gr.update(choices=labels)
            elif not kept and (labels, value) != (state.get("labels"), selected_label):
                out[job_select] = gr.update(choices=labels, value=value)
            else:
                out[job_select] = gr.update()
            state["labels"] = labels
            jid = job["id"] if job else None
            n_loss = (len(job["losses"]), len(job.get("val_losses") or [])) if job else (0, 0)
            if (jid, n_loss) != (state.get("plot_job"), state.get("n_loss")):
                if job and n_loss[0] >= 2:
                    with plot_lock:  # one render per new point, however many browser tabs poll
                        if plots.get(jid, (None,))[0] != n_loss:
                            path = os.path.join(getattr(backend, "store_dir", "."), "plots", f"{jid}.png")
                            plots[jid] = (n_loss, render_loss_png(job["losses"], path, job["name"],
                                                                  job.get("val_losses")))
                        out[loss_plot] = plots[jid][1]
                else:
                    out[loss_plot] = None
                state["plot_job"], state["n_loss"] = jid, n_loss
            else:
                out[loss_plot] = gr.update()
            n_s = len(job["samples"]) if job else 0
            if (jid, n_s) != (state.get("sample_job"), state.get("n_samples")):
                out[samples] = [(s["path"], f"epoch {s['epoch']}") for s in (job["samples"] if job else [])
                                if os.path.exists(s["path"])]
                state["sample_job"], state["n_samples"] = jid, n_s
            else:
                out[samples] = gr.update()
            text = job_log(job)
            if text != state.get("log"):
                out[log_box] = text
                state["log"] = text
            else:
                out[log_box] = gr.update()
            out[poll_state] = state
            return out

        poll_outputs = [jobs_box, progress_box, model_box, job_select, loss_plot, samples, log_box, poll_state]
        safe_poll = guarded(progress_box)(poll)
        poll_inputs = [job_select, poll_state, preset]
        refresh_btn.click(safe_poll, poll_inputs, poll_outputs, queue=False, show_progress="hidden")
        job_select.select(safe_poll, poll_inputs, poll_outputs, queue=False, show_progress="hidden")
        # (after the preset followed the model: a poll racing it drew the model line from the page's first preset)
        followed.then(safe_poll, poll_inputs, poll_outputs, queue=False)

        def releasing(fn):
            """The page started a progress bar for the task (first argument): a refused job ends it now."""
            @functools.wraps(fn)
            def run(task, *args, **kwargs):
                try:
                    return fn(task, *args, **kwargs)
                except Exception:
                    release = getattr(backend, "release_task", None)
                    if task and release is not None:
                        release(task)
                    raise
            return run

        @releasing
        def submit(task, *args, front):
            *args, preset_name = args  # (the preset the form was filled from: said when it is another model's)
            ui_values, paths = _split_settings(args)
            if not paths["train_data_dir"]:
                raise UiError("Set the training folder on the Dataset tab first.")
            paths["output_name"] = output_stem(paths["output_name"] or "")
            if not paths["output_name"]:
                raise UiError("Give the LoRA a name (LoRA name, above the Train button).")
            if re.search(r'[\\/:*?"<>|]', paths["output_name"]):
                raise UiError("The LoRA name cannot contain \\ / : * ? \" < > |. Use letters, digits, - and _.")
            if not paths["output_dir"]:  # (as Settings -> LoRA Studio says: empty = the LoRA folder)
                paths["output_dir"] = backend.default_output_dir()
            if not paths["output_dir"]:
                raise UiError("Choose the output folder the LoRA files are written to.")
            cfg, prompt = collect_config(ui_values, paths)
            if cfg.get("sample_every_n_epochs") and not prompt.strip():
                prompt = _default_prompt(paths["train_data_dir"])
            cfg = _prompt_file(cfg, prompt)
            info = backend.model_info()
            if not info.get("loaded"):
                raise UiError("No checkpoint is loaded. Load the model you want to train on first.")
            rep = doc.check(cfg, info.get("family"), weight_bytes=_weight_bytes(info), device_type=info.get("device"),
                            check_pixels=False)
            if not rep.ok:
                problems = rep.errors or ["no batches could be formed from the dataset"]
                raise UiError("The job was not queued:" + "".join(f"\n- {p}" for p in problems)
                              + "\n(See the Dataset tab's report.)")
            job = backend.submit(cfg, name=paths["output_name"], task_id=(task or None), front=front)
            jobs = backend.jobs()
            others = [j for j in jobs if j["id"] != job["id"] and j["status"] in ("queued", "running", "interrupted")]
            where = "It starts now." if not others else (
                "It runs next, after the job that is training now." if front else
                f"It waits behind {len(others)} other job(s).")
            exists = os.path.exists(os.path.join(paths["output_dir"], paths["output_name"] + ".safetensors"))
            warn = (f" Note: {paths['output_name']}.safetensors already exists in the output folder and will be "
                    "overwritten.") if exists else ""
            outside = backend.lora_folder_note(paths["output_dir"])
            warn += f" Note: {outside}." if outside else ""
            other = preset_hint(info, preset_name)
            warn += f" Note: {other}" if other else ""
            # the panel (and Cancel) stays on the job that is training; a new job is selected when it starts now
            running = next((j for j in jobs if j["status"] == "running" and j["id"] != job["id"]), None)
            shown = running or job
            return {train_status: ok_html(f"Queued '{job['name']}': {rep.total_steps} steps over {rep.epochs} "
                                          f"epoch(s). {where}{warn}"),
                    job_select: gr.update(choices=[job_label(j) for j in jobs], value=job_label(shown)),
                    jobs_box: jobs_table_html(jobs, shown["id"])}

        submit_outputs = [train_status, job_select, jobs_box]
        submit_inputs = [task_id] + settings + [preset]
        train_btn.click(guarded(train_status)(functools.partial(submit, front=True)), submit_inputs, submit_outputs,
                        _js="lora_studio_start_training")
        queue_btn.click(guarded(train_status)(functools.partial(submit, front=False)), submit_inputs, submit_outputs,
                        _js="lora_studio_start_training")

        def _refuse_while_training(what):
            # generation waits for the training job's hold on the model: say so now instead of hanging for hours
            for j in backend.jobs():
                if j["status"] == "running":
                    raise UiError(f"The model is busy training '{j['name']}' ({training_at(j)}). "
                                  f"{what} when it has finished, or cancel it on the Train tab.")

        def _selected(label):
            jid = job_id_of(label)
            if not jid:
                raise UiError("Pick a job in 'Selected job' first.")
            return jid

        @guarded(train_status)
        def do_cancel(label):
            j = backend.cancel(_selected(label))
            word = "is being cancelled; the work so far is kept as a resumable state" if j["status"] == "running" \
                else j["status"]
            return {train_status: ok_html(f"'{j['name']}' {word}."), jobs_box: jobs_table_html(backend.jobs(),
                                                                                                j["id"])}

        @guarded(train_status)
        def do_move(label, delta):
            jid = _selected(label)
            backend.move(jid, delta)
            return {jobs_box: jobs_table_html(backend.jobs(), jid), train_status: ""}

        @guarded(train_status)
        def do_remove(label):
            jid = _selected(label)
            j = backend.job(jid)
            backend.remove(jid)
            jobs = backend.jobs()
            return {train_status: ok_html(f"Removed '{j['name'] if j else jid}' from the list (its files stay)."),
                    jobs_box: jobs_table_html(jobs), job_select: gr.update(choices=[job_label(x) for x in jobs],
                                                                           value=None)}

        @guarded(train_status)
        def do_clear(label):
            removed, kept = backend.clear_finished()
            jobs = backend.jobs()
            gone = {j["id"] for j in removed}
            if not removed and not kept:
                msg = "No finished jobs to clear."
            else:
                msg = (f"Cleared {len(removed)} finished job(s) from the list (their files stay)." if removed
                       else "Nothing was cleared.")
                if kept:
                    names = ", ".join(f"'{j['name']}'" for j in kept[:3]) + (" …" if len(kept) > 3 else "")
                    msg += (f" Kept {len(kept)} that can still be resumed ({names}): select one and press Resume, "
                            "or Remove to take it off the list (its state file stays in its folder).")
            label = None if job_id_of(label) in gone else label
            return {train_status: ok_html(msg), jobs_box: jobs_table_html(jobs, job_id_of(label)),
                    job_select: gr.update(choices=[job_label(x) for x in jobs], value=label)}

        @guarded(train_status)
        @releasing
        def do_resume(task, label):
            j = backend.job(_selected(label))
            if j is None:
                raise UiError("That job is no longer in the list.")
            state = j.get("resume_state")
            if j["status"] not in ("cancelled", "failed") or not state:
                raise UiError(f"'{j['name']}' has no saved state to resume from (cancelled jobs keep one, failed "
                              "ones their newest save_state). Queue it again with Train instead.")
            if not os.path.exists(state):
                raise UiError(f"The state file of '{j['name']}' ({os.path.basename(state)}) is gone: a resume that "
                              "finished removes it, or it was moved or deleted. Queue the job again with Train.")
            cfg = dict(j["config"])
            cfg["resume"] = state
            base = re.sub(r" \(resumed\)$", "", j["name"])  # (the list tells the two rows apart)
            new = backend.submit(cfg, name=f"{base} (resumed)", task_id=(task or None), front=False)
            jobs = backend.jobs()
            at = j.get("resume_step") if j.get("resume_step") is not None else j["step"]
            return {train_status: ok_html(f"'{j['name']}' queued again as '{new['name']}'; it continues from step "
                                          f"{at}."),
                    jobs_box: jobs_table_html(jobs, new["id"]),
                    job_select: gr.update(choices=[job_label(x) for x in jobs], value=job_label(new))}

        cancel_btn.click(do_cancel, [job_select], [train_status, jobs_box])
        up_btn.click(lambda s: do_move(s, -1), [job_select], [jobs_box, train_status])
        down_btn.click(lambda s: do_move(s, 1), [job_select], [jobs_box, train_status])
        # (then the panel: it would keep showing a job no longer in the list, as nothing polls an idle queue)
        remove_btn.click(do_remove, [job_select], [train_status, jobs_box, job_select]).then(
            safe_poll, poll_inputs, poll_outputs, queue=False, show_progress="hidden")
        clear_btn.click(do_clear, [job_select], [train_status, jobs_box, job_select]).then(
            safe_poll, poll_inputs, poll_outputs, queue=False, show_progress="hidden")
        resume_btn.click(do_resume, [task_id, job_select], [train_status, jobs_box, job_select],
                         _js="lora_studio_start_training")

        # ------------------------------------------------------------------------ dataset helper
        def _image_choices(train_dir):
            imgs = dh.training_images(train_dir)
            root = os.path.abspath(train_dir)
            return [os.path.relpath(str(p), root) for p in imgs]

        def _caption_ext(ui_ext):
            ext = str(ui_ext or ".txt").strip() or ".txt"
            ext = ext if ext.startswith(".") else "." + ext
            if is_image_name("x" + ext):  # (a caption saved under it would replace the picture)
                raise UiError(f"The caption extension '{ext}' is an image type; captions are text files (.txt or "
                              ".caption). Fix it on the Parameters tab.")
            return ext

        def _keep_edit(train_dir, shown, text, ext) -> str:
            """An edited caption is saved before another image (or a caption-all / insert run) replaces it in the
            box: the edit would be lost without a word otherwise. Returns what was done ('' when nothing)."""
            path = (shown or {}).get("path")
            if not path or " ".join(str(text or "").split()) == " ".join(str(shown.get("text", "")).split()):
                return ""
            if not str(train_dir or "").strip() or not os.path.isfile(path):
                return ""
            return dh.write_caption(path, text, _caption_ext(ext)).replace("Saved the caption", "Saved your edit")

        @guarded(h_status)
        def h_do_create(src, dest, trig, cls, rep, reg_rep, ext):
            res = dh.create_layout(src, dest, trig, cls, rep, reg_rep, caption_extension=_caption_ext(ext))
            lay = res.layout
            choices = _image_choices(lay.train_data_dir)
            n = len(choices)
            # (the reg folder is given to the Dataset tab once it holds images: step 3 makes them)
            has_reg = dh.has_images(lay.reg_image_dir)
            where = (f"; regularisation folder: {lay.reg_data_dir}. Both are filled in on the Dataset tab." if has_reg
                     else " (filled in on the Dataset tab). Regularisation images are optional: step 3 below makes "
                     f"them in {lay.reg_image_dir} and fills in the regularisation folder.")
            return {h_status: ok_html(res.summary() + f" Training folder: {lay.train_data_dir}{where}"),
                    comps["train_data_dir"]: lay.train_data_dir,
                    comps["reg_data_dir"]: lay.reg_data_dir if has_reg else "",
                    h_image: gr.update(choices=choices, value=choices[0] if choices else None),
                    h_reg_dir: lay.reg_image_dir, h_reg_prompt: cls, h_reg_count: dh.default_reg_count(n)}

        h_create.click(h_do_create, [h_src, h_dest, h_trigger, h_class, h_repeats, h_reg_repeats,
                                     comps["caption_extension"]],
                       [h_status, comps["train_data_dir"], comps["reg_data_dir"], h_image, h_reg_dir, h_reg_prompt,
                        h_reg_count]).then(run_doctor, settings, doctor_box)

        @guarded(h_status)
        def h_do_reload(train_dir):
            choices = _image_choices(train_dir)
            return {h_image: gr.update(choices=choices, value=choices[0] if choices else None),
                    h_reg_count: dh.default_reg_count(len(choices)),
                    h_status: info_html(f"{len(choices)} training image(s).")}

        h_reload.click(h_do_reload, [comps["train_data_dir"]], [h_image, h_reg_count, h_status])

        @guarded(h_status)
        def h_show(train_dir, rel, ext, shown=None, text=None):
            kept = _keep_edit(train_dir, shown, text, ext) if shown is not None else ""
            out = {h_status: ok_html(kept)} if kept else {}
            if not rel:
                return {**out, h_preview: None, h_caption: "", h_shown: {}}
            path = os.path.join(os.path.abspath(train_dir), rel)
            caption = dh.read_caption(path, _caption_ext(ext))
            return {**out, h_preview: path, h_caption: caption, h_shown: {"path": path, "text": caption}}

        show_in = [comps["train_data_dir"], h_image, comps["caption_extension"]]
        show_out = [h_preview, h_caption, h_status, h_shown]
        # (picking another image, Previous and Next all change h_image: the edit of the one shown is kept first)
        h_image.change(h_show, show_in + [h_shown, h_caption], show_out)

        @guarded(h_status)
        def h_flush(train_dir, shown, text, ext):
            kept = _keep_edit(train_dir, shown, text, ext)
            return {h_status: ok_html(kept)} if kept else {}

        @guarded(h_status)
        def h_step(train_dir, rel, delta):
            choices = _image_choices(train_dir)
            i = choices.index(rel) if rel in choices else -1
            return {h_image: gr.update(choices=choices, value=choices[(i + delta) % len(choices)])}

        h_prev.click(lambda d, r: h_step(d, r, -1), [comps["train_data_dir"], h_image], [h_image, h_status])
        h_next.click(lambda d, r: h_step(d, r, 1), [comps["train_data_dir"], h_image], [h_image, h_status])

        @guarded(h_status)
        def h_do_save(train_dir, rel, text, ext):
            if not rel:
                raise UiError("Pick an image first.")
            path = os.path.join(os.path.abspath(train_dir), rel)
            said = dh.write_caption(path, text, _caption_ext(ext))
            return {h_status: ok_html(said), h_shown: {"path": path, "text": " ".join(str(text or "").split())}}

        h_save.click(h_do_save, [comps["train_data_dir"], h_image, h_caption, comps["caption_extension"]],
                     [h_status, h_shown])

        @guarded(h_status)
        def h_do_caption(train_dir, method, overwrite, put_trigger, trig, ext):
            imgs = dh.training_images(train_dir)
            if put_trigger and not str(trig or "").strip():
                raise UiError("Write the trigger word in step 1 (or untick 'Put the trigger word first').")
            trigger = dh.clean_trigger(trig) if put_trigger else ""
            made, kept, unreadable = 0, 0, []
            try:
                for i, n, img, text in dh.iter_caption(backend, imgs, method.lower(), trigger, bool(overwrite),
                                                       _caption_ext(ext)):
                    made += isinstance(text, str)
                    kept += text is None
                    if text is False:
                        unreadable.append(img.name)
                    yield {h_status: info_html(f"Captioning {i} of {n}: {img.name}")}
            except UiError as e:
                raise UiError((f"{made} image(s) were captioned before this; their captions stay. " if made else "")
                              + str(e)) from None
            skipped = (f" {len(unreadable)} file(s) cannot be read as images and were skipped: "
                       f"{', '.join(unreadable[:5])}{' ...' if len(unreadable) > 5 else ''}; remove them from the "
                       "dataset." if unreadable else "")
            said = (f"Captioned {made} image(s) with {method}" + (f"; kept {kept} existing caption(s)" if kept else "")
                    + "." + skipped)
            yield {h_status: warn_html(said) if unreadable else ok_html(said)}

        h_caption_all.click(h_flush, [comps["train_data_dir"], h_shown, h_caption, comps["caption_extension"]],
                            [h_status]).then(
            h_do_caption, [comps["train_data_dir"], h_method, h_overwrite, h_put_trigger, h_trigger,
                           comps["caption_extension"]], [h_status]).then(h_show, show_in, show_out)

        @guarded(h_status)
        def h_do_insert(train_dir, trig, ext):
            imgs = dh.training_images(train_dir)
            n = dh.insert_trigger(imgs, trig, _caption_ext(ext))
            bare = sum(1 for p in imgs if not dh.caption_path(p, _caption_ext(ext)).is_file())
            said = f"Trigger word added to {n} caption(s)"
            said += ("; the others already had it." if n < len(imgs) - bare else ".")
            if bare:
                said += (f" {bare} image(s) have no caption file: their folder's name, which holds the trigger, is "
                         "their caption.")
            return {h_status: ok_html(said)}

        h_insert.click(h_flush, [comps["train_data_dir"], h_shown, h_caption, comps["caption_extension"]],
                       [h_status]).then(
            h_do_insert, [comps["train_data_dir"], h_trigger, comps["caption_extension"]], [h_status]).then(
            h_show, show_in, show_out)

        reg_stop = threading.Event()  # (the Stop button: read between batches of images)

        @guarded(h_status)
        def h_do_reg(reg_dir, prompt, count, seed, w, h):
            _refuse_while_training("Generate the regularisation images")
            reg_stop.clear()
            q: _queue.Queue = _queue.Queue()
            result = {}

            def work():
                try:
                    result["paths"] = dh.generate_reg_images(
                        backend, reg_dir, prompt, int(count or 0), int(seed or 0), w, h,
                        on_image=lambda i, n, p: q.put((i, n)), should_stop=reg_stop.is_set)
                except Exception as e:  # handed to the UI thread below
                    result["error"] = e
                q.put(None)

            threading.Thread(target=work, daemon=True).start()
            while True:
                item = q.get()
                if item is None:
                    break
                yield {h_status: info_html(f"Generated {item[0]} of {item[1]} regularisation images...")}
            if "error" in result:
                raise result["error"]
            wrote = len(result["paths"])
            # (the next press continues the seeds: the same seeds again would make the same pictures)
            next_seed = gr.update(value=int(seed or 0) + wrote)
            if reg_stop.is_set() and wrote < int(count or 0):
                reg_root = os.path.dirname(os.path.normpath(str(reg_dir).strip()))
                yield {h_status: info_html(f"Stopped: wrote {wrote} of {int(count)} regularisation image(s) to "
                                           f"{reg_dir}. Generate adds more after them, from seed "
                                           f"{int(seed or 0) + wrote}."), h_reg_seed: next_seed,
                       **({comps["reg_data_dir"]: reg_root} if wrote else {})}
                return
            reg_root = os.path.dirname(os.path.normpath(str(reg_dir).strip()))
            yield {h_status: ok_html(f"Wrote {wrote} regularisation image(s) to {reg_dir}; the Dataset tab's "
                                     f"regularisation folder is {reg_root}. First seed is now "
                                     f"{int(seed or 0) + wrote}, so more would be new pictures."),
                   h_reg_seed: next_seed, comps["reg_data_dir"]: reg_root}

        def h_do_reg_stop():
            reg_stop.set()
            return info_html("Stopping after the current batch of images...")

        h_reg_go.click(h_do_reg, [h_reg_dir, h_reg_prompt, h_reg_count, h_reg_seed, h_reg_w, h_reg_h],
                       [h_status, h_reg_seed, comps["reg_data_dir"]]).then(run_doctor, settings, doctor_box)
        h_reg_stop.click(h_do_reg_stop, [], [h_status], queue=False)

        # ------------------------------------------------------------------------ results
        def _result_jobs():
            return [j for j in backend.jobs() if j.get("files") and any(os.path.exists(f) for f in j["files"])]

        def _file_label(path):
            return f"{describe_file(path)}: {os.path.basename(path)}"

        _row_label = row_label

        @guarded(r_status)
        def r_do_reload(current):
            jobs = _result_jobs()
            labels = [job_label(j) for j in jobs]
            value = current if current in labels else (labels[-1] if labels else None)
            msg = "" if labels else info_html("No finished job with saved files yet.")
            return {r_job: gr.update(choices=labels, value=value), r_status: msg}

        r_reload.click(r_do_reload, [r_job], [r_job, r_status])
        results_tab.select(r_do_reload, [r_job], [r_job, r_status])

        @guarded(r_status)
        def r_do_pick_job(label):
            j = backend.job(job_id_of(label)) if label else None
            if j is None:
                return {r_files: gr.update(choices=[], value=[])}
            files = [f for f in j["files"] if os.path.exists(f)]
            labels = [_file_label(f) for f in files]
            cfg = j["config"]
            prompt = ""
            if cfg.get("sample_prompts") and os.path.exists(cfg["sample_prompts"]):
                with open(cfg["sample_prompts"], encoding="utf-8") as f:
                    prompt = (f.readline().split(" --")[0]).strip()
            if not prompt and cfg.get("train_data_dir"):
                prompt = _default_prompt(cfg["train_data_dir"])
            reso = str(cfg.get("resolution") or "512").split(",")
            w = int(reso[0])
            h = int(reso[1]) if len(reso) > 1 else w
            return {r_files: gr.update(choices=labels, value=labels), r_prompt: prompt, r_w: w, r_h: h,
                    r_status: ""}

        r_job.change(r_do_pick_job, [r_job], [r_files, r_prompt, r_w, r_h, r_status])

        grid_stop = threading.Event()  # (the Stop button: read between rows)

        @guarded(r_status)
        def r_do_render(label, file_labels, prompt, negative, strengths_text, seeds_text, w, h, steps):
            j = backend.job(job_id_of(label)) if label else None
            if j is None:
                raise UiError("Choose a training job first (press Reload if the list is empty).")
            by_label = {_file_label(f): f for f in j["files"]}
            files = [by_label[x] for x in (file_labels or []) if x in by_label]
            if not files:
                raise UiError("Tick at least one saved epoch to compare.")
            w, h = image_size(w, h)
            if not 1 <= int(steps or 20) <= 1000:
                raise UiError(f"Sampling steps {int(steps)} is out of range: use 1 to 1000.")
            strengths = parse_numbers(strengths_text, float, "strengths")
            seeds = parse_numbers(seeds_text, int, "seeds")
            if not str(prompt or "").strip():
                raise UiError("Write a prompt (with the trigger word) to render.")
            problem = prompt_tags_problem(prompt, negative)
            if problem:
                raise UiError(problem[0].upper() + problem[1:] + ".")
            _refuse_while_training("Render the grid")
            grid_stop.clear()
            total = len(files) * len(strengths)
            q: _queue.Queue = _queue.Queue()
            result = {}

            def work():
                try:
                    result["images"] = backend.render_grid(files, strengths, seeds, prompt, negative or "",
                                                           int(w or 512), int(h or 512), int(steps or 20),
                                                           progress=lambda d, t: q.put((d, t)),
                                                           should_stop=grid_stop.is_set)
                except Exception as e:  # handed to the UI thread below
                    result["error"] = e
                q.put(None)

            threading.Thread(target=work, daemon=True).start()
            yield {r_status: info_html(f"Rendering {total} row(s) of {len(seeds)} images at {int(w or 512)}x"
                                       f"{int(h or 512)}, {int(steps or 20)} steps each... (Stop ends it after the "
                                       "current row)")}
            while True:
                item = q.get()
                if item is None:
                    break
                yield {r_status: info_html(f"Rendered {item[0]} of {item[1]} row(s)...")}
            stopped = result.get("error") if isinstance(result.get("error"), GridStopped) else None
            if stopped is not None:  # (asked for: not an error; what was rendered in full is kept)
                if not stopped.images:
                    yield {r_status: info_html(str(stopped))}
                    return
                result = {"images": stopped.images}
                files = files[:len(stopped.images)]
            if "error" in result:
                raise result["error"]
            images = result["images"]
            saved = backend.save_grid(j, files, strengths, seeds, prompt, images)
            out_dir, paths, grid_path = saved["out_dir"], saved["paths"], saved["grid"]
            gallery = [(paths[fi][si][ki], f"{_row_label(j, f)} · {s:g} · seed {seed}")
                       for fi, f in enumerate(files) for si, s in enumerate(strengths)
                       for ki, seed in enumerate(seeds)]
            state = {"files": files, "strengths": strengths, "seeds": seeds, "paths": paths,
                     "rows": [_row_label(j, f) for f in files]}
            flabels = [_file_label(f) for f in files]
            yield {r_status: (info_html(f"{stopped} Saved in {out_dir}.") if stopped is not None else
                              ok_html(f"Rendered {len(gallery)} image{'s' if len(gallery) != 1 else ''} (saved in "
                                      f"{out_dir}). Click the one you like, "
                                      "then press Use this one.")),
                   r_grid: grid_path, r_gallery: gr.update(value=gallery, columns=gallery_columns(len(seeds))),
                   r_state: state,
                   r_pick_file: gr.update(choices=flabels, value=flabels[-1]),
                   r_pick_strength: gr.update(choices=[f"{s:g}" for s in strengths], value=f"{strengths[-1]:g}"),
                   r_pick_seed: gr.update(choices=[str(s) for s in seeds], value=str(seeds[0]))}

        def r_do_stop():
            grid_stop.set()
            return info_html("Stopping after the current row...")

        r_stop.click(r_do_stop, [], [r_status], queue=False)
        r_render.click(r_do_render, [r_job, r_files, r_prompt, r_negative, r_strengths, r_seeds, r_w, r_h, r_steps],
                       [r_status, r_grid, r_gallery, r_state, r_pick_file, r_pick_strength, r_pick_seed])

        def r_do_select(state, evt: gr.SelectData):
            if not state or not state.get("files"):
                return {r_use_status: ""}
            fi, si, ki = grid_index(int(evt.index), len(state["strengths"]), len(state["seeds"]))
            f, s, seed = state["files"][fi], state["strengths"][si], state["seeds"][ki]
            return {r_pick_file: _file_label(f), r_pick_strength: f"{s:g}", r_pick_seed: str(seed),
                    r_use_status: info_html(f"Chosen: {state['rows'][fi]} at strength {s:g}, seed {seed}.")}

        r_gallery.select(r_do_select, [r_state], [r_pick_file, r_pick_strength, r_pick_seed, r_use_status])

        def r_do_use(state, flabel, strength, seed):
            try:
                if not state or not state.get("files"):
                    raise UiError("Render a grid first, then click the image you like.")
                labels = [_file_label(f) for f in state["files"]]
                if flabel not in labels:
                    raise UiError("Choose the LoRA file (epoch) you want.")
                fi = labels.index(flabel)
                si = [f"{s:g}" for s in state["strengths"]].index(strength)
                ki = [str(s) for s in state["seeds"]].index(seed)
                lora = state["files"][fi]
                src = state["paths"][fi][si][ki]
                with Image.open(src) as im:
                    preview = backend.save_preview(lora, im.copy())
                tag = backend.lora_tag(lora, float(strength))
                words = card_words(lora)
                # (the script adds the words after the tag unless the prompt has them already)
                return {r_use_status: ok_html(f"Preview saved as {preview}. Prompt tag: {tag}"),
                        r_tag: tag + (f"\n{words}" if words else "")}
            except Exception as e:  # shown in the tab; the tag is cleared so nothing stale is sent to txt2img
                return {r_use_status: error_html(e), r_tag: ""}

        r_use.click(r_do_use, [r_state, r_pick_file, r_pick_strength, r_pick_seed], [r_use_status, r_tag]).then(
            None, [r_tag, r_use_status], [r_use_status], _js="lora_studio_use_tag")

    return ui


def on_ui_tabs_entry(backend):
    """What the glue returns from ``on_ui_tabs``."""
    return [(build_tab(backend), TAB_TITLE, TAB_ID)]


__all__ = ["TAB_ID", "TAB_TITLE", "build_tab", "compose_grid", "error_html", "gallery_columns", "grid_index",
           "job_progress_html", "jobs_table_html", "model_html", "model_mismatches", "on_ui_tabs_entry",
           "render_loss_png", "smooth", "tagged_infotext"]
