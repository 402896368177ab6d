"""Test fake of A1111 v1.10.1 ``modules/paths.py``: re-exports the fake's directories."""
from modules.paths_internal import data_path, models_path, script_path  # noqa: F401
