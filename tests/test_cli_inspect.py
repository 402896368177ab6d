"""`python -m lib_lora inspect`: files written here by kohya-style code, by LyCORIS (LoHa) and by PEFT; the
printed family, types, ranks, alphas and metadata summary; --model matching; corrupt files."""
import io
import json

import pytest
import torch
from safetensors.torch import save_file

import models
from lib_lora import cli
from test_cli_merge import (KOHYA_V1, SD1_TARGETS, SDXL_TARGETS, _lycoris_network, _targets, checkpoint_state,
                            run_cli, write_kohya)


def inspect(*args):
    out, err = io.StringIO(), io.StringIO()
    rc = cli.main(["inspect", *map(str, args)], out=out, err=err)
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def sd1_model():
    return models.make_sd1(seed=0)


@pytest.fixture(scope="module")
def sd1_ckpt(sd1_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("ck") / "tiny-sd1.safetensors"
    save_file(checkpoint_state(sd1_model, "sd1"), str(path))
    return path


KOHYA_META = dict(KOHYA_V1, **{
    "ss_output_name": "watercolor_v2", "ss_sd_model_name": "v1-5-pruned-emaonly.safetensors",
    "ss_network_dim": "4", "ss_network_alpha": "2.0", "ss_network_args": json.dumps({"conv_dim": "4"}),
    "ss_epoch": "3", "ss_num_epochs": "10", "ss_steps": "450", "ss_max_train_steps": "1500",
    "ss_resolution": "(512, 512)",
    "ss_tag_frequency": json.dumps({"10_wc": {"watercolor": 40, "landscape": 22, "1girl": 9},
                                    "5_sk": {"watercolor": 3, "sketch": 12}}),
})


def test_top_tags_leave_the_regularisation_folders_out():
    """sd-scripts counts the reg folders' captions into ss_tag_frequency too; they are the class's words."""
    meta = {"ss_tag_frequency": json.dumps({"20_svs cat": {"svs": 20, "cat": 20, "red": 4}, "1_cat": {"cat": 90}}),
            "ss_reg_dataset_dirs": json.dumps({"1_cat": {"n_repeats": 1, "img_count": 90}})}
    assert cli._top_tags(meta) == [("svs", 20), ("cat", 20), ("red", 4)]
    ds = [{"subsets": [{"image_dir": "/d/img", "is_reg": False}, {"image_dir": "/d/reg/", "is_reg": True}],
           "tag_frequency": {"img": {"svs": 3}, "reg": {"cat": 50}}}]
    assert cli._top_tags({"ss_datasets": json.dumps(ds)}) == [("svs", 3)]


def test_the_learning_rate_shown_is_the_one_each_part_trained_at():
    """sd-scripts writes learning_rate as ss_learning_rate even when unet_lr/text_encoder_lr override it; the audit
    saw 'learning rate 2e-06' for a run trained at 1e-3."""
    meta = {"ss_learning_rate": "2e-06", "ss_unet_lr": "0.001", "ss_text_encoder_lr": "None"}
    s = cli.summarize_metadata(meta)
    assert (s["learning_rate"], s["unet_lr"]) == ("2e-06", "0.001") and "text_encoder_lr" not in s
    assert "  learning rate   UNet 0.001, text encoder 2e-06" in cli._format_metadata(s, 3)
    s = cli.summarize_metadata({"ss_learning_rate": "0.0001", "ss_unet_lr": "None", "ss_text_encoder_lr": "None"})
    assert "  learning rate   0.0001" in cli._format_metadata(s, 3)


def test_inspect_kohya_text_and_json(tmp_path, sd1_ckpt):
    lora = tmp_path / "wc.safetensors"
    write_kohya(lora, _targets(SD1_TARGETS), rank=4, alpha=2, seed=1, metadata=KOHYA_META)
    rc, out, err = inspect(lora)
    assert rc == 0, err
    assert "base model: SD1.5" in out and "ss_base_model_version=sd_v1" in out
    assert "8 modules: lora ×7, locon ×1" in out  # the 3x3 resnet conv is a LoCon module
    assert "writer: kohya" in out
    assert "parts:      unet 6, text encoder 2" in out
    assert "rank:       4 (all 8)" in out and "alpha:      2 (all 8)" in out and "scale:      0.5 (all 8)" in out
    assert "output name     watercolor_v2" in out
    assert "epochs          3/10" in out and "steps           450/1500" in out
    assert "dim / alpha     4 / 2.0" in out and '"conv_dim":"4"' in out
    assert "top tags        watercolor (43), landscape (22), sketch (12), 1girl (9)" in out
    assert "addnet " in out and "sha256 " in out

    rc, out, _ = inspect(lora, "--json", "--model", sd1_ckpt)
    info = json.loads(out)
    assert rc == 0
    assert info["family"]["family"] == "sd1"
    assert info["network_types"] == {"lora": 7, "locon": 1}
    assert info["ranks"] == {"4": 8} and info["alphas"] == {"2": 8}
    assert info["metadata"]["summary"]["top_tags"][0] == ["watercolor", 43]
    assert info["model"]["family"] == "sd1" and info["model"]["compatible"] is True
    assert info["model"]["report"]["matched"] == 8 and not info["model"]["report"]["unmatched"]


def test_inspect_family_mismatch_against_checkpoint(tmp_path, sd1_ckpt):
    lora = tmp_path / "xl.safetensors"
    write_kohya(lora, _targets(SDXL_TARGETS), rank=8, alpha=8, seed=2,
                metadata={"ss_network_module": "networks.lora", "ss_base_model_version": "sdxl_base_v1-0"})
    rc, out, err = inspect(lora, "--model", sd1_ckpt, "--no-hash")
    assert rc == 0, err
    assert "base model: SDXL" in out
    assert "parts:      unet 3, te1 (CLIP-L) 1, te2 (OpenCLIP bigG) 2" in out
    assert "MISMATCH: this LoRA is for SDXL, the checkpoint is SD1.5" in out


def test_inspect_lycoris_loha(tmp_path, sd1_model):
    pytest.importorskip("lycoris")
    te = _lycoris_network(sd1_model.cond_stage_model.transformer,
                          {"target_module": ["CLIPAttention"], "lora_prefix": "lora_te", "target_name": []},
                          lora_dim=8, alpha=4, network_module="loha")
    unet = _lycoris_network(sd1_model.model.diffusion_model,
                            {"target_module": ["SpatialTransformer"], "lora_prefix": "lora_unet",
                             "target_name": []},
                            lora_dim=6, alpha=3, network_module="loha")
    state = {k: v.detach().clone().contiguous() for k, v in {**te.state_dict(), **unet.state_dict()}.items()}
    te.restore()
    unet.restore()
    path = tmp_path / "loha.safetensors"
    save_file(state, str(path), {"ss_network_module": "lycoris.kohya",
                                 "ss_network_args": json.dumps({"algo": "loha", "conv_dim": "6"})})
    n_te, n_unet = len(te.loras), len(unet.loras)
    rc, out, err = inspect(path, "--no-hash")
    assert rc == 0, err
    assert f"{n_te + n_unet} modules: loha ×{n_te + n_unet}" in out
    assert "writer: lycoris" in out
    assert f"rank:       6 ×{n_unet}, 8 ×{n_te}" in out
    assert f"alpha:      3 ×{n_unet}, 4 ×{n_te}" in out
    assert "base model: SD1.5" in out  # no base-model metadata: from cross-attention/TE widths
    assert 'network         lycoris.kohya {"algo":"loha","conv_dim":"6"}' in out


def test_inspect_peft_file(tmp_path, sd1_ckpt):
    """A PEFT adapter on a diffusers UNet (keys `unet.….lora_A.weight`), as diffusers saves SD LoRAs."""
    pytest.importorskip("peft")
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    unet = UNet2DConditionModel(sample_size=8, block_out_channels=(32, 64), layers_per_block=1,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=768,
                                attention_head_dim=8, norm_num_groups=32)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    unet = inject_adapter_in_model(cfg, unet)
    state = {f"unet.{k}": v.detach().clone().contiguous() for k, v in get_peft_model_state_dict(unet).items()}
    path = tmp_path / "peft.safetensors"
    save_file(state, str(path), {"lora_adapter_metadata": json.dumps({"r": 4, "lora_alpha": 8})})
    n = len(state) // 2
    rc, out, err = inspect(path, "--no-hash", "--model", sd1_ckpt)
    assert rc == 0, err
    assert f"{n} modules: lora ×{n}" in out and "writer: peft" in out
    assert f"rank:       4 (all {n})" in out
    assert f"alpha:      none (all {n})" in out  # PEFT keeps alpha in the adapter config, not per module
    assert '"lora_alpha":8' in out
    assert f"scale:      2 (all {n})" in out  # lora_alpha 8 / r 4 from lora_adapter_metadata
    assert "base model: SD1.5" in out
    assert f"{n}/{n} modules matched" in out and "verdict:  compatible" in out


def test_inspect_refused_family(tmp_path):
    path = tmp_path / "flux.safetensors"
    save_file({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(4, 3072),
               "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(9216, 4)}, str(path))
    rc, out, err = inspect(path, "--no-hash")
    assert rc == 0, err
    assert "base model: Flux (not supported" in out


def test_inspect_says_a_checkpoint_is_not_a_lora(sd1_ckpt):
    rc, out, err = inspect(sd1_ckpt)
    assert rc == 1 and out == "" and err.count("\n") == 1
    assert "tiny-sd1.safetensors: it is a full Stable Diffusion checkpoint, not a LoRA" in err
    assert "it is the BASE of `merge BASE OUT --lora FILE`" in err and "models/Stable-diffusion" not in err


def test_a_file_name_one_typo_away_is_suggested(sd1_ckpt):
    rc, out, err = inspect(str(sd1_ckpt)[:-1])
    assert rc == 1 and f"LoRA file not found: {str(sd1_ckpt)[:-1]} (did you mean {sd1_ckpt}?)" in err, err


def test_inspect_and_merge_say_a_resume_state_is_one(sd1_ckpt, tmp_path):
    """It was called a pickle saved with a .safetensors name, to be converted."""
    state = tmp_path / "svs-000001-state.lsstate"
    state.write_bytes(b"PK\x03\x04 not read")
    rc, out, err = inspect(state)
    assert rc == 1 and ("svs-000001-state.lsstate is a LoRA Studio resume state, not a LoRA: continue its run with "
                        f"`python -m lib_lora train CONFIG --resume {state}`") in err, err
    err2 = io.StringIO()
    rc = cli.main(["merge", str(sd1_ckpt), str(tmp_path / "o.safetensors"), "--lora", str(state)],
                  out=io.StringIO(), err=err2)
    assert rc == 1 and "is a LoRA Studio resume state" in err2.getvalue()
    rc = cli.main(["merge", str(sd1_ckpt), str(tmp_path / "o.safetensors"), "--lora", str(sd1_ckpt)],
                  out=io.StringIO(), err=(err3 := io.StringIO()))
    assert rc == 1 and "it is a full Stable Diffusion checkpoint, not a LoRA: it is the BASE" in err3.getvalue()


def test_inspect_says_what_other_files_are(tmp_path):
    """The WebUI's classifier: a VAE, a bare UNet and a file of unrelated tensors are named, not listed as
    hundreds of unreadable modules."""
    files = {
        "vae": ({"encoder.down.0.block.0.conv1.weight": torch.zeros(4, 4, 3, 3),
                 "quant_conv.weight": torch.zeros(8, 8, 1, 1)}, "it is a VAE, not a LoRA"),
        "unet": ({f"model.diffusion_model.input_blocks.{i}.0.weight": torch.zeros(4, 4, 3, 3) for i in range(3)},
                 "it holds plain model weights (3 layers such as model.diffusion_model.input_blocks.0.0)"),
        "other": ({"foo.bar": torch.zeros(2), "foo.baz": torch.zeros(2)},
                  "none of its 2 tensor names (e.g. foo.bar, foo.baz) is a LoRA layer of SD1.x/SD2.x/SDXL"),
    }
    for name, (tensors, said) in files.items():
        save_file(tensors, str(tmp_path / f"{name}.safetensors"))
        rc, out, err = inspect(tmp_path / f"{name}.safetensors", "--no-hash")
        assert rc == 1 and out == "" and f"{name}.safetensors: {said}" in err, err
        assert "--model" not in err


def test_inspect_corrupt_and_missing_files(tmp_path):
    good = tmp_path / "good.safetensors"
    write_kohya(good, _targets(SD1_TARGETS, ["lora_te_text_model_encoder_layers_1_mlp_fc2"]), rank=4, alpha=4,
                seed=3, metadata=KOHYA_V1)
    data = good.read_bytes()
    trunc = tmp_path / "truncated.safetensors"
    trunc.write_bytes(data[: len(data) // 2])
    rc, out, err = inspect(trunc)
    assert rc == 1 and out == ""
    assert err.startswith("error: ") and "truncated.safetensors" in err and err.count("\n") == 1

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"this is not a safetensors file at all")
    rc, _, err = inspect(garbage)
    assert rc == 1 and "garbage.safetensors" in err

    pickle = tmp_path / "old.pt"
    torch.save({"a": torch.zeros(1)}, str(pickle))
    rc, _, err = inspect(pickle)
    assert rc == 1 and "old.pt" in err and "pickle" in err

    rc, _, err = inspect(tmp_path / "nope.safetensors")
    assert rc == 1 and "nope.safetensors" in err and "not found" in err

    # through the real entry point: one clear line, no traceback
    r = run_cli("inspect", trunc)
    assert r.returncode == 1 and "truncated.safetensors" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("inspect")
    assert r.returncode == 2 and "usage:" in r.stderr


def test_inspect_names_nan_and_absurd_values(tmp_path):
    """A diverged run's file: inspect still describes it, with a note saying what A1111 would do with it."""
    from safetensors.torch import load_file
    good = tmp_path / "good.safetensors"
    write_kohya(good, _targets(SD1_TARGETS), rank=4, alpha=4, seed=3, metadata=KOHYA_V1)
    rc, out, _ = inspect(good)
    assert rc == 0 and "note:" not in out
    t = load_file(str(good))
    up = sorted(k for k in t if k.endswith("lora_up.weight"))
    for name, value in (("nan", float("nan")), ("huge", 3e4), ("big_alpha", None)):  # (3e4: fp16 holds it)
        bad = {k: v.clone() for k, v in t.items()}
        if value is None:  # a large alpha is unusual, not absurd
            bad[up[0].replace("lora_up.weight", "alpha")] = torch.tensor(4096.0)
        else:
            bad[up[0]][0, 0] = value
            bad[up[1]][1, 0] = value
        save_file(bad, str(tmp_path / f"{name}.safetensors"), metadata=KOHYA_V1)
    rc, out, _ = inspect(tmp_path / "nan.safetensors")
    assert rc == 0 and "modules: lora" in out
    assert f"note:       nan.safetensors: 2 tensor(s) hold NaN or infinite values (e.g. {up[0]})" in out
    rc, out, _ = inspect(tmp_path / "huge.safetensors", "--json")
    assert json.loads(out)["notes"][0].startswith("2 tensor(s) hold values up to 3e+04 (e.g. ")
    rc, out, _ = inspect(tmp_path / "big_alpha.safetensors")
    assert rc == 0 and "note:" not in out
