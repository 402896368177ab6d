"""Checks of the tiny test models (tests/models.py, tests/sgm_like.py) against independent oracles:
real ldm configs built on the meta device (SD1/SD2), skeletons and outputs dumped from the real sgm code
(tests/data/sdxl_*.json, SDXL), diffusers' own checkpoint converter and UNet, and open_clip's tokenizer."""
import json
import os

import pytest
import torch

import models
import sgm_like
from lib_lora.host.tiny import clip_l_text_config, skip_default_init

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
PROMPTS = ["a photo of a cat", "<lora:x:0.5> (masterpiece:1.2), BREAK\tMiXeD é 🙂 123", ""]


def _json(name):
    with open(os.path.join(DATA, name), encoding="utf-8") as f:
        return json.load(f)


def _shapes(module_or_sd, prefix=""):
    sd = module_or_sd.state_dict() if isinstance(module_or_sd, torch.nn.Module) else module_or_sd
    return {k[len(prefix):]: list(v.shape) for k, v in sd.items() if k.startswith(prefix)}


def _assert_same_keys(mine: dict, ref: dict, what: str):
    missing = sorted(set(ref) - set(mine))
    extra = sorted(set(mine) - set(ref))
    assert not missing and not extra, f"{what}: missing {missing[:10]} ({len(missing)}), extra {extra[:10]} ({len(extra)})"


def _assert_subset_same_shapes(mine: dict, ref: dict, what: str):
    extra = sorted(set(mine) - set(ref))
    assert not extra, f"{what}: keys not in the real model: {extra[:10]} ({len(extra)})"
    bad = {k: (mine[k], ref[k]) for k in mine if mine[k] != ref[k]}
    assert not bad, f"{what}: shapes differ from the real model: {dict(list(bad.items())[:10])}"


def _assert_well_formed(model):
    zero = [n for n, p in model.named_parameters() if p.numel() and not p.detach().abs().sum() > 0]
    assert not zero, f"all-zero parameters: {zero[:10]}"
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert not trainable, f"parameters with requires_grad: {trainable[:10]}"
    training = [n for n, m in model.named_modules() if m.training]
    assert not training, f"modules in train mode: {training[:10]}"
    nonfinite = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    assert not nonfinite, nonfinite[:10]


@pytest.fixture(scope="module")
def sd1():
    return models.make_sd1()


@pytest.fixture(scope="module")
def sd2():
    return models.make_sd2()


@pytest.fixture(scope="module")
def sdxl():
    return models.make_sdxl()


# ------------------------------------------------------------------------------------------------ tokenizer

def test_tokenizer_matches_open_clip_bpe():
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizerFast
    tok = models.make_tokenizer()
    assert tok is models.make_tokenizer(), "make_tokenizer() is cached"
    assert len(tok) == 49408 and tok.bos_token_id == 49406 and tok.eos_token_id == 49407
    assert tok.pad_token_id == 49407 and tok.model_max_length == 77
    ref = SimpleTokenizer()
    fast = CLIPTokenizerFast.from_pretrained(models.tokenizer_dir())
    for p in PROMPTS:
        want = [49406] + ref.encode(p) + [49407]
        assert tok(p)["input_ids"] == want, p
        assert fast(p)["input_ids"] == want, p
    padded = tok(["a cat"], padding="max_length", max_length=77, truncation=True)["input_ids"][0]
    assert len(padded) == 77 and padded[-1] == 49407


# ------------------------------------------------------------------------------------------------ SD1 / SD2

def _ldm_unet_on_meta(**params):
    from ldm.modules.diffusionmodules.openaimodel import UNetModel
    base = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, attention_resolutions=[4, 2, 1],
                num_res_blocks=2, channel_mult=[1, 2, 4, 4], use_spatial_transformer=True, transformer_depth=1,
                use_checkpoint=False, legacy=False)
    with torch.device("meta"):
        return UNetModel(**dict(base, **params))


def _real_clip_l_on_meta():
    from transformers import CLIPTextModel
    with torch.device("meta"), skip_default_init():
        return CLIPTextModel(clip_l_text_config(12))


def _real_open_clip_text_on_meta(arch):
    import open_clip
    from open_clip.model import CLIP
    cfg = open_clip.get_model_config(arch)
    tiny_vision = {"image_size": 32, "layers": 1, "width": 64, "head_width": 32, "patch_size": 16}
    with torch.device("meta"), skip_default_init():
        m = CLIP(embed_dim=cfg["embed_dim"], vision_cfg=tiny_vision, text_cfg=cfg["text_cfg"])
    del m.visual  # the embedders delete the vision tower too
    return m


def test_sd1_module_tree_matches_sd15(sd1):
    from ldm.models.diffusion.ddpm import LatentDiffusion
    assert isinstance(sd1, LatentDiffusion)
    # Names equal to the SD1.5 (v1-inference.yaml) UNet; shapes are the tiny ones.
    real = _ldm_unet_on_meta(num_heads=8, context_dim=768)
    _assert_same_keys(_shapes(sd1.model.diffusion_model), _shapes(real), "SD1 UNet vs SD1.5 config")
    assert len(real.state_dict()) == 686
    unet = sd1.model.diffusion_model
    assert len(unet.input_blocks) == 12 and len(unet.output_blocks) == 12
    assert isinstance(unet.input_blocks[1][1].proj_in, torch.nn.Conv2d)
    assert unet.input_blocks[1][1].transformer_blocks[0].attn2.to_k.in_features == 768

    # Text encoder: layers 0..1 of CLIP-L, same names and shapes as the real 12-layer model.
    te = _shapes(sd1, "cond_stage_model.")
    real_te = {"transformer." + k: v for k, v in _shapes(_real_clip_l_on_meta()).items()}
    _assert_subset_same_shapes(te, real_te, "SD1 TE vs CLIP-L")
    assert te["transformer.text_model.encoder.layers.1.self_attn.q_proj.weight"] == [768, 768]
    assert te["transformer.text_model.encoder.layers.0.mlp.fc1.weight"] == [3072, 768]
    assert "transformer.text_model.embeddings.position_ids" in te
    assert not any(".layers.2." in k for k in te)
    assert sd1.cond_stage_model.tokenizer is models.make_tokenizer()


def test_sd1_attributes_and_forward(sd1):
    assert (sd1.is_sd1, sd1.is_sd2, sd1.is_sdxl) == (True, False, False)
    assert sd1.parameterization == "eps" and sd1.latent_channels == 4
    assert sd1.alphas_cumprod.shape == (1000,) and sd1.alphas_cumprod.dtype == torch.float32
    info = sd1.sd_checkpoint_info
    assert info.shorthash == info.sha256[:10] and info.title == f"{info.name} [{info.shorthash}]"
    assert len(info.hash) == 8 and info.model_name == "tiny-sd1-s0" and sd1.sd_model_hash == info.shorthash
    _assert_well_formed(sd1)
    with torch.no_grad():
        c = sd1.get_learned_conditioning(PROMPTS[:2])
        assert c.shape == (2, 77, 768) and torch.isfinite(c).all()
        out = sd1.apply_model(torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), c)
    assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all() and out.std() > 1e-3


def test_sd2_module_tree_matches_sd2(sd2):
    real = _ldm_unet_on_meta(num_head_channels=64, use_linear_in_transformer=True, context_dim=1024)
    _assert_same_keys(_shapes(sd2.model.diffusion_model), _shapes(real), "SD2 UNet vs SD2 config")
    assert isinstance(sd2.model.diffusion_model.input_blocks[1][1].proj_in, torch.nn.Linear)

    te = _shapes(sd2, "cond_stage_model.")
    real_te = {"model." + k: v for k, v in _shapes(_real_open_clip_text_on_meta("ViT-H-14")).items()}
    _assert_subset_same_shapes(te, real_te, "SD2 TE vs ViT-H-14 text tower")
    assert te["model.transformer.resblocks.0.attn.in_proj_weight"] == [3072, 1024]
    assert te["model.transformer.resblocks.1.mlp.c_fc.weight"] == [4096, 1024]
    assert "model.ln_final.weight" in te and not any(k.startswith("model.visual") for k in te)
    assert isinstance(sd2.cond_stage_model.model.transformer.resblocks[0].attn, torch.nn.MultiheadAttention)


def test_sd2_attributes_and_forward(sd2):
    assert (sd2.is_sd1, sd2.is_sd2, sd2.is_sdxl) == (False, True, False)
    assert sd2.parameterization == "v" and sd2.cond_stage_model.layer == "penultimate"
    _assert_well_formed(sd2)
    with torch.no_grad():
        c = sd2.get_learned_conditioning(PROMPTS[:1])
        assert c.shape == (1, 77, 1024) and torch.isfinite(c).all()
        out = sd2.apply_model(torch.randn(1, 4, 8, 8), torch.tensor([500]), c)
    assert out.shape == (1, 4, 8, 8) and torch.isfinite(out).all() and out.std() > 1e-3


# ------------------------------------------------------------------------------------------------ SDXL

def test_sdxl_tiny_unet_equals_real_sgm_skeleton(sdxl):
    ref = _json("sdxl_tiny_unet_skeleton.json")
    ignore = {"use_checkpoint", "spatial_transformer_attn_type"}  # no effect on the module tree
    assert {k: v for k, v in ref["config"].items() if k not in ignore} == \
        {k: v for k, v in sgm_like.TINY_SDXL_UNET_CONFIG.items() if k not in ignore}
    mine = _shapes(sdxl.model.diffusion_model)
    assert mine == ref["keys"]
    assert list(mine) == list(ref["keys"]), "state_dict order differs from sgm"
    # Tiny keys are a subset of real SDXL base, only `transformer_blocks.2..9` and widths are cut.
    full = _json("sdxl_unet_skeleton.json")["keys"]
    assert set(mine) <= set(full)
    assert "input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight" in mine
    assert "middle_block.1.transformer_blocks.1.ff.net.0.proj.weight" in mine
    assert "output_blocks.2.2.conv.weight" in mine and "output_blocks.5.2.conv.weight" in mine


def test_sdxl_full_size_sgm_like_equals_real_sgm_skeleton():
    ref = _json("sdxl_unet_skeleton.json")
    ignore = {"use_checkpoint", "spatial_transformer_attn_type"}
    assert {k: v for k, v in ref["config"].items() if k not in ignore} == \
        {k: v for k, v in sgm_like.SDXL_BASE_UNET_CONFIG.items() if k not in ignore}
    with torch.device("meta"):
        full = sgm_like.UNetModel(**sgm_like.SDXL_BASE_UNET_CONFIG)
    assert _shapes(full) == ref["keys"]
    assert len(ref["keys"]) == 1680 and sum(p.numel() for p in full.parameters()) == 2567463684


SDXL_DIFFUSERS_CONFIG = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
    cross_attention_dim=2048, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, flip_sin_to_cos=True, freq_shift=0, norm_num_groups=32)


def _diffusers_unet(cfg, meta):
    from diffusers import UNet2DConditionModel
    if meta:
        with torch.device("meta"):
            return UNet2DConditionModel(**cfg)
    return UNet2DConditionModel(**cfg)


def test_sdxl_skeleton_converts_to_diffusers_sdxl_unet():
    """Independent oracle for the committed skeleton: diffusers' single-file converter must map every sgm key
    onto the diffusers SDXL UNet, with no key missing or left over and every shape equal."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    keys = _json("sdxl_unet_skeleton.json")["keys"]
    ckpt = {"model.diffusion_model." + k: torch.empty(v, device="meta") for k, v in keys.items()}
    unet = _diffusers_unet(SDXL_DIFFUSERS_CONFIG, meta=True)
    converted = convert_ldm_unet_checkpoint(ckpt, dict(unet.config))
    _assert_same_keys(_shapes(converted), _shapes(unet), "converted sgm skeleton vs diffusers SDXL UNet")
    assert _shapes(converted) == _shapes(unet)
    assert len(converted) == len(keys) == 1680


def _sdxl_ref_inputs():
    g = torch.Generator().manual_seed(1234)  # same order as when tests/data/sdxl_tiny_forward_ref.json was made
    x = torch.randn(1, 4, 8, 8, generator=g)
    crossattn = torch.randn(1, 77, 2048, generator=g)
    vector = torch.randn(1, 2816, generator=g)
    return x, torch.tensor([500]), crossattn, vector


def test_sdxl_forward_matches_real_sgm_outputs(sdxl):
    """tests/data/sdxl_tiny_forward_ref.json holds outputs of the real sgm UNet and GeneralConditioner loaded with
    make_sdxl(seed=0) weights."""
    ref = _json("sdxl_tiny_forward_ref.json")
    x, t, ca, vec = _sdxl_ref_inputs()
    with torch.no_grad():
        out = sdxl.apply_model(x, t, {"crossattn": ca, "vector": vec})
    want = torch.tensor(ref["unet_output"]).reshape(out.shape)
    assert torch.allclose(out, want, atol=1e-4, rtol=1e-4), (
        f"max diff {(out - want).abs().max():.3g} vs real sgm. If models.randomize_ changed on purpose, the "
        f"reference must be regenerated by running the real sgm code (see the JSON's 'source')")

    with torch.no_grad():
        c = sdxl.get_learned_conditioning(ref["conditioner_prompts"])
    for key in ("crossattn", "vector"):
        r = ref[key]
        assert list(c[key].shape) == r["shape"]
        got = c[key].flatten()[torch.tensor(r["index"])]
        assert torch.allclose(got, torch.tensor(r["values"]), atol=1e-5, rtol=1e-5), key
        assert abs(float(c[key].double().abs().sum()) - r["abs_sum"]) <= 1e-4 * r["abs_sum"], key


def test_sdxl_tiny_unet_matches_diffusers_after_conversion(sdxl):
    """Second, independent forward oracle: the tiny sgm-named UNet converted by diffusers' converter into
    diffusers' own SDXL UNet implementation gives the same output."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    from ldm.modules.diffusionmodules.util import timestep_embedding
    cfg = dict(SDXL_DIFFUSERS_CONFIG, sample_size=8, block_out_channels=(32, 64, 128), attention_head_dim=(2, 4, 8),
               transformer_layers_per_block=(1, 2, 2))
    with skip_default_init():
        unet = _diffusers_unet(cfg, meta=False)
    sd = {"model.diffusion_model." + k: v for k, v in sdxl.model.diffusion_model.state_dict().items()}
    unet.load_state_dict(convert_ldm_unet_checkpoint(sd, dict(unet.config)), strict=True)
    unet.eval()

    x, t, ca, _ = _sdxl_ref_inputs()
    pooled = torch.randn(1, 1280, generator=torch.Generator().manual_seed(7))
    time_ids = torch.tensor([[832.0, 1216.0, 0.0, 16.0, 1024.0, 1024.0]])
    vector = torch.cat([pooled, timestep_embedding(time_ids.flatten(), 256).reshape(1, -1)], dim=1)
    with torch.no_grad():
        mine = sdxl.apply_model(x, t, {"crossattn": ca, "vector": vector})
        theirs = unet(x, t, encoder_hidden_states=ca,
                      added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
    assert torch.allclose(mine, theirs, atol=1e-4, rtol=1e-4), (mine - theirs).abs().max()


def test_sdxl_conditioner_tree_matches_real_sgm(sdxl):
    ref = _json("sdxl_tiny_conditioner_skeleton.json")["keys"]
    mine = {k.replace(".wrapped.", "."): v for k, v in _shapes(sdxl.conditioner).items()}
    assert mine == ref
    # Same names and shapes as real SDXL base's text encoders for the layers that exist.
    _assert_subset_same_shapes(mine, _json("sdxl_conditioner_skeleton.json")["keys"], "SDXL TEs vs SDXL base")

    e0, e1 = sdxl.conditioner.embedders[0].wrapped, sdxl.conditioner.embedders[1].wrapped
    from ldm.modules.encoders.modules import FrozenCLIPEmbedder
    from transformers import CLIPTextModel
    assert isinstance(e0, FrozenCLIPEmbedder) and isinstance(e0.transformer, CLIPTextModel)
    assert (e0.layer, e0.layer_idx) == ("hidden", models.TEXT_LAYERS - 1)
    assert isinstance(e1.model.transformer.resblocks[0].attn, torch.nn.MultiheadAttention)
    assert e1.model.text_projection.shape == (1280, 1280)
    assert [e.input_key for e in sdxl.conditioner.embedders] == \
        ["txt", "txt", "original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple"]
    # A1111 network names (assign_network_names_to_compvis_modules) exist.
    names = {f"{i}_{n.replace('.', '_')}" for i in (0, 1)
             for n, _ in sdxl.conditioner.embedders[i].wrapped.named_modules()}
    assert "0_transformer_text_model_encoder_layers_0_self_attn_q_proj" in names
    assert {"1_model_transformer_resblocks_1_attn", "1_model_transformer_resblocks_0_mlp_c_fc",
            "1_model_ln_final"} <= names


def test_sdxl_attributes_and_forward(sdxl):
    assert (sdxl.is_sd1, sdxl.is_sd2, sdxl.is_sdxl) == (False, False, True)
    assert sdxl.parameterization == "eps" and sdxl.cond_stage_model is sdxl.conditioner
    assert isinstance(sdxl.model, sgm_like.OpenAIWrapper)
    assert sdxl.model.diffusion_model.in_channels == 4
    ac = sdxl.alphas_cumprod
    assert ac.shape == (1000,) and ac.dtype == torch.float32
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    assert torch.allclose(ac.double(), torch.cumprod(1 - betas, 0), atol=1e-7)
    assert sdxl.sd_checkpoint_info.model_name == "tiny-sdxl-s0"
    _assert_well_formed(sdxl)

    with torch.no_grad():
        c = sdxl.get_learned_conditioning(PROMPTS[:2])
        assert c["crossattn"].shape == (2, 77, 2048) and c["vector"].shape == (2, 2816)
        out = sdxl.apply_model(torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), c)
        assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all() and out.std() > 1e-3

        class Negative(list):
            is_negative_prompt = True
        neg = sdxl.get_learned_conditioning(Negative([""]))
        assert neg["crossattn"].abs().sum() == 0 and neg["vector"][:, :1280].abs().sum() == 0
        assert neg["vector"][:, 1280:].abs().sum() > 0  # size embeddings are kept

        z = sdxl.encode_first_stage(torch.rand(1, 3, 64, 64) * 2 - 1)
        assert z.shape == (1, 4, 8, 8) and sdxl.get_first_stage_encoding(z) is z
        assert sdxl.decode_first_stage(z).shape == (1, 3, 64, 64)


# ------------------------------------------------------------------------------------------------ determinism

def test_builders_are_deterministic_fresh_and_hashable(sd1):
    h = models.model_state_hash(sd1)
    again = models.make_sd1()
    assert again is not sd1 and models.model_state_hash(again) == h
    assert models.model_state_hash(models.make_sd1(seed=1)) != h

    p = again.model.diffusion_model.input_blocks[1][1].transformer_blocks[0].attn1.to_q.weight
    old = p[0, 0].item()
    with torch.no_grad():
        p[0, 0] += 1e-3
    assert models.model_state_hash(again) != h, "a one-element change must change the hash"
    assert models.model_state_hash(sd1) == h, "models share no tensors"
    with torch.no_grad():
        p[0, 0] = old
    assert models.model_state_hash(again) == h

    p.requires_grad_(True)
    assert models.model_state_hash(again) != h
    assert models.model_state_hash(again, include_requires_grad=False) == \
        models.model_state_hash(sd1, include_requires_grad=False)
    p.requires_grad_(False)
    again.cond_stage_model.transformer.half()
    assert models.model_state_hash(again) != h, "dtype is part of the hash"


def test_randomize_is_per_name_and_seeded():
    a = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    b = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    models.randomize_(a, 3)
    models.randomize_(b, 3)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a[0].weight, models.randomize_(torch.nn.Sequential(torch.nn.Linear(4, 4)), 4)[0].weight)
    assert (a[1].weight - 1).abs().max() < 1 and (a[1].weight != 1).all()
