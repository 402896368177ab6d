"""The training side inside the WebUI: the tab's backend, A1111's progress bar, its sampler and interrogators,
and the HTTP routes, all over one job queue. ``modules.*`` is imported inside functions only.
"""

from __future__ import annotations

import os
import threading

from ..ui.backend import LocalBackend, ProgressHooks, UiError
from .webui import cmd_opt, console, data_dir, images_dir, lora_dirs, opt, process_own, sampler_fields, shared
from .webui_train import WebUIHost, WebUINotReady


class A1111Hooks(ProgressHooks):
    """Drives the WebUI's own progress bar (the textual-inversion pattern: a task id polled by requestProgress)."""

    def queued(self, task_id, job):
        from modules import progress
        progress.add_task_to_queue(task_id)

    def started(self, task_id, job):
        from modules import progress
        progress.start_task(task_id)

    def update(self, task_id, job):
        st = shared().state
        st.job_count = max(1, int(job.total or 1))
        st.job_no = int(job.step or 0)
        st.textinfo = (f"LoRA Studio: {job.name} step {job.step}/{job.total}"
                       + (f", loss {job.avg_loss:.4f}" if job.avg_loss is not None else ""))

    def finished(self, task_id, job):
        from modules import progress
        progress.finish_task(task_id)

    def interrupted(self) -> bool:
        return bool(shared().state.interrupted)


def webui_sampler(host, prompts, negative, seeds, width, height, steps=20, cfg_scale=7.0):
    """Images from the WebUI's own sampler on the model as it is (a LoRA merged or attached by us)."""
    from modules import processing

    images = []
    for prompt, seed in zip(prompts, seeds):
        p = processing.StableDiffusionProcessingTxt2Img(
            sd_model=host.sd_model, prompt=prompt, negative_prompt=negative, seed=int(seed), steps=int(steps),
            width=int(width), height=int(height), cfg_scale=float(cfg_scale), do_not_save_grid=True,
            do_not_save_samples=True, **sampler_fields())
        images += process_own(p).images[:1]  # (the LoRA under test is merged into these very weights)
    return images


def _interrogators():
    def blip(image):
        return shared().interrogator.interrogate(image.convert("RGB"))

    def deepbooru(image):
        from modules import deepbooru as db
        return db.model.tag(image.convert("RGB"))

    return {"blip": blip, "deepbooru": deepbooru}


class WebUIBackend(LocalBackend):
    def __init__(self, session, store_dir: str, output_dir: str):
        self.session = session
        self._cached_host = None
        self._refused = None  # (model, reason) when the loaded model cannot be trained here
        self._host_lock = threading.Lock()
        self._job = threading.local()  # the job the queue thread is running
        super().__init__(self._current_host, store_dir, output_dir=output_dir, interrogators=_interrogators(),
                         sampler=webui_sampler, hooks=A1111Hooks())

    def _current_host(self):
        """One WebUIHost per loaded model (the tab polls; describing must stay cheap). None: nothing loaded."""
        from .webui import loaded_model

        model = loaded_model()
        if model is None:
            return None
        with self._host_lock:
            if self._cached_host is None or self._cached_host.sd_model is not model:
                self._cached_host = None
                try:
                    self._cached_host = WebUIHost(self.session)
                    self._refused = None
                except WebUINotReady as e:
                    if self._refused is None or self._refused[0] is not model or self._refused[1] != str(e):
                        console(str(e))  # once per model, not on every poll of the tab
                    self._refused = (model, str(e))
                    return None
            return self._cached_host

    def refusal(self) -> str | None:
        """Why the loaded model cannot be used here (--lowvram, Forge), None when it can or nothing is loaded."""
        from .webui import loaded_model

        if self._current_host() is not None:
            return None
        refused = self._refused
        return refused[1] if refused is not None and refused[0] is loaded_model() else None

    def _wait_for_model(self):
        """A job that starts while the WebUI is still loading its first checkpoint (it loads in a thread after
        start-up) waits for it instead of failing: A1111's get_sd_model waits on the loader's lock, or loads the
        selected checkpoint if none was ever loaded, as a generation would. A checkpoint the user unloaded is not
        reloaded (the job then says that none is loaded)."""
        try:
            from modules import sd_models
            md = sd_models.model_data
        except Exception:  # (not an A1111-shaped host)
            return
        if md.sd_model is None and not getattr(md, "was_loaded_at_least_once", True):
            console("the WebUI is still loading its checkpoint; the job starts once it has loaded")
            md.get_sd_model()

    def _need_host(self):
        host = self._current_host()
        if host is None and getattr(self._job, "id", None):  # (a job, not the tab's or the API's poll)
            self._wait_for_model()
            host = self._current_host()
        if host is None:
            reason = self.refusal()
            if reason:  # say why, not "no checkpoint is loaded"
                raise WebUINotReady(reason)
            return super()._need_host()
        job_id = getattr(self._job, "id", None)
        return host.for_job(job_id) if job_id else host

    def _run(self, job, emit, should_cancel):
        # the trainer gets a job host whose lock() also switches attention / medvram for training
        self._job.id = job.id
        try:
            result = super()._run(job, emit, should_cancel)
        finally:
            self._job.id = None
        if result.files:  # (new files are listed at once: /sdapi/v1/loras, <lora:> names, our card page)
            self._list_new_files()
        return result

    def _list_new_files(self) -> None:
        from .webui import builtin_networks
        try:
            self.session.discovery.refresh()
            mod = builtin_networks()
            if mod is not None and hasattr(mod, "list_available_networks"):
                mod.list_available_networks()
        except Exception as e:  # (a listing is a nicety: the job itself is done)
            print(f"LoRA Studio: the LoRA lists could not be refreshed after the job ({type(e).__name__}: {e})")

    def model_info(self) -> dict:
        info = super().model_info()
        if not info.get("loaded"):
            reason = self.refusal()
            if reason:
                info["problem"] = reason
        return info

    def default_output_dir(self) -> str:
        # read each time: a changed setting applies without a restart
        return output_dir() or super().default_output_dir()

    # A folder inside a LoRA folder would be a folder button on the card pages: samples and grids of LoRAs saved
    # there go to the image folder instead, under the same subfolder path; elsewhere they stay beside the LoRAs.
    def samples_dir(self, output_dir: str, name: str) -> str:
        rel = _in_lora_dir(output_dir)
        return super().samples_dir(output_dir, name) if rel is None else os.path.join(images_dir(), "samples",
                                                                                       *rel, name)

    def lora_folder_note(self, folder: str) -> str | None:
        if not folder or _in_lora_dir(folder) is not None or not lora_dirs():
            return None
        return (f"{folder} is outside the WebUI's LoRA folder ({lora_dirs()[0]}): LoRAs saved there get no cards, "
                "and <lora:…> tags do not find them until they are copied there")

    def lora_tag(self, path: str, weight: float) -> str:
        note = self.lora_folder_note(os.path.dirname(os.path.abspath(path)))
        if note:  # (a tag txt2img cannot resolve, or one that finds another file of that name)
            raise UiError(f"{os.path.basename(path)}: {note}. Copy it there, then use <lora:"
                          f"{os.path.splitext(os.path.basename(path))[0]}:{float(weight):g}>")
        return super().lora_tag(path, weight)

    def grids_dir(self, lora_file: str) -> str:
        rel = _in_lora_dir(os.path.dirname(lora_file))
        return super().grids_dir(lora_file) if rel is None else os.path.join(images_dir(), "grids", *rel)

    def prepare_model(self, host) -> None:
        # LoRAs merged by the last generation must not be baked into a grid or a training run
        self.session.restore()


def _in_lora_dir(folder: str) -> list[str] | None:
    """``folder``'s path inside the first LoRA folder holding it ([] for the LoRA folder itself), else None."""
    real = os.path.realpath(folder)
    for root in lora_dirs():
        try:
            rel = os.path.relpath(real, os.path.realpath(root))
        except ValueError:  # (Windows: another drive)
            continue
        if rel == ".":
            return []
        if rel != ".." and not rel.startswith(".." + os.sep) and not os.path.isabs(rel):
            return rel.split(os.sep)
    return None


def output_dir() -> str:
    """Setting lora_studio_output_dir, else the first LoRA folder (new LoRAs show up as cards)."""
    return (opt("lora_studio_output_dir", "") or "").strip() or (lora_dirs() or [data_dir()])[0]


class Studio:
    """Created once per session, lazily: the queue thread starts only when the WebUI is up."""

    def __init__(self, session):
        self.session = session
        root = data_dir()
        self.store_dir = os.path.join(root, "jobs")
        self.backend = WebUIBackend(session, self.store_dir, output_dir())
        if self.backend.queue.load_error:
            console(self.backend.queue.load_error)

    def allowed_roots(self) -> list[str]:
        extra = [p.strip() for p in (opt("lora_studio_api_roots", "") or "").replace("\n", ",").split(",")
                 if p.strip()]
        return [data_dir(), *lora_dirs(), images_dir(), *extra]  # (images_dir: the jobs' samples, served)

    def mount_api(self, app):
        from ..api import mount

        def model():
            info = self.backend.model_info()
            return info if info.get("loaded") else None

        return mount(app, self.backend.queue, allowed_roots=self.allowed_roots,
                     default_root=lambda: self.backend.default_output_dir(),
                     api_auth=cmd_opt("api_auth", None),
                     access_disabled=lambda: bool(cmd_opt("disable_extension_access", False)),
                     get_model=model, default_output_dir=lambda: self.backend.default_output_dir(),
                     roots_setting="lora_studio_api_roots", check_network=self.backend.network_problems,
                     grid=self.backend.job_grid, folder_note=self.backend.lora_folder_note)

    def tab(self):
        from ..ui.tab import on_ui_tabs_entry
        return on_ui_tabs_entry(self.backend)

    def stop(self, timeout: float | None = None):
        # (long enough for a step and a state: a reload's next queue must not start the job while this one saves)
        self.backend.stop(STOP_WAIT_S if timeout is None else timeout)

    def running_job(self):
        return next((j for j in self.backend.queue.list() if j.status == "running"), None)


# ---- stopping the WebUI under a running job ----------------------------------------------------------------------
# A1111 exits at once on Ctrl-C (os._exit) and a SIGTERM (a rented machine or container being stopped) kills it: a
# running job would lose the work since its last save. Our handlers let it save a state first and keep it in the
# queue (it continues when the WebUI starts again); a second signal exits at once. Installed once per process, for
# whichever Studio is current (a UI reload makes a new one).
STOP_WAIT_S = 60.0
_stop_state = {"studio": None, "installed": False, "stopping": False}


def install_stop_handlers(studio) -> bool:
    import signal

    _stop_state["studio"] = studio
    if _stop_state["installed"] or threading.current_thread() is not threading.main_thread():
        return _stop_state["installed"]
    for sig in (signal.SIGINT, signal.SIGTERM):
        previous = signal.getsignal(sig)
        signal.signal(sig, lambda signum, frame, previous=previous: _on_stop_signal(signum, frame, previous))
    _stop_state["installed"] = True
    return True


def _on_stop_signal(signum, frame, previous):
    studio = _stop_state["studio"]
    job = studio.running_job() if studio is not None else None
    if job is not None and not _stop_state["stopping"]:
        _stop_state["stopping"] = True
        console(f"job '{job.name}' is saving a resumable state before the WebUI stops (send the signal again to "
                "stop at once)")
        studio.stop(STOP_WAIT_S)  # (the queue prints how the job ended)
    _pass_on(signum, frame, previous)


def _pass_on(signum, frame, previous):
    import signal

    if callable(previous):
        previous(signum, frame)
    elif previous == signal.SIG_DFL:  # (SIGTERM's default: end the process, as the signal meant)
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
