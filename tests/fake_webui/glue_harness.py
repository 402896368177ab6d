"""A1111 startup against the fake WebUI, shared by the tests/test_glue_* fixtures.

Startup is simulated the way A1111 does it: scripts loaded by file path with the extension root on sys.path only
during the import (not in sys.modules), then initialize_rest clearing both registries, the model load
(on_model_loaded, get_empty_cond), then before_ui in reverse order (built-ins last: the built-in grabs `lora` after
us) and app_started. Everything imported meanwhile (modules.*, the built-in's top-level names, lib_lora) is dropped
again afterwards and what was there before is put back.
"""
import contextlib
import importlib
import os
import sys
import types

FAKE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(FAKE)
ROOT = os.path.dirname(TESTS)
BUILTIN_LORA = os.path.join(FAKE, "extensions-builtin", "Lora")
BUILTIN_NAMES = ("networks", "network", "lora_patches", "extra_networks_lora", "ui_edit_user_metadata")


def ours(name):
    """Module names that belong to one simulated WebUI run."""
    return name == "lib_lora" or name.startswith("lib_lora.") or name == "modules" or name.startswith("modules.") \
        or name in BUILTIN_NAMES or name == "webui"


@contextlib.contextmanager
def started_webui(data, make_model, prepare=None, app=None):
    """Yields a namespace of the started fake WebUI (modules, the model, our script module and session).

    ``data``: the WebUI data dir (models/Lora under it is ``--lora-dir``); ``make_model()``: the checkpoint;
    ``prepare(ns)``: runs after the flags are set and before the scripts load (write LoRA files here);
    ``app``: the FastAPI app app_started gets (None: as in the tests that need no routes).
    """
    os.environ["FAKE_WEBUI_DATA"] = str(data)
    saved_path = sys.path[:]
    saved_modules = {k: v for k, v in sys.modules.items() if ours(k)}
    for k in saved_modules:
        del sys.modules[k]
    # The extension root must NOT be importable except during its script import (as in A1111).
    sys.path[:] = [FAKE] + [p for p in saved_path if os.path.abspath(p or ".") not in (ROOT, TESTS, FAKE)]
    ns = types.SimpleNamespace(data=data)
    try:
        from modules import shared, initialize, extra_networks, script_callbacks, sd_models, ui_extra_networks
        import webui as fake_startup
        shared.cmd_opts.lora_dir = str(data / "models" / "Lora")
        shared.cmd_opts.lyco_dir_backcompat = str(data / "models" / "LyCORIS")
        ns.shared, ns.extra_networks, ns.script_callbacks = shared, extra_networks, script_callbacks
        ns.sd_models, ns.ui_extra_networks = sd_models, ui_extra_networks
        if prepare is not None:
            prepare(ns)
        initialize.initialize_rest([BUILTIN_LORA, ROOT])
        ns.lib_lora_after_load = sys.modules.get("lib_lora")
        model = make_model()
        sd_models.model_data.loader = lambda: model
        sd_models.load_model()  # on_model_loaded (built-in names layers), get_empty_cond → activate(p, {})
        fake_startup.start(app=app)
        ns.model = model
        ns.processing = importlib.import_module("modules.processing")
        ns.scripts = importlib.import_module("modules.scripts")
        ns.sd_hijack = importlib.import_module("modules.sd_hijack")
        ns.textual_inversion = importlib.import_module("modules.textual_inversion.textual_inversion")
        ns.networks = sys.modules["networks"]
        ns.script_module = script_module()
        ns.session = ns.script_module.session
        yield ns
    finally:
        try:
            sys.modules["modules.script_callbacks"].script_unloaded_callback()  # undoes the built-in's class patches
        except KeyError:
            pass
        for k in [k for k in sys.modules if ours(k)]:
            del sys.modules[k]
        sys.modules.update(saved_modules)
        sys.path[:] = saved_path
        os.environ.pop("FAKE_WEBUI_DATA", None)


def script_module():
    """Our scripts/lora_studio.py as the WebUI loaded it last (never in sys.modules)."""
    from modules import script_loading
    return next(m for p, m in script_loading.loaded_scripts.items() if p.endswith("lora_studio.py"))
