"""LoRA Studio install step: installs nothing. Everything it needs ships with A1111 v1.10.1 (torch, safetensors,
gradio, numpy). Run by the WebUI at every launch (reference §1.2); it only checks and says what it found."""
import importlib.util
import sys

_NEEDED = ("torch", "safetensors", "gradio", "numpy")


def main() -> int:
    missing = [name for name in _NEEDED if importlib.util.find_spec(name) is None]
    if missing:
        print(f"LoRA Studio: missing {', '.join(missing)} in {sys.executable}; these come with the WebUI "
              "itself — repair the WebUI's venv (LoRA Studio does not install them).")
        return 1
    print("LoRA Studio: environment OK (nothing to install).")
    return 0


if __name__ == "__main__":
    main()  # a non-zero exit would only make the WebUI print an error; the message above says what to do
