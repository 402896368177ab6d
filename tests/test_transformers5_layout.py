"""transformers 5 builds ``CLIPTextModel`` without its ``text_model`` level (``transformer.encoder.layers...``), while
every LoRA file, every checkpoint and the WebUI's layer names keep the 4.x layout (``transformer.text_model...``).
A1111 v1.10.1 pins 4.30.2, but rented-GPU images and newer hosts ship 5.x (the GPU machine of this project does):
training there must still write kohya's key names, <lora:> must still find the layers, and the headless loader must
still load SD1 checkpoints. The 5.x layout is made here from a 4.30 model by lifting ``text_model`` one level up,
which is exactly the module tree 5.x builds."""

import torch

import models
from lib_lora.apply.layers import layer_mapping
from lib_lora.apply.loader import load_network
from lib_lora.formats.safetensors_io import save_file_atomic
from lib_lora.host.headless import LoadReport, _load_weights
from lib_lora.train.conditioning import TextEncoder
from lib_lora.train.lora_net import LoRANetwork
from lib_lora.train.targets import text_encoder_targets


def _v5(model):
    cond = model.cond_stage_model
    cond.transformer = cond.transformer.text_model
    return model


def test_text_encoder_lora_names_do_not_depend_on_the_transformers_layout(tmp_path):
    old, new = models.make_sd1(seed=2), _v5(models.make_sd1(seed=2))
    assert not any(".text_model." in n for n, _ in new.cond_stage_model.named_modules(prefix="x"))
    names_old = [t.kohya_name for t in text_encoder_targets(old, "sd1")]
    names_new = [t.kohya_name for t in text_encoder_targets(new, "sd1")]
    assert names_new == names_old and names_old[0].startswith("lora_te_text_model_encoder_layers_0_")
    # a file trained on either applies to the other, every module matched
    net = LoRANetwork(new, "sd1", dim=4, alpha=2)
    path = str(tmp_path / "v5.safetensors")
    save_file_atomic({k: v.contiguous() for k, v in net.kohya_state_dict(torch.float16).items()}, path)
    for model in (old, new):
        rep = load_network(path, "sd1", cache=None, layer_names=set(layer_mapping(model))).report
        assert len(rep.matched) == rep.total_modules, rep.summary()
        assert sum(1 for m in rep.matched if "te" in m or "text" in m) > 0


def test_text_encoder_output_is_the_same_in_both_layouts():
    old, new = models.make_sd1(seed=2), _v5(models.make_sd1(seed=2))
    for skip in (1, 2):
        a, b = TextEncoder(old, "sd1", clip_skip=skip), TextEncoder(new, "sd1", clip_skip=skip)
        toks, _ = a.tokenize(["a photo of svs cat"])
        torch.testing.assert_close(b.encode(toks, "cpu")["crossattn"], a.encode(toks, "cpu")["crossattn"])


def test_headless_loader_puts_4x_checkpoint_keys_into_a_5x_model():
    src = models.make_sd1(seed=5)
    sd = src.state_dict()
    assert any(".transformer.text_model." in k for k in sd)
    dst = _v5(models.make_sd1(seed=6))
    report = LoadReport(path="x.safetensors", family="sd1", parameterization="eps", config_source="test")
    _load_weights(dst, sd, report)
    assert report.missing == [] and report.unexpected == []
    for (ka, va), (kb, vb) in zip(src.cond_stage_model.state_dict().items(),
                                  dst.cond_stage_model.state_dict().items()):
        assert torch.equal(va, vb), (ka, kb)
