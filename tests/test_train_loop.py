"""The training loop end to end on tiny real models: outputs, resume, cancel, failure, host safety."""

import os
import re

import numpy as np
import pytest
import torch

import models


def state_fingerprint(model):
    """Weights, grads flags and devices (models.model_state_hash), plus train/eval flags and leftover patches."""
    return (models.model_state_hash(model), tuple(m.training for m in model.modules()),
            tuple("forward" in m.__dict__ for m in model.modules()))
import train_data
from lib_lora.apply.layers import layer_mapping
from lib_lora.apply.loader import load_network
from lib_lora.formats.safetensors_io import load_tensors, read_metadata
from lib_lora.host.base import ModelHost
from lib_lora.train.config import parse_train_config
from lib_lora.train.run import run_training
from lib_lora.train.trainer import TrainingError


@pytest.fixture(scope="module")
def sd1():
    return models.make_sd1(seed=3)


def _cfg(root, img, reg=None, **kw):
    c = {"train_data_dir": img, "resolution": 64, "train_batch_size": 2, "output_dir": os.path.join(root, "out"),
         "output_name": "svs", "network_dim": 4, "network_alpha": 2, "learning_rate": 1e-3, "text_encoder_lr": 5e-4,
         "max_train_epochs": 2, "seed": 7, "cache_latents": True}
    if reg:
        c["reg_data_dir"] = reg
    c.update(kw)
    return parse_train_config(c, base_dir=root)


def test_finished_job_writes_kohya_files_that_load_fully(sd1, tmp_path):
    img, reg = train_data.make_dataset(str(tmp_path), n_concept=3, repeats=2, n_reg=2)
    before = state_fingerprint(sd1)
    events = []
    res = run_training(ModelHost(sd1, "tiny-sd1"), _cfg(str(tmp_path), img, reg, save_every_n_epochs=1, save_precision="fp16"),
                       on_event=events.append)
    assert state_fingerprint(sd1) == before
    assert res.status == "done"
    # 3 images x 2 repeats = 6 samples + 6 balanced reg samples = 12 -> 6 batches of 2 per epoch; 2 epochs
    assert res.steps == 12
    names = sorted(os.listdir(tmp_path / "out"))
    assert "svs-000001.safetensors" in names and "svs.safetensors" in names
    sd = load_tensors(res.final)
    assert sd["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"].dtype == torch.float16
    assert sd["lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha"].item() == 2
    md = read_metadata(res.final)
    for key, want in {"ss_network_module": "networks.lora", "ss_network_dim": "4", "ss_network_alpha": "2.0",
                      "ss_base_model_version": "sd_v1", "ss_v2": "False", "ss_num_train_images": "6",
                      "ss_num_reg_images": "2", "ss_num_batches_per_epoch": "6", "ss_max_train_steps": "12",
                      "ss_epoch": "2", "ss_steps": "12", "ss_output_name": "svs", "ss_seed": "7",
                      "modelspec.architecture": "stable-diffusion-v1/lora"}.items():
        assert md[key] == want, key
    assert set(md) >= {"sshs_model_hash", "sshs_legacy_hash", "ss_tag_frequency", "ss_bucket_info", "ss_dataset_dirs"}
    # our own match report, the way the WebUI will load it: every module lands on a layer
    net = load_network(res.final, "sd1", layer_names=set(layer_mapping(sd1)))
    assert net.report.total_modules == 192 + 12 and len(net.report.matched) == net.report.total_modules
    saves = [e.message for e in events if e.kind == "save"]
    assert len(saves) == 2 and all("204/204 modules matched" in m for m in saves), saves
    kinds = {e.kind for e in events}
    assert {"start", "cache", "step", "epoch", "save", "done"} <= kinds


def _train_state(path):
    return {k: v.float() for k, v in load_tensors(path).items()}


def test_resume_after_cancel_gives_the_same_weights(sd1, tmp_path):
    img, _ = train_data.make_dataset(str(tmp_path / "d"), n_concept=4, repeats=2, captions=["svs cat, red", "svs cat"])
    kw = dict(max_train_epochs=3, save_precision="float", shuffle_caption=True, network_dropout=0.1,
              gradient_accumulation_steps=2, flip_aug=True)
    full = run_training(ModelHost(sd1, "m"), _cfg(str(tmp_path / "a"), img, **kw))
    assert full.status == "done" and full.steps == 6  # 8 samples / 2 = 4 batches / accum 2 = 2 steps x 3 epochs
    # cancel in epoch 2, between the two micro-batches of an accumulation window, then resume
    state = {"armed": False, "calls": 0}

    def on_event(e):
        if e.kind == "step" and e.step == 3:
            state["armed"] = True

    def cancel_mid_window():
        if state["armed"]:
            state["calls"] += 1  # call 1: start of the next window; call 2: its second micro-batch
        return state["calls"] >= 2

    before = state_fingerprint(sd1)
    part = run_training(ModelHost(sd1, "m"), _cfg(str(tmp_path / "b"), img, **kw), on_event=on_event,
                        should_cancel=cancel_mid_window)
    assert part.status == "cancelled" and part.state_file and os.path.exists(part.state_file)
    assert part.final is None
    assert state_fingerprint(sd1) == before
    resumed = run_training(ModelHost(sd1, "m"), _cfg(str(tmp_path / "b"), img, **kw), resume=part.state_file)
    assert resumed.status == "done" and resumed.steps == 6
    assert not any("other data" in n for n in resumed.notes), resumed.notes  # (the same data: nothing said)
    a, b = _train_state(full.final), _train_state(resumed.final)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


def test_resume_state_loads_under_the_webuis_torch_load_and_runs_no_code(sd1, tmp_path, monkeypatch):
    """The WebUI swaps torch.load for a checker that turns current torch's zip files down and answers None: a
    resume must not go through it. State files are read by torch's weights-only unpickler (an earlier version's
    -state.pt with numpy's RNG array too), a pickle that would run code is refused unrun, and state files are
    not LoRAs (the WebUI's Lora page lists every .pt: they are not .pt any more, and ours hides the old ones)."""
    import pickle

    from lib_lora.host.discovery import walk_lora_files
    from lib_lora.train.saving import STATE_EXT, StateFileError, load_state

    img, _ = train_data.make_dataset(str(tmp_path / "d"), n_concept=2, repeats=2)
    kw = dict(max_train_epochs=2, save_precision="float", flip_aug=True)
    full = run_training(ModelHost(sd1, "m"), _cfg(str(tmp_path / "a"), img, **kw))
    assert full.status == "done" and full.steps == 4
    seen = {"step": 0}
    part = run_training(ModelHost(sd1, "m"), _cfg(str(tmp_path / "b"), img, **kw),
                        on_event=lambda e: e.kind == "step" and seen.update(step=e.step),
                        should_cancel=lambda: seen["step"] >= 3)
    assert part.status == "cancelled" and part.state_file.endswith("svs-cancelled" + STATE_EXT)
    assert list(walk_lora_files(str(tmp_path / "b" / "out"))) == []
    st = torch.serialization.load(part.state_file, weights_only=True)
    monkeypatch.setattr(torch, "load", lambda *a, **k: None)  # (A1111's modules/safe.py on a file it rejects)
    resumed = run_training(ModelHost(sd1, "m"), _cfg(str(tmp_path / "b"), img, **kw), resume=part.state_file)
    assert resumed.status == "done" and resumed.steps == 4
    a, b = _train_state(full.final), _train_state(resumed.final)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    # the cancel's state has done its work: removed, so it cannot be resumed again over the finished files
    assert not os.path.exists(part.state_file)
    assert any(n == "removed svs-cancelled-state.lsstate: the run it continued has finished" for n in resumed.notes)
    # an earlier version's state: numpy's RNG state as its array, the python state as its tuples, in a -state.pt
    name, keys, *rest = st["rng"]["numpy"]
    py = st["rng"]["python"]
    st["rng"].update(numpy=(name, keys.numpy().astype(np.uint32), *rest), python=(py[0], tuple(py[1]), py[2]))
    old = tmp_path / "c" / "out" / "svs-cancelled-state.pt"
    old.parent.mkdir(parents=True)
    torch.save(st, old)
    assert list(walk_lora_files(str(old.parent))) == []
    checked = load_state(str(old), check_only=True)  # (the CLI's check before the model loads: tensors mapped)
    assert checked["step"] == st["step"] and checked["network"].keys() == st["network"].keys()
    again = run_training(ModelHost(sd1, "m"), _cfg(str(tmp_path / "c"), img, **kw), resume=str(old))
    for k, v in _train_state(again.final).items():
        torch.testing.assert_close(a[k], v, rtol=0, atol=1e-6, msg=k)

    # a state file whose pickle would run code: refused, nothing run
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    evil = tmp_path / "evil-state.lsstate"
    torch.save({**st, "extra": Evil()}, evil, pickle_protocol=pickle.DEFAULT_PROTOCOL)
    for check_only in (False, True):
        with pytest.raises(StateFileError, match="cannot be read as a LoRA Studio resume state"):
            load_state(str(evil), check_only=check_only)
    assert not marker.exists()
    # what a state was mistaken for is named, not torch's unpickler advice
    (tmp_path / "lora.toml").write_text('output_name = "svs"\n')
    for path, said in ((tmp_path / "lora.toml", "lora.toml is a text file (a training config?), not a resume state"),
                       (full.final, "is a LoRA .safetensors file (to train on from its weights, give it as "
                                    "network_weights), not a resume state")):
        with pytest.raises(StateFileError, match=re.escape(said)):
            load_state(str(path))
    with pytest.raises(TrainingError, match="does not exist"):
        run_training(ModelHost(sd1, "m"), _cfg(str(tmp_path / "b"), img, **kw), resume=str(tmp_path / "nope") + STATE_EXT)


def test_cancel_takes_effect_within_one_step(sd1, tmp_path):
    img, _ = train_data.make_dataset(str(tmp_path), n_concept=2, repeats=10)
    steps = []
    flag = {"cancel": False}

    def on_event(e):
        if e.kind == "step":
            steps.append(e.step)
            if e.step == 2:
                flag["cancel"] = True

    res = run_training(ModelHost(sd1, "m"), _cfg(str(tmp_path), img), on_event=on_event,
                       should_cancel=lambda: flag["cancel"])
    assert res.status == "cancelled" and steps == [1, 2]


def test_a_cancel_while_latents_are_cached_is_a_cancel(sd1, tmp_path):
    """A cancel before the first step (latents still caching) ended as a 'failed' job with an empty message; a
    resumed run cancelled there keeps the state it continued from (seen in the browser test on a loaded box)."""
    img, _ = train_data.make_dataset(str(tmp_path / "d"), n_concept=2, repeats=2)
    before = state_fingerprint(sd1)
    events = []
    res = run_training(ModelHost(sd1, "m"), _cfg(str(tmp_path / "a"), img), on_event=events.append,
                       should_cancel=lambda: True)
    assert (res.status, res.steps, res.state_file, res.final) == ("cancelled", 0, None, None)
    assert [e.message for e in events if e.kind == "cancelled"] == [
        "cancelled while caching latents, before the first step; nothing was trained"]
    # a resumed run cancelled before its first step: the state it continued from is kept, with its step
    flag = {"cancel": False}

    def on_event(e):
        flag["cancel"] = flag["cancel"] or (e.kind == "step" and e.step == 2)
    part = run_training(ModelHost(sd1, "m"), _cfg(str(tmp_path / "b"), img), on_event=on_event,
                        should_cancel=lambda: flag["cancel"])
    assert part.status == "cancelled" and part.steps == 2
    mtime = os.stat(part.state_file).st_mtime_ns
    events = []
    again = run_training(ModelHost(sd1, "m"), _cfg(str(tmp_path / "b"), img), resume=part.state_file,
                         should_cancel=lambda: True, on_event=events.append)
    assert (again.status, again.steps, again.state_file) == ("cancelled", 2, part.state_file)
    # (the start event says where the resumed run begins: the job list shows it while latents are cached)
    assert [e.step for e in events if e.kind == "start"] == [2]
    assert os.stat(part.state_file).st_mtime_ns == mtime
    assert state_fingerprint(sd1) == before
    assert not any(p.requires_grad for p in sd1.parameters())


def test_failed_job_leaves_host_exact(sd1, tmp_path):
    img, _ = train_data.make_dataset(str(tmp_path), n_concept=2, repeats=1)
    before = state_fingerprint(sd1)
    host = ModelHost(sd1, "m")

    def boom(e):
        if e.kind == "step":
            raise RuntimeError("CUDA out of memory (simulated)")

    with pytest.raises(RuntimeError, match="simulated"):
        run_training(host, _cfg(str(tmp_path), img, gradient_checkpointing=True), on_event=boom)
    assert state_fingerprint(sd1) == before
    assert not any(p.requires_grad for p in sd1.parameters())
    assert not any(m.training for m in sd1.modules())
    assert host._lock.acquire(blocking=False)  # the lock was released
    host._lock.release()


def test_user_errors_are_explained(sd1, tmp_path):
    empty = tmp_path / "img"
    empty.mkdir()
    with pytest.raises(TrainingError, match="cannot be trained"):
        run_training(ModelHost(sd1, "m"), _cfg(str(tmp_path), str(empty)))
    img, _ = train_data.make_dataset(str(tmp_path / "d"), n_concept=1, repeats=1)
    with pytest.raises(TrainingError, match="learning rates are 0"):
        run_training(ModelHost(sd1, "m"), _cfg(str(tmp_path), img, learning_rate=0, text_encoder_lr=0))


def test_gradient_checkpointing_gives_the_same_step(sd1, tmp_path):
    img, _ = train_data.make_dataset(str(tmp_path / "d"), n_concept=2, repeats=1)
    a = run_training(ModelHost(sd1, "m"), _cfg(str(tmp_path / "a"), img, max_train_epochs=1, save_precision="float"))
    b = run_training(ModelHost(sd1, "m"), _cfg(str(tmp_path / "b"), img, max_train_epochs=1, save_precision="float",
                                                  gradient_checkpointing=True))
    sa, sb = _train_state(a.final), _train_state(b.final)
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-4, atol=1e-6, msg=k)
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in sa.items() if "lora_up" in k)


def test_sd2_v_prediction_trains_and_saves_sd2_metadata(tmp_path):
    # with the WebUI's textual-inversion wrapper on the token embedding (it has no .weight: found in the WebUI)
    sd2 = models.a1111_embedding_hijack(models.make_sd2(seed=1), "sd2")
    before = state_fingerprint(sd2)
    img, _ = train_data.make_dataset(str(tmp_path), n_concept=2, repeats=1)
    res = run_training(ModelHost(sd2, "tiny-sd2"), _cfg(str(tmp_path), img, max_train_epochs=1))
    assert state_fingerprint(sd2) == before
    md = read_metadata(res.final)
    assert md["ss_v2"] == "True" and md["ss_base_model_version"] == "sd_v2_v"
    assert md["modelspec.prediction_type"] == "v"
    net = load_network(res.final, "sd2", layer_names=set(layer_mapping(sd2)))
    assert len(net.report.matched) == net.report.total_modules > 192


def test_sdxl_trains_with_size_conditioning(tmp_path):
    xl = models.a1111_embedding_hijack(models.make_sdxl(seed=2), "sdxl")
    before = state_fingerprint(xl)
    img, _ = train_data.make_dataset(str(tmp_path), n_concept=2, repeats=1)
    res = run_training(ModelHost(xl, "tiny-xl"), _cfg(str(tmp_path), img, max_train_epochs=1))
    assert state_fingerprint(xl) == before
    md = read_metadata(res.final)
    assert md["ss_base_model_version"] == "sdxl_base_v1-0"
    keys = load_tensors(res.final).keys()
    assert any(k.startswith("lora_te1_") for k in keys) and any(k.startswith("lora_te2_") for k in keys)
    # the UNet's attention layers, under kohya's sgm names (sgm's class is SpatialTransformer, as in the WebUI)
    for name in ("input_blocks_4_1_transformer_blocks_0_attn2_to_k", "middle_block_1_proj_in",
                 "output_blocks_5_1_transformer_blocks_1_ff_net_2"):
        assert f"lora_unet_{name}.lora_down.weight" in keys, name
    net = load_network(res.final, "sdxl", layer_names=set(layer_mapping(xl)))
    assert len(net.report.matched) == net.report.total_modules


def test_sd_scripts_noise_and_loss_switches_train(sd1, tmp_path):
    img, _ = train_data.make_dataset(str(tmp_path / "d"), n_concept=2, repeats=2)
    before = state_fingerprint(sd1)
    res = run_training(ModelHost(sd1, "m"), _cfg(str(tmp_path), img, max_train_epochs=1, loss_type="huber",
                                                    huber_schedule="snr", multires_noise_iterations=6,
                                                    ip_noise_gamma=0.1, noise_offset=0.05, adaptive_noise_scale=0.01,
                                                    debiased_estimation_loss=True, min_snr_gamma=5))
    assert res.status == "done" and all(np.isfinite(v) for _, v in res.losses)
    assert not any("not supported" in n for n in res.notes), res.notes
    assert state_fingerprint(sd1) == before


def test_output_folder_and_disk_space_are_checked_before_the_first_step(sd1, tmp_path, monkeypatch):
    """A run refuses, before any step, an output folder it cannot write into and a disk without room for its
    final LoRA and a resume state; it notes when its planned saves would not all fit."""
    import errno
    from collections import namedtuple

    import lib_lora.train.saving as saving

    img, _ = train_data.make_dataset(str(tmp_path / "d"), n_concept=2, repeats=1)
    steps = []
    on_event = lambda e: e.kind == "step" and steps.append(e.step)  # noqa: E731
    (tmp_path / "afile").write_text("x")
    cfg = _cfg(str(tmp_path / "a"), img, max_train_epochs=2)
    cfg.output_dir = str(tmp_path / "afile")
    with pytest.raises(TrainingError, match="is a file, not a folder"):
        run_training(ModelHost(sd1, "m"), cfg, on_event=on_event)

    def no_write(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")
    with monkeypatch.context() as m:
        m.setattr(saving.tempfile, "mkstemp", no_write)
        with pytest.raises(TrainingError, match=r"cannot be written to \(Read-only file system\).*Nothing was trained"):
            run_training(ModelHost(sd1, "m"), _cfg(str(tmp_path / "b"), img, max_train_epochs=2), on_event=on_event)
    usage = namedtuple("usage", "total used free")
    with monkeypatch.context() as m:
        m.setattr(saving.shutil, "disk_usage", lambda p: usage(10 ** 9, 10 ** 9, 100_000))
        with pytest.raises(TrainingError, match=r"has 0\.1 MiB free; about .* MiB is needed for the trained LoRA "
                                                r"and a resume state\. Free some space .* Nothing was trained"):
            run_training(ModelHost(sd1, "m"), _cfg(str(tmp_path / "c"), img, max_train_epochs=2), on_event=on_event)
    assert steps == []
    # (room for the final file and a state, about 9 MiB here, not for three of each: epoch 3's save is the final)
    cfg = _cfg(str(tmp_path / "e"), img, max_train_epochs=3, save_every_n_epochs=1, save_state=True)
    with monkeypatch.context() as m:
        m.setattr(saving.shutil, "disk_usage", lambda p: usage(10 ** 9, 0, 20 * 2 ** 20))
        res = run_training(ModelHost(sd1, "m"), cfg)
    assert res.status == "done"
    assert any("is needed for this run's 3 LoRA file(s) and 3 state(s)" in n for n in res.notes), res.notes
    assert len([f for f in os.listdir(tmp_path / "e" / "out") if f.endswith(".safetensors")]) == 3


def test_resume_with_more_epochs_trains_to_the_new_end_and_another_network_is_refused(sd1, tmp_path):
    """A finished run's state resumed with a longer schedule continues to the new end (progress counts to it); one
    resumed again at its end says there is nothing left; a state of another network_dim is refused with what to
    set, not a traceback."""
    img, _ = train_data.make_dataset(str(tmp_path / "d"), n_concept=2, repeats=1)
    first = run_training(ModelHost(sd1, "m"), _cfg(str(tmp_path / "a"), img, max_train_epochs=1,
                                                   save_state_on_train_end=True))
    assert first.status == "done" and first.state_file and first.steps == 1
    totals = []
    longer = run_training(ModelHost(sd1, "m"), _cfg(str(tmp_path / "a"), img, max_train_epochs=3),
                          on_event=lambda e: e.kind == "step" and totals.append((e.step, e.total)),
                          resume=first.state_file)
    assert longer.status == "done" and longer.steps == 3
    assert totals == [(2, 3), (3, 3)]
    assert any(n.startswith("the state's run was 1 step(s) long, this one is 3: the learning-rate schedule is "
                            "stretched") for n in longer.notes), longer.notes
    again = run_training(ModelHost(sd1, "m"), _cfg(str(tmp_path / "a"), img, max_train_epochs=1),
                         resume=first.state_file)
    assert any("nothing is left to train" in n for n in again.notes), again.notes
    assert not any("schedule is stretched" in n for n in again.notes)
    # (svs.safetensors is the longer run's now: the state's own LoRA is written again, not the other one kept)
    assert "svs.safetensors is kept as that run wrote it (no step was trained)" not in again.notes
    assert "resumed from svs-final-state.lsstate at step 1, the end of its run" in again.notes, again.notes
    final = os.path.join(tmp_path, "a", "out", "svs.safetensors")
    before = os.stat(final).st_mtime_ns
    last = run_training(ModelHost(sd1, "m"), _cfg(str(tmp_path / "a"), img, max_train_epochs=1),
                        resume=first.state_file)  # its own LoRA this time: kept as it is
    assert "svs.safetensors is kept as that run wrote it (no step was trained)" in last.notes, last.notes
    assert os.stat(final).st_mtime_ns == before and last.files == [final] and last.status == "done"
    with pytest.raises(TrainingError, match=r"cannot resume from svs-final-state.lsstate: its network does not fit "
                                            r"this config's: .* Resume with the network settings"):
        run_training(ModelHost(sd1, "m"), _cfg(str(tmp_path / "a"), img, max_train_epochs=2, network_dim=8),
                     resume=first.state_file)


def test_a_cancel_whose_state_cannot_be_written_says_so(sd1, tmp_path, monkeypatch):
    """The output folder went read-only (or the disk filled) during the run: the cancel's state cannot be written.
    The job ends with what happened, not an errno naming a temp file."""
    import errno

    import lib_lora.train.saving as saving

    img, _ = train_data.make_dataset(str(tmp_path / "d"), n_concept=2, repeats=2)

    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / ".tmp-x.tmp"))
    monkeypatch.setattr(saving, "write_atomic", read_only)
    seen = {"step": 0}
    with pytest.raises(TrainingError, match=r"cancelled at step 1, but could not write the resumable state "
                                            r"svs-cancelled-state.lsstate to .*: Read-only file system\. Free some "
                                            r"space or make the folder writable; the run so far could not be kept"):
        run_training(ModelHost(sd1, "m"), _cfg(str(tmp_path / "a"), img, max_train_epochs=2),
                     on_event=lambda e: e.kind == "step" and seen.update(step=e.step),
                     should_cancel=lambda: seen["step"] >= 1)


def _full_disk_after(monkeypatch, fails, code=None):
    """save_lora / the state writer fail with ENOSPC (or ``code``) for the file names ``fails(name)`` says, as a
    full disk does."""
    import errno
    code = code or errno.ENOSPC

    import lib_lora.train.saving as saving
    import lib_lora.train.trainer as trainer_mod
    real_save_lora, real_write = trainer_mod.save_lora, saving.write_atomic
    tried = []

    def no_space(path):
        raise OSError(code, os.strerror(code), os.path.join(os.path.dirname(path), ".x.tmp"))

    def save_lora(path, *a, **k):
        tried.append(os.path.basename(path))
        if fails(os.path.basename(path)):
            from lib_lora.formats.errors import LoraFileError
            try:
                no_space(path)
            except OSError as e:  # (what save_file_atomic raises on ENOSPC)
                raise LoraFileError(f"the disk is full: could not write {os.path.basename(path)}", path) from e
        return real_save_lora(path, *a, **k)

    def write_atomic(path, *a, **k):
        tried.append(os.path.basename(path))
        if fails(os.path.basename(path)):
            no_space(path)
        return real_write(path, *a, **k)
    monkeypatch.setattr(trainer_mod, "save_lora", save_lora)
    monkeypatch.setattr(saving, "write_atomic", write_atomic)
    return tried


def test_a_full_disk_costs_the_saves_it_blocks_not_the_run(sd1, tmp_path, monkeypatch):
    """The disk fills mid-run: an epoch save (and its state) that cannot be written is said and skipped, training
    goes on; the final LoRA waits for room (tried again until it fits) instead of throwing the finished training
    away; a final state that does not fit is said, the LoRA is kept. The host model is untouched."""
    import lib_lora.train.trainer as trainer_mod
    img, _ = train_data.make_dataset(str(tmp_path / "d"), n_concept=2, repeats=1)
    before = state_fingerprint(sd1)
    monkeypatch.setattr(trainer_mod.Trainer, "final_save_retry_s", 0.01)
    final_tries, while_waiting = [], []
    host = ModelHost(sd1, "m")

    def fails(name):
        if name == "svs.safetensors":
            final_tries.append(name)
            if len(final_tries) > 1:  # the wait gives the model back: generation is not held up by it
                while_waiting.append((host._lock.locked(), state_fingerprint(sd1) == before))
            return len(final_tries) <= 2  # room is made while it waits
        return name in ("svs-000001.safetensors", "svs-000001-state.lsstate", "svs-final-state.lsstate")
    tried = _full_disk_after(monkeypatch, fails)
    steps = []
    res = run_training(host, _cfg(str(tmp_path / "a"), img, max_train_epochs=3, save_every_n_epochs=1,
                                  save_state=True),
                       on_event=lambda e: e.kind == "step" and steps.append(e.step))
    assert res.status == "done" and steps == [1, 2, 3], (res.status, steps)
    assert while_waiting == [(False, True), (False, True)], while_waiting
    out = str(tmp_path / "a" / "out")
    assert sorted(os.listdir(out)) == ["svs-000002-state.lsstate", "svs-000002.safetensors", "svs.safetensors"]
    assert res.final == os.path.join(out, "svs.safetensors") and res.state_file is None
    assert len(final_tries) == 3 and tried.count("svs.safetensors") == 3
    notes = "\n".join(res.notes)
    assert (f"could not write svs-000001.safetensors to {out}: the disk is full. Training goes on and the next save "
            "tries again") in notes
    assert "could not write the state of epoch 1" in notes
    assert (f"could not write the final state to {out}: the disk is full. The final LoRA is saved; the run cannot be "
            "resumed from its end (its newest state, if any, is an earlier one)") in notes
    assert (f"could not write the final LoRA svs.safetensors to {out}: the disk is full. The training is finished "
            "and kept in memory: free some space and it is written") in notes
    assert "The model is given back meanwhile" in notes and "image generation goes on" not in notes  # (headless)
    assert state_fingerprint(sd1) == before
    # the final LoRA written after the model went back holds the trained weights (as a run with room writes them)
    monkeypatch.undo()
    roomy = run_training(ModelHost(sd1, "m"), _cfg(str(tmp_path / "r"), img, max_train_epochs=3, save_every_n_epochs=1,
                                                    save_state=True))
    a, b = _train_state(res.final), _train_state(roomy.final)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_full_disk_costs_the_latent_disk_cache_and_sample_pictures_only(sd1, tmp_path, monkeypatch):
    """cache_latents_to_disk and sample images are conveniences: when they cannot be written the run says so and
    trains on (latents kept in memory)."""
    import errno

    import lib_lora.train.trainer as trainer_mod
    from lib_lora.formats.errors import LoraFileError
    img, _ = train_data.make_dataset(str(tmp_path / "d"), n_concept=2, repeats=1)

    def no_space(tensors, path, metadata=None):
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as e:
            raise LoraFileError("the disk is full", path) from e
    monkeypatch.setattr(trainer_mod, "save_file_atomic", no_space)
    sampled = []

    def sample_fn(epoch=None, step=None):
        sampled.append(epoch)
        raise OSError(errno.ENOSPC, "No space left on device", "/x/sample.png")
    res = run_training(ModelHost(sd1, "m"), _cfg(str(tmp_path / "a"), img, max_train_epochs=2,
                                                  cache_latents_to_disk=True, sample_every_n_epochs=1),
                       sample_fn=sample_fn)
    assert res.status == "done" and res.steps == 2 and sampled == [1, 2]
    cache = os.path.join(str(tmp_path / "a" / "out"), ".lora-studio-cache", "latents")
    assert (f"the latent disk cache in {cache} could not be written (the disk is full); this run keeps its latents in "
            "memory, the next one encodes the missing ones again") in res.notes
    assert "the sample images of epoch 1 could not be written (the disk is full); training goes on" in res.notes
    assert os.listdir(cache) == []


def test_a_sample_set_that_fails_costs_itself_not_the_run(sd1, tmp_path, capsys):
    """Any error inside the sample function (a size or option the model cannot take, memory running out there)
    failed the run with a traceback, before that epoch's save: with one epoch nothing was kept."""
    img, _ = train_data.make_dataset(str(tmp_path / "d"), n_concept=2, repeats=1)
    sampled = []

    def sample_fn(epoch=None, step=None):
        sampled.append(epoch)
        raise RuntimeError("Sizes of tensors must match except in dimension 1. Expected size 4 but got size 3")
    res = run_training(ModelHost(sd1, "m"), _cfg(str(tmp_path / "a"), img, max_train_epochs=1,
                                                  sample_every_n_epochs=1), sample_fn=sample_fn)
    assert res.status == "done" and res.final and os.path.exists(res.final) and sampled == [1]
    assert ("the sample images of epoch 1 failed (RuntimeError: Sizes of tensors must match except in dimension 1. "
            "Expected size 4 but got size 3); training goes on without them. Check the sample prompts' sizes and "
            "options, or turn samples off") in res.notes
    assert "Traceback" in capsys.readouterr().err


def test_a_loss_log_that_stops_fitting_is_said_and_training_goes_on(sd1, tmp_path, monkeypatch):
    """logging_dir's CSV: a folder that cannot be written refuses the run before it starts; a disk that fills
    mid-run stops the log (rows so far kept), not the run."""
    import errno

    import lib_lora.train.saving as saving
    img, _ = train_data.make_dataset(str(tmp_path / "d"), n_concept=2, repeats=2)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(TrainingError, match=r"logging_dir: the loss log .*losses.csv cannot be written \(.*\); "
                                            r"choose a folder you can write to, or leave logging_dir empty"):
        run_training(ModelHost(sd1, "m"), _cfg(str(tmp_path / "a"), img, max_train_epochs=1,
                                               logging_dir=str(tmp_path / "afile")))

    class Filling:
        def __init__(self, f):
            self.f, self.rows = f, 0

        def write(self, text):
            self.rows += 1
            if self.rows > 3:  # header + two rows fit
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(text)

        def __getattr__(self, name):
            return getattr(self.f, name)
    monkeypatch.setattr(saving, "open", lambda *a, **k: Filling(open(*a, **k)), raising=False)
    res = run_training(ModelHost(sd1, "m"), _cfg(str(tmp_path / "b"), img, max_train_epochs=2, train_batch_size=1,
                                                  logging_dir=str(tmp_path / "logs")))
    assert res.status == "done" and res.steps == 8
    assert any(n.startswith("the loss log ") and n.endswith("stopped at step 3 (the disk is full); training goes on")
               for n in res.notes), res.notes
    (run_dir,) = os.listdir(tmp_path / "logs")
    rows = open(tmp_path / "logs" / run_dir / "losses.csv").read().splitlines()
    assert rows[0].startswith("step,") and [r.split(",")[0] for r in rows[1:]] == ["1", "2"]


def test_a_final_lora_that_never_fits_fails_after_the_wait_and_a_cancel_keeps_a_state(sd1, tmp_path, monkeypatch):
    """No room ever: after the wait the run fails naming the newest file it saved. A cancel while it waits saves a
    resumable state (room for it here) that then only writes the final LoRA."""
    import lib_lora.train.trainer as trainer_mod
    img, _ = train_data.make_dataset(str(tmp_path / "d"), n_concept=2, repeats=1)
    before = state_fingerprint(sd1)
    monkeypatch.setattr(trainer_mod.Trainer, "final_save_retry_s", 0.01)
    monkeypatch.setattr(trainer_mod.Trainer, "final_save_wait_s", 0.2)
    _full_disk_after(monkeypatch, lambda name: name == "svs.safetensors")
    with pytest.raises(TrainingError, match=r"the final LoRA svs.safetensors could not be written to .*: the disk "
                                            r"is full, still after .* minutes of waiting; the newest saved file is "
                                            r"svs-000001.safetensors\. Free some space"):
        run_training(ModelHost(sd1, "m"), _cfg(str(tmp_path / "a"), img, max_train_epochs=2, save_every_n_epochs=1))
    assert state_fingerprint(sd1) == before
    import errno  # a folder gone read-only: the advice fits it
    _full_disk_after(monkeypatch, lambda name: name == "svs.safetensors", errno.EROFS)
    with pytest.raises(TrainingError, match=r"Read-only file system, still after .* minutes of waiting; no file of "
                                            r"this run was saved\. Make the folder writable again"):
        run_training(ModelHost(sd1, "m"), _cfg(str(tmp_path / "c"), img, max_train_epochs=1))

    monkeypatch.setattr(trainer_mod.Trainer, "final_save_wait_s", 60.0)
    waiting = {"now": False}

    def on_event(e):
        if e.kind == "note" and "could not write the final LoRA" in e.message:
            waiting["now"] = True
    res = run_training(ModelHost(sd1, "m"), _cfg(str(tmp_path / "b"), img, max_train_epochs=2),
                       on_event=on_event, should_cancel=lambda: waiting["now"])
    assert res.status == "cancelled" and res.state_file.endswith("svs-cancelled-state.lsstate")
    monkeypatch.undo()  # room for the LoRA only: resuming writes the final LoRA without training a step
    from collections import namedtuple

    import lib_lora.train.saving as saving
    monkeypatch.setattr(saving.shutil, "disk_usage",
                        lambda p: namedtuple("usage", "total used free")(10 ** 9, 0, 3 * 2 ** 20))
    steps = []
    again = run_training(ModelHost(sd1, "m"), _cfg(str(tmp_path / "b"), img, max_train_epochs=2),
                         resume=res.state_file, on_event=lambda e: e.kind == "step" and steps.append(e.step))
    assert again.status == "done" and steps == [] and os.path.exists(again.final)
    assert any(n.startswith("the state was saved after the last step (2), before the final LoRA was written") for n
               in again.notes) and not any("nothing is left to train" in n for n in again.notes), again.notes
    assert state_fingerprint(sd1) == before


def test_seed_minus_one_draws_a_random_seed_and_says_which(sd1, tmp_path):
    """-1 means random, as in the WebUI's seed fields (sd-scripts would stop on it); the drawn seed is named and
    repeats the run."""
    from lib_lora.formats.safetensors_io import read_metadata
    img, _ = train_data.make_dataset(str(tmp_path / "d"), n_concept=2, repeats=1)
    a = run_training(ModelHost(sd1, "m"), _cfg(str(tmp_path / "a"), img, max_train_steps=1, seed=-1))
    note = next(n for n in a.notes if n.startswith("seed = -1: a random seed was drawn, "))
    drawn = int(read_metadata(a.final)["ss_seed"])
    assert note.endswith(f"set seed = {drawn} to repeat this run") and drawn >= 0
    b = run_training(ModelHost(sd1, "m"), _cfg(str(tmp_path / "b"), img, max_train_steps=1, seed=drawn))
    assert not any("random seed" in n for n in b.notes)
    ta, tb = _train_state(a.final), _train_state(b.final)
    assert all(torch.equal(ta[k], tb[k]) for k in ta)


def test_network_weights_for_another_model_family_says_so(sd1, tmp_path):
    from safetensors.torch import save_file
    img, _ = train_data.make_dataset(str(tmp_path / "d"), n_concept=2, repeats=1)
    save_file({"lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k.lora_down.weight": torch.zeros(4, 2048),
               "lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k.lora_up.weight": torch.zeros(640, 4),
               "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(4, 1280)},
              str(tmp_path / "xl.safetensors"))
    with pytest.raises(TrainingError, match=r"network_weights: .*xl.safetensors is a LoRA for SDXL, the loaded model is SD1"):
        run_training(ModelHost(sd1, "m"), _cfg(str(tmp_path / "a"), img, max_train_steps=1,
                                               network_weights=str(tmp_path / "xl.safetensors")))
