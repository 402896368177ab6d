"""weighted_captions: A1111-style emphasis in training captions scales those tokens' hidden states (sd-scripts'
encode_tokens_with_weights), the pooled SDXL output stays as it is.

References: the worked examples in the docstring of A1111's modules/prompt_parser.parse_prompt_attention (also
in sd-scripts' copy), and a closed form: the weighted hidden states are the plain ones times each token's weight.
"""
import pytest
import torch

import models
import train_data
from lib_lora.formats.safetensors_io import load_tensors
from lib_lora.host.base import ModelHost
from lib_lora.train.conditioning import TextEncoder, parse_prompt_attention
from lib_lora.train.config import parse_train_config
from lib_lora.train.run import plan_for
from lib_lora.train.support import check_support
from lib_lora.train.trainer import Trainer

# A1111 v1.10.1 modules/prompt_parser.py, parse_prompt_attention's docstring (input -> documented output)
A1111_EXAMPLES = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
]


@pytest.mark.parametrize("text,want", A1111_EXAMPLES)
def test_emphasis_is_parsed_as_a1111_documents(text, want):
    got = parse_prompt_attention(text)
    assert [t for t, _ in got] == [t for t, _ in want]
    assert [w for _, w in got] == pytest.approx([w for _, w in want], rel=1e-12)


def test_a1111_spacing_around_the_number_is_read_too():
    assert parse_prompt_attention("(red hair: 1.3 ), smile") == [("red hair", 1.3), (", smile", 1.0)]
    assert parse_prompt_attention("") == [("", 1.0)]


@pytest.fixture(scope="module")
def sd1():
    return models.make_sd1(seed=6)


@pytest.fixture(scope="module")
def sdxl():
    return models.make_sdxl(seed=6)


@pytest.mark.parametrize("max_tokens", [75, 150])
def test_weights_scale_the_hidden_states_of_their_tokens_sd1(sd1, max_tokens):
    plain = TextEncoder(sd1, "sd1", max_token_length=max_tokens)
    weighted = TextEncoder(sd1, "sd1", max_token_length=max_tokens, weighted=True)
    filler = ", ".join(["grass"] * 40) + ", " if max_tokens == 150 else ""  # pushes the bear into chunk 2
    cap_w = filler + "a (bear:1.5) in [snow]"
    cap_p = filler + "a bear in snow"
    (ids_w, w), _ = weighted.tokenize([cap_w])
    ids_p, _ = plain.tokenize([cap_p])
    assert torch.equal(ids_w, ids_p)  # the brackets are not tokens
    with torch.no_grad():
        hw = weighted.encode((ids_w, w), "cpu")["crossattn"]
        hp = plain.encode(ids_p, "cpu")["crossattn"]
    flat_w = w.reshape(-1)
    vocab = plain.spec.encode
    bear, snow = vocab("bear")[0], vocab("snow")[0]
    ids = ids_p.reshape(-1)
    assert set(flat_w[ids == bear].tolist()) == {1.5}
    assert flat_w[ids == snow].tolist() == pytest.approx([1 / 1.1])
    assert int((flat_w != 1).sum()) == 2  # BOS, EOS, padding and the rest keep 1
    torch.testing.assert_close(hw, hp * flat_w[None, :, None], rtol=1e-6, atol=1e-6)


def test_sdxl_weights_both_encoders_and_leaves_the_pooled_output(sdxl):
    plain = TextEncoder(sdxl, "sdxl")
    weighted = TextEncoder(sdxl, "sdxl", weighted=True)
    toks, _ = weighted.tokenize(["a photo of a (bear:0.5)"])
    assert len(toks) == 4
    ids_p, _ = plain.tokenize(["a photo of a bear"])
    assert torch.equal(toks[0], ids_p[0]) and torch.equal(toks[1], ids_p[1])
    with torch.no_grad():
        w_out = weighted.encode(toks, "cpu")
        p_out = plain.encode(ids_p, "cpu")
    torch.testing.assert_close(w_out["pooled"], p_out["pooled"])
    assert p_out["crossattn"].shape[-1] == 768 + 1280
    c1 = 768  # TE1 (CLIP-L) width; TE2 (bigG) follows
    scale1 = toks[2].reshape(1, -1, 1)
    scale2 = toks[3].reshape(1, -1, 1)
    want = torch.cat([p_out["crossattn"][..., :c1] * scale1, p_out["crossattn"][..., c1:] * scale2], -1)
    torch.testing.assert_close(w_out["crossattn"], want, rtol=1e-6, atol=1e-6)
    assert float(scale1.min()) == 0.5 and float(scale2.min()) == 0.5


def test_weighted_captions_train_and_are_no_longer_reported_as_ignored(sd1, tmp_path):
    img, _ = train_data.make_dataset(str(tmp_path / "d"), n_concept=2, repeats=1,
                                     captions=["svs cat, (bear:1.3), snow", "svs cat, [bear], grass"])
    c = {"train_data_dir": img, "resolution": 64, "output_dir": str(tmp_path / "out"), "learning_rate": 1e-3,
         "max_train_steps": 2, "seed": 2, "weighted_captions": True, "shuffle_caption": True}
    cfg = parse_train_config(c, base_dir=str(tmp_path))
    errors, notes = check_support(cfg, "sd1")
    assert not errors and not any("weighted_captions = True is not supported" in n for n in notes)
    assert any("keep commas out of the brackets" in n for n in notes)
    host = ModelHost(sd1, "m")
    res = Trainer(host, cfg, plan_for(host, cfg)).run()
    assert res.status == "done" and any(k.startswith("lora_te_") for k in load_tensors(res.final))
