"""LocalBackend over the tiny CPU SD1 model: the queue runs a real training with samples, progress hooks get the
task id, the results grid merges each file at each strength and restores the model exactly."""
import json
import os
import time

import numpy as np
import pytest
from PIL import Image

import models
from lib_lora.host.base import ModelHost
from lib_lora.train.config import TrainConfigError
from lib_lora.ui.backend import (LocalBackend, ProgressHooks, UiError, ddim_sampler, describe_file, image_size,
                                 parse_numbers, write_previews, write_sample_prompts)
from lib_lora.ui.tab import model_mismatches


class Hooks(ProgressHooks):
    def __init__(self):
        self.calls = []

    def queued(self, task, job):
        self.calls.append(("queued", task))

    def started(self, task, job):
        self.calls.append(("started", task))

    def finished(self, task, job):
        self.calls.append(("finished", task, job.status))


@pytest.fixture(scope="module")
def host():
    m = models.make_sd1(seed=3)
    info = m.sd_checkpoint_info
    return ModelHost(m, name=info.name, path=info.filename, sha256=info.sha256)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("bk")
    d = root / "img" / "2_svs bear"
    d.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return root


def _config(dataset, out, **kw):
    cfg = {"train_data_dir": str(dataset / "img"), "resolution": "64", "train_batch_size": 1, "max_train_epochs": 2,
           "network_dim": 4, "network_alpha": 4.0, "unet_lr": 1e-2, "text_encoder_lr": 0.0,
           "optimizer_type": "AdamW", "output_dir": str(out), "output_name": "bear", "save_every_n_epochs": 1,
           "seed": 5}
    cfg.update(kw)
    return cfg


@pytest.fixture(scope="module")
def trained(host, dataset, tmp_path_factory):
    store = tmp_path_factory.mktemp("store")
    hooks = Hooks()
    b = LocalBackend(host, str(store), output_dir=str(store / "Lora"), sample_steps=2, hooks=hooks)
    out = store / "Lora"
    prompts = write_sample_prompts(str(out / "samples" / "bear-prompts.txt"), "svs bear --d 3 --s 2")
    job = b.submit(_config(dataset, out, sample_every_n_epochs=1, sample_prompts=prompts), name="bear",
                   task_id="task(abc)")
    assert b.queue.wait_idle(120)
    yield b, b.job(job["id"]), hooks
    b.stop()


def test_queue_trains_with_samples_and_reports_progress(trained, host):
    b, job, hooks = trained
    assert job["status"] == "done", job
    assert [os.path.basename(f) for f in job["files"]] == ["bear-000001.safetensors", "bear.safetensors"]
    assert [(s["epoch"], os.path.basename(s["path"])) for s in job["samples"]] == [
        (1, "bear_e000001_00.png"), (2, "bear_e000002_00.png")]
    assert all(os.path.exists(s["path"]) for s in job["samples"])
    # each sample's PNG info names the file saved with its weights (PNG Info -> txt2img renders it again)
    assert [Image.open(s["path"]).text["parameters"].split("\n")[0] for s in job["samples"]] == [
        "svs bear <lora:bear-000001:1>", "svs bear <lora:bear:1>"]
    assert job["total"] == 12 and job["step"] == 12 and len(job["losses"]) == 12
    assert job["model"]["name"] == host.model_name and job["model"]["family"] == "sd1"
    assert hooks.calls == [("queued", "task(abc)"), ("started", "task(abc)"), ("finished", "task(abc)", "done")]
    assert [describe_file(f) for f in job["files"]] == ["epoch 1", "final"]
    # each file's card picture is the sample of its epoch (the final file: the last epoch's)
    for f, smp in zip(job["files"], job["samples"]):
        pic = os.path.splitext(f)[0] + ".preview.png"
        assert np.array_equal(np.asarray(Image.open(pic)), np.asarray(Image.open(smp["path"]))), pic
    # ... and its activation text the training folder's words (the '10_svs bear' folder), in the sidecar the WebUI
    # reads a card's user metadata from; a sidecar the user wrote is kept
    for f in job["files"]:
        with open(os.path.splitext(f)[0] + ".json", encoding="utf-8") as fh:
            assert json.load(fh) == {"activation text": "svs bear"}
    assert any("add 'svs bear' (its training folder's words) to the prompt" in n for n in job["notes"]), job["notes"]
    from lib_lora.ui.backend import write_card_words
    mine = os.path.splitext(job["files"][0])[0] + ".json"
    with open(mine, "w", encoding="utf-8") as fh:
        json.dump({"activation text": "mine"}, fh)
    assert write_card_words(job["files"]) is None
    with open(mine, encoding="utf-8") as fh:
        assert json.load(fh) == {"activation text": "mine"}
    # 'Use this one' adds the card's words: the user's, else the training folder's (a broken json too)
    from lib_lora.ui.backend import card_words
    assert card_words(job["files"][0]) == "mine"
    with open(mine, "w", encoding="utf-8") as fh:
        fh.write("[1, 2")
    assert card_words(job["files"][0]) == "svs bear"
    os.remove(mine)
    assert card_words(job["files"][0]) == "svs bear" and card_words(mine + ".missing") is None


def test_results_grid_merges_each_file_and_restores_the_model(trained, host):
    b, job, _ = trained
    before = models.model_state_hash(host.sd_model)
    seeds = [1, 2]
    grid = b.render_grid(job["files"], [0.0, 1.0], seeds, "svs bear", width=64, height=64, steps=2)
    assert len(grid) == 2 and all(len(row) == 2 and len(row[0]) == 2 for row in grid)
    assert grid[0][0][0].size == (64, 64)
    assert models.model_state_hash(host.sd_model) == before  # every merge undone, bit for bit
    base = ddim_sampler(host, ["svs bear"] * 2, "", seeds, 64, 64, 2, b.cfg_scale)
    assert np.array_equal(np.asarray(grid[1][0][0]), np.asarray(base[0]))   # strength 0 = the bare model
    assert not np.array_equal(np.asarray(grid[1][1][0]), np.asarray(base[0]))  # strength 1 changes the image
    again = ddim_sampler(host, ["svs bear"] * 2, "", seeds, 64, 64, 2, b.cfg_scale)
    assert np.array_equal(np.asarray(again[1]), np.asarray(base[1]))  # deterministic per seed


def test_http_grid_renders_a_jobs_files_and_sends_tagged_pictures(trained, host, monkeypatch):
    """POST /lora-studio/v1/jobs/{id}/grid: the Results tab's grid for scripts (a rented GPU, a batch of runs)."""
    import base64
    import io

    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from lib_lora.api import PREFIX, mount
    b, job, _ = trained
    root = os.path.dirname(os.path.dirname(job["files"][0]))
    app = FastAPI()
    mount(app, b.queue, allowed_roots=[root], grid=b.job_grid)
    client = TestClient(app)
    before = models.model_state_hash(host.sd_model)
    r = client.post(f"{PREFIX}/jobs/{job['id']}/grid", json={"prompt": "svs bear", "strengths": [0, 1], "seeds": [4],
                                                               "width": 64, "height": 64, "steps": 2})
    assert r.status_code == 200, r.text
    d = r.json()
    assert models.model_state_hash(host.sd_model) == before
    assert [(c["file"], c["row"], c["strength"], c["seed"], c["tag"]) for c in d["cells"]] == [
        ("bear-000001.safetensors", "epoch 1", 0, 4, "<lora:bear-000001:0>"),
        ("bear-000001.safetensors", "epoch 1", 1, 4, "<lora:bear-000001:1>"),
        ("bear.safetensors", "final (epoch 2)", 0, 4, "<lora:bear:0>"),
        ("bear.safetensors", "final (epoch 2)", 1, 4, "<lora:bear:1>")]
    pics = [Image.open(io.BytesIO(base64.b64decode(c["image"]))) for c in d["cells"]]
    assert d["cells"][3]["infotext"] == pics[3].text["parameters"]
    assert pics[3].text["parameters"].startswith("svs bear <lora:bear:1>\nSteps: 2, Sampler: DDIM")
    from safetensors import safe_open  # (the short hash A1111's built-in Lora reads: metadata sshs_model_hash)
    with safe_open(job["files"][-1], framework="pt") as f:
        assert pics[3].text["parameters"].endswith(f', Lora hashes: "bear: {f.metadata()["sshs_model_hash"][:12]}"')
    base = ddim_sampler(host, ["svs bear"], "", [4], 64, 64, 2, b.cfg_scale)[0]
    assert np.array_equal(np.asarray(pics[2].convert("RGB")), np.asarray(base))  # strength 0: the bare model
    assert not np.array_equal(np.asarray(pics[3].convert("RGB")), np.asarray(base))
    assert os.path.isfile(d["grid"]["path"]) and d["saved_in"] == os.path.dirname(d["grid"]["path"])
    assert Image.open(io.BytesIO(base64.b64decode(d["grid"]["image"]))).size[0] > 64
    # one file by name, no pictures in the answer (they are on disk)
    r = client.post(f"{PREFIX}/jobs/{job['id']}/grid", json={"prompt": "svs bear", "files": ["bear.safetensors"],
                                                               "strengths": [1], "seeds": [1], "width": 64,
                                                               "height": 64, "steps": 1, "send_images": False})
    assert r.status_code == 200 and [c["file"] for c in r.json()["cells"]] == ["bear.safetensors"]
    r2 = client.post(f"{PREFIX}/jobs/{job['id']}/grid", json={
        "prompt": "svs bear", "files": ["bear.safetensors", "bear.safetensors"], "strengths": [1, 1], "seeds": [1, 1],
        "width": 64, "height": 64, "steps": 1, "send_images": False})
    assert r2.status_code == 200 and len(r2.json()["cells"]) == 1  # (repeats are one picture)
    assert "image" not in r.json()["cells"][0] and os.path.isfile(r.json()["cells"][0]["path"])
    # what the caller can change
    url = f"{PREFIX}/jobs/{job['id']}/grid"
    for body, code, said in (({"prompt": "svs bear", "files": ["nope.safetensors"]}, 422, "saved no file named"),
                             ({"prompt": " "}, 422, "Write a prompt"),
                             ({"prompt": "svs bear", "width": 65}, 422, "not a multiple of 8"),
                             ({"prompt": "svs bear", "seeds": list(range(300))}, 422, "at most 400"),
                             ({"prompt": "svs bear", "seeds": []}, 422, "at least one"),
                             ({"prompt": "svs bear <lora:style:1>"}, 422, "applies no tag of its prompt"),
                             # (from the grid audit: each was dropped, coerced or a 500)
                             ({"prompt": "svs bear", "seed": [1]}, 422, "extra fields not permitted"),
                             ({"prompt": "svs bear", "seeds": [-1]}, 422, "greater than or equal to 0"),
                             ({"prompt": "svs bear", "seeds": [1.7]}, 422, "integer"),
                             ({"prompt": "svs bear", "steps": 0}, 422, "greater than or equal to 1"),
                             ({"prompt": "svs bear", "steps": -3}, 422, "greater than or equal to 1"),
                             ({"prompt": "svs bear", "width": 0}, 422, "greater than or equal to 64")):
        r = client.post(url, json=body)
        assert r.status_code == code and said in str(r.json()["detail"]), (body, r.text)
    assert client.post(f"{PREFIX}/jobs/nojob/grid", json={"prompt": "x"}).status_code == 404
    # two grids in the same second get folders of their own
    one = {"prompt": "svs bear", "files": ["bear.safetensors"], "strengths": [1], "seeds": [1], "width": 64,
           "height": 64, "steps": 1, "send_images": False}
    a, b2 = client.post(url, json=one).json(), client.post(url, json=one).json()
    assert a["saved_in"] != b2["saved_in"] and os.path.isfile(a["grid"]["path"])
    monkeypatch.setattr(b, "jobs", lambda: [{"name": "other", "status": "running", "step": 3, "total": 9}])
    r = client.post(url, json={"prompt": "svs bear"})
    assert r.status_code == 409 and "busy training 'other' (step 3/9)" in r.json()["detail"], r.text
    monkeypatch.setattr(b, "jobs", lambda: [{"name": "other", "status": "running", "step": 0, "total": 0}])
    assert "busy training 'other' (starting)" in client.post(url, json={"prompt": "svs bear"}).json()["detail"]
    assert models.model_state_hash(host.sd_model) == before


def test_preview_and_tag(trained, tmp_path):
    b, job, _ = trained
    final = job["files"][-1]
    assert b.lora_tag(final, 0.7) == "<lora:bear:0.7>"
    assert b.lora_tag(job["files"][0], 1.0) == "<lora:bear-000001:1>"
    p = b.save_preview(final, Image.new("RGB", (8, 8), "blue"))
    assert p == final[: -len(".safetensors")] + ".preview.png" and Image.open(p).size == (8, 8)


def test_queue_operations_and_restart(host, dataset, tmp_path):
    hooks = Hooks()
    b = LocalBackend(host, str(tmp_path / "s"), hooks=hooks, autostart=False)
    cfg = _config(dataset, tmp_path / "o")
    j1 = b.submit(cfg, name="one", task_id="t1")
    # the same files twice (a second click on Train): refused, as the HTTP API refuses it
    with pytest.raises(UiError, match=r"The job was not queued: job 'one' is queued and writes the same files "
                                      r"\(bear\*\.safetensors in .*\); give this one another output name"):
        b.submit(cfg, name="again", task_id="t0")
    j2 = b.submit({**cfg, "output_name": "bear2"}, name="two", task_id="t2")
    j3 = b.submit({**cfg, "output_name": "bear3"}, name="three", task_id="t3", front=True)
    assert [j["name"] for j in b.jobs()] == ["three", "one", "two"]
    b.move(j2["id"], -1)
    assert [j["name"] for j in b.jobs()] == ["three", "two", "one"]
    b.cancel(j3["id"])
    assert ("finished", "t3", "cancelled") in hooks.calls
    with pytest.raises(UiError, match="nothing to cancel"):
        b.cancel(j3["id"])
    with pytest.raises(UiError, match="only jobs that are still waiting"):
        b.move(j3["id"], 1)
    b.remove(j1["id"])
    assert ("finished", "t1", "queued") in hooks.calls
    with pytest.raises(UiError, match="no longer in the list"):
        b.remove(j1["id"])
    with pytest.raises(TrainConfigError, match="unknown key"):
        b.submit({**cfg, "batchsize": 2}, name="typo")
    # the queue is kept across a restart, in the same order
    b2 = LocalBackend(host, str(tmp_path / "s"), autostart=False)
    assert [(j["name"], j["status"]) for j in b2.jobs()] == [("three", "cancelled"), ("two", "queued")]


def test_a_job_records_the_checkpoint_it_trained(host, dataset, tmp_path):
    """Queued while one checkpoint was loaded, started after another was: the record named the first (the file's
    metadata had the right one)."""
    other = ModelHost(host.sd_model, name="other.safetensors", path="other.safetensors", sha256="f" * 64)
    current = [host]
    b = LocalBackend(lambda: current[0], str(tmp_path / "s"), autostart=False)
    job = b.submit(_config(dataset, tmp_path / "o", max_train_steps=1), name="switch")
    assert job["model"]["name"] == host.model_name
    current[0] = other
    b.queue.start()
    try:
        for _ in range(600):
            if b.job(job["id"])["status"] not in ("queued", "running"):
                break
            time.sleep(0.1)
    finally:
        b.stop()
    j = b.job(job["id"])
    assert j["status"] == "done" and j["model"]["name"] == "other.safetensors", j
    assert j["notes"][0] == (f"queued while {host.model_name} was loaded; trained on other.safetensors, the "
                             "checkpoint loaded when it started")


def test_model_mismatch_warning():
    jobs = [{"name": "a", "status": "queued", "model": {"name": "x.safetensors", "hash": "111"}},
            {"name": "b", "status": "done", "model": {"name": "x.safetensors", "hash": "111"}},
            {"name": "c", "status": "queued", "model": {"name": "y.safetensors", "hash": "222"}}]
    warn = model_mismatches({"loaded": True, "name": "y.safetensors", "hash": "222"}, jobs)
    assert len(warn) == 1 and "'a'" in warn[0] and "x.safetensors" in warn[0]


def test_number_lists(tmp_path):
    assert parse_numbers("0.5, 0.7 1") == [0.5, 0.7, 1.0]
    assert parse_numbers("1,2,3", int) == [1, 2, 3]
    with pytest.raises(UiError, match="'x' in the seeds is not a whole number"):
        parse_numbers("1, x", int, "seeds")
    with pytest.raises(UiError, match="'1.5' in the seeds is not a whole number"):  # (it was rendered as seed 1)
        parse_numbers("1.5", int, "seeds")
    with pytest.raises(UiError, match="'nan' in the strengths is not a number"):
        parse_numbers("0.5, nan", float, "strengths")


def test_sizes_the_model_cannot_make_are_refused_with_the_sizes_it_can():
    assert image_size(64, 512) == (64, 512) and image_size(None, "") == (512, 512)
    with pytest.raises(UiError, match="Width 65 is not a multiple of 8, which the model needs: use 64 or 72"):
        image_size(65, 64)
    with pytest.raises(UiError, match="Height 32 is too small: use at least 64"):
        image_size(64, 32)


def test_generation_stops_between_batches_when_asked(host, tmp_path):
    """Stop in the regularisation sub-tab: the batch under way finishes, no further batch starts."""
    calls = []

    def sampler(h, prompts, negative, seeds, w, h_, steps, cfg):
        calls.append(list(seeds))
        return [Image.new("RGB", (w, h_)) for _ in seeds]

    b = LocalBackend(host, str(tmp_path / "s"), sampler=sampler, autostart=False)
    got = []
    out = b.generate("a bear", 10, 5, 64, 64, on_image=lambda i, n, img: got.append(i),
                     should_stop=lambda: len(got) >= 3)
    assert calls == [[5, 6, 7, 8]] and len(out) == 4 and got == [1, 2, 3, 4]
    assert len(b.generate("a bear", 10, 5, 64, 64)) == 10


def test_no_model_loaded_is_said_plainly(tmp_path):
    b = LocalBackend(lambda: None, str(tmp_path / "s"), autostart=False)
    assert b.model_info()["loaded"] is False
    with pytest.raises(UiError, match="No checkpoint is loaded"):
        b.generate("a bear", 1, 0, 64, 64)
    with pytest.raises(UiError, match="BLIP is not available"):
        b.interrogate(Image.new("RGB", (8, 8)), "blip")


def test_an_output_folder_that_cannot_be_written_is_refused_when_queued(host, dataset, tmp_path, monkeypatch):
    """A file where the folder should be, or a folder that cannot be written (read-only disk, permissions): the
    job is not queued, instead of training to its end and then failing to save."""
    import lib_lora.train.saving as saving

    b = LocalBackend(host, str(tmp_path / "store"), autostart=False)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UiError, match=r"The job was not queued: The output folder .*afile is a file, not a folder"):
        b.submit(_config(dataset, tmp_path / "afile"))
    with pytest.raises(UiError, match=r"cannot be made: .*afile is a file"):
        b.submit(_config(dataset, tmp_path / "afile" / "sub"))
    monkeypatch.setattr(saving.os, "access", lambda *a, **k: False)  # (tests run as root: permissions do not bite)
    monkeypatch.setattr(saving, "_read_only", lambda p: True)
    with pytest.raises(UiError, match=r"cannot be written to \(read-only disk\): choose a folder you can write to"):
        b.submit(_config(dataset, tmp_path / "new" / "deep"))
    assert b.jobs() == [] and not (tmp_path / "new").exists()


def test_card_pictures_come_from_the_samples_and_never_replace_one(tmp_path):
    pics = {}
    for name, color in (("e1", (255, 0, 0)), ("e2", (0, 255, 0)), ("s8", (0, 0, 255))):
        pics[name] = str(tmp_path / f"{name}.png")
        Image.new("RGB", (8, 8), color).save(pics[name])
    samples = [{"epoch": 1, "step": 4, "path": pics["e1"]}, {"epoch": 2, "step": 8, "path": pics["s8"]},
               {"epoch": 2, "step": 8, "path": pics["e2"]}]
    files = [str(tmp_path / n) for n in ("x-000001.safetensors", "x-step00000008.safetensors", "x.safetensors",
                                          "mine.safetensors")]
    Image.new("RGB", (8, 8), (9, 9, 9)).save(tmp_path / "mine.preview.png")
    assert [os.path.basename(p) for p in write_previews(files, samples)] == [
        "x-000001.preview.png", "x-step00000008.preview.png", "x.preview.png"]
    color = lambda n: Image.open(tmp_path / n).getpixel((0, 0))  # noqa: E731
    assert color("x-000001.preview.png") == (255, 0, 0) and color("x-step00000008.preview.png") == (0, 0, 255)
    assert color("x.preview.png") == (0, 0, 255)  # (the first image of the last sampled epoch)
    assert color("mine.preview.png") == (9, 9, 9)  # (a picture the user set is kept)
    assert write_previews(files, []) == []


def test_results_grid_stops_between_rows_and_restores_the_model(trained, host):
    from lib_lora.ui.backend import GridStopped
    b, job, _ = trained
    before = models.model_state_hash(host.sd_model)
    rows = []
    with pytest.raises(GridStopped, match=r"Stopped after 1 of 4 row\(s\); nothing was saved") as e:
        b.render_grid(job["files"], [0.5, 1.0], [1], "svs bear", width=64, height=64, steps=1,
                      progress=lambda d, t: rows.append(d), should_stop=lambda: len(rows) >= 1)
    assert rows == [1] and e.value.images == [] and models.model_state_hash(host.sd_model) == before
    # stopped after the first file's rows: that file's images come with the stop
    rows.clear()
    with pytest.raises(GridStopped, match=r"Stopped after 2 of 4 row\(s\); the 1 file\(s\) rendered in full") as e:
        b.render_grid(job["files"], [0.5, 1.0], [1], "svs bear", width=64, height=64, steps=1,
                      progress=lambda d, t: rows.append(d), should_stop=lambda: len(rows) >= 2)
    assert len(e.value.images) == 1 and len(e.value.images[0]) == 2 and e.value.images[0][0][0].size == (64, 64)
    assert models.model_state_hash(host.sd_model) == before


def test_a_job_cut_off_by_a_restart_trains_on_from_its_newest_state_to_the_same_weights(host, dataset, tmp_path):
    """The WebUI dies after the step-4 save of a save_state run: after the restart the job continues from that
    state (not from step 1) and ends with the weights of the run that was never cut off."""
    import shutil
    import threading

    from lib_lora.formats.safetensors_io import load_tensors
    from lib_lora.jobs.queue import INTERRUPTED

    cfg = _config(dataset, tmp_path / "out", max_train_epochs=None, max_train_steps=8, save_every_n_epochs=None,
                  save_every_n_steps=4, save_state=True)
    store, copy = tmp_path / "s", tmp_path / "restarted"
    b = LocalBackend(host, str(store))
    copied = threading.Event()

    def snapshot(job, kind):  # the queue file as a WebUI killed at step 5 would have left it
        if kind == "step" and job.step == 5 and not copied.is_set():
            copy.mkdir()
            shutil.copy(store / "queue.json", copy / "queue.json")
            copied.set()

    b.queue.subscribe(snapshot)
    job = b.submit(cfg, name="cut")
    assert b.queue.wait_idle(120)
    b.stop()
    whole = load_tensors(b.job(job["id"])["files"][-1])
    assert copied.is_set() and b.job(job["id"])["status"] == "done"

    b2 = LocalBackend(host, str(copy), autostart=False)
    j = b2.job(job["id"])
    assert j["status"] == INTERRUPTED and "continue from its last saved state (bear-step00000004-state.lsstate, " \
                                          "step 4)" in j["message"]
    steps = []
    b2.queue.subscribe(lambda jb, kind: kind == "step" and steps.append(jb.step))
    b2.queue.start()
    assert b2.queue.wait_idle(120)
    b2.stop()
    j = b2.job(job["id"])
    assert j["status"] == "done", j
    assert steps == [5, 6, 7, 8]  # on from the state, not from step 1
    assert [p[0] for p in j["losses"]] == list(range(1, 9))
    again = load_tensors(j["files"][-1])
    for k in whole:
        np.testing.assert_allclose(again[k].numpy(), whole[k].numpy(), rtol=0, atol=1e-6, err_msg=k)
