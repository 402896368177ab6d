"""Test fake of A1111 v1.10.1 ``modules/paths_internal.py`` (written from its documented role): the WebUI root is
tests/fake_webui; the data dir is a temp dir, or ``$FAKE_WEBUI_DATA`` when a test sets it."""
import os
import tempfile

script_path = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
data_path = os.environ.get("FAKE_WEBUI_DATA", os.path.join(tempfile.gettempdir(), "fake-webui-data"))
models_path = os.path.join(data_path, "models")
extensions_dir = os.path.join(data_path, "extensions")
extensions_builtin_dir = os.path.join(script_path, "extensions-builtin")
