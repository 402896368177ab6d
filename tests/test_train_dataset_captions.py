"""Caption processing and caption files, against sd-scripts' documented order (training-anchors.md §1.2, §1.6)."""

import random

import pytest

from lib_lora.train.captions import (
    CaptionFileError,
    CaptionOptions,
    contains_word,
    find_caption,
    process_caption,
    tag_frequency,
)


def test_prefix_suffix_joined_with_spaces_and_first_line_only():
    o = CaptionOptions(caption_prefix="svs", caption_suffix="best quality")
    assert process_caption("a cat, sitting", o, random.Random(0)) == "svs a cat, sitting best quality"
    assert process_caption("line one\nline two", CaptionOptions(), random.Random(0)) == "line one"


def test_caption_dropout_rate_and_every_n_epochs():
    assert process_caption("a, b", CaptionOptions(caption_dropout_rate=1.0), random.Random(0)) == ""
    rng = random.Random(7)
    state = rng.getstate()
    assert process_caption("a, b", CaptionOptions(), rng) == "a, b"
    assert rng.getstate() == state  # no option -> no random draw (keeps sequences aligned with sd-scripts)
    o = CaptionOptions(caption_dropout_every_n_epochs=2)
    # epochs are 1-based; dropped when epoch % 2 == 0
    got = [process_caption("a, b", o, random.Random(0), epoch=e) for e in (1, 2, 3, 4)]
    assert got == ["a, b", "", "a, b", ""]


def test_shuffle_keeps_first_keep_tokens_and_uses_rng_like_random_shuffle():
    o = CaptionOptions(shuffle_caption=True, keep_tokens=1)
    seen = set()
    for seed in range(30):
        out = process_caption("svs, a, b, c", o, random.Random(seed))
        tags = out.split(", ")
        assert tags[0] == "svs" and sorted(tags[1:]) == ["a", "b", "c"]
        # the rule: fixed part first, then random.shuffle of the rest with the same generator
        rest = ["a", "b", "c"]
        random.Random(seed).shuffle(rest)
        assert tags[1:] == rest
        seen.add(out)
    assert len(seen) > 1


def test_keep_tokens_separator_fixed_prefix_and_suffix():
    o = CaptionOptions(shuffle_caption=True, keep_tokens_separator="|||")
    for seed in range(10):
        out = process_caption("svs, cat ||| a, b ||| best quality", o, random.Random(seed))
        assert out.startswith("svs, cat, ") and out.endswith(", best quality")
        assert sorted(out[len("svs, cat, "):-len(", best quality")].split(", ")) == ["a", "b"]


def test_tag_dropout_keeps_fixed_part_and_secondary_separator_groups():
    o = CaptionOptions(caption_tag_dropout_rate=1.0, keep_tokens=1)
    assert process_caption("svs, a, b", o, random.Random(0)) == "svs"
    o = CaptionOptions(shuffle_caption=True, secondary_separator=";;;")
    for seed in range(10):
        out = process_caption("x;;;y, z", o, random.Random(seed))
        # the group "x;;;y" moves as one tag and becomes "x,y" (caption_separator) at the end
        assert out in ("x,y, z", "z, x,y")


def test_wildcards():
    o = CaptionOptions(enable_wildcard=True)
    outs = {process_caption("{red|blue} cat", o, random.Random(s)) for s in range(20)}
    assert outs == {"red cat", "blue cat"}
    assert process_caption("{{literal}} cat", o, random.Random(0)) == "{literal} cat"


def test_token_warmup():
    o = CaptionOptions(token_warmup_min=1, token_warmup_step=10)
    cap = "a, b, c, d, e"
    # step 0: floor(0) + 1 = 1 tag; step 5: floor(5 * (5-1)/10) + 1 = 3 tags; step 10: warmup over -> all 5
    assert process_caption(cap, o, random.Random(0), step=0) == "a"
    assert process_caption(cap, o, random.Random(0), step=5) == "a, b, c"
    assert process_caption(cap, o, random.Random(0), step=10) == "a, b, c, d, e"
    # a fraction is of max_train_steps: 0.5 * 20 = 10 steps
    o = CaptionOptions(token_warmup_min=1, token_warmup_step=0.5)
    assert process_caption(cap, o, random.Random(0), step=5, max_train_steps=20) == "a, b, c"


def test_tag_frequency_raw_captions():
    # split on ",", strip, lower-case, skip empty; the folder fallback "svs cat" counts as one tag
    freq = tag_frequency(["svs, Cat, red", "svs, cat", "svs cat", ""])
    assert freq == {"svs": 2, "cat": 2, "red": 1, "svs cat": 1}


def test_caption_files(tmp_path):
    img = tmp_path / "a.png"
    img.write_bytes(b"")
    (tmp_path / "a.txt").write_text("first line\nsecond line\n", encoding="utf-8")
    assert find_caption(img, ".txt") == ("first line", tmp_path / "a.txt")
    assert find_caption(img, ".txt", enable_wildcard=True)[0] == "first line\nsecond line"
    assert find_caption(img, ".caption") == (None, None)
    # face-crop names: stem with >= 5 "_" fields falls back to the stem without the last four
    face = tmp_path / "b_10_20_30_40.png"
    (tmp_path / "b.txt").write_text("face caption", encoding="utf-8")
    assert find_caption(face, ".txt")[0] == "face caption"
    (tmp_path / "e.txt").write_text("", encoding="utf-8")
    with pytest.raises(CaptionFileError, match="empty"):
        find_caption(tmp_path / "e.png", ".txt")
    (tmp_path / "l.txt").write_bytes("caf\u00e9".encode("latin-1"))
    with pytest.raises(CaptionFileError, match="not UTF-8"):
        find_caption(tmp_path / "l.png", ".txt")
    (tmp_path / "bom.txt").write_text("svs cat, caf\u00e9", encoding="utf-8-sig")  # (Windows Notepad's UTF-8)
    assert find_caption(tmp_path / "bom.png", ".txt")[0] == "svs cat, caf\u00e9"


def test_contains_word():
    assert contains_word("svs, a cat", "svs")
    assert contains_word("SVS cat", "svs")
    assert not contains_word("svsx, cat", "svs")
    assert not contains_word("a cat", "svs")
