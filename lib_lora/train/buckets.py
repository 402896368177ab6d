"""Aspect-ratio buckets, batches per epoch and total steps, with sd-scripts' rules (commit 48d368fa).

- bucket list: ``model_util.make_bucket_resolutions``; min/max rounding: ``BaseDataset.adjust_min_max_bucket_reso_by_steps``;
- image -> bucket: ``BucketManager.select_bucket`` (nearest aspect ratio, or the no-upscale rule with ``round_to_steps``);
- batches: each bucket yields ``ceil(count / batch_size)`` batches (``BaseDataset.make_buckets``);
- steps: ``ceil(batches / grad_accum)`` updates per epoch; ``max_train_epochs`` overrides ``max_train_steps``
  (``train_network.py`` L799-805, L978-979).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def make_bucket_resolutions(
    max_reso: tuple[int, int], min_size: int = 256, max_size: int = 1024, divisible: int = 64
) -> list[tuple[int, int]]:
    """All (w, h) buckets whose area fits ``max_reso``'s area, sides in [min_size, max_size], multiples of
    ``divisible``; sorted. The square ``floor(sqrt(area)/step)*step`` is always included."""
    area = max_reso[0] * max_reso[1]
    found: set[tuple[int, int]] = set()
    side = int(math.sqrt(area) // divisible) * divisible
    found.add((side, side))
    w = min_size
    while w <= max_size:
        h = min(max_size, int((area // w) // divisible) * divisible)
        if h >= min_size:
            found.add((w, h))
            found.add((h, w))
        w += divisible
    return sorted(found)


class BucketSettingsError(ValueError):
    """Bucket settings sd-scripts would reject (its asserts), with what to change."""


def adjust_min_max_bucket_reso(
    resolution: tuple[int, int], min_bucket_reso: int, max_bucket_reso: int, steps: int
) -> tuple[int, int, list[str]]:
    """Round min down / max up to multiples of ``steps`` and check the resolution fits, as sd-scripts does.

    Returns ``(min, max, notes)``; raises ``BucketSettingsError`` where sd-scripts asserts."""
    notes = []
    if steps <= 0:
        raise BucketSettingsError(f"bucket_reso_steps must be a positive integer, got {steps}")
    if min_bucket_reso % steps:
        new = min_bucket_reso - min_bucket_reso % steps
        if new <= 0:  # sd-scripts would go on with 0 and divide by it
            new = steps
            notes.append(f"min_bucket_reso {min_bucket_reso} is below bucket_reso_steps {steps}; the smallest "
                         f"bucket side is {steps}")
        else:
            notes.append(f"min_bucket_reso {min_bucket_reso} rounded down to {new}, a multiple of bucket_reso_steps "
                         f"{steps}")
        min_bucket_reso = new
    if max_bucket_reso % steps:
        new = max_bucket_reso + steps - max_bucket_reso % steps
        notes.append(f"max_bucket_reso {max_bucket_reso} rounded up to {new}, a multiple of bucket_reso_steps {steps}")
        max_bucket_reso = new
    if min(resolution) < min_bucket_reso:
        raise BucketSettingsError(
            f"min_bucket_reso {min_bucket_reso} is larger than the resolution's shorter side {min(resolution)}: "
            f"lower min_bucket_reso or raise resolution"
        )
    if max(resolution) > max_bucket_reso:
        raise BucketSettingsError(
            f"max_bucket_reso {max_bucket_reso} is smaller than the resolution's longer side {max(resolution)}: "
            f"raise max_bucket_reso or lower resolution"
        )
    return min_bucket_reso, max_bucket_reso, notes


@dataclass(frozen=True)
class BucketChoice:
    reso: tuple[int, int]  # bucket (w, h)
    resized_size: tuple[int, int]  # size the image is scaled to before trimming to the bucket
    ar_error: float  # bucket aspect - image aspect (signed, as sd-scripts returns it)


class BucketManager:
    """Assigns images to buckets. ``no_upscale=False`` uses the predefined list from ``make_bucket_resolutions``;
    ``no_upscale=True`` makes one bucket per distinct size, never enlarging (min/max are ignored there)."""

    def __init__(
        self,
        no_upscale: bool,
        max_reso: tuple[int, int],
        min_size: int | None,
        max_size: int | None,
        reso_steps: int | None,
        predefined: list[tuple[int, int]] | None = None,
    ):
        self.no_upscale = no_upscale
        self.max_reso = max_reso
        self.max_area = max_reso[0] * max_reso[1]
        self.min_size = min_size
        self.max_size = max_size
        self.reso_steps = reso_steps
        if predefined is not None:
            self.predefined = list(predefined)
        elif not no_upscale:
            self.predefined = make_bucket_resolutions(max_reso, min_size, max_size, reso_steps)
        else:
            self.predefined = []
        self._predefined_set = set(self.predefined)
        self._predefined_ar = [w / h for w, h in self.predefined]

    def round_to_steps(self, x: float) -> int:
        """Round to nearest integer, then down to a multiple of ``reso_steps``."""
        n = int(x + 0.5)
        return n - n % self.reso_steps

    def select_bucket(self, image_width: int, image_height: int) -> BucketChoice:
        ar = image_width / image_height
        if not self.no_upscale:
            reso = (image_width, image_height)
            if reso not in self._predefined_set:
                # first bucket with the smallest |aspect error| in sorted order (numpy argmin semantics)
                best, best_err = 0, None
                for i, bar in enumerate(self._predefined_ar):
                    err = abs(bar - ar)
                    if best_err is None or err < best_err:
                        best, best_err = i, err
                reso = self.predefined[best]
            bucket_ar = reso[0] / reso[1]
            # image relatively wider than the bucket -> match heights, else match widths (cover, then trim)
            scale = reso[1] / image_height if ar > bucket_ar else reso[0] / image_width
            resized = (int(image_width * scale + 0.5), int(image_height * scale + 0.5))
        else:
            if image_width * image_height > self.max_area:
                # shrink to max_area keeping the aspect; round the side that keeps the aspect closer
                rw = math.sqrt(self.max_area * ar)
                rh = self.max_area / rw
                w_r = self.round_to_steps(rw)
                h_in_wr = self.round_to_steps(w_r / ar)
                h_r = self.round_to_steps(rh)
                w_in_hr = self.round_to_steps(h_r * ar)
                # a rounded side can reach 0 for extreme aspect ratios; treat that aspect as infinitely wrong
                ar_wr = w_r / h_in_wr if h_in_wr else math.inf
                ar_hr = w_in_hr / h_r if h_r else math.inf
                if abs(ar_wr - ar) < abs(ar_hr - ar):
                    resized = (w_r, int(w_r / ar + 0.5))
                else:
                    resized = (int(h_r * ar + 0.5), h_r)
            else:
                resized = (image_width, image_height)
            # the bucket is the resized size floored to steps; the remainder is trimmed, never padded
            reso = (resized[0] - resized[0] % self.reso_steps, resized[1] - resized[1] % self.reso_steps)
        ar_error = (reso[0] / reso[1]) - ar if reso[1] else math.inf
        return BucketChoice(reso, resized, ar_error)


def batches_per_epoch(bucket_counts: dict[tuple[int, int], int], batch_size: int) -> int:
    """sd-scripts' ``len(dataloader)`` for one dataset: each bucket gives ``ceil(count/batch)`` batches (the last
    batch of a bucket may be partial)."""
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    return sum(math.ceil(n / batch_size) for n in bucket_counts.values() if n > 0)


@dataclass(frozen=True)
class StepPlan:
    batches_per_epoch: int  # len(dataloader)
    gradient_accumulation_steps: int
    updates_per_epoch: int  # ceil(batches / grad_accum)
    max_train_steps: int  # optimizer steps the run makes
    num_epochs: int
    from_epochs: bool  # True when max_train_epochs decided the length
    explanation: str


def compute_steps(
    batches: int, grad_accum: int = 1, max_train_steps: int | None = 1600, max_train_epochs: int | None = None
) -> StepPlan:
    """Total optimizer steps and epochs as ``train_network.py`` computes them (one process)."""
    if grad_accum < 1:
        raise ValueError(f"gradient_accumulation_steps must be >= 1, got {grad_accum}")
    per_epoch = math.ceil(batches / grad_accum)
    if max_train_epochs is not None:
        steps = max_train_epochs * per_epoch
        why = (
            f"max_train_epochs {max_train_epochs} x {per_epoch} steps per epoch = {steps} steps "
            "(max_train_epochs overrides max_train_steps, as in sd-scripts)"
        )
        from_epochs = True
    else:
        steps = 1600 if max_train_steps is None else max_train_steps
        why = f"max_train_steps {steps} (no max_train_epochs given)"
        from_epochs = False
    epochs = math.ceil(steps / per_epoch) if per_epoch else 0
    if not from_epochs and per_epoch:
        why += f": {epochs} epoch(s) of {per_epoch} steps, the last one cut at step {steps}" if steps % per_epoch else f": {epochs} epoch(s) of {per_epoch} steps"
    if grad_accum > 1:
        why += f"; {batches} batches per epoch / gradient_accumulation_steps {grad_accum} = {per_epoch} optimizer steps per epoch"
    return StepPlan(batches, grad_accum, per_epoch, steps, epochs, from_epochs, why)


@dataclass(frozen=True)
class StartPoint:
    """Where a run begins with sd-scripts' ``initial_epoch`` / ``initial_step`` / ``skip_until_initial_step``."""

    first_epoch: int  # 1-based epoch the loop starts in
    skip_batches: int  # batches of that epoch read over (skip_until_initial_step only)
    step: int  # the step counter's first value (0 unless skipping; the LR schedule starts at 0 either way)
    end_step: int  # the step the run stops at
    explanation: str


def start_point(steps: StepPlan, initial_epoch: int | None = None, initial_step: int | None = None,
                skip_until_initial_step: bool = False) -> StartPoint:
    """train_network.py's start (L1232-1273 @48d368fa) for one process. ``initial_step`` wins over
    ``initial_epoch`` ((epoch-1) x optimizer steps per epoch). Without ``skip_until_initial_step`` only the epoch
    number moves: the loop starts at that epoch with the step counter and the LR schedule at 0 and stops at the
    last epoch. With it, the run continues the uninterrupted one: the epochs and batches before the step are passed
    over (the data of each later step is the same) and the step counter starts at ``initial_step``. (sd-scripts
    counts the skip in micro-batches against optimizer steps per epoch, which lands in the wrong epoch with
    gradient accumulation, and sets its step counter to the batches skipped in the last epoch; here the counter
    is the step the run is at, so step-named files and sample steps are numbered as in the uninterrupted run.)
    Raises ValueError with what to change."""
    if initial_epoch is not None and initial_epoch < 0:  # (0, as 1, is the first epoch: sd-scripts runs it so)
        raise ValueError(f"initial_epoch must be 1 or more (1 = the first epoch), got {initial_epoch}")
    if initial_step is not None and initial_step < 0:
        raise ValueError(f"initial_step must be 0 or more, got {initial_step}")
    per = steps.updates_per_epoch
    at = initial_step if initial_step is not None else (initial_epoch - 1) * per if initial_epoch else 0
    src = (f"initial_step {initial_step}" if initial_step is not None
           else f"initial_epoch {initial_epoch} = step {at}" if initial_epoch else "")
    if at <= 0 or not per:
        return StartPoint(1, 0, 0, steps.max_train_steps, "")
    if at >= steps.max_train_steps:
        raise ValueError(f"{src} is not before the end of the run (max_train_steps {steps.max_train_steps}); "
                         "give an earlier start or a longer run")
    epoch = at // per + 1
    if skip_until_initial_step:
        skip = (at % per) * steps.gradient_accumulation_steps
        why = (f"{src}: starts at step {at} (epoch {epoch}" + (f", after its first {skip} batches" if skip else "")
               + "), the batches before it passed over (skip_until_initial_step)")
        return StartPoint(epoch, skip, at, steps.max_train_steps, why)
    end = min(steps.max_train_steps, (steps.num_epochs - epoch + 1) * per)
    why = (f"{src}: starts at epoch {epoch} with the step count at 0 and runs {end} steps to the end of epoch "
           f"{steps.num_epochs} (without skip_until_initial_step only the epoch number moves, as in sd-scripts)")
    return StartPoint(epoch, 0, 0, end, why)


__all__ = [
    "BucketChoice",
    "BucketManager",
    "BucketSettingsError",
    "StartPoint",
    "StepPlan",
    "adjust_min_max_bucket_reso",
    "batches_per_epoch",
    "compute_steps",
    "start_point",
    "make_bucket_resolutions",
]
