"""The WebUI glue against a FAKE A1111 v1.10.1 (tests/fake_webui/modules, real names and signatures) with a fake
of the built-in Lora's module state, and a real tiny ldm SD1 model.

Startup is simulated the way A1111 does it (tests/fake_webui/glue_harness.py): scripts loaded by file path with the
extension root on sys.path only during the import (not in sys.modules), then initialize_rest clearing both
registries, then before_ui in reverse order (built-ins last: the built-in grabs `lora` after us) and app_started.
"""
import os
import sys
import types

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
FAKE = os.path.join(HERE, "fake_webui")

sys.path.insert(0, FAKE)
import glue_harness  # noqa: E402
import lora_files  # noqa: E402
import models  # noqa: E402  (tests/models.py: real ldm tiny SD1)

BUILTIN_LORA = glue_harness.BUILTIN_LORA
T = lora_files.SD1_TARGETS
UNET_Q = T["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"]
TE_Q = T["lora_te_text_model_encoder_layers_0_self_attn_q_proj"]
BUILTIN_LAYER = "diffusion_model_output_blocks_3_1_transformer_blocks_0_attn1_to_v"  # only the built-in touches it


def _write_loras(ns):
    lora_dir = ns.data / "models" / "Lora"
    ns.lora = lora_files.write_lora(str(lora_dir / "test_lora.safetensors"), seed=1,
                                    metadata={"ss_output_name": "test alias"})
    ns.other = lora_files.write_lora(str(lora_dir / "sub dir" / "other.safetensors"), seed=2, keys=list(T)[:2])
    ns.partial = lora_files.write_lora(str(lora_dir / "partial.safetensors"), seed=3, keys=list(T)[:1],
                                       extra_keys={"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_"
                                                   "attn1_to_zz": (32, 32)})
    ns.xl = lora_files.write_lora(  # SDXL-shaped (bigG TE2, 2048-wide cross-attention)
        str(lora_dir / "xl_only.safetensors"), seed=4, keys=[],
        metadata={"ss_base_model_version": "sdxl_base_v1-0"},
        extra_keys={"lora_te2_text_model_encoder_layers_0_self_attn_q_proj": (1280, 1280),
                    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k": (640, 2048)})
    (lora_dir / "corrupt.safetensors").write_bytes(b"\xff\x00\x00\x00\x00\x00\x00\x00{}")


@pytest.fixture(scope="module")
def webui(tmp_path_factory):
    """A started fake WebUI with the built-in Lora and LoRA Studio loaded; torn down completely afterwards."""
    with glue_harness.started_webui(tmp_path_factory.mktemp("webui-data"), lambda: models.make_sd1(seed=0),
                                    prepare=_write_loras) as ns:
        from lib_lora.apply.layers import layer_mapping
        ns.mapping = layer_mapping(ns.model)
        ns.original = {k: v.detach().clone() for k, v in ns.model.state_dict().items()}
        yield ns


def generate(ns, prompt, **kw):
    """process_images with our AlwaysVisible script attached; `sample` runs forwards of the built-in's layers."""
    p = ns.processing.StableDiffusionProcessingTxt2Img(prompt=prompt, **kw)
    p.scripts = ns.scripts.scripts_txt2img
    ns.processed = ns.processing.process_images(p, sample=lambda p: forward_some_layers(ns))
    return p


def forward_some_layers(ns):
    """What sampling does to layers: each forward goes through the built-in's class-patched forward."""
    with torch.no_grad():
        for name in (UNET_Q, TE_Q, BUILTIN_LAYER):
            mod = ns.mapping[name]
            mod(torch.randn(1, mod.in_features))


def weight(ns, name):
    return ns.mapping[name].weight.detach().clone()


def orig(ns, name):
    key = {UNET_Q: "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
           TE_Q: "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
           BUILTIN_LAYER: "model.diffusion_model.output_blocks.3.1.transformer_blocks.0.attn1.to_v.weight"}[name]
    return ns.original[key]


def assert_pristine(ns):
    state = ns.model.state_dict()
    changed = [k for k, v in ns.original.items() if not torch.equal(v, state[k])]
    assert not changed, f"not restored bit-exactly: {changed[:5]}"


# ------------------------------------------------------------------------------------------------ loading, settings

def test_script_loads_like_a1111(webui):
    ns = webui
    assert ns.lib_lora_after_load is not None
    assert os.path.dirname(os.path.dirname(ns.lib_lora_after_load.__file__)) == ROOT
    assert ROOT not in [os.path.abspath(p or ".") for p in sys.path]  # only during the import
    assert "lora_studio.py" not in sys.modules and "lora_studio" not in sys.modules
    cb = ns.script_callbacks.callback_map
    ours = {c.name for lst in cb.values() for c in lst if c.script.endswith("lora_studio.py")}
    main = os.path.basename(ROOT).lower()
    for cat in ("before_ui", "app_started", "model_loaded", "infotext_pasted", "script_unloaded"):
        assert f"{main}/lora_studio.py/{cat}" in ours
    assert any(s.__class__.__name__ == "LoraStudioScript" for s in ns.scripts.scripts_txt2img.alwayson_scripts)


def test_settings_section(webui):
    labels = webui.shared.opts.data_labels
    for key in ("lora_studio_take_over", "lora_studio_default_multiplier", "lora_studio_cache_mb",
                "lora_studio_show_all"):
        assert key in labels and labels[key].section == ("lora_studio", "LoRA Studio")
        assert labels[key].category_id == "sd"
    assert webui.shared.opts.lora_studio_take_over is True
    # (comment_after is HTML in the settings page: a raw <lora:…> there would vanish as an unknown tag)
    for key in ("lora_studio_take_over",):
        shown = labels[key].comment_after
        assert "&lt;lora:…&gt;" in shown and "<lora" not in shown and "<lorastudio" not in shown, shown


# ------------------------------------------------------------------------------------------------ registry

def test_takeover_after_initialize_rest(webui):
    ns = webui
    reg, aliases = ns.extra_networks.extra_network_registry, ns.extra_networks.extra_network_aliases
    assert getattr(reg["lora"], "lora_studio", None) is ns.session
    assert reg["lorastudio"] is reg["lora"] and aliases["lyco"] is reg["lora"]
    assert "hypernet" in reg  # register_default_extra_networks ran after the clearing
    # the built-in registered too (its before_ui ran last) and lost to our app_started re-registration
    assert ns.networks.extra_network_lora is not None and ns.networks.extra_network_lora is not reg["lora"]


def test_every_job_reclaims_the_registry(webui):
    ns = webui
    ns.extra_networks.register_extra_network(ns.networks.extra_network_lora)  # e.g. a late re-registration
    assert ns.extra_networks.extra_network_registry["lora"] is ns.networks.extra_network_lora
    generate(ns, "a cat")
    assert ns.extra_networks.extra_network_registry["lora"] is ns.session.network


# ------------------------------------------------------------------------------------------------ activation

def test_activate_apply_and_restore(webui):
    ns = webui
    p = generate(ns, "a cat <lora:test alias:0.8>")
    assert not torch.equal(weight(ns, UNET_Q), orig(ns, UNET_Q))
    assert not torch.equal(weight(ns, TE_Q), orig(ns, TE_Q))
    assert [r[0] for r in ns.session.status()["applied"]] == ["test alias"]
    h = ns.session.discovery.resolve("test_lora").hash
    assert p.extra_generation_params["Lora hashes"] == f"test alias: {h[:12]}"
    assert not p.comments, p.comments
    colon = ns.data / "models" / "Lora" / "style: v2.safetensors"
    lora_files.write_lora(str(colon), seed=12)
    ns.session.discovery.refresh()
    p = generate(ns, "a cat <lora:style: v2:1>")
    colon.unlink()
    ns.session.discovery.refresh()
    assert ("<lora:style: v2:1>: the text-encoder multiplier 'v2' is not a number (expected e.g. 0.8) (a LoRA file is "
            "named 'style: v2': ':' ends the name in a tag, so rename the file)" in p.comments), p.comments
    p = generate(ns, "a cat <LORA:test_lora:1> <Lyco:other:1>")
    assert "<LORA:…> is not read (tag kinds are lower case): write <lora:…>" in p.comments
    assert "<Lyco:…> is not read (tag kinds are lower case): write <lyco:…>" in p.comments
    p = generate(ns, "a cat <lora:test_lora:0.5> <lora:test_lora:1>")  # (a card clicked twice, a pasted prompt)
    assert "LoRA 'test_lora' is in the prompt 2 times: their weights add up (0.5 + 1 for the UNet)" in p.comments
    p = generate(ns, "a cat <lora:test_lora:0.5> <lora:test alias:0.5>")  # (name and alias of one file)
    assert "LoRA 'test_lora' and 'test alias' are one file: their weights add up" in p.comments
    # a changed multiplier re-merges from the originals (not on top of the previous merge)
    generate(ns, "a cat <lora:test_lora:0.4:0.4>")
    w04 = weight(ns, UNET_Q)
    generate(ns, "a cat <lora:test_lora:0.8>")
    generate(ns, "a cat <lora:test_lora:0.4:0.4>")
    assert torch.equal(weight(ns, UNET_Q), w04)
    # te=0 leaves the text encoder alone, unet=…
    generate(ns, "<lora:test_lora:0:1>")
    assert torch.equal(weight(ns, TE_Q), orig(ns, TE_Q)) and not torch.equal(weight(ns, UNET_Q), orig(ns, UNET_Q))
    # no tag: back to the originals, bit-exact
    p = generate(ns, "a cat")
    assert_pristine(ns)
    assert "Lora hashes" not in p.extra_generation_params


def test_add_network_to_prompt_adds_the_tag_once(webui):
    """sd_lora: we are registered as lora and lorastudio, so a prompt without tags activates us twice per pass."""
    ns = webui
    cached = ns.processing.StableDiffusionProcessing.cached_c
    generate(ns, "a cat")
    ns.shared.opts.data["sd_lora"] = "test_lora"  # (the built-in Lora's setting; not in the fake's table)
    try:
        # A1111 keys the cached conditioning by the prompt's own tags, which lack the added one: a change of
        # sd_lora must not meet conds computed without it (or with it, after it is switched off)
        cached[:] = [("a cat",), "conds without the LoRA"]
        p = generate(ns, "a cat", n_iter=2, enable_hr=True)
        assert cached == [None, None]
        cached[:] = [("a cat",), "conds with the LoRA"]
        generate(ns, "a cat")
        assert cached == [("a cat",), "conds with the LoRA"]  # (no change: kept)
    finally:
        del ns.shared.opts.data["sd_lora"]
    assert p.all_prompts == ["a cat<lora:test_lora:1.0>"] * 2
    assert p.all_hr_prompts == ["a cat<lora:test_lora:1.0>"] * 2  # ("Hires prompt" equals the prompt: not written)
    assert [r[0] for r in ns.session.status()["applied"]] == ["test_lora"]
    assert not torch.equal(weight(ns, UNET_Q), orig(ns, UNET_Q))
    generate(ns, "a cat")
    assert cached == [None, None]
    assert_pristine(ns)


def test_a_rewritten_file_under_the_same_name_drops_the_cached_conditioning(webui, tmp_path):
    """A1111 reuses a prompt's conditioning by prompt text; a retrained or re-downloaded file must not meet the
    old file's text-encoder part there, and its new hash is what the infotext says."""
    ns = webui
    path = ns.data / "models" / "Lora" / "swap.safetensors"
    lora_files.write_lora(str(path), seed=5)
    p = generate(ns, "a cat <lora:swap:1>")
    first_hash = p.extra_generation_params["Lora hashes"]
    cached = ns.processing.StableDiffusionProcessing.cached_c
    cached[:] = [("key",), "conds of the old file"]  # what A1111 keeps after a job (persistent_cond_cache)
    generate(ns, "a cat <lora:swap:1>")
    assert cached == [("key",), "conds of the old file"]  # same file: kept
    lora_files.write_lora(str(path), seed=6)
    os.utime(path, ns=(2_000_000_000, 2_000_000_000))  # (same size; the clock may not have ticked)
    p = generate(ns, "a cat <lora:swap:1>")
    assert cached == [None, None] and p.cached_c is cached
    assert p.extra_generation_params["Lora hashes"] != first_hash
    assert p.extra_generation_params["Lora hashes"].split(": ")[1] == ns.session.discovery.resolve("swap").shorthash
    os.remove(path)
    generate(ns, "")
    assert_pristine(ns)


def test_a_file_added_after_not_found_or_gone_since_drops_the_cached_conditioning(webui):
    """Seen in the audit: a tag that was 'not found' cached conds without its text-encoder part, and once the file
    was added the same prompt got only the UNet part while the infotext said it applied (and the reverse)."""
    ns = webui
    path = ns.data / "models" / "Lora" / "later.safetensors"
    cached = ns.processing.StableDiffusionProcessing.cached_c
    p = generate(ns, "a cat <lora:later:1>")
    assert "Lora hashes" not in p.extra_generation_params
    cached[:] = [("key",), "conds without the LoRA"]
    generate(ns, "a cat <lora:later:1>")
    assert cached == [("key",), "conds without the LoRA"]  # still missing: nothing changed, kept
    lora_files.write_lora(str(path), seed=5)
    ns.session.discovery.refresh()
    p = generate(ns, "a cat <lora:later:1>")
    assert cached == [None, None] and "later: " in p.extra_generation_params["Lora hashes"]
    cached[:] = [("key",), "conds with the LoRA"]
    os.remove(path)
    ns.session.discovery.refresh()
    generate(ns, "a cat <lora:later:1>")
    assert cached == [None, None]
    generate(ns, "")
    assert_pristine(ns)


def test_a_tag_in_the_negative_prompt_is_said_to_do_nothing(webui):
    """Seen in the audit: <lora:…> in the negative prompt stayed words for the text encoder, nothing said."""
    ns = webui
    p = generate(ns, "a cat", negative_prompt="ugly, <lora:test_lora:0.5>, <LyCo:other:1:te=0>")
    text = "\n".join(p.comments)
    assert ("<LyCo:other:1:te=0>, <lora:test_lora:0.5> in the negative prompt: not applied (LoRA tags work in the "
            "prompt only)" in text), text
    assert text.count("in the negative prompt:") == 1 and "Lora hashes" not in p.extra_generation_params
    p = generate(ns, "a cat", negative_prompt="ugly, <hypernet:x:1>")
    assert "negative prompt" not in "\n".join(p.comments)
    assert_pristine(ns)


def test_params_forms_and_subfolder_and_lyco(webui):
    ns = webui
    p = generate(ns, "x <lyco:sub dir/other:te=0.5:unet=1>")
    assert ns.session.status()["applied"] == [("sub dir/other", 0.5, 1.0, None)]
    assert "sub dir/other: " in p.extra_generation_params["Lora hashes"]
    generate(ns, "y")
    assert_pristine(ns)


def test_errors_are_reported_not_silent(webui, capsys):
    ns = webui
    p = generate(ns, "<lora:does_not_exist:1> <lora:partial:1> <lora:corrupt:1> <lora:xl_only:1> <lora:test_lora:x>",
                 n_iter=2)
    text = " ".join(p.comments)
    assert "LoRA not found: 'does_not_exist'" in text
    assert "LoRA 'partial' partly applied (1 of its 2 modules): 1 of its modules match no layer" in text
    assert "LoRA 'corrupt' not applied" in text and "corrupt.safetensors" in text
    assert "LoRA 'xl_only' not applied" in text and "SDXL" in text
    assert "not a number" in text  # <lora:test_lora:x>
    assert "LoRA Studio warnings" in p.extra_generation_params
    out = capsys.readouterr().out
    assert "LoRA Studio: LoRA not found: 'does_not_exist'" in out
    assert out.count("LoRA not found: 'does_not_exist'") == 1  # once per job, not per activation
    # the good part was still applied
    assert not torch.equal(weight(ns, UNET_Q), orig(ns, UNET_Q))
    generate(ns, "")
    assert_pristine(ns)


def test_what_could_not_be_applied_is_named_with_its_reason(webui, capsys):
    """A file that is no LoRA says what it is; a module that fails is not counted as applied and its layer is
    named; a module missing half its tensors is called incomplete, not unmatched; shared names and aliases say
    which files; the infotext carries no local folder."""
    ns = webui
    lib = ns.data / "models" / "Lora" / "odd"
    made = []
    from safetensors.torch import save_file

    def put(name, tensors, metadata=None):
        path = lib / name
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata=metadata)
        made.append(path)
    put("a_checkpoint.safetensors", {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3),
                                     "alphas_cumprod": torch.ones(10)})
    put("an_embedding.safetensors", {"emb_params": torch.zeros(2, 768)})
    put("a_vae.safetensors", {"encoder.down_blocks.0.resnets.0.conv1.weight": torch.zeros(4, 4, 3, 3),
                              "decoder.up_blocks.0.resnets.0.conv1.weight": torch.zeros(4, 4, 3, 3),
                              "quant_conv.weight": torch.zeros(8, 8, 1, 1)})  # (diffusers layout)
    put("unrelated.safetensors", {"foo.bar": torch.zeros(3), "foo.baz": torch.zeros(3)})
    os.symlink(lib / "a_checkpoint.safetensors", lib / "linked.safetensors")
    made.append(lib / "linked.safetensors")
    bad = lora_files.SD1_SHAPES.copy()
    bad[list(T)[0]] = (40, 32)  # one module's lora_up is 40 rows for a 32-row layer
    made.append(lib / "wrong_shape.safetensors")
    lora_files.write_lora(str(lib / "wrong_shape.safetensors"), seed=7, shapes=bad)
    made.append(lib / "no_up.safetensors")
    lora_files.write_lora(str(lib / "no_up.safetensors"), seed=8)
    from safetensors.torch import load_file
    t = load_file(str(lib / "no_up.safetensors"))
    del t[f"{list(T)[1]}.lora_up.weight"]
    put("no_up.safetensors", t, {"ss_network_module": "networks.lora"})
    for sub in ("x", "y"):
        made.append(lib / sub / "twin.safetensors")
        lora_files.write_lora(str(lib / sub / "twin.safetensors"), seed=9, metadata={"ss_output_name": "Shared"})
    for sub, md in (("p", {"ss_output_name": "PairP"}), ("q", {})):  # one stem, one of them with its own alias
        made.append(lib / sub / "pair.safetensors")
        lora_files.write_lora(str(lib / sub / "pair.safetensors"), seed=13, metadata=md)
    for sub in ("", "deep"):  # one in the folder's top level, one in a subfolder: the tag takes the subfolder's
        made.append(lib.parent / sub / "solo.safetensors")
        lora_files.write_lora(str(lib.parent / sub / "solo.safetensors"), seed=14)
    made.append(lib / "nan.safetensors")  # (a header like any other: the card cannot tell before a use)
    lora_files.write_lora(str(lib / "nan.safetensors"), seed=15)
    t = load_file(str(lib / "nan.safetensors"))
    t[f"{list(T)[0]}.lora_up.weight"][0, 0] = float("nan")
    put("nan.safetensors", t, {"ss_network_module": "networks.lora"})
    made.append(lib / "old.pt")
    (lib / "old.pt").write_bytes(b"\x80\x02}q\x00.")  # (refused by its extension, never unpickled)
    ns.session.discovery.refresh()
    try:
        p = generate(ns, "<lora:a_checkpoint:1> <lora:an_embedding:1> <lora:wrong_shape:1> <lora:no_up:1> "
                         "<lora:twin:1> <lora:Shared:1> <lora:TEST_LORA:1> <lora:nothing_like_it:1> <lora:old:1> "
                         "<lora:a_vae:1> <lora:linked:1> <lora:PairP:0.1> <lora:unrelated:1> <lora:solo:1> "
                         "<lora:nan:1> <lora:XL_only:1>")
        text = "\n".join(p.comments)
        assert "old.pt: '.pt' files are Python pickles" in text and "The built-in Lora does open them" in text
        assert ("LoRA 'a_checkpoint' not applied: a_checkpoint.safetensors: it is a full Stable Diffusion checkpoint, "
                "not a LoRA: move it to models/Stable-diffusion" in text), text
        assert "LoRA 'an_embedding' not applied: an_embedding.safetensors: it is a textual-inversion embedding" in text
        assert ("LoRA 'wrong_shape' partly applied (3 of its 4 modules): 1 layer(s) failed (e.g. "
                "diffusion_model_input_blocks_1_1_transformer_blocks_0_attn1_to_q:" in text), text
        assert "LoraError" not in text  # (a user-facing error's class name says nothing to a user)
        hashes = p.extra_generation_params["Lora hashes"]
        assert "wrong_shape: " in hashes and "a_checkpoint" not in hashes and "an_embedding" not in hashes
        assert f"LoRA 'no_up' partly applied (3 of its 4 modules): 1 module(s) are damaged or incomplete (e.g. {list(T)[1]}" in text
        no_up = text.split("LoRA 'no_up'")[1].split("\n")[0]
        assert "match no layer" not in no_up and no_up.count(list(T)[1]) == 1, no_up
        assert ("LoRA 'twin' names 2 files; used odd/y/twin (not odd/x/twin): write <lora:odd/x/twin:…> for the "
                "other" in text)
        # (the top-level file's relative path is its stem, which names the subfolder's: its file name reaches it)
        assert ("LoRA 'solo' names 2 files; used deep/solo (not solo): write <lora:solo.safetensors:…> for the "
                "other" in text), text
        assert ns.session.discovery.resolve("solo.safetensors").filename == str(lib.parent / "solo.safetensors")
        assert "'PairP' names" not in text  # (an alias reaches one file)
        assert ("LoRA 'Shared' is the name (ss_output_name) of several files (odd/x/twin, odd/y/twin): write the "
                "file's own name instead" in text), text
        assert "LoRA not found: 'TEST_LORA'" in text and "did you mean 'test_lora'?" in text  # (one name per file)
        assert "LoRA not found: 'XL_only'" in text and "did you mean" not in text.split("'XL_only'")[1].split("\n")[0]
        assert ns.session.discovery.near_names("XL_only") == ["xl_only"]  # (an SDXL file: no use to this model)
        assert "LoRA 'a_vae' not applied: a_vae.safetensors: it is a VAE, not a LoRA: move it to models/VAE" in text
        assert "LoRA 'linked' not applied: linked.safetensors: it is a full Stable Diffusion checkpoint" in text
        assert ("LoRA 'unrelated' not applied: unrelated.safetensors: none of its 2 tensor names (e.g. foo.bar, "
                "foo.baz) is a LoRA layer of SD1.x/SD2.x/SDXL" in text), text
        assert "unrelated" not in hashes
        assert "LoRA not found: 'nothing_like_it'" in text and "did you mean" not in text.split("nothing_like_it")[1]
        warned = p.extra_generation_params["LoRA Studio warnings"]
        assert str(ns.data) not in warned  # no local paths in images
        assert warned.index("'a_checkpoint'") < warned.index("'Shared'")  # in prompt order, not sorted
        assert "'nothing_like_it' was looked for in " + str(ns.data) in capsys.readouterr().out  # (the console)
        # the cards say it before anyone writes a tag
        made.append(lib / "colon: v2.safetensors")
        lora_files.write_lora(str(lib / "colon: v2.safetensors"), seed=10)
        page = next(x for x in ns.ui_extra_networks.extra_pages if x.name == "lora_studio")
        page.refresh()
        page.create_html("txt2img")
        cards = {k: v["description"] or "" for k, v in page.items.items()}
        # both same-named files have a card, each with a tag that reaches it
        assert page.items["solo"]["filename"] == str(lib.parent / "deep" / "solo.safetensors")
        top = page.items["solo.safetensors"]
        assert top["filename"] == str(lib.parent / "solo.safetensors") and "<lora:solo.safetensors:" in top["prompt"]
        # get-single-card (after a card edit) asks by the card id: each id gives its own file back
        from lib_lora.ui.cards import entry_for_item, item_name_for
        for entry in ns.session.discovery.entries():
            assert entry_for_item(ns.session.discovery, item_name_for(ns.session, entry)) is entry, entry.relname
        assert page.create_item("solo", enable_filter=False)["filename"] == str(lib.parent / "deep" / "solo.safetensors")
        assert page.create_item("solo.safetensors", enable_filter=False)["filename"] == str(lib.parent / "solo.safetensors")
        assert cards["a_checkpoint"].startswith("It is a full Stable Diffusion checkpoint, not a LoRA: move it to")
        assert cards["an_embedding"].startswith("It is a textual-inversion embedding, not a LoRA")
        assert cards["unrelated"].startswith("None of its 2 tensor names"), cards["unrelated"]
        assert cards["old"].startswith("A Python pickle: LoRA Studio does not open these")
        assert cards["corrupt"].startswith("Unreadable file: ")
        assert cards["colon: v2"].startswith("Rename this file: ':' or '>' in its name ends a <lora:…> tag")
        assert not cards["wrong_shape"] and not cards["no_up"]
        # refused on use: the card says so from then on (a restart too: the hash cache keeps it), until it changes
        assert cards["nan"].startswith("Not applied when last used: nan.safetensors: 1 tensor(s) hold NaN"), cards
        assert ns.session.discovery.cache.get(str(lib / "nan.safetensors"), *[
            getattr(os.stat(lib / "nan.safetensors"), k) for k in ("st_mtime", "st_size")])["damaged"]
        lora_files.write_lora(str(lib / "nan.safetensors"), seed=15)
        page.refresh()
        page.create_html("txt2img")
        assert not page.items["nan"]["description"]
    finally:
        for path in made:
            path.unlink(missing_ok=True)
        ns.session.discovery.refresh()
    generate(ns, "")
    assert_pristine(ns)


def test_bundled_embeddings_are_known_while_their_lora_is(webui):
    """sd-scripts can save textual-inversion embeddings inside a LoRA (bundle_emb.<name>.*); the built-in Lora
    registers them while the LoRA is in use, so must we (they were dropped without a word)."""
    ns = webui
    from safetensors.torch import load_file, save_file
    db = ns.sd_hijack.model_hijack.embedding_db
    path = ns.data / "models" / "Lora" / "with_emb.safetensors"
    lora_files.write_lora(str(path), seed=11)
    t = load_file(str(path))
    vec = torch.randn(2, 768)
    t["bundle_emb.svsdog.string_to_param.*"] = vec
    t["bundle_emb.wide.string_to_param.*"] = torch.randn(1, 1024)  # an SD2-width one: not for this model
    save_file(t, str(path), metadata={"ss_network_module": "networks.lora"})
    mine = ns.textual_inversion.Embedding(torch.zeros(1, 768), "mine")
    db.word_embeddings["mine"] = mine  # loaded from the embeddings folder
    t2 = dict(t)
    t2["bundle_emb.mine.string_to_param.*"] = torch.randn(1, 768)
    save_file(t2, str(path.with_name("clash.safetensors")), metadata={"ss_network_module": "networks.lora"})
    ns.session.discovery.refresh()
    try:
        p = generate(ns, "a svsdog <lora:with_emb:1>")
        emb = db.word_embeddings["svsdog"]
        assert torch.equal(emb.vec, vec) and str(emb.shorthash) == "with_emb"  # TI hashes: "svsdog: with_emb"
        assert "wide" not in db.word_embeddings
        assert any("bundled embedding 'wide' is for another model (width 1024, this model's text encoder takes 768)"
                   in c for c in p.comments), p.comments
        assert not any("with_emb' not applied" in c for c in p.comments)
        generate(ns, "a svsdog <lora:with_emb:0.5>")  # the same file again: its embedding is not built again
        assert db.word_embeddings["svsdog"] is emb
        p = generate(ns, "a mine <lora:clash:1>")
        assert db.word_embeddings["mine"] is mine and "svsdog" in db.word_embeddings  # (clash bundles it too)
        assert any("bundled embedding 'mine' is not used: an embedding of that name is already loaded" in c
                   for c in p.comments)
        assert db.word_embeddings["svsdog"] is not emb  # (clash's own svsdog: another file's)
        generate(ns, "a svsdog")  # no LoRA: its embeddings go with it, the folder's stays
        assert "svsdog" not in db.word_embeddings and db.word_embeddings["mine"] is mine
    finally:
        db.word_embeddings.pop("mine", None)
        path.unlink()
        path.with_name("clash.safetensors").unlink()
        ns.session.discovery.refresh()
    assert_pristine(ns)


def test_hires_pass_merges_hashes(webui):
    ns = webui
    p = generate(ns, "a <lora:test_lora:1>", enable_hr=True, hr_prompt="b <lora:other:1>")
    hashes = p.extra_generation_params["Lora hashes"]
    assert "test_lora: " in hashes and "other: " in hashes
    generate(ns, "")
    assert_pristine(ns)


def test_disable_extra_networks_restores(webui):
    ns = webui
    generate(ns, "<lora:test_lora:1>")
    assert not torch.equal(weight(ns, UNET_Q), orig(ns, UNET_Q))
    generate(ns, "<lora:test_lora:1>", disable_extra_networks=True)
    assert_pristine(ns)


# ------------------------------------------------------------------------------------------------ the built-in

def _builtin_network(ns):
    import network
    net = network.Network("builtin_net")
    delta = torch.full_like(orig(ns, BUILTIN_LAYER), 0.5)
    net.modules = {BUILTIN_LAYER: network.FixedDeltaModule(net, delta), UNET_Q: network.FixedDeltaModule(
        net, torch.full_like(orig(ns, UNET_Q), 0.25))}
    ns.networks.fake_files["builtin_net"] = net
    return net


def test_builtin_neutralised_on_takeover(webui):
    ns = webui
    _builtin_network(ns)
    shared = ns.shared
    # 1. take-over off: the built-in owns <lora:…> and merges lazily in its patched forwards
    assert shared.opts.set("lora_studio_take_over", False)
    assert ns.extra_networks.extra_network_registry["lora"] is ns.networks.extra_network_lora
    generate(ns, "<lora:builtin_net:1>")
    assert torch.equal(weight(ns, BUILTIN_LAYER), orig(ns, BUILTIN_LAYER) + 0.5)
    assert ns.mapping[BUILTIN_LAYER].network_current_names != ()
    # 2. take-over on with its state left behind: our activation puts its layers back and keeps it idle
    assert shared.opts.set("lora_studio_take_over", True)
    assert ns.networks.loaded_networks == []
    generate(ns, "<lora:test_lora:1>")
    assert ns.networks.loaded_networks == []
    for name in (BUILTIN_LAYER, UNET_Q):
        mod = ns.mapping[name]
        assert getattr(mod, "network_current_names", ()) == ()
        assert getattr(mod, "network_weights_backup", None) is None
    assert torch.equal(weight(ns, BUILTIN_LAYER), orig(ns, BUILTIN_LAYER))  # its delta is gone
    ours = weight(ns, UNET_Q)
    assert not torch.equal(ours, orig(ns, UNET_Q))
    forward_some_layers(ns)  # its patched forwards now do nothing
    assert torch.equal(weight(ns, UNET_Q), ours)
    # 3. restore gives the true originals (not its stale copy, not ours)
    generate(ns, "")
    assert_pristine(ns)


def test_without_takeover_lorastudio_tag_and_conflict(webui):
    ns = webui
    _builtin_network(ns)
    shared = ns.shared
    assert shared.opts.set("lora_studio_take_over", False)
    try:
        p = generate(ns, "<lorastudio:test_lora:1>")
        assert not torch.equal(weight(ns, TE_Q), orig(ns, TE_Q))
        assert "LoRA Studio hashes" in p.extra_generation_params and "Lora hashes" not in p.extra_generation_params
        # both in one generation: ours steps back (two owners can't both restore one weight), the built-in applies
        p = generate(ns, "<lorastudio:test_lora:1> <lora:builtin_net:1>")
        assert any("LoRA Studio tags were ignored" in c for c in p.comments)
        assert torch.equal(weight(ns, TE_Q), orig(ns, TE_Q))
        assert torch.equal(weight(ns, BUILTIN_LAYER), orig(ns, BUILTIN_LAYER) + 0.5)
        # and then ours alone again: the built-in's merge is undone first
        generate(ns, "<lorastudio:test_lora:1>")
        assert torch.equal(weight(ns, BUILTIN_LAYER), orig(ns, BUILTIN_LAYER))
        generate(ns, "")
        assert_pristine(ns)
    finally:
        shared.opts.set("lora_studio_take_over", True)
        generate(ns, "")


# ------------------------------------------------------------------------------------------------ model reloads

def test_model_reload_and_vae_reload(webui):
    ns = webui
    from modules import sd_vae
    generate(ns, "<lora:test_lora:1>")
    merged = weight(ns, UNET_Q)
    # VAE change fires on_model_loaded too; UNet/TE weights are untouched: the merge must survive and restore later
    sd_vae.reload_vae_weights(ns.model)
    generate(ns, "<lora:test_lora:1>")
    assert torch.equal(weight(ns, UNET_Q), merged)
    # same-config checkpoint reload into the same modules: weights are fresh, old backups must be forgotten
    ns.sd_models.reload_model_weights(ns.model, info=ns.original)
    assert_pristine(ns)
    generate(ns, "<lora:test_lora:1>")
    assert torch.equal(weight(ns, UNET_Q), merged)  # merged once onto the fresh weights, not twice
    generate(ns, "")
    assert_pristine(ns)


# ------------------------------------------------------------------------------------------------ infotext

def test_infotext_paste_resolves_by_hash(webui):
    ns = webui
    entry = ns.session.discovery.resolve("test_lora")
    h = ns.session.discovery.read_hash(entry)
    params = {"Prompt": "a cat <lora:somebody elses name:0.7>, <lora:unknown:1>",
              "Lora hashes": f"somebody elses name: {h[:12]}, unknown: 000000000000"}
    ns.script_callbacks.infotext_pasted_callback("…", params)
    assert params["Prompt"] == "a cat <lora:test alias:0.7>, <lora:unknown:1>"
    # a copy of that file under another name: a tag that already reaches a file of the hash is left as written
    import shutil
    copy = ns.data / "models" / "Lora" / "a copy.safetensors"
    shutil.copy(entry.filename, copy)
    ns.session.discovery.refresh()
    # the built-in has hashed test_lora once (take-over off): its own paste callback would rename the tag first
    ns.networks.available_network_hash_lookup[h[:12]] = types.SimpleNamespace(get_alias=lambda: "test alias")
    try:
        params = {"Prompt": "<lora:a copy:1>", "Lora hashes": f"a copy: {h[:12]}"}
        ns.script_callbacks.infotext_pasted_callback("…", params)
        assert params["Prompt"] == "<lora:a copy:1>"
        assert ns.shared.opts.set("lora_studio_take_over", False)
        try:  # with the built-in in charge, its renaming is back
            params = {"Prompt": "<lora:a copy:1>", "Lora hashes": f"a copy: {h[:12]}"}
            ns.script_callbacks.infotext_pasted_callback("…", params)
            assert params["Prompt"] == "<lora:test alias:1>"
        finally:
            ns.shared.opts.set("lora_studio_take_over", True)
    finally:
        ns.networks.available_network_hash_lookup.clear()
        copy.unlink()
        ns.session.discovery.refresh()


# ------------------------------------------------------------------------------------------------ cards

def test_cards(webui):
    ns = webui
    page = next(x for x in ns.ui_extra_networks.extra_pages if x.name == "lora_studio")
    assert page.title == "LoRA Studio" and page.extra_networks_tabname == "lora_studio"
    lora_files.write_user_metadata(ns.lora, activation_text="trigger word", preferred_weight=0.6,
                                   negative_text="ugly", description="my desc")
    preview = os.path.splitext(ns.lora)[0] + ".preview.png"
    open(preview, "wb").write(b"\x89PNG")
    page.refresh()
    page.create_html("txt2img")
    items = page.items
    assert "xl_only" not in items  # SDXL card hidden while an SD1 model is loaded
    item = items["test_lora"]
    entry = ns.session.discovery.resolve("test_lora")
    assert item["filename"] == entry.filename and item["shorthash"] == entry.shorthash
    assert item["preview"].startswith("./sd_extra_networks/thumb?filename=") and ".preview.png" in item["preview"]
    q = ns.ui_extra_networks.quote_js
    assert item["prompt"] == q("<lora:test alias:") + " + 0.6 + " + q(">") + " + " + q(" trigger word")
    assert item["negative_prompt"] == q("(ugly:1)")
    assert item["description"] == "my desc"
    assert item["search_terms"][0].endswith(os.path.join("Lora", "test_lora.safetensors"))
    assert item["sort_keys"]["default"] is not None and "name" in item["sort_keys"]
    assert item["metadata"]["ss_output_name"] == "test alias" and item["sd_version"] == "SD1"
    other = items["other"]
    assert other["prompt"].startswith(q("<lora:other:") + " + (opts.lora_studio_default_multiplier")
    # the card tag resolves back to its own file even for a shadowed stem
    assert ns.session.discovery.resolve("other").relname == "sub dir/other"
    ns.shared.opts.set("lora_studio_show_all", True)
    try:
        page.create_html("txt2img")
        assert "xl_only" in page.items
        assert page.create_item("xl_only", enable_filter=True)["sd_version"] == "SDXL"
    finally:
        ns.shared.opts.set("lora_studio_show_all", False)
    assert page.create_item("xl_only", enable_filter=False) is not None  # get-single-card path
    # every card hidden by the family filter: said so, not A1111's "Nothing here. Add some content to ..."
    flags = {k: getattr(ns.model, k, None) for k in ("is_sd1", "is_sd2", "is_sdxl")}
    ns.model.is_sd1, ns.model.is_sd2, ns.model.is_sdxl = False, True, False
    hide = ns.shared.opts.data.get("lora_hide_unknown_for_versions")
    ns.shared.opts.data["lora_hide_unknown_for_versions"] = ["SD2"]  # (the unreadable file's card too)
    try:
        html_page = page.create_html("txt2img")
        assert not page.items, list(page.items)
        n = len(ns.session.discovery.entries())
        assert (f"{n} LoRA file(s) here are for another model family than the loaded SD2 checkpoint" in html_page
                and "Nothing here" not in html_page), html_page
    finally:
        for k, v in flags.items():
            setattr(ns.model, k, v)
        ns.shared.opts.data["lora_hide_unknown_for_versions"] = hide
    html_page = page.create_html("txt2img")
    assert page.items and "No LoRA for the loaded" not in html_page and "data-name" in html_page
    # folder buttons: A1111 makes one of every subfolder; ours only of those that hold a LoRA
    samples = ns.data / "models" / "Lora" / "my dataset" / "10_svs cat"
    samples.mkdir(parents=True)
    (samples / "a.png").write_bytes(b"\x89PNG")
    try:
        every = super(type(page), page).create_dirs_view_html("txt2img")
        ours = page.create_dirs_view_html("txt2img")
        assert "my dataset/" in every and "10_svs cat" in every and "sub dir/" in every
        assert "my dataset" not in ours and "10_svs cat" not in ours and "sub dir/" in ours and ">\n        all" in ours
        from lib_lora.ui.cards import only_lora_folders
        b = "".join(f"<button class='x{' search-all' if n == 'all' else ''}'>\n {n}\n </button>"
                    for n in ("all", "a/", "a/b/", "a/c/", "d &amp; e/", "empty"))
        kept = only_lora_folders(b, ["a/b/x", "d & e/y", "top"])
        assert [m for m in ("all", "a/", "a/b/", "a/c/", "d &amp; e/", "empty") if f" {m}\n" in kept] == \
            ["all", "a/", "a/b/", "d &amp; e/"]
    finally:
        import shutil
        shutil.rmtree(ns.data / "models" / "Lora" / "my dataset")
    assert os.path.abspath(ns.shared.cmd_opts.lora_dir) in ns.ui_extra_networks.allowed_dirs


def test_a_checkpoint_switch_redraws_the_card_pages_on_the_next_page_load(webui):
    """From the real WebUI: A1111 draws the card pages on the first page load and hands every later one that
    drawing, so after switching to another model family a fresh page still listed the old family's cards (its own
    Lora page too) until the refresh button. A model load now drops the drawing: the next page load draws anew."""
    ns = webui
    uen = ns.ui_extra_networks
    assert getattr(uen.create_ui, "_lora_studio_uis", None) is not None  # wrapped in before_ui
    ui = uen.create_ui(None, [], "txt2img")
    page_index = next(i for i, p in enumerate(ui.stored_extra_pages) if p.name == "lora_studio")
    first = ui.pages_html()[page_index]
    assert "test_lora" in first and "xl_only" not in first
    assert ui.pages_html()[page_index] is first  # (later page loads: the same drawing)
    # what the drawing depends on changes (here: show every family), then a model loads
    ns.shared.opts.set("lora_studio_show_all", True)
    try:
        assert "xl_only" not in ui.pages_html()[page_index]  # (without a model load: the old drawing)
        ns.session.on_model_loaded(ns.model)
        assert ui.pages_contents == []
        assert "xl_only" in ui.pages_html()[page_index]
    finally:
        ns.shared.opts.set("lora_studio_show_all", False)
        ns.session.on_model_loaded(ns.model)

# ------------------------------------------------------------------------------------------------ Forge, reload

def test_forge_detection(webui, capsys):
    ns = webui
    sys.modules["ldm_patched"] = types.ModuleType("ldm_patched")
    try:
        from lib_lora.host.session import Session
        s = Session()
        assert s.forge and s.tag_kind == "lora"
        before = dict(ns.extra_networks.extra_network_registry)
        s.before_ui()
        s.app_started()
        assert ns.extra_networks.extra_network_registry == before  # no network registered on Forge
        assert s.page is not None and s.page.name == "lora_studio"
        out = capsys.readouterr().out
        assert "Forge" in out and "cards and file tools work" in out and "stays with Forge's own LoRA" in out
    finally:
        del sys.modules["ldm_patched"]
        ns.ui_extra_networks.extra_pages[:] = [x for x in ns.ui_extra_networks.extra_pages if x is not s.page]
        ns.ui_extra_networks.register_page(ns.session.page)


def test_reload_ui_restores_and_new_session_takes_over(webui):
    ns = webui
    from modules import initialize
    import webui as fake_startup
    generate(ns, "<lora:test_lora:1>")
    old = ns.session
    ns.shared.opts.reorder()  # as after startup: data_labels is no longer options_templates
    ns.script_callbacks.script_unloaded_callback()  # Reload UI: our shutdown restores weights
    assert_pristine(ns)
    from modules import devices
    assert not hasattr(devices.test_for_nans, "_lora_studio_note")  # (A1111's own NaN check back)
    initialize.initialize_rest([BUILTIN_LORA, ROOT], reload_script_modules=True)
    fake_startup.start()
    ns.script_module = glue_harness.script_module()
    ns.session = ns.script_module.session
    assert devices.test_for_nans._lora_studio_note[0] == ns.session.nan_note
    ns.networks = sys.modules["networks"]
    assert ns.session is not old
    assert ns.extra_networks.extra_network_registry["lora"] is ns.session.network
    generate(ns, "<lora:test_lora:1>")
    assert not torch.equal(weight(ns, UNET_Q), orig(ns, UNET_Q))
    generate(ns, "")
    assert_pristine(ns)
    # the live setting's onchange belongs to the new session (not the unloaded one)
    reg = ns.extra_networks.extra_network_registry
    ns.shared.opts.set("lora_studio_take_over", False)
    assert reg["lora"] is ns.networks.extra_network_lora and reg["lorastudio"] is ns.session.network
    ns.shared.opts.set("lora_studio_take_over", True)
    assert reg["lora"] is ns.session.network


def test_a1111_nan_error_names_the_loras_to_suspect(webui):
    """A1111 stops a NaN job advising --disable-nan-check; with LoRAs applied, its message names them (a far-out
    weight as the likely cause), and its own text and exception class stay (its fp32-VAE retry catches that)."""
    ns = webui
    from modules import devices

    def nan_job(prompt):
        p = ns.processing.StableDiffusionProcessingTxt2Img(prompt=prompt)
        p.scripts = ns.scripts.scripts_txt2img
        with pytest.raises(devices.NansException) as e:
            ns.processing.process_images(p, sample=lambda p: [torch.full((1, 4, 8, 8), float("nan"))])
        return str(e.value)
    said = nan_job("a cat <lora:test_lora:8>")
    assert said.startswith("A tensor with NaNs was produced in Unet. Use --disable-nan-check"), said
    assert said.endswith("LoRA Studio: <lora:test_lora:8> has a weight far outside the usual -2 to 2, the "
                         "likely cause: lower it and generate again (--disable-nan-check would only hide a black "
                         "image)."), said
    said = nan_job("a cat <lora:test_lora:0.8>")
    assert "LoRA Studio: this image applied <lora:test_lora:0.8>; if the prompt works without it, it is" in said, said
    assert "LoRA Studio" not in nan_job("a cat")  # (nothing applied: A1111's words alone)
    # a file of finite but absurd values (a diverged run's save) is applied with a warning, and named as the cause
    from safetensors.torch import load_file, save_file
    t = load_file(ns.lora)
    t[next(k for k in sorted(t) if k.endswith("lora_up.weight"))][0, 0] = 3e18
    diverged = ns.data / "models" / "Lora" / "diverged.safetensors"
    save_file(t, str(diverged), metadata={"ss_network_module": "networks.lora"})
    ns.session.discovery.refresh()
    try:
        p = generate(ns, "a cat <lora:diverged:0.8>")
        assert any("LoRA 'diverged': 1 tensor(s) hold values up to 3e+18" in c and "training run that diverged" in c
                   for c in p.comments), p.comments
        assert nan_job("a cat <lora:diverged:0.8>").endswith(
            "LoRA Studio: <lora:diverged:0.8>: its file holds values far beyond a LoRA's (saved from a training run "
            "that diverged), the likely cause: use an earlier epoch's file.")
    finally:
        diverged.unlink()
        ns.session.discovery.refresh()
    # a reload of the extension does not wrap the check twice
    wrapper = devices.test_for_nans
    ns.session.host.explain_nans(ns.session.nan_note)
    assert devices.test_for_nans is wrapper and not hasattr(wrapper.__wrapped__, "__wrapped__")
    generate(ns, "")
    assert_pristine(ns)
    ns.session.host.explain_nans(None)  # (what the extension's unload does)
    assert devices.test_for_nans is wrapper.__wrapped__
    ns.session.host.explain_nans(ns.session.nan_note)
