"""Headless sampler: sd-scripts prompt files, closed-form checks of DDIM / Euler, determinism on the tiny model."""

import math
import os

import numpy as np
import pytest
import torch

from lib_lora.train.sampling import (SamplePromptError, ddim_sample, ddim_timesteps, euler_sample, load_prompt_file,
                                     make_sample_fn, parse_prompt_line, parse_prompt_text)


# ----------------------------------------------------------------------------------------------- prompt files

def test_prompt_line_with_every_option():
    sp = parse_prompt_line("masterpiece, svs cat --n low quality, blurry --w 768 --h 512 --s 20 --d 42 --l 6.5 "
                           "--ss euler_a")
    assert sp.prompt == "masterpiece, svs cat"
    assert sp.negative == "low quality, blurry"
    assert (sp.width, sp.height, sp.steps, sp.seed, sp.cfg_scale) == (768, 512, 20, 42, 6.5)
    assert sp.sampler == "euler_a" and any("euler_a" in n for n in sp.notes)  # runs as euler, with a note


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


def test_ddim_timesteps_are_ldm_uniform():
    # ldm make_ddim_timesteps('uniform', 20, 1000): range(0, 1000, 50) + 1
    assert ddim_timesteps(1000, 20) == list(range(951, 0, -50))
    assert ddim_timesteps(1000, 1) == [1]


def test_oracle_eps_recovers_x0_exactly():
    """A model that returns the true noise of x_t (given the known x0) makes DDIM and Euler land exactly on x0."""
    ac = _sd_alphas_cumprod()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    noise = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)

    def eps_ddim(x, t, a):  # x = sqrt(a) x0 + sqrt(1-a) eps  =>  eps = (x - sqrt(a) x0) / sqrt(1-a)
        return (x - math.sqrt(a) * x0) / math.sqrt(1 - a)

    # DDIM starts at x_T built with its first timestep's alpha
    a_T = float(ac[ddim_timesteps(1000, 10)[0]])
    xT = math.sqrt(a_T) * x0 + math.sqrt(1 - a_T) * noise
    out = ddim_sample(eps_ddim, ac, xT, 10)
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-10)

    calls = []

    def eps_euler(x_in, t, a):  # the model sees x_in = x / sqrt(1 + sigma^2) = sqrt(a) (x0 + sigma eps)
        calls.append(t)
        return (x_in - math.sqrt(a) * x0) / math.sqrt(1 - a)

    out = euler_sample(eps_euler, ac, noise, 7)
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-10)
    assert calls[0] == pytest.approx(999) and calls[-1] == pytest.approx(0) and len(calls) == 7


def test_gaussian_data_matches_probability_flow_closed_form():
    """Data ~ N(0, s^2): the ideal denoiser is D(x) = s^2/(s^2+sigma^2) x, and the probability-flow ODE maps
    x(sigma_T) to x(0) = x(sigma_T) * s / sqrt(s^2 + sigma_T^2). Both samplers solve that ODE (DDIM is Euler in
    sigma-space), so with many steps they must reach the closed form."""
    ac = _sd_alphas_cumprod()
    s = 0.5
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def eps_gauss(x_in, t, a):  # eps = (x - D(x)) / sigma in sigma-space, x = x_in / sqrt(a)
        sig2 = (1 - a) / a
        x = x_in / math.sqrt(a)
        return x * math.sqrt(sig2) / (s * s + sig2)

    sig_max = math.sqrt((1 - float(ac[-1])) / float(ac[-1]))
    want = noise * sig_max * s / math.sqrt(s * s + sig_max ** 2)
    out = euler_sample(eps_gauss, ac, noise, 400)
    torch.testing.assert_close(out, want, rtol=0.02, atol=0.01)

    ts = ddim_timesteps(1000, 500)
    a_T = float(ac[ts[0]])
    xT = noise  # DDIM's x_T is the scaled variable sqrt(a_T) * x(sigma_T)
    sig_T = math.sqrt((1 - a_T) / a_T)
    want = (xT / math.sqrt(a_T)) * s / math.sqrt(s * s + sig_T ** 2)
    out = ddim_sample(eps_gauss, ac, xT, 500)
    torch.testing.assert_close(out, want, rtol=0.02, atol=0.01)


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


def test_the_configs_sampler_fallback_is_said_and_clip_skip_is_in_the_infotext(host, tmp_path):
    from PIL import Image

    from lib_lora.train.config import parse_train_config
    f = tmp_path / "p.txt"
    f.write_text("svs cat --w 64 --h 64 --s 2 --d 1\n", encoding="utf-8")
    cfg = parse_train_config({"sample_prompts": str(f), "output_name": "svs", "sample_sampler": "euler_a",
                              "clip_skip": 2})
    notes = []
    paths = make_sample_fn(host, cfg, str(tmp_path), on_note=notes.append)(epoch=1, step=2)
    assert notes == ["sample_sampler: sampler 'euler_a' is not implemented headless; using euler"]
    info = Image.open(paths[0]).text["parameters"]
    assert "Sampler: Euler," in info and info.endswith("Clip skip: 2")


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
