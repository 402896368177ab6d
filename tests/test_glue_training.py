"""Training inside the FAKE A1111 v1.10.1 (tests/fake_webui): the Studio's backend and its HTTP API over one job
queue, with the real tiny ldm SD1 model loaded as the WebUI's checkpoint and a generated kohya dataset.

What a job must do to the WebUI: hold ``call_queue.queue_lock`` and ``shared.state`` begin/end around the run,
drive the progress bar for a tab job (``progress.*`` with its task id), swap a non-trainable attention optimization
out and back, render samples with ``processing.process_images`` (extra networks off), and leave the model exactly as
it was, also when the job fails. --lowvram and Forge are refused with a message that says so.
"""
import os
import shutil
import sys
import threading
import time
import types

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "fake_webui"))
import glue_harness  # noqa: E402
import models  # noqa: E402  (tests/models.py: real ldm tiny SD1)
import train_data  # noqa: E402

API = "/lora-studio/v1"


class Probe:
    """Queue listener: at each job's first training step, what the WebUI looks like from another thread."""

    def __init__(self, ns):
        self.ns = ns
        self.seen = {}    # job id -> what the first step saw
        self.hook = None  # test-specific action: fn(job, kind)

    def _lock_free(self):
        got = []

        def probe():  # another request (a generation) trying its luck
            ok = self.ns.call_queue.queue_lock.acquire(blocking=False)
            if ok:
                self.ns.call_queue.queue_lock.release()
            got.append(ok)

        t = threading.Thread(target=probe)
        t.start()
        t.join(5)
        return got[0]

    def __call__(self, job, kind):
        if self.hook is not None:
            self.hook(job, kind)
        if kind == "step" and job.id not in self.seen:
            st = self.ns.shared.state
            self.seen[job.id] = dict(
                lock_free=self._lock_free(), state_calls=list(st.calls), state_job=st.job,
                textinfo=st.textinfo, job_count=st.job_count, hijack=list(self.ns.sd_hijack.calls),
                current_task=self.ns.progress.current_task)


@pytest.fixture(scope="module")
def webui(tmp_path_factory):
    app = FastAPI()
    with glue_harness.started_webui(tmp_path_factory.mktemp("webui-data"), lambda: models.make_sd1(seed=0),
                                    app=app) as ns:
        from modules import call_queue, lowvram, progress, sd_hijack
        ns.call_queue, ns.lowvram, ns.progress, ns.sd_hijack = call_queue, lowvram, progress, sd_hijack
        ns.client = TestClient(app)
        ns.studio = ns.session.studio  # created by app_started (it mounted the routes)
        ns.backend = ns.studio.backend
        ns.root = tmp_path_factory.mktemp("training")
        ns.train_dir, _ = train_data.make_dataset(str(ns.root / "ds"), n_concept=2, repeats=1)
        ns.prompts = str(ns.root / "prompts.txt")
        with open(ns.prompts, "w", encoding="utf-8") as f:
            f.write("svs cat --w 64 --h 64 --s 2 --d 3\n")
        ns.probe = Probe(ns)
        ns.backend.queue.subscribe(ns.probe)
        ns.before = models.model_state_hash(ns.model)
        yield ns


@pytest.fixture()
def fresh(webui):
    """Empty call records; the attention optimization back to none."""
    ns = webui
    ns.shared.state.calls.clear()
    ns.progress.calls.clear()
    ns.sd_hijack.calls.clear()
    ns.lowvram.calls.clear()
    ns.probe.hook = None
    ns.sd_hijack.model_hijack.optimization_method = None
    from modules import sd_samplers
    sd_samplers.autocorrected.clear()
    yield ns
    ns.probe.hook = None


@pytest.fixture()
def rendered(webui, monkeypatch):
    """Every processing.process_images call (the p it got), and a switch to make it fail."""
    ns = webui
    calls, fail = [], []
    real = ns.processing.process_images

    tqdm_open = []  # (whether A1111's console bar was counting after each picture)

    def process_images(p, *args, **kw):
        calls.append(dict(p=p, lock_free=ns.probe._lock_free(), conds=list(p.cached_c) + list(p.cached_uc)))
        if fail:
            raise RuntimeError(fail[0])
        res = real(p, *args, **kw)
        tqdm_open.append(ns.shared.total_tqdm.open)
        return res

    monkeypatch.setattr(ns.processing, "process_images", process_images)
    return types.SimpleNamespace(calls=calls, fail=fail, tqdm_open=tqdm_open)


def config(ns, name, **kw):
    cfg = {"train_data_dir": ns.train_dir, "resolution": "64", "train_batch_size": 1, "max_train_epochs": 1,
           "network_dim": 2, "network_alpha": 2.0, "unet_lr": 1e-3, "text_encoder_lr": 0.0,
           "optimizer_type": "AdamW", "output_dir": str(ns.root / "out" / name), "output_name": name, "seed": 1}
    cfg.update(kw)
    return cfg


def wait_for(cond, timeout=60.0, what="condition"):
    end = time.time() + timeout
    while time.time() < end:
        if cond():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def finished(ns, job_id, task=None):
    """The job once it has ended; with a task id, also once the progress bar was told (that comes last)."""
    wait_for(lambda: ns.backend.job(job_id)["status"] in ("done", "failed", "cancelled"), what="the job")
    if task:
        wait_for(lambda: ("finish_task", task) in ns.progress.calls, 5, "finish_task")
    return ns.backend.job(job_id)


def assert_webui_left_clean(ns):
    assert ns.call_queue.queue_lock.acquire(blocking=False), "queue_lock still held after the job"
    ns.call_queue.queue_lock.release()
    assert ns.shared.state.calls == [("begin", "lora-studio"), ("end", "lora-studio")]
    assert ns.shared.state.interrupted is False
    assert models.model_state_hash(ns.model) == ns.before, "the WebUI's model changed"


# ------------------------------------------------------------------------------------------------ jobs

def test_tab_job_trains_under_the_webui_lock_with_progress_and_samples(fresh, rendered, monkeypatch):
    ns = fresh
    from lib_lora.host.webui import builtin_networks
    listed = []  # (the built-in's list, which /sdapi/v1/loras and its card page read, is renewed after the job)
    monkeypatch.setattr(builtin_networks(), "list_available_networks", lambda: listed.append(1), raising=False)
    ns.sd_hijack.model_hijack.optimization_method = "Doggettx"  # class-replaced attention without backward
    lora_sub = os.path.join(ns.shared.cmd_opts.lora_dir, "studio-glue")  # (a subfolder the card pages scan)
    monkeypatch.delitem(ns.shared.opts.data, "CLIP_stop_at_last_layers")  # (a config.json without it)
    job = ns.backend.submit(config(ns, "tabjob", sample_every_n_epochs=1, sample_prompts=ns.prompts,
                                   output_dir=lora_sub, sample_sampler="k_euler_a", clip_skip=2), name="tabjob",
                            task_id="task(tab1)")
    job = finished(ns, job["id"], task="task(tab1)")
    assert job["status"] == "done", job
    assert os.path.basename(job["files"][-1]) == "tabjob.safetensors" and os.path.exists(job["files"][-1])
    # while it trained: the lock was held, the job begun, the progress bar ours, the attention stock
    seen = ns.probe.seen[job["id"]]
    assert seen["lock_free"] is False
    assert seen["state_calls"] == [("begin", "lora-studio")] and seen["state_job"] == "lora-studio"
    assert seen["current_task"] == "task(tab1)"
    assert seen["textinfo"].startswith("LoRA Studio: tabjob step 1/") and seen["job_count"] == job["total"]
    assert seen["hijack"] == ["undo"]
    # afterwards: everything given back
    assert ns.sd_hijack.calls == ["undo", "apply"]
    assert ns.progress.calls == [("add_task_to_queue", "task(tab1)"), ("start_task", "task(tab1)"),
                                 ("finish_task", "task(tab1)")]
    assert ns.progress.current_task is None and "task(tab1)" in ns.progress.finished_tasks
    assert_webui_left_clean(ns)
    # samples: the WebUI's own sampler, extra networks off (the LoRA is attached already), into the WebUI's
    # image folder under the same subfolder (a samples/ folder beside the LoRAs would be a folder button on the
    # card pages)
    from modules import paths_internal
    assert [s["epoch"] for s in job["samples"]] == [1]
    path = job["samples"][0]["path"]
    assert os.path.dirname(path) == os.path.join(paths_internal.data_path, "outputs", "lora-studio", "samples",
                                                 "studio-glue", "tabjob") and os.path.exists(path)
    assert not [d for d in os.listdir(lora_sub) if os.path.isdir(os.path.join(lora_sub, d))]
    r = ns.client.get(f"{API}/jobs/{job['id']}/files/{os.path.basename(path)}")  # the API serves it from there
    assert r.status_code == 200 and r.content == open(path, "rb").read(), r.text
    assert len(rendered.calls) == 1
    p = rendered.calls[0]["p"]
    assert p.disable_extra_networks is True and p.prompt == "svs cat" and p.seed == 3 and p.steps == 2
    assert (p.width, p.height) == (64, 64) and p.sd_model is ns.model and p.closed
    # sample_sampler picks A1111's sampler of that name; with the scheduler set A1111 has nothing to correct
    from modules import sd_samplers
    assert (p.sampler_name, p.scheduler) == ("Euler a", "Automatic") and sd_samplers.autocorrected == []
    assert p.override_settings == {"CLIP_stop_at_last_layers": 2}  # (the run's clip_skip, as sd-scripts samples)
    # A1111 leaves an option that was not in config.json at the picture's value: it is put back as it was
    assert "CLIP_stop_at_last_layers" not in ns.shared.opts.data and ns.shared.opts.CLIP_stop_at_last_layers == 1
    assert rendered.tqdm_open == [True] and ns.shared.total_tqdm.open is False
    from PIL import Image
    with Image.open(path) as im:  # (A1111's infotext kept: PNG Info reads the sample's settings)
        # (with the tag of the file saved with those weights: PNG Info -> txt2img renders the sample again)
        assert im.info["parameters"].startswith("svs cat <lora:tabjob:1>\nSteps: 2, Sampler: Euler a, "
                                                "Schedule type: Automatic")
    assert rendered.calls[0]["lock_free"] is False  # still inside the job
    assert listed == [1]
    # the card picture of the LoRA is its sample
    assert os.path.exists(job["files"][-1][: -len(".safetensors")] + ".preview.png")


def test_samples_and_grids_follow_the_webui_image_folder_setting(webui):
    from lib_lora.host.webui import images_dir
    opts = webui.shared.opts
    try:
        opts.data["outdir_txt2img_samples"] = str(webui.root / "imgs" / "txt2img-images")
        assert images_dir() == str(webui.root / "imgs" / "lora-studio")
        opts.data["outdir_txt2img_samples"] = os.path.join("outputs", "txt2img-images")  # (A1111's default form)
        assert images_dir() == os.path.join(os.getcwd(), "outputs", "lora-studio")
        opts.data["outdir_samples"] = str(webui.root / "all")  # Settings -> Paths: one folder for all images
        assert images_dir() == str(webui.root / "all" / "lora-studio")
        lora = webui.shared.cmd_opts.lora_dir
        images = webui.root / "all" / "lora-studio"
        assert webui.backend.samples_dir(lora, "svs") == str(images / "samples" / "svs")
        assert webui.backend.samples_dir(os.path.join(lora, "chars", "a"), "svs") == str(
            images / "samples" / "chars" / "a" / "svs")
        assert webui.backend.grids_dir(os.path.join(lora, "svs.safetensors")) == str(images / "grids")
        assert webui.backend.grids_dir(os.path.join(lora, "chars", "svs.safetensors")) == str(images / "grids" /
                                                                                             "chars")
        # a folder the card pages do not scan keeps them beside the LoRAs, as sd-scripts does
        assert webui.backend.samples_dir("/data/loras", "svs") == os.path.join("/data/loras", "samples")
        assert webui.backend.grids_dir("/data/loras/svs.safetensors") == os.path.join("/data/loras", "grids")
        assert webui.backend.samples_dir(lora + "-other", "svs") == os.path.join(lora + "-other", "samples")
    finally:
        opts.data.pop("outdir_txt2img_samples", None)
        opts.data.pop("outdir_samples", None)


def test_loras_outside_the_lora_folders_are_said_and_get_no_tag_txt2img_cannot_find(webui):
    from lib_lora.ui.backend import UiError
    lora = webui.shared.cmd_opts.lora_dir
    b = webui.backend
    assert b.lora_folder_note(lora) is None and b.lora_folder_note(os.path.join(lora, "chars")) is None
    assert b.lora_tag(os.path.join(lora, "chars", "svs-000002.safetensors"), 0.8) == "<lora:svs-000002:0.8>"
    note = b.lora_folder_note("/data/loras")
    assert note == (f"/data/loras is outside the WebUI's LoRA folder ({lora}): LoRAs saved there get no cards, and "
                    "<lora:…> tags do not find them until they are copied there")
    with pytest.raises(UiError, match=r"svs\.safetensors: /data/loras is outside the WebUI's LoRA folder .* Copy it "
                                      r"there, then use <lora:svs:0\.5>"):
        b.lora_tag("/data/loras/svs.safetensors", 0.5)


def test_api_job_trains_and_leaves_attention_alone(fresh, rendered):
    ns = fresh
    ns.sd_hijack.model_hijack.optimization_method = "sdp-no-mem"  # supports backward: left in place
    ns.shared.opts.set("lora_studio_api_roots", str(ns.root))
    r = ns.client.get(f"{API}/model")
    assert r.status_code == 200 and r.json()["name"] == "tiny-sd1-s0", r.text
    r = ns.client.post(f"{API}/jobs", json=config(ns, "apijob"))
    assert r.status_code == 201, r.text
    outside = f"{ns.root / 'out' / 'apijob'} is outside the WebUI's LoRA folder"  # (as the Train tab warns)
    assert any(n.startswith(outside) for n in r.json()["notes"]), r.json()["notes"]
    job_id = r.json()["id"]
    wait_for(lambda: ns.client.get(f"{API}/jobs/{job_id}").json()["status"] in ("done", "failed"), what="API job")
    job = ns.client.get(f"{API}/jobs/{job_id}").json()
    assert job["status"] == "done", job
    assert job["model"]["name"] == "tiny-sd1-s0"
    # its notes say the files get no cards there, not what "the cards" add
    assert any(n.startswith(outside) for n in job["notes"]) and not any("the cards of" in n for n in job["notes"])
    assert any(n.startswith("once copied to the LoRA folder") for n in job["notes"]), job["notes"]
    files = ns.client.get(f"{API}/jobs/{job_id}/files").json()
    assert "apijob.safetensors" in str(files)
    seen = ns.probe.seen[job_id]
    assert seen["lock_free"] is False and seen["state_calls"] == [("begin", "lora-studio")]
    assert seen["hijack"] == [] and ns.sd_hijack.calls == []
    assert ns.progress.calls == []  # no task id: no progress bar to drive
    assert rendered.calls == []     # no samples asked for
    assert_webui_left_clean(ns)


def test_the_sample_prompts_notes_reach_the_job_and_dpmsolver_renders_as_dpmpp_2m(fresh, rendered):
    """The prompt file's notes (an option sd-scripts ignores, a sampler that is another algorithm in sd-scripts)
    were only printed by the CLI: a job from the tab or the API said nothing."""
    ns = fresh
    ns.sd_hijack.model_hijack.optimization_method = "Doggettx"
    prompts = str(ns.root / "prompts-notes.txt")
    with open(prompts, "w", encoding="utf-8") as f:
        f.write("svs cat --w 64 --h 64 --s 2 --d 3 --zz 1\n")
    job = ns.backend.submit(config(ns, "notejob", sample_every_n_epochs=1, sample_prompts=prompts,
                                   sample_sampler="dpmsolver++"), name="notejob", task_id="task(note)")
    job = finished(ns, job["id"], task="task(note)")
    assert job["status"] == "done", job
    assert any("unknown option --zz ignored" in n for n in job["notes"]), job["notes"]
    assert any("'dpmsolver++' (diffusers' DPM-Solver++ in sd-scripts) renders with A1111's DPM++ 2M Karras" in n
               for n in job["notes"]), job["notes"]
    assert (rendered.calls[0]["p"].sampler_name, rendered.calls[0]["p"].scheduler) == ("DPM++ 2M", "Automatic")
    assert_webui_left_clean(ns)


def test_a_failing_sampler_costs_the_samples_only_and_everything_is_given_back(fresh, rendered, capsys):
    """A sample set that failed (a size the model cannot take, memory running out there) failed the job: with one
    epoch, nothing was saved. Now it is a note and the run goes on."""
    ns = fresh
    ns.sd_hijack.model_hijack.optimization_method = "Doggettx"
    rendered.fail.append("sampler exploded")
    job = ns.backend.submit(config(ns, "failjob", sample_every_n_epochs=1, sample_prompts=ns.prompts),
                            name="failjob", task_id="task(fail)")
    job = finished(ns, job["id"], task="task(fail)")
    assert job["status"] == "done" and os.path.exists(job["files"][-1]) and not job["samples"], job
    said = [n for n in job["notes"] if "sample images of epoch 1 failed" in n]
    assert said and "RuntimeError: sampler exploded" in said[0] and "training goes on" in said[0], job["notes"]
    assert "LoRA Studio: job 'failjob': the sample images of epoch 1 failed" in capsys.readouterr().out
    assert ns.probe.seen[job["id"]]["lock_free"] is False
    assert ns.sd_hijack.calls == ["undo", "apply"]
    assert ("start_task", "task(fail)") in ns.progress.calls
    assert_webui_left_clean(ns)


def test_dataset_folder_vanishing_mid_job(fresh, tmp_path):
    ns = fresh
    train_dir, _ = train_data.make_dataset(str(tmp_path / "gone"), n_concept=3, repeats=1)

    def vanish(job, kind):
        if job.name == "gonejob" and kind == "cache" and "latents 0/" not in job.message and os.path.isdir(train_dir):
            shutil.rmtree(train_dir)  # after the first image was read, inside the job

    ns.probe.hook = vanish
    job = ns.backend.submit(config(ns, "gonejob", train_data_dir=train_dir), name="gonejob")
    job = finished(ns, job["id"])
    assert job["status"] == "failed", job
    assert not os.path.exists(train_dir) and "1_svs cat" in job["error"]  # names the missing file
    assert_webui_left_clean(ns)


def test_interrupt_button_cancels_and_is_not_left_set(fresh):
    ns = fresh

    def interrupt(job, kind):
        if job.name == "stopjob" and kind == "step":
            ns.shared.state.interrupt()

    ns.probe.hook = interrupt
    job = ns.backend.submit(config(ns, "stopjob", max_train_epochs=3), name="stopjob")
    job = finished(ns, job["id"])
    assert job["status"] == "cancelled" and job["step"] < job["total"], job
    assert_webui_left_clean(ns)  # interrupted is cleared again for the next job


def test_a_final_lora_waiting_for_disk_room_gives_the_model_back_meanwhile(fresh, monkeypatch):
    """The disk is full when the job ends: while it waits for room the WebUI's queue lock is free and its model as
    it was (a generation can run), and that generation's Interrupt does not cancel the waiting job."""
    import errno

    import lib_lora.train.trainer as trainer_mod
    from lib_lora.formats.errors import LoraFileError
    ns = fresh
    monkeypatch.setattr(trainer_mod.Trainer, "final_save_retry_s", 0.01)
    real, seen = trainer_mod.save_lora, []

    def save_lora(path, *a, **k):
        if os.path.basename(path) == "fulljob.safetensors" and len(seen) < 3:
            if seen:  # waiting: what a generation started now would find
                seen.append((ns.probe._lock_free(), models.model_state_hash(ns.model) == ns.before,
                             ns.shared.state.calls[-1]))
                ns.shared.state.interrupt()  # (that generation's Interrupt button)
            else:
                seen.append("first try")
            raise LoraFileError("the disk is full: could not write fulljob.safetensors", path) from OSError(
                errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(path, *a, **k)

    monkeypatch.setattr(trainer_mod, "save_lora", save_lora)
    job = ns.backend.submit(config(ns, "fulljob"), name="fulljob")
    job = finished(ns, job["id"])
    assert job["status"] == "done" and job["files"][-1].endswith("fulljob.safetensors"), job
    assert seen[1:] == [(True, True, ("end", "lora-studio"))] * 2, seen
    assert any("The model is given back meanwhile: image generation goes on" in n for n in job["notes"]), job["notes"]
    ns.shared.state.interrupted = False  # (the generation's own begin() clears it in A1111)
    assert_webui_left_clean(ns)


# ------------------------------------------------------------------------------------------------ the host

@pytest.mark.parametrize("method, undone", [("Doggettx", True), ("sub-quadratic", True), ("V1", True),
                                            ("sdp", False), ("sdp-no-mem", False), ("xformers", False),
                                            (None, False)])
def test_training_context_swaps_only_untrainable_attention(fresh, method, undone):
    from lib_lora.host.webui_train import WebUIHost
    ns = fresh
    ns.sd_hijack.model_hijack.optimization_method = method
    host = WebUIHost(ns.session)
    with host.lock():  # generation, tab sampling: the attention stays as it is
        assert ns.sd_hijack.calls == []
    with host.for_job("j1").lock():
        assert ns.sd_hijack.calls == (["undo"] if undone else [])
    assert ns.sd_hijack.calls == (["undo", "apply"] if undone else [])
    assert ns.lowvram.calls == []


def test_medvram_moves_the_model_in_and_out_of_the_tracker(fresh, monkeypatch):
    from lib_lora.host.webui_train import WebUIHost
    ns = fresh
    monkeypatch.setattr(ns.model, "lowvram", True)  # --medvram: sd_models set it at load
    ns.lowvram.module_in_gpu = ns.model.first_stage_model
    host = WebUIHost(ns.session).for_job("j2")
    with host.lock():
        assert ns.lowvram.calls == ["send_everything_to_cpu"] and ns.lowvram.module_in_gpu is None
    assert ns.lowvram.calls == ["send_everything_to_cpu"] * 2
    assert models.model_state_hash(ns.model) == ns.before


@pytest.mark.parametrize("choice, fast, capture", [("fast + CUDA graphs", True, True), ("fast", True, False),
                                                    ("plain", False, False)])
def test_speed_settings_reach_the_trainer_unless_the_config_says(fresh, monkeypatch, choice, fast, capture):
    from lib_lora.train.config import parse_train_config
    from lib_lora.train.fastpath import FastPath
    from lib_lora.host.webui_train import WebUIHost
    ns = fresh
    monkeypatch.delenv("LORA_STUDIO_FAST_PATH", raising=False)
    assert "lora_studio_train_speed" in ns.shared.opts.data_labels
    ns.shared.opts.set("lora_studio_train_speed", choice)
    ns.shared.opts.set("lora_studio_torch_compile", True)
    try:
        host = WebUIHost(ns.session)
        got = FastPath.resolve(None, parse_train_config({}), host)
        assert (got.enabled, got.capture) == (fast, capture) and got.source == "host"
        # a config that sets the keys wins over the setting
        got = FastPath.resolve(None, parse_train_config({"fast_path": True, "cuda_graphs": True}), host)
        assert (got.enabled, got.capture, got.source) == (True, True, "config")
        assert host.torch_compile is True and host.graph_blockers == []
        monkeypatch.setattr(ns.model, "lowvram", True)  # --medvram
        assert "--medvram" in host.graph_blockers[0]
    finally:
        ns.shared.opts.set("lora_studio_train_speed", "fast + CUDA graphs")
        ns.shared.opts.set("lora_studio_torch_compile", False)


def test_a_checkpoint_picked_while_a_job_samples_does_not_load_into_it(fresh, rendered):
    """From a host-safety review in the real WebUI: A1111's process_images reloads the checkpoint whenever the
    setting differs from the loaded model, so a checkpoint picked while a job made samples loaded into the model
    being trained (the job failed; with fp8_base the new checkpoint was left with the old one's weights). Our
    samples and grids now leave the reload to A1111's own queued load after the job."""
    ns = fresh
    from modules import sd_models
    kept = {k: v.clone() for k, v in ns.model.state_dict().items()}
    other = {k: v + 1.0 for k, v in kept.items() if v.is_floating_point()}
    sd_models.model_data.chosen = other
    try:
        job = ns.backend.submit(config(ns, "picked", sample_every_n_epochs=1, sample_prompts=ns.prompts),
                                name="picked")
        job = finished(ns, job["id"])
        assert job["status"] == "done" and job["samples"], job
        assert len(rendered.calls) == 1
        assert_webui_left_clean(ns)
        ns.backend.generate("a cat", 1, 7, 64, 64, steps=2)  # (the tab's generation: the same)
        assert models.model_state_hash(ns.model) == ns.before
        real = sd_models.reload_model_weights
        ns.processing.process_images(ns.processing.StableDiffusionProcessingTxt2Img(prompt="x"))
        assert sd_models.reload_model_weights is real  # (given back: A1111's own generation still reloads)
        assert models.model_state_hash(ns.model) != ns.before
    finally:
        sd_models.model_data.chosen = None
        ns.model.load_state_dict(kept)
    assert models.model_state_hash(ns.model) == ns.before


def _builtin_image(ns, name, layer):
    """A txt2img with the built-in Lora owning <lora:> (take-over off): it merges lazily in the patched forward."""
    import torch
    p = ns.processing.StableDiffusionProcessingTxt2Img(prompt=f"<lora:{name}:1>" if name else "")
    p.scripts = ns.scripts.scripts_txt2img
    def sample(p):
        with torch.no_grad():
            layer(torch.randn(1, layer.in_features))
    ns.processing.process_images(p, sample=sample)


@pytest.mark.parametrize("fp8", [False, True])
def test_a_builtin_lora_left_merged_is_neither_trained_on_nor_kept(fresh, fp8):
    """From the real WebUI (SD1/SD2/SDXL): A1111's built-in Lora keeps its last <lora:> merged until a layer's next
    forward. A job right after such an image trained on top of it (take-over off: a different file, no note), and
    with take-over switched on in between, an fp8_base job left it merged for good (its FP8 swap put back the
    merged weights after the built-in's lazy restore had run on the FP8 copy). Jobs now start from the clean model."""
    import network
    import torch
    ns = fresh
    unet = ns.model.model.diffusion_model
    layer = unet.input_blocks[1][1].transformer_blocks[0].attn1.to_q  # a layer both LoRAs reach
    net = network.Network("builtin_xx")
    net.modules = {layer.network_layer_name: network.FixedDeltaModule(net, torch.full_like(layer.weight, 0.05))}
    ns.networks.fake_files["builtin_xx"] = net
    extra = {"fp8_base": True} if fp8 else {}
    clean = ns.backend.submit(config(ns, f"clean{fp8}", **extra), name="clean")
    clean = finished(ns, clean["id"])
    assert clean["status"] == "done", clean
    ref = ns.studio.backend.job(clean["id"])["files"][-1]
    try:
        ns.shared.opts.set("lora_studio_take_over", False)
        _builtin_image(ns, "builtin_xx", layer)
        assert models.model_state_hash(ns.model) != ns.before  # merged, as A1111 leaves it
        if fp8:  # the user switches take-over on without making an image in between
            ns.shared.opts.set("lora_studio_take_over", True)
        job = ns.backend.submit(config(ns, f"after{fp8}", **extra), name="after")
        job = finished(ns, job["id"])
        assert job["status"] == "done", job
        from safetensors.torch import load_file
        a, b = load_file(ref), load_file(job["files"][-1])
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "trained on the built-in's merge"
        assert models.model_state_hash(ns.model) == ns.before, "the built-in's LoRA was left in the model"
        _builtin_image(ns, "", layer)  # and the built-in is fine with it: an image without <lora:> stays clean
        assert models.model_state_hash(ns.model) == ns.before
        assert ns.networks.loaded_networks == []
    finally:
        ns.shared.opts.set("lora_studio_take_over", True)
        ns.networks.fake_files.pop("builtin_xx", None)


def test_the_latent_disk_cache_stays_out_of_the_lora_folder(fresh):
    """From the real WebUI: cache_latents_to_disk wrote <output_dir>/.lora-studio-cache/latents/*.safetensors,
    which in the LoRA folder A1111 lists as LoRAs (/sdapi/v1/loras) and shows as folder buttons. In the WebUI the
    cache lives beside A1111's own caches; a second job reads it; an old cache folder is pointed out."""
    from lib_lora.host.webui import data_dir
    ns = fresh
    out = os.path.join(ns.shared.cmd_opts.lora_dir, "cached")
    cache = os.path.join(data_dir(), "latents")
    job = finished(ns, ns.backend.submit(config(ns, "cached", output_dir=out, cache_latents_to_disk=True),
                                         name="cached")["id"])
    assert job["status"] == "done", job
    assert sorted(os.listdir(out)) == ["cached.json", "cached.safetensors"]  # the LoRA and its card's words
    made = {f: os.stat(os.path.join(cache, f)).st_mtime_ns for f in os.listdir(cache)}
    assert made and all(f.endswith(".safetensors") for f in made)
    os.makedirs(os.path.join(out, ".lora-studio-cache", "latents"))  # what an earlier version left there
    again = finished(ns, ns.backend.submit(config(ns, "cached", output_dir=out, cache_latents_to_disk=True),
                                           name="again")["id"])
    assert again["status"] == "done", again
    assert {f: os.stat(os.path.join(cache, f)).st_mtime_ns for f in os.listdir(cache)} == made  # read, not rewritten
    assert any(n.startswith(f"{os.path.join(out, '.lora-studio-cache')} holds latents cached by an earlier version; "
                            f"this run caches in {cache}") for n in again["notes"]), again["notes"]
    assert models.model_state_hash(ns.model) == ns.before

def test_samples_and_grids_compute_their_conditioning_afresh_and_leave_none_behind(fresh, rendered):
    """Seen in the real WebUI: A1111 caches a prompt's conditioning by its text, so every grid row after the
    first (another LoRA strength in the text encoder) and every sample set after the first reused the first
    one's, and the user's next 'svs cat' would have got the LoRA's."""
    ns = fresh
    stale = ["svs cat key", "conditioning of another text encoder"]
    ns.processing.StableDiffusionProcessing.cached_c[:] = stale
    job = ns.backend.submit(config(ns, "condjob", sample_every_n_epochs=1, sample_prompts=ns.prompts,
                                   max_train_epochs=2, save_every_n_epochs=1), name="condjob")
    job = finished(ns, job["id"])
    assert job["status"] == "done" and len(rendered.calls) == 2, job
    ns.processing.StableDiffusionProcessing.cached_uc[:] = stale
    ns.backend.render_grid(job["files"], [0.5, 1.0], [1], "svs cat", width=64, height=64, steps=1)
    assert len(rendered.calls) == 2 + 2 * 2
    assert all(c["conds"] == [None] * 4 for c in rendered.calls), [c["conds"] for c in rendered.calls]
    assert ns.processing.StableDiffusionProcessing.cached_c == [None, None]
    assert ns.processing.StableDiffusionProcessing.cached_uc == [None, None]
    assert models.model_state_hash(ns.model) == ns.before


def test_tab_generate_uses_the_webui_sampler_under_the_lock(fresh, rendered):
    ns = fresh
    images = ns.backend.generate("a cat", 2, 7, 64, 48, steps=3)
    assert [im.size for im in images] == [(64, 48)] * 2
    ps = [c["p"] for c in rendered.calls]
    assert [p.seed for p in ps] == [7, 8] and all(p.disable_extra_networks and p.closed for p in ps)
    assert all(c["lock_free"] is False for c in rendered.calls)
    # A1111's default sampler, named with its scheduler: nothing for it to autocorrect (a console warning each)
    from modules import sd_samplers
    assert {(p.sampler_name, p.scheduler) for p in ps} == {("DPM++ 2M", "Automatic")}
    assert sd_samplers.autocorrected == []
    # A1111's console bar is cleared as txt2img clears it (it counted on into the user's next image)
    assert rendered.tqdm_open == [True, True] and ns.shared.total_tqdm.open is False
    assert_webui_left_clean(ns)


# ------------------------------------------------------------------------------------------------ refused hosts

def _refused(ns, tmp_path, words):
    from lib_lora.host.webui_studio import WebUIBackend
    from lib_lora.host.webui_train import WebUIHost, WebUINotReady
    with pytest.raises(WebUINotReady, match=words):
        WebUIHost(ns.session)
    b = WebUIBackend(ns.session, str(tmp_path / "store"), str(tmp_path / "out"))
    try:
        assert b.host() is None
        info = b.model_info()
        assert info["loaded"] is False and words in info["problem"]
        job = b.submit(config(ns, "refused"), name="refused")
        wait_for(lambda: b.job(job["id"])["status"] == "failed", what="the refused job")
        assert words in b.job(job["id"])["error"]  # says why, not "no checkpoint is loaded"
    finally:
        b.stop()
    assert models.model_state_hash(ns.model) == ns.before


def test_lowvram_is_refused(fresh, monkeypatch, tmp_path, capsys):
    ns = fresh
    monkeypatch.setattr(ns.shared.cmd_opts, "lowvram", True, raising=False)
    _refused(ns, tmp_path, "--lowvram")
    lines = capsys.readouterr().out.splitlines()
    # said once, not per poll (besides the line that tells how the refused job ended)
    assert sum("--lowvram moves every UNet block" in ln for ln in lines if not ln.startswith("LoRA Studio: job ")) == 1
    assert any(ln.startswith("LoRA Studio: job 'refused' failed: ") for ln in lines)


def test_a_job_started_while_the_webui_loads_its_checkpoint_waits_for_it(fresh):
    """A1111 loads the first checkpoint in a thread after start-up; a job queued before that (a script that starts
    the WebUI and posts jobs) waits for the load, as a generation would, instead of failing. A checkpoint the user
    unloaded is not loaded again: that job says none is loaded."""
    ns = fresh
    md = ns.sd_models.model_data
    loads = []

    def slow_load():
        time.sleep(0.3)
        loads.append(1)
        return ns.model

    saved = md.sd_model, md.was_loaded_at_least_once, md.loader
    try:
        md.sd_model, md.was_loaded_at_least_once, md.loader = None, False, slow_load
        job = ns.backend.submit(config(ns, "earlyjob"), name="earlyjob")
        done = finished(ns, job["id"])
        assert done["status"] == "done", done.get("error")
        assert loads == [1] and md.sd_model is ns.model
        md.sd_model = None  # unloaded by the user (was_loaded_at_least_once stays true)
        job = ns.backend.submit(config(ns, "unloadedjob"), name="unloadedjob")
        done = finished(ns, job["id"])
        assert done["status"] == "failed" and "No checkpoint is loaded" in done["error"] and loads == [1]
    finally:
        md.sd_model, md.was_loaded_at_least_once, md.loader = saved
    assert models.model_state_hash(ns.model) == ns.before


def test_forge_is_refused(fresh, monkeypatch, tmp_path):
    ns = fresh
    monkeypatch.setitem(sys.modules, "ldm_patched", types.ModuleType("ldm_patched"))
    _refused(ns, tmp_path, "Forge")
    from lib_lora.host.session import Session
    s = Session()
    app = FastAPI()
    s.app_started(None, app)
    assert s.ui_tabs() is None
    assert not [r for r in app.router.routes if getattr(r, "path", "").startswith(API)]


# ------------------------------------------------------------------------------------------------ lifecycle

def test_ui_tabs_builds_the_tab_over_the_studio(webui):
    ns = webui
    from lib_lora.ui import tab
    registered = [c.callback for c in ns.script_callbacks.callback_map["callbacks_ui_tabs"]]
    assert ns.session.ui_tabs in registered
    (blocks, title, elem_id), = ns.session.ui_tabs()
    assert (title, elem_id) == (tab.TAB_TITLE, tab.TAB_ID) and blocks is not None
    assert ns.session.studio is ns.studio  # one Studio: the tab and the API share the queue


def test_output_folder_setting_applies_without_restart(webui, tmp_path):
    ns = webui
    assert ns.backend.default_output_dir() == ns.shared.cmd_opts.lora_dir  # default: new LoRAs become cards
    ns.shared.opts.set("lora_studio_output_dir", str(tmp_path))
    try:
        assert ns.backend.default_output_dir() == str(tmp_path)
    finally:
        ns.shared.opts.set("lora_studio_output_dir", "")


def test_a_stop_signal_lets_the_running_job_save_a_state_and_keeps_it_in_line(fresh):
    """Ctrl-C (A1111 exits at once) or SIGTERM while a job trains: our handler lets the job save a state and stay
    in the queue as interrupted, then passes the signal on; with no job running it passes it on at once."""
    import signal

    from lib_lora.host import webui_studio as ws
    ns = fresh
    passed = []
    assert ws.install_stop_handlers(ns.studio) and ws._stop_state["studio"] is ns.studio
    job = ns.backend.submit(config(ns, "sigjob", max_train_epochs=None, max_train_steps=500), name="sigjob")
    wait_for(lambda: ns.backend.job(job["id"])["step"] >= 2, what="two steps")
    try:
        ws._on_stop_signal(signal.SIGTERM, None, lambda signum, frame: passed.append(signum))
        j = ns.backend.job(job["id"])
        assert j["status"] == "interrupted" and passed == [signal.SIGTERM]
        assert j["resume_state"].endswith("sigjob-cancelled-state.lsstate") and os.path.exists(j["resume_state"])
        assert "it will continue from its last saved state (sigjob-cancelled-state.lsstate, step" in j["message"]
        assert models.model_state_hash(ns.model) == ns.before
        ws._on_stop_signal(signal.SIGINT, None, lambda signum, frame: passed.append(signum))  # a second one
        assert passed == [signal.SIGTERM, signal.SIGINT]
    finally:
        ws._stop_state["stopping"] = False
        ns.backend.queue.remove(job["id"])
        ns.backend.queue.start()


def test_shutdown_stops_the_queue_thread(webui):
    ns = webui
    thread = ns.backend.queue._thread
    assert thread is not None and thread.is_alive()
    ns.session.shutdown()
    thread.join(5)
    assert not thread.is_alive()
    assert models.model_state_hash(ns.model) == ns.before


def test_a_network_that_cannot_fit_the_loaded_model_is_not_queued(fresh, tmp_path):
    """BOFT blocks that cannot split the model's layers, or a LyCORIS preset file that picks none of them: the tab
    and the HTTP API say so when the job is submitted (found on the loaded model, on the meta device), instead of
    the job failing when it starts behind the others."""
    ns = fresh
    from lib_lora.ui.backend import UiError
    before = len(ns.backend.jobs())
    boft = config(ns, "boftjob", network_module="lycoris.kohya", network_args=["algo=boft"], network_dim=4,
                  text_encoder_lr=1e-3)  # (the text encoder's 768 channels)
    with pytest.raises(UiError, match=r"The job was not queued: .*BOFT cannot split 768 output channels"):
        ns.backend.submit(boft, name="boftjob")
    oft = config(ns, "oftjob", network_module="networks.oft", network_dim=3)
    with pytest.raises(UiError, match=r"networks.oft splits the 32 output channels into network_dim = 3 blocks"):
        ns.backend.submit(oft, name="oftjob")
    (tmp_path / "none.toml").write_text('unet_target_module = ["Attention"]\nunet_target_name = []\n'
                                        'text_encoder_target_module = []\n')
    preset = config(ns, "prjob", network_module="lycoris.kohya",
                    network_args=["algo=locon", f"preset={tmp_path / 'none.toml'}"])
    with pytest.raises(UiError, match=r"none.toml picks no layer of this SD1 model"):
        ns.backend.submit(preset, name="prjob")
    ns.shared.opts.lora_studio_api_roots = str(ns.root)
    try:
        r = ns.client.post("/lora-studio/v1/jobs", json=boft)
        assert r.status_code == 422 and "BOFT cannot split" in r.json()["detail"], r.text
        r = ns.client.post("/lora-studio/v1/jobs", params={"dry_run": "true"}, json=boft)
        assert r.status_code == 422 and "BOFT cannot split" in r.json()["detail"], r.text
    finally:
        ns.shared.opts.lora_studio_api_roots = ""
    assert len(ns.backend.jobs()) == before and models.model_state_hash(ns.model) == ns.before


