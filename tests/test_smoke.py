import importlib


def test_engine_imports_without_webui():
    import sys
    mod = importlib.import_module("lib_lora")
    assert mod.__version__
    assert not any(name == "modules" or name.startswith("modules.") for name in sys.modules)
