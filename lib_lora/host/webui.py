"""The one adapter to A1111's ``modules.*`` (and to the built-in Lora's module state).

Every ``modules`` import is inside a function: this file imports fine without the WebUI (tests use a fake
``modules`` package with the same names), and nothing touches ``shared.sd_model`` (a property that *loads* the
model) unless a generation is already running.
"""
from __future__ import annotations

import contextlib
import os
import sys
import weakref

PREFIX = "LoRA Studio:"


def console(msg: str):
    print(f"{PREFIX} {msg}", flush=True)


# ------------------------------------------------------------------ options and flags
def shared():
    from modules import shared as _shared
    return _shared


def opt(key: str, default=None):
    opts = getattr(shared(), "opts", None)
    if opts is None:
        return default
    try:
        value = getattr(opts, key)
    except AttributeError:
        return default
    return default if value is None else value


def cmd_opt(name: str, default=None):
    return getattr(shared().cmd_opts, name, default)


def lora_dirs() -> list[str]:
    """The built-in's preload always defines both flags (never define them ourselves: reference §1.3)."""
    dirs = [cmd_opt("lora_dir"), cmd_opt("lyco_dir_backcompat")]
    return [d for d in dirs if d]


def images_dir() -> str:
    """Where our samples and grids go: ``lora-studio`` in the WebUI's image output folder (Settings → Paths:
    the images folder when set, else the folder holding txt2img's), not in the LoRA folder, whose every subfolder
    would show as a folder button on the card pages."""
    base = str(opt("outdir_samples", "") or "").strip()
    if not base:
        t2i = str(opt("outdir_txt2img_samples", "") or "").strip()
        base = os.path.dirname(os.path.normpath(t2i)) if t2i else ""
    if not base:
        from modules import paths_internal
        base = os.path.join(paths_internal.data_path, "outputs")
    # (absolute: job records keep where the files are, whatever the working folder of whoever reads them)
    return os.path.abspath(os.path.join(base, "lora-studio"))


def hashing_allowed() -> bool:
    return not cmd_opt("no_hashing", False)


def data_dir() -> str:
    """Where our caches live: next to A1111's own caches (``modules.cache.cache_dir``, <data>/cache)."""
    try:
        from modules import cache
        base = cache.cache_dir
    except Exception:  # very old/odd hosts: fall back to the data dir
        from modules import paths_internal
        base = os.path.join(paths_internal.data_path, "cache")
    return os.path.join(base, "lora_studio")


def register_settings(section: tuple, options: dict):
    """options: key -> dict(default, label, component?, component_args?, onchange?, info?).

    Registered at import time through ``options_templates`` (works with --nowebui, reaches the API options model)
    and also straight into ``opts.data_labels``: after startup ``opts.reorder()`` made that a different dict, so on
    "Reload UI" only this second write makes the new OptionInfo (and its onchange) the live one.
    """
    sh = shared()
    infos = {}
    for key, spec in options.items():
        info = sh.OptionInfo(spec["default"], spec["label"], spec.get("component"), spec.get("component_args"),
                             onchange=spec.get("onchange"))
        if spec.get("info"):
            info = info.info(spec["info"])
        infos[key] = info
    sh.options_templates.update(sh.options_section(section, infos))
    opts = getattr(sh, "opts", None)
    if opts is not None and getattr(opts, "data_labels", None) is not sh.options_templates:
        for key, info in infos.items():
            opts.add_option(key, info)


def gradio_component(kind: str):
    import gradio as gr
    return getattr(gr, kind)


# ------------------------------------------------------------------ model
def loaded_model():
    """The current model if one is loaded, else None; never triggers a load."""
    try:
        from modules import sd_models
        return sd_models.model_data.sd_model
    except Exception:  # not an A1111-shaped host (or not started yet): treat as "no model"
        return None


def current_model():
    """shared.sd_model: loads the model if needed (only call while a generation runs)."""
    return shared().sd_model


@contextlib.contextmanager
def model_held():
    """While our own process_images calls run (a job's samples, a results grid with its LoRA merged): A1111's
    process_images reloads the checkpoint whenever the checkpoint setting differs from the loaded model, i.e. a
    checkpoint picked while a job trains would load into the model being trained, and (devices.fp8 set for an
    fp8_base job) a forced reload of the same file would replace its weights. The reload waits: A1111's own queued
    load of the new checkpoint runs after the job, behind its lock."""
    from modules import sd_models
    original = sd_models.reload_model_weights

    def held(sd_model=None, info=None, forced_reload=False):
        return sd_model or sd_models.model_data.sd_model

    sd_models.reload_model_weights = held
    try:
        yield
    finally:
        sd_models.reload_model_weights = original


def sampler_fields(kohya_name: str | None = None) -> dict:
    """``sampler_name`` and ``scheduler`` for a StableDiffusionProcessing we make: both set, so A1111 has nothing to
    autocorrect (it logs a warning per picture for unset ones). A kohya sampler name picks its A1111 twin (as the
    headless samples do); none, A1111's default sampler."""
    from modules import sd_samplers

    from ..train.sampling import resolve_sampler
    want = resolve_sampler(kohya_name)[0] if kohya_name else None
    pick = getattr(sd_samplers, "get_sampler_and_scheduler", None)
    if pick is None:  # (before A1111 1.9: no schedulers)
        return {"sampler_name": want} if want else {}
    name, scheduler = pick(want, "Automatic", convert_automatic=False)
    return {"sampler_name": name, "scheduler": scheduler}


@contextlib.contextmanager
def settings_kept(keys):
    """A1111 puts a picture's override_settings back only for options already in opts.data (config.json): one
    left at its default stayed changed after the picture (the WebUI's clip skip after a job's samples). Put back
    as they were, present or not."""
    data = getattr(getattr(shared(), "opts", None), "data", None)
    if not isinstance(data, dict) or not keys:
        yield
        return
    kept = {k: (k in data, data.get(k)) for k in keys}
    try:
        yield
    finally:
        for k, (had, value) in kept.items():
            if had:
                data[k] = value
            else:
                data.pop(k, None)


def clear_console_progress():
    """A1111's console "Total progress" bar counts every sampling step until txt2img clears it; after our own
    pictures (samples, grids) it would count on into the user's next image."""
    bar = getattr(shared(), "total_tqdm", None)
    if bar is not None:
        bar.clear()


def process_own(p, keep=()):
    """process_images for a picture of ours (a job's sample, a grid cell, a helper's reg image), its prompt's tags
    off (our LoRA is attached or merged already): the conditioning is computed afresh and none is left cached
    (A1111 caches it by the prompt's text, not by the text encoder's LoRA), a checkpoint picked meanwhile waits
    (``model_held``), the ``keep`` options of its override_settings come back as they were, and the console's
    progress bar is cleared as txt2img clears it. ``p`` is closed."""
    from modules import processing
    p.disable_extra_networks = True
    forget_conds(p)
    try:
        with model_held(), settings_kept(keep):
            return processing.process_images(p)
    finally:
        p.close()
        forget_conds(p)
        clear_console_progress()


def model_sd_version(model) -> str | None:
    """A1111's flags → 'SD1' | 'SD2' | 'SDXL' (names of the built-in's SdVersion), None when unknown."""
    if model is None:
        return None
    if getattr(model, "is_sdxl", False):
        return "SDXL"
    if getattr(model, "is_sd2", False):
        return "SD2"
    if getattr(model, "is_sd1", False):
        return "SD1"
    return None


def without_autocast():
    """Deltas are computed in fp32; the activate call runs under devices.autocast(), so switch it off here."""
    import torch
    stack = contextlib.ExitStack()
    if torch.is_autocast_enabled():
        stack.enter_context(torch.autocast("cuda", enabled=False))
    if hasattr(torch, "is_autocast_cpu_enabled") and torch.is_autocast_cpu_enabled():
        stack.enter_context(torch.autocast("cpu", enabled=False))
    return stack


def forget_conds(p=None):
    """A1111 caches a prompt's conditioning by its text and tags, not by the files behind the tags: after a LoRA
    file changed under the same name, the next conditioning is computed again (reference §4.4). The lists are
    emptied in place: ``p`` holds the same list objects as the class."""
    try:
        from modules import processing
    except ImportError:
        return
    lists = [getattr(processing.StableDiffusionProcessing, n, None) for n in ("cached_c", "cached_uc")]
    txt2img = getattr(processing, "StableDiffusionProcessingTxt2Img", None)
    lists += [getattr(txt2img, n, None) for n in ("cached_hr_c", "cached_hr_uc")]
    lists += [getattr(p, n, None) for n in ("cached_c", "cached_uc", "cached_hr_c", "cached_hr_uc")]
    for cache in lists:
        if isinstance(cache, list) and len(cache) == 2:
            cache[0] = cache[1] = None


def embedding_db():
    """A1111's textual-inversion database (where a LoRA's bundled embeddings are registered), or None."""
    try:
        from modules import sd_hijack
    except ImportError:
        return None
    return getattr(getattr(sd_hijack, "model_hijack", None), "embedding_db", None)


class _BundledTIHash(str):
    """What "TI hashes" says for a bundled embedding: the LoRA's name, as the built-in writes it (and nothing when
    its setting lora_bundled_ti_to_infotext is off)."""
    def __str__(self):
        return str.__str__(self) if opt("lora_bundled_ti_to_infotext", True) else ""

    def __bool__(self):
        return bool(str(self))


def make_embedding(data: dict, name: str, lora_path: str, lora_name: str):
    from modules.textual_inversion.textual_inversion import create_embedding_from_data
    emb = create_embedding_from_data(data, name, filename=lora_path + "/" + name)
    emb.loaded = True
    emb.shorthash = _BundledTIHash(lora_name)
    return emb


# ------------------------------------------------------------------ Forge
def forge_info() -> str | None:
    """A description of the Forge/reForge host, or None on A1111 (reference §11: detection)."""
    if "ldm_patched" in sys.modules:
        return "Forge (ldm_patched backend)"
    backend = sys.modules.get("backend")
    if backend is not None and (hasattr(backend, "memory_management") or "backend.diffusion_engine" in sys.modules
                                or "backend.memory_management" in sys.modules):
        return "Forge (backend/ engine)"
    try:
        from modules import sd_models
        if hasattr(sd_models, "forge_model_reload"):
            return "Forge (sd_models.forge_model_reload)"
    except Exception:  # not an A1111-shaped host at all
        return None
    model = loaded_model()
    if model is not None and hasattr(model, "forge_objects"):
        return "Forge (model has forge_objects)"
    return None


# ------------------------------------------------------------------ extra networks
def make_extra_network(name: str, owner):
    """An ``extra_networks.ExtraNetwork`` whose activate/deactivate call ``owner`` (the session)."""
    from modules import extra_networks

    class LoraStudioNetwork(extra_networks.ExtraNetwork):
        def __init__(self):
            super().__init__(name)
            self.lora_studio = owner

        def activate(self, p, params_list):
            self.lora_studio.activate(p, params_list)

        def deactivate(self, p):
            self.lora_studio.deactivate(p)

    return LoraStudioNetwork()


def registry():
    from modules import extra_networks
    return extra_networks.extra_network_registry, extra_networks.extra_network_aliases


def register_extra_network(net, name: str | None = None):
    from modules import extra_networks
    if name is None or name == net.name:
        extra_networks.register_extra_network(net)
    else:
        extra_networks.extra_network_registry[name] = net


def register_extra_network_alias(net, alias: str):
    from modules import extra_networks
    extra_networks.register_extra_network_alias(net, alias)


def unregister(name: str, net):
    reg, aliases = registry()
    if reg.get(name) is net:
        del reg[name]
    if aliases.get(name) is net:
        del aliases[name]


# ------------------------------------------------------------------ the built-in Lora (extensions-builtin/Lora)
def builtin_networks():
    """The built-in's ``networks`` module if it is loaded (it owns that top-level name), else None."""
    mod = sys.modules.get("networks")
    needed = ("loaded_networks", "network_restore_weights_from_backup", "network_reset_cached_weight")
    if mod is None or not all(hasattr(mod, a) for a in needed):
        return None
    return mod


def builtin_extra_network():
    mod = builtin_networks()
    return getattr(mod, "extra_network_lora", None) if mod is not None else None


def neutralise_builtin(layer_modules, clear_loaded: bool) -> int:
    """Make the built-in's patched forwards do nothing on these layers and drop its stale backups.

    Its ``network_apply_weights`` merges lazily on the next forward when ``network_current_names`` differs from the
    wanted names built from ``loaded_networks``, restoring from ``network_weights_backup`` first. So: put back what
    it merged (from its own backup), then reset current names and backups; with ``loaded_networks`` empty, its
    forward then sees wanted == current == () and no backup, and never restores a stale copy over our weights.
    Returns how many layers it had touched.
    """
    nw = builtin_networks()
    if nw is None:
        return 0
    import torch
    if clear_loaded:
        nw.loaded_networks.clear()
    touched = 0
    with torch.no_grad():
        for module in layer_modules:
            current = getattr(module, "network_current_names", ())
            has_backup = (getattr(module, "network_weights_backup", None) is not None
                          or getattr(module, "network_bias_backup", None) is not None)
            if current == () and not has_backup:
                continue
            if current != () and has_backup:
                nw.network_restore_weights_from_backup(module)
            nw.network_reset_cached_weight(module)
            touched += 1
    return touched


def mute_builtin_paste(active) -> int:
    """The built-in Lora's infotext_pasted renames every <lora:NAME:…> whose hash it has cached to its own choice of
    file, before ours runs (callbacks run in load order): while ``active()`` (take-over), it does nothing and ours
    renames, keeping a name that already reaches a file of that hash. Its other paste callback (AddNet fields to
    tags, in networks.py) keeps running. Returns how many callbacks were wrapped now."""
    try:
        from modules import script_callbacks
    except ImportError:
        return 0
    wrapped = 0
    tail = os.path.join("Lora", "scripts", "lora_script.py")
    for c in script_callbacks.callback_map.get("callbacks_infotext_pasted", []):
        fn = getattr(c, "callback", None)
        if (not os.path.normpath(str(getattr(c, "script", ""))).endswith(tail) or fn is None
                or getattr(fn, "__module__", "") == "networks" or getattr(fn, "_lora_studio_muted", False)):
            continue

        def muted(infotext, params, _orig=fn):
            if not active():
                return _orig(infotext, params)
        muted._lora_studio_muted = True
        muted.__wrapped__ = fn
        c.callback = muted
        wrapped += 1
    return wrapped


def explain_nans(note) -> bool:
    """A1111 stops a job whose UNet or VAE output is NaN with advice about precision and --disable-nan-check (which
    only hides a black image). With LoRAs applied, one of them is the likelier cause: ``note()`` says which, added to
    A1111's message (same exception class, so its own fp32-VAE retry still catches it). Installed once; a reload of
    the extension replaces the note, not the wrapper; ``note=None`` puts A1111's own function back."""
    try:
        from modules import devices
    except ImportError:
        return False
    current = getattr(devices, "test_for_nans", None)
    if current is None or not hasattr(devices, "NansException"):
        return False
    if getattr(current, "_lora_studio_note", None) is not None:
        if note is None:
            devices.test_for_nans = current.__wrapped__
        current._lora_studio_note[0] = note or (lambda: "")
        return True
    if note is None:
        return False
    holder = [note]

    def test_for_nans(x, where):
        try:
            return current(x, where)
        except devices.NansException as e:
            extra = holder[0]()
            if not extra:
                raise
            raise devices.NansException(f"{e}\n{extra}") from e
    test_for_nans._lora_studio_note = holder
    test_for_nans.__wrapped__ = current
    devices.test_for_nans = test_for_nans
    return True


def builtin_wants_networks() -> bool:
    nw = builtin_networks()
    return bool(nw is not None and nw.loaded_networks)


# ------------------------------------------------------------------ cards
def page_base_class():
    from modules import ui_extra_networks
    return ui_extra_networks.ExtraNetworksPage


def quote_js(s: str) -> str:
    from modules import ui_extra_networks
    return ui_extra_networks.quote_js(s)


def register_page(page):
    from modules import ui_extra_networks
    # "Reload UI" clears the list first; a repeated before_ui would otherwise add a duplicate tab.
    ui_extra_networks.extra_pages[:] = [x for x in ui_extra_networks.extra_pages if x.name != page.name]
    ui_extra_networks.register_page(page)


def track_card_pages() -> bool:
    """A1111 draws the card pages once per WebUI run (``create_ui``'s ``pages_contents``) and hands every later page
    load that drawing, filtered for the checkpoint loaded then. Wrapped once so that a model change can drop it.
    The record lives on the wrapper: a Reload UI imports this module anew, the wrapper stays."""
    try:
        from modules import ui_extra_networks as uen
    except ImportError:
        return False
    if getattr(uen.create_ui, "_lora_studio_uis", None) is not None:
        return False
    orig = uen.create_ui

    def create_ui(*args, **kwargs):
        ui = orig(*args, **kwargs)
        with contextlib.suppress(TypeError):
            create_ui._lora_studio_uis.append(weakref.ref(ui))
        return ui
    create_ui._lora_studio_uis = []
    create_ui.__wrapped__ = orig
    uen.create_ui = create_ui
    return True


def redraw_card_pages() -> int:
    """After a checkpoint change: the next page load draws the card pages anew (ours and the WebUI's own), for the
    model now loaded; a page already open keeps its cards until its refresh button. Returns how many were reset."""
    try:
        from modules import ui_extra_networks as uen
    except ImportError:
        return 0
    refs = getattr(uen.create_ui, "_lora_studio_uis", None) or []
    n = 0
    for r in list(refs):
        ui = r()
        if ui is None:
            refs.remove(r)
        elif getattr(ui, "pages_contents", None):
            ui.pages_contents = []
            n += 1
    return n


def user_metadata_editor(ui, tabname, page):
    """The built-in's Lora card editor (sd version, activation text, preferred weight…) when it is loaded."""
    mod = sys.modules.get("ui_edit_user_metadata")
    cls = getattr(mod, "LoraUserMetadataEditor", None) if mod is not None else None
    if cls is not None:
        return cls(ui, tabname, page)
    from modules import ui_extra_networks_user_metadata
    return ui_extra_networks_user_metadata.UserMetadataEditor(ui, tabname, page)
