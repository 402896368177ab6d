"""Text-encoder key mapping checked against real towers and diffusers' checkpoint converters.

- SD1 / SDXL TE1: a tiny transformers CLIPTextModel; the ldm checkpoint -> HF names come from diffusers'
  `convert_ldm_clip_checkpoint`. A1111 names the layers `transformer_…` (SD1) / `0_transformer_…` (SDXL).
- SD2 / SDXL TE2: a tiny open_clip text tower (registered config, test-environment.md §3.4); diffusers'
  `convert_open_clip_checkpoint` gives the HF names every LoRA writer uses, including which row block of
  `attn.in_proj_weight` each q/k/v projection is. A1111 names them `model_…` (SD2) / `1_model_…` (SDXL).
Every Linear / LayerNorm / MultiheadAttention (all three of q, k, v) / Embedding the tower has must be reached.
"""
from types import SimpleNamespace

import pytest
from torch import nn

from lib_lora.formats import map_module_key, map_module_key_with_reason, split_key

WIDTH = 64
OPEN_CLIP_TINY = "lora-studio-formats-tiny-text"


class Tag:
    """Stands for a checkpoint tensor: remembers its key and the row slice the converter takes of it."""

    def __init__(self, key, rows=None):
        self.key, self.rows = key, rows

    def __getitem__(self, idx):
        rows = idx[0] if isinstance(idx, tuple) else idx
        return Tag(self.key, (rows.start or 0, rows.stop))

    def clone(self):
        return self

    def detach(self):
        return self


@pytest.fixture(scope="module")
def clip_text():
    from transformers import CLIPTextConfig, CLIPTextModel
    return CLIPTextModel(CLIPTextConfig(hidden_size=WIDTH, intermediate_size=2 * WIDTH, num_hidden_layers=2,
                                        num_attention_heads=4))


@pytest.fixture(scope="module")
def open_clip_text():
    import open_clip
    from open_clip import factory
    factory._MODEL_CONFIGS[OPEN_CLIP_TINY] = dict(
        embed_dim=WIDTH, text_cfg=dict(context_length=77, vocab_size=49408, width=WIDTH, heads=4, layers=2),
        vision_cfg=dict(image_size=32, layers=1, width=64, head_width=32, patch_size=16))
    model = open_clip.create_model(OPEN_CLIP_TINY, pretrained=None)
    del model.visual  # as ldm's FrozenOpenCLIPEmbedder does
    return model


def _us(n):
    return n.replace(".", "_")


PATCHED = (nn.Linear, nn.LayerNorm, nn.MultiheadAttention, nn.Embedding)


def test_clip_te_sd1_and_sdxl_te1(clip_text):
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint
    ckpt = {"cond_stage_model.transformer." + k: "cond_stage_model.transformer." + k for k in clip_text.state_dict()}
    hf_to_ldm = convert_ldm_clip_checkpoint(ckpt)
    modules = {n for n, m in clip_text.named_modules() if isinstance(m, PATCHED)}
    reached = {"sd1": set(), "sdxl": set()}
    for hf_key, ldm_key in hf_to_ldm.items():
        if not hf_key.endswith(".weight"):
            continue
        hf_mod = hf_key[: -len(".weight")]
        a1 = _us(ldm_key[len("cond_stage_model."): -len(".weight")])  # what A1111 calls the layer (SD1)
        cases = {"sd1": [("lora_te_" + _us(hf_mod), a1), ("lora_te1_" + _us(hf_mod), a1),
                         ("text_encoder." + hf_mod, a1), ("text_encoders.clip_l.transformer." + hf_mod, a1)],
                 "sdxl": [("lora_te1_" + _us(hf_mod), "0_" + a1), ("lora_te_" + _us(hf_mod), "0_" + a1),
                          ("text_encoder." + hf_mod, "0_" + a1),
                          ("text_encoders.clip_l.transformer." + hf_mod, "0_" + a1)]}
        for fam, items in cases.items():
            for mk, want in items:
                t, why = map_module_key_with_reason(mk, fam)
                assert t is not None and (t.name, t.part, t.component) == (want, None, "te1"), (mk, fam, t, why)
            reached[fam].add(hf_mod)
    assert reached["sd1"] == reached["sdxl"] == modules


@pytest.mark.parametrize("family, prefixes, a1_prefix, component", [
    ("sd2", ("lora_te_", "text_encoder.", "text_encoders.clip_h.transformer."), "model_", "te1"),
    ("sdxl", ("lora_te2_", "text_encoder_2.", "text_encoders.clip_g.transformer."), "1_model_", "te2"),
])
def test_open_clip_te(open_clip_text, family, prefixes, a1_prefix, component):
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    prefix = "cond_stage_model.model."
    ckpt = {prefix + k: Tag(prefix + k) for k in open_clip_text.state_dict() if k != "text_projection"}
    text_model = SimpleNamespace(config=SimpleNamespace(hidden_size=WIDTH))
    hf = convert_open_clip_checkpoint(text_model, ckpt, prefix=prefix)
    parts = {0: "q", WIDTH: "k", 2 * WIDTH: "v"}
    reached = set()
    for hf_key, tag in hf.items():
        if not hf_key.endswith(".weight"):
            continue
        hf_mod = hf_key[: -len(".weight")]
        src = tag.key[len(prefix):]
        if src.endswith(".in_proj_weight"):
            want = (a1_prefix + _us(src[: -len(".in_proj_weight")]), parts[tag.rows[0]])
        elif src.endswith(".weight"):
            want = (a1_prefix + _us(src[: -len(".weight")]), None)
        else:
            want = None  # a bare parameter (positional_embedding): not a layer A1111 patches
        for p in prefixes:
            mk = p + (_us(hf_mod) if p.startswith("lora_") else hf_mod)
            t, why = map_module_key_with_reason(mk, family)
            if want is None:
                assert t is None and why, (mk, t)
                continue
            assert t is not None and (t.name, t.part, t.component) == (*want, component), (mk, t, why)
            reached.add((t.name, t.part))
    modules = set()
    for n, m in open_clip_text.named_modules():
        if isinstance(m, nn.MultiheadAttention):
            modules |= {(a1_prefix + _us(n), p) for p in "qkv"}
        elif isinstance(m, PATCHED):
            modules.add((a1_prefix + _us(n), None))
    assert reached == modules


def test_layer_ranges_and_reasons():
    assert map_module_key("lora_te_text_model_encoder_layers_11_mlp_fc1", "sd1") is not None
    t, why = map_module_key_with_reason("lora_te_text_model_encoder_layers_12_mlp_fc1", "sd1")
    assert t is None and "layer 12 does not exist in SD1.5" in why
    assert map_module_key("lora_te_text_model_encoder_layers_22_mlp_fc1", "sd2").name == \
        "model_transformer_resblocks_22_mlp_c_fc"
    assert map_module_key("lora_te2_text_model_encoder_layers_31_mlp_fc2", "sdxl").name == \
        "1_model_transformer_resblocks_31_mlp_c_proj"
    t, why = map_module_key_with_reason("lora_te2_text_model_encoder_layers_0_mlp_fc1", "sd1")
    assert t is None and "SD1.5 does not have" in why
    t, why = map_module_key_with_reason("lora_te1_text_model_encoder_layers_0_mlp_fc1", "sd2")
    assert t is None and "SD2.x does not have" in why
    t, why = map_module_key_with_reason("lora_te2_text_projection", "sdxl")
    assert t is None and "projection" in why
    t, why = map_module_key_with_reason("lora_te3_text_model_encoder_layers_0_mlp_fc1", "sdxl")
    assert t is None and "SD3" in why


def test_open_clip_attention_parts_and_norms():
    """§4.4 spelled out: q/k/v -> MHA rows, out_proj, mlp fc1/fc2 -> c_fc/c_proj, layer_norm1/2 -> ln_1/2,
    final_layer_norm -> ln_final."""
    cases = {
        "lora_te_text_model_encoder_layers_3_self_attn_k_proj": ("model_transformer_resblocks_3_attn", "k"),
        "lora_te_text_model_encoder_layers_3_self_attn_out_proj": ("model_transformer_resblocks_3_attn_out_proj",
                                                                   None),
        "lora_te_text_model_encoder_layers_3_layer_norm1": ("model_transformer_resblocks_3_ln_1", None),
        "lora_te_text_model_encoder_layers_3_layer_norm2": ("model_transformer_resblocks_3_ln_2", None),
        "lora_te_text_model_final_layer_norm": ("model_ln_final", None),
        "text_encoder.text_model.encoder.layers.3.self_attn.to_v": ("model_transformer_resblocks_3_attn", "v"),
    }
    for mk, want in cases.items():
        t = map_module_key(mk, "sd2")
        assert (t.name, t.part) == want, mk
    t = map_module_key("lora_te2_text_model_final_layer_norm", "sdxl")
    assert (t.name, t.component) == ("1_model_ln_final", "te2")
    # old diffusers TE processor form: self_attn.to_q_lora.down.weight
    mk, s = split_key("text_encoder.text_model.encoder.layers.0.self_attn.to_q_lora.down.weight")
    assert s == "_lora.down.weight"
    assert map_module_key(mk, "sd1").name == "transformer_text_model_encoder_layers_0_self_attn_q_proj"
    mk, s = split_key("text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.up.weight")
    assert s == "lora_linear_layer.up.weight"
    assert map_module_key(mk, "sdxl").name == "0_transformer_text_model_encoder_layers_0_self_attn_q_proj"
