"""`python -m lib_lora train CONFIG.toml`: a tiny checkpoint written by the test, trained for 2 epochs headless."""

import io
import os
import re
import shutil

import pytest

import train_data
from lib_lora.formats.safetensors_io import read_metadata, save_file_atomic


@pytest.fixture
def run_cli(monkeypatch):
    """cli.main with our `train`/`quickstart` commands (added here if cli.py does not wire them yet)."""
    from lib_lora import cli, train_cli
    orig = cli.build_parser

    def build():
        p = orig()
        sub = p._subparsers._group_actions[0]
        if "train" not in sub.choices:
            train_cli.add_commands(sub)
        return p

    monkeypatch.setattr(cli, "build_parser", build)

    def run(*argv):
        out, err = io.StringIO(), io.StringIO()
        code = cli.main([str(a) for a in argv], out=out, err=err)
        return code, out.getvalue(), err.getvalue()
    return run


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    from lib_lora.host.tiny import make_tiny_sd15
    path = tmp_path_factory.mktemp("models") / "tiny-sd15.safetensors"
    save_file_atomic({k: v.contiguous() for k, v in make_tiny_sd15(seed=6).state_dict().items()}, str(path))
    return path


def _write_config(root, ckpt, extra=""):
    train_data.make_dataset(str(root), n_concept=2, repeats=2, captions=["svs cat, red", "svs cat"])
    (root / "prompts.txt").write_text("# samples\nsvs cat --w 64 --h 64 --s 3 --d 1\n", encoding="utf-8")
    cfg = root / "lora.toml"
    cfg.write_text(f"""
[model]
pretrained_model_name_or_path = "{ckpt}"

[dataset]
train_data_dir = "img"
resolution = "64"
caption_extension = ".txt"
train_batch_size = 2

[training]
output_dir = "out"
output_name = "svs"
network_module = "networks.lora"
network_dim = 4
network_alpha = 2
learning_rate = 1e-3
max_train_epochs = 2
save_every_n_epochs = 1
seed = 5
sample_prompts = "prompts.txt"
sample_every_n_epochs = 1
{extra}
""", encoding="utf-8")
    return cfg


def test_train_two_epochs_writes_epoch_and_final_files(run_cli, tiny_ckpt, tmp_path):
    cfg = _write_config(tmp_path, tiny_ckpt)
    code, out, err = run_cli("train", cfg)
    assert code == 0, out + err
    files = sorted(os.listdir(tmp_path / "out"))
    assert "svs-000001.safetensors" in files and "svs.safetensors" in files
    assert sorted(os.listdir(tmp_path / "out" / "samples")) == ["svs_e000001_00.png", "svs_e000002_00.png"]
    # the report: dataset plan, load summary, progress lines, where files went
    assert "Dataset plan" in out and "tiny-sd15.safetensors: SD1.x (eps-prediction)" in out
    assert "step 4/4 (100%)  loss " in out and " avg " in out and " lr 1.00e-03" in out and "ETA" in out
    assert f"final: {tmp_path / 'out' / 'svs.safetensors'}" in out
    md = read_metadata(str(tmp_path / "out" / "svs.safetensors"))
    assert md["ss_sd_model_name"] == "tiny-sd15.safetensors" and md["ss_epoch"] == "2"
    assert len(md["ss_new_sd_model_hash"]) == 64 and len(md["ss_sd_model_hash"]) == 8


def test_dry_run_stops_before_loading(run_cli, tiny_ckpt, tmp_path):
    cfg = _write_config(tmp_path, tiny_ckpt)
    code, out, err = run_cli("train", cfg, "--dry-run")
    assert code == 0, err
    assert "dry run: SD1 checkpoint" in out and "would train 4 steps over 2 epoch(s)" in out
    assert not (tmp_path / "out").exists()
    assert "device: cpu (no CUDA GPU" in out


def test_dry_run_says_a_disk_without_room_for_the_lora_and_a_state(run_cli, tiny_ckpt, tmp_path, monkeypatch):
    """The run checks its exact size when it starts; --dry-run estimates it for the full-size model (SD1 LoRA at
    network_dim 4: 2.36 M parameters, about 11 MiB as a float file plus a 37 MiB state) and stops on what the run
    would stop on."""
    from collections import namedtuple

    import lib_lora.train.saving as saving
    cfg = _write_config(tmp_path, tiny_ckpt)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(saving.shutil, "disk_usage", lambda p: usage(10 ** 9, 0, 5 * 2 ** 20))
    code, out, err = run_cli("train", cfg, "--dry-run")
    assert code != 0 and not (tmp_path / "out").exists()
    assert re.search(rf"the run would stop at its start: the disk holding {re.escape(str(tmp_path))} has 5\.0 MiB "
                     r"free; about 47\.4 MiB is needed for the trained LoRA and a resume state\. Free some space "
                     r"or choose another output folder \(estimated for a full-size SD1 model at network_dim 4; the "
                     r"run checks the exact size when it starts\)", err), err
    # room for the final file and a state, not for every epoch's save with a state: said, the dry run passes
    cfg = _write_config(tmp_path, tiny_ckpt, extra="save_state = true")
    monkeypatch.setattr(saving.shutil, "disk_usage", lambda p: usage(10 ** 9, 0, 60 * 2 ** 20))
    code, out, err = run_cli("train", cfg, "--dry-run", "--device", "cpu")
    assert code == 0, err
    assert "note: the disk holding" in out and "for this run's 2 LoRA file(s) and 2 state(s)" in out


def test_a_sample_sampler_typo_stops_the_dry_run(run_cli, tiny_ckpt, tmp_path):
    cfg = _write_config(tmp_path, tiny_ckpt, extra='sample_sampler = "eulr_a"')
    code, out, err = run_cli("train", cfg, "--dry-run")
    assert code == 1 and "sample_sampler: unknown sampler 'eulr_a' (known: ddim, pndm" in err, out + err


def test_device_auto_picks_the_gpu_when_torch_sees_one(run_cli, tiny_ckpt, tmp_path, monkeypatch):
    import torch
    cfg = _write_config(tmp_path, tiny_ckpt)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    code, out, err = run_cli("train", cfg, "--dry-run")
    assert code == 0, err
    assert "device: cuda\n" in out
    code, out, err = run_cli("train", cfg, "--dry-run", "--device", "cpu")  # asked for: no auto line
    assert code == 0, err
    assert "device:" not in out
    cfg = _write_config(tmp_path, tiny_ckpt, extra='mixed_precision = "fp16"')
    code, out, err = run_cli("train", cfg, "--dry-run", "--device", "cpu")  # said before the run, not only in it
    assert out.count("note: mixed_precision fp16 needs a CUDA GPU; training in fp32 on the CPU instead.") == 1


def test_unknown_key_exits_1_with_the_suggestion(run_cli, tiny_ckpt, tmp_path):
    cfg = _write_config(tmp_path, tiny_ckpt, extra="network_dimm = 8")
    code, out, err = run_cli("train", cfg)
    assert code == 1
    assert "network_dimm" in err and "did you mean 'network_dim'" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_sdxl_checkpoint_without_webui_exits_1_with_the_message(run_cli, tmp_path):
    import models
    xl = models.make_sdxl(seed=0)
    path = tmp_path / "xl.safetensors"
    save_file_atomic({k.replace(".wrapped.", "."): v.contiguous().clone() for k, v in xl.state_dict().items()
                      if not k.startswith("cond_stage_model.")}, str(path))
    cfg = _write_config(tmp_path, path)
    code, out, err = run_cli("train", cfg)
    assert code == 1
    assert "SDXL checkpoint" in err and "--webui PATH" in err


def test_a_path_that_is_not_there_says_what_was_probably_meant(run_cli, tiny_ckpt, tmp_path, monkeypatch):
    """A kohya user pastes paths relative to where sd-scripts ran; ours are read from the config's folder. A typo
    got no hint either."""
    import shutil
    (tmp_path / "models").mkdir()
    shutil.copy(tiny_ckpt, tmp_path / "models" / "tiny.safetensors")
    (tmp_path / "cfgs").mkdir()
    cfg = tmp_path / "cfgs" / "c.toml"
    cfg.write_text((_write_config(tmp_path, "models/tiny.safetensors")).read_text())
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli("train", cfg, "--dry-run")
    assert code == 1 and (f"checkpoint not found: {tmp_path}/cfgs/models/tiny.safetensors (relative paths are read "
                          f"from the config file's folder, {tmp_path}/cfgs; {tmp_path}/models/tiny.safetensors "
                          "exists: write that path)") in err, err
    code, _, err = run_cli("train", _write_config(tmp_path, str(tmp_path / "models" / "tiny.safetensor")))
    assert code == 1 and f"(did you mean {tmp_path}/models/tiny.safetensors?)" in err, err


def test_user_errors_are_one_line(run_cli, tiny_ckpt, tmp_path):
    code, _, err = run_cli("train", tmp_path / "missing.toml")
    assert code == 1 and "not found" in err
    code, _, err = run_cli("train", tmp_path)  # (the dataset folder given instead of the config)
    assert code == 1 and f"{str(tmp_path)!r} is a folder, not a config file: give the training config" in err, err
    (tmp_path / "list.json").write_text("[1, 2]")
    code, _, err = run_cli("train", tmp_path / "list.json")
    assert code == 1 and "a training config must be a JSON object of keys, got list" in err, err
    cfg = _write_config(tmp_path, "org/some-model")
    code, _, err = run_cli("train", cfg)
    assert code == 1 and "Hugging Face repo id" in err
    cfg = _write_config(tmp_path, tiny_ckpt)
    (tmp_path / "prompts.txt").write_text("a cat --w wide\n", encoding="utf-8")
    code, _, err = run_cli("train", cfg)
    assert code == 1 and "prompts.txt:1: --w needs a whole number" in err
    code, _, err = run_cli("train", cfg, "--resume", tmp_path / "nope-state.lsstate")
    assert code == 1 and "--resume: the state file" in err and "nope-state.lsstate does not exist" in err, err
    (tmp_path / "svs-000002-state").mkdir()  # sd-scripts' save_state: an Accelerate folder
    code, _, err = run_cli("train", cfg, "--resume", tmp_path / "svs-000002-state")
    assert code == 1 and "is a folder: sd-scripts' save_state folders (Accelerate's format) cannot be resumed " \
        "here" in err and "network_weights" in err, err
    code, _, err = run_cli("train")
    assert code == 2


def test_dry_run_checks_what_the_run_would_stop_on_before_loading_the_model(run_cli, tiny_ckpt, tmp_path):
    """Everything that can be told without the model is told by --dry-run too: the output folder, the
    network_weights and resume files, the --webui folder, and the settings' notes."""
    cfg = _write_config(tmp_path, tiny_ckpt)
    text = cfg.read_text()
    (tmp_path / "afile").write_text("x")
    cases = [('output_dir = "out"', 'output_dir = "afile"', "is a file, not a folder"),
             ('output_dir = "out"\n', "", "output_dir is not set"),
             ('network_dim = 4', 'network_dim = 4\nnetwork_weights = "trunc.safetensors"', "trunc.safetensors"),
             ('network_dim = 4', 'network_dim = 4\nnetwork_weights = "xl.safetensors"',
              "network_weights: xl.safetensors is a LoRA for SDXL, the loaded model is SD1")]
    (tmp_path / "trunc.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    import torch
    from safetensors.torch import save_file
    save_file({"lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k.lora_down.weight": torch.zeros(4, 2048),
               "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(4, 1280)},
              str(tmp_path / "xl.safetensors"))
    for old, new, words in cases:
        cfg.write_text(text.replace(old, new))
        code, out, err = run_cli("train", cfg, "--dry-run")
        assert code == 1 and words in err and "loading" not in out, (words, out, err)
    cfg.write_text(text)
    (tmp_path / "trunc-state.lsstate").write_bytes(b"PK\x03\x04 not a whole file")
    code, out, err = run_cli("train", cfg, "--dry-run", "--resume", tmp_path / "trunc-state.lsstate")
    assert code == 1 and "--resume: the state file trunc-state.lsstate cannot be read" in err, err
    code, out, err = run_cli("train", cfg, "--dry-run", "--webui", tmp_path / "nowebui")
    assert code == 1 and "no such folder" in err
    # a dataset error is said once, above the plan (not again in its list)
    cfg.write_text(text.replace('train_data_dir = "img"', 'train_data_dir = "nothere"'))
    code, out, err = run_cli("train", cfg, "--dry-run")
    assert code == 1 and (out + err).count("does not exist") == 1 and "Dataset plan" in out + err, out + err
    cfg.write_text(text.replace("network_dim = 4", "network_dim = 4\nfull_fp16 = true"))
    code, out, err = run_cli("train", cfg, "--dry-run")
    assert code == 0 and "note: full_fp16" in out, out + err


def _signal_after_step_1(monkeypatch, sig):
    """The signal arrives once the first step is printed; returns the printer's own call, to undo it."""
    import signal

    from lib_lora import train_cli
    orig = train_cli.ProgressPrinter.__call__

    def printer(self, e):
        orig(self, e)
        if e.kind == "step" and e.step == 1:
            signal.raise_signal(sig)

    monkeypatch.setattr(train_cli.ProgressPrinter, "__call__", printer)
    return orig


def test_cancel_saves_state_and_prints_how_to_resume(run_cli, tiny_ckpt, tmp_path, monkeypatch):
    """Ctrl-C is the trainer's should_cancel; simulate it after the first step."""
    import signal

    from lib_lora import train_cli
    cfg = _write_config(tmp_path, tiny_ckpt)
    orig = _signal_after_step_1(monkeypatch, signal.SIGINT)
    code, out, err = run_cli("train", cfg, "--model", tiny_ckpt)
    assert code == 130, out + err
    assert "Ctrl-C: stopping after this step" in out
    state = tmp_path / "out" / "svs-cancelled-state.lsstate"
    assert state.exists()
    assert f"--resume {state} --model {tiny_ckpt}" in out  # (the printed command runs as it is)
    assert out.count("cancelled at step") == 1
    monkeypatch.setattr(train_cli.ProgressPrinter, "__call__", orig)
    code, out, err = run_cli("train", cfg, "--resume", state, "--dry-run")
    assert code == 0 and "would continue from step 1 to 4 over 2 epoch(s)" in out, out + err
    assert "trained on other data" not in out, out
    # resumed on other data (an image added, another resolution): allowed as sd-scripts does, but said
    extra_img = tmp_path / "img" / "2_svs cat" / "added.png"
    shutil.copy(tmp_path / "img" / "2_svs cat" / "c0.png", extra_img)
    moved = tmp_path / "moved.toml"
    moved.write_text(cfg.read_text().replace('resolution = "64"', 'resolution = "128"'))
    code, out, err = run_cli("train", moved, "--resume", state, "--dry-run")
    assert code == 0 and ("note: resume: svs-cancelled-state.lsstate was trained on other data (2 training images "
                          "then, 3 now; resolution 64x64 then, 128x128 now; 2 batches per epoch then, 3 now): the run "
                          "goes on with this data from step 1") in out, out + err
    extra_img.unlink()
    code, out, err = run_cli("train", cfg, "--dry-run")  # (started again: the state it could continue is named)
    assert code == 0 and (f"holds svs-cancelled-state.lsstate from an earlier run of 'svs': to continue that run "
                          f"instead of starting again, stop now (Ctrl-C) and add --resume {state} (or --resume "
                          "auto)") in out, out + err
    assert "the earlier 'svs' run's 1 resume state(s) in" in out and "are written over" in out, out
    for other_run in ("svs-2.safetensors", "svs-final.safetensors", "svs-v2-000001.safetensors"):
        (tmp_path / "out" / other_run).write_bytes(b"")  # (other runs' names: not written over, not counted)
    (tmp_path / "out" / "svs-000001.safetensors").write_bytes(b"")
    code, out, err = run_cli("train", cfg, "--dry-run")
    assert code == 0 and "the earlier 'svs' run's 1 LoRA file(s) and 1 resume state(s) in" in out, out + err
    for n in ("svs-2.safetensors", "svs-final.safetensors", "svs-v2-000001.safetensors", "svs-000001.safetensors"):
        (tmp_path / "out" / n).unlink()
    # a restart script: the newest state of this run, or a fresh start when there is none
    code, out, err = run_cli("train", cfg, "--resume", "auto", "--dry-run")
    assert code == 0 and f"--resume auto: continuing from {state}, the newest state of this run" in out, out + err
    assert "would continue from step 1 to 4 over 2 epoch(s)" in out, out
    fresh = tmp_path / "fresh.toml"
    fresh.write_text(cfg.read_text().replace('output_name = "svs"', 'output_name = "other"'))
    code, out, err = run_cli("train", fresh, "--resume", "auto", "--dry-run")
    assert code == 0 and "--resume auto: no resume state of 'other' in" in out and "would train" in out, out + err
    if os.name == "posix":  # another live run of this name there: said before the model loads
        holder = train_data.hold_run_lock(tmp_path / "out", "svs")
        try:
            code, out, err = run_cli("train", cfg, "--resume", state)
        finally:
            holder.kill()
            holder.wait()
        assert code == 1 and "another training is writing 'svs' files in" in err and "loading" not in out, out + err
    # another rank: said before the model loads, not after it and the latent cache (the state is kept)
    other = tmp_path / "dim8.toml"
    other.write_text(cfg.read_text().replace("network_dim = 4", "network_dim = 8"))
    code, out, err = run_cli("train", other, "--resume", state)
    assert code == 1 and ("--resume: svs-cancelled-state.lsstate was trained with network_dim 4, this config says 8: "
                          "set network_dim = 4 to continue it") in err and "loading" not in out, out + err
    assert state.exists()
    code, out, err = run_cli("train", cfg, "--resume", state)
    assert code == 0, out + err
    assert (tmp_path / "out" / "svs.safetensors").exists()


def test_ctrl_c_while_latents_are_cached_says_there_is_nothing_to_resume(run_cli, tiny_ckpt, tmp_path,
                                                                          monkeypatch):
    """It said 'cancelled at step 0.' after promising a resumable state."""
    import signal

    from lib_lora import train_cli
    orig = train_cli.ProgressPrinter.__call__

    def printer(self, e):
        orig(self, e)
        if e.kind == "cache":
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(train_cli.ProgressPrinter, "__call__", printer)
    code, out, err = run_cli("train", _write_config(tmp_path, tiny_ckpt))
    assert code == 130, out + err
    assert "before the first step, while latents are cached, there is nothing to save" in out
    assert "cancelled before the first step (while caching latents); nothing to resume" in out
    assert "cancelled at step" not in out and not list((tmp_path / "out").glob("*.lsstate"))


def test_sigterm_stops_like_ctrl_c_with_a_resumable_state(run_cli, tiny_ckpt, tmp_path, monkeypatch):
    """A rented machine being stopped (or `docker stop`) sends SIGTERM: the run keeps its work as a state."""
    import signal
    cfg = _write_config(tmp_path, tiny_ckpt)
    _signal_after_step_1(monkeypatch, signal.SIGTERM)
    before = signal.getsignal(signal.SIGTERM)
    code, out, err = run_cli("train", cfg)
    assert code == 130, out + err
    assert "SIGTERM: stopping after this step and saving a resumable state" in out
    assert (tmp_path / "out" / "svs-cancelled-state.lsstate").exists()
    assert signal.getsignal(signal.SIGTERM) is before
