"""Test fake of A1111 v1.10.1 ``modules/cache.py``. The real caches are diskcache stores under ``<data>/cache``;
here each named cache is a plain dict kept for the life of the process."""
import os

from modules.paths import data_path

cache_dir = os.environ.get("SD_WEBUI_CACHE_DIR", os.path.join(data_path, "cache"))
caches = {}


def cache(subsection):
    """The dict-like cache called ``subsection`` (created empty on first use)."""
    return caches.setdefault(subsection, {})
