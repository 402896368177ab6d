"""What a killed run, a second run into the same files, or an output folder removed mid-run leaves: one run per
output folder and name at a time (an OS lock a kill -9 cannot leave behind), an interrupted save's temp files
removed by the next run, a removed folder made again instead of the run being lost."""

import glob
import os
import shutil
import signal

import pytest

import models
import train_data
from lib_lora.host.base import ModelHost
from lib_lora.train.config import parse_train_config
from lib_lora.train.run import run_training
from lib_lora.train.saving import RunLock, RunLockedError, run_files
from lib_lora.train.trainer import TrainingError

@pytest.fixture(scope="module")
def sd1():
    return models.make_sd1(seed=3)


def _cfg(root, img, **kw):
    c = {"train_data_dir": img, "resolution": 64, "train_batch_size": 2, "output_dir": os.path.join(root, "out"),
         "output_name": "svs", "network_dim": 4, "network_alpha": 2, "learning_rate": 1e-3, "max_train_epochs": 2,
         "seed": 7, "cache_latents": True}
    c.update(kw)
    return parse_train_config(c, base_dir=root)


@pytest.mark.skipif(os.name != "posix", reason="flock")
def test_a_second_run_into_the_same_files_is_refused_and_a_killed_holder_leaves_no_lock(sd1, tmp_path):
    img, _ = train_data.make_dataset(str(tmp_path / "d"), n_concept=2, repeats=1)
    out = tmp_path / "a" / "out"
    out.mkdir(parents=True)
    p = train_data.hold_run_lock(out, "svs")
    try:
        with pytest.raises(TrainingError, match=rf"another training is writing 'svs' files in {out} right now \(a "
                                                rf"test run, process {p.pid}, started .*\); two runs there would "
                                                r"write over each other's files\. Wait for it to end, or give this "
                                                r"run another output_name or output_dir\. Nothing was trained"):
            run_training(ModelHost(sd1, "m"), _cfg(str(tmp_path / "a"), img, max_train_epochs=1))
        assert not [f for f in os.listdir(out) if f.endswith(".safetensors")]
        # another name in the same folder is another run's files: not held
        with RunLock(str(out), "svs-v2"):
            pass
    finally:
        p.send_signal(signal.SIGKILL)  # (no clean-up runs: the OS drops the lock, the file stays)
        p.wait()
    assert os.path.exists(out / ".svs.lock")
    res = run_training(ModelHost(sd1, "m"), _cfg(str(tmp_path / "a"), img, max_train_epochs=1))
    assert res.status == "done" and not os.path.exists(out / ".svs.lock")
    with RunLock(str(out), "svs"):  # (one process: held until left)
        with pytest.raises(RunLockedError):
            RunLock(str(out), "svs").__enter__()


def test_an_interrupted_saves_temp_files_are_removed_by_the_next_run_of_that_name(sd1, tmp_path):
    img, _ = train_data.make_dataset(str(tmp_path / "d"), n_concept=2, repeats=1)
    out = tmp_path / "a" / "out"
    out.mkdir(parents=True)
    ours = [".svs-000001.safetensors.ab12cd_e.tmp", ".svs-000001-state.lsstate.zz9yy8xx.tmp",
            ".svs.safetensors.q1w2e3r4.tmp"]
    others = [".svs-v2-000001.safetensors.ab12cd_e.tmp", ".svs-000001.safetensors.tmp", "notes.tmp"]
    for n in ours + others:
        (out / n).write_bytes(b"\0" * 1000)
    assert run_files("svs").fullmatch("svs-step00000100.safetensors")
    assert not run_files("svs").fullmatch("svs-v2.safetensors")
    res = run_training(ModelHost(sd1, "m"), _cfg(str(tmp_path / "a"), img, max_train_epochs=1))
    assert res.status == "done"
    assert sorted(n for n in os.listdir(out) if n.endswith(".tmp")) == sorted(others)
    assert (f"removed 3 unfinished file(s) (0.0 MiB) an interrupted save of an earlier 'svs' run left in {out}"
            in res.notes), res.notes


def test_an_output_folder_removed_mid_run_is_made_again_and_the_run_kept(sd1, tmp_path):
    img, _ = train_data.make_dataset(str(tmp_path / "d"), n_concept=2, repeats=2)
    out = tmp_path / "a" / "out"

    def on_event(e):
        if e.kind == "save" and e.epoch == 1:
            shutil.rmtree(out)

    res = run_training(ModelHost(sd1, "m"), _cfg(str(tmp_path / "a"), img, max_train_epochs=3,
                                                 save_every_n_epochs=1, save_state=True), on_event=on_event)
    assert res.status == "done"
    # (epoch 1's LoRA went with the folder; its state, saved right after, is there)
    assert sorted(os.listdir(out)) == ["svs-000001-state.lsstate", "svs-000002-state.lsstate",
                                       "svs-000002.safetensors", "svs-final-state.lsstate", "svs.safetensors"]
    assert any(n.startswith(f"the output folder {out} was gone (removed or renamed while training); it was made "
                            "again") for n in res.notes), res.notes


def test_a_resumed_run_keeps_its_session_and_a_mix_of_two_runs_is_named_by_the_grid(sd1, tmp_path):
    from lib_lora.formats.safetensors_io import read_metadata
    from lib_lora.grid_cli import lora_files, mixed_runs

    img, _ = train_data.make_dataset(str(tmp_path / "d"), n_concept=2, repeats=1)
    out = tmp_path / "a" / "out"
    kw = dict(max_train_epochs=3, save_every_n_epochs=1, save_state=True)
    seen = {"saves": 0}

    def cancel_after_first_save(e):
        seen["saves"] += e.kind == "save"

    part = run_training(ModelHost(sd1, "m"), _cfg(str(tmp_path / "a"), img, **kw), on_event=cancel_after_first_save,
                        should_cancel=lambda: seen["saves"] >= 1)
    assert part.status == "cancelled"
    res = run_training(ModelHost(sd1, "m"), _cfg(str(tmp_path / "a"), img, **kw), resume=part.state_file)
    assert res.status == "done"
    files = lora_files([str(out)])
    assert [os.path.basename(f) for f in files] == ["svs-000001.safetensors", "svs-000002.safetensors",
                                                    "svs.safetensors"]
    assert len({read_metadata(f)["ss_session_id"] for f in files}) == 1  # (one run, cancelled and resumed)
    assert mixed_runs(files) == []
    # started again with another seed over it and stopped after its first epoch: epoch 1 is the new run's
    seen["saves"] = 0
    again = run_training(ModelHost(sd1, "m"), _cfg(str(tmp_path / "a"), img, seed=8, **kw),
                         on_event=cancel_after_first_save, should_cancel=lambda: seen["saves"] >= 1)
    assert again.status == "cancelled"
    assert mixed_runs(lora_files([str(out)])) == [
        "the 'svs' files come from 2 different training runs (their ss_session_id differs): svs-000001 | "
        "svs-000002, svs; their rows are not one run's epochs (a run started again over another one writes this mix)"]


def test_an_image_damaged_mid_run_keeps_the_steps_trained_as_a_resumable_state(sd1, tmp_path):
    """color_aug decodes every step: an image rewritten badly while training stops the run, and the steps so
    far are kept (they were lost), to resume once the image is fixed."""
    img, _ = train_data.make_dataset(str(tmp_path / "d"), n_concept=2, repeats=2)
    victim = sorted(p for p in glob.glob(os.path.join(img, "*", "*.png")))[0]
    good = open(victim, "rb").read()

    def damage(e):
        if e.kind == "step" and e.step == 2:
            with open(victim, "wb") as f:
                f.write(b"not a picture any more")

    cfg = _cfg(str(tmp_path / "a"), img, max_train_epochs=3, color_aug=True)
    with pytest.raises(TrainingError) as err:
        run_training(ModelHost(sd1, "m"), cfg, on_event=damage)
    state = str(tmp_path / "a" / "out" / "svs-cancelled-state.lsstate")
    assert f"cannot read training image {victim!r}" in str(err.value)
    assert (f"The 2 step(s) trained so far are kept as a resumable state, {state}: fix, replace or remove the "
            "image, then resume from it") in str(err.value)
    with open(victim, "wb") as f:
        f.write(good)
    res = run_training(ModelHost(sd1, "m"), _cfg(str(tmp_path / "a"), img, max_train_epochs=3, color_aug=True),
                       resume=state)
    assert res.status == "done" and res.steps == 6


def test_a_state_of_another_name_or_seed_is_resumed_with_a_note(sd1, tmp_path):
    img, _ = train_data.make_dataset(str(tmp_path / "d"), n_concept=2, repeats=1)
    first = run_training(ModelHost(sd1, "m"), _cfg(str(tmp_path / "a"), img, max_train_epochs=1, output_name="intr",
                                                   save_state_on_train_end=True))
    res = run_training(ModelHost(sd1, "m"), _cfg(str(tmp_path / "a"), img, max_train_epochs=2, seed=9),
                       resume=first.state_file)
    assert res.status == "done"
    assert ("resume: the state's run has seed 7, this config says 9; the run goes on with its own seed (its data "
            "order and noise)") in res.notes
    assert ("resume: intr-final-state.lsstate is not of a run named 'svs'; it is continued and saved as 'svs' "
            "(check that it is the run you mean)") in res.notes
