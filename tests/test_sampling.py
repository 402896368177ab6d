"""Headless sampler: sd-scripts prompt files, closed-form checks of DDIM / PLMS / Euler, determinism on the tiny
model. (k-diffusion's own samplers as the reference: test_sampling_kdiffusion.py.)"""

import math
import os

import numpy as np
import pytest
import torch

from lib_lora.train.sampling import (KSchedule, SamplePromptError, a1111_timesteps, ddim_sample, k_denoiser, k_sample,
                                     load_prompt_file, make_sample_fn, parse_prompt_line, parse_prompt_text,
                                     plms_sample)


# ----------------------------------------------------------------------------------------------- prompt files

def test_prompt_line_with_every_option():
    sp = parse_prompt_line("masterpiece, svs cat --n low quality, blurry --w 768 --h 512 --s 20 --d 42 --l 6.5 "
                           "--ss euler_a")
    assert sp.prompt == "masterpiece, svs cat"
    assert sp.negative == "low quality, blurry"
    assert (sp.width, sp.height, sp.steps, sp.seed, sp.cfg_scale) == (768, 512, 20, 42, 6.5)
    assert sp.sampler == "euler_a" and not sp.notes  # A1111's Euler a, headless too
    assert any("DPM++ 2M" in n for n in parse_prompt_line("a cat --ss dpmsolver++").notes)  # another algorithm


def test_prompt_defaults_are_sd_scripts_defaults():
    sp = parse_prompt_line("a cat")
    assert (sp.width, sp.height, sp.steps, sp.seed, sp.cfg_scale, sp.negative) == (512, 512, 30, None, 7.5, "")


def test_prompt_options_are_case_insensitive_and_sizes_round_like_sd_scripts():
    sp = parse_prompt_line("a cat --W 100 --H 30 --S 5000")
    assert (sp.width, sp.height) == (96, 64)   # max(64, n - n % 8)
    assert sp.steps == 1000                    # clamped to 1..1000
    assert len(sp.notes) == 2


def test_comments_and_blank_lines_are_skipped():
    prompts = parse_prompt_text("# my prompts\n\n  # indented comment\na cat --d 1\n\nthe dog --d 2\n", "p.txt")
    assert [p.prompt for p in prompts] == ["a cat", "the dog"]
    assert prompts[1].where == "p.txt:6"


@pytest.mark.parametrize("line, message", [
    ("a cat --w big", "p.txt:1: --w needs a whole number, got 'big'"),
    ("a cat --l x", "--l needs a number"),
    ("a cat --ss ddpm_fancy", "unknown sampler 'ddpm_fancy'"),
    ("a cat --d", "--d needs a value"),
])
def test_bad_lines_name_file_line_and_problem(line, message):
    with pytest.raises(SamplePromptError, match="p.txt:1") as e:
        parse_prompt_text(line, "p.txt")
    assert message in str(e.value)


def test_options_for_other_models_and_unknown_ones_are_notes_as_sd_scripts_skips_them():
    """A prompt file of newer sd-scripts (--cn, --ctr ... for other models) was refused."""
    sp = parse_prompt_text("a cat --cn control.png --ctr 0.5 --q 3 --w 64", "p.txt")[0]
    assert (sp.prompt, sp.width) == ("a cat", 64)
    assert sp.notes == ["p.txt:1: --cn (ControlNet image) ignored for SD models, as sd-scripts does",
                        "p.txt:1: --ctr (CFG truncation) ignored for SD models, as sd-scripts does",
                        "p.txt:1: unknown option --q ignored (known: --n negative, --w width, --h height, --s steps, "
                        "--d seed, --l cfg scale, --ss sampler)"]


def test_all_bad_lines_reported_together(tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("ok --d 1\nbad --w x\nalso ok\nbad --s y\n", encoding="utf-8")
    with pytest.raises(SamplePromptError) as e:
        load_prompt_file(f)
    msg = str(e.value)
    assert "2 problem(s)" in msg and "prompts.txt:2" in msg and "prompts.txt:4" in msg


def test_toml_and_json_prompt_files(tmp_path):
    t = tmp_path / "p.toml"
    t.write_text('[prompt]\nsample_steps = 12\nwidth = 64\nheight = 64\n'
                 '[[prompt.subset]]\nprompt = "a cat"\nseed = 3\n'
                 '[[prompt.subset]]\nprompt = "a dog"\nnegative_prompt = "ugly"\nscale = 4.0\n', encoding="utf-8")
    a, b = load_prompt_file(t)
    assert (a.prompt, a.steps, a.width, a.seed) == ("a cat", 12, 64, 3)
    assert (b.negative, b.cfg_scale, b.steps) == ("ugly", 4.0, 12)
    j = tmp_path / "p.json"
    j.write_text('[{"prompt": "a cat", "sample_steps": 7}, "a dog --d 9"]', encoding="utf-8")
    a, b = load_prompt_file(j)
    assert a.steps == 7 and b.seed == 9
    j.write_text('[{"prompt": "a cat", "stepz": 7}]', encoding="utf-8")
    with pytest.raises(SamplePromptError, match="unknown key"):
        load_prompt_file(j)


def test_empty_or_missing_file_is_an_error(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("# nothing\n\n", encoding="utf-8")
    with pytest.raises(SamplePromptError, match="no prompts"):
        load_prompt_file(f)
    with pytest.raises(SamplePromptError, match="not found"):
        load_prompt_file(tmp_path / "missing.txt")


# ----------------------------------------------------------------------------------------------- closed-form checks

def _sd_alphas_cumprod():
    # SD's "scaled linear" schedule written out independently of ldm: beta = linspace(sqrt .00085, sqrt .012)^2
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
    return torch.tensor(np.cumprod(1 - betas))


def euler_sample(eps_fn, ac, noise, steps):
    schedule = KSchedule(ac)
    sigmas = schedule.for_sampler("Euler", steps)
    return k_sample("Euler", k_denoiser(eps_fn, schedule), noise * sigmas[0], sigmas)


def test_timesteps_are_a1111s():
    # sd_samplers_timesteps.get_timesteps: clip(range(0, 1000, 1000 // steps) + 1, 0, 999)
    assert a1111_timesteps(20) == list(range(1, 1000, 50))
    assert len(a1111_timesteps(30)) == 31 and a1111_timesteps(30)[-1] == 991  # (1000 // 30 = 33)
    assert a1111_timesteps(1) == [1]


def test_oracle_eps_lands_where_a1111s_samplers_end():
    """A model that returns the true noise of x_t (given the known x0): Euler lands on x0; A1111's DDIM and PLMS
    walk its timesteps down to the lowest, t = 1 (one model call fewer than timesteps, as A1111 1.10 does), and
    land on sqrt(a_1) x0 + sqrt(1 - a_1) eps there."""
    ac = _sd_alphas_cumprod().float()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    noise = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    a1 = float(ac[1])
    for run, steps, calls_wanted in ((ddim_sample, 20, 19), (ddim_sample, 30, 30), (plms_sample, 20, 20)):
        calls = []

        def eps_ddim(x, t, a):  # x = sqrt(a) x0 + sqrt(1-a) eps  =>  eps = (x - sqrt(a) x0) / sqrt(1-a)
            calls.append(t)
            return (x - math.sqrt(a) * x0) / math.sqrt(1 - a)

        a_T = float(ac[a1111_timesteps(steps)[-1]])
        xT = math.sqrt(a_T) * x0 + math.sqrt(1 - a_T) * noise
        out = run(eps_ddim, ac, xT, steps)
        torch.testing.assert_close(out, math.sqrt(a1) * x0 + math.sqrt(1 - a1) * noise, rtol=0, atol=1e-10)
        assert len(calls) == calls_wanted and calls[0] == a1111_timesteps(steps)[-1]

    calls = []

    def eps_euler(x_in, t, a):  # the model sees x_in = x / sqrt(1 + sigma^2) = sqrt(a) (x0 + sigma eps)
        calls.append(t)
        return (x_in - math.sqrt(a) * x0) / math.sqrt(1 - a)

    out = euler_sample(eps_euler, ac, noise, 7)
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-5)
    assert calls[0] == pytest.approx(999) and calls[-1] == pytest.approx(0, abs=1e-3) and len(calls) == 7


def test_gaussian_data_matches_probability_flow_closed_form():
    """Data ~ N(0, s^2): the ideal denoiser is D(x) = s^2/(s^2+sigma^2) x, and the probability-flow ODE maps
    x(sigma_T) to x(sigma) = x(sigma_T) * sqrt(s^2 + sigma^2) / sqrt(s^2 + sigma_T^2). Euler, Heun, LMS, DPM2 and
    DPM++ 2M solve that ODE to sigma 0, DDIM and PLMS (in the scaled variable sqrt(a) x) to A1111's last timestep."""
    ac = _sd_alphas_cumprod().float()
    s = 0.5
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def eps_gauss(x_in, t, a):  # eps = (x - D(x)) / sigma in sigma-space, x = x_in / sqrt(a)
        sig2 = (1 - a) / a
        x = x_in / math.sqrt(a)
        return x * math.sqrt(sig2) / (s * s + sig2)

    schedule = KSchedule(ac)
    for label, steps, tol in (("Euler", 400, 0.02), ("Heun", 60, 0.005), ("LMS", 100, 0.005),
                              ("DPM2", 60, 0.005), ("DPM++ 2M", 60, 0.005)):
        sigmas = schedule.for_sampler(label, steps)
        sig_max = float(sigmas[0])
        want = noise * sig_max * s / math.sqrt(s * s + sig_max ** 2)
        out = k_sample(label, k_denoiser(eps_gauss, schedule), noise * sigmas[0], sigmas)
        torch.testing.assert_close(out, want, rtol=tol, atol=tol, msg=label)

    ts = a1111_timesteps(500)
    a_T, a_1 = float(ac[ts[-1]]), float(ac[ts[0]])
    xT = noise  # DDIM's x_T is the scaled variable sqrt(a_T) * x(sigma_T)
    sig_T2, sig_12 = (1 - a_T) / a_T, (1 - a_1) / a_1
    want = math.sqrt(a_1) * (xT / math.sqrt(a_T)) * math.sqrt(s * s + sig_12) / math.sqrt(s * s + sig_T2)
    for run in (ddim_sample, plms_sample):
        torch.testing.assert_close(run(eps_gauss, ac, xT, 500), want, rtol=0.02, atol=0.01)


# ----------------------------------------------------------------------------------------------- on the tiny model

@pytest.fixture(scope="module")
def host():
    from lib_lora.host.base import ModelHost
    from lib_lora.host.tiny import make_tiny_sd15
    return ModelHost(make_tiny_sd15(seed=5), "tiny")


def test_ddim_on_the_tiny_model_is_deterministic_per_seed(host, tmp_path):
    from lib_lora.train.config import parse_train_config
    f = tmp_path / "p.txt"
    f.write_text("svs cat --w 64 --h 64 --s 6 --d 11 --n blurry\nsvs cat --w 64 --h 64 --s 6 --d 12\n",
                 encoding="utf-8")
    cfg = parse_train_config({"sample_prompts": str(f), "output_name": "svs", "sample_every_n_epochs": 1})
    fn = make_sample_fn(host, cfg, str(tmp_path))
    paths = fn(epoch=2, step=10)
    assert [p.rsplit("/", 1)[1] for p in paths] == ["svs_e000002_00.png", "svs_e000002_01.png"]
    from PIL import Image
    a = [np.asarray(Image.open(p)) for p in paths]
    again = [np.asarray(Image.open(p)) for p in fn(epoch=3, step=20)]
    assert a[0].shape == (64, 64, 3)
    assert all(np.array_equal(x, y) for x, y in zip(a, again))    # same seed, same image
    assert not np.array_equal(a[0], a[1])                          # other seed, other image
    info = Image.open(paths[0]).text["parameters"]
    assert "Negative prompt: blurry" in info and "Seed: 11" in info and "Sampler: DDIM" in info


def test_the_configs_sampler_is_a1111s_with_its_schedule_and_clip_skip_in_the_infotext(host, tmp_path):
    from PIL import Image

    from lib_lora.train.config import parse_train_config
    f = tmp_path / "p.txt"
    f.write_text("svs cat --w 64 --h 64 --s 3 --d 1\nsvs cat --w 64 --h 64 --s 3 --d 1 --ss euler_a\n",
                 encoding="utf-8")
    cfg = parse_train_config({"sample_prompts": str(f), "output_name": "svs", "sample_sampler": "dpmsolver++",
                              "clip_skip": 2})
    notes = []
    paths = make_sample_fn(host, cfg, str(tmp_path), on_note=notes.append)(epoch=1, step=2)
    assert notes == ["sample_sampler: sampler 'dpmsolver++' (diffusers' DPM-Solver++ in sd-scripts) renders with "
                     "A1111's DPM++ 2M Karras"]
    info = [Image.open(p).text["parameters"] for p in paths]
    assert "Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5," in info[0] and info[0].endswith("Clip skip: 2")
    assert "Sampler: Euler a, CFG scale" in info[1]


def test_every_sampler_renders_on_the_tiny_model_and_an_unknown_one_is_refused(host):
    from lib_lora.train.sampling import SAMPLERS, SamplePrompt, generate
    sps = [SamplePrompt("svs cat", width=64, height=64, steps=4, seed=3, sampler=label) for label in SAMPLERS]
    pics = [np.asarray(img, dtype=np.int16) for img, _, _ in generate(host, sps)]
    assert len(pics) == 9 and all(p.shape == (64, 64, 3) for p in pics)
    # another algorithm, another picture (the tiny model is random, but not constant)
    assert len({p.tobytes() for p in pics}) == 9
    with pytest.raises(SamplePromptError, match="unknown sampler 'euler_b'.*euler_a"):
        parse_prompt_line("a cat --ss euler_b")


def test_sizes_that_are_multiples_of_8_but_not_64_sample_as_in_the_webui(host, tmp_path):
    """--w 96 --h 64 passes the prompt check (sd-scripts rounds to 8) but the ldm UNet's skips do not match at
    that size: the run died with 'Sizes of tensors must match'. Samples now bring the upsampled half to its skip's
    size as A1111 does; the UNet module is left as it was."""
    import ldm.modules.diffusionmodules.openaimodel as om
    from PIL import Image

    from lib_lora.train.config import parse_train_config
    unet = host.sd_model.model.diffusion_model
    ctx = torch.zeros(2, 77, unet.input_blocks[1][1].transformer_blocks[0].attn2.to_k.in_features)
    with pytest.raises(RuntimeError, match="Sizes of tensors must match"):  # (the ldm UNet as it is)
        unet(torch.zeros(2, 4, 8, 12), torch.tensor([10, 10]), context=ctx)
    f = tmp_path / "p.txt"
    f.write_text("svs cat --w 96 --h 64 --s 3 --d 1\nsvs cat --w 72 --h 120 --s 3 --d 2\n", encoding="utf-8")
    cfg = parse_train_config({"sample_prompts": str(f), "output_name": "svs"})
    paths = make_sample_fn(host, cfg, str(tmp_path))(epoch=1, step=4)
    assert [Image.open(p).size for p in paths] == [(96, 64), (72, 120)]
    assert om.th is torch


def test_a_sample_picture_that_does_not_fit_leaves_nothing_behind(tmp_path):
    """A full disk mid-write: the error is raised (the trainer turns it into a note) and no temp file stays."""
    import errno

    from PIL import Image

    from lib_lora.train.sampling import save_png

    class Full:
        def save(self, f, **kw):
            Image.new("RGB", (8, 8)).save(f, **kw)
            raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(OSError):
        save_png(Full(), str(tmp_path / "a.png"), "prompt")
    assert os.listdir(tmp_path) == []
    assert save_png(Image.new("RGB", (8, 8)), str(tmp_path / "b.png"), "prompt") == str(tmp_path / "b.png")
    assert os.listdir(tmp_path) == ["b.png"] and Image.open(tmp_path / "b.png").text["parameters"] == "prompt"


# ----------------------------------------------------------------------------------------------- A1111's prompt reading

# modules/prompt_parser.parse_prompt_attention of A1111 1.10.1, run on these prompts
A1111_PARSED = {
    "svs cat BREAK window": [("svs cat", 1.0), ("BREAK", -1), ("window", 1.0)],
    "BREAK svs cat": [("", 1.0), ("BREAK", -1), ("svs cat", 1.0)],
    "a (svs:1.3) cat BREAK (on a sofa) [x]": [("a ", 1.0), ("svs", 1.3), (" cat", 1.0), ("BREAK", -1), ("", 1.0),
                                              ("on a sofa", 1.1), (" ", 1.0), ("x", 0.9090909090909091)],
    "aBREAKb BREAKBREAK c": [("aBREAKb BREAKBREAK c", 1.0)],
    "(a BREAK b:1.2)": [("a", 1.2), ("BREAK", -1.2), ("b", 1.2)],  # (a weighted BREAK is the word, in A1111)
}


@pytest.mark.parametrize("text", list(A1111_PARSED))
def test_prompts_parse_as_a1111_parses_them(text):
    from lib_lora.train.conditioning import parse_prompt_attention
    got = parse_prompt_attention(text, breaks=True)
    assert [t for t, _ in got] == [t for t, _ in A1111_PARSED[text]]
    assert [w for _, w in got] == pytest.approx([w for _, w in A1111_PARSED[text]])


def test_break_starts_a_chunk_and_emphasis_keeps_each_chunks_mean(host):
    """A1111's tokenize_line pads the chunk a BREAK ends; its 'Original' emphasis scales a token's hidden state
    by its weight, then brings the chunk's mean back to what it was."""
    from lib_lora.train.conditioning import TextEncoder
    from lib_lora.train.sampling import _chunk_count
    te = TextEncoder(host.sd_model, "sd1", emphasis=True)
    assert _chunk_count(te, "svs cat") == 1 and _chunk_count(te, "svs cat BREAK window") == 2
    assert _chunk_count(te, "BREAK svs cat") == 2 and _chunk_count(te, "(a BREAK b:1.2)") == 1
    te.n_chunks = 2
    ids, _ = te.tokenize(["svs cat BREAK window"])
    spec = te.spec
    a, b = spec.encode("svs cat"), spec.encode("window")
    assert ids[0][0, 0, 1:1 + len(a)].tolist() == a and ids[0][0, 0, 1 + len(a)].item() == spec.eos
    assert ids[0][0, 1, 1:1 + len(b)].tolist() == b
    plain = TextEncoder(host.sd_model, "sd1")
    plain.n_chunks = te.n_chunks = 1
    with torch.no_grad():
        base = plain.encode(plain.tokenize(["svs cat"])[0], "cpu")["crossattn"]
        same = te.encode(te.tokenize(["(svs:1.0) cat"])[0], "cpu")["crossattn"]
        up = te.encode(te.tokenize(["(svs:1.3) cat"])[0], "cpu")["crossattn"]
    torch.testing.assert_close(same, base)
    assert float(up.mean()) == pytest.approx(float(base.mean()), rel=1e-4)  # the chunk's mean kept
    # "svs" (from token 1) scaled by 1.3, then every token by the mean's correction (seen on the padding)
    correction = float((up[0, 76] / base[0, 76]).median())
    assert float((up[0, 1] / base[0, 1]).median()) == pytest.approx(1.3 * correction, rel=1e-4)
    assert correction != pytest.approx(1.0, abs=1e-3)


def test_a_long_prompt_and_a_short_negative_are_run_apart_as_in_a1111(host, request):
    """A1111 1.10 pads neither (pad_cond_uncond is off): a 2-chunk prompt and a 1-chunk negative prompt go
    through the UNet one by one."""
    from lib_lora.train.sampling import ModelSampler, SamplePrompt, _chunk_count
    ms = ModelSampler(host.sd_model, "sd1", "cpu")
    seen = []
    hook = ms.unet.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append((args[0].shape[0], kwargs["context"].shape[1])), with_kwargs=True)
    request.addfinalizer(hook.remove)
    long = ", ".join(f"word{i} thing" for i in range(40))
    ms.image(SamplePrompt(long, negative="blurry", width=64, height=64, steps=1), 1, "euler")
    assert seen == [(1, 77), (1, 77 * _chunk_count(ms.te, long))] and _chunk_count(ms.te, long) > 1
    seen.clear()
    ms.image(SamplePrompt("svs cat", negative="blurry", width=64, height=64, steps=1), 1, "euler")
    assert seen == [(2, 77)]


def test_a1111_syntax_read_as_plain_text_is_said():
    from lib_lora.train.sampling import a1111_syntax_note
    assert a1111_syntax_note("(svs:1.3) cat, sofa BREAK window") is None  # (read as A1111 reads it)
    assert "AND" in a1111_syntax_note("a cat AND a dog", "p.txt:1")
    assert "AND" in a1111_syntax_note("a cat: 0.5") and a1111_syntax_note("10:30 pm, a cat") is None
    assert "prompt editing" in a1111_syntax_note("a [cat:dog:0.5]") and "editing" in a1111_syntax_note("[a|b]")
    assert a1111_syntax_note("bad AND worse", negative=True) is None  # (A1111 does not split a negative prompt)


def test_tagged_infotext_writes_lora_hashes_as_the_webui_does(tmp_path):
    """Grid cells carry "Lora hashes" as A1111 writes them: among the extra parameters before Version, quoted, the
    name without ':' and ','. A file without sshs metadata gets the addnet hash: sha256 of the bytes after the
    safetensors header, computed here by hand."""
    import hashlib
    import struct

    from safetensors.torch import save_file

    from lib_lora.train.sampling import tagged_infotext
    path = tmp_path / "my,lora.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.ones(2, 3)}, str(path))
    data = path.read_bytes()
    want = hashlib.sha256(data[8 + struct.unpack("<Q", data[:8])[0]:]).hexdigest()[:12]
    text = "svs cat\nNegative prompt: bad\nSteps: 20, Sampler: Euler a, Seed: 1, Size: 64x64, Version: v1.10.1"
    out = tagged_infotext(text, "svs cat", "<lora:my,lora:0.5>", lora_files=[str(path)])
    assert out == ("svs cat <lora:my,lora:0.5>\nNegative prompt: bad\nSteps: 20, Sampler: Euler a, Seed: 1, "
                   f'Size: 64x64, Lora hashes: "mylora: {want}", Version: v1.10.1')
    # read back as A1111 1.10.1 reads it (modules/infotext_utils.py: re_param_code, unquote)
    import json
    import re
    fields = {k: (json.loads(v) if v[:1] == '"' else v) for k, v in
              re.findall(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)', out.split("\n")[-1])}
    assert fields["Lora hashes"] == f"mylora: {want}" and fields["Version"] == "v1.10.1"
    # a file gone since: the tag stays, without a hash
    assert tagged_infotext(text, "svs cat", "<lora:x:1>", lora_files=[str(tmp_path / "gone.safetensors")]) == \
        text.replace("svs cat\n", "svs cat <lora:x:1>\n", 1)
