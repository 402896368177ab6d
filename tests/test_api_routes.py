"""HTTP API (/lora-studio/v1): submit/validate, path policy, auth, disabled access, queue control, downloads."""

import json
import math
import os
import re
import threading
import tomllib

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from lib_lora.api import DISABLED_MESSAGE, PREFIX, mount
from lib_lora.jobs.queue import JobQueue
from lib_lora.train.config import parse_train_config
from lib_lora.train.trainer import TrainEvent, TrainResult

SETTING = "Settings > LoRA Studio > API folders (lora_studio_api_roots)"

from seed_config import SEED_TOML  # noqa: E402  (tests/data/seed_config.toml)

MODEL = {"name": "v1-5-pruned", "hash": "6ce0161689", "family": "sd1", "parameterization": "eps"}


def fake_runner(gate=None, nan_at=None):
    """Emits TrainEvent-like progress, writes one dummy LoRA + one sample into output_dir, honours cancel."""
    def run(job, emit, should_cancel):
        cfg = parse_train_config(job.config)
        out = cfg.output_dir
        assert os.path.isabs(out), "the API stores checked absolute paths"
        os.makedirs(out, exist_ok=True)
        emit(TrainEvent("start", total=4, epochs=2, message="training"))
        for step in range(1, 5):
            if gate is not None:
                gate.wait(5)
            if should_cancel():
                return TrainResult("cancelled", [], None, step, [], ["cancelled at step %d" % step])
            loss = float("nan") if step == nan_at else 1.0 / step
            emit(TrainEvent("step", step=step, total=4, epoch=1 + (step > 2), epochs=2, loss=loss, avg_loss=loss,
                            lr=1e-4, eta_s=float(4 - step)))
        sample = os.path.join(out, "sample", f"{cfg.output_name}_e2.png")
        os.makedirs(os.path.dirname(sample), exist_ok=True)
        with open(sample, "wb") as f:
            f.write(b"\x89PNG fake")
        emit(TrainEvent("sample", step=4, epoch=2, path=sample))
        path = os.path.join(out, f"{cfg.output_name}.safetensors")
        with open(path, "wb") as f:
            f.write(b"dummy lora bytes")
        emit(TrainEvent("save", step=4, total=4, epoch=2, epochs=2, path=path, message="saved"))
        return TrainResult("done", [path], path, 4, [], ["trained 4 steps"])
    return run


@pytest.fixture
def env(tmp_path):
    root = tmp_path / "root"
    (root / "training_data" / "10_cat").mkdir(parents=True)
    from PIL import Image  # (a job is queued only when the dataset plan finds images)
    Image.new("RGB", (64, 64), (120, 60, 30)).save(root / "training_data" / "10_cat" / "a.png")
    (root / "output").mkdir()
    (tmp_path / "outside" / "data").mkdir(parents=True)
    return tmp_path, root


def make_client(tmp_path, root, runner=None, autostart=False, **kw):
    q = JobQueue(str(tmp_path / "queue"), runner, autostart=autostart)
    app = FastAPI()
    kw.setdefault("get_model", lambda: dict(MODEL))
    mount(app, q, allowed_roots=[str(root)], default_root=str(root), roots_setting=SETTING, **kw)
    return TestClient(app), q


def cfg_for(**kw):
    d = {"train_data_dir": "training_data", "output_dir": "output", "resolution": 512, "output_name": "t"}
    d.update(kw)
    return d


# ---------------------------------------------------------------------------------------------------------------
# submit and validation


def test_seed_config_accepted_as_dict_and_as_toml_text(env):
    tmp, root = env
    c, q = make_client(tmp, root)
    names = []
    for body in (tomllib.loads(SEED_TOML), {"toml": SEED_TOML}):
        r = c.post(PREFIX + "/jobs", json=body)
        assert r.status_code == 201, r.text
        j = r.json()
        assert j["status"] == "queued" and j["name"] == "my_lora" and j["id"]
        assert any("batch_size" in n for n in j["notes"]), j["notes"]
        # sections kept, relative paths rewritten to checked real paths under the default root
        assert j["config"]["dataset"]["train_data_dir"] == os.path.realpath(root / "training_data")
        assert j["config"]["training"]["output_dir"] == os.path.realpath(root / "output")
        assert j["model"] == MODEL
        assert parse_train_config(j["config"]).train_batch_size == 2
        names.append(j["name"])
        q.remove(j["id"])  # (a second waiting job writing the same files would be refused)
    assert names == ["my_lora", "my_lora"]


def test_dry_run_checks_the_dataset_and_queues_nothing(env):
    """?dry_run=true answers what the run would: an empty image folder (or a mask folder without masked_loss) is a
    422 with the dataset plan, a good dataset 200 with the plan; nothing is queued either way."""
    tmp, root = env
    c, q = make_client(tmp, root)
    (root / "training_data" / "10_cat" / "a.png").unlink()
    r = c.post(PREFIX + "/jobs", params={"dry_run": "true"}, json=cfg_for())
    assert r.status_code == 422 and "this job would not train" in r.json()["detail"], r.text
    assert "no training images" in r.json()["detail"] and "Dataset plan" in r.json()["detail"]
    from PIL import Image
    Image.new("RGB", (512, 512), (200, 10, 10)).save(root / "training_data" / "10_cat" / "a.png")
    r = c.post(PREFIX + "/jobs", params={"dry_run": "true"}, json=cfg_for())
    assert r.status_code == 200 and r.json()["ok"] and "10_cat" in r.json()["plan"], r.text
    assert q.list() == []


def test_unknown_keys_and_bad_input_are_422(env):
    tmp, root = env
    c, q = make_client(tmp, root)
    r = c.post(PREFIX + "/jobs", json={"training": {"learning_rat": 1e-4, "netwrk_dim": 8}, **cfg_for()})
    assert r.status_code == 422
    detail = r.json()["detail"]
    assert "learning_rat" in detail and "'learning_rate'" in detail and "netwrk_dim" in detail
    assert c.post(PREFIX + "/jobs", json={"toml": "learning_rate = = 1"}).status_code == 422
    assert "lr_scheduler" in c.post(PREFIX + "/jobs", json=cfg_for(lr_scheduler="cosin")).json()["detail"]
    r = c.post(PREFIX + "/jobs", json={"output_dir": "output", "resolution": 512})
    assert r.status_code == 422 and "train_data_dir" in r.json()["detail"]
    r = c.post(PREFIX + "/jobs", json={"train_data_dir": "training_data"})
    assert r.status_code == 422 and "output_dir" in r.json()["detail"]
    assert c.post(PREFIX + "/jobs", json=[1, 2]).status_code == 422
    assert q.list() == []


def test_default_output_dir_used_when_missing(env):
    tmp, root = env
    c, _ = make_client(tmp, root, default_output_dir=str(root / "output"))
    r = c.post(PREFIX + "/jobs", json={"train_data_dir": "training_data", "resolution": 512})
    assert r.status_code == 201 and r.json()["config"]["output_dir"] == os.path.realpath(root / "output")


# ---------------------------------------------------------------------------------------------------------------
# path policy


def test_paths_outside_the_roots_are_refused(env):
    tmp, root = env
    c, q = make_client(tmp, root)
    outside = tmp / "outside" / "data"
    (root / "link_out").symlink_to(outside, target_is_directory=True)
    bad = [
        {"train_data_dir": "../outside/data"},
        {"train_data_dir": str(outside)},
        {"train_data_dir": "link_out"},                       # symlink escape
        {"output_dir": "output/../../outside"},
        {"network_weights": "/etc/passwd"},
        {"sample_prompts": "../outside/prompts.txt"},
        {"resume": str(tmp / "outside" / "state")},
        {"reg_data_dir": "training_data/../../outside"},
        {"logging_dir": "~/logs"},
        {"base_weights": "/etc/passwd"},
        {"base_weights": ["lora_a.safetensors", "../outside/b.safetensors"]},  # every file of the list
        # a LyCORIS preset file is read too (its parse errors would quote it)
        {"network_module": "lycoris.kohya", "network_args": ["algo=loha", "preset=/etc/passwd"]},
        {"network_module": "lycoris.kohya", "network_args": "algo=loha preset=../outside/p.toml"},
    ]
    for override in bad:
        r = c.post(PREFIX + "/jobs", json=cfg_for(**override))
        assert r.status_code == 403, (override, r.text)
        detail = r.json()["detail"]
        key = "network_args preset" if "network_args" in override else next(iter(override))
        assert SETTING in detail and key in detail, detail
    # inside a section too
    r = c.post(PREFIX + "/jobs", json={"dataset": {"train_data_dir": "../outside/data"}, "training": {"output_dir": "output"}})
    assert r.status_code == 403
    # a name with folders in it is refused as a setting before the path policy looks at it
    r = c.post(PREFIX + "/jobs", json=cfg_for(output_name="../../evil"))
    assert r.status_code == 422 and "output_name = '../../evil' must be a file name" in str(r.json()["detail"])
    assert q.list() == []


def test_links_inside_a_data_folder_must_stay_inside_the_roots(env):
    """A caption, image or subset folder that links out of the allowed folders would be read by the job (a caption's
    words end up in the downloadable LoRA's ss_tag_frequency): refused, naming the link; links within stay fine."""
    tmp, root = env
    c, q = make_client(tmp, root)
    outside = tmp / "outside"
    (outside / "sub").mkdir(parents=True, exist_ok=True)
    (outside / "secret.txt").write_text("secret_token")
    data = root / "training_data"
    sub = next(p for p in data.iterdir() if p.is_dir())
    caption = sub / "linked.txt"
    caption.symlink_to(outside / "secret.txt")
    r = c.post(PREFIX + "/jobs", json=cfg_for())
    assert r.status_code == 403 and "linked.txt" in r.json()["detail"] and SETTING in r.json()["detail"], r.text
    r = c.post(PREFIX + "/jobs?dry_run=true", json=cfg_for())
    assert r.status_code == 403, r.text
    caption.unlink()
    (data / "3_svs out").symlink_to(outside / "sub", target_is_directory=True)
    r = c.post(PREFIX + "/jobs", json=cfg_for())
    assert r.status_code == 403 and "3_svs out" in r.json()["detail"], r.text
    (data / "3_svs out").unlink()
    (data / "3_svs in").symlink_to(sub, target_is_directory=True)  # within the roots
    (sub / "loop").symlink_to(data, target_is_directory=True)      # a loop ends the walk, not the server
    assert c.post(PREFIX + "/jobs", json=cfg_for()).status_code == 201
    assert len(q.list()) == 1


def test_a_preset_file_inside_the_roots_is_read_from_there(env):
    """A relative preset path resolves against the default root, as the other paths do; built-in names stay."""
    tmp, root = env
    c, q = make_client(tmp, root)
    (root / "p.toml").write_text('unet_target_module = ["Transformer2DModel"]\n')
    r = c.post(PREFIX + "/jobs", json=cfg_for(network_module="lycoris.kohya",
                                              network_args=["algo=loha", "preset=p.toml"]))
    assert r.status_code == 201, r.text
    assert r.json()["config"]["network_args"] == ["algo=loha", "preset=" + os.path.realpath(root / "p.toml")]
    r = c.post(PREFIX + "/jobs", json=cfg_for(network_module="lycoris.kohya", network_args=["preset=attn-mlp"],
                                              output_name="t2"))
    assert r.status_code == 201 and r.json()["config"]["network_args"] == ["preset=attn-mlp"], r.text


def test_symlink_within_roots_and_second_root_are_allowed(env):
    tmp, root = env
    other = tmp / "other_root"
    (other / "imgs" / "1_x").mkdir(parents=True)
    from PIL import Image
    Image.new("RGB", (64, 64)).save(other / "imgs" / "1_x" / "a.png")
    (root / "link_in").symlink_to(root / "training_data", target_is_directory=True)
    q = JobQueue(str(tmp / "queue"), None, autostart=False)
    app = FastAPI()
    mount(app, q, allowed_roots=lambda: [str(root), str(other)], default_root=str(root))
    c = TestClient(app)
    assert c.post(PREFIX + "/jobs", json=cfg_for(train_data_dir="link_in")).status_code == 201
    r = c.post(PREFIX + "/jobs", json=cfg_for(train_data_dir=str(other / "imgs"), output_name="t2"))
    assert r.status_code == 201 and r.json()["config"]["train_data_dir"] == os.path.realpath(other / "imgs")
    info = c.get(PREFIX + "/info").json()
    assert os.path.realpath(other) in info["allowed_roots"]


def test_dataset_config_image_dirs_are_checked(env):
    tmp, root = env
    c, _ = make_client(tmp, root)
    (root / "ds_ok.toml").write_text('[[datasets]]\nresolution = 512\n[[datasets.subsets]]\nimage_dir = "training_data/10_cat"\n')
    (root / "ds_bad.toml").write_text('[[datasets]]\nresolution = 512\n[[datasets.subsets]]\nimage_dir = "../outside/data"\n')
    base = {"output_dir": "output"}
    assert c.post(PREFIX + "/jobs", json={**base, "dataset_config": "ds_ok.toml"}).status_code == 201
    r = c.post(PREFIX + "/jobs", json={**base, "dataset_config": "ds_bad.toml"})
    assert r.status_code == 403 and "image_dir" in r.json()["detail"]
    assert c.post(PREFIX + "/jobs", json={**base, "dataset_config": "missing.toml"}).status_code == 422


# ---------------------------------------------------------------------------------------------------------------
# auth and disabled access


def test_api_auth_basic(env):
    tmp, root = env
    c, _ = make_client(tmp, root, api_auth="alice:s3cret,bob:pa:ss")
    r = c.get(PREFIX + "/jobs")
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Basic"
    assert c.get(PREFIX + "/jobs", auth=("alice", "wrong")).status_code == 401
    assert c.get(PREFIX + "/jobs", auth=("mallory", "s3cret")).status_code == 401
    assert c.get(PREFIX + "/jobs", auth=("alice", "s3cret")).status_code == 200
    assert c.get(PREFIX + "/jobs", auth=("bob", "pa:ss")).status_code == 200     # ':' inside the password
    assert c.post(PREFIX + "/jobs", json=cfg_for()).status_code == 401
    assert c.post(PREFIX + "/jobs", json=cfg_for(), auth=("alice", "s3cret")).status_code == 201
    assert c.get(PREFIX + "/model").status_code == 401


def test_malformed_api_auth_locks_instead_of_opening(env):
    tmp, root = env
    c, _ = make_client(tmp, root, api_auth="justauser")
    assert c.get(PREFIX + "/jobs").status_code == 401
    assert c.get(PREFIX + "/jobs", auth=("justauser", "")).status_code == 401


def test_no_api_auth_means_open(env):
    tmp, root = env
    c, _ = make_client(tmp, root, api_auth=None)
    assert c.get(PREFIX + "/jobs").status_code == 200


def test_disabled_extension_access_refuses_everything(env):
    tmp, root = env
    c, q = make_client(tmp, root, access_disabled=True, api_auth="alice:s3cret")
    for method, path in (("GET", "/jobs"), ("POST", "/jobs"), ("GET", "/model"), ("DELETE", "/jobs/abc"),
                         ("GET", "/jobs/abc/files/x.safetensors"), ("GET", "")):
        r = c.request(method, PREFIX + path, json=cfg_for(), auth=("alice", "s3cret"))
        assert r.status_code == 403, (method, path)
        assert r.json()["detail"] == DISABLED_MESSAGE
    assert "--enable-insecure-extension-access" in DISABLED_MESSAGE and q.list() == []


def test_remount_replaces_old_routes(env):
    tmp, root = env
    app = FastAPI()
    q1 = JobQueue(str(tmp / "q1"), None, autostart=False)
    q2 = JobQueue(str(tmp / "q2"), None, autostart=False)
    mount(app, q1, allowed_roots=[str(root)], access_disabled=True)
    mount(app, q2, allowed_roots=[str(root)])
    c = TestClient(app)
    assert c.post(PREFIX + "/jobs", json=cfg_for()).status_code == 201
    assert len(q2.list()) == 1 and q1.list() == []


# ---------------------------------------------------------------------------------------------------------------
# queue control


def test_list_move_cancel_remove(env):
    tmp, root = env
    c, q = make_client(tmp, root)
    ids = [c.post(PREFIX + "/jobs", json=cfg_for(output_name=n)).json()["id"] for n in ("a", "b", "c")]
    jobs = c.get(PREFIX + "/jobs").json()["jobs"]
    assert [j["name"] for j in jobs] == ["a", "b", "c"] and "losses" not in jobs[0]
    assert [j["queue_position"] for j in jobs] == [0, 1, 2]

    r = c.post(PREFIX + f"/jobs/{ids[2]}/move", json={"position": 0})
    assert r.status_code == 200 and [w["name"] for w in r.json()["waiting"]] == ["c", "a", "b"]
    assert c.post(PREFIX + f"/jobs/{ids[2]}/move", json={"position": -1}).status_code == 422
    assert c.post(PREFIX + f"/jobs/{ids[2]}/move", json={}).status_code == 422
    assert c.post(PREFIX + "/jobs/nope/move", json={"position": 0}).status_code == 404

    r = c.post(PREFIX + f"/jobs/{ids[0]}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    r = c.post(PREFIX + f"/jobs/{ids[0]}/cancel")
    assert r.status_code == 409 and "has already been cancelled; nothing to cancel" in r.json()["detail"]
    # a long-lived queue: only the jobs of some statuses
    assert [j["name"] for j in c.get(PREFIX + "/jobs?status=queued").json()["jobs"]] == ["c", "b"]
    assert [j["name"] for j in c.get(PREFIX + "/jobs?status=cancelled,running").json()["jobs"]] == ["a"]
    r = c.get(PREFIX + "/jobs?status=finished")
    assert r.status_code == 422 and "unknown status finished" in r.json()["detail"]
    # and a page of them
    page = c.get(PREFIX + "/jobs?offset=1&limit=1").json()
    assert [j["name"] for j in page["jobs"]] == ["a"] and (page["total"], page["offset"]) == (3, 1)  # c, a, b
    page = c.get(PREFIX + "/jobs?status=queued&offset=1").json()
    assert [j["name"] for j in page["jobs"]] == ["b"] and page["total"] == 2
    assert c.get(PREFIX + "/jobs?offset=5").json()["jobs"] == []
    assert c.get(PREFIX + "/jobs?limit=0").status_code == 422 and c.get(PREFIX + "/jobs?offset=-1").status_code == 422
    assert c.post(PREFIX + f"/jobs/{ids[0]}/move", json={"position": 0}).status_code == 409
    assert c.post(PREFIX + "/jobs/nope/cancel").status_code == 404

    assert c.delete(PREFIX + f"/jobs/{ids[0]}").json() == {"removed": ids[0]}   # finished
    assert c.delete(PREFIX + f"/jobs/{ids[1]}").status_code == 200               # waiting
    assert c.get(PREFIX + f"/jobs/{ids[0]}").status_code == 404
    assert c.delete(PREFIX + f"/jobs/{ids[0]}").status_code == 404
    assert [j.id for j in q.list()] == [ids[2]]
    # clearing the finished ones leaves waiting (and running) jobs alone
    q.cancel(ids[2])
    d = q.submit({"output_name": "d"})
    assert c.delete(PREFIX + "/jobs").json() == {"removed": [ids[2]], "kept": []}
    assert [j.id for j in q.list()] == [d.id]


def test_cancel_running_job_and_refuse_removing_it(env):
    tmp, root = env
    gate = threading.Event()
    c, q = make_client(tmp, root, runner=fake_runner(gate=gate), autostart=True)
    try:
        jid = c.post(PREFIX + "/jobs", json=cfg_for()).json()["id"]
        for _ in range(200):
            if q.get(jid).status == "running":
                break
            threading.Event().wait(0.01)
        assert c.get(PREFIX + f"/jobs/{jid}").json()["status"] == "running"
        r = c.delete(PREFIX + f"/jobs/{jid}")
        assert r.status_code == 409 and "cancel it first" in r.json()["detail"]
        assert c.post(PREFIX + f"/jobs/{jid}/cancel").status_code == 200
        gate.set()
        assert q.wait_idle(10)
        j = c.get(PREFIX + f"/jobs/{jid}").json()
        assert j["status"] == "cancelled" and j["files"] == []
    finally:
        gate.set()
        q.stop(5)


# ---------------------------------------------------------------------------------------------------------------
# progress and files


def test_run_progress_since_and_downloads(env):
    tmp, root = env
    c, q = make_client(tmp, root, runner=fake_runner(nan_at=3), autostart=True)
    try:
        jid = c.post(PREFIX + "/jobs", json=cfg_for(output_name="cat")).json()["id"]
        assert q.wait_idle(10)
    finally:
        q.stop(5)
    j = c.get(PREFIX + f"/jobs/{jid}").json()
    assert j["status"] == "done" and j["progress"] == 1.0 and j["step"] == 4 and j["total"] == 4
    assert j["eta_s"] == 0.0 and j["loss"] == 0.25 and j["loss_points"] == 4
    assert j["losses"][2] == [3, None]            # NaN loss reported as null, not a 500
    assert j["notes"] == ["trained 4 steps"] and j["queue_position"] is None
    since = c.get(PREFIX + f"/jobs/{jid}", params={"since": 2}).json()["losses"]
    assert [p[0] for p in since] == [3, 4]

    files = c.get(PREFIX + f"/jobs/{jid}/files").json()["files"]
    by_name = {f["name"]: f for f in files}
    assert set(by_name) == {"cat.safetensors", "cat_e2.png"}
    assert by_name["cat.safetensors"]["kind"] == "lora" and by_name["cat.safetensors"]["size"] == 16
    r = c.get(by_name["cat.safetensors"]["url"])
    assert r.status_code == 200 and r.content == b"dummy lora bytes"
    assert "cat.safetensors" in r.headers["content-disposition"]
    assert r.headers["content-type"] == "application/octet-stream"  # (not a guessed text/plain)
    png = c.get(by_name["cat_e2.png"]["url"])
    assert png.content == b"\x89PNG fake" and png.headers["content-type"] == "image/png"

    # only the job's own outputs, by name: no traversal, no other files of the folder
    (root / "output" / "other.safetensors").write_bytes(b"x")
    for name in ("other.safetensors", "..%2F..%2Fqueue%2Fqueue.json", "%2e%2e", "sample%2Fcat_e2.png",
                 "..%5C..%5Cqueue.json"):
        assert c.get(PREFIX + f"/jobs/{jid}/files/{name}").status_code == 404, name
    assert c.get(PREFIX + f"/jobs/{jid}/files/../../../queue/queue.json").status_code == 404
    assert c.get(PREFIX + "/jobs/nope/files").status_code == 404

    # a recorded output replaced by a symlink out of the roots is not served
    target = tmp / "outside" / "secret.txt"
    target.write_text("secret")
    lora = root / "output" / "cat.safetensors"
    lora.unlink()
    lora.symlink_to(target)
    r = c.get(by_name["cat.safetensors"]["url"])
    assert r.status_code == 403 and "secret" not in r.text.replace("secret.txt", "")
    lora.unlink()
    assert c.get(by_name["cat.safetensors"]["url"]).status_code == 404


def test_model_route(env):
    tmp, root = env
    c, _ = make_client(tmp, root)
    assert c.get(PREFIX + "/model").json() == {"loaded": True, **MODEL}
    c2, _ = make_client(tmp, root, get_model=lambda: None)
    assert c2.get(PREFIX + "/model").json()["loaded"] is False

    def boom():
        raise RuntimeError("model is being reloaded")
    c3, _ = make_client(tmp, root, get_model=boom)
    r = c3.get(PREFIX + "/model")
    assert r.status_code == 503 and "being reloaded" in r.json()["detail"]
    # a failing model callable does not stop a submit
    r = c3.post(PREFIX + "/jobs", json=cfg_for())
    assert r.status_code == 201 and any("could not be read" in n for n in r.json()["notes"])


def test_nan_is_json_safe():
    from lib_lora.api import _json_safe
    assert _json_safe({"a": [float("inf"), 1.5, (2, math.nan)]}) == {"a": [None, 1.5, [2, None]]}


def test_openapi_schema_builds(env):
    # /docs of the whole WebUI breaks if one route's schema cannot be generated
    tmp, root = env
    c, _ = make_client(tmp, root)
    paths = c.get("/openapi.json").json()["paths"]
    assert PREFIX + "/jobs/{job_id}/files/{name}" in paths and PREFIX + "/jobs" in paths


def test_kohya_gui_preset_is_checked_and_kept_as_sd_scripts_keys(env):
    """A kohya_ss GUI preset posted as the body: its folders go through the same policy (the GUI's
    lora_network_weights included), and the job keeps the translated sd-scripts keys."""
    tmp, root = env
    c, q = make_client(tmp, root)
    preset = {"LoRA_type": "LyCORIS/LoHa", "network_dim": 8, "conv_dim": 4, "conv_alpha": 2, "epoch": 2,
              "max_resolution": "512,512", "learning_rate": "0.0001", "unet_lr": "0.0001", "text_encoder_lr": "5e-05",
              "xformers": True, "num_cpu_threads_per_process": 2, "train_data_dir": "training_data",
              "output_dir": "output", "output_name": "gui", "sample_prompts": "a cat"}
    r = c.post(PREFIX + "/jobs", json=dict(preset, lora_network_weights="/etc/passwd"))
    assert r.status_code == 403 and "network_weights" in r.json()["detail"], r.text
    r = c.post(PREFIX + "/jobs", json=preset)
    assert r.status_code == 201, r.text
    j = r.json()
    assert j["config"]["network_module"] == "lycoris.kohya" and "algo=loha" in j["config"]["network_args"]
    assert "LoRA_type" not in j["config"] and j["config"]["max_train_epochs"] == 2
    assert j["config"]["train_data_dir"] == os.path.realpath(root / "training_data")
    assert any("kohya_ss GUI preset" in n for n in j["notes"])
    assert any("sample_prompts as the path of a prompt file" in n for n in j["notes"])
    assert parse_train_config(j["config"]).network_args == parse_train_config(preset).network_args
    # the translation notes stay on the job after its run (the run sees only the sd-scripts keys)
    q.remove(j["id"])
    c2, q2 = make_client(tmp, root, runner=fake_runner(), autostart=True)
    try:
        jid = c2.post(PREFIX + "/jobs", json=preset).json()["id"]
        assert q2.wait_idle(10)
    finally:
        q2.stop(5)
    notes = c2.get(PREFIX + f"/jobs/{jid}").json()["notes"]
    assert any("kohya_ss GUI preset" in n for n in notes) and "trained 4 steps" in notes


def test_settings_no_model_can_train_are_refused_at_submit(env):
    """A missing optimizer package or a module outside the optimizer list was queued and failed when its turn
    came (seen in the real WebUI); it is a 422 with the reason now, and nothing is queued."""
    tmp, root = env
    c, q = make_client(tmp, root)
    r = c.post(PREFIX + "/jobs", json=cfg_for(optimizer_type="os.system"))
    assert r.status_code == 422, r.text
    assert "this job would not train" in r.json()["detail"] and "optimizers are imported by name" in r.json()["detail"]
    assert q.list() == []
    assert c.post(PREFIX + "/jobs", json=cfg_for(optimizer_type="torch.optim.RAdam")).status_code == 201


def test_metadata_files_are_checked(env):
    """sd-scripts' fine-tuning datasets read a metadata JSON: in_json and a dataset config's metadata_file are
    paths like any other."""
    tmp, root = env
    c, _ = make_client(tmp, root)
    from PIL import Image
    Image.new("RGB", (64, 64)).save(root / "training_data" / "ok.png")
    (root / "meta.json").write_text(json.dumps({"ok": {"caption": "x"}}))
    base = {"output_dir": "output", "train_data_dir": "training_data", "resolution": 512}
    assert c.post(PREFIX + "/jobs", json={**base, "in_json": "meta.json"}).status_code == 201
    r = c.post(PREFIX + "/jobs", json={**base, "in_json": "../outside/meta.json"})
    assert r.status_code == 403 and "in_json" in r.json()["detail"]
    (root / "ds_meta.toml").write_text('[[datasets]]\nresolution = 512\n[[datasets.subsets]]\n'
                                       'metadata_file = "../outside/meta.json"\n')
    r = c.post(PREFIX + "/jobs", json={"output_dir": "output", "dataset_config": "ds_meta.toml"})
    assert r.status_code == 403 and "metadata_file" in r.json()["detail"]


def test_metadata_keys_cannot_read_outside_the_allowed_folders(env):
    """A metadata key is a file name in the image folder or a full path: through the API, the image (or cached
    latent) a key would read must be inside the allowed folders too, like every path in the config."""
    tmp, root = env
    c, _ = make_client(tmp, root)
    outside = tmp / "outside" / "data"
    (outside / "secret.png").write_bytes(b"x")
    (outside / "lat_0064x0064_sd.npz").write_bytes(b"x")
    from PIL import Image
    Image.new("RGB", (64, 64)).save(root / "training_data" / "ok.png")
    base = {"output_dir": "output", "train_data_dir": "training_data", "in_json": "meta.json", "resolution": 512}
    cases = {str(outside / "secret.png"): "secret.png", "../../outside/data/secret": "secret.png",
             str(outside / "lat"): "lat_0064x0064_sd.npz"}
    for key, name in cases.items():
        (root / "meta.json").write_text(json.dumps({"ok": {}, key: {"caption": "x"}}))
        r = c.post(PREFIX + "/jobs", json=base)
        assert r.status_code == 403, (key, r.text)
        assert f"the metadata key {key!r} reads" in r.json()["detail"] and name in r.json()["detail"]
    # a key inside the folders that has no image is not a path problem: the dataset plan refuses the job for it
    (root / "meta.json").write_text(json.dumps({"ok": {"caption": "x"}, "missing": {}}))
    r = c.post(PREFIX + "/jobs", json=base)
    assert r.status_code == 422 and "have no image" in r.json()["detail"] and "missing" in r.json()["detail"], r.text
    (root / "meta.json").write_text(json.dumps({"ok": {"caption": "x"}}))
    assert c.post(PREFIX + "/jobs", json=base).status_code == 201
    (root / "ds_meta.toml").write_text('[[datasets]]\nresolution = 512\n[[datasets.subsets]]\n'
                                       'image_dir = "training_data"\nmetadata_file = "meta2.json"\n')
    (root / "meta2.json").write_text(json.dumps({str(outside / "secret.png"): {}}))
    r = c.post(PREFIX + "/jobs", json={"output_dir": "output", "dataset_config": "ds_meta.toml"})
    assert r.status_code == 403 and "metadata_file in ds_meta.toml: the metadata key" in r.json()["detail"]
    # masked_loss mask images (a subset's conditioning_data_dir) likewise
    (root / "ds_mask.toml").write_text('[[datasets]]\nresolution = 512\n[[datasets.subsets]]\n'
                                       'image_dir = "training_data"\nconditioning_data_dir = "../outside/data"\n')
    r = c.post(PREFIX + "/jobs", json={"output_dir": "output", "dataset_config": "ds_mask.toml", "masked_loss": True})
    assert r.status_code == 403 and "conditioning_data_dir in ds_mask.toml" in r.json()["detail"]


def test_an_output_folder_that_is_a_file_is_refused(env):
    tmp, root = env
    c, q = make_client(tmp, root)
    (root / "afile").write_text("x")
    for dry in (False, True):
        r = c.post(PREFIX + "/jobs" + ("?dry_run=true" if dry else ""), json=cfg_for(output_dir="afile"))
        assert r.status_code == 422 and "afile is a file, not a folder" in r.json()["detail"], r.text
    assert q.list() == []


def test_a_second_waiting_job_writing_the_same_files_is_refused_and_an_existing_file_is_said(env):
    """Two jobs with one output_dir + output_name: the later one overwrote the earlier one's LoRAs while both
    listed them as their own. Refused (409) while the first waits or runs; afterwards the overwrite is said."""
    tmp, root = env
    c, q = make_client(tmp, root, runner=fake_runner(), autostart=False)
    first = c.post(PREFIX + "/jobs", json=cfg_for(output_name="same"))
    assert first.status_code == 201
    for url in ("/jobs", "/jobs?dry_run=true"):
        r = c.post(PREFIX + url, json=cfg_for(output_name="same", seed=2))
        assert r.status_code == 409 and "writes the same files" in r.json()["detail"] and \
            first.json()["id"] in r.json()["detail"], r.text
    assert c.post(PREFIX + "/jobs", json=cfg_for(output_name="other")).status_code == 201
    q.start()
    assert q.wait_idle(10)
    q.stop(5)
    r = c.post(PREFIX + "/jobs", json=cfg_for(output_name="same", seed=2))
    assert r.status_code == 201, r.text
    assert any("same.safetensors already exists: this job overwrites it" in n for n in r.json()["notes"])


def test_model_keys_of_a_pasted_config_are_said_to_choose_nothing(env):
    """Inside the WebUI the loaded checkpoint is trained as it is: a pasted config's model keys are named in the
    notes (dry run, submit, and after the run) where they disagree with it."""
    from PIL import Image
    tmp, root = env
    Image.new("RGB", (64, 64), (200, 30, 30)).save(root / "training_data" / "10_cat" / "a.png")
    c, q = make_client(tmp, root, runner=fake_runner(), autostart=False)
    body = cfg_for(pretrained_model_name_or_path="./models/sd/sd_xl_base_1.0.safetensors", v2=True,
                   v_parameterization=True, vae="vae-ft-mse.safetensors")
    dry = c.post(PREFIX + "/jobs?dry_run=true", json=body)
    assert dry.status_code == 200, dry.text
    r = c.post(PREFIX + "/jobs", json=body)
    assert r.status_code == 201
    q.start()
    assert q.wait_idle(10)
    q.stop(5)
    after = c.get(PREFIX + f"/jobs/{r.json()['id']}").json()["notes"]
    for notes in (dry.json()["notes"], r.json()["notes"], after):
        text = "\n".join(notes)
        assert "The config names the model sd_xl_base_1.0.safetensors; LoRA Studio trains the checkpoint loaded " \
               "in the WebUI (v1-5-pruned)" in text
        assert "v2 = true, but the loaded model (v1-5-pruned) is SD1" in text
        assert "v_parameterization = true, but the loaded model (v1-5-pruned) predicts eps" in text
        assert "vae = 'vae-ft-mse.safetensors' is not loaded" in text
    ok = c.post(PREFIX + "/jobs?dry_run=true", json=cfg_for(pretrained_model_name_or_path="/m/v1-5-pruned.ckpt",
                                                           mixed_precision="fp16", output_name="ok"))
    assert not any("names the model" in n or "fp16" in n for n in ok.json()["notes"])
    c2, _ = make_client(tmp, root, get_model=lambda: dict(MODEL, device="cpu"))
    cpu = c2.post(PREFIX + "/jobs?dry_run=true", json=cfg_for(mixed_precision="fp16", output_name="ok"))
    assert "mixed_precision fp16 needs a CUDA GPU; training in fp32 on the CPU instead." in cpu.json()["notes"]


def test_dry_run_says_a_disk_without_room_for_the_run(env, monkeypatch):
    """The run refuses to start without room for its final LoRA and a state; the dry run says so first, with the
    network's size estimated for the loaded model's family (an SD1 LoRA at network_dim 32: 18.9 M parameters,
    about 366 MiB saved in fp16 with a state), and notes when only the planned saves would not fit."""
    from collections import namedtuple

    from PIL import Image

    import lib_lora.train.saving as saving
    tmp, root = env
    Image.new("RGB", (64, 64), (200, 30, 30)).save(root / "training_data" / "10_cat" / "a.png")
    c, q = make_client(tmp, root)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(saving.shutil, "disk_usage", lambda p: usage(10 ** 12, 0, 100 * 2 ** 20))
    r = c.post(PREFIX + "/jobs?dry_run=true", json=cfg_for(network_dim=32))
    assert r.status_code == 422, r.text
    assert re.search(r"has 100\.0 MiB free; about 365\.6 MiB is needed for the trained LoRA and a resume state\. "
                     r"Free some space or choose another output folder \(estimated for a full-size SD1 model at "
                     r"network_dim 32;", r.json()["detail"]), r.text
    monkeypatch.setattr(saving.shutil, "disk_usage", lambda p: usage(10 ** 12, 0, 500 * 2 ** 20))
    r = c.post(PREFIX + "/jobs?dry_run=true", json=cfg_for(network_dim=32, max_train_epochs=4, save_every_n_epochs=1,
                                                           save_state=True))
    assert r.status_code == 200, r.text
    assert any("for this run's 4 LoRA file(s) and 4 state(s)" in n for n in r.json()["notes"]), r.json()["notes"]
    # a network type whose size the estimate does not know is left to the run's own check
    r = c.post(PREFIX + "/jobs?dry_run=true", json=cfg_for(network_dim=32, network_module="lycoris.kohya",
                                                           network_args=["algo=lokr"]))
    assert r.status_code == 200 and not any("MiB" in n for n in r.json()["notes"]), r.text
    assert q.list() == []


def test_files_the_run_reads_first_are_checked_at_submit_and_dry_run(env):
    """A missing data folder, network_weights, resume or sample prompt file, a LoRA for another model family as
    network_weights, a resume file that is not a state: each a 422 naming it (the run stopped on each), queueing
    nothing."""
    import torch
    from safetensors.torch import save_file
    tmp, root = env
    c, q = make_client(tmp, root)
    sdxl = {"lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k.lora_down.weight": torch.zeros(4, 2048),
            "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(4, 1280)}
    save_file(sdxl, str(root / "xl.safetensors"), metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    (root / "bad-state.lsstate").write_bytes(b"not a state")
    (root / "bad-prompts.txt").write_text("svs cat --ss eulr_a\n", encoding="utf-8")
    cases = [
        ({"train_data_dir": "nope"}, f"{os.path.realpath(root)}/nope", "does not exist"),
        ({"network_weights": "missing.safetensors"}, "network_weights: ", "missing.safetensors does not exist"),
        ({"network_weights": "xl.safetensors"}, "network_weights: xl.safetensors is a LoRA for SDXL, the loaded "
                                                "model is SD1", "load an SDXL"),
        ({"resume": "gone-state.lsstate"}, "resume: the state file", "does not exist"),
        # (a restart script's --resume auto is the command line's: said so, from the API audit)
        ({"resume": "auto"}, "resume: the state file", "'auto' is the command line's --resume auto: over HTTP give "
                                                      "the job's resume_state"),
        ({"resume": "bad-state.lsstate"}, "resume: the state file bad-state.lsstate cannot be read", "Resume from"),
        ({"sample_prompts": "prompts.txt", "sample_every_n_epochs": 1}, "sample_prompts: ", "prompts.txt does not "
                                                                                               "exist"),
        # (a sampler typo failed the run once the model had loaded, from the grid audit)
        ({"sample_sampler": "eulr_a"}, "sample_sampler: unknown sampler 'eulr_a'", "euler_a"),
        ({"sample_prompts": "bad-prompts.txt", "sample_every_n_epochs": 1}, "bad-prompts.txt:1: unknown sampler",
         "euler_a"),
    ]
    for override, what, hint in cases:
        for url in ("/jobs", "/jobs?dry_run=true"):
            r = c.post(PREFIX + url, json=cfg_for(**override))
            assert r.status_code == 422 and what in r.json()["detail"] and hint in r.json()["detail"], (url, r.text)
    assert q.list() == []


def test_a_misspelled_query_parameter_queues_nothing(env):
    tmp, root = env
    c, q = make_client(tmp, root)
    r = c.post(PREFIX + "/jobs?dryrun=true", json=cfg_for())
    assert r.status_code == 422 and "unknown query parameter(s) dryrun" in r.json()["detail"], r.text
    assert q.list() == []
    assert c.post(PREFIX + "/jobs?name=x&dry_run=false", json=cfg_for()).status_code == 201


def test_info_lists_each_allowed_folder_once(env):
    tmp, root = env
    q = JobQueue(str(tmp / "queue"), None, autostart=False)
    app = FastAPI()
    mount(app, q, allowed_roots=[str(root), str(root) + "/", str(root / "output" / "..")], default_root=str(root))
    assert TestClient(app).get(PREFIX + "/info").json()["allowed_roots"] == [os.path.realpath(root)]


def test_a_dataset_no_batch_can_be_formed_from_is_refused_at_submit(env):
    """Images directly in train_data_dir (no N_name folder) were queued over HTTP and failed when the job's turn
    came; the Train tab refused them at once. Now a real POST builds the dataset plan too: 422 with the plan, and
    nothing is queued."""
    tmp, root = env
    c, q = make_client(tmp, root)
    from PIL import Image
    flat = root / "flat"
    flat.mkdir()
    Image.new("RGB", (64, 64)).save(flat / "a.png")
    r = c.post(PREFIX + "/jobs", json=cfg_for(train_data_dir="flat"))
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert "this job would not train" in detail and "Dataset plan" in detail and "N_name" in detail, detail
    assert q.list() == []
    (flat / "5_cat").mkdir()
    (flat / "a.png").rename(flat / "5_cat" / "a.png")
    (flat / "3_dog").mkdir()
    r = c.post(PREFIX + "/jobs", json=cfg_for(train_data_dir="flat"))
    assert r.status_code == 201, r.text
    assert any("3_dog" in n and "skipped" in n for n in r.json()["notes"])  # the plan's warnings come as notes


def test_a_dry_run_of_a_resume_says_the_data_changed(env):
    """The run said a state continued on other data (images added, another resolution), the command line's
    --dry-run too; the HTTP dry run did not. The state here is written as the trainer writes one (torch.save of
    the dict load_state checks); its data record says 3 images at 512 where the folder now has 1."""
    import torch
    tmp, root = env
    c, q = make_client(tmp, root)
    state = {"network": {}, "optimizer": {}, "step": 7, "rng": {}, "seed": 1,
             "data": {"images": 3, "reg_images": 0, "files": "0" * 16, "batches_per_epoch": 30,
                      "resolution": [[512, 512]], "batch_size": [1]}}
    torch.save(state, str(root / "output" / "t-state.lsstate"))
    for url in ("/jobs?dry_run=true", "/jobs"):
        r = c.post(PREFIX + url, json=cfg_for(resume="output/t-state.lsstate"))
        assert r.status_code in (200, 201), r.text
        said = [n for n in r.json()["notes"] if n.startswith("resume: t-state.lsstate was trained on other data")]
        assert said and "3 training images then, 1 now" in said[0] and "from step 7" in said[0], r.json()["notes"]


def test_files_lists_every_state_the_run_saved(env):
    """With save_state each epoch, GET /files listed only the newest state; an earlier epoch's state (to resume
    from a better point) had to be found on disk. Now each state the run saved is listed, the newest last."""
    tmp, root = env

    def run(job, emit, should_cancel):
        out = parse_train_config(job.config).output_dir
        paths = []
        for epoch, tag in ((1, "000001"), (2, "000002"), (3, "final")):
            path = os.path.join(out, f"cat-{tag}.lsstate")
            with open(path, "wb") as f:
                f.write(b"state %d" % epoch)
            emit(TrainEvent("state", step=2 * epoch, epoch=epoch, path=path))
            paths.append(path)
        os.remove(paths.pop(0))  # (save_last_n_epochs_state pruned it: not listed as if kept)
        return TrainResult("done", [], None, 4, [], [], state_file=paths[-1])

    c, q = make_client(tmp, root, runner=run, autostart=True)
    try:
        jid = c.post(PREFIX + "/jobs", json=cfg_for(output_name="cat")).json()["id"]
        assert q.wait_idle(10)
    finally:
        q.stop(5)
    files = c.get(PREFIX + f"/jobs/{jid}/files").json()["files"]
    assert [(f["name"], f["kind"], f["exists"]) for f in files] == [("cat-000002.lsstate", "state", True),
                                                                    ("cat-final.lsstate", "state", True)]
    assert c.get(files[0]["url"]).content == b"state 2"
    job = c.get(PREFIX + f"/jobs/{jid}").json()
    assert job["resume_state"].endswith("cat-final.lsstate") and len(job["states"]) == 2


def test_requests_fastapi_cannot_read_get_a_detail_text(env):
    """FastAPI's own validation answered a list of {loc, msg, type} objects where every other error of this API
    is a detail text; a script printing r.json()["detail"] showed a Python list. Each is one text now, naming the
    query parameter or body key, with the keys a body takes when one is unknown."""
    tmp, root = env
    c, q = make_client(tmp, root, grid=lambda *a, **k: {})
    job = q.submit(cfg_for(), name="x")
    cases = [
        ("post", "/jobs", {"content": b"not json", "headers": {"content-type": "application/json"}},
         "the body is not valid JSON (Expecting value: line 1 column 1 (char 0))"),
        ("post", "/jobs", {"json": [1, 2]}, "the body must be a JSON object"),
        ("post", f"/jobs/{job.id}/move", {"json": {"position": "x"}}, "position: value is not a valid integer"),
        ("post", f"/jobs/{job.id}/move", {"json": {}}, "position: field required"),
        ("get", f"/jobs/{job.id}?since=abc", {}, "query parameter since: value is not a valid integer"),
        ("delete", "/jobs?keep_resumable=maybe", {}, "query parameter keep_resumable: value could not be parsed to "
                                                    "a boolean"),
        ("post", f"/jobs/{job.id}/grid", {"json": {"prompt": "a", "seeds": [-1], "negative": "x"}},
         "seeds[0]: ensure this value is greater than or equal to 0; negative: extra fields not permitted (it takes "
         "prompt, negative_prompt, files, strengths, seeds, width, height, steps, send_images)"),
    ]
    for method, url, kw, detail in cases:
        r = getattr(c, method)(PREFIX + url, **kw)
        assert r.status_code == 422 and r.json() == {"detail": detail}, (url, r.text)
