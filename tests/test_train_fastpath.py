"""The training step's fast paths (lib_lora/train/fastpath.py) on the CPU: no host sync inside a step (profiled),
fewer ops per step than the plain step, the same LoRA weights after 50 steps, state files either path can resume.

What needs a GPU (CUDA graphs, torch.cuda.set_sync_debug_mode) is in the last test, skipped without one, and in
tests/bench/bench_train.py --capture --profile-ops.
"""

import collections
import os
from contextlib import nullcontext

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import models
import train_data
from lib_lora.formats.safetensors_io import load_tensors
from lib_lora.host.base import ModelHost
from lib_lora.train import fastpath
from lib_lora.train.conditioning import TextEncoder
from lib_lora.train.config import parse_train_config
from lib_lora.train.fastpath import (FastPath, FlatParams, StepBatch, StepRunner, cached_timestep_embedding,
                                     load_optimizer_state, step_ops, unused_text_encoder_params)
from lib_lora.train.lora_net import LoRANetwork
from lib_lora.train.loss import NoiseSchedule
from lib_lora.train.optim import make_optimizer, make_scheduler
from lib_lora.train.run import plan_for
from lib_lora.train.trainer import Trainer


@pytest.fixture(scope="module")
def sd1():
    return models.make_sd1(seed=3)


def _cfg(root, img, **kw):
    c = {"train_data_dir": img, "resolution": 64, "train_batch_size": 2, "output_dir": os.path.join(root, "out"),
         "output_name": "fp", "network_dim": 4, "network_alpha": 2, "learning_rate": 1e-3, "text_encoder_lr": 5e-4,
         "seed": 7, "save_precision": "float"}
    c.update(kw)
    return parse_train_config(c, base_dir=root)


def _trainer(model, cfg, fast, **kw):
    host = ModelHost(model, "m")
    return Trainer(host, cfg, plan_for(host, cfg), fast=fast, **kw)


def _weights(path):
    return {k: v.float() for k, v in load_tensors(path).items()}


def _rel(a, b, keys):
    num = sum(((a[k] - b[k]) ** 2).sum() for k in keys)
    den = sum((a[k] ** 2).sum() for k in keys)
    return float((num / den) ** 0.5)


# ---- no host sync inside a step ----------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_trainer_steps_have_no_host_sync(family, tmp_path):
    """The real loop, profiled from the first step to the end: inside every step (forward, backward, clip, AdamW,
    schedule) no op waits for the device and no tensor is built from host data. The loss is read back only every
    log_every steps, outside the step."""
    model = models.make_sd1(seed=1) if family == "sd1" else models.make_sdxl(seed=1)
    img, reg = train_data.make_dataset(str(tmp_path / "d"), n_concept=2, repeats=1, n_reg=2)
    # text encoder trained (its forward runs inside the step), clipping, min-SNR, noise offset, LoRA dropouts
    cfg = _cfg(str(tmp_path), img, reg_data_dir=reg, max_train_steps=3, min_snr_gamma=5, noise_offset=0.05,
               network_dropout=0.1, network_args=["rank_dropout=0.1"], flip_aug=True, max_grad_norm=1.0)
    prof = profile(activities=[ProfilerActivity.CPU])

    def on_event(e):  # from the note sent just before the first step (latents cached) to the end
        if e.kind == "note" and e.message.startswith("training step"):
            prof.start()
        elif e.kind == "done":
            prof.stop()

    tr = _trainer(model, cfg, True, on_event=on_event)
    tr.log_every = 2
    res = tr.run()
    assert res.status == "done" and res.steps == 3
    assert "flat LoRA buffer" in tr.fast_desc and "fused AdamW" in tr.fast_desc, tr.fast_desc
    ops = step_ops(prof)
    assert ops.ranges == 2 * 3  # micro (forward+backward) and update ranges of each step
    assert ops.syncs == [], collections.Counter(ops.syncs)
    assert ops.host_data == [], collections.Counter(ops.host_data)
    # the CPU fused AdamW kernel reads its own step counter; nothing else is allowed through
    assert set(ops.kernel_internal) <= {"aten::item", "aten::_local_scalar_dense"}
    assert [s for s, _ in res.losses] == [2, 3]  # every log_every steps, and the last


def _runner(model, fast, *, steps_seed=0, max_grad_norm=1.0):
    """A StepRunner wired as the trainer does, UNet LoRA only, on the tiny SD1."""
    net = LoRANetwork(model, "sd1", dim=4, alpha=2, train_text_encoder=False, dropout=0.1)
    torch.manual_seed(steps_seed)
    for pair in net.pairs.values():
        torch.nn.init.kaiming_uniform_(pair.lora_down.weight, a=5 ** 0.5)
    groups = net.param_groups(1e-3, 0)
    flat = FlatParams(groups) if fast else None
    args = {"fused": True} if fast else {}
    opt, _ = make_optimizer("AdamW", flat.param_groups() if flat else groups, lr=1e-3, args=args)
    sched = make_scheduler(opt, "cosine", 2, 50)
    runner = StepRunner(model.model.diffusion_model, NoiseSchedule(model.alphas_cumprod), opt, sched,
                        device=torch.device("cpu"), flat=flat, params=[p for g in groups for p in g["params"]],
                        max_grad_norm=max_grad_norm, min_snr_gamma=5.0, noise_offset=0.05)
    return net, runner


def _batch(i, b=2):
    g = torch.Generator().manual_seed(100 + i)
    x0, ctx = torch.randn(b, 4, 8, 8, generator=g), torch.randn(b, 77, 768, generator=g)
    return StepBatch(x0, torch.ones(b), {"crossattn": ctx}, step_seed=10 + i, noise_seed=20 + i)


def _profiled(net, runner, model, n=1, fast=True):
    with net.attached(), (cached_timestep_embedding(model.model.diffusion_model) if fast else nullcontext()):
        net.train()
        runner.step(_batch(0))
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for i in range(1, n + 1):
                runner.step(_batch(i))
    return step_ops(prof)


def test_fast_step_dispatches_far_fewer_ops_than_the_plain_step(sd1):
    """Host-side launches per step (aten ops dispatched from Python/autograd), counted with the profiler."""
    net_e, run_e = _runner(sd1, False)
    eager = _profiled(net_e, run_e, sd1, fast=False)
    net_f, run_f = _runner(sd1, True)
    fast = _profiled(net_f, run_f, sd1)
    # the plain CPU AdamW reads its (host) step counter once per weight; the fast step reads nothing
    assert eager.syncs and not fast.syncs and not fast.host_data
    assert fast.top < 0.8 * eager.top, (eager.top, fast.top)
    # one tensor per optimizer group: the optimizer no longer scales with the number of LoRA weights
    n_weights = sum(len(g["params"]) for g in run_e.optimizer.param_groups)
    assert eager.top - fast.top > 5 * n_weights, (eager.top, fast.top, n_weights)


class _TinyUNet(torch.nn.Module):
    """A stand-in UNet for tests of the update half of the step."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.ctx = torch.nn.Linear(768, 4)

    def forward(self, x, t, context=None):
        return self.conv(x) + self.ctx(context.mean(1))[:, :, None, None]


@pytest.mark.parametrize("fused", [True, False])
def test_grad_scaler_step_syncs_only_where_torch_does(sd1, fused):
    """fp16's GradScaler: with a fused AdamW torch hands found_inf to the kernel (no read back); with any other
    optimizer torch's GradScaler.step reads found_inf back once per optimizer step (its _maybe_opt_step)."""
    unet = _TinyUNet()
    flat = FlatParams([{"params": list(unet.parameters()), "lr": 1e-3}])
    opt = torch.optim.AdamW(flat.param_groups(), lr=1e-3, fused=fused)
    runner = StepRunner(unet, NoiseSchedule(sd1.alphas_cumprod), opt, make_scheduler(opt, "constant", 0, 9),
                        device=torch.device("cpu"), flat=flat, scaler=torch.amp.GradScaler("cpu"), max_grad_norm=1.0)
    runner.step(_batch(0))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(1, 4):
            runner.step(_batch(i))
    ops = step_ops(prof)
    assert ops.host_data == []
    if fused:
        assert ops.syncs == []
    else:  # per step: GradScaler's found_inf read + the plain CPU AdamW's host step counter (both .item())
        assert collections.Counter(ops.syncs)["aten::_local_scalar_dense"] == 2 * 3


# ---- the same weights -------------------------------------------------------------------------------------------
def test_fast_path_matches_plain_step_after_50_steps_fp32(sd1, tmp_path):
    img, reg = train_data.make_dataset(str(tmp_path / "d"), n_concept=3, repeats=2, n_reg=2)
    kw = dict(reg_data_dir=reg, max_train_steps=50, train_batch_size=1, min_snr_gamma=5, noise_offset=0.05,
              flip_aug=True)
    a = _trainer(sd1, _cfg(str(tmp_path / "a"), img, **kw), False).run()
    tb = _trainer(sd1, _cfg(str(tmp_path / "b"), img, **kw), True)
    b = tb.run()
    assert "flat LoRA buffer (2 group(s))" in tb.fast_desc
    wa, wb = _weights(a.final), _weights(b.final)
    assert wa.keys() == wb.keys()
    up = [k for k in wa if "lora_up" in k]
    assert _rel(wa, wb, up) < 2e-4, _rel(wa, wb, up)  # measured 3e-5 (fused vs per-tensor AdamW rounding)
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-3, atol=1e-4, msg=k)
    assert any(wa[k].abs().max() > 1e-3 for k in up)  # it did learn something


def test_fast_path_matches_plain_step_after_50_steps_bf16(sd1, tmp_path):
    """bf16 autocast: tiny differences (only the AdamW kernel's rounding) grow through bf16 activations; swapping
    just the AdamW implementation in the plain step moves lora_up by the same ~3% of its learned value."""
    img, _ = train_data.make_dataset(str(tmp_path / "d"), n_concept=3, repeats=2)
    kw = dict(max_train_steps=50, train_batch_size=1, mixed_precision="bf16", text_encoder_lr=0)
    a = _trainer(sd1, _cfg(str(tmp_path / "a"), img, **kw), False).run()
    b = _trainer(sd1, _cfg(str(tmp_path / "b"), img, **kw), True).run()
    wa, wb = _weights(a.final), _weights(b.final)
    up = [k for k in wa if "lora_up" in k]
    assert _rel(wa, wb, up) < 0.1, _rel(wa, wb, up)
    down = [k for k in wa if "lora_down" in k]
    assert _rel(wa, wb, down) < 0.01, _rel(wa, wb, down)
    la, lb = dict(a.losses), dict(b.losses)
    assert abs(sum(la.values()) - sum(lb.values())) / sum(la.values()) < 0.02


# ---- flat buffer, optimizer state ---------------------------------------------------------------------------------
def test_flat_buffer_views_and_optimizer_state_in_both_layouts():
    torch.manual_seed(0)
    ws = [torch.nn.Parameter(torch.randn(*shape)) for shape in ((4, 3), (5,), (2, 2))]
    ref = [torch.nn.Parameter(w.detach().clone()) for w in ws]
    flat = FlatParams([{"params": ws, "lr": 1e-2, "name": "unet"}])
    g = flat.groups[0]
    assert all(w.untyped_storage().data_ptr() == g.param.untyped_storage().data_ptr() for w in ws)
    opt_f = torch.optim.AdamW(flat.param_groups(), lr=1e-2)
    opt_r = torch.optim.AdamW([{"params": ref, "lr": 1e-2, "name": "unet"}], lr=1e-2)
    for i in range(3):
        for params in (ws, ref):
            loss = sum(((p * (j + 1 + i)) ** 2).sum() for j, p in enumerate(params))
            loss.backward()
        flat.gather_grads()
        opt_f.step(), opt_r.step()
        flat.zero_grad(), opt_r.zero_grad()
    for w, r in zip(ws, ref):  # same single-tensor AdamW arithmetic, element by element
        torch.testing.assert_close(w, r, rtol=0, atol=0)
    per = flat.state_dict_per_weight(opt_f.state_dict())
    want = opt_r.state_dict()
    assert per["param_groups"][0]["params"] == want["param_groups"][0]["params"]
    for i, st in want["state"].items():
        for k, v in st.items():
            torch.testing.assert_close(per["state"][i][k], v, rtol=0, atol=0, msg=k)
    # back to the flat layout, and a fused optimizer keeps its implementation flag when loading
    opt_f2 = torch.optim.AdamW(flat.param_groups(), lr=1e-2, fused=fastpath.fused_adamw_supported(torch.device("cpu")))
    load_optimizer_state(opt_f2, flat.state_dict_flat(want))
    assert opt_f2.param_groups[0]["fused"] == opt_f2.defaults["fused"]
    for k, v in opt_f.state_dict()["state"][0].items():
        torch.testing.assert_close(opt_f2.state_dict()["state"][0][k].float(), v.float(), rtol=0, atol=0, msg=k)
    with pytest.raises(ValueError, match="holds 2 weights"):
        flat.state_dict_flat({"state": {}, "param_groups": [{"params": [0, 1]}]})


def test_saved_lora_is_a_copy_not_a_view_of_the_buffer(sd1):
    net = LoRANetwork(sd1, "sd1", dim=2, alpha=1, train_text_encoder=False)
    FlatParams(net.param_groups(1e-3, 0))
    sd = net.kohya_state_dict()
    k = next(k for k in sd if k.endswith("lora_down.weight"))
    name = k[:-len(".lora_down.weight")]
    assert sd[k].untyped_storage().data_ptr() != net.pairs[name].lora_down.weight.untyped_storage().data_ptr()


def test_resume_across_paths_gives_the_same_weights(sd1, tmp_path):
    """A state written by the fast path (per-weight layout) resumed by the plain path, and the other way round."""
    img, _ = train_data.make_dataset(str(tmp_path / "d"), n_concept=4, repeats=1)
    kw = dict(max_train_epochs=3)  # 4 samples / 2 = 2 steps per epoch, 6 steps

    def cancel_after(n):
        seen = {"n": 0}

        def on_event(e):
            if e.kind == "step":
                seen["n"] = e.step
        return on_event, (lambda: seen["n"] >= n)

    full = _trainer(sd1, _cfg(str(tmp_path / "full"), img, **kw), True).run()
    for first, second in ((True, False), (False, True)):
        root = str(tmp_path / f"r{first}")
        ev, stop = cancel_after(3)
        part = _trainer(sd1, _cfg(root, img, **kw), first, on_event=ev, should_cancel=stop).run()
        assert part.status == "cancelled" and part.steps == 3
        done = _trainer(sd1, _cfg(root, img, **kw), second).run(resume_state=part.state_file)
        assert done.steps == 6
        a, b = _weights(full.final), _weights(done.final)
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-5, msg=k)


def test_text_encoder_probe_finds_the_layers_after_clip_skip(sd1):
    net = LoRANetwork(sd1, "sd1", dim=2, alpha=1, train_unet=False)
    te = TextEncoder(sd1, "sd1", clip_skip=2)
    params = [p for g in net.param_groups(0, 1e-3) for p in g["params"]]
    with net.attached():
        tokens = te.tokenize(["a cat"])[0]
        skip = unused_text_encoder_params(net, lambda: te.encode(tokens, "cpu"), params)
    last = {id(p) for n, pair in net.pairs.items() if "encoder_layers_1_" in n for p in pair.parameters()}
    assert skip == last and last  # tiny TE: 2 layers; clip_skip 2 uses the output of layer 0
    assert all(p.grad is None for p in params) and net.training
    flat = FlatParams(net.param_groups(0, 1e-3), skip)
    assert flat.groups[0].numel == sum(p.numel() for p in params if id(p) not in skip)


# ---- timestep embedding, switches, capture ------------------------------------------------------------------------
def test_cached_timestep_embedding_is_exact_and_put_back(sd1):
    unet = sd1.model.diffusion_model
    import ldm.modules.diffusionmodules.openaimodel as oam

    orig = oam.timestep_embedding
    t = torch.tensor([0, 1, 17, 999])
    with cached_timestep_embedding(unet) as on:
        assert on and oam.timestep_embedding is not orig
        for dim in (320, 33):
            assert torch.equal(oam.timestep_embedding(t, dim), orig(t, dim))
        tf = torch.tensor([0.5, 3.25])  # non-integer timesteps go to the original
        assert torch.equal(oam.timestep_embedding(tf, 8), orig(tf, 8))
    assert oam.timestep_embedding is orig


def test_clip_causal_mask_without_sync_is_exact_and_put_back():
    from transformers.models.clip import modeling_clip as mc

    orig = mc._make_causal_mask
    with fastpath.sync_free_clip_mask() as on:
        assert on and mc._make_causal_mask is not orig
        for dt in (torch.float32, torch.float16, torch.bfloat16):
            assert torch.equal(mc._make_causal_mask((3, 77), dt, "cpu"), orig((3, 77), dt, "cpu"))
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            mc._make_causal_mask((3, 77), torch.float32, "cpu")
        assert not {e.name for e in prof.events()} & (fastpath.SYNC_OPS | fastpath.HOST_DATA_OPS)
    assert mc._make_causal_mask is orig


def test_fast_path_switches(monkeypatch):
    monkeypatch.delenv("LORA_STUDIO_FAST_PATH", raising=False)
    cfg = type("C", (), {})()
    # default: fast step, CUDA graphs wherever they can work, nobody asked for them explicitly
    assert FastPath.resolve(None, cfg, None) == FastPath(True, True, "default", False)
    assert FastPath.resolve(False, cfg, None).enabled is False
    assert FastPath.resolve(False, cfg, None).capture is False
    assert FastPath.resolve("capture", cfg, None).capture_asked is True
    host = type("H", (), {"fast_path": False})()
    assert FastPath.resolve(None, cfg, host).enabled is False
    cfg.fast_path, cfg.cuda_graphs = True, True
    assert FastPath.resolve(None, cfg, host) == FastPath(True, True, "config", True)
    cfg.cuda_graphs = False  # graphs off, the rest of the fast path on
    assert FastPath.resolve(None, cfg, host) == FastPath(True, False, "config", False)
    assert FastPath.resolve(True, cfg, host).capture is False
    monkeypatch.setenv("LORA_STUDIO_FAST_PATH", "0")
    assert FastPath.resolve(None, cfg, host).enabled is False
    assert FastPath.resolve(True, cfg, host).enabled is True  # the engine call wins
    monkeypatch.setenv("LORA_STUDIO_FAST_PATH", "capture")
    assert FastPath.resolve(None, cfg, host).capture is True  # the environment beats the config
    monkeypatch.setenv("LORA_STUDIO_FAST_PATH", "sometimes")
    with pytest.raises(ValueError, match="not understood"):
        FastPath.resolve(None, cfg, host)


def test_fast_path_off_is_the_plain_step(sd1, tmp_path):
    img, _ = train_data.make_dataset(str(tmp_path / "d"), n_concept=2, repeats=1)
    tr = _trainer(sd1, _cfg(str(tmp_path), img, max_train_steps=1), False)
    tr.run()
    assert tr.fast_desc.startswith("off") and tr.runner.flat is None
    assert not tr.runner.optimizer.param_groups[0].get("fused")


def test_capture_asked_without_cuda_runs_eagerly(sd1):
    notes = []
    net, runner = _runner(sd1, True)
    runner2 = StepRunner(runner.unet, runner.schedule, runner.optimizer, runner.scheduler, device=torch.device("cpu"),
                         flat=runner.flat, capture=True, on_note=notes.append)
    assert runner2.graphs is None and "needs a CUDA device" in notes[0]
    with net.attached():
        loss = runner2.step(_batch(0))
    assert torch.isfinite(loss)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_fast_step_never_syncs_and_graph_replay_matches(tmp_path):
    """GPU session only: the fast step under set_sync_debug_mode('error'), and CUDA-graph replays vs eager steps."""
    dev = torch.device("cuda")
    results = []
    for capture in (False, True):
        model = models.to_device(models.make_sd1(seed=5), dev)
        unet = model.model.diffusion_model
        net = LoRANetwork(model, "sd1", dim=4, alpha=2, train_text_encoder=False)
        torch.manual_seed(0)
        for pair in net.pairs.values():
            torch.nn.init.kaiming_uniform_(pair.lora_down.weight, a=5 ** 0.5)
        net.to(dev)
        groups = net.param_groups(1e-3, 0)
        flat = FlatParams(groups)
        opt, _ = make_optimizer("AdamW", flat.param_groups(), lr=1e-3, device=dev)
        sched = make_scheduler(opt, "constant", 0, 9)
        runner = StepRunner(unet, NoiseSchedule(model.alphas_cumprod).to(dev), opt, sched, device=dev, flat=flat,
                            amp_dtype=torch.bfloat16, max_grad_norm=1.0, capture=capture)
        batches = [StepBatch(b.x0.to(dev), b.weights.to(dev), {"crossattn": b.cond["crossattn"].to(dev)}, b.step_seed,
                             b.noise_seed) for b in (_batch(i) for i in range(6))]
        with net.attached(), cached_timestep_embedding(unet):
            for b in batches[:3]:
                runner.step(b)
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                for b in batches[3:]:
                    runner.step(b)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
        assert capture is False or runner.graphs, "the step was not captured"
        results.append(flat.groups[0].param.detach().clone())
    torch.testing.assert_close(results[1], results[0], rtol=1e-3, atol=1e-5)
