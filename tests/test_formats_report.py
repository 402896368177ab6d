"""MatchReport: counts per component, unmatched keys with reasons, family mismatch wording."""
from lib_lora.formats import MatchReport, detect_family, group_modules
from lib_lora.formats.report import not_a_lora

SD1_KEYS = [
    "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight",
    "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight",
    "lora_unet_mid_block_attentions_0_proj_out.lora_down.weight",
    "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight",
]
SDXL_KEYS = [f"lora_unet_input_blocks_7_1_transformer_blocks_{i}_attn1_to_q.lora_down.weight" for i in range(10)] + [
    f"lora_unet_output_blocks_{i}_1_proj_in.lora_down.weight" for i in range(3)] + [
    "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight",
    "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"]


def test_full_match_summary():
    rep = MatchReport.build("/loras/style.safetensors", group_modules(SD1_KEYS), "sd1")
    assert rep.summary() == "lora 'style': 3/3 modules matched (unet 2, te 1)"
    assert rep.ok and rep.warning() is None and rep.family_mismatch is None
    assert rep.targets["lora_te_text_model_encoder_layers_0_mlp_fc1"].name == \
        "transformer_text_model_encoder_layers_0_mlp_fc1"


def test_sdxl_components_and_mismatch_on_sd1():
    shapes = {k: (4, 2048 if "attn2" in k else 1280) for k in SDXL_KEYS}
    info = detect_family(shapes, {})
    assert info.family == "sdxl"
    ok = MatchReport.build("x.safetensors", group_modules(SDXL_KEYS), "sdxl", info)
    assert ok.summary() == "lora 'x': 15/15 modules matched (unet 13, te1 1, te2 1)"
    rep = MatchReport.build("x.safetensors", group_modules(SDXL_KEYS), "sd1", info)
    s = rep.summary()
    assert "this LoRA is for SDXL, the loaded model is SD1.5" in s
    assert rep.family_mismatch == "this LoRA is for SDXL, the loaded model is SD1.5"
    assert not rep.ok and "no effect" not in (rep.warning() or "")  # TE1 still matches CLIP-L
    assert rep.unmatched["lora_unet_input_blocks_7_1_transformer_blocks_9_attn1_to_q"].endswith("SDXL-only block")
    d = rep.details(limit=5)
    lines = d.splitlines()
    assert lines[0] == s
    assert "evidence:" in lines[1]
    # input_blocks_7_1 transformer block 0 and the CLIP-L layer exist in SD1 too
    assert "  unet: 1/13 matched" in lines and "  te1: 1/1 matched" in lines and "  te2: 0/1 matched" in lines
    assert f"  not matched ({len(rep.unmatched)}):" in lines
    listed = [ln for ln in lines if ln.startswith("    lora_")]
    assert len(listed) == 5 and lines[-1] == f"    ... and {len(rep.unmatched) - 5} more"


def test_zero_matches_warns_no_effect():
    rep = MatchReport.build("flux.safetensors", ["lora_unet_double_blocks_0_img_attn_qkv"], "sdxl")
    assert rep.warning().endswith("the LoRA has no effect")
    assert "Flux" in rep.unmatched["lora_unet_double_blocks_0_img_attn_qkv"]


def test_refused_summary():
    info = detect_family({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": (4, 3072)}, {})
    rep = MatchReport.build("flux.safetensors", ["lora_unet_double_blocks_0_img_attn_qkv"], "sdxl", info)
    assert "Flux LoRA" in rep.summary() and rep.warning() == rep.summary()


def test_available_layers_checked():
    mods = group_modules(SD1_KEYS)
    avail = {"diffusion_model_input_blocks_1_1_proj_in", "transformer_text_model_encoder_layers_0_mlp_fc1"}
    rep = MatchReport.build("a.safetensors", mods, "sd1", available=avail)
    assert len(rep.matched) == 2
    assert rep.unmatched == {"lora_unet_mid_block_attentions_0_proj_out":
                             "the loaded model has no layer 'diffusion_model_middle_block_1_proj_out'"}
    assert rep.summary() == "lora 'a': 2/3 modules matched (unet 1, te 1), 1 not matched"


def test_te_only_file_does_not_mention_unet():
    rep = MatchReport.build("te.safetensors", ["lora_te_text_model_encoder_layers_0_mlp_fc1"], "sd2")
    assert rep.summary() == "lora 'te': 1/1 modules matched (te 1)"
    assert "unet" not in rep.details()


def test_not_a_lora_tells_model_files_from_networks():
    conv = (320, 320, 3, 3)
    unet = {f"model.diffusion_model.input_blocks.{i}.0.{p}": (conv if p == "weight" else (320,))
            for i in range(1, 4) for p in ("weight", "bias")}
    assert not_a_lora(unet).startswith("it holds plain model weights (3 layers such as ")
    diffusers_unet = {f"down_blocks.0.resnets.{i}.conv1.weight": conv for i in range(2)}
    assert not_a_lora(diffusers_unet).startswith("it holds plain model weights")
    # networks with the same roots or plain suffixes stay networks
    assert not_a_lora({f"model.diffusion_model.input_blocks.{i}.0.diff": conv for i in range(3)}) is None
    ia3 = {f"lora_unet_down_blocks_0_attentions_0_proj_in.{s}": (320,) for s in ("weight", "on_input")}
    assert not_a_lora(ia3) is None and not_a_lora({k: (320,) for k in SD1_KEYS}) is None
    assert not_a_lora({"lora_unet_a.weight": (320,), "lora_unet_b.weight": (320,)}) is None  # IA3 without on_input
    # unrelated tensors are said to be no SD LoRA; a LoRA of another model is left to the family refusal
    assert not_a_lora({"foo.bar": (3,)}) == ("its only tensor name (foo.bar) is not a LoRA layer of "
                                             "SD1.x/SD2.x/SDXL: it is not a LoRA, or one for a model this "
                                             "extension cannot apply")
    flux = {"single_transformer_blocks.0.attn.to_q.lora_A.weight": (4, 3072)}
    assert not_a_lora(flux, {"ss_base_model_version": "flux1"}) is None
    assert detect_family(flux, {"ss_base_model_version": "flux1"}).refused
    assert not_a_lora({"transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": (4, 3072)}) is None
    assert not_a_lora({}) == "it holds no tensors"
