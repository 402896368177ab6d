"""The training queue: jobs run one at a time, survive a restart, can be reordered, removed and cancelled.

The queue knows nothing about how a job trains: it calls a ``runner(job, emit, should_cancel)`` given by whoever
owns the model (the WebUI glue, the CLI or a test) and records the events it emits. The CLI, the HTTP API and the
tab all drive this same object and read the same events.
"""

from __future__ import annotations

import json
import os
import threading
import time
import traceback
import uuid
from dataclasses import asdict, dataclass, field

from ..formats.safetensors_io import write_atomic, write_error_reason

QUEUED, RUNNING, DONE, CANCELLED, FAILED, INTERRUPTED = "queued", "running", "done", "cancelled", "failed", "interrupted"
FINISHED = (DONE, CANCELLED, FAILED)
ACTIVE = (QUEUED, INTERRUPTED, RUNNING)  # waiting or running
STATUS_PAST = {DONE: "finished", CANCELLED: "been cancelled", FAILED: "failed"}  # "has already ..."


def _is_user_error(e: BaseException) -> bool:
    """Errors whose message already says what to do (bad config, missing folder, no model loaded)."""
    from ..formats.errors import LoraError
    return isinstance(e, LoraError) or getattr(e, "user_error", False)


@dataclass
class Job:
    id: str
    name: str
    config: dict                      # the training config as parsed TOML sections / flat keys
    status: str = QUEUED
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    model: dict = field(default_factory=dict)    # the model that was loaded when the job was queued
    step: int = 0
    total: int = 0
    epoch: int = 0
    epochs: int = 0
    loss: float | None = None
    avg_loss: float | None = None
    lr: float | None = None
    eta_s: float | None = None
    message: str = ""
    losses: list = field(default_factory=list)   # [step, loss]
    val_losses: list = field(default_factory=list)  # [step, validation loss] (validation_split)
    samples: list = field(default_factory=list)  # [{"epoch", "step", "path"}]
    files: list = field(default_factory=list)    # saved LoRA files
    notes: list = field(default_factory=list)
    kept_notes: list = field(default_factory=list)  # said at submission and not known to the run (a GUI preset)
    error: str | None = None
    resume_state: str | None = None
    resume_step: int | None = None    # the step resume_state was saved at
    states: list = field(default_factory=list)   # every resume state the run saved (resume_state: the newest)
    cancel_asked: bool = False        # kept in the file: a WebUI stopped mid-cancel does not run the job again

    def public(self) -> dict:
        d = asdict(self)
        d["progress"] = (self.step / self.total) if self.total else 0.0
        return d


def same_files_job(jobs: list[Job], cfg) -> Job | None:
    """A waiting or running job that writes the files a job of ``cfg`` would (same output_dir and output_name):
    the later run would overwrite the earlier one's LoRAs and states while both list them as their own."""
    from ..train.config import TrainConfigError, parse_train_config

    out, name = os.path.realpath(str(cfg.resolve(cfg.output_dir))), cfg.output_name or "lora"
    for job in jobs:
        if job.status not in ACTIVE:
            continue
        try:
            other = parse_train_config(dict(job.config), source=f"job {job.id}")
        except TrainConfigError:
            continue
        if (other.output_name or "lora") == name and os.path.realpath(str(other.resolve(other.output_dir))) == out:
            return job
    return None


def _usable_state(job: Job) -> str | None:
    return job.resume_state if job.resume_state and os.path.exists(job.resume_state) else None


def _restart_plan(job: Job, will: str = "will ") -> str:
    state = _usable_state(job)
    if state:
        at = f", step {job.resume_step}" if job.resume_step is not None else ""
        return f"it {will}continue{'' if will else 's'} from its last saved state ({os.path.basename(state)}{at})"
    return ("no resumable state had been saved (save_state keeps one with each save), so it "
            f"{will}start{'' if will else 's'} again from the beginning")


def _rewind(job: Job) -> None:
    """An interrupted job about to run again: its record restarts where the run will (the newest state, or the
    beginning); the run says its notes again."""
    note = "the WebUI stopped while this job ran; " + _restart_plan(job, will="")
    job.kept_notes = list(job.kept_notes) + [note]  # (kept through the run: its record says it was cut off)
    job.notes = list(job.kept_notes)
    if _usable_state(job):
        job.step = job.resume_step or 0
    else:
        job.resume_state = job.resume_step = None
        job.step, job.losses, job.val_losses, job.files, job.samples = 0, [], [], [], []
    job.error = None


class JobQueue:
    def __init__(self, store_dir: str, runner=None, autostart: bool = True):
        self.store_dir = store_dir
        os.makedirs(store_dir, exist_ok=True)
        self.path = os.path.join(store_dir, "queue.json")
        self.runner = runner
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self._cancel: set[str] = set()
        self._asked: set[str] = set()  # cancels the user asked for (not a stop of the queue)
        self._listeners = []
        self.jobs: list[Job] = []
        self.load_error: str | None = None
        self.save_error: str | None = None
        self._load()
        self._thread = None
        self._stop = False
        if autostart and runner is not None:
            self.start()

    # ---- persistence --------------------------------------------------------------------------------------
    def _load(self):
        if not os.path.exists(self.path):
            return
        try:
            with open(self.path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError) as e:
            # never lose the user's queue silently: keep the unreadable file aside and say so
            bad = self.path + f".unreadable-{int(time.time())}"
            os.replace(self.path, bad)
            self.load_error = f"the saved queue could not be read ({e}); it was kept as {bad}"
            return
        for d in data.get("jobs", []):
            known = {k: v for k, v in d.items() if k in Job.__dataclass_fields__}
            job = Job(**known)
            if job.status == RUNNING and job.cancel_asked:  # (the user's cancel stands)
                job.status, job.finished = CANCELLED, job.finished or time.time()
                job.message = ("cancelled (the WebUI stopped before the cancel was done); "
                               + ("the work so far is kept as a resumable state" if _usable_state(job) else
                                  "no resumable state was saved"))
            elif job.status == RUNNING:
                # the WebUI stopped mid-job: it goes back in line, to continue from its newest state if it has one
                job.status = INTERRUPTED
                job.message = "the WebUI stopped while this job ran; " + _restart_plan(job)
            self.jobs.append(job)

    def _save(self):
        """Best effort: the queue in memory is the one that runs; a full disk must not stop it or its job."""
        data = {"version": 1, "jobs": [asdict(j) for j in self.jobs]}
        try:
            write_atomic(self.path, lambda f: json.dump(data, f, indent=1, default=str), prefix=".queue-",
                         suffix=".json")
        except OSError as e:
            why = write_error_reason(e)
            problem = (f"the job queue could not be saved to {self.path} ({why}); it goes on running, but a WebUI "
                       "restart would not bring back what changed since. Free some space")
            if problem != self.save_error:
                print(f"LoRA Studio: {problem}", flush=True)
                for j in self.jobs:
                    if j.status == RUNNING and problem not in j.notes:
                        j.notes.append(problem)
            self.save_error = problem
            return
        if self.save_error:
            print("LoRA Studio: the job queue is saved again", flush=True)
            self.save_error = None

    # ---- public operations --------------------------------------------------------------------------------
    def subscribe(self, fn):
        self._listeners.append(fn)

    def submit(self, config: dict, name: str | None = None, model: dict | None = None) -> Job:
        with self._lock:
            job = Job(id=uuid.uuid4().hex[:12], name=name or str(config.get("output_name") or "lora"),
                      config=config, model=model or {})
            self.jobs.append(job)
            self._save()
            self._wake.notify_all()
        self._notify(job, "queued")
        return job

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return next((j for j in self.jobs if j.id == job_id), None)

    def list(self) -> list[Job]:
        with self._lock:
            return list(self.jobs)

    def pending(self) -> list[Job]:
        with self._lock:
            return [j for j in self.jobs if j.status in (QUEUED, INTERRUPTED)]

    def cancel(self, job_id: str) -> Job:
        with self._lock:
            job = self._need(job_id)
            if job.status in (QUEUED, INTERRUPTED):
                job.status, job.finished, job.message = CANCELLED, time.time(), "cancelled before it started"
                self._save()
            elif job.status == RUNNING:
                self._cancel.add(job_id)  # the runner sees it at the next step
                self._asked.add(job_id)
                job.message = "cancelling…"
                job.cancel_asked = True
                self._save()
        self._notify(job, "cancel")
        return job

    def remove(self, job_id: str) -> None:
        with self._lock:
            job = self._need(job_id)
            if job.status == RUNNING:
                raise ValueError(f"job {job.name} is running; cancel it first")
            self.jobs.remove(job)
            self._save()
        self._drop_plot(job_id)

    def clear_finished(self, keep_resumable: bool = True) -> tuple[list[Job], list[Job]]:
        """Take the finished jobs (done, cancelled, failed) off the list; their files stay. A job whose resumable
        state is still on disk is kept unless ``keep_resumable`` is off: the list is what the Resume button reads.
        Returns (removed, kept)."""
        with self._lock:
            ended = [j for j in self.jobs if j.status in FINISHED]
            kept = [j for j in ended if keep_resumable and j.status != DONE and _usable_state(j)]
            removed = [j for j in ended if j not in kept]
            if removed:
                gone = {j.id for j in removed}
                self.jobs = [j for j in self.jobs if j.id not in gone]
                self._save()
        for j in removed:
            self._drop_plot(j.id)
        return removed, kept

    def _drop_plot(self, job_id: str) -> None:
        try:  # (the tab's loss plot of the job, kept in the store: it goes with the job)
            os.remove(os.path.join(self.store_dir, "plots", f"{job_id}.png"))
        except OSError:
            pass

    def move(self, job_id: str, position: int) -> None:
        """Reorder waiting jobs; position counts among the waiting ones (0 = next to run)."""
        with self._lock:
            job = self._need(job_id)
            if job.status not in (QUEUED, INTERRUPTED):
                raise ValueError(f"only waiting jobs can be reordered; {job.name} is {job.status}")
            waiting = [j for j in self.jobs if j.status in (QUEUED, INTERRUPTED)]
            waiting.remove(job)
            position = max(0, min(position, len(waiting)))
            waiting.insert(position, job)
            rest = [j for j in self.jobs if j.status not in (QUEUED, INTERRUPTED)]
            self.jobs = rest + waiting
            self._save()

    def _need(self, job_id):
        job = self.get(job_id)
        if job is None:
            raise KeyError(f"no job with id {job_id}")
        return job

    # ---- worker -------------------------------------------------------------------------------------------
    def start(self):
        if self._thread and self._thread.is_alive():
            return
        self._stop = False
        self._thread = threading.Thread(target=self._worker, name="lora-studio-queue", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None):
        with self._lock:
            self._stop = True
            for j in self.jobs:
                if j.status == RUNNING:
                    self._cancel.add(j.id)
            self._wake.notify_all()
        if self._thread:
            self._thread.join(timeout)

    def wait_idle(self, timeout: float = 60.0) -> bool:
        end = time.time() + timeout
        while time.time() < end:
            with self._lock:
                if not any(j.status in ACTIVE for j in self.jobs):
                    return True
            time.sleep(0.05)
        return False

    def _next(self) -> Job | None:
        for j in self.jobs:
            if j.status in (QUEUED, INTERRUPTED):
                return j
        return None

    def _worker(self):
        while True:
            with self._lock:
                job = self._next()
                while job is None and not self._stop:
                    self._wake.wait(0.5)
                    job = self._next()
                if self._stop:
                    return
                if job.status == INTERRUPTED:
                    _rewind(job)
                job.status, job.started, job.message = RUNNING, time.time(), "starting"
                self._save()
            self.run_one(job)

    def run_one(self, job: Job):
        self._notify(job, "start")
        try:
            result = self.runner(job, lambda ev: self._on_event(job, ev), lambda: job.id in self._cancel)
            with self._lock:
                job.status = CANCELLED if getattr(result, "status", "done") == "cancelled" else DONE
                # (a run continued after a restart lists only its own saves; the earlier ones still on disk stay)
                ran = list(getattr(result, "files", job.files))
                job.files = [f for f in dict.fromkeys(job.files + ran) if f in ran or os.path.exists(f)]
                job.resume_state = getattr(result, "state_file", None)
                # (states the run pruned itself, save_last_n_epochs_state, are not listed as if kept)
                job.states = [p for p in job.states if p == job.resume_state or os.path.exists(p)]
                job.resume_step = getattr(result, "steps", None) if job.resume_state else None
                job.notes = list(dict.fromkeys(job.kept_notes + list(getattr(result, "notes", job.notes))
                                               + [n for n in job.notes if n == self.save_error]))
                job.message = ("finished" if job.status != CANCELLED else
                               "cancelled; the work so far is kept as a resumable state" if job.resume_state else
                               "cancelled before the first step; nothing was trained")
                if job.status == CANCELLED and self._stop and job.id not in self._asked:
                    # stopped by the WebUI going away, not by the user: it goes on when the queue runs again
                    job.status = INTERRUPTED
                    job.message = "the WebUI stopped while this job ran; " + _restart_plan(job)
        except Exception as e:  # any failure is recorded on the job and shown; the queue keeps going
            with self._lock:
                job.status = FAILED
                # (a message that says what to do needs no class name in front; a bug keeps it)
                job.error = str(e) if _is_user_error(e) else f"{type(e).__name__}: {e}"
                job.message = str(e)
                if not _is_user_error(e):  # a bug: keep the traceback for the report, and in the console
                    job.notes.append(traceback.format_exc(limit=8))
                    traceback.print_exc()
        finally:
            with self._lock:
                self._cancel.discard(job.id)
                self._asked.discard(job.id)
                job.finished = time.time()
                self._save()
        # (the console is where WebUI users look first, and the only record a headless server keeps)
        where = f" ({len(job.files)} file(s) in {os.path.dirname(os.path.abspath(job.files[-1]))})" if job.files else ""
        said = job.message if job.status in (DONE, CANCELLED) else f"{job.status}: {job.message}"
        print(f"LoRA Studio: job '{job.name}' {said}{where}", flush=True)
        self._notify(job, job.status)

    def _on_event(self, job: Job, ev):
        with self._lock:
            kind = ev.kind
            if kind in ("step", "cache"):
                job.step = ev.step if kind == "step" else job.step
                job.total = ev.total or job.total
                job.epoch, job.epochs = ev.epoch or job.epoch, ev.epochs or job.epochs
                if kind == "step":
                    job.loss, job.avg_loss, job.lr, job.eta_s = ev.loss, ev.avg_loss, ev.lr, ev.eta_s
                    # a run continued from a state (after a restart) starts again at an earlier step: its history
                    # from there on is rewritten, not repeated
                    if job.losses and job.losses[-1][0] >= ev.step:
                        job.losses = [p for p in job.losses if p[0] < ev.step]
                        job.val_losses = [p for p in job.val_losses if p[0] < ev.step]
                    job.losses.append([ev.step, ev.loss])
            if kind == "start" and ev.step:  # (a resumed run: its record starts at the state's step)
                job.step, job.total = ev.step, ev.total or job.total
            if kind == "validation":
                job.val_losses.append([ev.step, ev.loss])
            if kind == "save" and ev.path and ev.path not in job.files:
                job.files.append(ev.path)
            if kind == "state" and ev.path:
                job.resume_state, job.resume_step = ev.path, ev.step
                if ev.path not in job.states:
                    job.states.append(ev.path)
            if kind == "sample" and ev.path:
                job.samples = [s for s in job.samples if s.get("path") != ev.path]
                job.samples.append({"epoch": ev.epoch, "step": ev.step, "path": ev.path})
            if kind == "note":
                job.notes.append(ev.message)
                if (ev.extra or {}).get("console"):  # (e.g. a finished job waiting for disk space)
                    print(f"LoRA Studio: job '{job.name}': {ev.message}", flush=True)
            if ev.message and not (job.cancel_asked and kind in ("cache", "step")):  # ("cancelling…" stays)
                job.message = ev.message
            if kind in ("save", "state", "epoch", "sample", "note", "start", "validation"):
                self._save()
        self._notify(job, kind)

    def _notify(self, job, kind):
        for fn in list(self._listeners):
            try:
                fn(job, kind)
            except Exception:  # a broken listener (a closed browser tab) must not stop training
                traceback.print_exc()
