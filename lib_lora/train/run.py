"""One entry point for a training job, shared by the CLI, the HTTP API, the queue and the tab."""

from __future__ import annotations

from .dataset import build_plan
from .support import check_support
from .trainer import Trainer, TrainingError, TrainResult


def plan_for(host, cfg, check_pixels: bool = True):
    """The dataset plan (the doctor reports from this same object); raises TrainingError with the report."""
    errors, _ = check_support(cfg, host.family, getattr(host, "parameterization", None))
    if errors:
        raise TrainingError("this config cannot be trained as written:\n" + "\n".join(f"- {e}" for e in errors))
    plan = build_plan(cfg, family=host.family, check_pixels=check_pixels)
    if not plan.ok or plan.steps is None:
        problems = "\n".join(f"- {f}" for f in plan.errors) or "- no batches could be formed"
        raise TrainingError(f"the dataset cannot be trained as it is:\n{problems}\n\n{plan.report(errors=False)}")
    return plan


def run_training(host, cfg, on_event=None, should_cancel=None, resume: str | None = None, sample_fn=None,
                 plan=None) -> TrainResult:
    plan = plan or plan_for(host, cfg)
    # (with the family: notes about this model's layers too; with the loaded model: what it predicts)
    errors, notes = check_support(cfg, host.family, getattr(host, "parameterization", None))
    if errors:  # (a plan made before the model was loaded could not know what it predicts)
        raise TrainingError("this config cannot be trained as written:\n" + "\n".join(f"- {e}" for e in errors))
    trainer = Trainer(host, cfg, plan, on_event=on_event, should_cancel=should_cancel, sample_fn=sample_fn)
    for f in plan.warnings:
        trainer._note(str(f))
    for n in [*notes, *getattr(sample_fn, "notes", ())]:  # (the sample prompts' own: options ignored, samplers)
        trainer._note(n)
    return trainer.run(resume_state=resume or (str(cfg.resolve(cfg.resume)) if cfg.resume else None))
