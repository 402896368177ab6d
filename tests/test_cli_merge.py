"""`python -m lib_lora merge`: bakes LoRAs into tiny SD1/SD2/SDXL checkpoints, checked against expectations
computed here from the file's own tensors (W + m·(alpha/r)·up@down, written out per layer by hand), against
LyCORIS' own merge, and for everything else bit-for-bit equality with the base file."""
import json
import os
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

import models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONWARNINGS="ignore")
    return env


def run_cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "lib_lora", *map(str, args)], cwd=ROOT, env=cli_env(),
                          capture_output=True, text=True, timeout=timeout)


def run_main(*args):
    """In-process `cli.main` for the quick error paths: (exit code, stdout, stderr)."""
    import io

    from lib_lora import cli
    out, err = io.StringIO(), io.StringIO()
    rc = cli.main([str(a) for a in args], out=out, err=err)
    return rc, out.getvalue(), err.getvalue()


# ---------------------------------------------------------------------------------------------------- fixtures

def checkpoint_state(model, family):
    """The model's state dict in single-file checkpoint layout (what A1111 loads), as independent tensors."""
    sd = {}
    for k, v in model.state_dict().items():
        if family == "sdxl":
            if k.startswith("cond_stage_model."):
                continue  # alias of `conditioner` on the A1111 object, not in SDXL files
            k = k.replace("conditioner.embedders.0.wrapped.", "conditioner.embedders.0.")
            k = k.replace("conditioner.embedders.1.wrapped.", "conditioner.embedders.1.")
        sd[k] = v.detach().clone().contiguous()
    return sd


def load_into_fresh(family, out_sd, seed=7):
    """Load a merged file into a freshly built model (other seed), proving every key/shape is where A1111
    expects it; returns the fresh model's state dict in checkpoint layout."""
    make = {"sd1": models.make_sd1, "sd2": models.make_sd2, "sdxl": models.make_sdxl}[family]
    fresh = make(seed=seed)
    sd = dict(out_sd)
    if family == "sdxl":
        sd = {k.replace("conditioner.embedders.0.", "conditioner.embedders.0.wrapped.")
               .replace("conditioner.embedders.1.", "conditioner.embedders.1.wrapped."): v for k, v in sd.items()}
        result = fresh.load_state_dict(sd, strict=False)
        assert not result.unexpected_keys
        assert all(k.startswith("cond_stage_model.") for k in result.missing_keys)  # the alias, same tensors
    else:
        fresh.load_state_dict(sd, strict=True)
    return checkpoint_state(fresh, family)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """{family: (path, state dict)}: tiny checkpoints with metadata, built once per module."""
    d = tmp_path_factory.mktemp("ckpt")
    out = {}
    for family, make in (("sd1", models.make_sd1), ("sd2", models.make_sd2), ("sdxl", models.make_sdxl)):
        sd = checkpoint_state(make(seed=0), family)
        path = d / f"tiny-{family}.safetensors"
        save_file(sd, str(path), {"modelspec.title": f"tiny {family}", "note": "base metadata"})
        out[family] = (path, sd)
    return out


def write_kohya(path, targets, rank, alpha, seed, metadata, dtype=torch.float16):
    """targets: {kohya module name: (weight shape, 'linear'|'conv1x1'|'conv')}; 'conv1x1' writes 4-D 1x1 factors
    as kohya does for conv layers (and for SD2 proj_in/out). Returns {name: (up, down, alpha)} as stored."""
    g = torch.Generator().manual_seed(seed)
    tensors, factors = {}, {}
    for name, (shape, kind) in targets.items():
        o, i = shape[0], shape[1]
        if kind == "linear":
            down, up = torch.randn(rank, i, generator=g), torch.randn(o, rank, generator=g)
        elif kind == "conv1x1":
            down, up = torch.randn(rank, i, 1, 1, generator=g), torch.randn(o, rank, 1, 1, generator=g)
        else:
            down, up = torch.randn(rank, i, *shape[2:], generator=g), torch.randn(o, rank, 1, 1, generator=g)
        down, up = (0.2 * down).to(dtype), (0.2 * up).to(dtype)
        a = torch.tensor(float(alpha), dtype=dtype)
        tensors[f"{name}.lora_down.weight"] = down
        tensors[f"{name}.lora_up.weight"] = up
        tensors[f"{name}.alpha"] = a
        factors[name] = (up, down, a)
    save_file(tensors, str(path), metadata)
    return factors


def lora_delta(factors, name, shape, mult):
    """m·(alpha/r)·up@down in float64, reshaped to the target weight (independent of lib_lora)."""
    up, down, alpha = factors[name]
    r = down.shape[0]
    prod = up.double().reshape(up.shape[0], r) @ down.double().reshape(r, -1)
    return (mult * float(alpha.double()) / r * prod).reshape(shape)


def assert_merge(base_sd, out_sd, expected_delta, atol=2e-6):
    """expected_delta: {checkpoint key: (row slice or None, float64 delta)}. Everything else: bit-identical."""
    assert set(out_sd) == set(base_sd)
    for k, base in base_sd.items():
        got = out_sd[k]
        assert got.dtype == base.dtype and got.shape == base.shape, k
        if k not in expected_delta:
            assert torch.equal(got, base), f"{k} changed but no LoRA targets it"
            continue
        want = base.double().clone()
        for rows, delta in expected_delta[k]:
            if rows is None:
                want += delta
            else:
                want[rows] += delta
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=atol, msg=lambda m: f"{k}: {m}")
        assert not torch.equal(got, base), f"{k} was not changed"


def add(expected, key, delta, rows=None):
    expected.setdefault(key, []).append((rows, delta))


UNET = "model.diffusion_model."
KOHYA_V1 = {"ss_network_module": "networks.lora", "ss_base_model_version": "sd_v1", "ss_output_name": "t"}


# ---------------------------------------------------------------------------------------------------- SD1

SD1_TARGETS = {
    # kohya name (diffusers tree, as kohya writes SD1): (checkpoint key, shape, kind)
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q":
        (UNET + "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight", (32, 32), "linear"),
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k":
        (UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight", (32, 768), "linear"),
    "lora_unet_down_blocks_0_attentions_0_proj_in":
        (UNET + "input_blocks.1.1.proj_in.weight", (32, 32, 1, 1), "conv1x1"),
    "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj":
        (UNET + "middle_block.1.transformer_blocks.0.ff.net.0.proj.weight", (1024, 128), "linear"),
    "lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_attn2_to_out_0":
        (UNET + "output_blocks.5.1.transformer_blocks.0.attn2.to_out.0.weight", (128, 128), "linear"),
    "lora_unet_down_blocks_0_resnets_0_conv1":  # LoCon on a 3x3 conv
        (UNET + "input_blocks.1.0.in_layers.2.weight", (32, 32, 3, 3), "conv"),
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj":
        ("cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight", (768, 768), "linear"),
    "lora_te_text_model_encoder_layers_1_mlp_fc2":
        ("cond_stage_model.transformer.text_model.encoder.layers.1.mlp.fc2.weight", (768, 3072), "linear"),
}


def _targets(table, names=None):
    return {n: (shape, kind) for n, (_, shape, kind) in table.items() if names is None or n in names}


def test_merge_sd1_two_loras_against_independent_expectation(ckpts, tmp_path):
    base_path, base_sd = ckpts["sd1"]
    a = tmp_path / "style.safetensors"
    b = tmp_path / "detail.safetensors"
    fa = write_kohya(a, _targets(SD1_TARGETS), rank=4, alpha=2, seed=1, metadata=KOHYA_V1)
    b_names = ["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
               "lora_te_text_model_encoder_layers_0_self_attn_q_proj"]
    fb = write_kohya(b, _targets(SD1_TARGETS, b_names), rank=8, alpha=8, seed=2, metadata=KOHYA_V1)
    out = tmp_path / "merged.safetensors"

    r = run_cli("merge", base_path, out, "--lora", f"{a}:0.7", "--lora", f"{b}:0.5:1.25")
    assert r.returncode == 0, r.stderr
    assert "lora 'style': 8/8 modules matched" in r.stdout
    assert "lora 'detail': 2/2 modules matched" in r.stdout
    assert "wrote" in r.stdout

    expected = {}
    for name, (key, shape, _) in SD1_TARGETS.items():
        add(expected, key, lora_delta(fa, name, shape, 0.7))
    te_b, unet_b = 0.5, 1.25
    for name in b_names:
        key, shape, _ = SD1_TARGETS[name]
        add(expected, key, lora_delta(fb, name, shape, te_b if "_te_" in name else unet_b))

    out_sd = load_file(str(out))
    assert_merge(base_sd, out_sd, expected)
    assert_merge(base_sd, load_into_fresh("sd1", out_sd), expected)

    from safetensors import safe_open
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["modelspec.title"] == "tiny sd1" and meta["note"] == "base metadata"
    merged_info = json.loads(meta["lora_studio_merge"])
    assert [m["file"] for m in merged_info] == ["style.safetensors", "detail.safetensors"]


def test_merge_precision_fp16_and_upcast_from_bf16(ckpts, tmp_path):
    base_path, base_sd = ckpts["sd1"]
    names = ["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k",
             "lora_te_text_model_encoder_layers_1_mlp_fc2"]
    lora = tmp_path / "l.safetensors"
    f = write_kohya(lora, _targets(SD1_TARGETS, names), rank=4, alpha=1, seed=3, metadata=KOHYA_V1)

    out = tmp_path / "half.safetensors"
    r = run_cli("merge", base_path, out, "--lora", lora, "--precision", "fp16")
    assert r.returncode == 0, r.stderr
    out_sd = load_file(str(out))
    for k, base in base_sd.items():
        got = out_sd[k]
        if not base.is_floating_point():
            assert torch.equal(got, base), k  # position_ids etc. keep their integer dtype
            continue
        assert got.dtype == torch.float16, k
        targeted = [n for n in names if SD1_TARGETS[n][0] == k]
        if not targeted:
            assert torch.equal(got, base.half()), k
        else:
            key, shape, _ = SD1_TARGETS[targeted[0]]
            want = (base.double() + lora_delta(f, targeted[0], shape, 1.0)).half()
            torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)

    # bf16 base, fp32 output: the merge runs after the upcast, so there is no bf16 rounding of the result
    bf_path = tmp_path / "bf16.safetensors"
    bf_sd = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in base_sd.items()}
    save_file(bf_sd, str(bf_path))
    out32 = tmp_path / "fp32.safetensors"
    r = run_cli("merge", bf_path, out32, "--lora", lora, "--precision", "fp32")
    assert r.returncode == 0, r.stderr
    up_sd = {k: (v.float() if v.is_floating_point() else v) for k, v in bf_sd.items()}
    expected = {}
    for n in names:
        key, shape, _ = SD1_TARGETS[n]
        add(expected, key, lora_delta(f, n, shape, 1.0))
    assert_merge(up_sd, load_file(str(out32)), expected)


# ---------------------------------------------------------------------------------------------------- SD2

D2 = 1024
TE2 = "cond_stage_model.model.transformer.resblocks."
SD2_TARGETS = {
    # q and v only (PEFT/kohya TE LoRAs often skip k): k rows must stay untouched
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj": (TE2 + "0.attn.in_proj_weight", (D2, D2), "linear"),
    "lora_te_text_model_encoder_layers_0_self_attn_v_proj": (TE2 + "0.attn.in_proj_weight", (D2, D2), "linear"),
    "lora_te_text_model_encoder_layers_0_self_attn_out_proj": (TE2 + "0.attn.out_proj.weight", (D2, D2), "linear"),
    "lora_te_text_model_encoder_layers_1_mlp_fc1": (TE2 + "1.mlp.c_fc.weight", (4 * D2, D2), "linear"),
    # kohya trains SD2 proj_in as a 1x1 conv and saves 4-D factors; the SD2 layer is Linear
    "lora_unet_down_blocks_1_attentions_0_proj_in": (UNET + "input_blocks.4.1.proj_in.weight", (64, 64), "conv1x1"),
    "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_v":
        (UNET + "input_blocks.4.1.transformer_blocks.0.attn2.to_v.weight", (64, D2), "linear"),
}
SD2_ROWS = {"q_proj": slice(0, D2), "k_proj": slice(D2, 2 * D2), "v_proj": slice(2 * D2, 3 * D2)}


def test_merge_sd2_mha_rows(ckpts, tmp_path):
    base_path, base_sd = ckpts["sd2"]
    lora = tmp_path / "sd2.safetensors"
    meta = {"ss_network_module": "networks.lora", "ss_base_model_version": "sd_v2_v", "ss_v2": "True"}
    f = write_kohya(lora, _targets(SD2_TARGETS), rank=4, alpha=3, seed=4, metadata=meta)
    out = tmp_path / "sd2-merged.safetensors"
    r = run_cli("merge", base_path, out, "--lora", f"{lora}:0.6")
    assert r.returncode == 0, r.stderr
    assert "6/6 modules matched" in r.stdout

    expected = {}
    for name, (key, shape, _) in SD2_TARGETS.items():
        rows = next((s for p, s in SD2_ROWS.items() if name.endswith("self_attn_" + p)), None)
        add(expected, key, lora_delta(f, name, shape, 0.6), rows)
    out_sd = load_file(str(out))
    assert_merge(base_sd, out_sd, expected)
    w, w0 = out_sd[TE2 + "0.attn.in_proj_weight"], base_sd[TE2 + "0.attn.in_proj_weight"]
    assert torch.equal(w[SD2_ROWS["k_proj"]], w0[SD2_ROWS["k_proj"]])
    assert torch.equal(out_sd[TE2 + "0.attn.in_proj_bias"], base_sd[TE2 + "0.attn.in_proj_bias"])
    assert_merge(base_sd, load_into_fresh("sd2", out_sd), expected)


# ---------------------------------------------------------------------------------------------------- SDXL

D3 = 1280
E0 = "conditioner.embedders.0.transformer.text_model.encoder.layers."
E1 = "conditioner.embedders.1.model.transformer.resblocks."
SDXL_TARGETS = {
    # kohya SDXL keys use the sgm (compvis) UNet names
    "lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k":
        (UNET + "input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight", (64, 2048), "linear"),
    "lora_unet_middle_block_1_transformer_blocks_1_ff_net_2":
        (UNET + "middle_block.1.transformer_blocks.1.ff.net.2.weight", (128, 512), "linear"),
    "lora_unet_output_blocks_2_1_proj_out": (UNET + "output_blocks.2.1.proj_out.weight", (128, 128), "linear"),
    "lora_te1_text_model_encoder_layers_1_self_attn_k_proj": (E0 + "1.self_attn.k_proj.weight", (768, 768),
                                                              "linear"),
    "lora_te2_text_model_encoder_layers_0_self_attn_k_proj": (E1 + "0.attn.in_proj_weight", (D3, D3), "linear"),
    "lora_te2_text_model_encoder_layers_1_mlp_fc2": (E1 + "1.mlp.c_proj.weight", (D3, 4 * D3), "linear"),
}


def test_merge_sdxl(ckpts, tmp_path):
    base_path, base_sd = ckpts["sdxl"]
    missing = [k for k, _, _ in SDXL_TARGETS.values() if k not in base_sd]
    assert not missing, f"tiny SDXL layout changed: {missing}"
    lora = tmp_path / "xl.safetensors"
    meta = {"ss_network_module": "networks.lora", "ss_base_model_version": "sdxl_base_v1-0"}
    f = write_kohya(lora, _targets(SDXL_TARGETS), rank=8, alpha=4, seed=5, metadata=meta)
    out = tmp_path / "xl-merged.safetensors"
    r = run_cli("merge", base_path, out, "--lora", f"{lora}:1.1")
    assert r.returncode == 0, r.stderr
    assert "6/6 modules matched" in r.stdout

    expected = {}
    for name, (key, shape, _) in SDXL_TARGETS.items():
        rows = slice(D3, 2 * D3) if name.endswith("te2_text_model_encoder_layers_0_self_attn_k_proj") else None
        add(expected, key, lora_delta(f, name, shape, 1.1), rows)
    out_sd = load_file(str(out))
    assert_merge(base_sd, out_sd, expected)
    assert_merge(base_sd, load_into_fresh("sdxl", out_sd), expected)


# ---------------------------------------------------------------------------------------------------- LyCORIS

_LYCO_ATTRS = ("ENABLE_CONV", "TARGET_REPLACE_MODULE", "TARGET_REPLACE_NAME", "LORA_PREFIX", "MODULE_ALGO_MAP",
               "NAME_ALGO_MAP", "USE_FNMATCH", "TARGET_EXCLUDE_NAME")


def _lycoris_network(root, preset, **kw):
    """A LycorisNetwork on an ldm module tree; LyCORIS presets are class attributes, so put them back after."""
    from lycoris.wrapper import LycorisNetwork
    saved = {k: getattr(LycorisNetwork, k) for k in _LYCO_ATTRS}
    try:
        LycorisNetwork.apply_preset(preset)
        net = LycorisNetwork(root, 1.0, **kw)
    finally:
        for k, v in saved.items():
            setattr(LycorisNetwork, k, v)
    net.apply_to()
    return net


def test_merge_lycoris_locon_file_matches_lycoris_merge(tmp_path):
    """A LoCon file written by LyCORIS itself (linear + 3x3 conv with Tucker lora_mid, UNet + TE, alpha != rank)
    merged by the CLI equals LyCORIS' own merge_to on the same ldm modules."""
    pytest.importorskip("lycoris")
    model = models.make_sd1(seed=11)
    base_sd = checkpoint_state(model, "sd1")
    base_path = tmp_path / "base.safetensors"
    save_file(base_sd, str(base_path))

    unet = _lycoris_network(model.model.diffusion_model,
                            {"target_module": ["SpatialTransformer", "ResBlock"], "lora_prefix": "lora_unet",
                             "enable_conv": True, "target_name": []},
                            lora_dim=4, alpha=2, conv_lora_dim=4, conv_alpha=1, use_tucker=True,
                            network_module="locon")
    te = _lycoris_network(model.cond_stage_model.transformer,
                          {"target_module": ["CLIPAttention", "CLIPMLP"], "lora_prefix": "lora_te",
                           "target_name": []},
                          lora_dim=4, alpha=8, network_module="locon")
    g = torch.Generator().manual_seed(12)
    with torch.no_grad():
        for net in (unet, te):
            for p_name, p in net.named_parameters():
                if p_name.endswith("lora_up.weight"):  # LyCORIS zero-inits up; a zero LoRA proves nothing
                    p.copy_(0.1 * torch.randn(p.shape, generator=g))
    state = {**unet.state_dict(), **te.state_dict()}
    assert any(k.endswith("lora_mid.weight") for k in state), "expected Tucker conv modules"
    lora = tmp_path / "lyco.safetensors"
    save_file({k: v.detach().clone().contiguous() for k, v in state.items()}, str(lora),
              {"ss_network_module": "lycoris.kohya", "ss_network_args": json.dumps({"algo": "locon"}),
               "ss_base_model_version": "sd_v1"})

    mult = 0.8
    unet.merge_to(mult)
    te.merge_to(mult)
    want = checkpoint_state(model, "sd1")
    changed = {k for k in base_sd if not torch.equal(base_sd[k], want[k])}
    assert len(changed) > 100

    out = tmp_path / "out.safetensors"
    r = run_cli("merge", base_path, out, "--lora", f"{lora}:{mult}")
    assert r.returncode == 0, r.stderr
    n = len(unet.loras) + len(te.loras)
    assert f"{n}/{n} modules matched" in r.stdout
    got = load_file(str(out))
    for k, base in base_sd.items():
        if k in changed:
            torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-5, msg=lambda m: f"{k}: {m}")
        else:
            assert torch.equal(got[k], base), k


# ---------------------------------------------------------------------------------------------------- refusals

def test_merge_family_mismatch_is_named(ckpts, tmp_path):
    base_path, _ = ckpts["sd1"]
    lora = tmp_path / "xl_style.safetensors"
    write_kohya(lora, _targets(SDXL_TARGETS), rank=4, alpha=4, seed=6,
                metadata={"ss_network_module": "networks.lora", "ss_base_model_version": "sdxl_base_v1-0"})
    out = tmp_path / "never.safetensors"
    r = run_cli("merge", base_path, out, "--lora", lora)
    assert r.returncode == 1
    assert "this LoRA is for SDXL, the checkpoint is SD1.5" in r.stderr
    assert "xl_style.safetensors" in r.stderr
    assert "Traceback" not in r.stderr
    assert not out.exists()


def test_merge_refuses_to_overwrite_base(ckpts, tmp_path):
    _, base_sd = ckpts["sd1"]
    base = tmp_path / "base.safetensors"
    save_file(base_sd, str(base))
    before = base.read_bytes()
    lora = tmp_path / "l.safetensors"
    write_kohya(lora, _targets(SD1_TARGETS, ["lora_te_text_model_encoder_layers_1_mlp_fc2"]), rank=2, alpha=2,
                seed=8, metadata=KOHYA_V1)

    rc, _, err = run_main("merge", base, base, "--lora", lora)
    assert rc == 2 and "--overwrite" in err and "base checkpoint itself" in err
    assert base.read_bytes() == before

    other = tmp_path / "exists.safetensors"
    other.write_bytes(b"keep me")
    rc, _, err = run_main("merge", base, other, "--lora", lora)
    assert rc == 2 and "already exists" in err
    assert other.read_bytes() == b"keep me"

    # a merge killed while writing left its hidden temp file: removed once nothing writes it (minutes old)
    stale, fresh = tmp_path / ".base.safetensors.k1ll3d_x.tmp", tmp_path / ".base.safetensors.wr1t1ng_.tmp"
    stale.write_bytes(b"\0" * 4096)
    fresh.write_bytes(b"\0" * 10)
    os.utime(stale, (time.time() - 600, time.time() - 600))
    r = run_cli("merge", base, base, "--lora", lora, "--overwrite")
    assert r.returncode == 0, r.stderr
    assert "removed 1 unfinished file(s) (4.0 KB) an interrupted write of base.safetensors left" in r.stdout, r.stdout
    assert base.read_bytes() != before
    # atomic write left no temp file; one still being written (by another merge, say) is not touched
    assert [p for p in os.listdir(tmp_path) if p.endswith(".tmp")] == [fresh.name]


def test_merge_usage_and_file_errors(ckpts, tmp_path, capsys):
    base_path, _ = ckpts["sd1"]
    out = tmp_path / "o.safetensors"
    rc, _, err = run_main("merge", base_path, out, "--lora", f"{tmp_path / 'x.safetensors'}:abc")
    assert rc == 2 and "not a number" in err
    rc, _, err = run_main("merge", base_path, tmp_path / "o.ckpt", "--lora", "x.safetensors")
    assert rc == 2 and ".safetensors" in err
    rc, _, _ = run_main("merge", base_path, out)  # --lora is required (argparse prints to sys.stderr)
    assert rc == 2 and "--lora" in capsys.readouterr().err
    rc, _, err = run_main("merge", base_path, out, "--lora", tmp_path / "missing.safetensors")
    assert rc == 1 and "missing.safetensors" in err and "not found" in err

    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    rc, _, err = run_main("merge", base_path, out, "--lora", bad)
    assert rc == 1 and "broken.safetensors" in err and err.count("\n") == 1
    assert not out.exists()

    # an OUT whose folder is a file (or missing) is refused before anything is merged
    (tmp_path / "afile").write_text("x")
    good = tmp_path / "good.safetensors"
    write_kohya(good, _targets(SD1_TARGETS, ["lora_te_text_model_encoder_layers_1_mlp_fc2"]), rank=2, alpha=2,
                seed=1, metadata=KOHYA_V1)
    rc, _, err = run_main("merge", base_path, tmp_path / "afile" / "o.safetensors", "--lora", good)
    assert rc == 1 and "afile is a file, not a folder; choose another OUT" in err
    rc, _, err = run_main("merge", base_path, tmp_path / "nodir" / "o.safetensors", "--lora", good)
    assert rc == 1 and "nodir does not exist" in err

    notsd = tmp_path / "vae.safetensors"
    save_file({"encoder.conv_in.weight": torch.zeros(2, 2)}, str(notsd))
    rc, _, err = run_main("merge", notsd, out, "--lora", bad)
    assert rc == 1 and "vae.safetensors" in err and "not an SD1.x/SD2.x/SDXL" in err

    # the real entry point: usage error -> 2, user error -> 1 with one line and no traceback
    r = run_cli("merge", base_path, out, "--lora", bad)
    assert r.returncode == 1 and "broken.safetensors" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("merge", base_path, out, "--lora", "a.safetensors", "--precision", "fp8")
    assert r.returncode == 2 and "invalid choice" in r.stderr


# ---------------------------------------------------------------------------------------------------- PEFT

def test_merge_peft_file_matches_peft_merge(ckpts, tmp_path):
    """A PEFT adapter on a diffusers UNet that holds the same weights as the tiny SD1 checkpoint (converted by
    diffusers' own ldm->diffusers converter, which also gives the key correspondence): the CLI merge of the saved
    adapter equals PEFT's LoraLayer.merge() (lora_alpha/r from `lora_adapter_metadata`, 1x1-conv proj_in)."""
    pytest.importorskip("peft")
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
    from peft.tuners.lora import LoraLayer

    base_path, base_sd = ckpts["sd1"]
    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 64, 128, 128), layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32)
    converted = convert_ldm_unet_checkpoint(base_sd, dict(unet.config))
    unet.load_state_dict(converted, strict=True)
    by_ptr = {v.data_ptr(): k for k, v in base_sd.items()}
    ldm_key = {dk: by_ptr[v.data_ptr()] for dk, v in converted.items()}  # diffusers key -> checkpoint key

    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.2"])
    unet = inject_adapter_in_model(cfg, unet)
    g = torch.Generator().manual_seed(21)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if ".lora_" in name:  # PEFT zero-inits lora_B
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    state = {f"unet.{k}": v.detach().clone().contiguous() for k, v in get_peft_model_state_dict(unet).items()}
    lora = tmp_path / "peft_unet.safetensors"
    save_file(state, str(lora), {"lora_adapter_metadata": json.dumps({"r": 4, "lora_alpha": 8})})

    mult = 0.7
    targets = {}
    with torch.no_grad():
        for name, mod in unet.named_modules():
            if isinstance(mod, LoraLayer):
                mod.scale_layer(mult)
                mod.merge()
                targets[ldm_key[f"{name}.weight"]] = mod.base_layer.weight.detach().clone()
    assert len(targets) == len(state) // 2 and any(t.ndim == 4 for t in targets.values())

    out = tmp_path / "peft-merged.safetensors"
    r = run_cli("merge", base_path, out, "--lora", f"{lora}:{mult}")
    assert r.returncode == 0, r.stderr
    n = len(targets)
    assert f"{n}/{n} modules matched" in r.stdout
    got = load_file(str(out))
    for k, base in base_sd.items():
        if k in targets:
            torch.testing.assert_close(got[k], targets[k], rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")
            assert not torch.equal(got[k], base)
        else:
            assert torch.equal(got[k], base), k
