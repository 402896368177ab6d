"""LoRA Studio: A1111 WebUI glue. Callbacks only; the work is in lib_lora (uniquely named package, §1.4).

A1111 executes this file with the extension root on sys.path only during the import, so lib_lora is imported
here, at the top. "Reload UI" runs this file again: the old session restores the weights in on_script_unloaded and
a new session takes over.
"""
from modules import script_callbacks, scripts

from lib_lora.host.session import Session

session = Session()
session.register_settings()  # import time: also works with --nowebui


class LoraStudioScript(scripts.Script):
    def title(self):
        return "LoRA Studio"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def process(self, p, *args):
        # Runs before every job's extra-networks activation: keep <lora:…> ours (last writer wins in the registry).
        session.before_job(p)


script_callbacks.on_before_ui(session.before_ui)
script_callbacks.on_app_started(session.app_started)
script_callbacks.on_ui_tabs(session.ui_tabs)
script_callbacks.on_model_loaded(session.on_model_loaded)
script_callbacks.on_infotext_pasted(session.infotext_pasted)
script_callbacks.on_script_unloaded(session.shutdown)
