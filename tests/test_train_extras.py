"""sd-scripts keys that tutorials set and the trainer now honours: zero_terminal_snr, scale_weight_norms,
sample_every_n_steps / sample_at_first, save_last_n_steps, no_metadata.

References: diffusers' rescale_zero_terminal_snr (the paper's algorithm, written independently of ours); kohya's
apply_max_norm_regularization (its explicit up @ down delta, reproduced here from networks/lora.py, not our
r x r trace identity); sd-scripts' get_remove_step_no for which step files remain, worked out by hand below.
"""

import logging
import os

import numpy as np
import pytest
import torch

import models
import train_data
from lib_lora.formats.safetensors_io import load_tensors, read_metadata
from lib_lora.host.base import ModelHost
from lib_lora.train.config import parse_train_config
from lib_lora.train.lora_net import LoRANetwork, LoRAPair
from lib_lora.train.loss import NoiseSchedule, zero_terminal_snr
from lib_lora.train.run import plan_for
from lib_lora.train.trainer import Trainer, TrainingError


@pytest.fixture(scope="module")
def sd1():
    return models.make_sd1(seed=8)


def _run(model, tmp_path, img, sample_fn=None, **kw):
    c = {"train_data_dir": img, "resolution": 64, "train_batch_size": 1, "output_dir": str(tmp_path / "out"),
         "output_name": "x", "network_dim": 4, "network_alpha": 2, "learning_rate": 1e-3, "text_encoder_lr": 5e-4,
         "seed": 3, "save_precision": "float"}
    c.update(kw)
    if img is None:  # (a dataset_config run)
        c.pop("train_data_dir")
    cfg = parse_train_config(c, base_dir=str(tmp_path))
    host = ModelHost(model, "m")
    events = []
    tr = Trainer(host, cfg, plan_for(host, cfg), on_event=events.append, sample_fn=sample_fn)
    return tr, tr.run(), events


# ---- zero_terminal_snr --------------------------------------------------------------------------------------------
def test_zero_terminal_snr_matches_diffusers_rescale(sd1):
    from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr

    ac = sd1.alphas_cumprod.double()
    betas = 1 - torch.cat([ac[:1], ac[1:] / ac[:-1]])
    want = torch.cumprod(1 - rescale_zero_terminal_snr(betas), 0)
    got = zero_terminal_snr(ac)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert got[-1] == 0 and got[0] == pytest.approx(float(ac[0]), rel=1e-12)


def test_zero_terminal_snr_noises_to_pure_noise_and_keeps_the_original_snr_weights(sd1, tmp_path):
    ac = sd1.alphas_cumprod
    sch = NoiseSchedule(zero_terminal_snr(ac), "v", snr_from=ac)
    x0, noise = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    t = torch.tensor([999])
    torch.testing.assert_close(sch.add_noise(x0, noise, t), noise)
    torch.testing.assert_close(sch.target(x0, noise, t), -x0)  # v at ᾱ = 0
    torch.testing.assert_close(sch.snr, NoiseSchedule(ac, "v").snr)  # sd-scripts' all_snr comes first
    assert torch.isfinite(sch.min_snr_weight(torch.arange(1000), 5.0)).all()
    img, _ = train_data.make_dataset(str(tmp_path / "d"), n_concept=2, repeats=1)
    tr, res, _ = _run(sd1, tmp_path, img, max_train_steps=2, zero_terminal_snr=True, min_snr_gamma=5)
    assert res.status == "done" and all(v == v for _, v in res.losses)  # no NaN
    assert any("zero_terminal_snr is meant for v-prediction" in n for n in res.notes)
    assert not any("zero_terminal_snr" in n and "not supported" in n for n in res.notes)
    assert float(tr.runner.schedule.sqrt_ac[-1]) == 0.0


# ---- scale_weight_norms -------------------------------------------------------------------------------------------
def _kohya_max_norm(pairs, max_norm):
    """networks/lora.py apply_max_norm_regularization on (up, down, alpha) tensors (explicit delta)."""
    out, norms, scaled_keys = [], [], 0
    for up, down, alpha in pairs:
        up, down = up.clone(), down.clone()
        scale = alpha / down.shape[0]
        if up.shape[2:] == (1, 1) and down.shape[2:] == (1, 1):
            updown = (up.squeeze(2).squeeze(2) @ down.squeeze(2).squeeze(2)).unsqueeze(2).unsqueeze(3)
        elif up.shape[2:] == (3, 3) or down.shape[2:] == (3, 3):
            updown = torch.nn.functional.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3)
        else:
            updown = up @ down
        updown *= scale
        norm = updown.norm().clamp(min=max_norm / 2)
        desired = torch.clamp(norm, max=max_norm)
        ratio = desired.cpu() / norm.cpu()
        sqrt_ratio = ratio ** 0.5
        if ratio != 1:
            scaled_keys += 1
            up *= sqrt_ratio
            down *= sqrt_ratio
        norms.append((updown.norm() * ratio).item())
        out.append((up, down))
    return out, scaled_keys, sum(norms) / len(norms), max(norms)


def test_max_norm_matches_kohya_for_linear_conv1x1_and_conv3x3():
    torch.manual_seed(0)
    pairs = [LoRAPair(64, 48, 8, 4.0), LoRAPair(32, 40, 4, 4.0, kernel=1), LoRAPair(16, 24, 4, 2.0, kernel=3, padding=1),
             LoRAPair(20, 20, 2, 1.0)]
    for i, p in enumerate(pairs):  # one module below the limit, the others above
        torch.nn.init.normal_(p.lora_up.weight, std=0.02 if i == 3 else 0.5)
    net = LoRANetwork.__new__(LoRANetwork)
    torch.nn.Module.__init__(net)
    net.pairs = torch.nn.ModuleDict({f"lora_unet_m{i}": p for i, p in enumerate(pairs)})
    ref = [(p.lora_up.weight.detach().clone(), p.lora_down.weight.detach().clone(), float(p.alpha)) for p in pairs]
    want, keys, mean, mx = _kohya_max_norm(ref, 1.0)
    got_keys, got_mean, got_max = net.max_norm_regularize(1.0)
    assert int(got_keys) == keys == 3
    assert float(got_mean) == pytest.approx(mean, rel=1e-5) and float(got_max) == pytest.approx(mx, rel=1e-5)
    for p, (up, down) in zip(pairs, want):
        torch.testing.assert_close(p.lora_up.weight.detach(), up, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(p.lora_down.weight.detach(), down, rtol=1e-5, atol=1e-7)


def test_scale_weight_norms_in_training_caps_every_saved_module(sd1, tmp_path):
    img, _ = train_data.make_dataset(str(tmp_path / "d"), n_concept=2, repeats=2)
    cap = 0.02
    tr, res, events = _run(sd1, tmp_path, img, max_train_steps=4, learning_rate=5e-2, unet_lr=5e-2,
                           text_encoder_lr=5e-2, scale_weight_norms=cap)
    steps = [e for e in events if e.kind == "step"]
    assert steps and all({"keys_scaled", "average_key_norm", "max_key_norm"} <= set(e.extra) for e in steps)
    assert any(e.extra["keys_scaled"] > 0 for e in steps)
    assert all(e.extra["max_key_norm"] <= cap * (1 + 1e-4) for e in steps)
    w = load_tensors(res.final)
    md = read_metadata(res.final)
    assert md["ss_scale_weight_norms"] == str(cap)
    for k in w:
        if k.endswith("lora_down.weight"):
            base = k[: -len(".lora_down.weight")]
            up, down = w[base + ".lora_up.weight"].float().flatten(1), w[k].float().flatten(1)
            scale = float(w[base + ".alpha"]) / down.shape[0]
            assert float((up @ down).norm()) * scale <= cap * (1 + 1e-3), base


# ---- samples by steps, at first --------------------------------------------------------------------------------
def test_samples_every_n_steps_and_at_first(sd1, tmp_path):
    img, _ = train_data.make_dataset(str(tmp_path / "d"), n_concept=2, repeats=2)  # 4 steps per epoch at batch 1
    calls = []

    def sample_fn(epoch, step):
        calls.append((epoch, step))
        return []

    _, res, _ = _run(sd1, tmp_path, img, sample_fn=sample_fn, max_train_steps=7, sample_every_n_steps=3,
                     sample_at_first=True)
    assert res.status == "done"
    # first (named e000000), every 3 steps (named by step: epoch None), and the end of the last epoch
    assert calls == [(0, 0), (None, 3), (None, 6), (2, 7)]
    # epochs win when both are set (sd-scripts)
    calls.clear()
    _run(sd1, tmp_path / "b", img, sample_fn=sample_fn, max_train_steps=8, sample_every_n_steps=3,
         sample_every_n_epochs=1)
    assert calls == [(1, 4), (2, 8)]


def test_samples_are_told_the_file_saved_with_their_weights(sd1, tmp_path):
    """For the <lora:> tag in the samples' PNG info: the file saved at that step or epoch, or None."""
    img, _ = train_data.make_dataset(str(tmp_path / "d"), n_concept=2, repeats=2)  # 4 steps per epoch at batch 1
    calls = []

    def sample_fn(epoch, step, lora=None):
        calls.append((epoch, step, lora))
        return []

    _, res, _ = _run(sd1, tmp_path, img, sample_fn=sample_fn, max_train_steps=7, sample_every_n_steps=3,
                     save_every_n_steps=6, sample_at_first=True)
    assert calls == [(0, 0, None), (None, 3, None), (None, 6, "x-step00000006"), (2, 7, "x")]
    calls.clear()
    _run(sd1, tmp_path / "b", img, sample_fn=sample_fn, max_train_epochs=3, sample_every_n_epochs=1,
         save_every_n_epochs=2)
    assert calls == [(1, 4, None), (2, 8, "x-000002"), (3, 12, "x")]
    assert sorted(f for f in os.listdir(tmp_path / "b" / "out") if f.endswith(".safetensors")) == [
        "x-000002.safetensors", "x.safetensors"]


# ---- save_last_n_steps, no_metadata --------------------------------------------------------------------------------
def test_save_last_n_steps_keeps_what_sd_scripts_keeps(sd1, tmp_path):
    img, _ = train_data.make_dataset(str(tmp_path / "d"), n_concept=2, repeats=3)
    # sd-scripts' get_remove_step_no at each save: step 2 -> -2 (none), 4 -> 0 (none), 6 -> 2, 8 -> 4
    _, res, _ = _run(sd1, tmp_path, img, max_train_steps=9, save_every_n_steps=2, save_last_n_steps=3)
    out = sorted(f for f in os.listdir(tmp_path / "out") if f.endswith(".safetensors"))
    assert out == ["x-step00000006.safetensors", "x-step00000008.safetensors", "x.safetensors"]
    assert sum("removed old save" in n for n in res.notes) == 2


def test_no_metadata_keeps_only_the_minimum_keys(sd1, tmp_path):
    img, _ = train_data.make_dataset(str(tmp_path / "d"), n_concept=2, repeats=1)
    _, res, _ = _run(sd1, tmp_path, img, max_train_steps=1, no_metadata=True)
    md = read_metadata(res.final)
    ss = {k for k in md if k.startswith("ss_")}
    assert ss == {"ss_v2", "ss_base_model_version", "ss_network_module", "ss_network_dim", "ss_network_alpha"} \
        or ss == {"ss_v2", "ss_base_model_version", "ss_network_module", "ss_network_dim", "ss_network_alpha",
                  "ss_network_args"}, ss
    assert {"sshs_model_hash", "sshs_legacy_hash"} <= set(md) and any(k.startswith("modelspec.") for k in md)


# ---- validation loss ---------------------------------------------------------------------------------------------
def test_validation_loss_on_held_out_images(sd1, tmp_path, monkeypatch):
    """validation_split holds images out; their loss is computed at sd-scripts' 4 fixed timesteps with fixed noise,
    LoRA dropout off, every epoch by default and every n steps when asked; it is logged, kept and written to
    the metadata, and the same weights always give the same number."""
    from lib_lora.train import fastpath
    img, _ = train_data.make_dataset(str(tmp_path / "d"), n_concept=4, repeats=1)
    seen_t = []
    orig = fastpath.StepRunner._loss

    def spy(self, x0, ctx, y, weights, noise, t, in_noise=None, mask=None):
        if not torch.is_grad_enabled():  # validation runs under no_grad
            seen_t.append(sorted(set(t.tolist())))
        return orig(self, x0, ctx, y, weights, noise, t, in_noise, mask)

    monkeypatch.setattr(fastpath.StepRunner, "_loss", spy)
    tr, res, events = _run(sd1, tmp_path, img, max_train_steps=4, validation_split=0.5, validate_every_n_steps=1,
                           network_dropout=0.3)
    val = [e for e in events if e.kind == "validation"]
    # 2 of 4 images held out -> 2 training steps per epoch: every step, and at the end of each of the 2 epochs
    assert [e.step for e in val] == [1, 2, 2, 3, 4, 4]
    assert seen_t == [[200], [400], [600], [800]] * 2 * 6  # 2 held-out images at batch 1: 2 batches each time
    assert res.val_losses == [(e.step, e.loss) for e in val]
    assert all("divergence" in e.extra for e in val)
    assert read_metadata(res.final)["ss_num_validation_images"] == "2"
    # same weights -> same validation loss (no dependence on the training RNG)
    assert val[1].loss == val[2].loss and val[4].loss == val[5].loss
    assert not any("validate_every_n_steps" in n and "not supported" in n for n in res.notes)
    assert not any("validation" in n and "yet" in n for n in res.notes)  # no stale "not computed yet" note


def test_loss_plot_shows_validation_points(tmp_path):
    from PIL import Image
    from lib_lora.ui.tab import render_loss_png
    p = render_loss_png([[1, 1.0], [2, 0.9], [3, 0.8]], str(tmp_path / "p.png"), "x", [[2, 0.95], [3, 0.85]])
    q = render_loss_png([[1, 1.0], [2, 0.9], [3, 0.8]], str(tmp_path / "q.png"), "x")
    a, b = Image.open(p).convert("RGB"), Image.open(q).convert("RGB")
    blue = sum(1 for px in a.getdata() if px[2] > 180 and px[0] < 90)
    assert blue > 20 and sum(1 for px in b.getdata() if px[2] > 180 and px[0] < 90) == 0


def test_queue_keeps_validation_losses_across_restarts(tmp_path):
    from lib_lora.jobs.queue import JobQueue
    from lib_lora.train.trainer import TrainEvent
    q = JobQueue(str(tmp_path / "store"), runner=None, autostart=False)
    job = q.submit({"output_name": "v"})
    q._on_event(job, TrainEvent("validation", step=5, loss=0.25, message="validation loss 0.2500"))
    assert job.public()["val_losses"] == [[5, 0.25]]
    again = JobQueue(str(tmp_path / "store"), runner=None, autostart=False)
    assert again.jobs[0].val_losses == [[5, 0.25]]


# ---- dim_from_weights, save_n_epoch_ratio --------------------------------------------------------------------------
def test_dim_from_weights_continues_a_file_with_its_own_rank(sd1, tmp_path):
    img, _ = train_data.make_dataset(str(tmp_path / "d"), n_concept=2, repeats=1)
    _, first, _ = _run(sd1, tmp_path / "a", img, max_train_steps=2, network_dim=8, network_alpha=3,
                       network_args=["conv_dim=2", "conv_alpha=1"])
    _, res, _ = _run(sd1, tmp_path / "b", img, max_train_steps=1, network_dim=4, network_alpha=2,
                     network_weights=first.final, dim_from_weights=True)
    w = load_tensors(res.final)
    ranks = {v.shape[0] for k, v in w.items() if k.endswith("lora_down.weight") and v.shape[2:] in ((), (1, 1))}
    conv = {v.shape[0] for k, v in w.items() if k.endswith("lora_down.weight") and v.shape[2:] == (3, 3)}
    assert ranks == {8} and conv == {2}
    md = read_metadata(res.final)
    assert md["ss_network_dim"] == "8" and md["ss_network_alpha"] == "3.0"
    assert any("dim_from_weights: network_dim 8, network_alpha 3, conv_dim 2, conv_alpha 1" in n for n in res.notes)
    # several ranks (block_dims, a resized LoRA): every module keeps its own rank and alpha, modules the file
    # lacks are not created (sd-scripts' create_network_from_weights)
    mixed = dict(load_tensors(first.final))
    k = next(k for k in mixed if k.endswith("lora_down.weight") and mixed[k].dim() == 2)
    base = k[: -len(".lora_down.weight")]
    mixed[k] = mixed[k][:4].clone()
    mixed[base + ".lora_up.weight"] = mixed[base + ".lora_up.weight"][:, :4].clone()
    mixed[base + ".alpha"] = torch.tensor(1.5)
    gone = next(k2[: -len(".alpha")] for k2 in mixed
                if k2.startswith("lora_te_") and k2.endswith(".alpha") and not k2.startswith(base + "."))
    mixed = {k2: v for k2, v in mixed.items() if not k2.startswith(gone + ".")}
    from lib_lora.formats.safetensors_io import save_file_atomic
    path = str(tmp_path / "mixed.safetensors")
    save_file_atomic({k2: v.contiguous() for k2, v in mixed.items()}, path)
    _, res, _ = _run(sd1, tmp_path / "c", img, max_train_steps=1, network_weights=path, dim_from_weights=True)
    w = load_tensors(res.final)
    assert set(w) == set(mixed)
    assert all(w[k2].shape == v.shape for k2, v in mixed.items())
    assert float(w[base + ".alpha"]) == 1.5 and w[base + ".lora_down.weight"].shape[0] == 4
    notes = " ".join(res.notes)
    assert "uses several ranks (2, 4, 8)" in notes and "1 module(s) get no LoRA: they are not in the" in notes
    assert gone in notes


def test_save_n_epoch_ratio(sd1, tmp_path):
    img, _ = train_data.make_dataset(str(tmp_path / "d"), n_concept=2, repeats=1)  # 2 steps per epoch
    # 6 epochs, ratio 2 -> every floor(6/2) = 3 epochs (sd-scripts), over save_every_n_epochs
    _, res, _ = _run(sd1, tmp_path, img, max_train_epochs=6, save_n_epoch_ratio=2, save_every_n_epochs=1)
    out = sorted(f for f in os.listdir(tmp_path / "out") if f.endswith(".safetensors"))
    assert out == ["x-000003.safetensors", "x.safetensors"]


# ---- alpha_mask --------------------------------------------------------------------------------------------------
def _rgba_dataset(root, alpha_fn, n=2):
    """Concept images as RGBA PNGs whose alpha comes from alpha_fn(x, y) (0..255)."""
    import numpy as np
    from PIL import Image
    img, _ = train_data.make_dataset(str(root), n_concept=n, repeats=1)
    folder = os.path.join(img, "1_svs cat")
    yy, xx = np.mgrid[0:64, 0:64]
    a = alpha_fn(xx, yy).astype(np.uint8)
    for f in os.listdir(folder):
        p = os.path.join(folder, f)
        rgb = np.asarray(Image.open(p).convert("RGB"))
        Image.fromarray(np.dstack([rgb, a]), "RGBA").save(p)
    return img, a


def test_alpha_mask_is_sd_scripts_area_resized_alpha(sd1, tmp_path):
    import torch.nn.functional as F
    img, a = _rgba_dataset(tmp_path / "d", lambda x, y: np.clip(x * 4 + (y % 7) * 9, 0, 255))
    cfg = parse_train_config({"train_data_dir": img, "resolution": 64, "output_dir": str(tmp_path / "o"),
                              "alpha_mask": True}, base_dir=str(tmp_path))
    host = ModelHost(sd1, "m")
    tr = Trainer(host, cfg, plan_for(host, cfg))
    assert all(s.alpha_mask for s in tr.samples)
    got = tr._alpha_mask(tr.samples[0], False)
    # sd-scripts: alpha / 255 at pixel size, F.interpolate(..., size=loss.shape[2:], mode="area") at loss time
    want = F.interpolate(torch.from_numpy(a.astype("float32") / 255.0)[None, None], size=(8, 8), mode="area")[0]
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(tr._alpha_mask(tr.samples[0], True), want.flip(-1))
    # the loss: per-element loss times the mask, then the mean over (C, h, w) (apply_masked_loss's order)
    from lib_lora.train.loss import denoising_loss
    pred, target = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    m = torch.stack([want, want])
    t = torch.tensor([10, 500])
    sch = NoiseSchedule(sd1.alphas_cumprod)
    ref = ((pred - target) ** 2 * m).mean(dim=(1, 2, 3)).mean()
    torch.testing.assert_close(denoising_loss(pred, target, t, sch, mask=m), ref)


def test_fully_transparent_images_teach_nothing(sd1, tmp_path):
    img, _ = _rgba_dataset(tmp_path / "d", lambda x, y: np.zeros_like(x))
    kw = dict(max_train_steps=3, text_encoder_lr=0, learning_rate=1e-2, unet_lr=1e-2)
    _, masked, _ = _run(sd1, tmp_path / "m", img, alpha_mask=True, **kw)
    _, plain, _ = _run(sd1, tmp_path / "p", img, **kw)
    up = lambda w: max(float(v.abs().max()) for k, v in w.items() if "lora_up" in k)  # noqa: E731
    assert up(load_tensors(masked.final)) == 0.0  # no gradient reaches the LoRA
    assert up(load_tensors(plain.final)) > 1e-4
    assert all(v == 0 for _, v in masked.losses)
    assert not any("alpha_mask" in n and "not supported" in n for n in masked.notes)


def test_cancel_during_a_sample_set_stops_it_between_images(sd1, tmp_path):
    """The real headless sample function: a cancel while samples render stops after the current image, and the
    job ends cancelled with a resumable state instead of finishing the set first."""
    from lib_lora.train.sampling import SamplePrompt, make_sample_fn
    img, _ = train_data.make_dataset(str(tmp_path / "d"), n_concept=2, repeats=1)
    cancel = {"on": False, "checks": 0}
    prompts = [SamplePrompt(prompt=f"svs cat {i}", negative="", width=64, height=64, steps=2, seed=i,
                            cfg_scale=5.0) for i in range(4)]
    cfg = parse_train_config({"train_data_dir": img, "resolution": 64, "train_batch_size": 1,
                              "output_dir": str(tmp_path / "out"), "output_name": "c", "network_dim": 4,
                              "learning_rate": 1e-3, "max_train_steps": 4, "sample_every_n_steps": 1,
                              "seed": 1}, base_dir=str(tmp_path))
    host = ModelHost(sd1, "m")
    inner = make_sample_fn(host, cfg, str(tmp_path / "out"), prompts=prompts)

    def sample_fn(epoch=None, step=None, should_cancel=None):
        def checked():
            cancel["checks"] += 1
            if cancel["checks"] == 2:  # the user presses Cancel while image 0 renders
                cancel["on"] = True
            return should_cancel()
        return inner(epoch=epoch, step=step, should_cancel=checked)

    tr = Trainer(host, cfg, plan_for(host, cfg), sample_fn=sample_fn, should_cancel=lambda: cancel["on"])
    res = tr.run()
    assert res.status == "cancelled" and res.steps == 1 and res.state_file
    assert sorted(os.listdir(tmp_path / "out" / "samples")) == ["c_s000001_00.png"]  # 1 of 4 images
    assert not any("cancel came after the last" in n for n in res.notes)


def test_a_cancel_during_the_last_samples_is_answered(sd1, tmp_path):
    """A cancel during the last step's samples was answered "cancelling" and the job then ended "done" without a
    word: the run had nothing left to cancel; the notes now say so, and that the samples were cut."""
    img, _ = train_data.make_dataset(str(tmp_path / "d"), n_concept=2, repeats=1)
    cancel = {"on": False}
    cfg = parse_train_config({"train_data_dir": img, "resolution": 64, "train_batch_size": 1,
                              "output_dir": str(tmp_path / "out"), "output_name": "c", "network_dim": 4,
                              "learning_rate": 1e-3, "max_train_steps": 2, "sample_every_n_steps": 1,
                              "seed": 1}, base_dir=str(tmp_path))
    host = ModelHost(sd1, "m")

    def sample_fn(epoch=None, step=None, should_cancel=None):
        if step == 2:
            cancel["on"] = True  # pressed while the last samples render
        return []

    res = Trainer(host, cfg, plan_for(host, cfg), sample_fn=sample_fn, should_cancel=lambda: cancel["on"]).run()
    assert res.status == "done" and res.steps == 2 and res.final
    assert any(n.startswith("the cancel came after the last training step, so the run finished: all 2 steps")
               and n.endswith("the last sample images were cut short by it") for n in res.notes), res.notes


def test_newer_schedules_reach_the_trainer_with_sd_scripts_arguments(sd1, tmp_path):
    """lr_decay_steps below 1 is a share of the run; min ratio and lr_scheduler_args are passed on."""
    img, _ = train_data.make_dataset(str(tmp_path / "d"), n_concept=2, repeats=5)
    _, res, events = _run(sd1, tmp_path, img, max_train_steps=10, lr_scheduler="warmup_stable_decay",
                          lr_warmup_steps=2, lr_decay_steps=0.3, lr_scheduler_min_lr_ratio=0.1,
                          learning_rate=1e-3, unet_lr=1e-3, text_encoder_lr=1e-3)
    lrs = [e.lr for e in events if e.kind == "step"]  # the LR after each step's scheduler.step()
    # warm-up 2 (from 0.1), stable 10-2-3 = 5, decay 3 (half cosine to 0.1), as transformers' WSD
    import math
    want = []
    for s in range(1, 11):
        if s < 2:
            f = s / 2 * 0.9 + 0.1
        elif s < 7:
            f = 1.0
        elif s < 10:
            f = (0.5 * (1 + math.cos(math.pi * (s - 7) / 3))) * 0.9 + 0.1
        else:
            f = 0.1
        want.append(1e-3 * f)
    assert lrs == pytest.approx(want, rel=1e-9)
    # a warm-up with constant (sd-scripts stops) warms up, and polynomial ends against learning_rate as there
    _, res3, events = _run(sd1, tmp_path / "w", img, max_train_steps=6, lr_warmup_steps=4, unet_lr=1e-3,
                           text_encoder_lr=1e-3)
    assert [e.lr for e in events if e.kind == "step"] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])
    assert res3.status == "done"  # (check_support's note: test_train_support)
    _, _, events = _run(sd1, tmp_path / "y", img, max_train_steps=4, lr_scheduler="polynomial", learning_rate=2e-6,
                        unet_lr=1e-3, text_encoder_lr=1e-3)
    assert [e.lr for e in events if e.kind == "step"][-1] == pytest.approx(1e-3 * 1e-7 / 2e-6)
    _, res2, _ = _run(sd1, tmp_path / "p", img, max_train_steps=4, lr_scheduler="piecewise_constant",
                      lr_scheduler_args=["step_rules=1:2,0.5"])
    assert res2.status == "done"
    from lib_lora.train.trainer import TrainingError
    with pytest.raises(TrainingError, match="step_rules"):
        _run(sd1, tmp_path / "q", img, max_train_steps=4, lr_scheduler="piecewise_constant")


def test_logging_dir_gets_a_csv_of_the_run(sd1, tmp_path):
    import csv
    img, _ = train_data.make_dataset(str(tmp_path / "d"), n_concept=3, repeats=1)
    _, res, events = _run(sd1, tmp_path, img, max_train_steps=3, logging_dir=str(tmp_path / "logs"),
                          log_prefix="svs-", validation_split=0.34)
    runs = os.listdir(tmp_path / "logs")
    assert len(runs) == 1 and runs[0].startswith("svs-") and len(runs[0]) == len("svs-") + 14
    rows = list(csv.DictReader(open(tmp_path / "logs" / runs[0] / "losses.csv")))
    steps = [e for e in events if e.kind == "step"]
    train_rows = [r for r in rows if r["loss"]]
    assert [int(r["step"]) for r in train_rows] == [e.step for e in steps]
    assert [float(r["loss"]) for r in train_rows] == pytest.approx([e.loss for e in steps], rel=1e-5)
    assert [float(r["val_loss"]) for r in rows if r["val_loss"]] == pytest.approx([v for _, v in res.val_losses],
                                                                                  rel=1e-5)
    assert any("logging_dir: the losses are written to" in n for n in res.notes)


# ---- random_crop ---------------------------------------------------------------------------------------------------
def test_random_crop_encodes_a_new_crop_every_step(sd1, tmp_path, monkeypatch):
    """Images wider than their bucket: every step encodes a real crop of the resized image at a new offset
    (sd-scripts' trim with random.randint per axis), nothing of them is cached, and a run is reproducible."""
    from PIL import Image
    from lib_lora.train import trainer as T
    img, _ = train_data.make_dataset(str(tmp_path / "d"), n_concept=2, repeats=4, size=(96, 64))
    originals = {f: np.asarray(Image.open(os.path.join(img, "4_svs cat", f)).convert("RGB"))
                 for f in os.listdir(os.path.join(img, "4_svs cat")) if f.endswith(".png")}
    seen = []
    orig_encode = T.Trainer._vae_encode

    def spy(self, pixels):
        seen.append(pixels.copy())
        return orig_encode(self, pixels)

    monkeypatch.setattr(T.Trainer, "_vae_encode", spy)
    kw = dict(max_train_steps=6, enable_bucket=False, random_crop=True, cache_latents=True)
    _, res, _ = _run(sd1, tmp_path / "a", img, **kw)
    assert len(seen) == 6  # one per step (batch 1), none at caching time
    offsets = set()
    for px in seen:
        hits = [(f, x) for f, o in originals.items() for x in range(0, 33) if np.array_equal(px, o[:, x:x + 64])]
        assert hits, "the encoded pixels are not a crop of the training image"
        offsets.update(x for _, x in hits)
    assert len(offsets) > 1
    assert any("random_crop: 2 image(s) are augmented anew" in n and "cache_latents" in n for n in res.notes)
    assert not any("random_crop" in n and "not supported" in n for n in res.notes)
    _, res2, _ = _run(sd1, tmp_path / "b", img, **kw)
    a, b = load_tensors(res.final), load_tensors(res2.final)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_random_crop_on_sdxl_feeds_the_size_conditioning(tmp_path):
    img, _ = train_data.make_dataset(str(tmp_path / "d"), n_concept=2, repeats=2, size=(96, 64))
    model = models.make_sdxl(seed=2)
    for fast in (True, False):  # size numbers as a device tensor (fast path) or as host lists
        _, res, _ = _run(model, tmp_path / f"o{fast}", img, max_train_steps=2, enable_bucket=False,
                         random_crop=True, fast_path=fast)  # (the tiny SDXL trains its text encoders)
        assert res.status == "done" and all(v == v for _, v in res.losses)


# ---- color_aug -----------------------------------------------------------------------------------------------------
def _sd_scripts_color_aug(image, seed):
    """sd-scripts' AugHelper.color_aug (library/train_util.py), with its global random seeded."""
    import random
    import cv2
    random.seed(seed)
    hue_shift_limit = 8
    if random.random() <= 0.33:
        if random.random() > 0.5:
            hsv_img = cv2.cvtColor(image, cv2.COLOR_BGR2HSV)
            hue_shift = random.uniform(-hue_shift_limit, hue_shift_limit)
            if hue_shift < 0:
                hue_shift = 180 + hue_shift
            hsv_img[:, :, 0] = (hsv_img[:, :, 0] + hue_shift) % 180
            image = cv2.cvtColor(hsv_img, cv2.COLOR_HSV2BGR)
        else:
            gamma = random.uniform(0.95, 1.05)
            image = np.clip(image**gamma, 0, 255).astype(np.uint8)
    return image


def test_color_aug_is_sd_scripts_and_the_numpy_fallback_is_within_a_level(monkeypatch):
    import builtins
    import random
    from lib_lora.train.images import color_aug
    img = np.random.default_rng(0).integers(0, 256, (32, 48, 3), dtype=np.uint8)
    kinds = set()
    for seed in range(60):
        want = _sd_scripts_color_aug(img.copy(), seed)
        got = color_aug(img.copy(), random.Random(seed))
        assert np.array_equal(got, want), seed
        kinds.add("same" if np.array_equal(got, img) else "changed")
    assert kinds == {"same", "changed"}
    real_import = builtins.__import__

    def no_cv2(name, *a, **k):
        if name == "cv2":
            raise ImportError("no OpenCV here")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_cv2)
    worst = 0
    for seed in range(60):
        got = color_aug(img.copy(), random.Random(seed))
        monkeypatch.setattr(builtins, "__import__", real_import)
        want = _sd_scripts_color_aug(img.copy(), seed)
        monkeypatch.setattr(builtins, "__import__", no_cv2)
        worst = max(worst, int(np.abs(got.astype(int) - want.astype(int)).max()))
    assert worst <= 2, worst


def test_color_aug_images_are_encoded_every_step(sd1, tmp_path, monkeypatch):
    from lib_lora.train import trainer as T
    img, _ = train_data.make_dataset(str(tmp_path / "d"), n_concept=2, repeats=3)
    calls = []
    orig = T.Trainer._vae_encode
    monkeypatch.setattr(T.Trainer, "_vae_encode", lambda self, px: calls.append(px.copy()) or orig(self, px))
    _, res, _ = _run(sd1, tmp_path, img, max_train_steps=6, color_aug=True)
    assert len(calls) == 6 and res.status == "done"
    assert any(n.startswith("color_aug: 2 image(s) are augmented anew") for n in res.notes)
    assert not any("color_aug" in n and "not supported" in n for n in res.notes)


def test_validation_split_outside_0_1_is_refused():
    from lib_lora.train.config import TrainConfigError
    for bad in (1.0, 1.5, -0.1):
        with pytest.raises(TrainConfigError, match="validation_split .* must be at least 0 and below 1"):
            parse_train_config({"train_data_dir": "x", "validation_split": bad})
    assert parse_train_config({"train_data_dir": "x", "validation_split": 0.2}).validation_split == 0.2


def test_clip_skip_past_the_text_encoder_and_bad_optimizer_args_say_what_is_wrong(sd1, tmp_path):
    from lib_lora.train.trainer import TrainingError

    img, _ = train_data.make_dataset(str(tmp_path / "d"), n_concept=2, repeats=1)
    with pytest.raises(TrainingError, match=r"clip_skip = 40 is more than the text encoder's \d+ layers"):
        _run(sd1, tmp_path / "a", img, max_train_steps=1, clip_skip=40)
    with pytest.raises(TrainingError, match=r"optimizer AdamW refused optimizer_args \['nonsense=1'\]: .*nonsense"):
        _run(sd1, tmp_path / "b", img, max_train_steps=1, optimizer_type="AdamW", optimizer_args=["nonsense=1"])


# ---- lr_scheduler_type --------------------------------------------------------------------------------------------
def test_a_torch_scheduler_drives_the_run_and_resumes(sd1, tmp_path):
    """lr_scheduler_type = StepLR (step_size 2, gamma 0.5): the LR of every step is its closed form, and a
    cancelled run resumes to the weights of an uninterrupted one."""
    img, _ = train_data.make_dataset(str(tmp_path / "d"), n_concept=3, repeats=2)
    kw = dict(lr_scheduler_type="torch.optim.lr_scheduler.StepLR", lr_scheduler_args=["step_size=2", "gamma=0.5"],
              max_train_steps=6)
    _, full, events = _run(sd1, tmp_path / "a", img, **kw)
    assert full.status == "done"
    lrs = [(e.step, e.lr) for e in events if e.kind == "step"]
    assert [s for s, _ in lrs] == list(range(1, 7))
    for step, lr in lrs:  # read after the step's scheduler.step()
        assert lr == pytest.approx(1e-3 * 0.5 ** (step // 2), rel=1e-9), step
    cfg = parse_train_config(train_data.job_config(img, tmp_path / "b", **kw), base_dir=str(tmp_path))
    _, resumed = train_data.cancelled_then_resumed(ModelHost(sd1, "m"), cfg, 3)
    a, b = load_tensors(full.final), load_tensors(resumed.final)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=k)


# ---- NaN and overflow ---------------------------------------------------------------------------------------------
def test_a_diverging_run_stops_with_the_causes_and_writes_no_nan_file(sd1, tmp_path):
    """An absurd learning rate turns the LoRA into NaN within a few steps: the run stops with what to change
    instead of writing (and epoch-saving) a LoRA that renders black images; the model is as before."""
    img, _ = train_data.make_dataset(str(tmp_path / "d"), n_concept=3, repeats=2)
    before = models.model_state_hash(sd1)
    with pytest.raises(TrainingError, match=r"training diverged at step \d+: the loss is nan and \d+ LoRA tensors "
                                            r"are NaN or infinite .*a learning rate too high for AdamW"):
        _run(sd1, tmp_path, img, learning_rate=1e6, max_train_epochs=3, save_every_n_epochs=1)
    assert not os.path.exists(tmp_path / "out") or not any(
        f.endswith(".safetensors") for f in os.listdir(tmp_path / "out"))
    assert models.model_state_hash(sd1) == before


def test_weights_beyond_fp16_are_saved_in_bf16_not_as_infinity(sd1, tmp_path):
    """One AdamW step of 8e4 takes weights past fp16's 65504: save_precision fp16 would write inf (a black-image
    LoRA); the file is written in bf16 instead, with a note."""
    img, _ = train_data.make_dataset(str(tmp_path / "d"), n_concept=3, repeats=2)
    _, res, events = _run(sd1, tmp_path, img, learning_rate=8e4, max_train_steps=1, save_precision="fp16")
    assert res.status == "done"
    sd = load_tensors(res.final)
    assert all(v.dtype == torch.bfloat16 and torch.isfinite(v.float()).all() for v in sd.values())
    assert max(float(v.float().abs().max()) for v in sd.values()) > 65504
    notes = [e.message for e in events if e.kind == "note"]
    assert any("exceed the range of save_precision = fp16" in m for m in notes)
    # (and the run is named as diverging, once)
    assert [m for m in notes if "far beyond a LoRA's usual range: the run is diverging" in m
            and "no LoRA file was written yet. Lower the learning rate." in m and m.startswith("x.safetensors: ")]


def test_a_cut_caption_is_named_once_with_the_fix(sd1, tmp_path):
    """A caption over max_token_length loses its end: the note names it, its token count (the real tokenizer's)
    and the setting, once; transformers' "indexing errors" warning about it is not printed."""
    long = "svs cat, " + ", ".join(f"word{i}" for i in range(60))
    img, _ = train_data.make_dataset(str(tmp_path / "d"), n_concept=2, repeats=2, captions=[long, "svs cat"])
    _, res, events = _run(sd1, tmp_path, img, max_train_steps=3)
    assert res.status == "done"
    cut = [e.message for e in events if e.kind == "note" and "max_token_length" in e.message]
    assert len(cut) == 1 and cut[0].startswith("captions longer than max_token_length (75 tokens) are cut, the rest "
                                               "of them not trained: e.g. 'svs cat, word0, word1, ")
    assert cut[0].endswith(" tokens; set max_token_length = 150 or 225 (as in sd-scripts), or shorten it")
    from transformers import CLIPTokenizer
    from lib_lora.train.conditioning import _hf_spec
    tok = CLIPTokenizer.from_pretrained(models.tokenizer_dir())  # (a fresh one: HF warns once per tokenizer)
    said: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: said.append(record.getMessage())
    logging.getLogger("transformers").addHandler(handler)  # (its own handler, not propagated: not in capfd)
    try:
        assert len(_hf_spec(tok).encode(long)) > 77 and not any("indexing errors" in m for m in said)
        tok(long)
        assert any("indexing errors" in m for m in said)  # (what the encode above no longer prints)
    finally:
        logging.getLogger("transformers").removeHandler(handler)


# ---- states at step saves, and their pruning --------------------------------------------------------------------
def test_step_saves_with_save_state_write_resumable_states(sd1, tmp_path):
    """save_state with save_every_n_steps writes a state with each step save (as sd-scripts does); resuming from
    a mid-epoch one gives the uninterrupted run's weights; save_last_n_steps_state keeps the last N steps' states,
    save_last_n_epochs_state the last N epochs' (LoRA files keep their own rule)."""
    img, _ = train_data.make_dataset(str(tmp_path / "d"), n_concept=3, repeats=2)  # 6 batches of 1 per epoch
    kw = dict(max_train_epochs=3, save_every_n_steps=4, save_state=True, save_last_n_steps_state=5,
              save_every_n_epochs=1, save_last_n_epochs=3, save_last_n_epochs_state=1)
    _, full, events = _run(sd1, tmp_path / "a", img, **kw)
    assert full.status == "done" and full.steps == 18
    files = sorted(os.listdir(tmp_path / "a" / "out"))
    # steps 4..16 saved; states of steps < 16 - 5 removed; epoch states: only the newest (epoch 2) is kept
    assert [f for f in files if "-step" in f and f.endswith("-state.lsstate")] == [
        "x-step00000012-state.lsstate", "x-step00000016-state.lsstate"]
    assert [f for f in files if f.endswith("-state.lsstate") and "step" not in f] == ["x-000002-state.lsstate",
                                                                                 "x-final-state.lsstate"]
    assert {"x-000001.safetensors", "x-000002.safetensors"} <= set(files)
    assert any("removed old state x-step00000004-state.lsstate" in e.message for e in events if e.kind == "note")
    # step 16 is the 4th batch of epoch 3: resume from there
    cfg = parse_train_config({"train_data_dir": img, "resolution": 64, "train_batch_size": 1,
                              "output_dir": str(tmp_path / "b"), "output_name": "x", "network_dim": 4,
                              "network_alpha": 2, "learning_rate": 1e-3, "text_encoder_lr": 5e-4, "seed": 3,
                              "save_precision": "float", "max_train_epochs": 3}, base_dir=str(tmp_path))
    host = ModelHost(sd1, "m")
    resumed = Trainer(host, cfg, plan_for(host, cfg)).run(
        resume_state=str(tmp_path / "a" / "out" / "x-step00000016-state.lsstate"))
    assert resumed.status == "done" and resumed.steps == 18
    a, b = load_tensors(full.final), load_tensors(resumed.final)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=k)


def test_lr_scheduler_timescale_sets_inverse_sqrt_timescale(sd1, tmp_path):
    """sd-scripts hands lr_scheduler_timescale to inverse_sqrt: lr = base / sqrt((step + t) / t) without warm-up
    (transformers' formula)."""
    img, _ = train_data.make_dataset(str(tmp_path / "d"), n_concept=3, repeats=1)
    _, res, events = _run(sd1, tmp_path, img, lr_scheduler="inverse_sqrt", lr_scheduler_timescale=4,
                          max_train_steps=4)
    assert res.status == "done"
    for e in (e for e in events if e.kind == "step"):
        assert e.lr == pytest.approx(1e-3 / ((e.step + 4) / 4) ** 0.5, rel=1e-9), e.step


# ---- masked_loss with mask images (conditioning_data_dir) -------------------------------------------------------
def _mask_dataset(root, alpha_fn):
    """The same images twice: as RGBA (alpha_mask) and as RGB with a mask folder whose R channel is that alpha
    (G/B noise, which must not matter), plus dataset configs for both."""
    import shutil
    import numpy as np
    from PIL import Image
    img, a = _rgba_dataset(root / "rgba", alpha_fn)
    src = os.path.join(img, "1_svs cat")
    plain, masks = root / "rgb" / "img", root / "rgb" / "mask"
    plain.mkdir(parents=True), masks.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for f in sorted(os.listdir(src)):
        p = os.path.join(src, f)
        if f.endswith(".png"):
            rgba = np.asarray(Image.open(p))
            Image.fromarray(rgba[:, :, :3]).save(plain / f)
            gb = rng.integers(0, 255, (64, 64, 2), dtype=np.uint8)
            Image.fromarray(np.dstack([rgba[:, :, 3], gb])).save(masks / f)
        else:
            shutil.copy(p, plain / f)
    toml_alpha = (f'[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = "{src}"\nclass_tokens = "svs cat"\n'
                  'alpha_mask = true\nflip_aug = true\n')
    toml_masks = (f'[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = "{plain}"\n'
                  f'class_tokens = "svs cat"\nconditioning_data_dir = "{masks}"\nflip_aug = true\n')
    (root / "alpha.toml").write_text(toml_alpha)
    (root / "masks.toml").write_text(toml_masks)
    return root / "alpha.toml", root / "masks.toml", masks


def test_mask_images_weigh_the_loss_as_the_same_alpha_does(sd1, tmp_path):
    """sd-scripts' masked_loss with conditioning_data_dir: the mask's R channel is the loss weight, as the alpha
    channel is for alpha_mask; both runs give the same LoRA."""
    alpha_toml, mask_toml, _ = _mask_dataset(tmp_path, lambda x, y: np.clip(x * 4 + (y % 7) * 9, 0, 255))
    kw = dict(max_train_steps=3, learning_rate=1e-2)
    tr_a, with_alpha, _ = _run(sd1, tmp_path / "a", None, dataset_config=str(alpha_toml), **kw)
    tr_m, with_masks, _ = _run(sd1, tmp_path / "m", None, dataset_config=str(mask_toml), masked_loss=True, **kw)
    assert all(s.mask_path for s in tr_m.samples) and not any(s.alpha_mask for s in tr_m.samples)
    torch.testing.assert_close(tr_m._alpha_mask(tr_m.samples[0], True), tr_a._alpha_mask(tr_a.samples[0], True))
    a, b = load_tensors(with_alpha.final), load_tensors(with_masks.final)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)
    assert not any("masked_loss" in n and "not supported" in n for n in with_masks.notes)


def test_mask_folder_problems_are_found_before_training(sd1, tmp_path):
    from lib_lora.train.dataset import build_plan
    _, mask_toml, masks = _mask_dataset(tmp_path, lambda x, y: x * 0 + 255)

    def errors(**kw):
        cfg = parse_train_config(dict({"dataset_config": str(mask_toml), "masked_loss": True}, **kw),
                                 base_dir=str(tmp_path))
        return " ".join(f.message for f in build_plan(cfg).findings if f.level == "error")

    assert errors() == ""
    assert "needs masked_loss = true" in errors(masked_loss=False)
    first = sorted(os.listdir(masks))[0]
    os.rename(masks / first, masks / ("zz_" + first))
    text = errors()
    assert "1 image(s) have no mask of the same name" in text and first in text
    assert f"1 mask(s) in {masks} have no training image" in text and "zz_" + first in text
    from PIL import Image
    os.rename(masks / ("zz_" + first), masks / first)
    Image.new("RGB", (32, 64)).save(masks / first)
    assert "a mask must be the size of its image" in errors() and "32x64 for a 64x64 image" in errors()


# ---- schedule-free optimizers and Adafactor's own LR (sd-scripts' optimizer_eval_fn / adafactor scheduler) --------
def test_schedule_free_files_hold_the_averaged_weights_and_resume_exactly(sd1, tmp_path):
    """AdamWScheduleFree trains on one point (y) and averages another (x): sd-scripts switches to x (eval) to save,
    sample and validate. Every file here holds x, the run trains on y again afterwards, and a cancelled run
    resumed from its state ends with the uninterrupted run's weights."""
    img, _ = train_data.make_dataset(str(tmp_path / "d"), n_concept=2, repeats=2)
    kw = dict(optimizer_type="AdamWScheduleFree", max_train_steps=8, save_every_n_epochs=1, lr_scheduler="cosine",
              lr_warmup_steps=2)
    modes = []
    cfg = parse_train_config(train_data.job_config(img, tmp_path / "a", **kw), base_dir=str(tmp_path))
    host = ModelHost(sd1, "m")
    holder = {}

    def on_event(e):
        if e.kind == "save":
            modes.append(holder["tr"].runner.optimizer.param_groups[0]["train_mode"])
    tr = Trainer(host, cfg, plan_for(host, cfg), on_event=on_event)
    holder["tr"] = tr
    full = tr.run()
    assert full.status == "done" and len(modes) >= 2 and not any(modes)  # every save in eval mode
    assert any("schedule-free optimizers take no LR schedule" in n and "lr_scheduler, lr_warmup_steps not used" in n
               for n in full.notes)
    opt = tr.runner.optimizer
    assert opt.param_groups[0]["train_mode"]  # training mode again after the last save
    net_params = [p for g in opt.param_groups for p in g["params"]]
    y = [p.detach().clone() for p in net_params]
    opt.eval()
    x = [p.detach().clone() for p in net_params]
    assert any(not torch.equal(a, b) for a, b in zip(x, y))
    saved = load_tensors(full.final)
    ups = [k for k in saved if k.endswith("lora_up.weight")]
    # the file is x: after eval() the network's own weights are what was saved
    assert ups and all(torch.isfinite(saved[k]).all() for k in ups)
    def matches(ws):  # saved weight tensors that equal one of ws (y -> x -> y -> x is exact to float rounding)
        return sum(any(v.numel() == w.numel() and torch.allclose(v.flatten(), w.flatten(), rtol=1e-5, atol=1e-7)
                       for w in ws) for v in saved.values() if v.dim() >= 2)
    total = sum(1 for v in saved.values() if v.dim() >= 2)
    assert matches(x) == total and matches(y) < total
    opt.train()

    cfg_b = parse_train_config(train_data.job_config(img, tmp_path / "b", **kw), base_dir=str(tmp_path))
    _, resumed = train_data.cancelled_then_resumed(host, cfg_b, 3)
    a, b = load_tensors(full.final), load_tensors(resumed.final)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=k)


def test_adafactor_without_arguments_uses_its_own_lr_and_says_so(sd1, tmp_path):
    img, _ = train_data.make_dataset(str(tmp_path / "d"), n_concept=2, repeats=2)
    tr, res, events = _run(sd1, tmp_path, img, optimizer_type="Adafactor", max_train_steps=3, lr_scheduler="cosine")
    assert res.status == "done"
    assert any(n.startswith("Adafactor with relative_step (its default) computes its own LR") and
               "lr_scheduler not used" in n for n in res.notes)
    assert any("unet_lr / text_encoder_lr and block or LoRA+ ratios are not used" in n for n in res.notes)
    lrs = [e.lr for e in events if e.kind == "step"]
    opt = tr.runner.optimizer
    g = opt.param_groups[0]
    assert lrs[-1] == pytest.approx(opt._get_lr(g, opt.state[g["params"][0]]))  # what Adafactor used
    assert read_metadata(res.final)["ss_optimizer"] == "transformers.optimization.Adafactor(relative_step=True)"


# ---- vae_batch_size ------------------------------------------------------------------------------------------------
def test_vae_batch_size_encodes_a_bucket_per_call_with_the_same_latents(sd1, tmp_path, monkeypatch):
    """Up to vae_batch_size images of one bucket go through the VAE together (as sd-scripts batches them); the
    latents, disk cache files and trained LoRA are those of one-at-a-time encoding."""
    from lib_lora.train import trainer as T
    img, _ = train_data.make_dataset(str(tmp_path / "d"), n_concept=5, repeats=1)
    for i in range(2):  # a second bucket
        train_data.concept_image(i + 5, 128, 64).save(os.path.join(img, "1_svs cat", f"w{i}.png"))
    calls = []
    orig = T.Trainer._vae_encode

    def spy(self, px):
        calls.append(1 if isinstance(px, np.ndarray) else len(px))
        return orig(self, px)

    monkeypatch.setattr(T.Trainer, "_vae_encode", spy)
    kw = dict(max_train_steps=3, resolution=128, enable_bucket=True, min_bucket_reso=64, max_bucket_reso=256,
              flip_aug=True, cache_latents_to_disk=True)
    one, res1, _ = _run(sd1, tmp_path / "one", img, **kw)
    assert calls == [1] * 14  # 7 images, each also flipped
    calls.clear()
    many, res4, _ = _run(sd1, tmp_path / "many", img, vae_batch_size=4, **kw)
    # per bucket: the 5 square images give 10 latents (4+4+2), the 2 wide ones 4
    assert sorted(calls) == [2, 4, 4, 4], calls
    assert one.latents.keys() == many.latents.keys()
    for k in one.latents:
        torch.testing.assert_close(many.latents[k], one.latents[k], atol=1e-5, rtol=1e-5)
        assert one.size_cond[k] == many.size_cond[k]
    a, b = load_tensors(res1.final), load_tensors(res4.final)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    files = sorted(os.listdir(tmp_path / "many" / "out" / ".lora-studio-cache" / "latents"))
    assert files == sorted(os.listdir(tmp_path / "one" / "out" / ".lora-studio-cache" / "latents")) and len(files) == 14
    calls.clear()
    _run(sd1, tmp_path / "many", img, vae_batch_size=4, **kw)  # the disk cache is used as it is
    assert calls == []


def test_no_half_vae_encodes_with_an_fp32_copy_and_leaves_the_host_vae_half(tmp_path):
    """no_half_vae was read and never used inside the WebUI (whose VAE is usually fp16): images are now encoded by
    a private fp32 copy of the VAE, the host's VAE stays fp16 and unchanged."""
    from lib_lora.train import trainer as T
    model = models.make_sd1(seed=8)
    model.first_stage_model.half()
    before = {k: v.clone() for k, v in model.first_stage_model.state_dict().items()}
    img, _ = train_data.make_dataset(str(tmp_path / "d"), n_concept=2, repeats=1)
    got = []
    orig = T.Trainer._vae_encode
    calls = []

    def spy(self, px):
        z = orig(self, px)
        got.append((self._vae32 is not None, z))
        calls.append(px if isinstance(px, np.ndarray) else px[0])
        return z

    import unittest.mock as um
    with um.patch.object(T.Trainer, "_vae_encode", spy):
        tr, res, _ = _run(model, tmp_path / "a", img, max_train_steps=1, no_half_vae=True, cache_latents=True)
    assert res.status == "done" and got and all(made for made, _ in got)
    vae32 = models.make_sd1(seed=8).first_stage_model.float()
    vae32.load_state_dict({k: v.float() for k, v in before.items()})
    with torch.no_grad():
        x = torch.tensor(calls[0]).permute(2, 0, 1)[None].float().div(127.5).sub(1.0)
        want = vae32.encode(x).mode() * model.scale_factor
    torch.testing.assert_close(got[0][1][:1], want, rtol=1e-5, atol=1e-5)
    sd = model.first_stage_model.state_dict()
    assert all(sd[k].dtype == torch.float16 and torch.equal(sd[k], v) for k, v in before.items())
    assert tr._vae32 is None  # (the copy is dropped with the run)
