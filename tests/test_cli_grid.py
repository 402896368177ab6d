"""`python -m lib_lora grid`: the Results tab's epoch x strength x seed grid headless, on a run the CLI trained."""

import io
import os

import numpy as np
import pytest
from PIL import Image

import train_data
from lib_lora.formats.safetensors_io import read_metadata, save_file_atomic


def run_cli(*argv):
    from lib_lora import cli
    out, err = io.StringIO(), io.StringIO()
    code = cli.main([str(a) for a in argv], out=out, err=err)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A checkpoint, and the LoRA files of a 2-epoch CLI run on it (epoch 1, final, and the run's states)."""
    from lib_lora.host.tiny import make_tiny_sd15
    root = tmp_path_factory.mktemp("grid")
    ckpt = root / "tiny-sd15.safetensors"
    save_file_atomic({k: v.contiguous() for k, v in make_tiny_sd15(seed=6).state_dict().items()}, str(ckpt))
    train_data.make_dataset(str(root), n_concept=2, repeats=2, captions=["svs cat, red", "svs cat"])
    cfg = root / "lora.toml"
    cfg.write_text(f"""
pretrained_model_name_or_path = "{ckpt}"
train_data_dir = "img"
resolution = "64"
caption_extension = ".txt"
train_batch_size = 2
output_dir = "out"
output_name = "svs"
network_dim = 4
network_alpha = 4
learning_rate = 5e-2
max_train_epochs = 2
save_every_n_epochs = 1
save_state = true
seed = 5
""", encoding="utf-8")
    code, out, err = run_cli("train", cfg)
    assert code == 0, out + err
    return root, ckpt, root / "out"


def _sshs(path) -> str:
    """What A1111's built-in Lora takes as a file's short hash (network_on_disk: metadata sshs_model_hash)."""
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()["sshs_model_hash"][:12]


def _pixels(path):
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_a_runs_folder_renders_in_epoch_order_with_tags_that_txt2img_reads(run, tmp_path):
    root, ckpt, out_dir = run
    assert {"svs-000001-state.lsstate", "svs-final-state.lsstate"} <= set(os.listdir(out_dir))
    grid_dir = tmp_path / "g"
    code, out, err = run_cli("grid", out_dir, "--model", ckpt, "--strengths", "0, 1", "--seeds", "3,4",
                             "--steps", "4", "--out", grid_dir)
    assert code == 0, out + err
    # the training folder's words as the prompt, said so; the training size; epoch order, the final file last
    assert "prompt: svs cat" in out and "note: the prompt is the LoRA's training folder words" in out
    assert "2 file(s) x 2 strength(s) x 2 seed(s) = 8 pictures at 64x64, 4 steps, DPM++ 2M" in out
    assert "svs-000001.safetensors: lora 'svs-000001': " in out and "rows: epoch 1, final (epoch 2) at" in out
    cells = sorted(n for n in os.listdir(grid_dir) if n != "grid.png")
    assert cells == ["00_0_3.png", "00_0_4.png", "00_1_3.png", "00_1_4.png",
                     "01_0_3.png", "01_0_4.png", "01_1_3.png", "01_1_4.png"]
    info = Image.open(grid_dir / "01_1_4.png").text["parameters"]
    assert info.startswith("svs cat <lora:svs:1>\nSteps: 4, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7,"
                           " Seed: 4, Size: 64x64, Model: tiny-sd15"), info
    # the file's hash as the WebUI's built-in Lora writes it: its sshs_model_hash, the first 12 hex digits
    assert info.endswith(f', Lora hashes: "svs: {_sshs(out_dir / "svs.safetensors")}"'), info
    assert Image.open(grid_dir / "grid.png").size[0] > 2 * 64
    # strength 0 is the checkpoint itself: the same picture for both files; the trained LoRA changes it
    assert np.array_equal(_pixels(grid_dir / "00_0_3.png"), _pixels(grid_dir / "01_0_3.png"))
    assert np.abs(_pixels(grid_dir / "01_1_3.png") - _pixels(grid_dir / "01_0_3.png")).mean() > 1
    # the same --out again: the earlier grid is not mixed with or partly replaced by the new one
    code, out, err = run_cli("grid", out_dir, "--model", ckpt, "--steps", "4", "--out", grid_dir)
    assert code == 2 and f"--out {grid_dir} holds an earlier grid (9 picture(s), e.g. 00_0_3.png)" in err, out + err


def test_a_cell_is_the_picture_of_the_checkpoint_merged_at_that_strength(run, tmp_path):
    """The grid merges in memory; `merge` (checked against independent deltas) writes the merged checkpoint: the
    same prompt, seed and sampler on it give the same picture."""
    from lib_lora.host.headless import load_checkpoint
    from lib_lora.train.sampling import SamplePrompt, generate
    root, ckpt, out_dir = run
    code, out, err = run_cli("grid", out_dir / "svs-000001.safetensors", "--model", ckpt, "--strengths", "0.7",
                             "--seeds", "9", "--steps", "3", "--prompt", "svs cat, red", "--sampler", "euler_a",
                             "--out", tmp_path / "g")
    assert code == 0, out + err
    merged = tmp_path / "merged.safetensors"
    code, out, err = run_cli("merge", ckpt, merged, "--lora", f"{out_dir / 'svs-000001.safetensors'}:0.7",
                             "--precision", "fp32")
    assert code == 0, out + err
    host = load_checkpoint(str(merged))
    img, _, _ = generate(host, [SamplePrompt("svs cat, red", width=64, height=64, steps=3, seed=9,
                                             cfg_scale=7.0, sampler="euler_a")])[0]
    diff = np.abs(_pixels(tmp_path / "g" / "00_0.7_9.png") - np.asarray(img, dtype=np.int16))
    assert diff.max() <= 1, diff.max()  # (merged in float32 in both; a rounding step apart at most)


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_ctrl_c_keeps_the_rows_rendered_and_their_grid(run, tmp_path, monkeypatch, how):
    import signal

    from lib_lora.train import sampling
    root, ckpt, out_dir = run
    real, calls = sampling.generate, []

    def generate(*a, **kw):
        calls.append(1)
        if len(calls) == 3:
            if how == "sigterm":  # (a rented machine stopping, docker stop: the handler the grid set for it)
                handler = signal.getsignal(signal.SIGTERM)
                assert callable(handler) and handler is not signal.default_int_handler
                handler(signal.SIGTERM, None)
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(sampling, "generate", generate)
    code, out, err = run_cli("grid", out_dir, "--model", ckpt, "--strengths", "0.5,1", "--seeds", "1", "--steps", "1",
                             "--out", tmp_path / "g")
    assert code == 130, out + err
    assert "stopped after 2 of 4 rows" in out and signal.getsignal(signal.SIGTERM) is not None
    assert sorted(os.listdir(tmp_path / "g")) == ["00_0.5_1.png", "00_1_1.png", "grid.png"]


def test_files_in_a_webuis_lora_folder_get_their_grid_in_its_outputs(run, tmp_path):
    """A grids/ folder beside LoRAs in models/Lora would be a folder button on the WebUI's card pages."""
    import shutil
    root, ckpt, out_dir = run
    lora_dir = tmp_path / "webui" / "models" / "Lora" / "chars"
    lora_dir.mkdir(parents=True)
    shutil.copy(out_dir / "svs.safetensors", lora_dir)
    code, out, err = run_cli("grid", lora_dir, "--model", ckpt, "--strengths", "1", "--seeds", "1", "--steps", "1")
    assert code == 0, out + err
    (made,) = os.listdir(tmp_path / "webui" / "outputs" / "lora-studio" / "grids" / "chars")
    assert made.startswith("svs-") and os.listdir(lora_dir) == ["svs.safetensors"]
    from lib_lora.grid_cli import default_out
    assert os.path.dirname(default_out(str(out_dir / "svs.safetensors"))) == str(out_dir / "grids")


def test_several_runs_each_get_their_own_words_and_tags_in_the_prompt_are_refused(run, tmp_path):
    import json
    import shutil

    from safetensors.torch import load_file
    root, ckpt, out_dir = run
    mix = tmp_path / "mix"
    mix.mkdir()
    shutil.copy(out_dir / "svs.safetensors", mix)
    md = read_metadata(str(out_dir / "svs.safetensors"))
    md["ss_dataset_dirs"] = json.dumps({"5_ohwx dog": {"n_repeats": 5, "img_count": 2}})
    save_file_atomic(load_file(str(out_dir / "svs.safetensors")), str(mix / "dogrun.safetensors"), md)
    shutil.copy(ckpt, mix / "a-checkpoint.safetensors")  # (another .safetensors in the folder: left out, said)
    code, out, err = run_cli("grid", mix, "--model", ckpt, "--strengths", "1", "--seeds", "2", "--steps", "1",
                             "--out", tmp_path / "g")
    assert code == 0, out + err
    assert "note: a-checkpoint.safetensors left out: it is a full Stable Diffusion checkpoint" in out
    assert "note: each run's prompt is its training folder words: dogrun: ohwx dog; svs: svs cat" in out
    assert Image.open(tmp_path / "g" / "00_1_2.png").text["parameters"].startswith("ohwx dog <lora:dogrun:1>\n")
    assert Image.open(tmp_path / "g" / "01_1_2.png").text["parameters"].startswith("svs cat <lora:svs:1>\n")
    # a <lora:> tag in the prompt would be applied by txt2img from the PNG info, not by the grid: refused
    code, out, err = run_cli("grid", mix, "--model", ckpt, "--prompt", "svs cat <lora:style:0.5>")
    assert code == 2 and "applies no tag of its prompt" in err and "merge" in err, err


def test_an_sdxl_checkpoint_without_webui_is_said_first(run, tmp_path):
    import models
    root, ckpt, out_dir = run
    xl = models.make_sdxl(seed=0)
    path = tmp_path / "xl.safetensors"
    save_file_atomic({k.replace(".wrapped.", "."): v.contiguous().clone() for k, v in xl.state_dict().items()
                      if not k.startswith("cond_stage_model.")}, str(path))
    code, out, err = run_cli("grid", out_dir, "--model", path, "--out", tmp_path / "never")
    assert code == 1 and "SDXL checkpoint" in err and "--webui PATH" in err and "LoRA Studio tab" in err, err
    assert not (tmp_path / "never").exists()


def test_sampler_labels_and_numbers_are_checked(run, tmp_path):
    root, ckpt, out_dir = run
    for args, said in ((["--sampler", "eular_a"], "unknown sampler 'eular_a'"), (["--seeds", "1.5"], "whole number"),
                       (["--cfg", "nan"], "--cfg nan"), (["--width", "0"], "multiples of 8"),
                       (["--strengths", "1,inf"], "'inf' in the strengths is not a number")):
        code, out, err = run_cli("grid", out_dir, "--model", ckpt, "--out", tmp_path / "never", *args)
        assert code == 2 and said in err, (args, err)
    assert not (tmp_path / "never").exists()
    from lib_lora.train.sampling import resolve_sampler
    assert resolve_sampler("DPM++ 2M Karras") == ("DPM++ 2M", None)  # (A1111's label before 1.9)


def test_wrong_inputs_are_said_before_the_model_loads(run, tmp_path):
    import torch
    root, ckpt, out_dir = run
    code, out, err = run_cli("grid", out_dir / "svs-final-state.lsstate", "--model", ckpt)
    assert code == 1 and "not a LoRA .safetensors file (a resume state" in err, err
    code, out, err = run_cli("grid", tmp_path / "nowhere", "--model", ckpt)
    assert code == 1 and "LoRA file not found" in err, err
    (tmp_path / "empty").mkdir()
    code, out, err = run_cli("grid", tmp_path / "empty", "--model", ckpt)
    assert code == 1 and "no LoRA .safetensors file in this folder" in err, err
    code, out, err = run_cli("grid", out_dir, "--model", ckpt, "--strengths", "a lot")
    assert code == 2 and "strengths" in err, err
    code, out, err = run_cli("grid", out_dir, "--model", ckpt, "--width", "100")
    assert code == 2 and "multiples of 8" in err, err
    code, out, err = run_cli("grid", out_dir, "--model", out_dir / "svs.safetensors")  # (files swapped)
    assert code == 1 and "(it is a LoRA: the checkpoint is the model it applies to" in err, err
    code, out, err = run_cli("grid", out_dir, "--model", tmp_path)
    assert code == 1 and f"--model {tmp_path} is a folder: give the checkpoint file itself" in err, err
    code, out, err = run_cli("grid", out_dir, "--model", ckpt, "--webui", tmp_path / "no-webui")
    assert code == 1 and "no-webui: no such folder (give the AUTOMATIC1111 WebUI's folder)" in err, err
    code, out, err = run_cli("grid", out_dir, "--model", ckpt, "--webui", root)
    assert code == 1 and f"--webui {root} is not an AUTOMATIC1111 WebUI folder" in err, err
    # another model family: named, nothing loaded
    xl = tmp_path / "xl.safetensors"
    key = "lora_te2_text_model_encoder_layers_0_mlp_fc1"  # (SDXL's second text encoder)
    save_file_atomic({f"{key}.lora_down.weight": torch.zeros(4, 1280), f"{key}.lora_up.weight": torch.zeros(5120, 4),
                      f"{key}.alpha": torch.tensor(4.0)}, str(xl), {"ss_base_model_version": "sdxl_base_v1-0"})
    code, out, err = run_cli("grid", xl, "--model", ckpt)
    assert code == 1 and "this LoRA is for SDXL, the checkpoint is SD1" in err and "loading" not in out, err
    # no training folder words in the file and no --prompt
    bare = tmp_path / "bare.safetensors"
    from safetensors.torch import load_file
    save_file_atomic(load_file(str(out_dir / "svs.safetensors")), str(bare), {})
    code, out, err = run_cli("grid", bare, "--model", ckpt)
    assert code == 2 and "give --prompt" in err, err
    assert read_metadata(str(out_dir / "svs.safetensors"))["ss_epoch"] == "2"


def test_a_full_disk_names_the_picture_and_what_was_kept(run, tmp_path, monkeypatch):
    import errno

    import lib_lora.train.sampling as sampling
    root, ckpt, out_dir = run
    real, calls = sampling.write_atomic, []

    def fills_up(path, *a, **k):
        calls.append(path)
        if len(calls) > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, *a, **k)
    monkeypatch.setattr(sampling, "write_atomic", fills_up)
    grid_dir = tmp_path / "g"
    code, out, err = run_cli("grid", out_dir / "svs.safetensors", "--model", ckpt, "--strengths", "1", "--seeds",
                             "1,2,3", "--steps", "1", "--out", grid_dir)
    assert code == 1 and (f"could not write 00_1_3.png to {grid_dir}: the disk is full; the 2 picture(s) written "
                          "before it are there. Free some space (or give --out on another disk)") in err, out + err
    assert sorted(os.listdir(grid_dir)) == ["00_1_1.png", "00_1_2.png"]


def test_with_judges_the_files_on_top_of_another_lora(run, tmp_path):
    """--with merges a LoRA beneath every row: at row strength 0 the cell is the other LoRA alone (the same picture
    as its own row at that weight), and each picture's PNG info carries both tags for txt2img."""
    root, ckpt, out_dir = run
    epoch1, final = out_dir / "svs-000001.safetensors", out_dir / "svs.safetensors"
    code, out, err = run_cli("grid", epoch1, "--model", ckpt, "--strengths", "0.7", "--seeds", "3", "--steps", "3",
                             "--out", tmp_path / "alone")
    assert code == 0, out + err
    code, out, err = run_cli("grid", final, "--model", ckpt, "--with", f"{epoch1}:0.7", "--strengths", "0,1",
                             "--seeds", "3", "--steps", "3", "--out", tmp_path / "on")
    assert code == 0, out + err
    assert "on top of svs-000001.safetensors at 0.7 in every row" in out
    assert out.count("svs-000001.safetensors: lora 'svs-000001'") == 1 and "svs.safetensors: lora 'svs'" in out, out
    assert np.array_equal(_pixels(tmp_path / "on" / "00_0_3.png"), _pixels(tmp_path / "alone" / "00_0.7_3.png"))
    assert np.abs(_pixels(tmp_path / "on" / "00_1_3.png") - _pixels(tmp_path / "on" / "00_0_3.png")).mean() > 1
    info = Image.open(tmp_path / "on" / "00_1_3.png").text["parameters"]
    assert info.startswith("svs cat <lora:svs-000001:0.7> <lora:svs:1>\n"), info
    assert info.endswith(f', Lora hashes: "svs-000001: {_sshs(epoch1)}, svs: {_sshs(final)}"'), info
    code, out, err = run_cli("grid", final, "--model", ckpt, "--prompt", "svs cat <lora:svs-000001:1>")
    assert code == 2 and "give the other as --with FILE:WEIGHT" in err, err
    code, out, err = run_cli("grid", final, "--model", ckpt, "--with", tmp_path / "none.safetensors")
    assert code == 1 and "LoRA file not found" in err, err
    code, out, err = run_cli("grid", final, "--model", ckpt, "--with", ckpt)
    assert code == 1 and "it is a full Stable Diffusion checkpoint, not a LoRA" in err, err
