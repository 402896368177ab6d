"""The CUDA-graph path of the training step (fastpath.StepRunner), everything around the torch.cuda calls, on the CPU.

``EmulatedGraphs`` acts out ``fastpath.CudaGraphs``: a capture records the step's body without running it (as on a
GPU, where kernels are recorded, not run), a replay runs the recorded body on the graph's own input buffers. So
these tests check what a real capture depends on: every input reaches the graph through its static buffers (two
bucket shapes alternate; a stale buffer would train on old latents), the learning rate reaches it through a tensor
filled before each replay (cosine schedule with warm-up: a stale LR changes the weights), the text encoder runs
inside the graph on static token buffers, fp16's GradScaler with a fused AdamW, the warm-up/capture/check sequence,
the self-check that drops a graph which does not reproduce the eager step, and the settings that forbid capture.
What only a GPU can show (the capture itself, speed, memory) is in tests/bench/bench_train.py.
"""

import pytest
import torch

import models
import train_data
from lib_lora.formats.safetensors_io import load_tensors
from lib_lora.host.base import ModelHost
from lib_lora.train import fastpath
from lib_lora.train.config import parse_train_config
from lib_lora.train.fastpath import (GRAPH_WARMUP, FlatParams, InStepCond, StepBatch, StepRunner,
                                     cached_timestep_embedding)
from lib_lora.train.lora_net import LoRANetwork
from lib_lora.train.loss import NoiseSchedule
from lib_lora.train.optim import make_optimizer, make_scheduler
from lib_lora.train.run import plan_for
from lib_lora.train.trainer import Trainer


class _Recorded:
    """A replay: the recorded body runs on the graph's buffers, its outputs are copied into the tensors the capture
    returned (a real graph writes its outputs in place), and Python-side state is put back as it was (a real
    replay runs no Python: code reading Python attributes after a replay would read stale values)."""

    def __init__(self, body, static, runner, log):
        self.body, self.static, self.runner, self.log = body, static, runner, log

    def replay(self):
        self.log.append("replay")
        python_post = self.runner.post_result
        out = self.body()
        with torch.no_grad():
            self.static["loss"].copy_(out)
            if self.static["post"] is not None:
                for dst, src in zip(self.static["post"], self.runner.post_result):
                    dst.copy_(src)
        self.runner.post_result = python_post


class EmulatedGraphs(fastpath.CudaGraphs):
    """torch.cuda's graph calls acted out on the CPU (see the module doc): a capture runs the body's Python once
    and leaves every tensor as it was (kernels are recorded, not run); replays are ``_Recorded``."""

    def __init__(self):
        self.log = []
        self.runner = None

    def bind(self, runner):
        self.runner = runner

    def available(self, device):
        return True

    def synchronize(self):
        pass

    def side_stream(self):
        self.log.append("warm-up")
        return _Null()

    def capture(self, body, pool):
        self.log.append("capture")
        r = self.runner
        state = r._state_tensors()
        saved = [t.detach().clone() for t in state]
        rng = torch.get_rng_state()
        out = body()
        static = {"loss": out, "post": r.post_result if r.post_update is not None else None}
        with torch.no_grad():
            for t, v in zip(state, saved):
                t.copy_(v)
        torch.set_rng_state(rng)
        return self._recorded(body, static), out, pool or object()

    def _recorded(self, body, static):
        return _Recorded(body, static, self.runner, self.log)


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class DriftingGraphs(EmulatedGraphs):
    """A graph that does not reproduce the eager step (its replay nudges the weights): must be dropped."""

    def __init__(self, params):
        super().__init__()
        self.params = params

    def _recorded(self, body, static):
        params = self.params

        class Drift(_Recorded):
            def replay(self):
                super().replay()
                with torch.no_grad():
                    for p in params:
                        p.mul_(1.5)
        return Drift(body, static, self.runner, self.log)


@pytest.fixture(scope="module")
def sd1():
    return models.make_sd1(seed=4)


def _runner(model, graphs, *, te=False, scaler=None, amp=None, fused=True, accum=1, notes=None, dropout=0.1):
    net = LoRANetwork(model, "sd1", dim=4, alpha=2, train_text_encoder=te, dropout=dropout)
    torch.manual_seed(0)
    for pair in net.pairs.values():
        torch.nn.init.kaiming_uniform_(pair.lora_down.weight, a=5 ** 0.5)
    groups = net.param_groups(1e-3, 5e-4 if te else 0)
    flat = FlatParams(groups)
    opt, _ = make_optimizer("AdamW", flat.param_groups(), lr=1e-3, args={"fused": fused})
    sched = make_scheduler(opt, "cosine", 3, 40)  # the LR changes every step
    backend = graphs(flat.grad_params()) if graphs is DriftingGraphs else (graphs() if graphs else None)
    runner = StepRunner(model.model.diffusion_model, NoiseSchedule(model.alphas_cumprod), opt, sched,
                        device=torch.device("cpu"), flat=flat, max_grad_norm=1.0, min_snr_gamma=5.0,
                        noise_offset=0.05, capture=graphs is not None, graphs_backend=backend, scaler=scaler,
                        amp_dtype=amp, accum=accum, on_note=(notes.append if notes is not None else None))
    return net, runner


def _batches(n, te=None, mask=False):
    """Two bucket shapes, alternating in runs of two (so each shape warms up, is captured and replayed)."""
    out = []
    for i in range(n):
        g = torch.Generator().manual_seed(300 + i)
        hw = (8, 8) if (i // 2) % 2 == 0 else (8, 16)
        x0 = torch.randn(2, 4, *hw, generator=g)
        if te is not None:
            tokens = torch.randint(0, 49406, (2, 1, 77), generator=g)
            tokens[:, :, 0] = 49406
            cond = InStepCond(lambda tk: te.encode(tk, torch.device("cpu")), tokens)
        else:
            cond = {"crossattn": torch.randn(2, 77, 768, generator=g)}
        m = torch.rand(2, 1, *hw, generator=g) if mask else None  # alpha_mask loss weights
        out.append(StepBatch(x0, torch.rand(2, generator=g) + 0.5, cond, step_seed=40 + i, noise_seed=80 + i, mask=m))
    return out


def _train(model, net, runner, batches):
    losses = []
    with net.attached(), cached_timestep_embedding(model.model.diffusion_model):
        net.train()
        for b in batches:
            losses.append(float(runner.step(b)))
    net.eval()
    return torch.cat([p.detach().reshape(-1).clone() for p in runner.grad_params]), losses


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _eager_and_graphed(sd1, graphs, batches, notes=None, **kw):
    """The same batches through the plain step and through ``graphs``: (weights, losses, runner) of each."""
    net_e, run_e = _runner(sd1, None, **kw)
    w_e, l_e = _train(sd1, net_e, run_e, batches)
    net_g, run_g = _runner(sd1, graphs, notes=notes, **kw)
    w_g, l_g = _train(sd1, net_g, run_g, batches)
    return (w_e, l_e, run_e), (w_g, l_g, run_g)


def test_graph_replays_train_like_the_eager_step(sd1):
    """Two shapes, changing LR, LoRA dropout: the emulated graphs give the eager step's weights and losses."""
    (w_e, l_e, run_e), (w_g, l_g, run_g) = _eager_and_graphed(sd1, EmulatedGraphs, _batches(14))
    assert run_g.graph_stats["captured"] == 2 and run_g.graph_stats["dropped"] == 0, run_g.graph_stats
    # 14 steps = 2 shapes x (2 warm-up + 1 checked replay) + 8 plain replays
    assert run_g.graph_stats["replays"] == 14 - 2 * GRAPH_WARMUP, run_g.graph_stats
    assert run_g.cg.log.count("capture") == 2 and run_g.cg.log.count("warm-up") == 2 * GRAPH_WARMUP
    assert all(e.checked for e in run_g.graphs.values())
    assert _rel(w_g, w_e) < 1e-5, _rel(w_g, w_e)
    for a, b in zip(l_g, l_e):
        assert a == pytest.approx(b, rel=1e-5)
    assert run_g.scheduler.last_epoch == run_e.scheduler.last_epoch == 14


def test_alpha_masks_reach_the_graph_through_its_buffers(sd1):
    batches = _batches(10, mask=True)
    net_e, run_e = _runner(sd1, None)
    w_e, _ = _train(sd1, net_e, run_e, batches)
    net_g, run_g = _runner(sd1, EmulatedGraphs)
    w_g, _ = _train(sd1, net_g, run_g, batches)
    assert all("mask" in g.inputs for g in run_g.graphs.values()) and run_g.graph_stats["dropped"] == 0
    assert _rel(w_g, w_e) < 1e-5, _rel(w_g, w_e)
    net_n, run_n = _runner(sd1, None)  # and the masks matter
    w_n, _ = _train(sd1, net_n, run_n, _batches(10))
    assert _rel(w_n, w_e) > 1e-3


def test_a_stale_input_or_lr_would_be_caught(sd1):
    """The comparison above can fail: replaying with the first step's inputs, or without the LR refresh, trains
    different weights."""
    batches = _batches(10)
    net_e, run_e = _runner(sd1, None)
    w_e, _ = _train(sd1, net_e, run_e, batches)

    class NoInputCopy(StepRunner):
        def _replay(self, entry, b, noise, t):
            for g, lt in zip(self.optimizer.param_groups, self._lr_t):
                lt.fill_(float(g["lr"]))
            entry.graph.replay()

    class NoLrRefresh(StepRunner):
        def _replay(self, entry, b, noise, t):
            for k, v in self._sources(b, noise, t).items():
                entry.inputs[k].copy_(v)
            entry.graph.replay()

    for cls in (NoInputCopy, NoLrRefresh):
        net, run = _runner(sd1, EmulatedGraphs)
        run.__class__ = cls
        run.cg.log.clear()
        w, _ = _train(sd1, net, run, batches)
        assert _rel(w, w_e) > 1e-3, cls.__name__


def test_text_encoder_runs_inside_the_graph_on_static_tokens(sd1):
    from lib_lora.train.conditioning import TextEncoder

    te = TextEncoder(sd1, "sd1")
    batches = _batches(10, te=te)
    net_e, run_e = _runner(sd1, None, te=True, dropout=0)
    w_e, _ = _train(sd1, net_e, run_e, batches)
    net_g, run_g = _runner(sd1, EmulatedGraphs, te=True, dropout=0)
    w_g, _ = _train(sd1, net_g, run_g, batches)
    assert run_g.graph_stats["captured"] == 2 and run_g.graph_stats["dropped"] == 0, run_g.graph_stats
    entry = next(iter(run_g.graphs.values()))
    assert "tok0" in entry.inputs and "ctx" not in entry.inputs
    assert _rel(w_g, w_e) < 1e-5, _rel(w_g, w_e)
    te_w = [p for p in net_g.parameters() if p.requires_grad]
    assert len(te_w) > 0


def test_fp16_grad_scaler_with_fused_adamw_is_captured(sd1):
    batches = _batches(8)
    net_e, run_e = _runner(sd1, None, scaler=torch.amp.GradScaler("cpu", init_scale=256.0),
                           amp=torch.bfloat16, dropout=0)
    w_e, _ = _train(sd1, net_e, run_e, batches)
    net_g, run_g = _runner(sd1, EmulatedGraphs, scaler=torch.amp.GradScaler("cpu", init_scale=256.0),
                           amp=torch.bfloat16, dropout=0)
    w_g, _ = _train(sd1, net_g, run_g, batches)
    assert run_g.capture_blockers == [] and run_g.graph_stats["captured"] == 2, run_g.graph_stats
    assert _rel(w_g, w_e) < 1e-4, _rel(w_g, w_e)
    assert float(run_g.scaler.get_scale()) == float(run_e.scaler.get_scale())


def test_a_graph_that_differs_from_the_eager_step_is_dropped(sd1):
    notes = []
    (w_e, _, _), (w_g, _, run_g) = _eager_and_graphed(sd1, DriftingGraphs, _batches(10), notes=notes)
    assert run_g.graph_stats["dropped"] == 2 and all(v is None for v in run_g.graphs.values())
    assert sum("does not reproduce the eager step" in n for n in notes) == 2, notes
    # the run went on eagerly from the state before the failed check: the eager run's weights
    assert _rel(w_g, w_e) < 1e-6, _rel(w_g, w_e)


def test_a_capture_that_raises_leaves_that_shape_eager(sd1):
    class Failing(EmulatedGraphs):
        def capture(self, body, pool):
            raise RuntimeError("operation not permitted when stream is capturing")

    notes = []
    (w_e, _, _), (w_g, _, _) = _eager_and_graphed(sd1, Failing, _batches(8), notes=notes)
    assert sum("capture failed" in n and "operation not permitted" in n for n in notes) == 2, notes
    assert _rel(w_g, w_e) < 1e-6


@pytest.mark.parametrize("setting, reason", [
    (dict(fused=False, scaler="fp16"), "fp16 GradScaler"),
    (dict(accum=2), "gradient_accumulation_steps"),
])
def test_settings_that_decide_on_the_host_are_not_captured(sd1, setting, reason):
    notes = []
    kw = dict(setting)
    if kw.pop("scaler", None):
        kw["scaler"] = torch.amp.GradScaler("cpu")
    _, run = _runner(sd1, EmulatedGraphs, notes=notes, **kw)
    assert run.graphs is None and any(reason in b for b in run.capture_blockers)
    assert any(n.startswith("CUDA graphs off") and reason in n for n in notes), notes


@pytest.mark.parametrize("family, weighted, algo", [("sd1", False, None), ("sdxl", False, None), ("sdxl", True, None),
                                                   ("sdxl", False, "loha"), ("sdxl", False, "locon dora_wd=True"),
                                                   ("sd1", False, "diag-oft constraint=0.01 rescaled=True"),
                                                   ("sd1", False, "glora use_scalar=True"),
                                                   ("sd1", False, "full train_norm=True"), ("sd1", False, "ia3"),
                                                   ("sd1", False, "networks.oft enable_all_linear=True"),
                                                   ("sd1", False, "networks.lora_fa conv_dim=2")])
def test_trainer_uses_graphs_by_default_where_they_can_run(sd1, family, weighted, algo, tmp_path, monkeypatch):
    """The whole trainer (text encoder(s) trained, reg images; SDXL: two token streams, size conditioning; with
    weighted_captions the tokens' weights too; a LyCORIS LoHa, whose weight-path modules include TE2's attention;
    a LoCon with DoRA, whose magnitudes are normalised against the host weights inside the graph; diag-OFT with its
    norm cap and batched inverse, which must not read anything back; GLoRA, IA3, full with norm modules;
    sd-scripts' OFT and LoRA-FA, whose frozen lora_down stays outside the flat buffer)
    with the emulated graphs standing in for CUDA: graphs are on without being asked, and the LoRA file equals the
    one of a run with cuda_graphs = false."""
    model = sd1 if family == "sd1" else models.make_sdxl(seed=1)
    monkeypatch.setattr(fastpath, "CudaGraphs", EmulatedGraphs)
    monkeypatch.delenv("LORA_STUDIO_FAST_PATH", raising=False)
    caps = ["svs cat, (smiling:1.4)", "svs [cat], grass", "svs cat"] if weighted else None
    img, reg = train_data.make_dataset(str(tmp_path / "d"), n_concept=3, repeats=2, n_reg=2, captions=caps)
    finals, descs, runners = [], [], []
    for graphs in (None, False):
        c = {"train_data_dir": img, "reg_data_dir": reg, "resolution": 64, "train_batch_size": 1,
             "output_dir": str(tmp_path / f"out-{graphs}"), "output_name": "g", "network_dim": 4,
             "network_alpha": 2, "learning_rate": 1e-3, "text_encoder_lr": 5e-4, "seed": 7, "max_train_steps": 12,
             "save_precision": "float", "lr_scheduler": "cosine", "lr_warmup_steps": 2,
             "weighted_captions": weighted}
        if algo and algo.startswith("networks."):  # (sd-scripts' own network modules)
            module, *more = algo.split()
            c.update(network_module=module, network_args=more, network_alpha=1e-2)
        elif algo:
            algo_name, *more = algo.split()
            c.update(network_module="lycoris.kohya", network_args=[f"algo={algo_name}", "conv_dim=2", *more])
        if graphs is not None:
            c["cuda_graphs"] = graphs
        cfg = parse_train_config(c, base_dir=str(tmp_path))
        host = ModelHost(model, "m")
        tr = Trainer(host, cfg, plan_for(host, cfg))
        res = tr.run()
        assert res.status == "done"
        finals.append({k: v.float() for k, v in load_tensors(res.final).items()})
        descs.append(tr.fast_desc)
        runners.append(tr.runner)
    assert "CUDA graphs per bucket shape" in descs[0] and "CUDA graphs" not in descs[1], descs
    assert runners[0].graph_stats["replays"] >= 1 and runners[0].graph_stats["dropped"] == 0, runners[0].graph_stats
    inputs = next(g for g in runners[0].graphs.values() if g is not None).inputs
    assert {"tok0", "x0", "noise", "t", "w"} <= set(inputs) and "ctx" not in inputs
    if family == "sdxl":
        assert {"tok1", "sizes"} <= set(inputs)
    assert ({"tok2", "tok3"} <= set(inputs)) == weighted  # the weights are static inputs of the graph too
    a, b = finals
    num = sum(((a[k] - b[k]) ** 2).sum() for k in a)
    den = sum((b[k] ** 2).sum() for k in b)
    # IA3 / full / sd-scripts' OFT: some of the tiny UNet's parameters have a gradient that is zero up to float
    # noise (the mid block's self-attention keys see one token; biases before a GroupNorm of one channel per group
    # cancel), and AdamW turns noise into whole steps from their zero start, so last-bit differences show there (a
    # stale input or LR would be far above either bound)
    zero_start = algo is not None and algo.split()[0] in ("full", "ia3", "networks.oft")
    assert float((num / den) ** 0.5) < (3e-3 if zero_start else 1e-5)


def test_default_on_a_cpu_says_nothing_about_graphs(sd1):
    notes = []
    net = LoRANetwork(sd1, "sd1", dim=4, alpha=2, train_text_encoder=False)
    groups = net.param_groups(1e-3, 0)
    flat = FlatParams(groups)
    opt, _ = make_optimizer("AdamW", flat.param_groups(), lr=1e-3, args={"fused": True})
    run = StepRunner(sd1.model.diffusion_model, NoiseSchedule(sd1.alphas_cumprod), opt,
                     make_scheduler(opt, "constant", 0, 9), device=torch.device("cpu"), flat=flat, capture=True,
                     capture_asked=False, on_note=notes.append)
    assert run.graphs is None and "needs a CUDA device" in run.capture_blockers[0] and notes == []


# ---- torch.compile ----------------------------------------------------------------------------------------------
# aot_eager: dynamo's tracing and AOT autograd exactly as inductor gets them, without generating kernels (inductor's
# code generation and speed are the GPU benchmark's business)

def _compiled_runner(model, backend, notes):
    net, run = _runner(model, None, dropout=0)
    run2 = StepRunner(run.unet, run.schedule, run.optimizer, run.scheduler, device=torch.device("cpu"), flat=run.flat,
                      params=run.params, max_grad_norm=1.0, min_snr_gamma=5.0, noise_offset=0.05,
                      compile_backend=backend, on_note=notes.append)
    return net, run2


def test_compiled_unet_trains_like_the_plain_one_and_leaves_the_module_alone(sd1):
    batches = _batches(4)[:2] + _batches(4)[:2]  # one shape: one compile
    net_e, run_e = _runner(sd1, None, dropout=0)
    w_e, l_e = _train(sd1, net_e, run_e, batches)
    notes = []
    net_c, run_c = _compiled_runner(sd1, "aot_eager", notes)
    unet = sd1.model.diffusion_model
    forward_before = unet.forward
    w_c, l_c = _train(sd1, net_c, run_c, batches)
    assert run_c.compiled is True and notes == [], notes
    assert _rel(w_c, w_e) < 1e-4, _rel(w_c, w_e)
    for a, b in zip(l_c, l_e):
        assert a == pytest.approx(b, rel=1e-4)
    assert type(unet).__name__ == "UNetModel" and unet.forward == forward_before and "forward" not in unet.__dict__


def test_a_compile_that_fails_falls_back_to_the_plain_unet(sd1):
    from torch._dynamo import register_backend

    @register_backend(name="lora_studio_broken_backend")
    def broken(gm, example_inputs):
        raise RuntimeError("no C++ compiler found")

    batches = _batches(3)
    net_e, run_e = _runner(sd1, None, dropout=0)
    w_e, _ = _train(sd1, net_e, run_e, batches)
    notes = []
    net_c, run_c = _compiled_runner(sd1, "lora_studio_broken_backend", notes)
    w_c, _ = _train(sd1, net_c, run_c, batches)
    assert run_c.compiled is None and run_c.unet_call is run_c.unet
    assert any("torch_compile failed" in n and "no C++ compiler" in n for n in notes), notes
    assert _rel(w_c, w_e) < 1e-6


def test_max_norm_logging_follows_the_graph_replays(sd1):
    """scale_weight_norms runs inside the graph; the numbers the loop logs must be the replay's, not a stale
    eager step's (on a GPU they are the graph's static outputs)."""
    batches = _batches(8)
    results = {}
    for graphs in (None, EmulatedGraphs):
        net, run = _runner(sd1, graphs)
        run.post_update = lambda net=net: net.max_norm_regularize(0.05)
        seen = []
        with net.attached(), cached_timestep_embedding(sd1.model.diffusion_model):
            net.train()
            for b in batches:
                run.step(b)
                seen.append(tuple(float(v) for v in run.post_result))
        results[graphs] = seen
    got = [v for row in results[EmulatedGraphs] for v in row]
    assert got == pytest.approx([v for row in results[None] for v in row], rel=1e-5), results
    assert len(set(results[None])) > 1  # the numbers change from step to step


def test_dylora_is_never_captured_and_says_why(sd1, tmp_path, monkeypatch):
    """networks.dylora draws its trained ranks on the host per micro-batch: asked for graphs, it runs eagerly and
    the notes say why (EmulatedGraphs would capture anything it is given)."""
    monkeypatch.setattr(fastpath, "CudaGraphs", EmulatedGraphs)
    img, _ = train_data.make_dataset(str(tmp_path / "d"), n_concept=2, repeats=2)
    cfg = parse_train_config(train_data.job_config(img, tmp_path / "o", network_module="networks.dylora",
                                                   max_train_steps=4, cuda_graphs=True), base_dir=str(tmp_path))
    host = ModelHost(sd1, "m")
    tr = Trainer(host, cfg, plan_for(host, cfg))
    assert tr.run().status == "done"
    assert tr.runner.graphs is None and "CUDA graphs" not in tr.fast_desc
    assert any("CUDA graphs off" in n and "networks.dylora draws its trained ranks on the host" in n
               for n in tr.notes), tr.notes
