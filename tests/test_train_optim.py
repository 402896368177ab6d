"""Schedules against transformers' own get_*_schedule_with_warmup (what diffusers/sd-scripts use); optimizers step."""

import pytest
import torch
from transformers import optimization as tro

from lib_lora.train.optim import Lion, OptimizerUnavailable, make_optimizer, make_scheduler


def _lrs(sched_factory, steps=120):
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = sched_factory(opt)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize("name,ref", [
    ("constant", lambda o: tro.get_constant_schedule(o)),
    ("constant_with_warmup", lambda o: tro.get_constant_schedule_with_warmup(o, 10)),
    ("linear", lambda o: tro.get_linear_schedule_with_warmup(o, 10, 100)),
    ("cosine", lambda o: tro.get_cosine_schedule_with_warmup(o, 10, 100)),
    ("cosine_with_restarts", lambda o: tro.get_cosine_with_hard_restarts_schedule_with_warmup(o, 10, 100, num_cycles=3)),
    ("polynomial", lambda o: tro.get_polynomial_decay_schedule_with_warmup(o, 10, 100, lr_end=1e-7, power=2.0)),
])
def test_schedules_match_transformers(name, ref):
    ours = _lrs(lambda o: make_scheduler(o, name, 10, 100, num_cycles=3, power=2.0))
    theirs = _lrs(ref)
    assert ours == pytest.approx(theirs, rel=1e-9, abs=1e-12)


def test_polynomial_ends_where_sd_scripts_ends_with_unet_lr_alone():
    """transformers' lr_end is an LR measured against the optimizer's default LR, which sd-scripts sets to
    learning_rate: with unet_lr 1e-4 and learning_rate 2e-6 the UNet ends at 5e-6, not at ~1e-11."""
    def lrs(factory):
        p = torch.nn.Parameter(torch.zeros(2))
        opt = torch.optim.SGD([{"params": [p], "lr": 1e-4}], lr=2e-6)
        sched, out = factory(opt), []
        for _ in range(100):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out

    ours = lrs(lambda o: make_scheduler(o, "polynomial", 10, 100, power=2.0, lr_init=2e-6))
    theirs = lrs(lambda o: tro.get_polynomial_decay_schedule_with_warmup(o, 10, 100, lr_end=1e-7, power=2.0))
    assert ours == pytest.approx(theirs, rel=1e-9, abs=1e-15)
    assert ours[-1] > 5e-6
    ours = lrs(lambda o: make_scheduler(o, "polynomial", 10, 100, args={"lr_end": "1e-8"}, lr_init=2e-6))
    theirs = lrs(lambda o: tro.get_polynomial_decay_schedule_with_warmup(o, 10, 100, lr_end=1e-8))
    assert ours == pytest.approx(theirs, rel=1e-9, abs=1e-15)


def test_newer_schedules_match_recorded_transformers_numbers():
    """cosine_with_min_lr, warmup_stable_decay and inverse_sqrt are newer than the WebUI's transformers 4.30.2:
    their numbers were recorded from transformers 5.17 (tests/data/lr_schedules_reference.py), with the
    arguments sd-scripts passes (num_cycles / 2, min_lr_ratio, lr_decay_steps)."""
    import json
    import os
    ref = json.load(open(os.path.join(os.path.dirname(__file__), "data", "lr_schedules_reference.json")))
    total, warmup = ref["total"], ref["warmup"]
    for name, want in ref["cases"].items():
        ours = _lrs(lambda o: make_scheduler(o, name, warmup, total, num_cycles=1,
                                             min_lr_ratio=ref["min_lr_ratio"].get(name),
                                             decay_steps=ref["decay_steps"]), steps=len(want))
        assert ours == pytest.approx(want, rel=1e-9, abs=1e-12), name


def test_piecewise_constant_matches_diffusers():
    from diffusers.optimization import get_piecewise_constant_schedule
    rules = "1:10,0.5:25,0.1:60,0.02"
    ours = _lrs(lambda o: make_scheduler(o, "piecewise_constant", 0, 100, args={"step_rules": rules}))
    theirs = _lrs(lambda o: get_piecewise_constant_schedule(o, rules))
    assert ours == theirs
    p = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="step_rules"):
        make_scheduler(torch.optim.SGD([p], lr=1), "piecewise_constant", 0, 10)
    with pytest.raises(ValueError, match="more than the run"):
        make_scheduler(torch.optim.SGD([p], lr=1), "warmup_stable_decay", 5, 10, decay_steps=8)


def test_unknown_names_are_explained():
    p = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="choose one of"):
        make_optimizer("adamw9bit", [{"params": [p]}], 1e-3)
    with pytest.raises(ValueError, match="choose one of"):
        make_scheduler(torch.optim.SGD([p], lr=1), "cosineish", 0, 10)


@pytest.mark.parametrize("name", ["AdamW", "AdamW8bit", "Lion", "Prodigy", "Adafactor", "SGDNesterov"])
def test_optimizers_step(name):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(64, 128))  # > 4096 elements so bitsandbytes uses its 8-bit state
    try:
        opt, desc = make_optimizer(name, [{"params": [p]}], lr=1e-2 if name != "Prodigy" else 1.0)
    except OptimizerUnavailable as e:
        assert "install" in str(e).lower() or "choose" in str(e).lower()
        pytest.skip(str(e))
    before = p.detach().clone()
    for _ in range(3):
        opt.zero_grad()
        (p ** 2).sum().backward()
        opt.step()
    assert not torch.equal(before, p.detach())
    assert desc


def test_own_lion_matches_lion_pytorch():
    lion_pytorch = pytest.importorskip("lion_pytorch")
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(32, 8))
    b = torch.nn.Parameter(a.detach().clone())
    oa = Lion([a], lr=1e-2, weight_decay=0.1)
    ob = lion_pytorch.Lion([b], lr=1e-2, weight_decay=0.1)
    for i in range(5):
        for p, o in ((a, oa), (b, ob)):
            o.zero_grad()
            ((p - i) ** 3).sum().backward()
            o.step()
    torch.testing.assert_close(a, b)


def test_missing_bitsandbytes_falls_back_with_a_note(monkeypatch):
    from lib_lora.train import optim

    real = optim._import

    def no_bnb(module, what, hint):
        if module == "bitsandbytes":
            raise OptimizerUnavailable(f"{what} needs the 'bitsandbytes' package, which is not usable here. {hint}")
        return real(module, what, hint)

    monkeypatch.setattr(optim, "_import", no_bnb)
    p = torch.nn.Parameter(torch.zeros(4))
    with pytest.raises(OptimizerUnavailable, match="bitsandbytes"):
        make_optimizer("AdamW8bit", [{"params": [p]}], 1e-3)
    notes = []
    opt, desc = make_optimizer("AdamW8bit", [{"params": [p]}], 1e-3, notes=notes)
    assert isinstance(opt, torch.optim.AdamW) and desc.startswith("torch.optim.adamw.AdamW")
    assert len(notes) == 1 and "Training with AdamW instead" in notes[0]


def test_torch_scheduler_by_name_follows_its_closed_form():
    """lr_scheduler_type (sd-scripts: any torch scheduler, lr_scheduler_args read as Python literals): cosine
    annealing per group from each group's own LR, against its closed form."""
    import math
    from lib_lora.train.optim import literal_args, make_torch_scheduler
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([{"params": [a], "lr": 1e-3}, {"params": [b], "lr": 4e-3}], lr=1e-3)
    sched = make_torch_scheduler(opt, "torch.optim.lr_scheduler.CosineAnnealingLR", ["T_max=10", "eta_min=1e-5"])
    for t in range(1, 11):
        opt.step()
        sched.step()
        for g, base in zip(opt.param_groups, (1e-3, 4e-3)):
            want = 1e-5 + (base - 1e-5) * (1 + math.cos(math.pi * t / 10)) / 2
            assert g["lr"] == pytest.approx(want, rel=1e-9, abs=1e-12), t
    assert literal_args(["T_max=10", "eta_min=1e-5", "mode=triangular2", "x=[1, 2]"]) == {
        "T_max": 10, "eta_min": 1e-5, "mode": "triangular2", "x": [1, 2]}


def test_torch_schedulers_that_cannot_be_built_are_explained():
    from lib_lora.train.optim import make_torch_scheduler
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=1)
    with pytest.raises(ValueError, match="classes of other packages are not imported.*CosineAnnealingLR"):
        make_torch_scheduler(opt, "LoraEasyCustomOptimizer.CustomOptimizers.RexAnnealingWarmRestarts", [])
    with pytest.raises(ValueError, match="'LambdaLR': this is not one of torch's schedulers that a config can build"):
        make_torch_scheduler(opt, "LambdaLR", [])
    with pytest.raises(ValueError, match="CosineAnnealingLR refused lr_scheduler_args .*T_max"):
        make_torch_scheduler(opt, "CosineAnnealingLR", ["eta_min=0"])


# ---- sd-scripts' optimizer set (train_util.get_optimizer) --------------------------------------------------------
def _class_default(cls, arg):
    import inspect
    return inspect.signature(cls).parameters[arg].default


@pytest.mark.parametrize("name, cls_path, desc", [
    ("AdamW", "torch.optim.AdamW", "torch.optim.adamw.AdamW"),
    ("Lion", "lion_pytorch.Lion", "lion_pytorch.lion_pytorch.Lion"),
    ("Prodigy", "prodigyopt.Prodigy", "prodigyopt.prodigy.Prodigy"),
    ("SGDNesterov", "torch.optim.SGD", "torch.optim.sgd.SGD(momentum=0.9)"),
    ("Adafactor", "transformers.optimization.Adafactor", "transformers.optimization.Adafactor(relative_step=True)"),
    ("DAdaptAdam", "dadaptation.DAdaptAdam", "dadaptation.dadapt_adam.DAdaptAdam"),
    ("adamwschedulefree", "schedulefree.AdamWScheduleFree",
     "schedulefree.adamw_schedulefree.AdamWScheduleFree"),
])
def test_optimizers_get_only_the_users_arguments_as_in_sd_scripts(name, cls_path, desc):
    """sd-scripts passes optimizer_args (plus SGDNesterov's momentum and Adafactor's relative_step) and nothing
    else: weight decay is each class's own default (Lion, Prodigy, SGD, Adafactor: 0; we used to pass 0.01), and
    ss_optimizer is module.Class(k=v) of what it passed."""
    import importlib
    mod, _, cname = cls_path.rpartition(".")
    cls = getattr(importlib.import_module(mod), cname)
    p = torch.nn.Parameter(torch.randn(8, 4))
    opt, got = make_optimizer(name, [{"params": [p]}], lr=1.0)
    assert type(opt) is cls and got == desc
    assert opt.param_groups[0]["weight_decay"] == _class_default(cls, "weight_decay")
    opt, got = make_optimizer(name, [{"params": [p]}], lr=1.0, args={"weight_decay": 0.1})
    assert opt.param_groups[0]["weight_decay"] == 0.1 and "weight_decay=0.1" in got


def test_adafactor_default_is_its_own_relative_step_as_in_sd_scripts():
    """optimizer_type = Adafactor without arguments: sd-scripts sets relative_step=True, so transformers'
    Adafactor computes the step size (the learning rate only starts the adafactor schedule)."""
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(16, 8))
    b = torch.nn.Parameter(a.detach().clone())
    oa, _ = make_optimizer("Adafactor", [{"params": [a], "lr": 1e-4}], lr=1e-4)
    ob = tro.Adafactor([b], lr=None)  # transformers' defaults: scale_parameter, relative_step, no warmup_init
    for i in range(4):
        for p, o in ((a, oa), (b, ob)):
            o.zero_grad()
            ((p - i) ** 2).sum().backward()
            o.step()
    assert torch.equal(a, b)
    notes = []
    opt, desc = make_optimizer("Adafactor", [{"params": [a]}], lr=1e-4,
                               args={"relative_step": False, "warmup_init": True}, notes=notes)
    assert opt.param_groups[0]["relative_step"] is True and "warmup_init = True needs relative_step" in notes[0]


@pytest.mark.parametrize("name", ["DAdaptation", "DAdaptAdaGrad", "DAdaptAdam", "DAdaptAdan", "DAdaptAdanIP",
                                  "DAdaptLion", "DAdaptSGD", "RAdamScheduleFree", "AdamWScheduleFree",
                                  "SGDScheduleFree", "PagedAdamW8bit", "PagedAdamW", "PagedAdamW32bit",
                                  "PagedLion8bit", "SGDNesterov8bit", "Adam", "torch.optim.RAdam",
                                  "bitsandbytes.optim.AdamW"])
def test_every_sd_scripts_optimizer_name_trains(name):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(64, 128))
    notes = []
    opt, desc = make_optimizer(name, [{"params": [p]}], lr=1.0, notes=notes)  # (8-bit/paged: twin on a CPU)
    before = p.detach().clone()
    for _ in range(8):  # (RAdam's first steps make no update)
        opt.zero_grad()
        (p ** 2).sum().backward()
        opt.step()
    assert not torch.equal(before, p.detach()) and desc
    if name == "Adam":
        assert type(opt) is torch.optim.Adam  # sd-scripts: getattr(torch.optim, name), not AdamW


def test_names_nothing_provides_and_modules_outside_the_list_are_refused_before_queueing(monkeypatch):
    from lib_lora.train import optim
    from lib_lora.train.config import parse_train_config
    from lib_lora.train.support import check_support

    def check(name):
        return check_support(parse_train_config({"train_data_dir": "x", "optimizer_type": name}))

    errors, _ = check("os.system")
    assert errors and "optimizers are imported by name from these packages only" in errors[0]
    errors, _ = check("AdamW9bit")
    assert errors and errors[0].startswith("unknown optimizer 'AdamW9bit' (did you mean AdamW8bit?); choose one of")
    errors, _ = check("xyzzy")  # (nothing close: no guess)
    assert errors and errors[0].startswith("unknown optimizer 'xyzzy'; choose one of")
    errors, _ = check("torch.optim.NoSuch")
    assert errors and errors[0].endswith("torch.optim has no optimizer class 'NoSuch'")
    # a typo gets the name it is closest to, in the spelling that works (sd-scripts' names, or torch.optim's case)
    for typo, meant in (("Prodgy", "Prodigy"), ("adafactr", "Adafactor"), ("AdamW8", "AdamW8bit"),
                        ("Lion8bt", "Lion8bit"), ("adam", "Adam"), ("sgd", "SGD"),
                        ("RAdamSchedulFree", "RAdamScheduleFree")):
        errors, _ = check(typo)
        assert errors and f"(did you mean {meant}?)" in errors[0], (typo, errors)
    errors, _ = check("torch.optim.adamw")
    assert errors and errors[0].endswith("has no optimizer class 'adamw'; did you mean torch.optim.AdamW?")
    assert check("DAdaptAdam") == ([], []) and check("torch.optim.RAdam") == ([], [])
    real = optim._import

    def missing(module, what, hint):
        if module.split(".")[0] in ("prodigyopt", "bitsandbytes", "pytorch_optimizer"):
            raise OptimizerUnavailable(f"{what} needs the '{module}' package, which is not usable here. {hint}")
        return real(module, what, hint)
    monkeypatch.setattr(optim, "_import", missing)
    errors, _ = check("Prodigy")
    assert errors and "needs the 'prodigyopt' package" in errors[0] and "Install prodigyopt" in errors[0]
    errors, notes = check("PagedAdamW8bit")
    assert not errors and "Until then AdamW is used instead." in notes[0] and notes[0].count("more memory") == 1
    errors, _ = check("pytorch_optimizer.CAME")
    assert errors and "Install pytorch_optimizer yourself" in errors[0]


def test_adaptive_optimizers_say_when_the_lr_is_far_from_1():
    p = torch.nn.Parameter(torch.randn(4))
    notes = []
    make_optimizer("Prodigy", [{"params": [p], "lr": 1e-4}], lr=1e-4, notes=notes)
    assert any("learning rate 0.0001 is low for Prodigy" in n for n in notes)
    notes = []
    make_optimizer("DAdaptAdam", [{"params": [p], "lr": 1.0}], lr=1.0, notes=notes)
    assert notes == []


def test_a_missing_package_is_tried_once(monkeypatch):
    """The doctor checks the settings on every edit: an absent or broken package is not imported again each time."""
    import importlib
    from lib_lora.train import optim
    calls = []
    real = importlib.import_module

    def counting(name, *a, **k):
        calls.append(name)
        return real(name, *a, **k)
    monkeypatch.setattr(optim.importlib, "import_module", counting)
    monkeypatch.setattr(optim, "_IMPORT_FAILED", {})
    for _ in range(3):
        with pytest.raises(OptimizerUnavailable, match="needs the 'no_such_optimizer_pkg' package.*Restart the WebUI"):
            optim._import("no_such_optimizer_pkg", "X", "Install it.")
    assert calls == ["no_such_optimizer_pkg"]
