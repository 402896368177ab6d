"""Loads one of sd-scripts' networks/*.py from a checkout for the reference generators in this folder, without its
package: the modules import diffusers for type hints and library.utils for their logging set-up only."""
import importlib.util
import os
import sys
import types


def load(root: str, name: str):
    sys.modules.setdefault("diffusers", types.SimpleNamespace(AutoencoderKL=object))
    sys.modules.setdefault("library", types.ModuleType("library"))
    sys.modules.setdefault("library.utils", types.SimpleNamespace(setup_logging=lambda *a, **k: None))
    spec = importlib.util.spec_from_file_location(f"sds_{name}", os.path.join(root, "networks", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
