"""split_key / group_modules on every key form of lora-formats.md §2 and §4 (expected values written by hand)."""
import pytest

from lib_lora.formats import SUFFIXES, group_modules, split_key

K = "lora_unet_down_blocks_0_attentions_0_proj_in"
D = "unet.down_blocks.0.attentions.0.proj_in"

CASES = [
    # kohya / LyCORIS: module key has no dots
    (f"{K}.lora_up.weight", K, "lora_up.weight"),
    (f"{K}.lora_down.weight", K, "lora_down.weight"),
    (f"{K}.lora_mid.weight", K, "lora_mid.weight"),
    (f"{K}.alpha", K, "alpha"),
    (f"{K}.scale", K, "scale"),
    (f"{K}.dora_scale", K, "dora_scale"),
    (f"{K}.hada_w1_a", K, "hada_w1_a"), (f"{K}.hada_w2_b", K, "hada_w2_b"), (f"{K}.hada_t1", K, "hada_t1"),
    (f"{K}.lokr_w1", K, "lokr_w1"), (f"{K}.lokr_w1_a", K, "lokr_w1_a"), (f"{K}.lokr_w2_b", K, "lokr_w2_b"),
    (f"{K}.lokr_t2", K, "lokr_t2"),
    (f"{K}.oft_blocks", K, "oft_blocks"), (f"{K}.oft_diag", K, "oft_diag"), (f"{K}.rescale", K, "rescale"),
    (f"{K}.a1.weight", K, "a1.weight"), (f"{K}.a2.weight", K, "a2.weight"), (f"{K}.b1.weight", K, "b1.weight"),
    (f"{K}.b2.weight", K, "b2.weight"), (f"{K}.bm.weight", K, "bm.weight"),
    (f"{K}.diff", K, "diff"), (f"{K}.diff_b", K, "diff_b"),
    (f"{K}.w_norm", K, "w_norm"), (f"{K}.b_norm", K, "b_norm"),
    (f"{K}.weight", K, "weight"), (f"{K}.on_input", K, "on_input"),
    ("oft_unet_input_blocks_4_1_proj_in.oft_blocks", "oft_unet_input_blocks_4_1_proj_in", "oft_blocks"),
    ("lycoris_down_blocks_1_attentions_0_proj_in.lokr_w1", "lycoris_down_blocks_1_attentions_0_proj_in", "lokr_w1"),
    # PEFT / diffusers: module key has dots
    (f"{D}.lora_A.weight", D, "lora_A.weight"), (f"{D}.lora_B.weight", D, "lora_B.weight"),
    (f"{D}.lora_B.bias", D, "lora_B.bias"),
    (f"{D}.lora_A.default.weight", D, "lora_A.default.weight"),
    (f"{D}.lora_B.default.weight", D, "lora_B.default.weight"),
    (f"{D}.lora_A.my_adapter.weight", D, "lora_A.default.weight"),
    (f"{D}.lora_A", D, "lora_A"), (f"{D}.lora_B", D, "lora_B"),
    (f"{D}.lora_magnitude_vector", D, "lora_magnitude_vector"),
    (f"{D}.lora_magnitude_vector.weight", D, "lora_magnitude_vector.weight"),
    (f"{D}.lora.up.weight", D, "lora.up.weight"), (f"{D}.lora.down.weight", D, "lora.down.weight"),
    (f"{D}.alpha", D, "alpha"),
    ("text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_linear_layer.down.weight",
     "text_encoder.text_model.encoder.layers.0.mlp.fc1", "lora_linear_layer.down.weight"),
    ("unet.mid_block.attentions.0.transformer_blocks.0.attn2.processor.to_v_lora.up.weight",
     "unet.mid_block.attentions.0.transformer_blocks.0.attn2.processor.to_v", "_lora.up.weight"),
    ("text_encoder.text_model.encoder.layers.1.self_attn.to_out_lora.down.weight",
     "text_encoder.text_model.encoder.layers.1.self_attn.to_out", "_lora.down.weight"),
    # ComfyUI generic
    ("diffusion_model.input_blocks.1.1.proj_in.lora_up.weight", "diffusion_model.input_blocks.1.1.proj_in",
     "lora_up.weight"),
    ("diffusion_model.input_blocks.1.1.proj_in.diff", "diffusion_model.input_blocks.1.1.proj_in", "diff"),
    # unknown suffixes: kohya keys split at the first dot (as A1111), dotted keys at the last
    (f"{K}.mystery.thing", K, "mystery.thing"),
    (f"{D}.mystery", D, "mystery"),
    ("nodots", "nodots", ""),
]


@pytest.mark.parametrize("key, module, suffix", CASES)
def test_split_key(key, module, suffix):
    assert split_key(key) == (module, suffix)


def test_every_listed_suffix_splits():
    for s in SUFFIXES:
        assert split_key(f"{D}.{s}") == (D, s)
        assert split_key(f"{K}.{s}") == (K, s)


def test_group_modules():
    keys = [f"{K}.lora_up.weight", f"{K}.lora_down.weight", f"{K}.alpha", f"{D}.lora_A.weight", f"{D}.lora_B.weight"]
    g = group_modules(keys)
    assert g == {K: {"lora_up.weight": keys[0], "lora_down.weight": keys[1], "alpha": keys[2]},
                 D: {"lora_A.weight": keys[3], "lora_B.weight": keys[4]}}
