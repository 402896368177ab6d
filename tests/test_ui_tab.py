"""The tab without a browser: it builds as A1111 needs it (standalone Blocks, unique prefixed ids, plain-string
labels, the JS it names exists), and its pure pieces (job table, progress, errors, loss plot, grid) behave."""
import html
import os
import re

import gradio as gr
import pytest
from PIL import Image

from lib_lora.train.config import TrainConfigError
from lib_lora.ui import tab as T
from lib_lora.ui.backend import UiError, describe_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class FakeBackend:
    store_dir = "/tmp/lora-studio-fake"

    def model_info(self):
        return {"loaded": True, "name": "v1-5.safetensors", "hash": "abcdef1234", "family": "sdxl",
                "parameterization": "eps", "dtype": "float16", "device": "cuda"}

    def jobs(self):
        return []

    def queue_problem(self):
        return "the saved queue could not be read; it was kept as queue.json.unreadable-1"

    def default_output_dir(self):
        return "/models/Lora"


@pytest.fixture(scope="module")
def blocks():
    return T.build_tab(FakeBackend())


def _components(blocks):
    return [b for b in blocks.blocks.values() if isinstance(b, gr.components.Component)]


def test_builds_standalone_with_prefixed_unique_ids(blocks):
    assert isinstance(blocks, gr.Blocks)
    assert T.on_ui_tabs_entry(FakeBackend())[0][1:] == ("LoRA Studio", "lora_studio")
    ids = [b.elem_id for b in blocks.blocks.values() if getattr(b, "elem_id", None)]
    assert len(ids) == len(set(ids)), [i for i in ids if ids.count(i) > 1]
    assert all(i.startswith("lora_studio") for i in ids), [i for i in ids if not i.startswith("lora_studio")]
    for needed in ("lora_studio_train_dir", "lora_studio_reg_dir", "lora_studio_doctor", "lora_studio_preset",
                   "lora_studio_train", "lora_studio_queue", "lora_studio_cancel", "lora_studio_refresh",
                   "lora_studio_jobs", "lora_studio_loss", "lora_studio_samples", "lora_studio_r_gallery",
                   "lora_studio_r_use", "lora_studio_toml", "lora_studio_h_create", "lora_studio_progress"):
        assert needed in ids, needed


def test_labels_are_plain_strings_and_fields_have_tooltips(blocks):
    for c in _components(blocks):
        label = getattr(c, "label", None)
        assert label is None or type(label) is str, (c, label)
    for f in T.FIELDS:
        comp = next(c for c in _components(blocks) if c.elem_id == f"lora_studio_{f.key}")
        assert comp.info == f.info and comp.label == f.label


def test_family_picks_the_preset_and_queue_problem_is_shown(blocks):
    preset = next(c for c in _components(blocks) if c.elem_id == "lora_studio_preset")
    assert preset.value == "SDXL character"
    res = next(c for c in _components(blocks) if c.elem_id == "lora_studio_resolution")
    assert res.value == "1024"
    htmls = " ".join(str(c.value) for c in _components(blocks) if isinstance(c, gr.HTML))
    assert "could not be read" in htmls and "v1-5.safetensors" in htmls


def test_javascript_functions_named_by_the_tab_exist(blocks):
    js = open(os.path.join(ROOT, "javascript", "lora_studio.js"), encoding="utf-8").read()
    named = {d.get("js") for d in blocks.config["dependencies"] if d.get("js")}
    assert named == {"lora_studio_start_training", "lora_studio_use_tag"}
    for fn in named:
        assert re.search(rf"function {fn}\(", js), fn
    assert "typeof requestProgress === \"function\"" in js  # degrades without A1111's progress bar
    css = re.sub(r"/\*.*?\*/", "", open(os.path.join(ROOT, "style.css"), encoding="utf-8").read(), flags=re.S)
    selectors = [s.strip() for rule in re.findall(r"([^{}]+)\{", css) for s in rule.split(",")]
    for s in selectors:
        if s and not s.startswith("@"):
            assert s.startswith(".lora-studio") or s.startswith("#tab_lora_studio"), s


def _job(**kw):
    j = {"id": "0123456789ab", "name": "bear", "status": "running", "step": 30, "total": 120, "epoch": 2,
         "epochs": 8, "loss": 0.1234, "avg_loss": 0.11, "lr": 1e-4, "eta_s": 95, "message": "", "files": [],
         "notes": [], "error": None, "losses": [], "samples": [], "model": {}}
    j.update(kw)
    return j


def test_job_table_progress_and_labels():
    jobs = [_job(), _job(id="aaaaaaaaaaaa", name="next", status="queued", step=0, total=0)]
    html = T.jobs_table_html(jobs, "aaaaaaaaaaaa")
    assert 'data-active="1"' in html and "1m 35s" in html and "waiting" in html and "ls-selected" in html
    assert 'data-active="0"' in T.jobs_table_html([_job(status="done", eta_s=None)])
    p = T.job_progress_html(_job())
    assert "step 30 of 120 (25%)" in p and "epoch 2 of 8" in p and "about 1m 35s left" in p
    failed = T.job_progress_html(_job(status="failed", message="CUDA out of memory. Tried to allocate 2 GiB"))
    assert "Training failed" in failed and "gradient checkpointing" in failed and 'role="alert"' in failed
    assert T.job_id_of(T.job_label(_job())) == "0123456789ab"
    import time
    at = time.mktime((2026, 12, 1, 14, 58, 0, 0, 0, -1))
    assert T.job_label(_job(created=at)) == "bear · Dec 01 14:58 [0123456789ab]"  # (runs of one name told apart)
    # the table: when each was queued, and which row a resume from the tab continues
    first = _job(status="cancelled", created=at, resume_state="/o/bear-cancelled-state.lsstate", config={})
    again = _job(id="bbbbbbbbbbbb", name="bear (resumed)", status="queued", created=at + 60,
                 config={"resume": "/o/bear-cancelled-state.lsstate"})
    html = T.jobs_table_html([first, again, _job(id="cccccccccccc", name="other", config={"resume": "/x.lsstate"})])
    assert "<th scope=\"col\">Queued</th>" in html and "<td>Dec 01 14:58</td>" in html and "Dec 01 14:59" in html
    assert html.count("continues") == 1 and "continues bear [0123456789ab]" in html
    again["resume_state"] = first["resume_state"]  # cancelled again: its state has the same name
    assert T.jobs_table_html([first, again]).count("continues bear [0123456789ab]") == 1
    assert T.job_id_of(T.job_label(_job(created=at))) == "0123456789ab"
    assert T.job_id_of(None) is None


def test_error_messages_are_plain(capsys):
    assert "Error:</b> No checkpoint" in T.error_html(UiError("No checkpoint is loaded."))
    assert "not valid TOML" in T.error_html(TrainConfigError("x: not valid TOML"))
    # several problems show one per line (escaped first: the line breaks are ours, not the message's markup)
    assert "queued:<br>- a &lt;b&gt;<br>- c" in T.error_html(UiError("The job was not queued:\n- a <b>\n- c"))
    fnf = T.error_html(FileNotFoundError(2, "No such file", "/x/y"))
    assert "was not found: /x/y" in fnf
    bug = T.error_html(ZeroDivisionError("division by zero"))
    assert "bug in LoRA Studio" in bug and "console" in bug
    status = gr.HTML()

    @T.guarded(status)
    def boom(x):
        raise UiError(f"bad {x}")

    out = boom(1)
    assert list(out) == [status] and "bad 1" in out[status]

    @T.guarded(status)
    def gen():
        yield {status: "working"}
        raise UiError("stopped halfway")

    steps = list(gen())
    assert steps[0] == {status: "working"} and "stopped halfway" in steps[1][status]


def test_loss_plot_and_smoothing(tmp_path):
    assert T.smooth([2.0] * 5) == pytest.approx([2.0] * 5)
    s = T.smooth([0.0, 10.0])
    assert 0.0 < s[1] < 10.0
    path = T.render_loss_png([(i, 1.0 / (i + 1)) for i in range(1, 40)], str(tmp_path / "p" / "loss.png"), "bear")
    img = Image.open(path)
    assert img.format == "PNG" and img.size == (640, 280)


def test_grid_index_and_picture():
    # gallery order: file, then strength, then seed
    assert T.grid_index(0, 4, 5) == (0, 0, 0)
    assert T.grid_index(7, 4, 5) == (0, 1, 2)
    assert T.grid_index(23, 4, 5) == (1, 0, 3)
    cells = [[[Image.new("RGB", (64, 48), (i * 60, j * 60, k * 40)) for k in range(3)] for j in range(2)]
             for i in range(2)]
    grid = T.compose_grid(cells, ["epoch 1", "final"], [0.5, 1.0], [1, 2, 3])
    assert grid.size == (150 + 3 * (64 + 4), 22 + 4 * (48 + 4))
    # the cell of file 1, strength 1.0, seed 3 is where the row/column maths says
    x, y = 150 + 2 * 68 + 10, 22 + 3 * 52 + 10
    assert grid.getpixel((x, y)) == (60, 60, 80)


def test_grid_pictures_name_the_lora_they_were_rendered_with():
    text = "svs bear\nNegative prompt: blurry\nSteps: 20, Sampler: DPM++ 2M, Seed: 3"
    assert T.tagged_infotext(text, "svs bear", "<lora:a-000002:0.7>") == (
        "svs bear <lora:a-000002:0.7>\nNegative prompt: blurry\nSteps: 20, Sampler: DPM++ 2M, Seed: 3")
    assert T.tagged_infotext("styled svs bear\nSteps: 2", "svs bear", "<lora:a:1>") == (
        "<lora:a:1> styled svs bear\nSteps: 2")
    assert T.tagged_infotext(None, "svs bear", "<lora:a:1>") is None


def test_gallery_lines_hold_whole_rows_of_seeds_and_are_not_posters():
    for n in range(1, 16):
        cols = T.gallery_columns(n)
        assert cols % n == 0 and (5 <= cols <= 9 or cols == n), (n, cols)
    assert [T.gallery_columns(n) for n in (0, 1, 2, 3, 4, 5)] == [6, 6, 6, 6, 8, 5]


def test_model_panel():
    assert "No checkpoint is loaded" in T.model_html({"loaded": False})
    html = T.model_html(FakeBackend().model_info(),
                        [{"name": "old", "status": "queued", "model": {"name": "x.ckpt", "hash": "999"}}])
    assert "SDXL" in html and "float16 on cuda" in html and "Job &#x27;old&#x27; was queued with x.ckpt" in html


def test_model_problem_is_shown_in_plain_words():
    from lib_lora.ui.tab import model_html
    html = model_html({"loaded": False, "problem": "--lowvram moves every UNet block; restart without --lowvram"})
    assert "Training is not available" in html and "--lowvram" in html
    assert "No checkpoint is loaded" in model_html({"loaded": False})


class JobsBackend(FakeBackend):
    """Three jobs, the first training: enough for the poll and the busy refusals."""

    def __init__(self):
        self.list = [_job(id="a" * 12, name="job_a"), _job(id="b" * 12, name="job_b", status="queued", step=0),
                     _job(id="c" * 12, name="job_c", status="queued", step=0)]

    def jobs(self):
        return [dict(j) for j in self.list]

    def job(self, jid):
        return next((j for j in self.jobs() if j["id"] == jid), None)

    def generate(self, *a, **k):
        raise AssertionError("must not wait for the model while a job trains")

    render_grid = generate


def _handler(blocks, elem_id, trigger="click"):
    """The function gradio calls for ``trigger`` on the component with ``elem_id``, and its outputs."""
    target = next(i for i, b in blocks.blocks.items() if getattr(b, "elem_id", None) == elem_id)
    for dep, fn in zip(blocks.dependencies, blocks.fns):
        if target in dep["targets"] and dep["trigger"] == trigger:
            return fn.fn, [blocks.blocks[i] for i in dep["outputs"]]
    raise KeyError(elem_id)


def _by_id(outputs, elem_id):
    return next(o for o in outputs if getattr(o, "elem_id", None) == elem_id)


def test_poll_never_puts_back_a_selection_the_user_has_changed_since():
    """CI once failed on this race: a poll that read 'job_b' as selected came back after the Queue button had
    selected job_c, and put job_b back, so 'Move up' moved the wrong job."""
    be = JobsBackend()
    blocks = T.build_tab(be)
    poll, outs = _handler(blocks, "lora_studio_refresh")
    select = _by_id(outs, "lora_studio_job")
    labels = [T.job_label(j) for j in be.jobs()]
    assert all("queued" not in x and "running" not in x for x in labels)  # stable while jobs run
    # the poll read job_b and an older list (job_c was queued meanwhile): only the choices may change
    out = poll(labels[1], {"labels": labels[:2]})
    assert out[select]["choices"] == labels and "value" not in out[select]
    # nothing (or a removed job) selected: the poll picks the training job
    out = poll(None, {"labels": labels})
    assert out[select]["value"] == labels[0]
    out = poll("gone [ffffffffffff]", {"labels": labels})
    assert out[select]["value"] == labels[0]
    # unchanged: no update at all (a re-render under the pointer would close an open dropdown)
    out = poll(labels[2], {"labels": labels})
    assert set(out[select]) <= {"__type__"}


def test_regularisation_images_stop_and_continue_from_the_next_seed(tmp_path):
    """Stop ends the generation after the batch under way; the first seed moves on so a second press makes new
    pictures, not the same ones again."""
    class GenBackend(FakeBackend):
        def generate(self, prompt, n, seed, width, height, negative_prompt="", steps=None, on_image=None,
                     should_stop=None):
            out = []
            for i in range(n):
                if should_stop and should_stop():
                    break
                out.append(Image.new("RGB", (width, height)))
                on_image(i + 1, n, out[-1])
                if i == 1:
                    stop()  # (pressed while the second image is made)
            return out

    blocks = T.build_tab(GenBackend())
    reg, outs = _handler(blocks, "lora_studio_h_reg_go")
    stop, _ = _handler(blocks, "lora_studio_h_reg_stop")
    status, seed = _by_id(outs, "lora_studio_h_status"), _by_id(outs, "lora_studio_h_reg_seed")
    folder = tmp_path / "reg" / "1_bear"
    last = list(reg(str(folder), "a bear", 10, 3, 64, 64))[-1]
    assert "Stopped: wrote 2 of 10 regularisation image(s)" in last[status] and "from seed 5" in last[status]
    assert last[seed]["value"] == 5 and sorted(os.listdir(folder)) == ["reg_00001.png", "reg_00002.png"]
    last = list(reg(str(folder), "a bear", 1, 5, 64, 64))[-1]  # (a new press clears the stop)
    assert "Wrote 1 regularisation image(s)" in last[status] and last[seed]["value"] == 6
    last = list(reg(str(folder), "a bear", 1, 5, 65, 64))[-1]
    assert "Width 65 is not a multiple of 8" in html.unescape(last[status])


def test_generating_while_a_job_trains_is_refused_at_once_with_what_to_do():
    be = JobsBackend()
    blocks = T.build_tab(be)
    reg, outs = _handler(blocks, "lora_studio_h_reg_go")
    steps = list(reg("/d/reg/1_bear", "a bear", 4, 0, 64, 64))
    text = html.unescape(steps[-1][_by_id(outs, "lora_studio_h_status")])
    assert "busy training 'job_a' (step 30/120)" in text and "when it has finished, or cancel it" in text
    render, outs = _handler(blocks, "lora_studio_r_render")
    done = "/loras/job_b-000001.safetensors"
    be.list[1].update(status="done", files=[done])
    out = list(render(T.job_label(be.list[1]), [f"{describe_file(done)}: job_b-000001.safetensors"], "svs bear",
                      "", "1", "1", 64, 64, 2))
    assert "busy training &#x27;job_a&#x27;" in out[-1][_by_id(outs, "lora_studio_r_status")]


class SwitchingBackend(FakeBackend):
    """The WebUI's checkpoint changes after the tab was built (A1111 builds the UI once, at start-up)."""
    info = {"loaded": True, "name": "tiny-sd1", "hash": "92fa3d53d9", "family": "sd1", "parameterization": "eps"}

    def model_info(self):
        return dict(self.info)

    def queue_problem(self):
        return None


def _load_handler(blocks, name):
    return next(fn.fn for dep, fn in zip(blocks.dependencies, blocks.fns)
                if dep["trigger"] == "load" and fn.fn.__name__ == name)


def test_the_form_follows_the_checkpoint_loaded_when_the_page_opens():
    """From the real WebUI: built while SD1 was loaded, the form kept SD1.5 defaults (512 px) after a switch to
    SDXL, also on a freshly loaded page. A page load now starts from the loaded model's preset; a form that may
    have been edited (Refresh model, the poll) only gets a hint. SD2 768-v models get their 768 preset."""
    be = SwitchingBackend()
    blocks = T.build_tab(be)
    comps = {c.elem_id: c for c in _components(blocks)}
    assert comps["lora_studio_preset"].value == "SD1.5 character" and comps["lora_studio_resolution"].value == "512"
    follow = _load_handler(blocks, "follow_model")
    fields = [comps[f"lora_studio_{f.key}"].value for f in T.FIELDS]
    assert set(follow("SD1.5 character", *fields)) == {comps["lora_studio_model"]}  # same model: nothing to do
    be.info = dict(be.info, name="tiny-sdxl", family="sdxl")
    out = follow("SD1.5 character", *fields)
    assert out[comps["lora_studio_preset"]] == "SDXL character" and out[comps["lora_studio_resolution"]] == "1024"
    assert "holds the" not in out[comps["lora_studio_model"]]
    assert out[comps["lora_studio_preset_note"]] == T.PRESET_NOTES["SDXL character"]
    refresh, _ = _handler(blocks, "lora_studio_model_refresh")
    hint = html.unescape(refresh("SD1.5 character"))
    assert ("The Parameters tab holds the 'SD1.5 character' preset's settings, but SDXL is loaded: choose the "
            "'SDXL character' preset there") in hint
    assert "holds the" not in refresh("SDXL character")
    be.info = dict(be.info, name="v2-768", family="sd2", parameterization="v")
    out = follow("SD1.5 character", *fields)
    assert out[comps["lora_studio_preset"]] == "SD2.x 768-v character" and \
        out[comps["lora_studio_resolution"]] == "768"
    be.info = dict(be.info, family="sd1", parameterization="eps")
    assert "holds the" not in refresh("SD1.5 style")  # another preset of the same family is the user's choice
    # the page-load poll (which draws the model line from the preset) runs after the preset followed, not beside it
    deps = list(zip(blocks.dependencies, blocks.fns))
    i = next(n for n, (d, fn) in enumerate(deps) if d["trigger"] == "load" and fn.fn.__name__ == "follow_model")
    assert [fn.fn.__name__ for d, fn in deps if d["trigger"] == "load"] == ["vram", "follow_model"]
    assert [fn.fn.__name__ for d, fn in deps if d.get("trigger_after") == i] == ["poll"]


def test_the_doctor_warns_about_sdxl_at_sd15_sizes(tmp_path):
    from lib_lora.ui.doctor import settings_findings
    from lib_lora.train.config import parse_train_config
    cfg = parse_train_config({"train_data_dir": str(tmp_path), "resolution": 512, "output_dir": str(tmp_path)})
    _, warnings = settings_findings(cfg, "cuda", "sdxl")
    assert any(w.startswith("SDXL models make their pictures at about 1024x1024; a LoRA trained at 512x512")
               for w in warnings), warnings
    assert not any("SDXL models" in w for w in settings_findings(cfg, "cuda", "sd1")[1])
