"""apply/checkpoint.py: a checkpoint state dict seen as a model. Its layer names and types must equal those of
the real model built from the same config, and its parameters must BE the checkpoint tensors (no copies)."""
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import models
from lib_lora.apply.checkpoint import CheckpointModel, detect_checkpoint_family
from lib_lora.apply.layers import layer_mapping, model_family
from lib_lora.formats.errors import UnsupportedFamilyError
from lib_lora.formats.safetensors_io import read_header
from test_cli_merge import checkpoint_state

LAYER_TYPES = (nn.Linear, nn.Conv2d, nn.LayerNorm, nn.GroupNorm, nn.MultiheadAttention, nn.Embedding)


def _layers(mapping):
    """name -> the layer class family, for every module that holds weights directly."""
    out = {}
    for name, mod in mapping.items():
        if not any(True for _ in mod.parameters(recurse=False)):
            continue
        kind = next((t for t in LAYER_TYPES if isinstance(mod, t)), None)
        if kind is not None:
            out[name] = kind
    return out


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_names_and_types_match_the_real_model(family, tmp_path):
    make = {"sd1": models.make_sd1, "sd2": models.make_sd2, "sdxl": models.make_sdxl}[family]
    model = make(seed=0)
    sd = checkpoint_state(model, family)
    ck = CheckpointModel.from_state_dict(sd)
    assert ck.family == family == model_family(ck)

    real, mine = _layers(layer_mapping(model)), _layers(layer_mapping(ck))
    assert real == mine  # same names, same layer types (the shells cover every weight-holding layer)

    # the tree's tensors are the state dict's tensors
    for key, (mod, attr) in ck.slots.items():
        assert getattr(mod, attr).data_ptr() == sd[key].data_ptr(), key
    assert all(k in sd for k in ck.slots)
    counts = ck.component_counts()
    assert counts["unet"] > 0 and counts["te1"] > 0 and (family != "sdxl" or counts["te2"] > 0)

    # header-only (meta) tree: same names, no data
    path = tmp_path / "ck.safetensors"
    save_file(sd, str(path))
    meta = CheckpointModel.from_header(read_header(path))
    assert _layers(layer_mapping(meta)) == real
    assert all(getattr(m, a).is_meta for m, a in meta.slots.values())


def test_family_detection_and_refusals():
    unet_k = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    assert detect_checkpoint_family({unet_k: (320, 768)}) == "sd1"
    assert detect_checkpoint_family({unet_k: (320, 1024)}) == "sd2"
    assert detect_checkpoint_family({unet_k: (320, 2048)}) == "sdxl"
    with pytest.raises(UnsupportedFamilyError, match="not an SD1.x/SD2.x/SDXL.*Flux"):
        detect_checkpoint_family({"double_blocks.0.img_attn.qkv.weight": (9216, 3072)})
    with pytest.raises(UnsupportedFamilyError, match="refiner"):
        detect_checkpoint_family({unet_k: (384, 1280),
                                  "conditioner.embedders.0.model.transformer.resblocks.0.attn.in_proj_weight":
                                      (3840, 1280)})


def test_old_sd1_text_encoder_layout_gets_a1111_names():
    """Early SD1 checkpoints lack the `text_model.` level; A1111 renames them on load, so names must match."""
    sd = {
        "model.diffusion_model.input_blocks.1.1.proj_in.weight": torch.zeros(4, 4, 1, 1),
        "cond_stage_model.transformer.encoder.layers.0.self_attn.q_proj.weight": torch.zeros(8, 8),
        "cond_stage_model.transformer.encoder.layers.0.self_attn.q_proj.bias": torch.zeros(8),
        "cond_stage_model.transformer.final_layer_norm.weight": torch.ones(8),
        "cond_stage_model.transformer.final_layer_norm.bias": torch.zeros(8),
    }
    ck = CheckpointModel.from_state_dict(sd)
    names = layer_mapping(ck)
    assert ck.family == "sd1"
    assert isinstance(names["transformer_text_model_encoder_layers_0_self_attn_q_proj"], nn.Linear)
    assert isinstance(names["transformer_text_model_final_layer_norm"], nn.LayerNorm)
    assert isinstance(names["diffusion_model_input_blocks_1_1_proj_in"], nn.Conv2d)
    # the file keys stay as they were: a merge writes back under the original names
    assert "cond_stage_model.transformer.encoder.layers.0.self_attn.q_proj.weight" in ck.slots
