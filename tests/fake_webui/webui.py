"""Test fake of A1111 v1.10.1 ``webui.py``: what startup does after ``initialize_rest`` (reference §1.5):
``before_ui`` callbacks in reverse registration order (user extensions first, built-ins last), then
``app_started`` in normal order."""
from modules import script_callbacks


def start(demo=None, app=None):
    script_callbacks.before_ui_callback()
    script_callbacks.app_started_callback(demo, app)
