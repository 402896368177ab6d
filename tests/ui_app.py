"""Serve the LoRA Studio tab standalone, the way A1111 v1.10.1 hosts it, for the Playwright test and by hand.

- the tab's Blocks is built on its own and ``.render()``-ed inside ``TabItem("LoRA Studio", id="lora_studio",
  elem_id="tab_lora_studio")`` of an outer Blocks, next to a stand-in txt2img tab (``#txt2img_prompt textarea``);
- ``javascript/*.js`` and ``style.css`` are injected into the page the way A1111's ``reload_javascript`` does
  (A1111's own progressbar.js is NOT loaded, so ``requestProgress`` is absent: the tab must degrade);
- the backend is a ``LocalBackend`` over the tiny CPU SD1 model (tests/models.py) with fake interrogators.

    python tests/ui_app.py --port 7861 --root /tmp/lora-studio-ui
"""
import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for p in (ROOT, os.path.join(ROOT, "tests")):
    if p not in sys.path:
        sys.path.insert(0, p)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import torch  # noqa: E402

torch.set_num_threads(1)


def fake_interrogators():
    return {"blip": lambda im: "a bear standing in the grass",
            "deepbooru": lambda im: "bear, grass, outdoors, no humans"}


def recording_hooks(path: str):
    """ProgressHooks that log each call as 'event task_id job_name' (what the WebUI glue turns into A1111's
    progress.add_task_to_queue / start_task / finish_task)."""
    from lib_lora.ui.backend import ProgressHooks

    class Recording(ProgressHooks):
        def _log(self, event, task, job):
            with open(path, "a", encoding="utf-8") as f:
                f.write(f"{event} {task} {getattr(job, 'name', '-')}\n")

        def queued(self, task, job):
            self._log("queued", task, job)

        def started(self, task, job):
            self._log("started", task, job)

        def finished(self, task, job):
            self._log("finished", task, job)

    return Recording()


def make_backend(root: str, sample_steps: int = 4, seed: int = 0):
    import models
    from lib_lora.host.base import ModelHost
    from lib_lora.ui.backend import LocalBackend

    m = models.make_sd1(seed=seed)
    info = m.sd_checkpoint_info
    host = ModelHost(m, name=info.name, path=info.filename, sha256=info.sha256)
    return LocalBackend(host, os.path.join(root, "studio"), output_dir=os.path.join(root, "Lora"),
                        interrogators=fake_interrogators(), sample_steps=sample_steps,
                        hooks=recording_hooks(os.path.join(root, "hooks.log")))


def inject_assets():
    """A1111's ui_gradio_extensions.reload_javascript: scripts into <head>, css before </body>."""
    import gradio as gr

    js_dir = os.path.join(ROOT, "javascript")
    scripts = "".join(f"<script>\n{open(os.path.join(js_dir, n), encoding='utf-8').read()}\n</script>"
                      for n in sorted(os.listdir(js_dir)) if n.endswith(".js"))
    css = f"<style>\n{open(os.path.join(ROOT, 'style.css'), encoding='utf-8').read()}\n</style>"
    original = gr.routes.templates.TemplateResponse

    def template_response(*args, **kwargs):
        res = original(*args, **kwargs)
        res.body = res.body.replace(b"</head>", f"{scripts}</head>".encode("utf8"))
        res.body = res.body.replace(b"</body>", f"{css}</body>".encode("utf8"))
        res.init_headers()
        return res

    gr.routes.templates.TemplateResponse = template_response


def build_app(backend):
    import gradio as gr
    from lib_lora.ui.tab import on_ui_tabs_entry

    tabs = on_ui_tabs_entry(backend)
    with gr.Blocks(analytics_enabled=False, title="Stable Diffusion") as demo:
        with gr.Tabs(elem_id="tabs"):
            with gr.TabItem("txt2img", id="txt2img", elem_id="tab_txt2img"):
                gr.Textbox(label="Prompt", elem_id="txt2img_prompt", lines=3)
            for blocks, title, elem_id in tabs:
                with gr.TabItem(title, id=elem_id, elem_id=f"tab_{elem_id}"):
                    blocks.render()
    return demo


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=7861)
    ap.add_argument("--root", required=True)
    ap.add_argument("--sample-steps", type=int, default=4)
    a = ap.parse_args()
    backend = make_backend(a.root, a.sample_steps)
    inject_assets()
    demo = build_app(backend)
    demo.queue(64)
    demo.launch(server_name="127.0.0.1", server_port=a.port, prevent_thread_lock=True, show_api=False,
                quiet=True)
    print(f"READY http://127.0.0.1:{a.port}/", flush=True)
    try:
        while True:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        backend.stop(5)


if __name__ == "__main__":
    main()
