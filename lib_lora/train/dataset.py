"""The dataset plan: every number sd-scripts derives from a dataset, computed before anything is trained.

``build_plan(config)`` reads the folders (``N_name`` convention) or the dataset TOML, probes every image, reads the
captions, balances regularisation images, assigns buckets and counts batches and steps, all with sd-scripts' rules
(``DreamBoothDataset.__init__`` / ``BaseDataset.make_buckets`` / ``train_network.py`` @48d368fa). Nothing is fatal:
problems become ``Finding`` entries; ``plan.ok`` is False when an error finding exists. ``plan.report()`` is the text
the doctor, the CLI and the tab show; the training loop reads ``ImageEntry`` objects from the same plan.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .buckets import (
    BucketManager,
    BucketSettingsError,
    StepPlan,
    adjust_min_max_bucket_reso,
    batches_per_epoch,
    StartPoint,
    compute_steps,
    start_point,
)
from .captions import (CaptionFileError, caption_candidates, contains_word, find_caption, tag_frequency,
                       unused_lines)
from .config import DatasetSpec, SubsetSpec, TrainConfig, TrainConfigError, load_dataset_config
from .folders import Finding, split_class_tokens, subsets_from_folders
from .images import face_from_name, image_extensions, is_upscaled, probe_image, sd_scripts_would_glob
from .sd_latents import LatentFile, LatentFileError, find_latent, name_size, read_latent

# extensions people drop into datasets that sd-scripts does not read
_UNSUPPORTED_IMAGE_EXTS = (".gif", ".tif", ".tiff", ".heic", ".heif", ".avif", ".jxl", ".jfif", ".ico", ".psd")
_OTHER_CAPTION_EXTS = (".txt", ".caption")


@dataclass
class ImageEntry:
    path: Path
    size: tuple[int, int]  # (w, h) used for bucketing (EXIF orientation applied)
    caption: str  # raw caption (before prefix/suffix/shuffle); what ss_tag_frequency counts
    caption_source: str  # 'file' | 'folder' | 'empty'
    caption_path: Path | None
    is_reg: bool
    num_repeats: int  # effective: reg images carry their balanced count (0 = not used)
    subset_index: int = -1  # index into DatasetPart.subsets
    bucket: tuple[int, int] | None = None
    resized_size: tuple[int, int] | None = None
    ar_error: float = 0.0
    notes: list[str] = field(default_factory=list)
    mask_path: Path | None = None  # masked_loss: its mask image from the subset's conditioning_data_dir
    latent: LatentFile | None = None  # fine-tuning key without its image: sd-scripts' cached latent (path = the .npz)

    @property
    def upscaled(self) -> bool:
        return self.resized_size is not None and is_upscaled(self.size, self.resized_size)


@dataclass
class SubsetPlan:
    spec: SubsetSpec
    images: list[ImageEntry] = field(default_factory=list)  # images that train (after any validation split)
    validation_images: list[ImageEntry] = field(default_factory=list)
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (file name, reason)
    caption_errors: list[tuple[str, str, bool]] = field(default_factory=list)  # (image, why, sd-scripts stops)
    missing_trigger: list[str] = field(default_factory=list)  # image file names whose caption lacks the trigger
    other_extension_captions: list[str] = field(default_factory=list)  # caption only under .txt/.caption (unused)
    unsupported_files: list[str] = field(default_factory=list)
    multiline_captions: list[str] = field(default_factory=list)  # caption files whose later lines are dropped
    orphan_captions: list[str] = field(default_factory=list)  # "name (why)": caption files no image reads
    shared_captions: list[str] = field(default_factory=list)  # "a.txt (a.jpg, a.png)": read by several images
    too_small: list[str] = field(default_factory=list)
    tag_counts: dict[str, int] = field(default_factory=dict)

    @property
    def path(self) -> Path:
        return Path(self.spec.image_dir)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def repeats(self) -> int:
        return self.spec.num_repeats

    @property
    def is_reg(self) -> bool:
        return self.spec.is_reg

    @property
    def class_tokens(self) -> str | None:
        return self.spec.class_tokens

    @property
    def instance_token(self) -> str | None:
        return None if self.is_reg else split_class_tokens(self.spec.class_tokens)[0]

    @property
    def class_token(self) -> str:
        if self.is_reg:
            return (self.spec.class_tokens or "").strip()
        return split_class_tokens(self.spec.class_tokens)[1]

    @property
    def n_images(self) -> int:
        return len(self.images)

    @property
    def n_captioned(self) -> int:
        return sum(1 for e in self.images if e.caption_source in ("file", "metadata"))

    @property
    def samples(self) -> int:
        """images x folder repeats (what sd-scripts counts into num_train_images / num_reg_images)."""
        return self.n_images * self.repeats

    @property
    def samples_used(self) -> int:
        """samples per epoch after reg balancing."""
        return sum(e.num_repeats for e in self.images)

    @property
    def upscaled(self) -> list[str]:
        return [e.path.name for e in self.images if e.upscaled]


@dataclass
class DatasetPart:
    """One dataset (sd-scripts' DreamBoothDataset): shared resolution, batch size and buckets."""

    spec: DatasetSpec
    subsets: list[SubsetPlan] = field(default_factory=list)
    bucket_counts: dict[tuple[int, int], int] = field(default_factory=dict)  # with repeats, reg balanced
    bucket_counts_train_only: dict[tuple[int, int], int] = field(default_factory=dict)
    mean_ar_error: float = 0.0
    batches: int = 0  # batches per epoch
    batches_without_reg: int = 0
    bucketing_ok: bool = True

    @property
    def num_train_images(self) -> int:
        return sum(s.samples for s in self.subsets if not s.is_reg)

    @property
    def num_reg_images(self) -> int:
        """reg images x repeats BEFORE balancing (sd-scripts' num_reg_images / ss_num_reg_images)."""
        return sum(s.samples for s in self.subsets if s.is_reg)

    @property
    def reg_samples_used(self) -> int:
        return sum(s.samples_used for s in self.subsets if s.is_reg)

    def entries(self) -> list[ImageEntry]:
        return [e for s in self.subsets for e in s.images]

    def used_entries(self) -> list[ImageEntry]:
        return [e for e in self.entries() if e.num_repeats > 0 and e.bucket is not None]

    def bucket_info(self) -> dict | None:
        """``ss_bucket_info`` as sd-scripts stores it (None when bucketing is off)."""
        if not self.spec.enable_bucket:
            return None
        return {
            "buckets": {i: {"resolution": reso, "count": n} for i, (reso, n) in enumerate(sorted(self.bucket_counts.items()))},
            "mean_img_ar_error": self.mean_ar_error,
        }

    def tag_frequency(self) -> dict[str, dict[str, int]]:
        """Folder name -> tag -> count over this dataset's subsets (subsets with the same folder name add up)."""
        per: dict[str, dict[str, int]] = {}
        for s in self.subsets:
            f = per.setdefault(s.name, {})
            for k, v in s.tag_counts.items():
                f[k] = f.get(k, 0) + v
        return per

    def bucket_lists(self) -> dict[tuple[int, int], list[ImageEntry]]:
        """Each bucket's sample list: every image appears ``num_repeats`` times, as sd-scripts fills buckets."""
        out: dict[tuple[int, int], list[ImageEntry]] = {}
        for e in self.used_entries():
            out.setdefault(e.bucket, []).extend([e] * e.num_repeats)
        return dict(sorted(out.items()))

    def epoch_batches(self, seed: int, epoch: int) -> list[list[ImageEntry]]:
        """The batches of one epoch (0 = the order set at load), replaying sd-scripts' shuffles
        (``random.seed(seed + e)`` then shuffle the batch index and each bucket, for e = 0..epoch)."""
        bs = self.spec.batch_size
        buckets = list(self.bucket_lists().values())
        index = [(b, k) for b, items in enumerate(buckets) for k in range(math.ceil(len(items) / bs))]
        rng = random.Random()
        for e in range(epoch + 1):
            rng.seed(seed + e)
            rng.shuffle(index)
            for items in buckets:
                rng.shuffle(items)
        return [buckets[b][k * bs:(k + 1) * bs] for b, k in index]


@dataclass
class DatasetPlan:
    config: TrainConfig
    datasets: list[DatasetPart] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    steps: StepPlan | None = None
    steps_without_reg: StepPlan | None = None
    start: StartPoint | None = None  # initial_epoch / initial_step
    from_dataset_config: bool = False

    # --- summaries
    @property
    def subsets(self) -> list[SubsetPlan]:
        return [s for d in self.datasets for s in d.subsets]

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "warning"]

    @property
    def ok(self) -> bool:
        return not self.errors

    @property
    def num_train_images(self) -> int:
        return sum(d.num_train_images for d in self.datasets)

    @property
    def num_reg_images(self) -> int:
        return sum(d.num_reg_images for d in self.datasets)

    @property
    def batches_per_epoch(self) -> int:
        return sum(d.batches for d in self.datasets)

    def signature(self) -> dict:
        """What a resume state records of the data it was trained on, to tell a resumed run on other data:
        counts, sizes, and a digest of the images' folder/file names with their repeats (not their captions)."""
        used = [e for d in self.datasets for e in d.entries() if e.num_repeats > 0]
        names = sorted(f"{e.path.parent.name}/{e.path.name}*{e.num_repeats}" for e in used)
        return {"images": sum(1 for e in used if not e.is_reg), "reg_images": sum(1 for e in used if e.is_reg),
                "files": hashlib.sha256("\n".join(names).encode()).hexdigest()[:16],
                "batches_per_epoch": self.batches_per_epoch,
                "resolution": [list(d.spec.resolution) if d.spec.resolution else None for d in self.datasets],
                "batch_size": [d.spec.batch_size for d in self.datasets]}

    @property
    def bucket_histogram(self) -> dict[tuple[int, int], int]:
        hist: Counter = Counter()
        for d in self.datasets:
            hist.update(d.bucket_counts)
        return dict(sorted(hist.items()))

    @property
    def tag_frequency(self) -> dict[str, dict[str, int]]:
        """``ss_tag_frequency``: folder name -> tag -> count (first dataset wins for a shared folder name, as sd-scripts
        merges datasets; within a dataset, subsets with the same folder name add up)."""
        out: dict[str, dict[str, int]] = {}
        for d in self.datasets:
            for name, freq in d.tag_frequency().items():
                out.setdefault(name, freq)
        return out

    def ss_dataset_metadata(self) -> dict[str, str]:
        """The dataset part of the ``ss_*`` metadata, as strings, as train_network.py writes it."""
        cfg = self.config
        md: dict[str, str] = {
            "ss_num_train_images": str(self.num_train_images),
            "ss_num_reg_images": str(self.num_reg_images),
            "ss_num_batches_per_epoch": str(self.batches_per_epoch),
            "ss_tag_frequency": json.dumps(self.tag_frequency),
        }
        if not self.from_dataset_config and self.datasets:
            d = self.datasets[0]
            train_dirs = {s.name: {"n_repeats": s.repeats, "img_count": s.n_images} for s in d.subsets if not s.is_reg}
            reg_dirs = {s.name: {"n_repeats": s.repeats, "img_count": s.n_images} for s in d.subsets if s.is_reg}
            md.update({
                "ss_batch_size_per_device": str(cfg.train_batch_size),
                "ss_total_batch_size": str(cfg.train_batch_size * cfg.gradient_accumulation_steps),
                "ss_resolution": str(cfg.resolution),
                "ss_color_aug": str(bool(cfg.color_aug)),
                "ss_flip_aug": str(bool(cfg.flip_aug)),
                "ss_random_crop": str(bool(cfg.random_crop)),
                "ss_shuffle_caption": str(bool(cfg.shuffle_caption)),
                "ss_enable_bucket": str(bool(d.spec.enable_bucket)),
                "ss_bucket_no_upscale": str(bool(d.spec.enable_bucket and d.spec.bucket_no_upscale)),
                "ss_min_bucket_reso": str(d.spec.min_bucket_reso if d.spec.enable_bucket else None),
                "ss_max_bucket_reso": str(d.spec.max_bucket_reso if d.spec.enable_bucket else None),
                "ss_keep_tokens": str(cfg.keep_tokens),
                "ss_dataset_dirs": json.dumps(train_dirs),
                "ss_reg_dataset_dirs": json.dumps(reg_dirs),
                "ss_bucket_info": json.dumps(d.bucket_info()),
            })
        else:
            datasets_md = []
            dirs: dict[str, dict] = {}
            for d in self.datasets:
                subs = []
                for s in d.subsets:
                    c = s.spec.captions
                    subs.append({
                        "img_count": s.n_images, "num_repeats": s.repeats, "color_aug": bool(s.spec.color_aug),
                        "flip_aug": bool(s.spec.flip_aug), "random_crop": bool(s.spec.random_crop),
                        "shuffle_caption": bool(c.shuffle_caption), "keep_tokens": c.keep_tokens,
                        "keep_tokens_separator": c.keep_tokens_separator, "secondary_separator": c.secondary_separator,
                        "enable_wildcard": bool(c.enable_wildcard), "caption_prefix": c.caption_prefix,
                        "caption_suffix": c.caption_suffix, "resize_interpolation": s.spec.resize_interpolation,
                    })
                    if s.spec.image_dir:
                        subs[-1]["image_dir"] = Path(s.spec.image_dir).name
                    if s.spec.metadata_file:  # (a fine-tuning subset)
                        subs[-1]["metadata_file"] = s.name
                    else:
                        subs[-1].update(class_tokens=s.spec.class_tokens, is_reg=s.is_reg)
                    if not s.is_reg:
                        key, i = s.name, 2
                        while key in dirs:
                            key, i = f"{s.name} ({i})", i + 1
                        dirs[key] = {"n_repeats": s.repeats, "img_count": s.n_images}
                datasets_md.append({
                    "is_dreambooth": not any(sub.spec.metadata_file for sub in d.subsets),
                    "batch_size_per_device": d.spec.batch_size,
                    "num_train_images": d.num_train_images, "num_reg_images": d.num_reg_images,
                    "resolution": d.spec.resolution, "enable_bucket": bool(d.spec.enable_bucket),
                    "min_bucket_reso": d.spec.min_bucket_reso if d.spec.enable_bucket else None,
                    "max_bucket_reso": d.spec.max_bucket_reso if d.spec.enable_bucket else None,
                    "tag_frequency": d.tag_frequency(), "bucket_info": d.bucket_info(),
                    "resize_interpolation": d.spec.resize_interpolation, "subsets": subs,
                })
            md["ss_datasets"] = json.dumps(datasets_md)
            md["ss_dataset_dirs"] = json.dumps(dirs)
        return md

    # --- text
    def report(self, errors: bool = True) -> str:
        """The plan as text; ``errors=False`` leaves the errors out (a message that lists them already)."""
        return _report(self, errors)


# ---------------------------------------------------------------------------------------------------------------
# building


def balance_reg_repeats(num_train_samples: int, reg_entries: list[ImageEntry]) -> None:
    """sd-scripts' reg balancing, in place on ``num_repeats``.

    First pass: reg images are taken in order, each with its folder's repeats, until the running count reaches
    ``num_train_samples`` (images after that are unused: repeats 0). While still short, further passes add one repeat
    per image in order, stopping as soon as the count is reached. No training samples -> no reg image is used."""
    folder_repeats = [e.num_repeats for e in reg_entries]
    for e in reg_entries:
        e.num_repeats = 0
    if not reg_entries:
        return
    n = 0
    first = True
    while n < num_train_samples:
        for e, r in zip(reg_entries, folder_repeats):
            if first:
                e.num_repeats = r
                n += r
            else:
                e.num_repeats += 1
                n += 1
            if n >= num_train_samples:
                break
        first = False


def _validation_split(paths: list, split: float, seed: int) -> tuple[list, list]:
    """sd-scripts' split_train_val: shuffle with the seed, training = first ceil(n*(1-split)), validation = last
    round(n*split)."""
    items = list(paths)
    random.Random(seed).shuffle(items)
    n = len(items)
    return items[: math.ceil(n * (1 - split))], items[n - round(n * split):]


def metadata_image(key: str, image_dir: str | None) -> Path | None:
    """FineTuningDataset's lookup of a metadata key: the key as a path, else the first of image_dir/key.<image
    extension> in sorted order (keys are file stems unless merge_captions_to_metadata ran with --full_path). A
    relative key is tried in image_dir before the working folder (sd-scripts tries only the latter, which in the
    WebUI is the WebUI's own folder)."""
    k = Path(key)
    if k.is_absolute() and k.is_file():
        return k
    if image_dir:
        d = Path(image_dir)
        if (d / key).is_file():
            return d / key
        exts = [e for x in image_extensions() for e in dict.fromkeys((x, x.upper()))]
        for p in sorted((d / (key + e) for e in exts), key=str):
            if p.is_file():
                return p
    return k if k.is_file() else None


def _metadata_caption(md: dict, sep: str, wildcard: bool) -> tuple[str, str | None]:
    """(caption, tags) of one metadata entry as FineTuningDataset joins them: caption + separator + tags; tags
    alone when there is no caption; with enable_wildcard, the tags appended to each caption line."""
    def text(v):  # (tools write strings; a list of tags from another tagger reads as those tags)
        return v if v is None or isinstance(v, str) else ", ".join(map(str, v)) if isinstance(v, list) else str(v)
    caption, tags = text(md.get("caption")), text(md.get("tags"))
    if caption is None:
        caption, tags = tags, None
    if wildcard:
        if tags is not None:
            tags = tags.replace("\n", sep)
        if caption is not None and tags is not None:
            caption = "\n".join(f"{line}{sep}{tags}" for line in caption.split("\n") if line.strip() != "")
    elif tags:
        caption = caption + sep + tags
    return caption or "", tags


def _plan_metadata_subset(spec: SubsetSpec, ds: DatasetSpec, check_pixels: bool, findings: list[Finding],
                          seed: int) -> SubsetPlan:
    """A fine-tuning subset (metadata_file / in_json): sd-scripts' FineTuningDataset, images found by their keys,
    captions and tags from the JSON."""
    plan = SubsetPlan(spec)
    where = f"'{spec.name}'"
    path = Path(spec.metadata_file)
    try:
        metadata = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        findings.append(Finding("error", "metadata-missing", f"metadata file '{path}' does not exist (in_json / "
                                "metadata_file); make it with sd-scripts' merge_captions_to_metadata.py, or train "
                                "from caption files in N_name folders instead", [str(path)]))
        return plan
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        findings.append(Finding("error", "metadata-unreadable", f"metadata file '{path}' cannot be read as JSON: {e}",
                                [str(path)]))
        return plan
    if not isinstance(metadata, dict) or not all(isinstance(v, dict) for v in metadata.values()):
        findings.append(Finding("error", "metadata-format",
                                f"metadata file '{path}' is not sd-scripts' metadata (an object of image key -> "
                                "{\"caption\": ..., \"tags\": ...})", [str(path)]))
        return plan
    if not metadata:
        findings.append(Finding("warning", "metadata-empty", f"{where}: the metadata file has no entries; the subset "
                                "is skipped (as in sd-scripts)", [str(path)]))
        return plan
    if spec.image_dir and not Path(spec.image_dir).is_dir():
        findings.append(Finding("error", "missing-dir", f"image_dir '{spec.image_dir}' does not exist or is not a "
                                "folder", [spec.image_dir]))
        return plan
    found, missing, latents = [], [], {}
    for key, md in metadata.items():
        p = metadata_image(key, spec.image_dir or None)
        if p is None:
            npz = find_latent(key, spec.image_dir or None)
            if not npz:
                missing.append(key)
                continue
            p = npz[0]
            try:
                latents[p] = read_latent(p)
            except LatentFileError as e:
                plan.unreadable.append((p.name, str(e)))
                continue
        found.append((p, md))
    if missing:
        findings.append(Finding("error", "metadata-no-image",
                                f"{where}: {len(missing)} metadata key(s) have no image "
                                + (f"in '{spec.image_dir}'" if spec.image_dir else "(no image_dir / train_data_dir is set)")
                                + f" and no cached latent (.npz) either: {_names(missing)}. sd-scripts stops on this "
                                "too. Put the images there (file name = key + .png/.jpg/...), or remove those entries",
                                [str(path)]))
    if any("train_resolution" in md for p, md in found if p not in latents):
        findings.append(Finding("info", "metadata-buckets",
                                f"{where}: train_resolution in the metadata (prepare_buckets_latents.py) is not used; "
                                "the images are bucketed from their own sizes with this dataset's bucket settings "
                                "(as sd-scripts' fine-tuning dataset does)"))
    if latents:
        _latent_findings(spec, where, list(latents.values()), findings)
    if ds.validation_split > 0:
        _, val = _validation_split([p for p, _ in found], ds.validation_split, seed)
        val_set = set(val)
        groups = ([(p, md) for p, md in found if p not in val_set], [(p, md) for p, md in found if p in val_set])
    else:
        groups = (found, [])
    tags_list = []
    for group, target in zip(groups, (plan.images, plan.validation_images)):
        for p, md in group:
            lat = latents.get(p)
            if lat is None:
                probe = probe_image(p, check_pixels=check_pixels)
                if not probe.ok:
                    plan.unreadable.append((p.name, probe.error))
                    continue
                size, notes = probe.size, list(probe.notes)
            else:  # (sd-scripts buckets such a key by the size in the file name)
                size, notes = name_size(p) or lat.original_size, []
            caption, tags = _metadata_caption(md, spec.captions.caption_separator or ",",
                                              spec.captions.enable_wildcard)
            if tags and not spec.captions.enable_wildcard and target is plan.images:
                tags_list.append(tags)
            target.append(ImageEntry(p, size, caption, "metadata", None, False, spec.num_repeats,
                                     notes=notes, latent=lat))
    # (sd-scripts counts the tags field only, per metadata file)
    plan.tag_counts = tag_frequency(tags_list)
    return plan


def _latent_findings(spec: SubsetSpec, where: str, lats: list[LatentFile], findings: list[Finding]) -> None:
    """What training from sd-scripts' cached latents (no image) means for this subset, said once."""
    text = (f"{where}: {len(lats)} metadata key(s) have no image but sd-scripts' cached latent (.npz), which is "
            "trained on as it is: at the size it was cached at (its bucket), and it must come from this model's VAE "
            "(the same base model)")
    off = [k for k, on in (("random_crop", spec.random_crop), ("color_aug", spec.color_aug),
                           ("face_crop_aug_range", spec.face_crop_aug_range is not None)) if on]
    if off:
        text += f"; {' / '.join(off)} cannot change a cached latent and do not apply to them"
    unflipped = [lat.path.name for lat in lats if not lat.flipped]
    if spec.flip_aug and unflipped:
        text += (f"; flip_aug: {len(unflipped)} have no flipped latent (made without flip_aug) and are not flipped: "
                 f"{_names(unflipped)}")
    no_alpha = [lat.path.name for lat in lats if not lat.alpha]
    if spec.alpha_mask and no_alpha:
        text += f"; alpha_mask: {len(no_alpha)} hold no alpha mask and are not masked: {_names(no_alpha)}"
    findings.append(Finding("warning" if off or (spec.flip_aug and unflipped) or (spec.alpha_mask and no_alpha)
                            else "info", "cached-latents", text + ". Put the images back to train them fully",
                            [str(lat.path) for lat in lats]))


def _plan_subset(spec: SubsetSpec, ds: DatasetSpec, check_pixels: bool, findings: list[Finding],
                 seed: int) -> SubsetPlan:
    if spec.num_repeats < 1:  # (sd-scripts' way to leave a subset out; said, as sd-scripts warns)
        where = spec.image_dir or spec.metadata_file
        findings.append(Finding("warning", "zero-repeats", f"subset '{spec.name}': num_repeats = {spec.num_repeats} "
                                                           "is below 1, so the subset is left out", [str(where)]))
        return SubsetPlan(spec)
    if spec.metadata_file:
        return _plan_metadata_subset(spec, ds, check_pixels, findings, seed)
    plan = SubsetPlan(spec)
    d = Path(spec.image_dir)
    if not d.is_dir():
        findings.append(Finding("error" if not spec.is_reg else "warning", "missing-dir",
                                f"image_dir '{d}' does not exist or is not a folder", [str(d)]))
        return plan
    exts = image_extensions()
    listed = sorted(d.iterdir(), key=lambda p: str(p))
    files = [p for p in listed if p.is_file()]
    image_files = [p for p in files if p.suffix.lower() in exts]
    for p in listed:  # (is_file() is False for a dangling link: it would vanish from every count)
        if p.is_symlink() and not p.exists() and p.suffix.lower() in exts:
            plan.unreadable.append((p.name, f"a link to {os.readlink(p)}, which does not exist: fix or delete the "
                                            "link"))
    plan.unsupported_files = [p.name for p in files if p.suffix.lower() in _UNSUPPORTED_IMAGE_EXTS and p.suffix.lower() not in exts]
    mixed = [p.name for p in image_files if not sd_scripts_would_glob(p.name)]
    if mixed:
        findings.append(Finding("info", "mixed-case-ext",
                                f"'{spec.name}': {len(mixed)} file(s) with mixed-case extensions are used "
                                f"(sd-scripts on Linux would skip them): {_names(mixed)}", [str(d / m) for m in mixed]))
    nested = [p for p in sorted(d.iterdir()) if p.is_dir() and any(is_img(q) for q in _safe_iter(p))]
    if nested:
        findings.append(Finding("warning", "nested-images",
                                f"'{spec.name}': images in subfolder(s) {', '.join(p.name for p in nested)} are not "
                                "used (sd-scripts does not look into subfolders)", [str(p) for p in nested]))

    if not spec.is_reg and ds.validation_split > 0:
        image_files, val_files = _validation_split(image_files, ds.validation_split, seed)
        image_files.sort(key=lambda p: str(p))
        val_files.sort(key=lambda p: str(p))
    else:
        val_files = []

    other_ext = [e for e in _OTHER_CAPTION_EXTS if e != spec.caption_extension]
    for group, target in ((image_files, plan.images), (val_files, plan.validation_images)):
        for p in group:
            probe = probe_image(p, check_pixels=check_pixels)
            if not probe.ok:
                plan.unreadable.append((p.name, probe.error))
                continue
            try:
                caption, cap_path = find_caption(p, spec.caption_extension, spec.captions.enable_wildcard)
            except CaptionFileError as e:
                plan.caption_errors.append((p.name, str(e), e.sd_scripts_stops))
                caption, cap_path = "", None
            if caption is not None:
                source = "file"
                if cap_path is not None and not spec.captions.enable_wildcard and unused_lines(cap_path):
                    plan.multiline_captions.append(cap_path.name)
            elif spec.class_tokens is not None:
                caption, source = spec.class_tokens, "folder"
                if any(c.is_file() for ext in other_ext for c in caption_candidates(p, ext)):
                    plan.other_extension_captions.append(p.name)
            else:
                caption, source = "", "empty"
                if any(c.is_file() for ext in other_ext for c in caption_candidates(p, ext)):
                    plan.other_extension_captions.append(p.name)
            target.append(ImageEntry(p, probe.size, caption, source, cap_path, spec.is_reg, spec.num_repeats,
                                     notes=list(probe.notes)))
    plan.tag_counts = tag_frequency(e.caption for e in plan.images)
    plan.orphan_captions = _orphan_captions(listed, spec.caption_extension,
                                            {e.caption_path for e in plan.images + plan.validation_images})
    readers: dict[Path, list[str]] = {}
    for e in plan.images + plan.validation_images:
        if e.caption_path is not None:
            readers.setdefault(e.caption_path, []).append(e.path.name)
    plan.shared_captions = [f"{c.name} ({', '.join(n)})" for c, n in readers.items() if len(n) > 1]

    trigger = plan.instance_token
    if trigger:
        pre, suf = spec.captions.caption_prefix or "", spec.captions.caption_suffix or ""
        unread = {n for n, _, _ in plan.caption_errors}  # (an unreadable caption is said as such, not as lacking it)
        plan.missing_trigger = [e.path.name for e in plan.images if e.path.name not in unread
                                and not contains_word(f"{pre} {e.caption} {suf}", trigger)]
    return plan


def _orphan_captions(listed: list[Path], ext: str, used: set) -> list[str]:
    """Caption files no image reads, each "name" or "name (what it looks like)": a typo in a name loses a caption
    without a word otherwise. A caption of an image left out for another reason (unreadable, unsupported) is not
    one of them."""
    stems = {p.stem for p in listed if p.suffix.lower() != ext.lower()}
    captioned = {c.stem for c in used if c is not None}
    images = {p.name: p for p in listed if p.suffix.lower() in image_extensions()}
    by_stem = {p.stem.strip().lower(): p for p in images.values()}
    out = []
    for p in listed:
        if p.suffix.lower() != ext.lower() or p in used or (p.suffix == ext and p.stem in stems):
            continue
        img = images.get(p.stem) or by_stem.get(p.stem.strip().lower())  # (x.png.txt, y.TXT, "c0 .txt")
        if img is not None and p.is_file() and img.stem not in captioned:
            out.append(f"{p.name} (looks like the caption of {img.name}: rename it to {img.stem}{ext})")
        elif p.is_file():
            out.append(p.name)
    return out


# CLIP's pre-tokenizer with every word taken as one token: a lower bound of the BPE count, so a caption over the
# limit by this count is surely cut (digits are one token each in CLIP, more than counted here)
_MIN_TOKENS = re.compile(r"'(?:s|t|re|ve|m|ll|d)\b|[^\W\d_]+|\d|[^\w\s]+|_+", re.I)


def _long_captions(plan: "DatasetPlan", limit: int, findings: list[Finding]) -> None:
    """Captions surely longer than max_token_length lose their end in training: said before it starts (the
    trainer names the rest, counted by the real tokenizer, when it meets them)."""
    long = [(e.path.name, n) for d in plan.datasets for s in d.subsets for e in s.images
            if e.caption_source == "file" and (n := len(_MIN_TOKENS.findall(e.caption))) > limit]
    if long:
        fix = "set max_token_length = 150 or 225, or shorten them" if limit < 225 else "shorten them"
        findings.append(Finding(
            "warning", "caption-too-long",
            f"{len(long)} caption(s) are longer than max_token_length ({limit} tokens) and their ends will not be "
            f"trained: {_names([f'{n} (at least {k} tokens)' for n, k in long])}; {fix}"))


def _output_among_images(plan: "DatasetPlan", config: TrainConfig, findings: list[Finding]) -> None:
    """The LoRAs, samples and states would be written into the dataset (a folder picked in the wrong field)."""
    if not config.output_dir:
        return
    out = os.path.realpath(str(config.resolve(config.output_dir)))
    roots = [config.resolve(config.train_data_dir), config.resolve(config.reg_data_dir)]
    roots += [s.spec.image_dir for d in plan.datasets for s in d.subsets if s.spec.image_dir]
    for root in roots:
        if not root:
            continue
        r = os.path.realpath(str(root))
        if out == r or out.startswith(r.rstrip(os.sep) + os.sep):
            findings.append(Finding("warning", "output-in-dataset",
                                    f"output_dir {str(config.output_dir)!r} is inside the dataset folder {r!r}: the "
                                    "LoRA files, samples and states would be written among your images. Choose "
                                    "another output folder", [out]))
            return


def _safe_iter(p: Path):
    try:
        return list(p.iterdir())
    except OSError:
        return []


def is_img(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in image_extensions()


def _names(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _bucket_part(part: DatasetPart, family: str | None, findings: list[Finding]) -> None:
    ds = part.spec
    if ds.resolution is None:
        findings.append(Finding("error", "no-resolution",
                                "resolution is not set; sd-scripts requires it (e.g. resolution = 512 or \"512,768\")"))
        part.bucketing_ok = False
        return
    if ds.batch_size < 1:
        findings.append(Finding("error", "batch-size", f"batch size must be at least 1, got {ds.batch_size}"))
        part.bucketing_ok = False
        return
    need = 32 if family == "sdxl" else 64  # (the UNet halves the 1/8-size latent 3 times, SDXL's twice)
    if ds.enable_bucket:
        try:
            lo, hi, notes = adjust_min_max_bucket_reso(ds.resolution, ds.min_bucket_reso, ds.max_bucket_reso,
                                                       ds.bucket_reso_steps)
        except BucketSettingsError as e:
            findings.append(Finding("error", "bucket-settings", str(e)))
            part.bucketing_ok = False
            return
        for n in notes:
            findings.append(Finding("info", "bucket-settings", n))
        ds.min_bucket_reso, ds.max_bucket_reso = lo, hi
        if ds.bucket_reso_steps % need:
            findings.append(Finding(
                "error" if family else "warning", "bucket-steps",
                f"bucket_reso_steps {ds.bucket_reso_steps} is not a multiple of {need}"
                + ("" if family else " (SD1/SD2 need 64; SDXL accepts 32)")
                + f": bucket sides must be sizes the model's UNet can take (sd-scripts refuses this too). Use "
                  f"bucket_reso_steps = {need if family else 64}" + ("" if family == "sdxl" else " (SDXL: 32)")))
            if family:
                part.bucketing_ok = False  # (no bucket table for settings that cannot run)
                return
        if ds.bucket_no_upscale:
            findings.append(Finding("info", "no-upscale",
                                    "bucket_no_upscale: min/max_bucket_reso are not used; each image's bucket is its "
                                    "size (shrunk to the resolution's area if larger) rounded down to "
                                    f"{ds.bucket_reso_steps}"))
        manager = BucketManager(ds.bucket_no_upscale, ds.resolution, lo, hi, ds.bucket_reso_steps)
    else:
        w, h = ds.resolution
        if w % need or h % need:
            sizes = [f"{max(need, w // need * need)}x{max(need, h // need * need)}",
                     f"{-(-w // need) * need}x{-(-h // need) * need}"]
            fit = " or ".join(dict.fromkeys(sizes))
            fatal = family is not None or w % 32 or h % 32  # (an unknown model may be an SDXL one)
            findings.append(Finding(
                "error" if fatal else "warning", "resolution-steps",
                f"resolution {w}x{h} is not a multiple of {need}"
                + ("" if family else " (SD1/SD2 need 64; SDXL accepts 32)")
                + f": the model cannot take images of that size. Use {fit}, or set enable_bucket = true"))
            if fatal:
                part.bucketing_ok = False
                return
        if ds.bucket_no_upscale:
            findings.append(Finding("info", "no-upscale-unused",
                                    "bucket_no_upscale works with enable_bucket = true only; with buckets off every "
                                    f"image is scaled to cover {w}x{h}, smaller ones enlarged"))
        manager = BucketManager(False, ds.resolution, None, None, None, predefined=[ds.resolution])
        findings.append(Finding(
            "info", "buckets-off",
            f"enable_bucket is off: every image is scaled to cover {ds.resolution[0]}x{ds.resolution[1]} and "
            "centre-cropped (sd-scripts does this when caching latents; without caching it would refuse images of "
            "any other size)"))

    for s in part.subsets:
        keep, wrong_family, wrong_size, own_size = [], [], [], []
        for e in s.images + s.validation_images:
            if e.latent is None:
                continue
            made, bw, bh = e.latent.made_for, *e.latent.bucket
            if family and made and (made == "sdxl") != (family == "sdxl"):
                wrong_family.append(e.path.name)
            elif family and (bw % need or bh % need):
                wrong_size.append(f"{e.path.name} ({bw}x{bh})")
            else:
                e.bucket = e.resized_size = e.latent.bucket
                if manager.select_bucket(*e.size).reso != e.latent.bucket:
                    own_size.append(e.path.name)
        if wrong_family:
            findings.append(Finding("error", "cached-latents-family",
                                    f"'{s.name}': {len(wrong_family)} cached latent(s) were made for "
                                    f"{'SDXL' if family != 'sdxl' else 'SD1/SD2'} (the file name says so), not "
                                    f"for this {family.upper()} model: {_names(wrong_family)}. Train them with the "
                                    "images, or on the model they were cached with"))
        if wrong_size:
            findings.append(Finding("error", "cached-latents-size",
                                    f"'{s.name}': {len(wrong_size)} cached latent(s) have a size this model cannot "
                                    f"train on (width and height must be multiples of {need}): {_names(wrong_size)}. "
                                    "Train them with the images instead"))
        if own_size:
            findings.append(Finding("info", "cached-latents-bucket",
                                    f"'{s.name}': {len(own_size)} cached latent(s) were made with other bucket "
                                    "settings than this dataset's and train at their cached size: "
                                    f"{_names(own_size)}"))
        for e in s.images:
            if e.latent is not None:
                if e.bucket is not None:
                    keep.append(e)
                continue
            choice = manager.select_bucket(*e.size)
            if choice.reso[0] <= 0 or choice.reso[1] <= 0:
                s.too_small.append(e.path.name)
                continue
            e.bucket, e.resized_size, e.ar_error = choice.reso, choice.resized_size, choice.ar_error
            keep.append(e)
        s.images = keep
        for e in s.validation_images:  # held-out images get buckets too (validation loss); never counted
            if e.latent is not None:
                continue
            choice = manager.select_bucket(*e.size)
            if choice.reso[0] > 0 and choice.reso[1] > 0:
                e.bucket, e.resized_size = choice.reso, choice.resized_size
        if s.too_small:
            w, h = ds.resolution
            how = (f" once shrunk to the resolution's area ({w}x{h}), as bucket_no_upscale does with larger "
                   "images," if ds.bucket_no_upscale else "")
            findings.append(Finding("warning", "too-small",
                                    f"'{s.name}': {len(s.too_small)} image(s) have a side smaller than "
                                    f"bucket_reso_steps {ds.bucket_reso_steps}{how} and are left out: "
                                    f"{_names(s.too_small)}"))


def _finish_part(part: DatasetPart, findings: list[Finding]) -> None:
    ds = part.spec
    for i, s in enumerate(part.subsets):
        for e in s.images:
            e.subset_index = i
    reg_entries = [e for s in part.subsets if s.is_reg for e in s.images]
    balance_reg_repeats(part.num_train_images, reg_entries)
    if not part.bucketing_ok:
        return
    used = part.used_entries()
    counts: Counter = Counter()
    train_counts: Counter = Counter()
    for e in used:
        counts[e.bucket] += e.num_repeats
        if not e.is_reg:
            train_counts[e.bucket] += e.num_repeats
    part.bucket_counts = dict(sorted(counts.items()))
    part.bucket_counts_train_only = dict(sorted(train_counts.items()))
    # sd-scripts averages |ar error| over registered images (each once, unused reg images excluded)
    errs = [abs(e.ar_error) for e in used]
    part.mean_ar_error = float(sum(errs) / len(errs)) if errs else 0.0
    part.batches = batches_per_epoch(part.bucket_counts, ds.batch_size)
    part.batches_without_reg = batches_per_epoch(part.bucket_counts_train_only, ds.batch_size)
    biggest = max(counts.values(), default=0)
    if 0 < biggest < ds.batch_size:  # (a batch never mixes buckets: none can fill, so the batch size is not used)
        findings.append(Finding(
            "warning", "batch-never-full",
            f"batch size {ds.batch_size}, but no bucket holds more than {biggest} sample(s) per epoch (images x "
            f"repeats), so no batch is ever full: each step trains on fewer images than set. Lower the batch size "
            f"to {biggest} or less, or add images or repeats"))


def _face_crop_findings(part: DatasetPart, s: SubsetPlan, findings: list[Finding]) -> None:
    rng = s.spec.face_crop_aug_range
    where = f"'{s.name}'"
    if rng is None:
        return
    if len(rng) != 2 or not all(v > 0 for v in rng) or rng[0] > rng[1]:
        findings.append(Finding("error", "face-crop-range",
                                f"{where}: face_crop_aug_range = {list(rng)} must be two numbers above 0, the smaller "
                                "first, e.g. [2.0, 4.0] (the crop is 2 to 4 face sizes across)"))
        return
    if part.spec.enable_bucket:
        findings.append(Finding("warning", "face-crop-buckets",
                                f"{where}: face_crop_aug_range is used only with enable_bucket = false (sd-scripts "
                                "ignores it with buckets too); these images are bucketed and not face-cropped"))
        return
    without = [e.path.name for e in s.images if e.latent is None and face_from_name(e.path) is None]
    if without:
        findings.append(Finding("info", "face-crop-no-face",
                                f"{where}: {len(without)} of {len(s.images)} image(s) carry no face position in their "
                                f"name (name_cx_cy_w_h.png, in pixels) and are centre-cropped: {_names(without)}"))


def _reg_caption_findings(part: DatasetPart, s: SubsetPlan, where: str, findings: list[Finding]) -> None:
    """Regularisation images teach the class as the model knows it: an empty caption, or the subject's trigger
    word in theirs, undoes that without any error."""
    subjects = [o for o in part.subsets if not o.is_reg and o.instance_token]
    cls = next((o.class_token for o in subjects if o.class_token), "cat")
    empty = [e.path.name for e in s.images if not e.caption.strip()]
    if empty:
        findings.append(Finding(
            "warning", "reg-empty-caption",
            f"{where}: {len(empty)} regularisation image(s) train with an empty caption: {_names(empty)}. Name the "
            f"folder after the class (e.g. 1_{cls}), or give them captions with the class word",
            [str(s.path / n) for n in empty]))
    for t in dict.fromkeys(o.instance_token for o in subjects):
        has = [e.path.name for e in s.images if contains_word(e.caption, t)]
        if has:
            findings.append(Finding(
                "warning", "reg-trigger",
                f"{where}: the trigger word '{t}' is in {len(has)} regularisation caption(s): {_names(has)}. "
                "Regularisation images show the class without your subject, so the trigger belongs in the training "
                f"captions only (a folder named 1_{cls}, not 1_{t} {cls})", [str(s.path / n) for n in has]))


def _subset_findings(part: DatasetPart, findings: list[Finding]) -> None:
    for s in part.subsets:
        where = f"'{s.name}'"
        _face_crop_findings(part, s, findings)
        if s.is_reg and s.images and not s.spec.metadata_file:
            _reg_caption_findings(part, s, where, findings)
        if s.unreadable:
            findings.append(Finding(
                "warning", "unreadable",
                f"{where}: {len(s.unreadable)} file(s) cannot be read and are left out: "
                + "; ".join(f"{n} ({why})" for n, why in s.unreadable[:5])
                + (f"; and {len(s.unreadable) - 5} more" if len(s.unreadable) > 5 else "")
                + ". Re-save or delete them.", [str(s.path / n) for n, _ in s.unreadable]))
        for n, why, stops in s.caption_errors:
            findings.append(Finding("error", "caption-file", f"{where}: {why} (image {n})"
                                    + ("; sd-scripts stops on it" if stops else ""),
                                    [str(s.path / n)]))
        if s.multiline_captions:
            findings.append(Finding(
                "warning", "caption-lines",
                f"{where}: {len(s.multiline_captions)} caption file(s) have more than one line, and only the first "
                f"line is used (as in sd-scripts): {_names(s.multiline_captions)}. Put the whole caption on one line, "
                "or set enable_wildcard = true to train on one of the lines at random each time",
                [str(s.path / n) for n in s.multiline_captions]))
        if s.shared_captions:
            findings.append(Finding(
                "warning", "caption-shared",
                f"{where}: {len(s.shared_captions)} caption file(s) are read by more than one image of the same name: "
                f"{_names(s.shared_captions)}. Each of them trains with it (as in sd-scripts); if they are different "
                "pictures, rename one, with a caption of its own"))
        if s.orphan_captions:
            findings.append(Finding(
                "warning", "caption-orphan",
                f"{where}: {len(s.orphan_captions)} caption file(s) belong to no image and are not used: "
                f"{_names(s.orphan_captions)}. A caption is read from the file named like its image (a.png: a"
                f"{s.spec.caption_extension})", [str(s.path / n.split(' (')[0]) for n in s.orphan_captions]))
        if s.unsupported_files:
            findings.append(Finding(
                "warning", "unsupported-ext",
                f"{where}: {len(s.unsupported_files)} file(s) in formats sd-scripts does not read are skipped: "
                f"{_names(s.unsupported_files)} (convert them to PNG or JPEG)"))
        if not s.images and not s.unreadable and not s.spec.metadata_file:  # (a metadata subset says why itself)
            findings.append(Finding("warning", "empty-subset", f"{where}: no images found; the folder is skipped",
                                    [str(s.path)]))
        if s.other_extension_captions:
            other = ".caption" if s.spec.caption_extension == ".txt" else ".txt"
            findings.append(Finding(
                "warning", "caption-extension",
                f"{where}: {len(s.other_extension_captions)} image(s) have a {other} caption file but captions are "
                f"read from {s.spec.caption_extension} files, so those captions are NOT used: "
                f"{_names(s.other_extension_captions)}. Set caption_extension = \"{other}\" to use them."))
        missing_caption = [e.path.name for e in s.images if e.caption_source != "file"]
        if s.images and missing_caption and not s.is_reg and not s.spec.metadata_file:
            fallback = f"the folder tokens '{s.class_tokens}'" if s.class_tokens else "an empty caption"
            findings.append(Finding(
                "info" if s.n_captioned == 0 else "warning", "no-caption",
                f"{where}: {len(missing_caption)} of {s.n_images} image(s) have no {s.spec.caption_extension} file "
                f"and are captioned with {fallback}: {_names(missing_caption)}"))
        if s.missing_trigger:
            findings.append(Finding(
                "warning", "missing-trigger",
                f"{where}: the trigger word '{s.instance_token}' is missing from {len(s.missing_trigger)} of "
                f"{s.n_images} caption(s): {_names(s.missing_trigger)}. A caption file replaces the folder name, so "
                f"the trigger must be written in it (or set caption_prefix = \"{s.instance_token}\").",
                [str(s.path / n) for n in s.missing_trigger]))
        up = s.upscaled
        if up:
            findings.append(Finding(
                "info", "upscaled",
                f"{where}: {len(up)} image(s) are smaller than their bucket and will be enlarged (Lanczos): "
                f"{_names(up)}" + ("" if part.spec.bucket_no_upscale else
                                    "; bucket_no_upscale = true avoids it" if part.spec.enable_bucket else
                                    "; enable_bucket = true with bucket_no_upscale = true avoids it")))
        rotated = [e.path.name for e in s.images if any(n.startswith("EXIF orientation") for n in e.notes)]
        if rotated:
            findings.append(Finding("info", "exif-rotation",
                                    f"{where}: EXIF orientation applied to {len(rotated)} image(s): {_names(rotated)} "
                                    "(sd-scripts ignores it and would train them unrotated)"))
        deep = [e.path.name for e in s.images if any(n.startswith("16-bit") for n in e.notes)]
        if deep:
            findings.append(Finding("info", "16-bit", f"{where}: 16-bit greyscale image(s) scaled to 8 bits: "
                                                      f"{_names(deep)} (sd-scripts would clip them to white)"))
        for code, start, what in (("large-image", "very large", "are very large (each decode takes seconds and "
                                   "gigabytes; downscale them unless latents are cached)"),
                                  ("bad-exif", "unreadable EXIF", "have an unreadable EXIF block and are used as "
                                   "stored, without EXIF rotation")):
            hit = [e.path.name for e in s.images if any(n.startswith(start) for n in e.notes)]
            if hit:
                findings.append(Finding("info", code, f"{where}: {len(hit)} image(s) {what}: {_names(hit)}"))
        alpha = [e.path.name for e in s.images if any("alpha channel is dropped" in n for n in e.notes)]
        if alpha:
            findings.append(Finding("info", "alpha", f"{where}: transparency is dropped, not composited, for "
                                                     f"{len(alpha)} image(s) (as sd-scripts): {_names(alpha)}"))


def build_plan(config: TrainConfig, family: str | None = None, check_pixels: bool = True) -> DatasetPlan:
    """The full dataset plan for ``config`` (folder convention, or ``config.dataset_config``).

    ``family`` ('sd1' | 'sd2' | 'sdxl' | None) sets the bucket-step rule (64, or 32 for SDXL). ``check_pixels``
    decodes every image so corrupt files are found now (slower on big sets)."""
    plan = DatasetPlan(config)
    findings = plan.findings
    for n in config.notes:
        findings.append(Finding("info", "config", n))
    seed = config.validation_seed if config.validation_seed is not None else (config.seed or 0)

    if config.dataset_config:
        plan.from_dataset_config = True
        try:
            specs, notes = load_dataset_config(config.resolve(config.dataset_config), config)
        except TrainConfigError as e:
            findings.append(Finding("error", "dataset-config", str(e)))
            return plan
        findings.extend(Finding("info", "dataset-config", n) for n in notes)
        for spec in specs:
            for sub in spec.subsets:
                _check_subset_dir_level(sub, findings)
    else:
        if config.in_json:  # sd-scripts' fine-tuning dataset: one subset, the images in train_data_dir
            subsets = [SubsetSpec(image_dir=str(config.resolve(config.train_data_dir) or ""),
                                  num_repeats=config.dataset_repeats,
                                  captions=config.caption_options(), color_aug=config.color_aug,
                                  flip_aug=config.flip_aug, random_crop=config.random_crop,
                                  face_crop_aug_range=config.face_crop_aug_range, alpha_mask=config.alpha_mask,
                                  resize_interpolation=config.resize_interpolation,
                                  metadata_file=str(config.resolve(config.in_json)))]
            if config.reg_data_dir:
                findings.append(Finding("warning", "in-json-reg", "reg_data_dir is not used with in_json (sd-scripts' "
                                        "fine-tuning dataset has no regularisation images)"))
        else:
            subsets, f = subsets_from_folders(config.resolve(config.train_data_dir),
                                              config.resolve(config.reg_data_dir), config)
            findings.extend(f)
        specs = [DatasetSpec(
            resolution=config.resolution, batch_size=config.train_batch_size, enable_bucket=config.enable_bucket,
            min_bucket_reso=config.min_bucket_reso, max_bucket_reso=config.max_bucket_reso,
            bucket_reso_steps=config.bucket_reso_steps, bucket_no_upscale=config.bucket_no_upscale,
            resize_interpolation=config.resize_interpolation, validation_split=config.validation_split,
            validation_seed=config.validation_seed, subsets=subsets,
        )]

    for spec in specs:
        part = DatasetPart(spec)
        ds_seed = spec.validation_seed if spec.validation_seed is not None else seed
        for sub in spec.subsets:
            part.subsets.append(_plan_subset(sub, spec, check_pixels, findings, ds_seed))
        _attach_masks(part, config, findings)
        _bucket_part(part, family, findings)
        _finish_part(part, findings)
        _subset_findings(part, findings)
        plan.datasets.append(part)

    _long_captions(plan, config.max_token_length or 75, findings)
    _output_among_images(plan, config, findings)
    if config.masked_loss and not any(sub.spec.conditioning_data_dir or sub.spec.alpha_mask
                                      for d in plan.datasets for sub in d.subsets):
        findings.append(Finding("warning", "masked-loss-no-masks",
                                "masked_loss = true, but no subset has conditioning_data_dir (mask images) or "
                                "alpha_mask: nothing is masked"))
    if plan.num_train_images == 0 and not plan.errors:
        findings.append(Finding("error", "no-images", "no training images were found; nothing to train on"))
    if plan.num_reg_images and plan.num_train_images < plan.num_reg_images:
        findings.append(Finding("info", "reg-surplus",
                                "there are more reg samples than training samples, so some reg images are not used "
                                "(sd-scripts: 'some of reg images are not used')"))
    if all(d.bucketing_ok for d in plan.datasets) and plan.datasets and plan.batches_per_epoch:
        plan.steps = compute_steps(plan.batches_per_epoch, config.gradient_accumulation_steps,
                                   config.max_train_steps, config.max_train_epochs)
        if plan.num_reg_images:
            plan.steps_without_reg = compute_steps(sum(d.batches_without_reg for d in plan.datasets),
                                                   config.gradient_accumulation_steps, config.max_train_steps,
                                                   config.max_train_epochs)
        try:
            plan.start = start_point(plan.steps, config.initial_epoch, config.initial_step,
                                     config.skip_until_initial_step)
        except ValueError as e:
            findings.append(Finding("error", "initial-step", str(e)))
        if plan.start and plan.start.explanation:
            runs = plan.start.end_step - plan.start.step
            findings.append(Finding("info", "initial-step-schedule",
                                    "initial_epoch / initial_step do not move the learning-rate schedule or restore "
                                    "the optimizer (as in sd-scripts): the schedule starts from its beginning and "
                                    f"this run makes {runs} of its {plan.steps.max_train_steps} steps. To continue a "
                                    "run exactly, resume from its state file (save_state) instead"))
        elif config.skip_until_initial_step:
            findings.append(Finding("info", "skip-without-initial-step",
                                    "skip_until_initial_step does nothing without initial_step or initial_epoch"))
        warm = config.lr_warmup_steps
        warm_steps = math.floor(warm * plan.steps.max_train_steps) if isinstance(warm, float) and warm < 1 else int(warm)
        if warm_steps >= plan.steps.max_train_steps > 0:
            findings.append(Finding("warning", "warmup-too-long",
                                    f"lr_warmup_steps {warm_steps} is not shorter than the whole run "
                                    f"({plan.steps.max_train_steps} steps): the learning rate never reaches its value"))
    return plan


def _attach_masks(part: DatasetPart, config: TrainConfig, findings: list[Finding]) -> None:
    """masked_loss with mask images (sd-scripts' ControlNet-style subsets): every image of a subset with
    conditioning_data_dir gets the image of the same file name there; its R channel weights the loss (white 1,
    black 0). As in sd-scripts: every subset of the dataset needs one, no image may lack its mask, no mask may lack
    its image, and sizes must match."""
    with_dir = [s for s in part.subsets if s.spec.conditioning_data_dir]
    if not with_dir:
        return
    if not config.masked_loss:
        findings.append(Finding("error", "conditioning-without-masked-loss",
                                "conditioning_data_dir is read as loss masks, which needs masked_loss = true "
                                "(ControlNet training is not supported); set masked_loss = true or remove "
                                "conditioning_data_dir",
                                [with_dir[0].spec.conditioning_data_dir]))
        return
    if len(with_dir) != len(part.subsets):
        names = [s.spec.name for s in part.subsets if not s.spec.conditioning_data_dir]
        findings.append(Finding("error", "conditioning-partial",
                                f"a dataset's mask images are read only when every subset has conditioning_data_dir "
                                f"(sd-scripts' rule); these have none: {_names(names)}. Give them one, or put them "
                                "in a dataset of their own"))
        return
    for sub in with_dir:
        d = Path(sub.spec.conditioning_data_dir)
        if not d.is_dir():
            findings.append(Finding("error", "conditioning-missing-dir",
                                    f"conditioning_data_dir '{d}' of subset {sub.spec.name} is not a folder", [str(d)]))
            continue
        masks = {p.stem: p for p in sorted(_safe_iter(d)) if is_img(p)}
        missing, wrong_size = [], []
        for e in sub.images + sub.validation_images:
            m = masks.get(e.path.stem)
            if m is None:
                missing.append(e.path.name)
                continue
            probe = probe_image(m, check_pixels=False)
            if not probe.ok or probe.size != e.size:
                wrong_size.append(f"{m.name} ({'unreadable' if not probe.ok else '%dx%d' % probe.size} for a "
                                  f"{e.size[0]}x{e.size[1]} image)")
                continue
            e.mask_path = m
        images = {p.stem for p in _safe_iter(Path(sub.spec.image_dir)) if is_img(p)}
        extra = sorted(p.name for stem, p in masks.items() if stem not in images)
        if missing:
            findings.append(Finding("error", "mask-missing",
                                    f"subset {sub.spec.name}: {len(missing)} image(s) have no mask of the same name in "
                                    f"{d}: {_names(missing)}", [str(d)]))
        if wrong_size:
            findings.append(Finding("error", "mask-size",
                                    f"subset {sub.spec.name}: a mask must be the size of its image: "
                                    f"{_names(wrong_size)}", [str(d)]))
        if extra:
            findings.append(Finding("error", "mask-extra",
                                    f"subset {sub.spec.name}: {len(extra)} mask(s) in {d} have no training image "
                                    f"(sd-scripts stops on them): {_names(extra)}", [str(d)]))


def _check_subset_dir_level(sub: SubsetSpec, findings: list[Finding]) -> None:
    d = Path(sub.image_dir)
    if sub.metadata_file or not d.is_dir():
        return
    has_images = any(is_img(p) for p in _safe_iter(d))
    numbered = sorted(p.name for p in _safe_iter(d) if p.is_dir() and any(is_img(q) for q in _safe_iter(p)))
    if not has_images and numbered:
        findings.append(Finding(
            "error", "wrong-level",
            f"image_dir '{d}' holds no images but has image folders inside ({_names(numbered)}); in a dataset config "
            "each subset's image_dir must be the folder that holds the images, with num_repeats and class_tokens "
            "set as keys (folder names carry no meaning there)", [str(d)]))


# ---------------------------------------------------------------------------------------------------------------
# report


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _reg_words(part: DatasetPart) -> str | None:
    regs = [s for s in part.subsets if s.is_reg and s.images]
    if not regs:
        return None
    train = part.num_train_images
    reg_before = part.num_reg_images
    used = part.reg_samples_used
    entries = [e for s in regs for e in s.images]
    def desc(subs):
        return " + ".join(f"{_plural(s.n_images, 'image')} x {_plural(s.repeats, 'repeat')}" for s in subs)

    train_desc = desc([s for s in part.subsets if not s.is_reg and s.images])
    lines = [f"Regularisation: {train} training samples per epoch ({train_desc or 'none'}); the reg folders "
             f"hold {reg_before} reg samples ({desc(regs)})."]
    if train == 0:
        lines.append("With no training samples no reg image is used.")
        return " ".join(lines)
    by_rep = Counter(e.num_repeats for e in entries)
    unused = by_rep.pop(0, 0)
    usage = ", ".join(f"{_plural(n, 'image')} x {r}" for r, n in sorted(by_rep.items(), reverse=True))
    if reg_before < train:
        lines.append(f"That is fewer, so sd-scripts repeats reg images round-robin until they reach {train}: "
                     f"{usage} = {used} reg samples per epoch.")
    elif reg_before > train:
        lines.append(f"That is more, so reg images are taken in order with their folder repeats until {train} is "
                     f"reached: {usage} = {used} reg samples per epoch; {_plural(unused, 'reg image')} "
                     "are never used.")
    else:
        lines.append(f"That is exactly as many: {used} reg samples per epoch.")
    if used != train:
        lines.append(f"(The last reg image's repeats overshoot {train} by {used - train}.)")
    lines.append(f"Each epoch therefore holds {train + used} samples, about twice the training samples, so the "
                 f"steps per epoch roughly double: {part.batches_without_reg} batches without reg images, "
                 f"{part.batches} with them (batch size {part.spec.batch_size}).")
    return " ".join(lines)


def _report(plan: DatasetPlan, errors: bool = True) -> str:
    cfg = plan.config
    out: list[str] = ["Dataset plan (kohya sd-scripts rules)"]
    if plan.from_dataset_config:
        out.append(f"  dataset config: {cfg.dataset_config}")
    else:
        out.append(f"  train_data_dir: {cfg.resolve(cfg.train_data_dir)}")
        if cfg.in_json:
            out.append(f"  in_json:        {cfg.resolve(cfg.in_json)} (captions from the metadata)")
        elif cfg.reg_data_dir:
            out.append(f"  reg_data_dir:   {cfg.resolve(cfg.reg_data_dir)}")
    for di, part in enumerate(plan.datasets):
        ds = part.spec
        if len(plan.datasets) > 1:
            out.append(f"Dataset {di + 1}:")
        reso = f"{ds.resolution[0]}x{ds.resolution[1]}" if ds.resolution else "(no resolution)"
        if ds.enable_bucket:
            mode = ("no upscaling: buckets follow image sizes" if ds.bucket_no_upscale else
                    f"buckets {ds.min_bucket_reso}-{ds.max_bucket_reso} step {ds.bucket_reso_steps}")
        else:
            mode = "buckets off"
        exts = sorted({s.spec.caption_extension for s in part.subsets if not s.spec.metadata_file})
        meta = any(s.spec.metadata_file for s in part.subsets)
        source = ", ".join([f"{', '.join(exts)} files"] * bool(exts) + ["the metadata file"] * meta)
        out.append(f"  resolution {reso}, batch size {ds.batch_size}, {mode}"
                   + (f", captions from {source}" if source else ""))
        for kind, subs in (("Training folders", [s for s in part.subsets if not s.is_reg]),
                           ("Regularisation folders", [s for s in part.subsets if s.is_reg])):
            if not subs:
                continue
            out.append(f"  {kind}:")
            for s in subs:
                if s.spec.metadata_file:
                    out.append(f"    {s.name}: {_plural(s.repeats, 'repeat')}; {_plural(s.n_images, 'image')} with "
                               f"captions from the metadata -> {s.samples} samples"
                               + (f"; {len(s.validation_images)} held out for validation"
                                  if s.validation_images else ""))
                    continue
                if not s.is_reg and s.instance_token:
                    tokens = f"trigger '{s.instance_token}'" + (f", class '{s.class_token}'" if s.class_token else "")
                else:
                    tokens = f"class '{s.class_token}'" if s.class_token else "no folder tokens"
                line = (f"    {s.name}: {_plural(s.repeats, 'repeat')}, {tokens}; {_plural(s.n_images, 'image')} "
                        f"({s.n_captioned} with caption files) -> {s.samples} samples")
                if s.is_reg:
                    line += f", {s.samples_used} used per epoch after balancing"
                if s.validation_images:
                    line += f"; {len(s.validation_images)} held out for validation"
                out.append(line)
                if s.missing_trigger:
                    out.append(f"      trigger '{s.instance_token}' missing from {len(s.missing_trigger)} caption(s): "
                               f"{_names(s.missing_trigger)}")
                if s.upscaled:
                    out.append(f"      {_plural(len(s.upscaled), 'image')} enlarged to their bucket: {_names(s.upscaled)}")
                if s.unreadable:
                    out.append(f"      {len(s.unreadable)} unreadable file(s) left out: "
                               f"{_names([n for n, _ in s.unreadable])}")
        out.append(f"  Samples per epoch: {part.num_train_images} training"
                   + (f" + {part.reg_samples_used} reg" if part.reg_samples_used else ""))
        words = _reg_words(part)
        if words:
            out.append("  " + words)
        if part.bucketing_ok and part.bucket_counts:
            out.append("  Buckets (samples incl. repeats -> batches):")
            for (w, h), n in part.bucket_counts.items():
                out.append(f"    {w}x{h}: {n} -> {math.ceil(n / ds.batch_size)}")
            out.append(f"  {part.batches} batches per epoch (each bucket's last batch may be partial); "
                       f"mean aspect-ratio error {part.mean_ar_error:.4f}")
    if plan.steps:
        st = plan.steps
        out.append(f"Steps: {st.batches_per_epoch} batches per epoch -> {st.updates_per_epoch} optimizer steps per "
                   f"epoch; {st.explanation}; total {st.max_train_steps} steps over {_plural(st.num_epochs, 'epoch')}.")
        if plan.steps_without_reg:
            out.append(f"  Without the reg images it would be {plan.steps_without_reg.max_train_steps} steps.")
        if plan.start and plan.start.explanation:
            out.append(f"  Start: {plan.start.explanation}.")
    for level in ("error", "warning", "info") if errors else ("warning", "info"):
        items = [f for f in plan.findings if f.level == level]
        if items:
            out.append({"error": "Errors:", "warning": "Warnings:", "info": "Notes:"}[level])
            out.extend(f"  - {f.message}" for f in items)
    return "\n".join(out)


__all__ = [
    "DatasetPart",
    "DatasetPlan",
    "Finding",
    "ImageEntry",
    "SubsetPlan",
    "balance_reg_repeats",
    "build_plan",
]


def signature_changes(then: dict | None, now: dict) -> list[str]:
    """What differs between a state's data (``DatasetPlan.signature``) and this run's, in words; [] when the
    same or when the state is of a version that did not record it."""
    if not then:
        return []
    out = []
    for key, what in (("images", "training images"), ("reg_images", "regularisation images")):
        if then.get(key) != now.get(key):
            out.append(f"{then.get(key)} {what} then, {now.get(key)} now")
    if not out and then.get("files") != now.get("files"):
        out.append("other image files or repeat counts (the same number of images)")

    def one(v):
        return v[0] if isinstance(v, list) and len(v) == 1 else v
    for key, what in (("resolution", "resolution"), ("batch_size", "batch size")):
        if then.get(key) != now.get(key):
            a, b = one(then.get(key)), one(now.get(key))
            fmt = (lambda r: "x".join(map(str, r)) if isinstance(r, list) and r and not isinstance(r[0], list)
                   else str(r)) if key == "resolution" else str
            out.append(f"{what} {fmt(a)} then, {fmt(b)} now")
    if then.get("batches_per_epoch") != now.get("batches_per_epoch"):
        out.append(f"{then.get('batches_per_epoch')} batches per epoch then, {now.get('batches_per_epoch')} now")
    return out

