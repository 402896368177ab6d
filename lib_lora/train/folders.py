"""The ``N_name`` folder convention (sd-scripts without a dataset config) and the mistakes people make with it.

sd-scripts (``config_util.generate_dreambooth_subsets_config_by_subdirs``): only the immediate subfolders of
``train_data_dir`` / ``reg_data_dir`` are subsets; the name is split on ``_``, ``int(first)`` is the repeat count
(folders where it is not an integer are ignored with a warning; repeats < 1 are skipped) and the rest, re-joined with
``_``, is the class-token string used as the fallback caption. We read the first word of that string as the instance
(trigger) token and the rest as the class: ``20_svs cat`` -> repeats 20, trigger ``svs``, class ``cat``.

Subfolders are visited in name order (sd-scripts uses ``Path.iterdir()`` order, which depends on the filesystem; the
order matters only for which reg images are used first when there are more than needed).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .config import SubsetSpec, TrainConfig, missing_path_hint
from .images import is_image_name


@dataclass
class Finding:
    """One thing the plan tells the user. ``level``: 'error' (training would fail or be wrong), 'warning'
    (it runs, but probably not as meant), 'info'."""

    level: str
    code: str
    message: str
    paths: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return f"{self.level}: {self.message}"


def parse_folder_name(name: str) -> tuple[int, str] | None:
    """``"20_svs cat"`` -> ``(20, "svs cat")``; ``"10_sks_dog"`` -> ``(10, "sks_dog")``; no leading integer -> None."""
    tokens = name.split("_")
    try:
        repeats = int(tokens[0])
    except ValueError:
        return None
    return repeats, "_".join(tokens[1:])


def split_class_tokens(class_tokens: str | None) -> tuple[str | None, str]:
    """``"svs cat"`` -> ``("svs", "cat")``: first word = instance (trigger) token, the rest = class."""
    words = (class_tokens or "").split()
    if not words:
        return None, ""
    return words[0], " ".join(words[1:])


def _count_images(d: Path) -> int:
    try:
        return sum(1 for p in d.iterdir() if p.is_file() and is_image_name(p.name))
    except OSError:
        return 0


def _numbered_subdirs(d: Path) -> list[str]:
    try:
        return sorted(p.name for p in d.iterdir() if p.is_dir() and (parse_folder_name(p.name) or (0,))[0] >= 1)
    except OSError:
        return []


def _rename_hint(name: str, is_reg: bool) -> str:
    shown = name.lstrip(". ")  # (a hidden '.5_svs cat': the dot is the only mistake)
    if shown != name and parse_folder_name(shown):
        return shown
    m = re.match(r"^(.*?)[_ -]?(\d+)$", name)
    if m and m.group(1):
        return f"{m.group(2)}_{m.group(1)}"
    return f"1_{name}" if is_reg else f"10_{name}"


def _same(a: Path | None, b: Path | None) -> bool:
    if a is None or b is None:
        return False
    try:
        return os.path.realpath(a) == os.path.realpath(b)
    except OSError:
        return False


def scan_data_dir(
    data_dir: Path, is_reg: bool, defaults: TrainConfig, skip: Path | None = None
) -> tuple[list[SubsetSpec], list[Finding]]:
    """Subsets for one data dir, plus findings about anything that will not be used and why."""
    role = "reg_data_dir" if is_reg else "train_data_dir"
    findings: list[Finding] = []
    subsets: list[SubsetSpec] = []
    if not data_dir.exists():
        findings.append(Finding("error", "missing-dir", f"{role} '{data_dir}' does not exist"
                                + missing_path_hint(data_dir, defaults.base_dir), [str(data_dir)]))
        return subsets, findings
    if not data_dir.is_dir():
        findings.append(Finding("error", "not-a-dir", f"{role} '{data_dir}' is a file, not a folder", [str(data_dir)]))
        return subsets, findings

    entries = sorted(data_dir.iterdir(), key=lambda p: p.name)
    loose = [p for p in entries if p.is_file() and is_image_name(p.name)]
    for f in entries:  # (an archive or a link named like a concept folder: easy to take for one)
        if not f.is_dir() and not is_image_name(f.name) and (parse_folder_name(f.name) or (0,))[0] >= 1:
            findings.append(Finding("warning", "not-a-folder",
                                    f"'{f.name}' in {role} is named like an image folder but is a file, not a folder; "
                                    "it is ignored (unpack it, or make a folder of that name holding the images)",
                                    [str(f)]))
    for sub in (p for p in entries if p.is_dir()):
        if _same(sub, skip):
            other = "train_data_dir" if is_reg else "reg_data_dir"
            findings.append(Finding("info", "data-dir-inside",
                                    f"folder '{sub.name}' inside {role} is the {other}; it is not a subset of {role}",
                                    [str(sub)]))
            continue
        parsed = parse_folder_name(sub.name)
        if parsed is None:
            nested = _numbered_subdirs(sub)
            n_img = _count_images(sub)
            if nested:
                other = "reg_data_dir" if (not is_reg and "reg" in sub.name.lower()) else role
                findings.append(Finding(
                    "warning" if other == role else "error", "nested-data-dir",
                    f"folder '{sub.name}' in {role} is not an `N_name` folder but holds `N_name` folders "
                    f"({', '.join(nested[:5])}{', ...' if len(nested) > 5 else ''}); it is ignored. "
                    + (f"If these are regularisation images, give reg_data_dir = '{sub}'."
                       if other != role else f"Did you mean {role} = '{sub}'?"),
                    [str(sub)]))
            elif n_img:
                findings.append(Finding(
                    "warning", "folder-name",
                    f"folder '{sub.name}' ({_n(n_img, 'image')}) is ignored: sd-scripts only reads folders named "
                    f"`<repeats>_<tokens>`. Rename it, e.g. to '{_rename_hint(sub.name, is_reg)}' "
                    f"(repeats first, then an underscore).", [str(sub)]))
            else:
                findings.append(Finding("info", "folder-ignored",
                                        f"folder '{sub.name}' in {role} has no `N_` prefix and no images; ignored",
                                        [str(sub)]))
            continue
        repeats, class_tokens = parsed
        if repeats < 1:
            findings.append(Finding("warning", "zero-repeats",
                                    f"folder '{sub.name}' is ignored: its repeat count {repeats} is below 1", [str(sub)]))
            continue
        if repeats > 1000:  # (a date or an ID taken for the repeat count makes epochs that never end)
            findings.append(Finding("warning", "many-repeats",
                                    f"folder '{sub.name}' repeats each image {repeats:,} times per epoch (usual: 1 to "
                                    "100); the number before the underscore is the repeat count", [str(sub)]))
        subsets.append(SubsetSpec(
            image_dir=str(sub),
            num_repeats=repeats,
            is_reg=is_reg,
            class_tokens=class_tokens,
            caption_extension=defaults.caption_extension,
            captions=defaults.caption_options(),
            color_aug=defaults.color_aug,
            flip_aug=defaults.flip_aug,
            random_crop=defaults.random_crop,
            face_crop_aug_range=defaults.face_crop_aug_range,
            alpha_mask=defaults.alpha_mask,
            resize_interpolation=defaults.resize_interpolation,
            from_folder_name=True,
        ))

    own = parse_folder_name(data_dir.name)
    usable = [s for s in subsets if _count_images(Path(s.image_dir))]
    if loose:
        if not usable and own is not None and own[0] >= 1:
            findings.append(Finding(
                "error", "wrong-level",
                f"{role} '{data_dir}' is itself an `N_name` folder holding {_n(len(loose), 'image')}; sd-scripts wants the "
                f"folder ABOVE it. Give {role} = '{data_dir.parent}' instead.", [str(data_dir)]))
        elif not usable:
            example = "1_<class>" if is_reg else "10_<trigger> <class>"
            findings.append(Finding(
                "error", "wrong-level",
                f"{role} '{data_dir}' holds {_n(len(loose), 'image')} directly, and sd-scripts ignores images there: it must "
                f"be the parent of `N_name` folders. Move the images into a subfolder such as '{data_dir / example}'"
                + (" (kohya_ss#3322: pointing at the image folder gives 'no regularization images')." if is_reg else "."),
                [str(data_dir)]))
        else:
            findings.append(Finding(
                "warning", "loose-images",
                f"{_n(len(loose), 'image')} directly inside {role} '{data_dir}' ignored; only images inside its "
                f"`N_name` subfolders are used", [str(p) for p in loose[:20]]))
    elif not subsets and not any(f.code == "nested-data-dir" for f in findings):
        zero = [f.paths[0] for f in findings if f.code == "zero-repeats"]
        findings.append(Finding(
            "error" if not is_reg else "warning", "no-subsets",
            (f"no usable `N_name` folder in {role} '{data_dir}': "
             + ", ".join(f"'{Path(z).name}'" for z in zero) + " repeat their images 0 times; give a repeat count of "
             f"1 or more, e.g. rename to '{re.sub(r'^-?[0-9]+', '1', Path(zero[0]).name)}'" if zero else
             f"no `N_name` folders found in {role} '{data_dir}'")
            + (" (sd-scripts: 'train_data_dir must be the parent of folders with images')" if not is_reg and not zero
               else "; no regularisation images will be used" if is_reg else ""), [str(data_dir)]))
    if not subsets:
        # nothing usable here: a nested data dir is the likely cause, so it blocks
        for f in findings:
            if f.code == "nested-data-dir":
                f.level = "error"
    return subsets, findings


def _n(count: int, word: str) -> str:
    return f"{count} {word}" + ("" if count == 1 else "s")


def subsets_from_folders(
    train_dir: Path | None, reg_dir: Path | None, defaults: TrainConfig
) -> tuple[list[SubsetSpec], list[Finding]]:
    """Training subsets then reg subsets, as sd-scripts orders them."""
    findings: list[Finding] = []
    subsets: list[SubsetSpec] = []
    if train_dir is None:
        findings.append(Finding("error", "no-train-dir", "no train_data_dir (and no dataset_config) is set"))
    if train_dir is not None and reg_dir is not None and _same(train_dir, reg_dir):
        findings.append(Finding("error", "reg-is-train",
                                f"reg_data_dir and train_data_dir are the same folder '{train_dir}'; the regularisation "
                                "images need their own folder (e.g. reg/1_<class>)", [str(train_dir)]))
        reg_dir = None
    if train_dir is not None:
        s, f = scan_data_dir(train_dir, False, defaults, skip=reg_dir)
        subsets += s
        findings += f
    if reg_dir is not None:
        s, f = scan_data_dir(reg_dir, True, defaults, skip=train_dir)
        subsets += s
        findings += f
    return subsets, findings


__all__ = ["Finding", "parse_folder_name", "scan_data_dir", "split_class_tokens", "subsets_from_folders",
           "trained_words"]


def trained_words(meta: dict) -> str | None:
    """'svs cat' from a kohya training folder '20_svs cat' in a LoRA's ss_dataset_dirs (the first one): the words
    its folder-captioned images were trained with, a grid's default prompt and a card's activation text."""
    try:
        dirs = json.loads(meta.get("ss_dataset_dirs") or "{}")
    except ValueError:
        return None
    for name in dirs if isinstance(dirs, dict) else ():
        parsed = parse_folder_name(os.path.basename(str(name)))
        if parsed and parsed[1].strip():
            return parsed[1].strip()
    return None

