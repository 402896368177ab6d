"""Test fake of A1111 v1.10.1 ``modules/script_loading.py`` (reference §1.4): a script file is executed as a
module named after its file name, via ``importlib.util.spec_from_file_location``, and is NOT put in sys.modules.
``loaded_scripts`` (path → module) lets tests reach the module."""
import importlib.util
import os

loaded_scripts = {}


def load_module(path):
    spec = importlib.util.spec_from_file_location(os.path.basename(path), path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    loaded_scripts[path] = module
    return module
