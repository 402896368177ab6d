"""LoRA Studio engine: read, apply and train LoRA networks on Stable Diffusion models.

Nothing here imports the WebUI's ``modules`` at import time; the WebUI adapter lives in ``lib_lora.host`` and
imports ``modules.*`` lazily inside functions, so the engine runs headless, in tests and from the CLI.
"""

__version__ = "0.1.0"
