"""Test fake of A1111 v1.10.1 ``modules/shared_cmd_options.py``: a namespace with the command-line flags LoRA
Studio reads. ``lora_dir`` and ``lyco_dir_backcompat`` come from the built-in Lora's preload in the real WebUI
(reference §1.3), so they always exist."""
import argparse
import os

from modules.paths_internal import models_path

cmd_opts = argparse.Namespace(
    lora_dir=os.path.join(models_path, "Lora"),
    lyco_dir_backcompat=os.path.join(models_path, "LyCORIS"),
    no_hashing=False,
)
