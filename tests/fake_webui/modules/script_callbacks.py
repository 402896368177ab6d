"""Test fake of A1111 v1.10.1 ``modules/script_callbacks.py``, written from the documented behaviour (reference
§1.4, §1.6, §2):

- ``on_<category>(callback, *, name=None)`` records the callback with the file that registered it and the name
  ``<extension dir, lower-cased>/<file name>/<category>[/<name>]``;
- the runners call callbacks in registration order, except ``before_ui`` and ``script_unloaded`` (reverse order);
  an exception in a callback is reported and the next callback still runs;
- ``clear_callbacks()`` (run by ``scripts.load_scripts``) empties every list.
No metadata.ini ordering and no timing.
"""
import dataclasses
import os
import sys
from typing import Any, Callable

from modules import errors


@dataclasses.dataclass
class ScriptCallback:
    script: str
    callback: Callable
    name: str = "unnamed"


CATEGORIES = (
    "app_started", "model_loaded", "ui_tabs", "ui_train_tabs", "ui_settings", "before_image_saved", "image_saved",
    "extra_noise", "cfg_denoiser", "cfg_denoised", "cfg_after_cfg", "before_component", "after_component",
    "image_grid", "infotext_pasted", "script_unloaded", "before_ui", "on_reload", "list_optimizers", "list_unets",
    "before_token_counter",
)
callback_map = {f"callbacks_{category}": [] for category in CATEGORIES}


def clear_callbacks():
    for callbacks in callback_map.values():
        callbacks.clear()


def _caller_file():
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename == __file__:
        frame = frame.f_back
    return frame.f_code.co_filename if frame is not None else "unknown"


def add_callback(callbacks, fun, *, name=None, category="unknown", filename=None):
    filename = filename or _caller_file()
    # The canonical extension name is its install directory, lower-cased: the folder above scripts/.
    extension = os.path.basename(os.path.dirname(os.path.dirname(os.path.abspath(filename)))).lower()
    label = f"{extension}/{os.path.basename(filename)}/{category}" + (f"/{name}" if name is not None else "")
    callbacks.append(ScriptCallback(filename, fun, label))


def _registrar(category):
    def register(callback, *, name=None):
        add_callback(callback_map[f"callbacks_{category}"], callback, name=name, category=category)
    register.__name__ = f"on_{category}"
    return register


on_app_started = _registrar("app_started")
on_model_loaded = _registrar("model_loaded")
on_ui_tabs = _registrar("ui_tabs")
on_ui_train_tabs = _registrar("ui_train_tabs")
on_ui_settings = _registrar("ui_settings")
on_before_image_saved = _registrar("before_image_saved")
on_image_saved = _registrar("image_saved")
on_extra_noise = _registrar("extra_noise")
on_cfg_denoiser = _registrar("cfg_denoiser")
on_cfg_denoised = _registrar("cfg_denoised")
on_cfg_after_cfg = _registrar("cfg_after_cfg")
on_before_component = _registrar("before_component")
on_after_component = _registrar("after_component")
on_image_grid = _registrar("image_grid")
on_infotext_pasted = _registrar("infotext_pasted")
on_script_unloaded = _registrar("script_unloaded")
on_before_ui = _registrar("before_ui")
on_list_optimizers = _registrar("list_optimizers")
on_list_unets = _registrar("list_unets")
on_before_token_counter = _registrar("before_token_counter")
on_before_reload = _registrar("on_reload")


def _run(category, *args, reverse=False):
    callbacks = list(callback_map[f"callbacks_{category}"])
    for c in reversed(callbacks) if reverse else callbacks:
        try:
            c.callback(*args)
        except Exception:
            errors.report(f"Error executing callback {category} for {c.script}", exc_info=True)


def app_started_callback(demo, app):
    _run("app_started", demo, app)


def model_loaded_callback(sd_model):
    _run("model_loaded", sd_model)


def infotext_pasted_callback(infotext: str, params: dict[str, Any]):
    _run("infotext_pasted", infotext, params)


def before_ui_callback():
    _run("before_ui", reverse=True)


def script_unloaded_callback():
    _run("script_unloaded", reverse=True)
