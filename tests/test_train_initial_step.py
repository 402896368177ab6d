"""sd-scripts' initial_epoch / initial_step / skip_until_initial_step: where a run starts, what it trains, how its
files are numbered."""

import os

import pytest
import torch

import models
import train_data
from lib_lora.formats.safetensors_io import load_tensors
from lib_lora.host.base import ModelHost
from lib_lora.train import trainer as trainer_mod
from lib_lora.train.buckets import compute_steps, start_point
from lib_lora.train.config import parse_train_config
from lib_lora.train.dataset import build_plan
from lib_lora.train.run import run_training


def test_start_point_by_hand():
    st = compute_steps(10, 1, max_train_epochs=5)  # 10 steps per epoch, 50 steps
    assert start_point(st).explanation == "" and start_point(st, initial_epoch=1).step == 0
    # without skip only the epoch number moves (train_network.py: epoch_to_start = step // steps per epoch,
    # global_step = 0); the run stops with the last epoch
    p = start_point(st, initial_epoch=3)
    assert (p.first_epoch, p.skip_batches, p.step, p.end_step) == (3, 0, 0, 30)
    p = start_point(st, initial_step=25)
    assert (p.first_epoch, p.skip_batches, p.step, p.end_step) == (3, 0, 0, 30)
    # initial_step wins over initial_epoch
    assert start_point(st, initial_epoch=5, initial_step=12).first_epoch == 2
    # with skip: epoch 3 after its first 5 batches, the step counter at 25
    p = start_point(st, initial_step=25, skip_until_initial_step=True)
    assert (p.first_epoch, p.skip_batches, p.step, p.end_step) == (3, 5, 25, 50)
    # gradient accumulation: 9 batches, accum 2 -> 5 optimizer steps per epoch (the last of 1 batch);
    # step 7 = epoch 2 after 2 steps = 4 batches (sd-scripts' own count lands in epoch 3 here)
    st = compute_steps(9, 2, max_train_epochs=4)
    p = start_point(st, initial_step=7, skip_until_initial_step=True)
    assert (p.first_epoch, p.skip_batches, p.step, p.end_step) == (2, 4, 7, 20)
    p = start_point(st, initial_step=10, skip_until_initial_step=True)
    assert (p.first_epoch, p.skip_batches, p.step) == (3, 0, 10)
    # a max_train_steps run whose last epoch is cut
    st = compute_steps(10, 1, max_train_steps=45)
    assert start_point(st, initial_epoch=4).end_step == 20
    assert start_point(st, initial_epoch=5).end_step == 10
    with pytest.raises(ValueError, match=r"initial_step 45 is not before the end of the run \(max_train_steps 45\)"):
        start_point(st, initial_step=45)
    with pytest.raises(ValueError, match="initial_epoch 6 = step 50 is not before the end"):
        start_point(st, initial_epoch=6)
    with pytest.raises(ValueError, match="initial_epoch must be 1 or more"):
        start_point(st, initial_epoch=-1)
    assert start_point(st, initial_epoch=0).explanation == ""  # sd-scripts runs 0 as the first epoch
    with pytest.raises(ValueError, match="initial_step must be 0 or more"):
        start_point(st, initial_step=-1)


def _cfg(root, img, **kw):
    c = {"train_data_dir": img, "resolution": 64, "train_batch_size": 2, "output_dir": os.path.join(root, "out"),
         "output_name": "svs", "network_dim": 4, "network_alpha": 2, "learning_rate": 1e-2, "text_encoder_lr": 5e-3,
         "max_train_epochs": 3, "seed": 7, "cache_latents": True, "optimizer_type": "torch.optim.SGD",
         "lr_scheduler": "constant", "save_precision": "float", "gradient_accumulation_steps": 2,
         "shuffle_caption": True, "flip_aug": True}
    c.update(kw)
    return parse_train_config(c, base_dir=root)


def test_plan_reports_the_start_and_refuses_a_start_after_the_end(tmp_path):
    img, _ = train_data.make_dataset(str(tmp_path / "d"), n_concept=4, repeats=2)
    plan = build_plan(_cfg(str(tmp_path), img, initial_epoch=2), family="sd1")
    assert plan.start.first_epoch == 2 and not plan.errors
    info = [f.message for f in plan.findings if f.code == "initial-step-schedule"]
    assert info and "this run makes 4 of its 6 steps" in info[0] and "resume from its state file" in info[0]
    assert "Start: initial_epoch 2 = step 2: starts at epoch 2" in plan.report()
    plan = build_plan(_cfg(str(tmp_path), img, initial_step=6, skip_until_initial_step=True), family="sd1")
    assert [f.message for f in plan.errors] == [
        "initial_step 6 is not before the end of the run (max_train_steps 6); give an earlier start or a longer run"]
    plan = build_plan(_cfg(str(tmp_path), img, skip_until_initial_step=True), family="sd1")
    assert any(f.code == "skip-without-initial-step" for f in plan.findings) and not plan.errors


@pytest.fixture()
def seeds(monkeypatch):
    """The step seed of every micro-batch the loop trains (a function of seed, epoch and batch index)."""
    got = []
    real = trainer_mod.StepBatch

    def record(*a, **kw):
        sb = real(*a, **kw)
        got.append(sb.step_seed)
        return sb
    monkeypatch.setattr(trainer_mod, "StepBatch", record)
    return got


def test_skip_until_initial_step_continues_the_uninterrupted_run(tmp_path, seeds):
    """SGD without momentum at a constant rate keeps no state, so a run started from the uninterrupted run's step-3
    file with skip_until_initial_step must end on its weights: same data, captions, flips and noise per step."""
    sd1 = models.make_sd1(seed=3)
    img, _ = train_data.make_dataset(str(tmp_path / "d"), n_concept=4, repeats=2,
                                     captions=["svs cat, red", "svs cat, blue"])
    # 8 samples / batch 2 = 4 batches / accum 2 = 2 steps per epoch, 3 epochs
    full = run_training(ModelHost(sd1, "m"), _cfg(str(tmp_path / "a"), img, save_every_n_steps=3))
    assert full.status == "done" and full.steps == 6
    full_seeds = list(seeds)
    assert len(full_seeds) == 12
    seeds.clear()
    step3 = os.path.join(str(tmp_path / "a" / "out"), "svs-step00000003.safetensors")
    events = []
    cont = run_training(ModelHost(sd1, "m"), _cfg(str(tmp_path / "b"), img, network_weights=step3, initial_step=3,
                                                  skip_until_initial_step=True, save_every_n_steps=4),
                        on_event=events.append)
    assert cont.status == "done" and cont.steps == 6
    assert seeds == full_seeds[6:]  # step 3 ends after 6 micro-batches
    steps = [(e.step, e.epoch, e.total) for e in events if e.kind == "step"]
    assert steps == [(4, 2, 6), (5, 3, 6), (6, 3, 6)]
    assert sorted(os.listdir(tmp_path / "b" / "out")) == ["svs-step00000004.safetensors", "svs.safetensors"]
    a, b = load_tensors(full.final), load_tensors(cont.final)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=k)
    assert any(n.startswith("start: initial_step 3: starts at step 3 (epoch 2, after its first 2 batches)")
               for n in cont.notes)


def test_initial_epoch_moves_the_epoch_number_only(tmp_path, seeds):
    sd1 = models.make_sd1(seed=3)
    img, _ = train_data.make_dataset(str(tmp_path / "d"), n_concept=4, repeats=2)
    full = run_training(ModelHost(sd1, "m"), _cfg(str(tmp_path / "a"), img))
    full_seeds = list(seeds)
    seeds.clear()
    events = []
    res = run_training(ModelHost(sd1, "m"), _cfg(str(tmp_path / "b"), img, initial_epoch=2, save_every_n_epochs=1,
                                                 sample_at_first=False),
                       on_event=events.append)
    assert full.status == res.status == "done" and res.steps == 4
    # epochs 2 and 3 with their own data; the step count restarts at 0 and the run is 4 steps long
    assert seeds == full_seeds[4:]
    assert [(e.step, e.epoch, e.total) for e in events if e.kind == "step"] == [
        (1, 2, 4), (2, 2, 4), (3, 3, 4), (4, 3, 4)]
    assert [e.epoch for e in events if e.kind == "epoch"] == [2, 3]
    assert sorted(os.listdir(tmp_path / "b" / "out")) == ["svs-000002.safetensors", "svs.safetensors"]


def test_resume_keeps_its_own_position(tmp_path):
    sd1 = models.make_sd1(seed=3)
    img, _ = train_data.make_dataset(str(tmp_path / "d"), n_concept=4, repeats=2)
    flag = {"n": 0}

    def on_event(e):
        if e.kind == "step":
            flag["n"] = e.step
    part = run_training(ModelHost(sd1, "m"), _cfg(str(tmp_path / "a"), img, initial_epoch=2), on_event=on_event,
                        should_cancel=lambda: flag["n"] >= 1)
    assert part.status == "cancelled" and part.steps == 1
    events = []
    res = run_training(ModelHost(sd1, "m"), _cfg(str(tmp_path / "a"), img, initial_step=1), resume=part.state_file,
                       on_event=events.append)
    # the state's run goes on: 3 more steps to the end of epoch 3, shown out of 4
    assert res.status == "done" and res.steps == 4
    assert [(e.step, e.total) for e in events if e.kind == "step"] == [(2, 4), (3, 4), (4, 4)]
    assert any("initial_epoch / initial_step are not used with resume" in n for n in res.notes)
