"""base_weights / base_weights_multiplier (sd-scripts train_network.py): LoRA files merged into the model before the
network is built, for this job only; the model comes back bit for bit afterwards, also when the job fails.

Merge numbers: checked in closed form on a layer (W + m·(alpha/rank)·up@down, sd-scripts' LoRAModule.merge_to);
the whole merge goes through the <lora:> patcher, whose deltas test_apply_* check against the peers."""

import pytest
import torch

import models
import train_data
from lib_lora.apply.layers import layer_mapping
from lib_lora.apply.loader import load_network
from lib_lora.apply.patcher import Patcher
from lib_lora.formats.safetensors_io import load_tensors
from lib_lora.host.base import ModelHost
from lib_lora.train.config import TrainConfigError, parse_train_config
from lib_lora.train.run import plan_for
from lib_lora.train.trainer import Trainer, TrainingError

FC1 = "lora_te_text_model_encoder_layers_0_mlp_fc1"


def _run(model, tmp_path, img, sample_fn=None, **kw):
    cfg = parse_train_config(train_data.job_config(img, tmp_path / "out", **{"max_train_steps": 3, **kw}),
                             base_dir=str(tmp_path))
    host = ModelHost(model, "m")
    res = Trainer(host, cfg, plan_for(host, cfg), sample_fn=sample_fn).run()
    assert res.status == "done"
    return res, load_tensors(res.final)


@pytest.fixture(scope="module")
def base_file(tmp_path_factory):
    """A LoRA with weights well away from its init (as a finished character LoRA would be)."""
    tmp = tmp_path_factory.mktemp("base")
    img, _ = train_data.make_dataset(str(tmp / "d"), n_concept=2, repeats=2)
    res, _ = _run(models.make_sd1(seed=11), tmp, img, learning_rate=3e-2, text_encoder_lr=3e-2, max_train_steps=4,
                  output_name="base")
    return res.final


@pytest.fixture()
def img(tmp_path):
    return train_data.make_dataset(str(tmp_path / "d"), n_concept=2, repeats=2)[0]


def test_base_weights_train_on_the_merged_model_and_give_it_back(tmp_path, img, base_file):
    model = models.make_sd1(seed=5)
    before = models.model_state_hash(model)
    fc1 = model.cond_stage_model.transformer.text_model.encoder.layers[0].mlp.fc1
    w0 = fc1.weight.detach().clone()
    inside = []

    def sample_fn(epoch, step, should_cancel=None):
        inside.append(fc1.weight.detach().clone())
        return []

    res, got = _run(model, tmp_path / "a", img, sample_fn, base_weights=[base_file], base_weights_multiplier=[0.7],
                    sample_every_n_epochs=1)
    assert models.model_state_hash(model) == before
    # closed form on one layer: W + m * (alpha / rank) * up @ down
    f = load_tensors(base_file)
    up, down, alpha = f[f"{FC1}.lora_up.weight"], f[f"{FC1}.lora_down.weight"], float(f[f"{FC1}.alpha"])
    want = w0 + 0.7 * (alpha / down.shape[0]) * (up @ down)
    torch.testing.assert_close(inside[0], want, rtol=1e-5, atol=1e-6)
    assert any(n.startswith("base_weights merged into the model for this job") and "x0.7" in n for n in res.notes)
    assert not any("not supported" in n for n in res.notes)

    # the same as training on a model that had the file merged beforehand
    ref_model = models.make_sd1(seed=5)
    mp = layer_mapping(ref_model)
    Patcher().apply(mp, [(load_network(base_file, "sd1", cache=None, layer_names=set(mp)), 0.7, 0.7)])
    _, want_sd = _run(ref_model, tmp_path / "b", img)
    assert got.keys() == want_sd.keys()
    assert all(torch.equal(got[k], want_sd[k]) for k in got)
    _, plain = _run(models.make_sd1(seed=5), tmp_path / "c", img)
    assert not all(torch.equal(got[k], plain[k]) for k in got)


def test_a_missing_multiplier_is_1_and_extra_ones_are_named(tmp_path, img, base_file):
    _, one = _run(models.make_sd1(seed=5), tmp_path / "a", img, base_weights=base_file)  # (a string: one path)
    res, explicit = _run(models.make_sd1(seed=5), tmp_path / "b", img, base_weights=[base_file],
                         base_weights_multiplier=[1.0, 0.5])
    assert all(torch.equal(one[k], explicit[k]) for k in one)
    assert any("base_weights_multiplier has 2 values for 1 file(s)" in n for n in res.notes)


def test_base_weights_that_do_not_fit_stop_before_training_and_leave_the_model(tmp_path, img, base_file):
    model = models.make_sd2(seed=5)
    before = models.model_state_hash(model)
    with pytest.raises(TrainingError, match=r"base_weights .*base\.safetensors: .*this LoRA is for SD1"):
        _run(model, tmp_path / "a", img, base_weights=[base_file])
    assert models.model_state_hash(model) == before
    with pytest.raises(TrainingError, match="base_weights .*nothing.safetensors: LoRA file not found"):
        _run(models.make_sd1(seed=5), tmp_path / "b", img, base_weights=[str(tmp_path / "nothing.safetensors")])


def test_base_weights_with_fp8_base_and_a_failing_job_restore_exactly(tmp_path, img, base_file, monkeypatch):
    model = models.make_sd1(seed=5)
    before = models.model_state_hash(model)
    _run(model, tmp_path / "a", img, base_weights=[base_file], fp8_base=True, mixed_precision="bf16")
    assert models.model_state_hash(model) == before

    def boom(self, *a, **k):
        raise RuntimeError("disk full")
    monkeypatch.setattr(Trainer, "_cache_latents", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        _run(model, tmp_path / "b", img, base_weights=[base_file], fp8_base=True, mixed_precision="bf16")
    assert models.model_state_hash(model) == before


def test_base_weights_config_values():
    from lib_lora.train.support import check_support
    assert check_support(parse_train_config({"train_data_dir": "x", "base_weights": "a.safetensors",
                                             "base_weights_multiplier": 0.5})) == ([], [])
    cfg = parse_train_config({"train_data_dir": "x", "base_weights": "C:/my loras/a b.safetensors",
                              "base_weights_multiplier": "0.5"})
    assert cfg.base_weights == ["C:/my loras/a b.safetensors"] and cfg.base_weights_multiplier == [0.5]
    cfg = parse_train_config({"train_data_dir": "x", "base_weights": ["a.safetensors", "b.safetensors"],
                              "base_weights_multiplier": [1, 0.25]})
    assert cfg.base_weights_multiplier == [1.0, 0.25]
    with pytest.raises(TrainConfigError, match="base_weights_multiplier must be a number or a list of numbers"):
        parse_train_config({"train_data_dir": "x", "base_weights": "a", "base_weights_multiplier": ["x"]})
    with pytest.raises(TrainConfigError, match="base_weights must be a file path or a list of paths"):
        parse_train_config({"train_data_dir": "x", "base_weights": 3})
