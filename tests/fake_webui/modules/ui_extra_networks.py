"""Test fake of A1111 v1.10.1 ``modules/ui_extra_networks.py``, written from the documented behaviour (reference
§5): the page list and ``register_page`` (which recomputes ``allowed_dirs``), ``quote_js``, and the
``ExtraNetworksPage`` helpers a page's ``create_item`` calls. ``create_html`` only builds ``self.items`` (and
``self.metadata``) the way the real one does before templating; the HTML returned is a stub."""
import json
import os
import urllib.parse

from modules import extra_networks, shared, util

extra_pages = []
allowed_dirs = set()
default_allowed_preview_extensions = ["png", "jpg", "jpeg", "webp", "gif"]


def allowed_preview_extensions():
    return [*default_allowed_preview_extensions, shared.opts.samples_format]


def register_page(page):
    extra_pages.append(page)
    allowed_dirs.clear()
    for registered in extra_pages:
        allowed_dirs.update(registered.allowed_directories_for_previews())


def quote_js(s):
    """``s`` as a double-quoted JavaScript string literal."""
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def initialize():
    extra_pages.clear()


def register_default_pages():
    pass


class ExtraNetworksPage:
    def __init__(self, title):
        self.title = title
        self.name = title.lower()
        self.extra_networks_tabname = self.name.replace(" ", "_")
        self.allow_prompt = True
        self.allow_negative_prompt = False
        self.items = {}
        self.metadata = {}
        self.lister = util.MassFileLister()

    # --- what pages override
    def refresh(self):
        pass

    def list_items(self):
        raise NotImplementedError

    def create_item(self, name, index=None, enable_filter=True):
        raise NotImplementedError

    def allowed_directories_for_previews(self):
        return []

    def create_user_metadata_editor(self, ui, tabname):
        from modules import ui_extra_networks_user_metadata
        return ui_extra_networks_user_metadata.UserMetadataEditor(ui, tabname, self)

    def create_dirs_view_html(self, tabname):
        """A1111 1.10.1's folder buttons: every subfolder of the allowed dirs (with or without model files), as
        ``<button …>subdir/</button>``, preceded by an "all" button (default option values)."""
        import html
        subdirs = {}
        for parentdir in [os.path.abspath(x) for x in self.allowed_directories_for_previews()]:
            for root, dirs, _ in sorted(os.walk(parentdir, followlinks=True)):
                for dirname in sorted(dirs):
                    x = os.path.join(root, dirname)
                    subdir = os.path.abspath(x)[len(parentdir):].lstrip(os.path.sep)
                    if os.listdir(x) and not subdir.endswith(os.path.sep):
                        subdir += os.path.sep
                    if not (os.path.sep + "." in subdir or subdir.startswith(".")):
                        subdirs[subdir] = 1
        if subdirs:
            subdirs = {"": 1, **subdirs}
        return "".join(f"""
        <button class='lg secondary gradio-button custom-button{" search-all" if subdir == "" else ""}' onclick='extraNetworksSearchButton("{tabname}", "{self.extra_networks_tabname}", event)'>
        {html.escape(subdir if subdir != "" else "all")}
        </button>
        """ for subdir in subdirs)

    # --- building the cards
    def create_html(self, tabname, *, empty=False):
        self.lister.reset()
        self.items = {} if empty else {item["name"]: item for item in self.list_items()}
        self.metadata = {name: item["metadata"] for name, item in self.items.items() if item.get("metadata")}
        for item in self.items.values():
            if "user_metadata" not in item:
                self.read_user_metadata(item)
        return self.create_card_view_html(tabname, none_message="Loading..." if empty else None)

    def create_card_view_html(self, tabname, *, none_message):
        """As 1.10.1: the cards, or ``none_message`` / the no-cards template (its text) when there are none."""
        res = [f"<div class='card' data-name={quote_js(name)}></div>" for name in self.items]
        if not res:
            dirs = "".join([f"<li>{x}</li>" for x in self.allowed_directories_for_previews()])
            res = [none_message or "<div class='nocards'><h1>Nothing here. Add some content to the following "
                   f"directories:</h1><ul>{dirs}</ul></div>"]
        return "".join(res)

    # --- helpers for create_item
    def read_user_metadata(self, item, use_cache=True):
        """Sets ``item["user_metadata"]`` from the file's json sidecar; its description wins over the item's."""
        user = extra_networks.get_user_metadata(item.get("filename"), lister=self.lister if use_cache else None)
        if user.get("description") is not None:
            item["description"] = user["description"]
        item["user_metadata"] = user

    def link_preview(self, filename):
        mtime, _ = self.lister.mctime(filename)
        quoted = urllib.parse.quote(filename.replace("\\", "/"))
        return f"./sd_extra_networks/thumb?filename={quoted}&mtime={mtime}"

    def find_preview(self, path):
        """Preview URL for ``<path>.<ext>`` or ``<path>.preview.<ext>``, None when neither exists."""
        for ext in allowed_preview_extensions():
            for candidate in (f"{path}.{ext}", f"{path}.preview.{ext}"):
                if self.lister.exists(candidate):
                    return self.link_preview(candidate)
        return None

    def find_embedded_preview(self, path, name, metadata):
        """URL of the cover image stored in a safetensors header (``ssmd_cover_images``), if any."""
        covers = (metadata or {}).get("ssmd_cover_images")
        if not covers or not self.lister.exists(f"{path}.safetensors"):
            return None
        if not any(json.loads(covers) if isinstance(covers, str) else covers):
            return None
        return f"./sd_extra_networks/cover-images?page={self.extra_networks_tabname}&item={name}"

    def find_description(self, path):
        for candidate in (f"{path}.txt", f"{path}.description.txt"):
            if self.lister.exists(candidate):
                try:
                    with open(candidate, encoding="utf-8", errors="replace") as f:
                        return f.read()
                except OSError:
                    pass
        return None

    def search_terms_from_path(self, filename, possible_directories=None):
        """The file's path relative to the folder above the allowed directory that holds it ("" if none does)."""
        full = os.path.abspath(filename)
        dirs = self.allowed_directories_for_previews() if possible_directories is None else possible_directories
        for d in dirs:
            above = os.path.dirname(os.path.abspath(d))
            if full.startswith(above):
                return os.path.relpath(full, above)
        return ""

    def get_sort_keys(self, path):
        mtime, ctime = self.lister.mctime(path)
        return {
            "date_created": int(ctime),
            "date_modified": int(mtime),
            "name": os.path.basename(path).lower(),
            "path": path.lower(),
        }


class ExtraNetworksUi:
    pass


def create_ui(interface, unrelated_tabs, tabname):
    """A1111 1.10.1: the pages are drawn once, on the first page load (``pages_html``), and every later page load
    gets that drawing until a refresh button redraws them (``refresh``). Gradio wiring left out: the test calls
    ``ui.pages_html()`` / ``ui.refresh()`` as the load event and the refresh button would."""
    ui = ExtraNetworksUi()
    ui.pages_contents = []
    ui.stored_extra_pages = list(extra_pages)
    ui.tabname = tabname

    def create_html():
        ui.pages_contents = [pg.create_html(ui.tabname) for pg in ui.stored_extra_pages]

    def pages_html():
        if not ui.pages_contents:
            create_html()
        return ui.pages_contents

    def refresh():
        for pg in ui.stored_extra_pages:
            pg.refresh()
        create_html()
        return ui.pages_contents

    ui.pages_html, ui.refresh = pages_html, refresh
    return ui
