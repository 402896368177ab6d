"""What the training tab needs from the world, as one small protocol, and ``LocalBackend``: an implementation over
the engine's own objects (a ``ModelHost``, the ``JobQueue``, ``run_training``, the apply package).

The tab calls only the methods of ``Backend``. Inside the WebUI the glue builds a ``LocalBackend`` with:

- ``host``: a callable returning the ``ModelHost`` for the checkpoint loaded right now (its ``lock()`` is the
  WebUI's queue lock), or None while no model is loaded;
- ``sampler``: the WebUI's own sampler (``process_images``) with the signature of ``ddim_sampler``;
- ``interrogators``: ``{"blip": fn(PIL) -> str, "deepbooru": fn(PIL) -> str}`` from the WebUI's interrogators;
- ``hooks``: a ``ProgressHooks`` that drives A1111's progress bar (``progress.add_task_to_queue / start_task /
  finish_task`` and ``shared.state``) and reports the Interrupt button;

and may subclass it to override ``lora_tag`` (the WebUI's alias rules) or ``prepare_model`` (restore LoRA weights a
generation left merged before the tab samples).
"""
from __future__ import annotations

import math
import os
import re
import threading
from typing import Callable, Protocol

from PIL import Image

from ..formats.errors import LoraError
from ..formats.safetensors_io import write_atomic
from ..jobs.queue import ACTIVE, INTERRUPTED, QUEUED, RUNNING, STATUS_PAST, JobQueue
from ..train.config import parse_train_config
from ..train.saving import output_dir_problem


def same_model(a: dict, b: dict) -> bool:
    """Two model records name the same checkpoint: by hash when both have one, else by name."""
    if a.get("hash") and b.get("hash"):
        return a["hash"] == b["hash"]
    return a.get("name") == b.get("name")


class UiError(Exception):
    """A problem the user can fix; the message says what happened and what to do."""

    user_error = True


class ProgressHooks:
    """No-op progress reporting; the WebUI glue subclasses it (A1111 progress API, ``shared.state``).

    When each is called (``task_id`` is the id the page gave ``requestProgress``; ``job`` a ``jobs.queue.Job``):

    - ``queued``: at submit (``progress.add_task_to_queue``);
    - ``started``: once, when the trainer holds the model (inside ``host.lock()``, the WebUI's queue lock), so a
      generation that still runs keeps its own progress bar (``progress.start_task``);
    - ``update``: on every step / cache / epoch / save / sample event, all inside the lock (``shared.state.job_no``,
      ``job_count``, ``textinfo``);
    - ``finished``: once, when the job is done, cancelled, failed or removed; the lock may already be released, so
      touch only the task bookkeeping here (``progress.finish_task``). ``shared.state.begin/end`` belong in the
      host's ``lock()``.
    """

    def queued(self, task_id: str, job) -> None:
        pass

    def started(self, task_id: str, job) -> None:
        pass

    def update(self, task_id: str, job) -> None:
        pass

    def finished(self, task_id: str, job) -> None:
        pass

    def interrupted(self) -> bool:
        """True when the user asked the host to stop (A1111's Interrupt button)."""
        return False


class Backend(Protocol):
    def model_info(self) -> dict: ...
    def default_output_dir(self) -> str: ...
    def samples_dir(self, output_dir: str, name: str) -> str: ...
    def grids_dir(self, lora_file: str) -> str: ...
    def interrogate(self, image: Image.Image, method: str) -> str: ...
    def generate(self, prompt: str, n: int, seed: int, width: int, height: int, negative_prompt: str = "",
                 steps: int | None = None, on_image: Callable | None = None,
                 should_stop: Callable[[], bool] | None = None) -> list[Image.Image]: ...
    def render_grid(self, files: list[str], strengths: list[float], seeds: list[int], prompt: str,
                    negative_prompt: str = "", width: int | None = None, height: int | None = None,
                    steps: int | None = None, progress: Callable | None = None) -> list[list[list[Image.Image]]]: ...
    def submit(self, config: dict, name: str | None = None, task_id: str | None = None,
               front: bool = False) -> dict: ...
    def jobs(self) -> list[dict]: ...
    def job(self, job_id: str) -> dict | None: ...
    def cancel(self, job_id: str) -> dict: ...
    def remove(self, job_id: str) -> None: ...
    def clear_finished(self) -> tuple[list[dict], list[dict]]: ...
    def move(self, job_id: str, delta: int) -> None: ...
    def queue_problem(self) -> str | None: ...
    def lora_tag(self, path: str, weight: float) -> str: ...
    def lora_folder_note(self, folder: str) -> str | None: ...
    def save_preview(self, lora_path: str, image: Image.Image) -> str: ...


# ---------------------------------------------------------------------------------------------------------------
# the default sampler (tests, headless): our own DDIM from train/sampling.py; the WebUI passes its own


def ddim_sampler(host, prompts: list[str], negative: str, seeds: list[int], width: int, height: int,
                 steps: int = 20, cfg_scale: float = 7.0) -> list[Image.Image]:
    """One image per prompt/seed with classifier-free guidance (deterministic DDIM, eta 0)."""
    from ..train.sampling import SamplePrompt, generate, infotext

    sps = [SamplePrompt(prompt=p, negative=negative, width=width, height=height, steps=steps, seed=int(s),
                        cfg_scale=cfg_scale) for p, s in zip(prompts, seeds)]
    images = []
    for sp, (img, seed, used) in zip(sps, generate(host, sps, sampler="ddim")):
        img.info["parameters"] = infotext(sp, seed, used, getattr(host, "model_name", None))  # (as A1111's)
        images.append(img)
    return images


def write_sample_prompts(path: str, prompt: str) -> str:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(prompt.strip() + "\n")
    return path


# ---------------------------------------------------------------------------------------------------------------


def _public(job) -> dict:
    return job.public() if job is not None else None


_EPOCH_RE = re.compile(r"-(\d{6})\.safetensors$")
_STEP_RE = re.compile(r"-step(\d+)\.safetensors$")


def describe_file(path: str) -> str:
    """'epoch 2' / 'step 500' / 'final' for a saved LoRA file name."""
    b = os.path.basename(path)
    m = _EPOCH_RE.search(b)
    if m:
        return f"epoch {int(m.group(1))}"
    m = _STEP_RE.search(b)
    if m:
        return f"step {int(m.group(1))}"
    return "final"


def training_at(job: dict) -> str:
    """'step 12/400' for a running job, 'starting' before it knows its steps."""
    return f"step {job.get('step') or 0}/{job['total']}" if job.get("total") else "starting"


def row_label(job: dict, path: str) -> str:
    """A grid row's name for a job's file: 'epoch 2', 'step 500', 'final (epoch 10)'."""
    what = describe_file(path)
    return f"final (epoch {job['epochs']})" if what == "final" and job.get("epochs") else what


class GridStopped(UiError):
    """Stop pressed: ``images`` holds the files rendered in full before it (images[file][strength][seed])."""

    def __init__(self, done: int, total: int, images: list | None = None):
        self.images = images or []
        kept = (f"the {len(self.images)} file(s) rendered in full are shown" if self.images
                else "nothing was saved")
        super().__init__(f"Stopped after {done} of {total} row(s); {kept}, and the model is as it was.")


def write_previews(files: list[str], samples: list[dict]) -> list[str]:
    """Each saved LoRA file without a card picture gets the first sample image made at its epoch (or step; the
    final file: the last sampled epoch's) as ``<stem>.preview.png``, the picture the WebUI's cards show."""
    first: dict = {}
    for smp in samples:
        first.setdefault(("epoch", smp.get("epoch")), smp["path"])
        first.setdefault(("step", smp.get("step")), smp["path"])
    last = max((smp for smp in samples if smp.get("epoch")), key=lambda smp: smp["epoch"], default=None)
    written = []
    for f in files:
        if os.path.exists(preview_path(f)):
            continue
        m_epoch, m_step = _EPOCH_RE.search(os.path.basename(f)), _STEP_RE.search(os.path.basename(f))
        src = (first.get(("epoch", int(m_epoch.group(1)))) if m_epoch else
               first.get(("step", int(m_step.group(1)))) if m_step else
               first.get(("epoch", last["epoch"])) if last else None)
        if not src or not os.path.isfile(src):
            continue
        with Image.open(src) as im:
            written.append(save_preview(f, im))
    return written


def write_card_words(files: list[str]) -> str | None:
    """Each saved LoRA file without a card sidecar (``<stem>.json``, the WebUI's user metadata) gets its training
    folder's words as the card's activation text, so a click on the card puts the trigger into the prompt too.
    Returns the words written (None when none)."""
    import json

    from ..formats.safetensors_io import read_metadata
    from ..train.folders import trained_words
    said = None
    for f in files:
        sidecar = os.path.splitext(f)[0] + ".json"
        if os.path.exists(sidecar) or not os.path.isfile(f):
            continue
        words = trained_words(read_metadata(f) or {})
        if not words:
            continue
        text = json.dumps({"activation text": words}, indent=4)
        write_atomic(sidecar, lambda fh: fh.write(text))
        said = words
    return said


def card_words(lora_path: str) -> str | None:
    """The words a prompt with this LoRA wants: its card's activation text (the user's, or what training wrote),
    else its training folder's words."""
    import json

    from ..formats.safetensors_io import read_metadata
    from ..train.folders import trained_words
    try:
        with open(os.path.splitext(lora_path)[0] + ".json", encoding="utf-8") as f:
            words = json.load(f).get("activation text")
        if isinstance(words, str) and words.strip():
            return words.strip()
    except (OSError, ValueError, AttributeError):
        pass  # no sidecar, or one hand-edited into something else: the file's own words
    try:
        return trained_words(read_metadata(lora_path) or {})
    except Exception:  # (an unreadable file: the tag alone)
        return None


def preview_path(lora_path: str) -> str:
    """``<stem>.preview.png`` next to the LoRA: the WebUI's card thumbnail (find_preview)."""
    return os.path.splitext(lora_path)[0] + ".preview.png"


def save_preview(lora_path: str, image: Image.Image) -> str:
    path = preview_path(lora_path)
    write_atomic(path, lambda f: image.save(f, format="PNG"), binary=True)
    return path


class LocalBackend:
    def __init__(self, host, store_dir: str, *, output_dir: str | None = None,
                 interrogators: dict[str, Callable] | None = None, sampler: Callable | None = None,
                 sample_steps: int = 20, cfg_scale: float = 7.0, hooks: ProgressHooks | None = None,
                 autostart: bool = True):
        self._host = host if callable(host) else (lambda: host)
        self.store_dir = store_dir
        self.output_dir = output_dir
        self.interrogators = dict(interrogators or {})
        self.sampler = sampler or ddim_sampler
        self.sample_steps = sample_steps
        self.cfg_scale = cfg_scale
        self.hooks = hooks or ProgressHooks()
        self._tasks: dict[str, str] = {}
        self._started: set[str] = set()
        self._lock = threading.RLock()
        self.queue = JobQueue(store_dir, self._run, autostart=False)
        self.queue.subscribe(self._on_queue_event)
        if autostart:
            self.queue.start()

    # ---- model ------------------------------------------------------------------------------------------------
    def host(self):
        return self._host()

    def _need_host(self):
        h = self._host()
        if h is None:
            raise UiError("No checkpoint is loaded. Choose one in the WebUI's checkpoint list at the top and wait "
                          "until it has loaded, then try again.")
        return h

    def model_info(self) -> dict:
        h = self._host()
        if h is None:
            return {"loaded": False, "name": None, "hash": None, "family": None, "parameterization": None}
        d = dict(h.describe())
        d["loaded"] = True
        d["path"] = getattr(h, "model_path", None)
        try:
            p = next(h.sd_model.parameters())
            d["dtype"] = str(p.dtype).replace("torch.", "")
            d["device"] = p.device.type
        except (StopIteration, AttributeError):
            d["dtype"], d["device"] = None, None
        return d

    def network_problems(self, cfg) -> list[str]:
        """What the loaded model would stop the job on: loss settings for the other prediction type, building
        the network (support.network_build_problems); none without a model (the job then checks when it starts)."""
        h = self._host()
        if h is None:
            return []
        from ..train.support import network_build_problems, prediction_problems
        return prediction_problems(cfg, h.parameterization) + network_build_problems(h.sd_model, h.family, cfg)

    def prepare_model(self, host) -> None:
        """Called with the host locked before the tab samples; the glue restores merged prompt LoRAs here."""

    def default_output_dir(self) -> str:
        return self.output_dir or os.path.join(self.store_dir, "output")

    # ---- captions and images ------------------------------------------------------------------------------
    def interrogate(self, image: Image.Image, method: str) -> str:
        fn = self.interrogators.get(method)
        names = {"blip": "BLIP", "deepbooru": "DeepBooru"}
        name = names.get(method, method)
        if fn is None:
            raise UiError(f"Captioning with {name} is not available here. Write the captions "
                          "by hand in the editor below, or use the other captioner.")
        # The WebUI downloads the captioner's model on first use; offline, BLIP answers "<error>" (A1111 catches its
        # own exception) and DeepBooru raises: neither may become a caption or read as a LoRA Studio bug.
        why = None
        try:
            text = str(fn(image) or "").strip()
        except Exception as e:  # (any failure of the WebUI's captioner)
            text, why = "", f"{e.__class__.__name__}: {e}"
        if why or text == "<error>":
            where = {"blip": "models/BLIP", "deepbooru": "models/torch_deepdanbooru"}.get(method, "models/")
            raise UiError(f"{name} could not caption the images ({why or 'the WebUI console shows why'}). The WebUI "
                          f"downloads its model on first use (into {where}): connect to the internet once, use the "
                          "other captioner, or write the captions by hand below.")
        return text

    def _steps(self, steps):
        return int(steps or self.sample_steps)

    def generate(self, prompt: str, n: int, seed: int, width: int, height: int, negative_prompt: str = "",
                 steps: int | None = None, on_image: Callable | None = None, batch: int = 4,
                 should_stop: Callable[[], bool] | None = None) -> list[Image.Image]:
        """Up to ``n`` images; fewer when ``should_stop()`` says so between batches."""
        host = self._need_host()
        images: list[Image.Image] = []
        with host.lock():
            self.prepare_model(host)
            for start in range(0, n, batch):
                if should_stop and should_stop():
                    break
                k = min(batch, n - start)
                seeds = [int(seed) + start + j for j in range(k)]
                for img in self.sampler(host, [prompt] * k, negative_prompt, seeds, width, height,
                                        self._steps(steps), self.cfg_scale):
                    images.append(img)
                    if on_image:
                        on_image(len(images), n, img)
        return images

    def render_grid(self, files: list[str], strengths: list[float], seeds: list[int], prompt: str,
                    negative_prompt: str = "", width: int | None = None, height: int | None = None,
                    steps: int | None = None, progress: Callable | None = None,
                    should_stop: Callable[[], bool] | None = None) -> list[list[list[Image.Image]]]:
        """images[file][strength][seed], each LoRA merged at that strength into the loaded model, then restored.
        GridStopped between rows when ``should_stop()`` says so (the model restored)."""
        from .grid import render_rows

        host = self._need_host()
        width, height = int(width or 512), int(height or 512)
        with host.lock():
            self.prepare_model(host)
            rows, done, total, stopped = render_rows(
                host, files, strengths,
                lambda _f, _s: self.sampler(host, [prompt] * len(seeds), negative_prompt, list(seeds), width,
                                            height, self._steps(steps), self.cfg_scale),
                progress=progress, should_stop=should_stop)
        if stopped:
            raise GridStopped(done, total, rows)
        return rows

    def save_grid(self, job: dict, files: list[str], strengths: list[float], seeds: list[int], prompt: str,
                  images: list[list[list[Image.Image]]]) -> dict:
        """A rendered grid (the files rendered in full) saved as the Results tab saves it, in
        grids_dir/<job>-<time>/: a picture per cell whose infotext holds the <lora:name:strength> tag it was
        rendered with, and grid.png. Returns out_dir, paths[file][strength][seed], grid, labels."""
        import time

        from ..train.sampling import save_png, tagged_infotext
        from .grid import compose_grid, new_folder

        files = files[:len(images)]
        out_dir = new_folder(os.path.join(self.grids_dir(files[0]), f"{job['name']}-{time.strftime('%Y%m%d-%H%M%S')}"))
        paths = []
        for fi, f in enumerate(files):
            per_s = []
            for si, s in enumerate(strengths):
                per_k = []
                for ki, seed in enumerate(seeds):
                    p = os.path.join(out_dir, f"{fi:02d}_{s:g}_{seed}.png")
                    img = images[fi][si][ki]
                    save_png(img, p, tagged_infotext((getattr(img, "info", None) or {}).get("parameters"), prompt,
                                                     self.lora_tag(f, s), lora_files=[f]))
                    per_k.append(p)
                per_s.append(per_k)
            paths.append(per_s)
        labels = [row_label(job, f) for f in files]
        grid = save_png(compose_grid(images, labels, strengths, seeds), os.path.join(out_dir, "grid.png"))
        return {"out_dir": out_dir, "paths": paths, "grid": grid, "labels": labels}

    def job_grid(self, job_id: str, prompt: str, files: list[str] | None = None,
                 strengths: list[float] | None = None, seeds: list[int] | None = None, negative_prompt: str = "",
                 width: int | None = None, height: int | None = None, steps: int | None = None) -> dict:
        """A job's Results grid in one call (the HTTP API's): its saved files (all, or those named) x strengths x
        seeds, rendered and saved as the tab does. UiError for what the caller can change."""
        j = self.job(job_id)
        if j is None:
            raise UiError(f"There is no job {job_id}.")
        busy = next((x for x in self.jobs() if x["status"] == RUNNING), None)
        if busy is not None:  # (the render would wait for the job's hold on the model)
            raise UiError(f"The model is busy training '{busy['name']}' ({training_at(busy)}). "
                          "Render when it has finished.")
        recorded = list(j.get("files") or [])
        saved = [f for f in recorded if os.path.exists(f)]
        if not saved:
            raise UiError(f"'{j['name']}' has no saved LoRA file to render (it is {j['status']})." if not recorded
                          else f"The files '{j['name']}' saved were moved or deleted (e.g. {recorded[-1]}).")
        if files:
            by_name = {os.path.basename(f): f for f in saved}
            unknown = [n for n in files if n not in by_name]
            if unknown:
                gone = any(os.path.basename(f) == unknown[0] for f in recorded)
                raise UiError(f"'{j['name']}' " + ("saved " + repr(unknown[0]) + " but it was moved or deleted"
                                                   if gone else f"saved no file named {unknown[0]!r}")
                              + f"; its files: {', '.join(by_name)}.")
            saved = [by_name[n] for n in dict.fromkeys(files)]
        if not str(prompt or "").strip():
            raise UiError("Write a prompt (with the trigger word) to render.")
        from .grid import prompt_tags_problem
        problem = prompt_tags_problem(prompt, negative_prompt)
        if problem:
            raise UiError(problem[0].upper() + problem[1:] + ".")
        strengths = list(dict.fromkeys(strengths or [0.5, 0.7, 0.8, 1.0]))  # (a repeat would be the same picture)
        seeds = list(dict.fromkeys(int(x) for x in (seeds or [1, 2])))
        width, height = image_size(width, height)
        images = self.render_grid(saved, strengths, seeds, prompt, negative_prompt, width, height, steps)
        return {**self.save_grid(j, saved, strengths, seeds, prompt, images), "files": saved,
                "strengths": strengths, "seeds": seeds, "images": images}

    # ---- jobs ---------------------------------------------------------------------------------------------
    def submit(self, config: dict, name: str | None = None, task_id: str | None = None,
               front: bool = False) -> dict:
        cfg = parse_train_config(dict(config), source="the job's settings")  # refuse now what would fail later
        problems = self.network_problems(cfg)
        out = output_dir_problem(str(cfg.resolve(cfg.output_dir))) if cfg.output_dir else None
        if out:
            problems.append(out[0].upper() + out[1:] + ".")
        if cfg.output_dir:
            from ..jobs.queue import same_files_job
            other = same_files_job(self.queue.list(), cfg)
            if other is not None:  # (a second click on Train, or the same name twice: as the HTTP API refuses it)
                problems.append(f"job '{other.name}' is {other.status} and writes the same files "
                                f"({cfg.output_name or 'lora'}*.safetensors in {cfg.resolve(cfg.output_dir)}); give "
                                "this one another output name, or queue it after that one has finished.")
        if problems:
            raise UiError("The job was not queued: " + problems[0] if len(problems) == 1 else
                          "The job was not queued:" + "".join(f"\n- {p}" for p in problems))
        with self._lock:  # the worker's "start" event waits here until the task id is known
            if task_id:
                self.hooks.queued(task_id, None)
            job = self.queue.submit(dict(config), name=name, model=self.model_info())
            if task_id:
                self._tasks[job.id] = task_id
            if front:
                try:
                    self.queue.move(job.id, 0)
                except ValueError:
                    pass  # it already started: nothing to move ahead of
        return _public(job)

    def jobs(self) -> list[dict]:
        return [j.public() for j in self.queue.list()]

    def job(self, job_id: str) -> dict | None:
        return _public(self.queue.get(job_id))

    def _need_job(self, job_id):
        job = self.queue.get(job_id) if job_id else None
        if job is None:
            raise UiError("That job is no longer in the list (it was removed). Pick another job.")
        return job

    def cancel(self, job_id: str) -> dict:
        job = self._need_job(job_id)
        if job.status not in ACTIVE:
            raise UiError(f"'{job.name}' has already {STATUS_PAST.get(job.status, job.status)}; there is nothing to "
                          "cancel. Use Remove to take it off the list.")
        return _public(self.queue.cancel(job_id))

    def release_task(self, task_id: str) -> None:
        """A progress bar the page started for a job that was not queued: told it is over (else A1111 shows
        'Waiting...' until its inactivity timeout)."""
        with self._lock:
            if task_id in self._tasks.values():
                return
        self.hooks.finished(task_id, None)

    def remove(self, job_id: str) -> None:
        job = self._need_job(job_id)
        if job.status == RUNNING:
            raise UiError(f"'{job.name}' is training right now. Cancel it first, then remove it.")
        self.queue.remove(job_id)
        with self._lock:
            task = self._tasks.pop(job_id, None)
        if task:
            self.hooks.finished(task, job)  # a removed waiting job must not keep a progress bar waiting

    def clear_finished(self) -> tuple[list[dict], list[dict]]:
        """The finished jobs off the list (files stay); cancelled or failed ones that can still be resumed are
        kept. Returns (removed, kept)."""
        removed, kept = self.queue.clear_finished()
        return [_public(j) for j in removed], [_public(j) for j in kept]

    def move(self, job_id: str, delta: int) -> None:
        job = self._need_job(job_id)
        if job.status not in (QUEUED, INTERRUPTED):
            raise UiError(f"'{job.name}' is {job.status}; only jobs that are still waiting can be moved.")
        waiting = [j.id for j in self.queue.pending()]
        self.queue.move(job_id, max(0, waiting.index(job_id) + int(delta)))

    def queue_problem(self) -> str | None:
        return self.queue.load_error or self.queue.save_error

    def stop(self, timeout: float | None = 5.0) -> None:
        self.queue.stop(timeout)

    # ---- results ------------------------------------------------------------------------------------------
    def lora_tag(self, path: str, weight: float) -> str:
        stem = os.path.splitext(os.path.basename(path))[0]
        return f"<lora:{stem}:{float(weight):g}>"

    def lora_folder_note(self, folder: str) -> str | None:
        """Why LoRAs saved in ``folder`` cannot be used by name (outside the host's LoRA folders), or None."""
        return None

    def save_preview(self, lora_path: str, image: Image.Image) -> str:
        return save_preview(lora_path, image)

    def samples_dir(self, output_dir: str, name: str) -> str:
        """Where a job's samples (and the tab's sample prompt file) go: <output>/samples, as sd-scripts does."""
        return os.path.join(output_dir, "samples")

    def grids_dir(self, lora_file: str) -> str:
        return os.path.join(os.path.dirname(lora_file), "grids")

    # ---- the runner the queue calls -----------------------------------------------------------------------
    def _sample_fn(self, host, cfg):
        """The host's own sampler when it has one (the WebUI's), else ours; files go to samples_dir."""
        from ..train.sampling import make_sample_fn

        prompts_path = str(cfg.resolve(cfg.sample_prompts)) if cfg.sample_prompts else None
        if prompts_path is not None and not os.path.isfile(prompts_path):
            raise UiError(f"The sample prompt file {prompts_path} does not exist. Clear 'Sample images every N "
                          "epochs' or write a sample prompt.")
        out_dir = str(cfg.resolve(cfg.output_dir))
        folder = self.samples_dir(out_dir, cfg.output_name or "lora")
        own = getattr(host, "make_sample_fn", None)
        return own(cfg, folder) if own is not None else make_sample_fn(host, cfg, out_dir, folder=folder)

    def _run(self, job, emit, should_cancel):
        from ..train.run import run_training

        host = self._need_host()
        cfg = parse_train_config(dict(job.config), source=f"job '{job.name}'")
        wants = cfg.sample_every_n_epochs or cfg.sample_every_n_steps or cfg.sample_at_first
        sample_fn = self._sample_fn(host, cfg) if wants and (cfg.sample_prompts or cfg.sample_prompt_text) else None
        resume = job.resume_state if job.resume_state and os.path.exists(job.resume_state) else None

        switched = []

        def on_event(ev):
            if ev.kind == "start":  # (the record names the model the job trained, saved with this event)
                switched.extend(self._trained_model(job))
            emit(ev)
            if ev.kind == "start":  # the trainer emits it once it holds host.lock()
                self._task_event(job, "started")

        result = run_training(host, cfg, on_event=on_event,
                              # (A1111's Interrupt stops whatever holds its queue lock: a job that gave the
                              # model back, to wait for disk room, leaves it to the generation running then)
                              should_cancel=lambda: should_cancel() or (getattr(host, "holds_model", True)
                                                                        and self.hooks.interrupted()),
                              resume=resume, sample_fn=sample_fn)
        result.notes[:0] = switched
        try:
            write_previews(result.files, list(job.samples))
        except OSError as e:  # (a card picture is a nicety: the LoRA files are what matter)
            result.notes.append(f"no card pictures were written from the samples: {e}")
        # (a folder outside the LoRA folders gets no cards until the files are copied there: say so, not "cards")
        outside = self.lora_folder_note(os.path.dirname(result.files[0])) if result.files else None
        try:
            words = write_card_words(result.files)
            if words:
                result.notes.append(f"the cards of this run's LoRA files add '{words}' (its training folder's words) "
                                    "to the prompt with the tag: edit the card (its activation text) to change it"
                                    if not outside else f"once copied to the LoRA folder (with the .json beside "
                                    f"them), this run's LoRA files' cards add '{words}' to the prompt with the tag")
        except (OSError, LoraError) as e:  # (a nicety too)
            result.notes.append(f"the cards' activation text was not written: {e}")
        if outside:
            result.notes.append(outside)
        return result

    def _trained_model(self, job) -> list[str]:
        """A checkpoint loaded between queueing and starting is the one trained: the job's record says so."""
        was, now = job.model or {}, self.model_info()
        if not now.get("loaded") or not was.get("name") or same_model(was, now):
            return []
        job.model = now
        return [f"queued while {was['name']} was loaded; trained on {now.get('name')}, the checkpoint loaded when "
                "it started"]

    def _task_event(self, job, what):
        """``started`` once per job, when the trainer announces it holds the model."""
        with self._lock:
            task = self._tasks.get(job.id)
            first = job.id not in self._started
            self._started.add(job.id)
        if task and first:
            self.hooks.started(task, job)

    def _on_queue_event(self, job, kind):
        with self._lock:
            task = self._tasks.get(job.id)
        if not task:
            return
        if kind in ("step", "cache", "epoch", "save", "sample"):
            self.hooks.update(task, job)
        # the trainer's own done/cancelled events come while the job still runs; the queue's final one after
        elif (kind in ("done", "cancelled", "failed") or kind == "cancel") and job.status != RUNNING:
            with self._lock:
                self._tasks.pop(job.id, None)
                self._started.discard(job.id)
            self.hooks.finished(task, job)


def parse_numbers(text: str, kind=float, what: str = "values") -> list:
    """'0.5, 0.7 1.0' -> [0.5, 0.7, 1.0] with a plain-words error."""
    items = [t for t in re.split(r"[,\s]+", str(text or "").strip()) if t]
    out = []
    for t in items:
        try:
            v = float(t)
            if not math.isfinite(v) or (kind is int and v != int(v)):  # (seed 1.5 was rendered as seed 1)
                raise ValueError(t)
            out.append(int(v) if kind is int else kind(t))
        except ValueError:
            raise UiError(f"'{t}' in the {what} is not a {'whole ' if kind is int else ''}number. Write numbers "
                          "separated by commas, e.g. "
                          + ("1, 2, 3, 4, 5" if kind is int else "0.5, 0.7, 0.8, 1.0")) from None
    if not out:
        raise UiError(f"No {what} given. Write numbers separated by commas.")
    return out


def image_size(width, height) -> tuple[int, int]:
    """The size to render, refused with the nearest sizes that work: the model makes images in steps of 8 pixels
    (65 would quietly come out 64 wide)."""
    out = []
    for what, v in (("Width", width), ("Height", height)):
        v = int(v or 512)
        if v < 64:
            raise UiError(f"{what} {v} is too small: use at least 64.")
        if v % 8:
            raise UiError(f"{what} {v} is not a multiple of 8, which the model needs: use {v // 8 * 8} or "
                          f"{v // 8 * 8 + 8}.")
        out.append(v)
    return out[0], out[1]


__all__ = ["Backend", "LocalBackend", "ProgressHooks", "UiError", "ddim_sampler", "describe_file", "image_size",
           "row_label",
           "parse_numbers", "write_sample_prompts"]
