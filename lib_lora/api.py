"""HTTP routes for headless / batch training: ``/lora-studio/v1/...`` on the WebUI's FastAPI app.

The glue calls ``mount(app, queue, ...)`` from ``on_app_started(demo, app)`` (``demo`` is None under ``--nowebui``;
the routes are the same). Nothing here imports ``modules.*``: what the WebUI knows (``--api-auth``,
``cmd_opts.disable_extension_access``, the allowed folders, the loaded model) comes in as values or callables.

Safety rules (A1111 gives extension routes no auth and no path policy of their own, reference §10):
- ``--api-auth u:p,u2:p2`` -> HTTP Basic on every route here (401 otherwise), compared with ``secrets.compare_digest``;
- ``cmd_opts.disable_extension_access`` (A1111 v1.10.1 ``shared_cmd_options.py``: set by ``--share``, ``--listen``,
  ``--ngrok`` or ``--server-name`` unless ``--enable-insecure-extension-access``) -> no route is mounted; every
  path under the prefix answers 403 saying which flag to use;
- every path in a submitted config must resolve (realpath, symlinks followed) inside an allowed root; relative paths
  resolve against the default root; otherwise 403 naming the setting that lists the roots;
- downloads serve only the files a job recorded as its outputs, looked up by name (no path from the request is used).
"""

from __future__ import annotations

import copy
import json
import math
import os
import secrets
import tomllib
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Union
from urllib.parse import quote

from fastapi import APIRouter, Body, Depends, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from fastapi.responses import FileResponse, JSONResponse
from fastapi.security import HTTPBasic, HTTPBasicCredentials
from pydantic import BaseModel, conint

from .jobs.queue import ACTIVE, FINISHED, INTERRUPTED, QUEUED, RUNNING, STATUS_PAST, same_files_job
from .train import kohya_gui
from .train.dataset import metadata_image
from .train.lyco import PRESETS as LYCO_PRESETS
from .train.saving import output_dir_problem
from .train.sd_latents import find_latent
from .train.support import loaded_model_notes
from .train.config import (TrainConfigError, load_dataset_config, parse_train_config, parse_train_config_text,
                           translate_gui_preset)

PREFIX = "/lora-studio/v1"
API_VERSION = 1

# Config keys holding a filesystem path the trainer reads or writes.
PATH_KEYS = ("train_data_dir", "reg_data_dir", "dataset_config", "output_dir", "network_weights", "sample_prompts",
             "resume", "logging_dir", "vae", "base_weights", "in_json")
# Folders whose files a job reads: links inside them are checked too.
TREE_KEYS = ("train_data_dir", "reg_data_dir")
# Keys used as file-name parts inside output_dir / logging_dir: a separator there would write elsewhere.
NAME_KEYS = ("output_name", "log_prefix")

DEFAULT_ROOTS_SETTING = "Settings → LoRA Studio → \"Folders the HTTP API may read and write\" (lora_studio_api_roots)"

DISABLED_MESSAGE = (
    "LoRA Studio's HTTP API is off: the WebUI was started with --listen, --share, --ngrok or --server-name, and "
    "A1111 then disables extension access (cmd_opts.disable_extension_access). A training job reads and writes "
    "files on this machine, so it is not offered to the network by default. To use it anyway, restart with "
    "--enable-insecure-extension-access and also --api-auth user:password so the routes require a password."
)

ValueOrCallable = Union[Any, Callable[[], Any]]


def _value(v: ValueOrCallable):
    return v() if callable(v) else v


# ---------------------------------------------------------------------------------------------------------------
# path policy


class PathRefused(Exception):
    """A path in a request points outside the allowed roots; the message says which key and what to change."""


class PathPolicy:
    """Resolves request paths and refuses those outside the allowed roots.

    ``roots`` and ``default_root`` may be callables so a settings change applies without a restart. The runner can
    call ``check_config`` again when a job starts: a symlink swapped after submit is caught then.
    """

    def __init__(self, roots: ValueOrCallable, default_root: ValueOrCallable = None,
                 setting: str = DEFAULT_ROOTS_SETTING):
        self._roots = roots
        self._default_root = default_root
        self.setting = setting

    def roots(self) -> list[str]:
        out = []
        for r in _value(self._roots) or []:
            if r:
                out.append(os.path.realpath(os.path.expanduser(os.fspath(r))))
        return list(dict.fromkeys(out))  # (the built-in's two LoRA folder flags often name one folder)

    def default_root(self) -> str | None:
        d = _value(self._default_root)
        if d:
            return os.path.realpath(os.path.expanduser(os.fspath(d)))
        roots = self.roots()
        return roots[0] if roots else None

    @staticmethod
    def _inside(path: str, root: str) -> bool:
        p, r = os.path.normcase(path), os.path.normcase(root)
        try:
            return os.path.commonpath([p, r]) == r
        except ValueError:  # different drives on Windows
            return False

    def is_allowed(self, real_path: str) -> bool:
        return any(self._inside(real_path, r) for r in self.roots())

    def resolve(self, value: str, key: str, base: str | None = None) -> str:
        """The real absolute path of ``value`` (relative to ``base`` or the default root), or PathRefused."""
        roots = self.roots()
        if not roots:
            raise PathRefused(f"{key} = {value!r} refused: no folders are allowed for the HTTP API. "
                              f"Add one in {self.setting}.")
        try:
            p = os.path.expanduser(os.fspath(value))
            if not os.path.isabs(p):
                base = base or self.default_root()
                p = os.path.join(base, p)
            real = os.path.realpath(p)
        except (TypeError, ValueError) as e:  # NUL bytes, non-string values
            raise PathRefused(f"{key} = {value!r} is not a usable path ({e})") from e
        if not self.is_allowed(real):
            raise PathRefused(
                f"{key} = {value!r} resolves to {real!r}, which is outside the folders the HTTP API may use "
                f"({', '.join(roots)}). Move the files into one of them, or add the folder in {self.setting}."
            )
        return real

    def check_config(self, config: dict) -> dict:
        """A copy of ``config`` (sections or flat keys) with every path key replaced by its checked real path.

        Every occurrence is checked, not only the one sd-scripts' merge keeps. A dataset config's image_dir
        entries are checked too (resolved against the dataset file's folder, as the trainer does).
        """
        out = copy.deepcopy(config)
        tables = [out] + [v for v in out.values() if isinstance(v, dict)]
        dataset_files = []
        for table in tables:
            for key in PATH_KEYS:
                v = table.get(key)
                if isinstance(v, str) and v.strip():
                    table[key] = self.resolve(v, key)
                    if key == "dataset_config":
                        dataset_files.append(table[key])
                elif isinstance(v, list):  # base_weights: every file of the list
                    table[key] = [self.resolve(x, key) if isinstance(x, str) and x.strip() else x for x in v]
            args = table.get("network_args")
            if isinstance(args, (list, str)) and args:  # a LyCORIS preset file is read too
                items = args.split() if isinstance(args, str) else list(args)
                for i, item in enumerate(items):
                    k, sep, v = item.partition("=") if isinstance(item, str) else ("", "", "")
                    v = v.strip().strip("\"'")
                    if sep and k.strip() == "preset" and v not in LYCO_PRESETS:
                        items[i] = "preset=" + self.resolve(v, "network_args preset")
                table["network_args"] = " ".join(items) if isinstance(args, str) else items
            for key in NAME_KEYS:
                v = table.get(key)
                if isinstance(v, str) and (v in (".", "..") or "/" in v or "\\" in v or "\0" in v):
                    raise PathRefused(f"{key} = {v!r} refused: it must be a plain file name, not a path "
                                      "(the files are written into output_dir)")
        for table in tables:  # a link inside a data folder must not read from outside either
            for key in TREE_KEYS:
                if isinstance(table.get(key), str) and table[key]:
                    self._check_tree(table[key], key)
        first = lambda key: next((t[key] for t in tables if isinstance(t.get(key), str) and t[key]), None)  # noqa: E731
        if first("in_json"):
            self._check_metadata_keys(first("in_json"), first("train_data_dir"), "in_json")
        for path in dataset_files:
            specs, _notes = load_dataset_config(path)
            for ds in specs:
                for sub in ds.subsets:
                    if sub.image_dir:
                        what = f"image_dir in {os.path.basename(path)}"
                        self._check_tree(self.resolve(sub.image_dir, what), what)
                    if sub.conditioning_data_dir:  # (masked_loss reads its mask images)
                        what = f"conditioning_data_dir in {os.path.basename(path)}"
                        self._check_tree(self.resolve(sub.conditioning_data_dir, what), what)
                    if sub.metadata_file:
                        meta = self.resolve(sub.metadata_file, f"metadata_file in {os.path.basename(path)}")
                        self._check_metadata_keys(meta, sub.image_dir, f"metadata_file in {os.path.basename(path)}")
        return out

    def _check_tree(self, folder: str, what: str) -> None:
        """Every symbolic link below a data folder (a subset folder, an image, a caption) must resolve inside the
        allowed folders: the dataset reads through links."""
        seen = set()
        for top, dirs, files in os.walk(folder, followlinks=True):
            real_top = os.path.realpath(top)
            if real_top in seen:  # (a link loop)
                dirs[:] = []
                continue
            seen.add(real_top)
            for name in dirs + files:
                p = os.path.join(top, name)
                if os.path.islink(p):
                    real = os.path.realpath(p)
                    if not self.is_allowed(real):
                        raise PathRefused(f"{what}: {p!r} is a link to {real!r}, which is outside the folders the "
                                          f"HTTP API may use ({', '.join(self.roots())}). Copy the files in instead "
                                          f"of linking them, or add the folder in {self.setting}.")

    def _check_metadata_keys(self, meta_path: str, image_dir: str | None, what: str) -> None:
        """A fine-tuning metadata file names its images by key (a full path, or a name in image_dir): every file
        a key would read (the image, or its cached latent) must be inside the allowed folders too."""
        try:
            with open(meta_path, encoding="utf-8") as f:
                metadata = json.load(f)
        except (OSError, ValueError):  # (missing or not JSON: the dataset plan says so)
            return
        if not isinstance(metadata, dict):
            return
        for key in metadata:
            found = metadata_image(key, image_dir) if isinstance(key, str) and "\0" not in key else None
            paths = [found] if found is not None else find_latent(key, image_dir)[:1]
            for p in paths:
                real = os.path.realpath(p)
                if not self.is_allowed(real):
                    raise PathRefused(f"{what}: the metadata key {key!r} reads {real!r}, which is outside the "
                                      f"folders the HTTP API may use ({', '.join(self.roots())}). Move the images "
                                      f"into one of them, or add the folder in {self.setting}.")


# ---------------------------------------------------------------------------------------------------------------
# auth


def parse_api_auth(api_auth: str | None) -> list[tuple[bytes, bytes]] | None:
    """``--api-auth`` as A1111 reads it (``u:p,u2:p2``); None when not set. Entries without ':' are skipped,
    so a typo locks the routes instead of opening them."""
    if not api_auth:
        return None
    creds = []
    for entry in api_auth.split(","):
        user, sep, password = entry.partition(":")
        if sep:
            creds.append((user.encode("utf-8"), password.encode("utf-8")))
    return creds


def _make_auth(creds: list[tuple[bytes, bytes]] | None):
    basic = HTTPBasic(auto_error=False)

    def auth(credentials: Optional[HTTPBasicCredentials] = Depends(basic)):
        if creds is None:
            return True
        if credentials is not None:
            u, p = credentials.username.encode("utf-8"), credentials.password.encode("utf-8")
            ok = False
            for cu, cp in creds:  # no early exit: timing does not tell which user exists
                ok |= secrets.compare_digest(u, cu) & secrets.compare_digest(p, cp)
            if ok:
                return True
        raise HTTPException(status_code=401, detail="LoRA Studio API: incorrect or missing username/password "
                            "(the WebUI was started with --api-auth; send HTTP Basic credentials)",
                            headers={"WWW-Authenticate": "Basic"})

    return auth


# ---------------------------------------------------------------------------------------------------------------
# request models (pydantic v1)


class MoveRequest(BaseModel):
    position: conint(ge=0)  # 0 = next waiting job to run


class GridRequest(BaseModel):
    prompt: str  # with the trigger word
    negative_prompt: str = ""
    files: Optional[List[str]] = None  # names from GET /jobs/{id}/files (default: every LoRA file the job saved)
    strengths: List[float] = [0.5, 0.7, 0.8, 1.0]
    seeds: List[conint(strict=True, ge=0)] = [1, 2]  # (fixed seeds: -1 would be a random one per picture)
    width: Optional[conint(strict=True, ge=64)] = None  # default 512
    height: Optional[conint(strict=True, ge=64)] = None
    steps: Optional[conint(strict=True, ge=1, le=1000)] = None  # default: the tab's (20)
    send_images: bool = True  # each cell's PNG as base64, as /sdapi/v1/txt2img sends them

    class Config:
        extra = "forbid"  # ("negative" or "seed" for "negative_prompt"/"seeds" would be dropped without a word)


MAX_GRID_PICTURES = 400  # (one request holds the model; a typo such as seeds 1..1000 must not hold it for hours)


# ---------------------------------------------------------------------------------------------------------------
# helpers


def _json_safe(v):
    """Starlette's JSONResponse refuses NaN/inf (allow_nan=False); a diverged loss must not break status."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {str(k): _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    if v is None or isinstance(v, (str, int, bool)):
        return v
    return str(v)


def _infotext(png_path: str) -> str | None:
    """A picture's PNG info ('parameters'), as /sdapi/v1/png-info reads it."""
    from PIL import Image

    try:
        with Image.open(png_path) as im:
            return im.text.get("parameters")
    except OSError:
        return None


def _public(job) -> dict:
    for _ in range(3):
        try:
            return job.public()
        except RuntimeError:  # a list/dict grew while the worker thread appended to it: read again
            continue
    return job.public()


@dataclass
class _OutputFile:
    name: str
    path: str
    kind: str  # lora | sample | state


def _outputs(job) -> list[_OutputFile]:
    """The files the job itself recorded, each under its base name (first one wins on a clash)."""
    seen: dict[str, _OutputFile] = {}
    items: list[tuple[str, str]] = [(p, "lora") for p in list(job.files)]
    items += [(s.get("path"), "sample") for s in list(job.samples) if isinstance(s, dict)]
    # every state it saved (save_state each epoch: resume from an earlier one too), the newest last
    items += [(p, "state") for p in [*getattr(job, "states", []), job.resume_state] if p]
    for path, kind in items:
        if not path:
            continue
        name = os.path.basename(os.fspath(path))
        if name and name not in seen:
            seen[name] = _OutputFile(name, os.fspath(path), kind)
    return list(seen.values())


class _Api:
    def __init__(self, queue, policy: PathPolicy, get_model, default_output_dir, prefix, check_network=None,
                 grid=None, folder_note=None):
        self.check_network = check_network
        self.folder_note = folder_note
        self.render_grid = grid
        self.queue = queue
        self.policy = policy
        self.get_model = get_model
        self.default_output_dir = default_output_dir
        self.prefix = prefix

    # ---- helpers
    def _job(self, job_id: str):
        job = self.queue.get(job_id)
        if job is None:
            raise HTTPException(404, detail=f"no job with id {job_id!r}")
        return job

    def _position(self, job) -> int | None:
        waiting = [j.id for j in self.queue.list() if j.status in (QUEUED, INTERRUPTED)]
        return waiting.index(job.id) if job.id in waiting else None

    def _describe(self, job, since: int | None = None, with_losses: bool = True) -> dict:
        d = _public(job)
        losses = d.get("losses") or []
        d["loss_points"] = len(losses)
        if not with_losses:
            d.pop("losses", None)
        elif since is not None:
            d["losses"] = [pt for pt in losses if pt and pt[0] > since]
        d["queue_position"] = self._position(job)
        d["files_url"] = f"{self.prefix}/jobs/{job.id}/files"
        return d

    def _model_info(self) -> dict | None:
        if self.get_model is None:
            return None
        info = self.get_model()
        return dict(info) if info else None

    def _settings_problems(self, cfg, family: str | None = None, folders: bool = True) -> tuple[list[str], list[str]]:
        """check_support's (problems, notes), then what building the network on the loaded model would stop on,
        and an output folder the files could not be written to."""
        from .train.support import check_support, input_file_problems
        problems, notes = check_support(cfg, family)
        problems += input_file_problems(cfg, family, folders)
        if not problems and self.check_network is not None:
            problems += self.check_network(cfg)
        out = output_dir_problem(str(cfg.resolve(cfg.output_dir))) if cfg.output_dir else None
        return problems + ([out] if out else []), notes

    def _check_run(self, cfg, family: str | None, space: bool = True) -> tuple[list[str], list[str], str]:
        """(problems, notes, the dataset plan's report) of a checked config, as the run would find them for the
        loaded model ``family``; the images' headers are read, their pixels are not. ``space``: the free disk
        space too (a dry run; a queued job may wait for room to be made)."""
        from .train.dataset import build_plan
        from .train.support import dry_run_space_problems, resume_data_notes
        problems, notes = self._settings_problems(cfg, family, folders=False)  # (the plan reports those)
        plan = build_plan(cfg, family=family, check_pixels=False)
        problems += [f.message for f in plan.errors]
        notes += [f.message for f in plan.warnings]
        state = self._resume_state(cfg)
        if state is not None and plan.steps is not None:  # (other data than the state's run: as the run says it)
            notes += resume_data_notes(os.path.basename(str(cfg.resume)), state, plan)
        if space and not problems and plan.steps is not None:
            space, note = dry_run_space_problems(cfg, family, plan.steps.num_epochs, plan.steps.max_train_steps,
                                                 int((state or {}).get("step") or 0))
            problems += [space] if space else []
            notes += [note] if note else []
        return problems, notes, plan.report()

    @staticmethod
    def _resume_state(cfg) -> dict | None:
        """A config's resume state, its tensors memory-mapped (None without one, or when it cannot be read: the
        other checks say why)."""
        if not cfg.resume:
            return None
        from .train.saving import StateFileError, load_state
        try:
            return load_state(str(cfg.resolve(cfg.resume)), check_only=True)
        except (StateFileError, OSError, ValueError):
            return None

    def _output_notes(self, cfg) -> list[str]:
        """Another waiting or running job that writes the same files is refused (409): the later run would
        overwrite the earlier one's LoRAs and states while both are listed as their own. A file already there is
        said (sd-scripts overwrites it too)."""
        out, name = str(cfg.resolve(cfg.output_dir)), cfg.output_name or "lora"
        job = same_files_job(self.queue.list(), cfg)
        if job is not None:
            raise HTTPException(409, detail=f"job {job.name} ({job.id}) is {job.status} and writes the same files "
                                            f"({name}*.safetensors in {out}); give this job another output_name "
                                            "or output_dir, or queue it after that one has finished")
        final = os.path.join(out, name + ".safetensors")
        said = [f"{final} already exists: this job overwrites it (and its epoch files of the same name)"] \
            if os.path.exists(final) else []
        outside = self.folder_note(out) if self.folder_note is not None else None
        return said + ([outside] if outside else [])  # (the Train tab warns of it too)

    # ---- routes
    def submit(self, request: Request,
               body: Dict[str, Any] = Body(..., description="training config (sections or flat keys) or "
                                                            "{\"toml\": \"<text>\"}"),
               name: Optional[str] = Query(None, description="job name (default: output_name)"),
               dry_run: bool = Query(False, description="validate only; queue nothing")):
        unknown = sorted(set(request.query_params) - {"name", "dry_run"})
        if unknown:  # (a misspelled ?dryrun=true must not queue a real job)
            raise HTTPException(422, detail=f"unknown query parameter(s) {', '.join(unknown)}: POST /jobs takes "
                                            "name and dry_run")
        try:
            if isinstance(body.get("toml"), str):
                extra = set(body) - {"toml"}
                if extra:
                    raise TrainConfigError(f"with \"toml\" the body takes no other keys; got {sorted(extra)}")
                cfg = parse_train_config_text(body["toml"], source="<request toml>")
                raw, gui_notes = tomllib.loads(body["toml"]), []
            else:
                raw, gui_notes = body, []
                if kohya_gui.is_gui_preset(body):  # the folders are checked (and the job kept) as sd-scripts keys
                    raw, gui_notes, prompt_text = translate_gui_preset(body, "<request>")
                    if prompt_text:
                        gui_notes.append("the preset's sample prompts are text; over the API give sample_prompts "
                                         "as the path of a prompt file")
                cfg = parse_train_config(raw, source="<request>")
        except TrainConfigError as e:
            raise HTTPException(422, detail=str(e)) from e
        notes = gui_notes + [n for n in cfg.notes if n not in gui_notes]
        if not cfg.train_data_dir and not cfg.dataset_config:
            raise HTTPException(422, detail="no train_data_dir (and no dataset_config) is set: say where the images are")
        if not cfg.output_dir:
            default_out = _value(self.default_output_dir)
            if not default_out:
                raise HTTPException(422, detail="output_dir is not set: choose the folder the LoRA files are written to")
            raw = {**raw, "output_dir": os.fspath(default_out)}
            notes.append(f"output_dir not set: the files are written to {os.fspath(default_out)}")
        try:
            config = self.policy.check_config(raw)
        except PathRefused as e:
            raise HTTPException(403, detail=str(e)) from e
        except TrainConfigError as e:  # the dataset config named in the request is unreadable or invalid
            raise HTTPException(422, detail=str(e)) from e
        try:
            model = self._model_info()
        except Exception as e:  # the job is still worth queueing; say why the model is unknown
            model = None
            notes.append(f"the loaded model could not be read ({type(e).__name__}: {e})")
        checked = parse_train_config(config, source="<request>")  # (the config on the checked real paths)
        # (the run cannot know these; the model keys as the user wrote them)
        said = loaded_model_notes(cfg, model) + self._output_notes(checked)
        notes = said + [n for n in notes if n not in said]
        if dry_run:  # the whole check a run starts with: settings for the loaded model, and the dataset plan
            problems, plan_notes, report = self._check_run(checked, (model or {}).get("family"))
            if problems:
                raise HTTPException(422, detail="this job would not train:\n" + "\n".join(f"- {p}" for p in problems)
                                    + (f"\n\n{report}" if report else ""))
            return JSONResponse(_json_safe({"ok": True, "config": config,
                                            "notes": notes + [n for n in plan_notes if n not in notes],
                                            "plan": report}))
        # (on the checked paths: a LyCORIS preset file is read there). Settings no model can train with, or a
        # dataset no batch can be formed from, are not worth a queue slot: the Train tab refuses them too.
        problems, plan_notes, report = self._check_run(checked, (model or {}).get("family"), space=False)
        if problems:
            raise HTTPException(422, detail="this job would not train:\n" + "\n".join(f"- {p}" for p in problems)
                                + (f"\n\n{report}" if report else ""))
        notes += [n for n in plan_notes if n not in notes]
        job = self.queue.submit(config, name=name or cfg.output_name, model=model or {})
        # the parse notes show while the job waits; the runner's result replaces them with its full list
        job.notes.extend([n for n in notes if n not in job.notes])
        job.kept_notes = list(gui_notes) + said
        return JSONResponse(_json_safe(self._describe(job)), status_code=201)

    def list_jobs(self, status: Optional[str] = Query(None, description="only these statuses, comma-separated "
                                                                        "(e.g. queued,running)"),
                  offset: int = Query(0, ge=0, description="skip this many jobs (of those matching)"),
                  limit: Optional[int] = Query(None, ge=1, description="at most this many jobs")):
        wanted = {s.strip() for s in status.split(",") if s.strip()} if status else None
        known = {*ACTIVE, *FINISHED}
        if wanted and not wanted <= known:
            raise HTTPException(422, detail=f"unknown status {', '.join(sorted(wanted - known))}; choose from "
                                            f"{', '.join(sorted(known))}")
        jobs = [j for j in self.queue.list() if wanted is None or j.status in wanted]
        page = jobs[offset:None if limit is None else offset + limit]
        return JSONResponse(_json_safe({"jobs": [self._describe(j, with_losses=False) for j in page],
                                        "total": len(jobs), "offset": offset}))

    def get_job(self, job_id: str, since: Optional[int] = Query(None, description="only loss points after this step")):
        return JSONResponse(_json_safe(self._describe(self._job(job_id), since=since)))

    def cancel(self, job_id: str):
        job = self._job(job_id)
        if job.status in FINISHED:
            past = STATUS_PAST.get(job.status, job.status)
            raise HTTPException(409, detail=f"job {job.name} ({job_id}) has already {past}; nothing to cancel")
        job = self.queue.cancel(job_id)
        return JSONResponse(_json_safe(self._describe(job, with_losses=False)))

    def remove(self, job_id: str):
        job = self._job(job_id)
        if job.status == RUNNING:
            raise HTTPException(409, detail=f"job {job.name} ({job_id}) is running; cancel it first "
                                            f"(POST {self.prefix}/jobs/{job_id}/cancel)")
        try:
            self.queue.remove(job_id)
        except KeyError as e:
            raise HTTPException(404, detail=str(e).strip("'\"")) from e
        except ValueError as e:  # it started between the check and the removal
            raise HTTPException(409, detail=str(e)) from e
        return {"removed": job_id}

    def clear_finished(self, keep_resumable: bool = Query(True, description="keep cancelled or failed jobs whose "
                                                                          "resumable state is still on disk")):
        removed, kept = self.queue.clear_finished(keep_resumable=keep_resumable)
        return {"removed": [j.id for j in removed],
                "kept": [{"id": j.id, "name": j.name, "status": j.status, "resume_state": j.resume_state}
                         for j in kept]}

    def move(self, job_id: str, req: MoveRequest):
        self._job(job_id)
        try:
            self.queue.move(job_id, req.position)
        except ValueError as e:
            raise HTTPException(409, detail=str(e)) from e
        except KeyError as e:
            raise HTTPException(404, detail=str(e).strip("'\"")) from e
        waiting = [self._describe(j, with_losses=False) for j in self.queue.list()
                   if j.status in (QUEUED, INTERRUPTED)]
        return JSONResponse(_json_safe({"job": job_id, "waiting": [{"id": w["id"], "name": w["name"]} for w in waiting]}))

    def files(self, job_id: str):
        job = self._job(job_id)
        out = []
        for f in _outputs(job):
            real = os.path.realpath(f.path)
            exists = os.path.isfile(real)
            out.append({"name": f.name, "kind": f.kind, "exists": exists,
                        "size": os.path.getsize(real) if exists else None,
                        "url": f"{self.prefix}/jobs/{job_id}/files/{quote(f.name)}"})
        return JSONResponse(_json_safe({"job": job_id, "files": out}))

    def download(self, job_id: str, name: str):
        job = self._job(job_id)
        # the name is only a key into the job's own list: no path from the request reaches the filesystem
        match = next((f for f in _outputs(job) if f.name == name), None)
        if match is None:
            raise HTTPException(404, detail=f"job {job_id} has no output file named {name!r}; "
                                            f"see GET {self.prefix}/jobs/{job_id}/files")
        real = os.path.realpath(match.path)
        if not self.policy.is_allowed(real):
            raise HTTPException(403, detail=f"{name!r} now resolves to {real!r}, outside the folders the HTTP API may "
                                            f"use; it is not served. Check {self.policy.setting}.")
        if not os.path.isfile(real):
            raise HTTPException(404, detail=f"{name!r} was recorded by the job but is no longer at {match.path!r} "
                                            "(moved or deleted)")
        # (Starlette guesses text/plain for .safetensors; a script saving the body wants bytes)
        media = "image/png" if name.lower().endswith(".png") else "application/octet-stream"
        return FileResponse(real, filename=name, media_type=media)

    def grid(self, job_id: str, req: GridRequest):
        import base64

        job = self._job(job_id)
        if self.render_grid is None:
            raise HTTPException(501, detail="grids are rendered only where a model is loaded (inside the WebUI)")
        n = len(req.strengths) * len(req.seeds) * (len(req.files) if req.files else len(job.files or []) or 1)
        if not req.strengths or not req.seeds:
            raise HTTPException(422, detail="give at least one strength and one seed")
        if n > MAX_GRID_PICTURES:
            raise HTTPException(422, detail=f"{n} pictures asked for; at most {MAX_GRID_PICTURES} per request "
                                            "(fewer files, strengths or seeds)")
        try:
            res = self.render_grid(job_id, req.prompt, files=req.files, strengths=req.strengths, seeds=req.seeds,
                                   negative_prompt=req.negative_prompt, width=req.width, height=req.height,
                                   steps=req.steps)
        except Exception as e:
            from .formats.errors import LoraError
            if isinstance(e, LoraError):  # (a file for another model family than the loaded one, a bad file)
                raise HTTPException(422, detail=str(e)) from e
            if not getattr(e, "user_error", False):
                raise
            busy = "busy training" in str(e)
            raise HTTPException(409 if busy or "no saved LoRA file" in str(e) else 422, detail=str(e)) from e

        def b64(path):
            with open(path, "rb") as f:
                return base64.b64encode(f.read()).decode("ascii")

        cells = []
        for fi, f in enumerate(res["files"]):
            for si, st in enumerate(res["strengths"]):
                for ki, seed in enumerate(res["seeds"]):
                    path = res["paths"][fi][si][ki]
                    name = os.path.splitext(os.path.basename(f))[0]
                    cell = {"file": os.path.basename(f), "row": res["labels"][fi], "strength": st, "seed": seed,
                            "tag": f"<lora:{name}:{st:g}>", "path": path, "infotext": _infotext(path)}
                    if req.send_images:
                        cell["image"] = b64(path)
                    cells.append(cell)
        return JSONResponse(_json_safe({"job": job_id, "saved_in": res["out_dir"],
                                        "grid": {"path": res["grid"], "image": b64(res["grid"])}, "cells": cells}))

    def model(self):
        try:
            info = self._model_info()
        except Exception as e:  # report, do not 500 with a traceback
            raise HTTPException(503, detail=f"the loaded model could not be read: {type(e).__name__}: {e}") from e
        if not info:
            return {"loaded": False, "message": "no model is loaded yet (the WebUI loads it in the background at "
                                                "startup; select one in the checkpoint list)"}
        return JSONResponse(_json_safe({"loaded": True, **info}))

    def info(self):
        return {"api_version": API_VERSION, "allowed_roots": self.policy.roots(),
                "default_root": self.policy.default_root(), "roots_setting": self.policy.setting}


# ---------------------------------------------------------------------------------------------------------------
# mounting


def validation_detail(errors: list[dict], body_keys: list[str] | None = None) -> str:
    """FastAPI's list of validation errors as one text, like every other error of this API: where (a query
    parameter, a body key such as seeds[0]) and what is wrong; an unknown body key with the keys it takes."""
    parts = []
    for e in errors:
        loc, kind, msg = list(e.get("loc") or []), e.get("type", ""), e.get("msg", "invalid")
        where = loc.pop(0) if loc and loc[0] in ("body", "query", "path") else "body"
        name = "".join(f"[{p}]" if isinstance(p, int) else f"{'.' if i else ''}{p}" for i, p in enumerate(loc))
        if kind == "value_error.jsondecode":
            parts.append(f"the body is not valid JSON ({msg})")
        elif where == "body" and not loc and kind == "type_error.dict":
            parts.append("the body must be a JSON object")
        elif where == "query":
            parts.append(f"query parameter {name}: {msg}")
        else:
            known = f" (it takes {', '.join(body_keys)})" if kind == "value_error.extra" and body_keys else ""
            parts.append(f"{name or 'the body'}: {msg}{known}")
    return "; ".join(dict.fromkeys(parts))


class _Route(APIRoute):
    """A request FastAPI cannot validate answers 422 with a ``detail`` text, as our own checks do, not FastAPI's
    list (a per-router route class: the WebUI's own handlers are left alone)."""

    def get_route_handler(self):
        handler = super().get_route_handler()
        model = getattr(getattr(self, "body_field", None), "type_", None)
        keys = list(getattr(model, "__fields__", {}) or {}) if isinstance(model, type) else None

        async def route(request):
            try:
                return await handler(request)
            except RequestValidationError as e:
                raise HTTPException(422, detail=validation_detail(e.errors(), keys)) from None
        return route


def _drop_routes(app, prefix: str) -> int:
    """Remove routes an earlier mount added (Reload UI on the same app): Starlette serves the first match, so old
    routes would keep serving the old queue."""
    keep = [r for r in app.router.routes if not getattr(r, "path", "").startswith(prefix)]
    dropped = len(app.router.routes) - len(keep)
    app.router.routes[:] = keep
    app.openapi_schema = None
    return dropped


def mount(app, queue, *, allowed_roots: ValueOrCallable, default_root: ValueOrCallable = None,
          api_auth: str | None = None, access_disabled: ValueOrCallable = False,
          get_model: Callable[[], dict | None] | None = None, default_output_dir: ValueOrCallable = None,
          roots_setting: str = DEFAULT_ROOTS_SETTING, prefix: str = PREFIX,
          check_network: Callable[[Any], list[str]] | None = None,
          grid: Callable[..., dict] | None = None,
          folder_note: Callable[[str], str | None] | None = None) -> PathPolicy | None:
    """Add the ``/lora-studio/v1`` routes to ``app`` (a FastAPI app; the WebUI's, or a fresh one in tests).

    queue: the ``JobQueue`` the tab and CLI share. allowed_roots: folders (list, or a callable returning one)
    request paths must stay in. default_root: where relative paths resolve (default: the first root).
    api_auth: ``cmd_opts.api_auth``. access_disabled: ``cmd_opts.disable_extension_access``.
    get_model: returns ``{name, hash, family, parameterization}`` of the loaded model, or None.
    default_output_dir: used when a config has no output_dir (else such a config is refused).
    check_network: given the parsed config, what building its network on the loaded model would stop on.
    grid: the backend's ``job_grid`` (renders a job's Results grid on the loaded model).
    folder_note: why LoRAs saved in a folder cannot be used by name (outside the WebUI's LoRA folders), or None.
    Returns the PathPolicy (the runner can re-check a job's paths with it), or None when access is disabled.
    """
    _drop_routes(app, prefix)
    if _value(access_disabled):
        def refused(rest: str = ""):
            raise HTTPException(403, detail=DISABLED_MESSAGE)
        methods = ["GET", "POST", "PUT", "PATCH", "DELETE"]
        app.add_api_route(prefix, refused, methods=methods, include_in_schema=False)
        app.add_api_route(prefix + "/{rest:path}", refused, methods=methods, include_in_schema=False)
        return None

    policy = PathPolicy(allowed_roots, default_root, roots_setting)
    api = _Api(queue, policy, get_model, default_output_dir, prefix, check_network, grid, folder_note)
    router = APIRouter(prefix=prefix, tags=["LoRA Studio"], dependencies=[Depends(_make_auth(parse_api_auth(api_auth)))],
                       route_class=_Route)
    router.add_api_route("/jobs", api.submit, methods=["POST"], status_code=201,
                         summary="Queue a training job (config as JSON sections/flat keys, or {\"toml\": text})")
    router.add_api_route("/jobs", api.list_jobs, methods=["GET"], summary="All jobs, in queue order")
    router.add_api_route("/jobs", api.clear_finished, methods=["DELETE"],
                         summary="Remove the finished jobs (done, cancelled, failed) from the list; files stay")
    router.add_api_route("/jobs/{job_id}", api.get_job, methods=["GET"], summary="Status, progress, loss, ETA")
    router.add_api_route("/jobs/{job_id}", api.remove, methods=["DELETE"], summary="Remove a waiting or finished job")
    router.add_api_route("/jobs/{job_id}/cancel", api.cancel, methods=["POST"], summary="Cancel a job")
    router.add_api_route("/jobs/{job_id}/move", api.move, methods=["POST"], summary="Reorder a waiting job")
    router.add_api_route("/jobs/{job_id}/files", api.files, methods=["GET"], summary="The job's output files")
    router.add_api_route("/jobs/{job_id}/files/{name}", api.download, methods=["GET"], summary="Download one output")
    router.add_api_route("/jobs/{job_id}/grid", api.grid, methods=["POST"],
                         summary="Render a job's saved files x strengths x seeds (the Results tab's grid)")
    router.add_api_route("/model", api.model, methods=["GET"], summary="The loaded model")
    router.add_api_route("/info", api.info, methods=["GET"], summary="API version and allowed folders")
    app.include_router(router)
    return policy


__all__ = ["DISABLED_MESSAGE", "GridRequest", "PATH_KEYS", "PREFIX", "MoveRequest", "PathPolicy", "PathRefused",
           "mount", "parse_api_auth"]
