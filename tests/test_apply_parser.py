import pytest

from lib_lora.apply.parser import LoraRef, LoraTagError, parse_params, parse_prompt, parse_prompt_lenient


def ref(name, te=1.0, unet=None, dyn=None, named=None):
    return (name, te, te if unet is None else unet, dyn, named or {})


def as_tuple(r: LoraRef):
    return (r.name, r.te, r.unet, r.dyn, r.named)


CASES = [
    # (prompt, clean text, [expected refs])
    ("a cat <lora:cat>", "a cat ", [ref("cat")]),
    ("a cat <lora:cat:0.5>", "a cat ", [ref("cat", 0.5)]),
    ("<lora:cat:0.5:0.25>x", "x", [ref("cat", 0.5, 0.25)]),
    ("<lora:cat:0.5:0.25:8>", "", [ref("cat", 0.5, 0.25, 8)]),
    ("<lora:cat:1:0>", "", [ref("cat", 1.0, 0.0)]),
    ("<lora:cat:-1.5>", "", [ref("cat", -1.5)]),
    ("<lora:cat:.5>", "", [ref("cat", 0.5)]),
    ("<lora:cat:1e-1>", "", [ref("cat", 0.1)]),
    # named forms; unet defaults to te AFTER te= is applied (A1111)
    ("<lora:cat:te=0.3>", "", [ref("cat", 0.3, 0.3)]),
    ("<lora:cat:unet=0.7>", "", [ref("cat", 1.0, 0.7)]),
    ("<lora:cat:te=0.3:unet=0.7:dyn=4>", "", [ref("cat", 0.3, 0.7, 4)]),
    ("<lora:cat:0.9:te=0.2>", "", [ref("cat", 0.2, 0.2)]),
    ("<lora:cat:0.9:0.8:unet=0.1>", "", [ref("cat", 0.9, 0.1)]),
    ("<lora:cat:0.9:dyn=16>", "", [ref("cat", 0.9, 0.9, 16)]),
    ("<lora:cat:1:1:8:dyn=2>", "", [ref("cat", 1.0, 1.0, 2)]),
    # names: spaces, unicode, subfolders, dots, dashes
    ("<lora:my cat lora:0.6>", "", [ref("my cat lora", 0.6)]),
    ("<lora:猫のロラ:0.7>", "", [ref("猫のロラ", 0.7)]),
    ("<lora:Ünïcødé-ñame_v1.0>", "", [ref("Ünïcødé-ñame_v1.0")]),
    ("<lora:sub/dir/name:0.4>", "", [ref("sub/dir/name", 0.4)]),
    ("<lora:sub\\win\\name>", "", [ref("sub\\win\\name")]),
    ("<lora: spaced :0.5>", "", [ref("spaced", 0.5)]),
    ("<lora:cat: 0.5 : 0.25 >", "", [ref("cat", 0.5, 0.25)]),
    # unknown named args are kept and ignored (lora-block-weight)
    ("<lora:cat:1:lbw=OUTD>", "", [ref("cat", 1.0, named={"lbw": "OUTD"})]),
    ("<lora:cat:0.8:lbw=1,0,0,0,1,1,1,1,1,1,1,1,1,1,1,1,1:start=5:stop=20>", "",
     [ref("cat", 0.8, named={"lbw": "1,0,0,0,1,1,1,1,1,1,1,1,1,1,1,1,1", "start": "5", "stop": "20"})]),
    # several tags, order kept, duplicates kept
    ("<lora:a:0.1>, b <lora:b:0.2> c<lora:a:0.3>", ", b  c",
     [ref("a", 0.1), ref("b", 0.2), ref("a", 0.3)]),
    # inside emphasis / prompt editing: removed wherever it is
    ("(a <lora:x:0.5>:1.2) [b:<lora:y>:0.5]", "(a :1.2) [b::0.5]", [ref("x", 0.5), ref("y")]),
    # lyco alias
    ("<lyco:old:0.5>", "", [ref("old", 0.5)]),
    # other extra networks are left in the text
    ("<hypernet:h:1> <lora:x>", "<hypernet:h:1> ", [ref("x")]),
    # not tags
    ("no tags here", "no tags here", []),
    ("<lora>", "<lora>", []),
    ("<lora:>", "<lora:>", []),
    ("a < b > c", "a < b > c", []),
    # empty positional number = default
    ("<lora:cat::0.5>", "", [ref("cat", 1.0, 0.5)]),
    ("<lora:cat:0.5::4>", "", [ref("cat", 0.5, 0.5, 4)]),
]


@pytest.mark.parametrize("prompt,clean,expected", CASES, ids=[c[0] for c in CASES])
def test_parse_prompt(prompt, clean, expected):
    text, refs = parse_prompt(prompt)
    assert text == clean
    assert [as_tuple(r) for r in refs] == expected


@pytest.mark.parametrize("prompt,fragment", [
    ("<lora:cat:abc>", "'abc' is not a number"),
    ("<lora:cat:1:x>", "UNet multiplier 'x'"),
    ("<lora:cat:te=zz>", "te="),
    ("<lora:cat:unet=>", None),  # empty named value = default, not an error
    ("<lora:cat:1:1:4.5>", "dyn '4.5' is not a whole number"),
    ("<lora:cat:dyn=x>", "dyn 'x'"),
    ("<lora:cat:dyn=0>", "positive rank"),
    ("<lora:cat:nan>", "not a finite number"),
    ("<lora:cat:inf>", "not a finite number"),
    ("<lora: :1>", "no LoRA name"),
    ("<lora:cat:1e9>", "the weight 1e9 is far beyond what a LoRA takes (usually -2 to 2; at most"),
    ("<lora:cat:abc>", "the weight 'abc' is not a number"),
    ("<lora:cat:abc:1>", "the text-encoder multiplier 'abc' is not a number"),
    ("<lora:cat:1:-150>", "the UNet multiplier -150 is far beyond"),
])
def test_bad_numbers_name_the_tag(prompt, fragment):
    if fragment is None:
        _, refs = parse_prompt(prompt)
        assert refs[0].unet == 1.0
        return
    with pytest.raises(LoraTagError) as ei:
        parse_prompt(prompt)
    msg = str(ei.value)
    assert fragment in msg
    assert prompt.strip() in msg or "<lora:" in msg  # the tag is quoted
    assert isinstance(ei.value, ValueError)


def test_a_large_weight_is_applied_with_a_note():
    _, refs = parse_prompt("<lora:cat:8> <lora:dog:1:-6> <lora:ok:2:-2>")
    assert [r.unet for r in refs] == [8.0, -6.0, -2.0]
    assert refs[0].notes() == ["<lora:cat:8>: weight 8 is far outside the usual -2 to 2; expect a broken or black image"]
    assert "weight -6 is far outside" in refs[1].notes()[0] and refs[2].notes() == []


def test_error_message_quotes_whole_tag():
    with pytest.raises(LoraTagError, match=r"<lora:my lora:0\.5:oops>"):
        parse_prompt("x <lora:my lora:0.5:oops> y")


def test_lenient_collects_errors_and_keeps_good_tags():
    text, refs, errors = parse_prompt_lenient("a <lora:bad:x> b <lora:good:0.5>")
    assert text == "a  b "
    assert [r.name for r in refs] == ["good"]
    assert len(errors) == 1 and "<lora:bad:x>" in errors[0]


def test_notes_report_ignored_args():
    _, refs = parse_prompt("<lora:cat:1:1:4:extra:lbw=OUTD>")
    r = refs[0]
    assert r.extra_positional == ["extra"]
    notes = r.notes()
    assert any("lbw=OUTD" in n and "ignored" in n for n in notes)
    assert any("extra" in n for n in notes)
    _, refs = parse_prompt("<lora:cat:0.5>")
    assert refs[0].notes() == []


@pytest.mark.parametrize("items,expected", [
    (["cat"], ref("cat")),
    (["cat", "0.5"], ref("cat", 0.5)),
    (["cat", "0.5", "0.1", "8"], ref("cat", 0.5, 0.1, 8)),
    (["cat", "te=0.5"], ref("cat", 0.5, 0.5)),
    (["cat", 0.75], ref("cat", 0.75)),  # A1111 appends a float for the auto-added default LoRA
    (["cat", "1", "lbw=ALL", "start=3"], ref("cat", named={"lbw": "ALL", "start": "3"})),
    (["sub/dir/name", "0.2"], ref("sub/dir/name", 0.2)),
])
def test_parse_params(items, expected):
    assert as_tuple(parse_params(items)) == expected


def test_parse_params_errors():
    with pytest.raises(LoraTagError):
        parse_params([])
    with pytest.raises(LoraTagError, match="<lora:x:bad>"):
        parse_params(["x", "bad"])


def test_a_equals_b_three_parts_is_positional_like_a1111():
    # `split('=', 2)` yields 3 parts → positional → read as the te number → error naming the tag
    with pytest.raises(LoraTagError, match="a=b=c"):
        parse_params(["x", "a=b=c"])
