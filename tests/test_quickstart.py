"""`python -m lib_lora quickstart`: the embedded pipeline end to end, small step count."""

import io
import os
import sys
import time

import pytest

STEPS = 30


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    from lib_lora import cli, train_cli
    out_dir = tmp_path_factory.mktemp("qs") / "run"
    orig = cli.build_parser

    def build():
        p = orig()
        sub = p._subparsers._group_actions[0]
        if "quickstart" not in sub.choices:
            train_cli.add_commands(sub)
        return p

    cli.build_parser = build
    try:
        out, err = io.StringIO(), io.StringIO()
        t0 = time.time()
        code = cli.main(["quickstart", "--out", str(out_dir), "--steps", str(STEPS), "--keep-model"], out=out,
                        err=err)
        seconds = time.time() - t0
    finally:
        cli.build_parser = orig
    return code, out.getvalue(), err.getvalue(), out_dir, seconds


def test_quickstart_runs_end_to_end(quickstart):
    code, out, err, out_dir, seconds = quickstart
    assert code == 0, out + err
    assert seconds < 60, f"quickstart with {STEPS} steps took {seconds:.0f} s"
    for rel in ("lora/svs_cat.safetensors", "loss.png", "before_after.png", "dataset/img/10_svs cat/c0.png",
                "dataset/img/10_svs cat/c0.txt"):
        assert os.path.isfile(out_dir / rel), rel
    assert f"step {STEPS}/{STEPS} (100%)" in out
    assert "weights bit-exact after restore" in out


def test_keep_model_leaves_a_model_and_config_that_train_takes(quickstart):
    """The audit's user could not try `train` offline: no checkpoint, no config."""
    from lib_lora import cli
    code, out, err, out_dir, _ = quickstart
    kept = out_dir / "train.toml"
    from lib_lora.quickstart import command_prefix
    prog = command_prefix()
    assert f"{prog} train {kept}" in out and (out_dir / "model" / "tiny-sd15.safetensors").is_file()
    assert f"{prog} grid {out_dir / 'my-lora'} --model {out_dir / 'model' / 'tiny-sd15.safetensors'}" in out
    assert f"#   {prog} train {kept} --dry-run" in kept.read_text()
    if sys.prefix != sys.base_prefix:  # (bash .ci/quickstart runs in .venv: a plain `python` there has no torch)
        assert prog != "python -m lib_lora" and os.path.samefile(prog.split(" -m ")[0], sys.executable), prog
    o, e = io.StringIO(), io.StringIO()
    rc = cli.main(["train", str(kept), "--dry-run"], out=o, err=e)
    assert rc == 0 and "would train 80 steps over 4 epoch(s)" in o.getvalue(), o.getvalue() + e.getvalue()
    assert "warning" not in o.getvalue().lower() and "\nerror" not in o.getvalue().lower()


def test_loss_went_down_and_the_file_matches_fully(quickstart):
    import re

    from lib_lora.apply.layers import layer_mapping
    from lib_lora.apply.loader import load_network
    from lib_lora.host.tiny import make_tiny_sd15
    _, out, _, out_dir, _ = quickstart
    m = re.search(r"loss:\s+([\d.]+) before -> ([\d.]+) after", out)
    before, after = float(m.group(1)), float(m.group(2))
    assert after < before
    assert re.search(r"<lora:svs_cat:1> -> (\d+)/\1 modules matched \(100%\)", out)
    # independently of the quickstart's own report: the saved file maps onto every layer it names
    net = load_network(str(out_dir / "lora" / "svs_cat.safetensors"), "sd1", cache=None,
                       layer_names=set(layer_mapping(make_tiny_sd15(0))))
    assert net.report.total_modules == 192 + 12 and len(net.report.matched) == net.report.total_modules


def test_images_are_real_pngs(quickstart):
    from PIL import Image
    _, _, _, out_dir, _ = quickstart
    grid = Image.open(out_dir / "before_after.png")
    plot = Image.open(out_dir / "loss.png")
    assert grid.size[0] > 4 * 64 and grid.size[1] > 3 * 64  # dataset, base, LoRA rows of 4
    assert plot.size == (700, 400)


def test_refuses_a_folder_with_other_files(tmp_path):
    from lib_lora.quickstart import QuickstartError, run_quickstart
    (tmp_path / "notes.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(QuickstartError, match="already holds other files"):
        run_quickstart(str(tmp_path), steps=1, log=lambda _: None)
    assert os.listdir(tmp_path) == ["notes.txt"]


def test_third_party_chatter_is_kept_off_the_terminal_while_building(capsys, monkeypatch):
    """Import-time notices of ldm's dependencies are hidden (hooked, so filters a package adds while importing do
    not bring them back); our own warnings still show; ldm's prints come back when building fails."""
    import logging
    import warnings

    from lib_lora.host.tiny import quiet_third_party
    monkeypatch.delenv("LORA_STUDIO_VERBOSE", raising=False)
    bnb = logging.getLogger("bitsandbytes")
    before = bnb.level
    shown = []
    monkeypatch.setattr(warnings, "showwarning", lambda message, *a, **k: shown.append(str(message)))
    with quiet_third_party():
        warnings.simplefilter("always")  # (as pytorch_lightning's import does for its own warning class)
        warnings.warn_explicit("Failed to load image Python extension", UserWarning,
                               "/venv/site-packages/torchvision/io/image.py", 13)
        warnings.warn("timm.models.layers is deprecated", FutureWarning)
        warnings.warn("rank_zero_only moved", DeprecationWarning)
        warnings.warn_explicit("ours", UserWarning, "/x/lib_lora/train/images.py", 1)
        print("DiffusionWrapper has 10.36 M params.")
        assert bnb.getEffectiveLevel() == logging.ERROR
    out, err = capsys.readouterr()
    assert "DiffusionWrapper" not in out
    assert shown == ["ours"]
    assert bnb.level == before
    with pytest.raises(RuntimeError):
        with quiet_third_party():
            print("LatentDiffusion: Running in eps-prediction mode")
            raise RuntimeError("building failed")
    assert "Running in eps-prediction mode" in capsys.readouterr().out
    monkeypatch.setenv("LORA_STUDIO_VERBOSE", "1")
    with quiet_third_party():
        print("shown when asked")
    assert "shown when asked" in capsys.readouterr().out
