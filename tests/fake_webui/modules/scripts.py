"""Test fake of A1111 v1.10.1 ``modules/scripts.py``, written from the documented behaviour (reference §1.4):

- ``load_scripts`` first clears all callbacks, then runs every top-level ``scripts/*.py`` of each extension root
  (roots in the given order, files sorted) with that root at the front of sys.path only while the file runs;
  ``basedir()`` answers the root only then;
- ``Script`` subclasses whose ``show()`` returns ``AlwaysVisible`` go into ``scripts_txt2img``, a ``ScriptRunner``
  whose hooks processing calls as ``hook(p, *script_args, **kwargs)``.
"""
import inspect
import os
import sys

from modules import errors, script_callbacks, script_loading
from modules.paths_internal import script_path

AlwaysVisible = object()


class Script:
    filename = None
    args_from = None
    args_to = None
    alwayson = False
    is_img2img = False

    def title(self):
        raise NotImplementedError

    def show(self, is_img2img):
        return True

    def before_process(self, p, *args):
        pass

    def process(self, p, *args):
        pass

    def before_process_batch(self, p, *args, **kwargs):
        pass

    def process_batch(self, p, *args, **kwargs):
        pass


current_basedir = script_path


def basedir():
    return current_basedir


script_classes = []  # (class, path) of every Script subclass found by load_scripts
scripts_txt2img = None


def load_scripts(extension_roots):
    """The real one walks the WebUI, built-in and user extension folders; this one the roots it is given."""
    global current_basedir, scripts_txt2img
    script_classes.clear()
    script_callbacks.clear_callbacks()
    for root in extension_roots:
        folder = os.path.join(root, "scripts")
        names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
        for path in [os.path.join(folder, n) for n in names if n.endswith(".py")]:
            saved_path = sys.path
            sys.path = [root] + sys.path
            current_basedir = root
            try:
                module = script_loading.load_module(path)
                script_classes.extend((obj, path) for obj in vars(module).values()
                                      if inspect.isclass(obj) and issubclass(obj, Script))
            except Exception:
                errors.report(f"Error loading script: {path}", exc_info=True)
            finally:
                sys.path = saved_path
                current_basedir = script_path
    scripts_txt2img = ScriptRunner(is_img2img=False)


class ScriptRunner:
    def __init__(self, is_img2img=False):
        self.alwayson_scripts = []
        for cls, path in script_classes:
            script = cls()
            script.filename = path
            script.is_img2img = is_img2img
            if script.show(is_img2img) is AlwaysVisible:
                script.alwayson = True
                self.alwayson_scripts.append(script)
        self.scripts = list(self.alwayson_scripts)

    def _each(self, hook, p, **kwargs):
        for script in self.alwayson_scripts:
            try:
                getattr(script, hook)(p, *(p.script_args or [])[script.args_from:script.args_to], **kwargs)
            except Exception:
                errors.report(f"Error running {hook}: {script.filename}", exc_info=True)

    def before_process(self, p):
        self._each("before_process", p)

    def process(self, p):
        self._each("process", p)

    def before_process_batch(self, p, **kwargs):
        self._each("before_process_batch", p, **kwargs)

    def process_batch(self, p, **kwargs):
        self._each("process_batch", p, **kwargs)
