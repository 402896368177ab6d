"""Dataset helper: build sd-scripts' ``N_trigger class`` / ``N_class`` layout from a plain folder of images,
caption the copies, edit captions, and generate regularisation images with the loaded model.

Originals are never moved or modified: images (and caption files beside them) are COPIED into the new layout, and
every caption write goes to the copies.
"""
from __future__ import annotations

import filecmp
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from PIL import Image, ImageOps

from ..train.captions import contains_word
from ..train.folders import parse_folder_name
from ..train.images import is_image_name, probe_image
from ..formats.safetensors_io import write_atomic
from .backend import UiError, image_size

_SAFE = re.compile(r"[^\w .()+-]")


def _clean_word(word: str, what: str) -> str:
    w = " ".join(str(word or "").split()).strip(",;: ")  # ("svs, " pasted from a caption)
    if _SAFE.search(w):
        raise UiError(f"The {what} '{w}' has characters that cannot be in a folder name. Use letters, digits, spaces "
                      "and - only.")
    return w


@dataclass
class Layout:
    root: str
    train_data_dir: str        # give this as the training folder
    image_dir: str             # <train_data_dir>/<N>_<trigger> <class>
    reg_data_dir: str          # give this as the regularisation folder
    reg_image_dir: str         # <reg_data_dir>/<M>_<class>


def plan_layout(dest_root: str, trigger: str, class_word: str, repeats: int, reg_repeats: int = 1) -> Layout:
    dest_root = str(dest_root or "").strip()
    if not dest_root:
        raise UiError("Choose a folder for the new dataset (it is created if missing).")
    if not os.path.isabs(os.path.expanduser(dest_root)):  # (relative to what? the WebUI's install folder)
        example = os.path.join(os.path.expanduser("~"), "datasets", dest_root)
        raise UiError(f"Write the full path of the new dataset folder (e.g. {example}): '{dest_root}' would be made "
                      "inside the WebUI's own folder.")
    trigger = _clean_word(trigger, "trigger word")
    class_word = _clean_word(class_word, "class word")
    if not trigger:
        raise UiError("Write a trigger word: a rare word the LoRA learns for your subject, e.g. 'svs'.")
    if " " in trigger:  # (the folder name's first word is the trigger: the rest would be read as the class)
        raise UiError(f"The trigger word '{trigger}' must be one word (the first word of the folder name is the "
                      f"trigger, the rest the class): write '{trigger.replace(' ', '_')}', or put the other words "
                      "into the class word.")
    if not class_word:
        raise UiError("Write a class word: what the subject is, e.g. 'bear', 'woman', 'painting style'.")
    try:
        repeats, reg_repeats = int(repeats), int(reg_repeats)
    except (TypeError, ValueError, OverflowError):
        raise UiError("Repeats must be whole numbers (e.g. 10 for the images, 1 for regularisation).") from None
    if repeats < 1 or reg_repeats < 1:
        raise UiError("Repeats must be at least 1.")
    root = os.path.abspath(os.path.expanduser(dest_root))
    train = os.path.join(root, "img")
    reg = os.path.join(root, "reg")
    return Layout(root, train, os.path.join(train, f"{repeats}_{trigger} {class_word}"), reg,
                  os.path.join(reg, f"{reg_repeats}_{class_word}"))


@dataclass
class CopyResult:
    layout: Layout
    copied: list[str] = field(default_factory=list)        # image names copied
    captions: list[str] = field(default_factory=list)      # caption files copied along
    unchanged: list[str] = field(default_factory=list)     # already there with the same content
    conflicts: list[str] = field(default_factory=list)     # a different file of that name exists: left alone
    unreadable: list[str] = field(default_factory=list)    # "name (why)": not images after all, not copied
    skipped: list[str] = field(default_factory=list)       # what the source folder holds besides images
    twins: dict[str, int] = field(default_factory=dict)    # other `N_name` folder -> how many of these pictures

    def summary(self) -> str:
        parts = [f"Copied {len(self.copied)} image(s)"
                 + (f" and {len(self.captions)} caption file(s)" if self.captions else "")
                 + f" into {self.layout.image_dir}. The originals were not touched."]
        if self.unchanged:
            parts.append(f"{len(self.unchanged)} file(s) were already there unchanged.")
        if self.unreadable:
            parts.append(f"{len(self.unreadable)} file(s) were NOT copied because they cannot be read as images: "
                         f"{', '.join(self.unreadable[:5])}" + (" ..." if len(self.unreadable) > 5 else "") + ".")
        if self.skipped:
            parts.append(f"Not copied (only the images directly in the folder are): {', '.join(self.skipped[:5])}"
                         + (" ..." if len(self.skipped) > 5 else "") + ".")
        for folder, n in self.twins.items():
            parts.append(f"The training folder also holds '{folder}' with {n} of the same pictures: both folders "
                         "train (each picture twice, under two names). Delete the folder you no longer want.")
        if self.conflicts:
            parts.append(f"{len(self.conflicts)} were NOT copied because a different file with the same name is "
                         f"already there: {', '.join(self.conflicts[:5])}" + (" ..." if len(self.conflicts) > 5 else "")
                         + ". Rename or delete those in the dataset folder and run this again.")
        return " ".join(parts)


def source_images(source_dir: str) -> list[Path]:
    d = Path(os.path.expanduser(str(source_dir or "").strip()))
    if not str(source_dir or "").strip():
        raise UiError("Choose the folder that holds your images.")
    if not d.is_dir():
        raise UiError(f"The image folder '{d}' does not exist (or is not a folder). Check the path.")
    imgs = sorted(p for p in d.iterdir() if p.is_file() and is_image_name(p.name))
    if not imgs:
        raise UiError(f"No images (.png, .jpg, .jpeg, .webp, .bmp) directly inside '{d}'. Subfolders are not "
                      "searched; point at the folder that holds the pictures.")
    return imgs


def _copy_one(src: Path, dst: Path, res: CopyResult, bucket: list[str]):
    if dst.exists():
        if filecmp.cmp(src, dst, shallow=False):
            res.unchanged.append(src.name)
        else:
            res.conflicts.append(src.name)
        return
    # copy, never move: the user's originals stay as they were; through a temp file, so that a full disk leaves
    # no truncated picture that a later run would train on
    tmp = dst.with_name(f".{dst.name}.tmp")
    try:
        shutil.copy2(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    bucket.append(src.name)


def create_layout(source_dir: str, dest_root: str, trigger: str, class_word: str, repeats: int,
                  reg_repeats: int = 1, caption_extension: str = ".txt") -> CopyResult:
    layout = plan_layout(dest_root, trigger, class_word, repeats, reg_repeats)
    imgs = source_images(source_dir)
    src_dir = os.path.realpath(imgs[0].parent)
    for d in (layout.image_dir, layout.reg_image_dir):
        if os.path.realpath(d) == src_dir:
            raise UiError("The new dataset folder would put the copies on top of the originals. Choose another "
                          "dataset folder.")
    os.makedirs(layout.image_dir, exist_ok=True)  # (the reg folder is made with its first image: empty, it is a
    res = CopyResult(layout)                        # warning in every dataset check until then)
    for p in imgs:
        probe = probe_image(p, check_pixels=False)  # (the header only: a garbage or empty file, fast)
        if not probe.ok:
            res.unreadable.append(f"{p.name} ({probe.error})")
            continue
        _copy_one(p, Path(layout.image_dir) / p.name, res, res.copied)
        cap = p.with_suffix(caption_extension)
        if cap.is_file():
            _copy_one(cap, Path(layout.image_dir) / cap.name, res, res.captions)
    names = {p.name for p in imgs}
    src = Path(imgs[0].parent)
    for e in sorted(src.iterdir(), key=lambda e: e.name):
        if e.name in names or e.name.startswith(".") or e.suffix.lower() == caption_extension.lower():
            continue
        if e.is_dir():
            res.skipped.append(f"{e.name}/ (a subfolder)")
        elif e.is_symlink() and not e.exists():
            res.skipped.append(f"{e.name} (a link to a missing file)")
        elif e.is_file() and e.suffix.lower() not in (".json", ".toml", ".npz"):
            res.skipped.append(e.name)
    res.twins = _twin_folders(layout, [p for p in imgs if Path(layout.image_dir, p.name).is_file()])
    return res


def _twin_folders(layout: Layout, imgs: list[Path]) -> dict[str, int]:
    """Other concept folders beside the new one holding these pictures: a second Create after fixing the trigger,
    the class or the repeats copies everything again, and both folders train."""
    out: dict[str, int] = {}
    mine = os.path.realpath(layout.image_dir)
    for sub in sorted(Path(layout.train_data_dir).iterdir(), key=lambda e: e.name):
        if not sub.is_dir() or os.path.realpath(sub) == mine or not (parse_folder_name(sub.name) or (0,))[0] >= 1:
            continue
        same = sum(1 for p in imgs if (sub / p.name).is_file() and filecmp.cmp(p, sub / p.name, shallow=False))
        if same:
            out[sub.name] = same
    return out


def training_images(train_data_dir: str) -> list[Path]:
    """Images of every `N_name` subfolder of the training folder (what will train), in name order."""
    d = Path(os.path.expanduser(str(train_data_dir or "").strip()))
    if not str(train_data_dir or "").strip():
        raise UiError("Set the training folder first (on the Dataset tab, or create one above).")
    if not d.is_dir():
        raise UiError(f"The training folder '{d}' does not exist. Check the path or create the layout above.")
    out = []
    for sub in sorted(p for p in d.iterdir() if p.is_dir()):
        parsed = parse_folder_name(sub.name)
        if parsed and parsed[0] >= 1:
            out += sorted(p for p in sub.iterdir() if p.is_file() and is_image_name(p.name))
    if not out:
        raise UiError(f"No images in `N_name` subfolders of '{d}'. The training folder must hold folders like "
                      "'10_svs bear' with the images inside.")
    return out


def caption_path(image: str | Path, ext: str = ".txt") -> Path:
    return Path(image).with_suffix(ext)


def read_caption(image: str | Path, ext: str = ".txt") -> str:
    p = caption_path(image, ext)
    if not p.is_file():
        return ""
    try:
        return p.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError:
        raise UiError(f"The caption file {p} is not UTF-8 text. Re-save it as UTF-8.") from None


def write_caption(image: str | Path, text: str, ext: str = ".txt") -> str:
    """Writes (or, for an empty text, deletes) the caption beside the image; returns what happened."""
    if not Path(image).is_file():  # (deleted or renamed since the list was read: a caption would be an orphan)
        raise UiError(f"{Path(image).name} is no longer in {Path(image).parent}; nothing was saved. Press Reload "
                      "image list.")
    p = caption_path(image, ext)
    text = " ".join(str(text or "").split())
    if not text:
        if p.exists():
            p.unlink()
            return f"Caption removed: {Path(image).name} will be captioned with its folder's tokens."
        return f"{Path(image).name} has no caption; it is captioned with its folder's tokens."
    write_atomic(p, lambda f: f.write(text + "\n"))  # (a full disk keeps the old caption)
    return f"Saved the caption of {Path(image).name}."


def with_trigger(caption: str, trigger: str) -> str:
    caption = caption.strip()
    if not trigger or contains_word(caption, trigger):
        return caption
    return f"{trigger}, {caption}" if caption else trigger


def clean_trigger(trigger: str) -> str:
    """The trigger as the folder name and the captions take it (create, insert and caption-all agree)."""
    t = _clean_word(trigger, "trigger word")
    if not t:
        raise UiError("Write the trigger word to insert.")
    return t


def insert_trigger(images: list[Path], trigger: str, ext: str = ".txt") -> int:
    """Put the trigger word first in every existing caption that lacks it; returns how many changed. Images without
    a caption file keep none (the folder name, which holds the trigger, is their caption)."""
    trigger = clean_trigger(trigger)
    changed = 0
    for img in images:
        p = caption_path(img, ext)
        if not p.is_file():
            continue
        old = read_caption(img, ext)
        new = with_trigger(old, trigger)
        if new != old:
            write_caption(img, new, ext)
            changed += 1
    return changed


def iter_caption(backend, images: list[Path], method: str, trigger: str = "", overwrite: bool = False,
                 ext: str = ".txt") -> Iterator[tuple[int, int, Path, str | None]]:
    """Captions each image with the WebUI's interrogator; yields (done, total, image, caption), the caption None
    when an existing one was kept and False when the picture cannot be read (skipped; the rest go on)."""
    n = len(images)
    for i, img in enumerate(images, 1):
        if caption_path(img, ext).is_file() and not overwrite:
            yield i, n, img, None
            continue
        try:
            with Image.open(img) as im:
                pic = ImageOps.exif_transpose(im).convert("RGB")
        except (OSError, ValueError):
            yield i, n, img, False
            continue
        text = with_trigger(backend.interrogate(pic, method), trigger)
        write_caption(img, text, ext)
        yield i, n, img, text


def has_images(folder: str) -> bool:
    try:
        return any(is_image_name(n) for n in os.listdir(folder))
    except OSError:
        return False


def default_reg_count(n_train_images: int) -> int:
    return max(1, int(n_train_images) * 5)


def next_index(directory: str, prefix: str = "reg_") -> int:
    n = 0
    if os.path.isdir(directory):
        for name in os.listdir(directory):
            m = re.match(re.escape(prefix) + r"(\d+)\.", name)
            if m:
                n = max(n, int(m.group(1)))
    return n + 1


def generate_reg_images(backend, reg_image_dir: str, prompt: str, n: int, seed: int, width: int, height: int,
                        on_image: Callable | None = None, negative_prompt: str = "",
                        should_stop: Callable[[], bool] | None = None) -> list[str]:
    """``n`` images of the class prompt from the loaded model, written as reg_00001.png ... (after any already
    there) into ``reg_image_dir`` (an `N_class` folder); fewer when ``should_stop()`` says so."""
    if not str(prompt or "").strip():
        raise UiError("Write the class prompt (e.g. 'a photo of a bear'): regularisation images show the class "
                      "without your subject.")
    if int(n) < 1:
        raise UiError("The number of regularisation images must be at least 1.")
    width, height = image_size(width, height)
    reg_image_dir = str(reg_image_dir or "").strip()
    if not reg_image_dir:
        raise UiError("Choose the regularisation image folder (create the layout first).")
    name = os.path.basename(os.path.normpath(reg_image_dir))
    if parse_folder_name(name) is None:
        raise UiError(f"'{name}' is not an `N_class` folder (e.g. '1_bear'); sd-scripts would ignore images in it.")
    os.makedirs(reg_image_dir, exist_ok=True)
    start = next_index(reg_image_dir)
    paths: list[str] = []

    def save(i, total, img):
        p = os.path.join(reg_image_dir, f"reg_{start + i - 1:05d}.png")
        # (a full disk leaves no truncated picture that a run would train on)
        write_atomic(p, lambda f: img.save(f, format="PNG"), binary=True)
        paths.append(p)
        if on_image:
            on_image(i, total, p)

    backend.generate(prompt, int(n), int(seed), width, height, negative_prompt=negative_prompt, on_image=save,
                     should_stop=should_stop)
    return paths


__all__ = ["CopyResult", "Layout", "caption_path", "clean_trigger", "create_layout", "default_reg_count",
           "generate_reg_images", "has_images", "insert_trigger", "iter_caption", "plan_layout", "read_caption", "source_images",
           "training_images", "with_trigger", "write_caption"]
