"""The "LoRA Studio" extra-networks page: one card per LoRA file, built like the built-in Lora's cards.

Item dicts follow ``extensions-builtin/Lora/ui_extra_networks_lora.py`` key for key (name, filename, shorthash,
preview, description, search_terms, local_preview, metadata, sort_keys, sd_version, prompt, negative_prompt,
user_metadata), so A1111's card HTML, tree view, search, sort, metadata popup and the built-in card editor all work.
Differences: the inserted tag names the file unambiguously (falls back to ``sub/dir/name`` when the stem is
shadowed or the alias is forbidden/unsafe), files without kohya metadata get their family from tensor shapes, and
unreadable files say so on the card.

``prompt``/``negative_prompt`` are JavaScript expressions (A1111 evaluates them on click).
"""
from __future__ import annotations

import html
import os
import re

from ..host.discovery import LORA_EXTENSIONS, SD_VERSIONS, LoraEntry

PAGE_TITLE = "LoRA Studio"
PAGE_NAME = "lora_studio"   # also the DOM tab name; no space so name == extra_networks_tabname (see make_page)
# JS: our default weight when set (non-zero), else the WebUI's Extra Networks default multiplier.
DEFAULT_WEIGHT_JS = "(opts.lora_studio_default_multiplier || opts.extra_networks_default_multiplier)"


def tag_name_for(session, entry: LoraEntry) -> str:
    """The name to write into `<lora:NAME:…>` so that it resolves back to exactly this file: its alias, stem or
    sub/folder path, or, for a file in the folder's top level that a same-named file in a subfolder shadows (A1111's
    name lookup takes the last one found), the file name with its extension."""
    disc = session.discovery
    for name in (disc.get_alias(entry), entry.name, entry.relname, _relname_ext(entry)):
        if ":" not in name and ">" not in name and disc.resolve(name, rescan=False) is entry:
            return name
    return entry.relname


def _relname_ext(entry: LoraEntry) -> str:
    return entry.relname + os.path.splitext(entry.filename)[1]


def item_name_for(session, entry: LoraEntry) -> str:
    """Card id (``data-name``): the stem, or the relative path when another file shadows that stem (with the
    extension when that path is the stem itself: a top-level file shadowed from a subfolder)."""
    if session.discovery.by_name.get(entry.name) is entry:
        return entry.name
    return entry.relname if entry.relname != entry.name else _relname_ext(entry)


def entry_for_item(disc, name: str) -> LoraEntry | None:
    """The file of a card id (item_name_for's inverse; get-single-card asks by it): a stem names the file the stem's
    tag reaches, which a top-level file's relative path (its stem too) must not take from it."""
    entry = disc.by_name.get(name) or disc.by_relname.get(name)
    stem, ext = os.path.splitext(name)
    if entry is None and ext.lower() in LORA_EXTENSIONS:
        entry = disc.by_relname.get(stem)
    return entry


def visible_for_model(sd_version: str, model_version: str | None, show_all: bool, hide_unknown_for,
                      refused: str | None = None) -> bool:
    """The built-in's filter: hide cards of another family than the loaded model's unless show-all."""
    if show_all or model_version is None:
        return True
    if refused:
        return False
    if sd_version == "Unknown":
        return model_version not in (hide_unknown_for or [])
    return sd_version == model_version


def build_item(page, session, entry: LoraEntry, index=None, enable_filter=True) -> dict | None:
    host = session.host
    quote_js = host.quote_js
    path, _ = os.path.splitext(entry.filename)
    name = item_name_for(session, entry)

    search_terms = [page.search_terms_from_path(entry.filename)]
    if entry.hash:
        search_terms.append(entry.hash)
    if entry.alias != entry.name:
        search_terms.append(entry.alias)
    description = page.find_description(path)
    problem = (f"Unreadable file: {entry.error}" if entry.error else
               entry.not_lora[:1].upper() + entry.not_lora[1:] if entry.not_lora else
               "Rename this file: ':' or '>' in its name ends a <lora:…> tag early, so no prompt can name it"
               if any(c in entry.relname for c in ":>") else
               "A Python pickle: LoRA Studio does not open these (loading one can run code hidden in it); the "
               "built-in Lora does, with 'LoRA Studio handles <lora:…>' off, or convert it to .safetensors"
               if not entry.is_safetensors else
               f"Not applied when last used: {entry.damaged}" if entry.damaged else None)
    if problem:
        description = problem + (f"\n{description}" if description else "")
    item = {
        "name": name,
        "filename": entry.filename,
        "shorthash": entry.shorthash,
        "preview": page.find_preview(path) or page.find_embedded_preview(path, name, entry.metadata),
        "description": description,
        "search_terms": search_terms,
        "local_preview": f"{path}.{host.opt('samples_format', 'png')}",
        "metadata": entry.metadata,
        "sort_keys": {"default": index, **page.get_sort_keys(entry.filename)},
        "sd_version": entry.sd_version,
        "lora_studio": {"family_evidence": entry.family_evidence, "refused_family": entry.refused_family,
                        "relname": entry.relname, "error": entry.error},
    }
    page.read_user_metadata(item)
    user = item["user_metadata"]
    activation_text = user.get("activation text")
    preferred_weight = user.get("preferred weight", 0.0)
    try:
        preferred_weight = float(preferred_weight or 0.0)
    except (TypeError, ValueError):
        preferred_weight = 0.0  # hand-edited json: fall back to the default weight like an unset slider
    weight_js = str(preferred_weight) if preferred_weight else DEFAULT_WEIGHT_JS
    tag = f"<{session.tag_kind}:{tag_name_for(session, entry)}:"
    item["prompt"] = quote_js(tag) + " + " + weight_js + " + " + quote_js(">")
    if activation_text:
        item["prompt"] += " + " + quote_js(" " + activation_text)
    negative = user.get("negative text")
    item["negative_prompt"] = quote_js("(" + negative + ":1)") if negative else quote_js("")

    sd_version = user.get("sd version")
    if sd_version in SD_VERSIONS:
        item["sd_version"] = sd_version
    else:
        sd_version = entry.sd_version

    if enable_filter:
        model_version = host.model_sd_version(host.loaded_model())
        show_all = bool(host.opt("lora_studio_show_all", False))
        hide_unknown = host.opt("lora_hide_unknown_for_versions", [])
        refused = entry.refused_family if sd_version == entry.sd_version else None
        if not visible_for_model(sd_version, model_version, show_all, hide_unknown, refused):
            return None
    return item


_BUTTON_RE = re.compile(r"<button\b[^>]*>\s*(.*?)\s*</button>", re.S)


def only_lora_folders(buttons_html: str, relnames: list[str]) -> str:
    """Drop the folder buttons of folders that hold no LoRA file at any depth; the "all" button stays."""
    held = set()
    for rel in relnames:
        parts = rel.split("/")[:-1]
        held.update("/".join(parts[:i]) for i in range(1, len(parts) + 1))

    def keep(m):
        label = html.unescape(m.group(1)).replace("\\", "/").strip("/")
        return m.group(0) if "search-all" in m.group(0) or label in held else ""
    return _BUTTON_RE.sub(keep, buttons_html)


def hidden_cards_html(n_files: int, model_version: str | None) -> str | None:
    """The card page's text when it shows no card while LoRA files are there: the model-family filter hides
    them all."""
    if not n_files or model_version is None:
        return None
    return ("<div class='nocards'><h1>No LoRA for the loaded model's family</h1>"
            f"<p>{n_files} LoRA file(s) here are for another model family than the loaded {model_version} "
            "checkpoint, so their cards are hidden. Load a checkpoint of their family, or turn on <i>LoRA Studio "
            "cards: show LoRAs of every model family</i> in Settings &rarr; LoRA Studio.</p></div>")


def make_page(session):
    """Instantiate the page; the base class comes from the WebUI, so the subclass is made here, lazily."""
    base = session.host.page_base_class()

    class LoraStudioPage(base):
        def __init__(self):
            super().__init__(PAGE_TITLE)
            # A1111 looks pages up by `name` but builds URLs (cover images, metadata) from
            # `extra_networks_tabname`; with a space in the title those differ and the lookups fail.
            self.name = PAGE_NAME
            self.extra_networks_tabname = PAGE_NAME

        def refresh(self):
            session.discovery.refresh()

        def create_item(self, name, index=None, enable_filter=True):
            disc = session.discovery
            disc.ensure_scanned()
            entry = entry_for_item(disc, name)
            if entry is None:
                return None
            return build_item(self, session, entry, index, enable_filter)

        def list_items(self):
            entries = session.discovery.entries()  # a list: the library may be rescanned meanwhile
            for index, entry in enumerate(entries):
                item = build_item(self, session, entry, index)
                if item is not None:
                    yield item

        def allowed_directories_for_previews(self):
            return session.discovery.dirs()

        def create_dirs_view_html(self, tabname):
            # A1111 makes a button of every subfolder; ours keeps those that hold a LoRA (a dataset or an image
            # folder kept next to the LoRAs is no filter). Unknown markup: left as it is.
            out = super().create_dirs_view_html(tabname)
            return only_lora_folders(out, [e.relname for e in session.discovery.entries()])

        def create_card_view_html(self, tabname, *args, **kwargs):
            # (A1111's "Nothing here. Add some content to ..." is wrong when every LoRA is hidden by the filter)
            if not getattr(self, "items", None) and not args and kwargs.get("none_message") is None:
                msg = hidden_cards_html(len(session.discovery.entries()),
                                        session.host.model_sd_version(session.host.loaded_model()))
                if msg:
                    kwargs["none_message"] = msg
            return super().create_card_view_html(tabname, *args, **kwargs)

        def create_user_metadata_editor(self, ui, tabname):
            return session.host.user_metadata_editor(ui, tabname, self)

    return LoraStudioPage()
