"""``python -m lib_lora train CONFIG.toml`` and ``python -m lib_lora quickstart``: training from the command line.

Wired into ``lib_lora/cli.py`` through ``add_commands(subparsers)``; handlers follow cli.py's convention
``func(args, out) -> exit code``: a user-fixable problem raises a ``LoraError`` (cli.main prints it as one line,
exit 1); bad arguments raise ``cli.UsageError`` (exit 2). A Ctrl-C during training saves a resumable state and
returns 130 with the command that resumes it.
"""

from __future__ import annotations

import os
import signal
import textwrap
import threading
import time

from .formats.errors import LoraError

EXIT_OK, EXIT_ERROR, EXIT_CANCELLED = 0, 1, 130
PROG = "python -m lib_lora"


class TrainCliError(LoraError):
    """A training problem the user can fix (wraps the trainer's TrainingError for cli.main)."""


# ---------------------------------------------------------------------------------------------------------------
# arguments

def add_commands(subparsers) -> None:
    """Add ``train`` and ``quickstart`` to cli.py's subparsers."""
    pt = subparsers.add_parser(
        "train", help="train a LoRA from an sd-scripts style TOML config (headless, no WebUI needed)",
        description=textwrap.fill(
            "Train a LoRA headless from an sd-scripts training config (TOML). The checkpoint comes from "
            "pretrained_model_name_or_path (a local SD1.x/SD2.x .safetensors; SDXL needs --webui). The dataset plan "
            "and every config note are printed first; Ctrl-C stops after the current step and saves a state you "
            "can --resume.", 100),
        epilog=f"examples:\n  {PROG} train my_lora.toml --dry-run\n  {PROG} train my_lora.toml --device cuda\n"
               f"  {PROG} train my_lora.toml --resume out/my_lora-cancelled-state.lsstate\n"
               f"  {PROG} train my_lora.toml --resume auto",
        formatter_class=_raw())
    pt.add_argument("config", metavar="CONFIG.toml", help="training config (sd-scripts --config_file format), or a "
                                                          "kohya_ss GUI preset (.json)")
    add_model_args(pt, "where to train (default: auto = the CUDA GPU when there is one, else the CPU)")
    pt.add_argument("--resume", metavar="STATE", help="continue from a state file (*-state.lsstate) of a cancelled or "
                                                      "saved run; 'auto': from this run's newest state when there "
                                                      "is one, else start (for restart scripts)")
    pt.add_argument("--dry-run", action="store_true", help="check the config, the checkpoint header and the "
                                                           "dataset, print the plan, and stop before loading")
    pt.add_argument("--model", metavar="CKPT", help="checkpoint to use instead of pretrained_model_name_or_path")
    pt.set_defaults(func=cmd_train)

    pq = subparsers.add_parser(
        "quickstart", help="train a tiny LoRA end to end on an embedded model (CPU, ~1 min, nothing downloaded)",
        description="Build an embedded tiny SD1.5-shaped model, write a small dataset, train a LoRA, measure the "
                    "loss before/after, apply the file through the <lora:...> path and restore it, and write a "
                    "loss plot and a before/after sample grid.")
    pq.add_argument("--out", metavar="DIR", default="lora-studio-quickstart",
                    help="output folder (default: ./lora-studio-quickstart)")
    pq.add_argument("--steps", type=int, default=None, metavar="N", help="training steps (default: 80)")
    pq.add_argument("--seed", type=int, default=0, help="seed of the model, data order and noise (default: 0)")
    pq.add_argument("--keep-model", action="store_true",
                    help="also write the tiny model (model/tiny-sd15.safetensors, ~260 MB) and train.toml, a config "
                         "for its dataset, to try `train` offline")
    pq.set_defaults(func=cmd_quickstart)


def _raw():
    import argparse
    return argparse.RawDescriptionHelpFormatter


# ---------------------------------------------------------------------------------------------------------------
# progress

def _fmt_eta(s: float | None) -> str:
    if s is None:
        return "?"
    s = int(max(0, s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


class ProgressPrinter:
    """Turns TrainEvents into lines: every step line (step/total, loss, avg, lr, ETA) at most every
    ``every_s`` seconds, plus the first and last step; notes, saves, samples and epochs always."""

    def __init__(self, out, every_s: float = 2.0, already_shown: set[str] | None = None):
        self.out = out
        self.every_s = every_s
        self.already_shown = already_shown or set()  # notes printed before training (the plan's warnings)
        self._last = 0.0
        self._last_cache = 0.0

    def _w(self, line: str):
        self.out.write(line + "\n")
        self.out.flush()

    def __call__(self, e) -> None:
        now = time.time()
        if e.kind == "step":
            if e.step in (1, e.total) or now - self._last >= self.every_s:
                self._last = now
                pct = 100.0 * e.step / e.total if e.total else 0.0
                self._w(f"step {e.step}/{e.total} ({pct:.0f}%)  loss {e.loss:.4f}  avg {e.avg_loss:.4f}  "
                        f"lr {e.lr:.2e}  ETA {_fmt_eta(e.eta_s)}")
        elif e.kind == "cache":
            n = e.extra.get("n", 0)
            if e.step == n or now - self._last_cache >= self.every_s:
                self._last_cache = now
                self._w(e.message)
        elif e.kind == "note":
            if e.message not in self.already_shown:
                self._w(f"note: {e.message}")
        elif e.kind in ("save", "sample"):
            self._w(f"{'saved' if e.kind == 'save' else 'sample'}: {e.path}")
        elif e.kind == "epoch":
            self._w(e.message)
        elif e.kind in ("start", "done", "error"):  # (a cancel is told after the run, with the resume command)
            if e.message:
                self._w(e.message)


class _CtrlC:
    """First Ctrl-C (or SIGTERM: a rented machine being stopped, `docker stop`) asks the trainer to stop after the
    current step (it saves a resumable state); a second one aborts at once. Only the main thread can own signal
    handlers; elsewhere the signals keep their default."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, err):
        self.err = err
        self.event = threading.Event()
        self._old = {}

    def _handler(self, signum, frame):
        if self.event.is_set():
            raise KeyboardInterrupt
        self.event.set()
        what = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        self.err.write(f"\n{what}: stopping after this step and saving a resumable state (before the first step, "
                       "while latents are cached, there is nothing to save); press Ctrl-C again to abort without "
                       "saving\n")
        self.err.flush()

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._handler) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, old in self._old.items():
            signal.signal(s, old)
        return False


# ---------------------------------------------------------------------------------------------------------------
# train

def _earlier_files(out_dir: str, output_name: str) -> tuple[list[str], list[str]]:
    """The LoRAs and the resume states that runs of this name wrote in the folder, each oldest first (another
    run's ``name-2.safetensors`` is not one of them)."""
    from .train.config import output_stem
    from .train.saving import OLD_STATE_EXT, STATE_EXT, run_files
    try:
        names = os.listdir(out_dir)
    except OSError:
        return [], []
    ours = run_files(output_stem(output_name))
    loras, states = [], []
    for n in names:
        as_new = n[: -len(OLD_STATE_EXT)] + STATE_EXT if n.endswith(OLD_STATE_EXT) else n  # (earlier versions')
        if ours.fullmatch(as_new):
            (states if as_new.endswith(STATE_EXT) else loras).append(os.path.join(out_dir, n))
    def age(p):
        try:
            return os.path.getmtime(p)
        except OSError:  # (removed meanwhile)
            return 0.0
    return sorted(loras, key=age), sorted(states, key=age)


def _earlier_states(out_dir: str, output_name: str) -> list[str]:
    """The resume states of runs of this name in the folder, oldest first."""
    return _earlier_files(out_dir, output_name)[1]


def _earlier_run_notes(out_dir: str, output_name: str) -> list[str]:
    """A run started again without --resume begins at step 0 and writes over the earlier run's files, as
    sd-scripts does: said, with the state it could continue from."""
    from .train.config import output_stem
    stem = output_stem(output_name)
    loras, states = _earlier_files(out_dir, output_name)
    notes = []
    if states:
        notes.append(f"{out_dir} holds {os.path.basename(states[-1])} from an earlier run of '{stem}': to continue "
                     f"that run instead of starting again, stop now (Ctrl-C) and add --resume {states[-1]} (or "
                     "--resume auto)")
    if loras or states:
        what = " and ".join(x for x in (f"{len(loras)} LoRA file(s)" if loras else "",
                                         f"{len(states)} resume state(s)" if states else "") if x)
        notes.append(f"the earlier '{stem}' run's {what} in {out_dir} are written over as this run saves its own "
                     "(change output_name to keep them)")
    return notes


def _checkpoint_path(cfg, override: str | None) -> str:
    raw = override or cfg.pretrained_model_name_or_path
    if not raw:
        raise TrainCliError(f"{cfg.source}: pretrained_model_name_or_path is not set; point it at a local "
                            "SD1.x/SD2.x/SDXL .safetensors checkpoint (or pass --model)")
    path = os.path.expanduser(raw) if override else str(cfg.resolve(raw))
    if not os.path.exists(path):
        looks_hub = "/" in raw and not raw.startswith((".", "/", "~")) and raw.count("/") == 1 and \
            not os.path.splitext(raw)[1]
        if looks_hub:
            raise TrainCliError(f"pretrained_model_name_or_path = {raw!r} looks like a Hugging Face repo id; "
                                "downloads are not supported: download the single-file .safetensors and give its "
                                "path")
        from .train.config import missing_path_hint
        raise TrainCliError(f"checkpoint not found: {path}"
                            + missing_path_hint(path, None if override else cfg.base_dir))
    return path


def _check_run_lock(out_dir: str, output_name: str) -> None:
    """Another live run writing this name's files there is said before the model loads (the trainer holds the
    lock itself for the run)."""
    from .train.config import output_stem
    from .train.saving import RunLock, RunLockedError
    if not os.path.isdir(out_dir):
        return
    try:
        with RunLock(out_dir, output_stem(output_name)):
            pass
    except RunLockedError as e:
        raise TrainCliError(str(e)) from None


def add_model_args(parser, device_help: str) -> None:
    """--webui and --device, the same for every command that loads a checkpoint."""
    parser.add_argument("--webui", metavar="PATH", help="AUTOMATIC1111 WebUI folder: use its ldm/sgm code and "
                                                        "configs (required for SDXL)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help=device_help)


def model_family(ckpt: str, webui: str | None) -> str:
    """The checkpoint's family, once --webui is a folder and an SDXL checkpoint has the sgm code it needs (said
    before anything else is checked or written)."""
    from .host.headless import SDXL_NEEDS_WEBUI, CheckpointError, checkpoint_family

    if webui and not os.path.isdir(webui):
        raise TrainCliError(f"--webui {webui}: no such folder (give the AUTOMATIC1111 WebUI's folder)")
    if webui and not any(os.path.isdir(os.path.join(webui, d)) for d in ("modules", "repositories")):
        raise TrainCliError(f"--webui {webui} is not an AUTOMATIC1111 WebUI folder (it has no modules/ or "
                            "repositories/): give the folder that holds webui.py")
    family = checkpoint_family(ckpt)
    if family == "sdxl" and not webui:
        import importlib.util
        if importlib.util.find_spec("sgm") is None:
            raise CheckpointError(SDXL_NEEDS_WEBUI, ckpt)
    return family


def pick_device(asked: str, out) -> str:
    """'cpu' or 'cuda' for --device; auto says which it took."""
    import torch
    if asked == "cuda" and not torch.cuda.is_available():
        raise TrainCliError("--device cuda: no CUDA GPU is available to this torch build; use --device cpu")
    if asked != "auto":
        return asked
    # a rented GPU must not train on its CPU because a flag was left out
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out.write(f"device: {device}" + ("" if device == "cuda" else " (no CUDA GPU is available to this torch build)")
              + "\n")
    return device


def _family_notes(cfg, family: str) -> list[str]:
    notes = []
    if family == "sd2" and not cfg.v2:
        notes.append("the checkpoint is SD2.x but v2 is not set (sd-scripts would need v2 = true); trained as SD2")
    if family != "sd2" and cfg.v2:
        notes.append(f"v2 = true but the checkpoint is {family.upper()}; v2 is ignored")
    if cfg.v_parameterization and family == "sd1":
        notes.append("v_parameterization = true on an SD1 checkpoint: training it as v-prediction as asked")
    return notes


def cmd_train(args, out) -> int:
    from .host.tiny import quiet_third_party
    # (the optimizer check imports bitsandbytes, the model load ldm and its dependencies: their notices are noise)
    with quiet_third_party():
        return _train(args, out)


def _train(args, out) -> int:
    from .train.config import load_train_config

    cfg = load_train_config(args.config)
    out.write(f"config: {os.path.abspath(args.config)}\n")  # its notes are listed in the dataset plan below
    ckpt = _checkpoint_path(cfg, args.model)

    device_asked = args.device
    args.device = pick_device(args.device, out)
    if args.dry_run and (cfg.mixed_precision or "").lower() == "fp16" and args.device == "cpu":
        from .train.support import CPU_FP16_NOTE
        out.write(f"note: {CPU_FP16_NOTE}\n")  # (a run says it when it starts)
    vae_path = str(cfg.resolve(cfg.vae)) if cfg.vae else None
    if vae_path and not os.path.isfile(vae_path):
        raise TrainCliError(f"vae = {cfg.vae!r}: file not found ({vae_path})")
    # everything that can be checked without the model is checked before it loads (and by --dry-run)
    if not cfg.output_dir:
        raise TrainCliError(f"{args.config}: output_dir is not set: choose the folder the LoRA files are written to")
    from .train.saving import StateFileError, load_state, output_dir_problem
    out_dir, name = str(cfg.resolve(cfg.output_dir)), cfg.output_name or "lora"
    problem = output_dir_problem(out_dir)
    if problem:
        raise TrainCliError(f"{args.config}: {problem}")
    resume_at = None
    _check_run_lock(out_dir, name)
    if args.resume == "auto":
        states = _earlier_states(out_dir, name)
        args.resume = states[-1] if states else None
        out.write(f"--resume auto: continuing from {states[-1]}, the newest state of this run\n" if states else
                  f"--resume auto: no resume state of '{name}' in {out_dir}; starting the run\n")
    if args.resume:
        from .train.support import resume_problems
        try:
            state = load_state(args.resume, check_only=True)  # (the trainer reads it in full later)
        except StateFileError as e:
            raise TrainCliError(f"--resume: {e}") from None
        problems = resume_problems(cfg, state, args.resume)
        if problems:
            raise TrainCliError(f"--resume: {problems[0]}")
        resume_at = int(state.get("step") or 0)
    else:
        for n in _earlier_run_notes(out_dir, name):
            out.write(f"note: {n}\n")
    from .host.headless import load_checkpoint
    from .train.run import plan_for
    from .train.trainer import Cancelled, TrainingError

    family = model_family(ckpt, args.webui)
    for n in _family_notes(cfg, family):
        out.write(f"note: {n}\n")
    from .train.support import check_support, input_file_problems
    # network_weights / base_weights (header and model family), the config's resume and sample prompt files
    problems = input_file_problems(cfg, family, folders=False)  # (the dataset plan below reports its folders)
    if problems:
        raise TrainCliError("; ".join(problems))
    support_notes = check_support(cfg, family)[1]  # (printed now: the dry run has no other chance to say them)
    for n in support_notes:
        out.write(f"note: {n}\n")

    class _FamilyOnly:  # the plan needs the family only; the model is loaded after the plan is known good
        pass
    probe = _FamilyOnly()
    probe.family = family
    # (an SD2 checkpoint's prediction is known once loaded: run_training checks it then)
    probe.parameterization = "v" if cfg.v_parameterization else ("eps" if family in ("sd1", "sdxl") else None)
    try:
        plan = plan_for(probe, cfg)
    except TrainingError as e:
        raise TrainCliError(str(e)) from None
    out.write(plan.report() + "\n")  # includes the config's notes and the dataset's warnings
    data_notes = []
    if args.resume:
        from .train.support import resume_data_notes
        data_notes = resume_data_notes(os.path.basename(args.resume), state, plan)
        for n in data_notes:
            out.write(f"note: {n}\n")

    sample_prompts = None
    if cfg.sample_prompts or cfg.sample_prompt_text:
        from .train.sampling import config_prompts
        sample_prompts = config_prompts(cfg)  # bad lines fail before loading
        if not (cfg.sample_every_n_epochs or cfg.sample_every_n_steps or cfg.sample_at_first):
            out.write("note: sample_prompts is set but none of sample_every_n_epochs, sample_every_n_steps, "
                      "sample_at_first is: no sample images will be made\n")
    elif cfg.sample_every_n_epochs or cfg.sample_every_n_steps or cfg.sample_at_first:
        out.write("note: samples are asked for but sample_prompts is not set: no sample images will be made\n")

    if args.dry_run:
        steps = plan.steps
        from .train.support import dry_run_space_problems
        problem, note = dry_run_space_problems(cfg, family, steps.num_epochs, steps.max_train_steps, resume_at or 0)
        if problem:
            raise TrainCliError(f"the run would stop at its start: {problem}")
        if note:
            out.write(f"note: {note}\n")
        what = (f"would continue from step {resume_at} to {steps.max_train_steps}" if resume_at is not None else
                f"would train {steps.max_train_steps} steps")
        out.write(f"dry run: {family.upper()} checkpoint {ckpt}; {what} over {steps.num_epochs} epoch(s) into "
                  f"{cfg.resolve(cfg.output_dir)}\n")
        return EXIT_OK

    out.write(f"loading {ckpt} ...\n")
    out.flush()
    host = load_checkpoint(ckpt, webui=args.webui, device=args.device,
                           v_parameterization=True if cfg.v_parameterization else None)
    out.write(host.load_report.summary() + "\n")
    for n in host.notes:
        out.write(f"note: {n}\n")
    if vae_path:
        out.write(host.load_vae(vae_path) + "\n")

    sample_fn = None
    if sample_prompts is not None:
        from .train.sampling import make_sample_fn
        sample_fn = make_sample_fn(host, cfg, out_dir, prompts=sample_prompts,
                                   on_note=lambda m: out.write(f"note: {m}\n"))
        # (sample_at_first is the trainer's: before the first step, not again on resume)
        if not (cfg.sample_every_n_epochs or cfg.sample_every_n_steps or cfg.sample_at_first):
            sample_fn = None

    from .train.run import run_training
    printer = ProgressPrinter(out, already_shown={str(w) for w in plan.warnings} | set(support_notes)
                              | set(getattr(sample_fn, "notes", ())) | set(data_notes))
    with _CtrlC(out) as ctrl:
        try:
            result = run_training(host, cfg, on_event=printer, should_cancel=ctrl.event.is_set,
                                  resume=args.resume, sample_fn=sample_fn, plan=plan)
        except Cancelled:
            out.write("cancelled before the first step (while caching latents); nothing to resume\n")
            return EXIT_CANCELLED
        except TrainingError as e:
            raise TrainCliError(str(e)) from None

    if result.status == "cancelled":
        if not result.state_file and not result.steps:
            out.write("cancelled before the first step (while caching latents); nothing to resume\n")
            return EXIT_CANCELLED
        out.write(f"cancelled at step {result.steps}.\n")
        if result.state_file:
            out.write(f"resumable state: {result.state_file}\n")
            out.write(f"resume with: {PROG} train {args.config} --resume {result.state_file}"
                      + (f" --model {args.model}" if args.model else "")
                      + (f" --webui {args.webui}" if args.webui else "")
                      + (f" --device {device_asked}" if device_asked != "auto" else "") + "\n")
        return EXIT_CANCELLED
    out.write(f"done: {result.steps} steps\n")
    for f in result.files:
        out.write(f"  {'final' if f == result.final else 'saved'}: {f}\n")
    if result.state_file:
        out.write(f"  state: {result.state_file}\n")
    if sample_fn is not None:
        out.write(f"  samples: {os.path.join(out_dir, 'samples')}\n")
    return EXIT_OK


# ---------------------------------------------------------------------------------------------------------------
# quickstart

def cmd_quickstart(args, out) -> int:
    from .quickstart import command_prefix, run_quickstart

    if args.steps is not None and args.steps < 1:
        from .cli import UsageError
        raise UsageError("--steps must be at least 1")
    import torch
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))  # small model: more threads only contend

    def log(line):
        out.write(line + "\n")
        out.flush()

    from .train.trainer import Cancelled, TrainingError
    with _CtrlC(out) as ctrl:
        try:
            res = run_quickstart(args.out, steps=args.steps, seed=args.seed, log=log,
                                 on_event=ProgressPrinter(out), should_cancel=ctrl.event.is_set,
                                 keep=args.keep_model)
        except Cancelled:
            out.write("cancelled\n")
            return EXIT_CANCELLED
        except TrainingError as e:
            raise TrainCliError(str(e)) from None
    out.write("\n" + res.summary() + "\n")
    if not res.restored_exact:
        raise TrainCliError("the model's weights did not come back bit-exact after removing the LoRA (a bug: "
                            "please report it with this output)")
    if not res.loss_after < res.loss_before:
        out.write(f"warning: the loss did not go down in {res.steps} steps; try more --steps\n")
        return EXIT_ERROR
    prog = command_prefix()
    out.write(f"\nnext: copy {res.lora_path} into the WebUI's models/Lora folder, or train your own:\n"
              f"  {prog} train your_config.toml --dry-run\n")
    if res.kept_config:
        base = os.path.dirname(res.kept_config)
        out.write(f"or try the command line on the tiny model, offline:\n  {prog} train {res.kept_config}\n"
                  f"and compare its epochs:\n  {prog} grid {os.path.join(base, 'my-lora')} --model "
                  f"{os.path.join(base, 'model', 'tiny-sd15.safetensors')}\n")
    else:
        out.write("(`quickstart --keep-model` also keeps the tiny model and a config to try `train` on, offline)\n")
    return EXIT_OK
