"""Our network types against LyCORIS (lycoris-lora 4.1.3) FORWARD output.

Each case builds a real LyCORIS module on a real nn.Linear / nn.Conv2d / norm layer, randomises every parameter
(LyCORIS zero-initialises halves, which would make equality trivial), takes module.state_dict() as the file
tensors, and compares layer(x) with the LyCORIS module applied against F.linear/F.conv2d with our W + dW.
LyCORIS' merge path (get_merged_weight) is NOT used: it applies alpha/r twice for LoHa/LoKr (lora-formats.md §2.2).
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lib_lora.networks import ModuleContext, build_module, describe

lycoris = pytest.importorskip("lycoris")
from lycoris.modules.boft import ButterflyOFTModule  # noqa: E402
from lycoris.modules.diag_oft import DiagOFTModule  # noqa: E402
from lycoris.modules.full import FullModule  # noqa: E402
from lycoris.modules.glora import GLoRAModule  # noqa: E402
from lycoris.modules.ia3 import IA3Module  # noqa: E402
from lycoris.modules.locon import LoConModule  # noqa: E402
from lycoris.modules.loha import LohaModule  # noqa: E402
from lycoris.modules.lokr import LokrModule  # noqa: E402
from lycoris.modules.norms import NormModule  # noqa: E402

CTX = ModuleContext(writer="lycoris", adapter_config=None, module_key="lycoris_test")


def make_layer(kind, seed=0):
    torch.manual_seed(seed)
    if kind == "linear":
        layer = nn.Linear(24, 32)
    elif kind == "linear_sq":
        layer = nn.Linear(64, 64)
    elif kind == "conv3":
        layer = nn.Conv2d(16, 32, 3, padding=1)
    elif kind == "conv3s":
        layer = nn.Conv2d(16, 32, 3, stride=2, padding=1)
    elif kind == "conv1":
        layer = nn.Conv2d(16, 32, 1)
    elif kind == "layernorm":
        layer = nn.LayerNorm(32)
    elif kind == "groupnorm":
        layer = nn.GroupNorm(4, 32)
    else:
        raise ValueError(kind)
    with torch.no_grad():  # non-trivial bias/affine so bias deltas and norms matter
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return layer


def make_input(layer, seed=1):
    g = torch.Generator().manual_seed(seed)
    if isinstance(layer, nn.Linear):
        return torch.randn(5, layer.in_features, generator=g)
    if isinstance(layer, nn.Conv2d):
        return torch.randn(2, layer.in_channels, 7, 7, generator=g)
    if isinstance(layer, nn.LayerNorm):
        return torch.randn(5, layer.normalized_shape[0], generator=g)
    return torch.randn(2, layer.num_channels, 4, 4, generator=g)


def randomise(mod, seed=2, std=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in mod.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name == "dora_scale":
                p.mul_(1 + 0.3 * noise.abs())  # keep magnitudes positive, move them off ||W||
            elif name == "rescale":
                p.copy_(1 + 0.2 * noise)
            elif name == "oft_blocks":
                p.copy_(0.1 * noise)
            else:
                p.copy_(std * noise)


def run_forward(layer, x, W, b):
    if isinstance(layer, nn.Linear):
        return F.linear(x, W, b)
    if isinstance(layer, nn.Conv2d):
        return F.conv2d(x, W, b, layer.stride, layer.padding, layer.dilation, layer.groups)
    if isinstance(layer, nn.LayerNorm):
        return F.layer_norm(x, layer.normalized_shape, W, b, layer.eps)
    return F.group_norm(x, layer.num_groups, W, b, layer.eps)


def file_tensors(mod):
    return {k: v.detach().clone() for k, v in mod.state_dict().items()}


def check_against_lycoris(cls, layer_kind, multiplier=1.0, pre_apply=False, tweak=None, ctx=CTX, **kwargs):
    """Build LyCORIS module `cls` on a fresh layer, randomise, compare forward outputs. Returns our module."""
    layer = make_layer(layer_kind)
    W0 = layer.weight.detach().clone()
    b0 = layer.bias.detach().clone() if layer.bias is not None else None
    x = make_input(layer)
    y_plain = layer(x).detach()

    mod = cls("lycoris_test", layer, multiplier=multiplier, **kwargs)
    randomise(mod)
    if tweak is not None:
        tweak(mod)
    if pre_apply:  # FullModule only exports a correct 'diff' after apply_to
        mod.apply_to()
        sd = file_tensors(mod)
    else:
        sd = file_tensors(mod)
        mod.apply_to()
    with torch.no_grad():
        y_ref = layer(x)

    ours = build_module(sd, ctx)
    dW, dB = ours.delta(W0, multiplier)
    assert dW.dtype == torch.float32 and dW.shape == W0.shape
    b_new = b0 if dB is None else (b0 + dB if b0 is not None else dB)
    y_ours = run_forward(layer, x, W0 + dW, b_new)

    # the comparison must be able to fail: the network has to move the output noticeably
    assert (y_ref - y_plain).abs().max() > 1e-2, "test set-up error: LyCORIS module changes nothing"
    torch.testing.assert_close(y_ours, y_ref, rtol=1e-4, atol=1e-4)
    return ours


MULTS = [1.0, 0.5]


# ---------------------------------------------------------------- LoRA / LoCon
@pytest.mark.parametrize("m", MULTS)
@pytest.mark.parametrize("layer_kind,tucker", [("linear", False), ("conv3", False), ("conv3", True),
                                               ("conv3s", True), ("conv1", False)])
def test_locon(layer_kind, tucker, m):
    ours = check_against_lycoris(LoConModule, layer_kind, m, lora_dim=4, alpha=3.0, use_tucker=tucker)
    assert ours.kind in ("lora", "locon") and ours.rank() == 4
    assert ("tucker" in describe(ours)) == tucker


def test_locon_rslora_file_alpha():
    # LyCORIS stores alpha*sqrt(r) for rs_lora so that alpha/r readers get alpha/sqrt(r)
    check_against_lycoris(LoConModule, "linear", 1.0, lora_dim=4, alpha=3.0, rs_lora=True)


# ---------------------------------------------------------------- LoHa
@pytest.mark.parametrize("m", MULTS)
@pytest.mark.parametrize("layer_kind,tucker", [("linear", False), ("conv3", False), ("conv3", True)])
def test_loha(layer_kind, tucker, m):
    ours = check_against_lycoris(LohaModule, layer_kind, m, lora_dim=4, alpha=2.0, use_tucker=tucker)
    assert ours.kind == "loha" and ours.rank() == 4


# ---------------------------------------------------------------- LoKr
LOKR_CASES = [
    # (layer, kwargs, expected describe fragment)
    ("linear", dict(lora_dim=2), "w1 full, w2 a/b"),
    ("linear_sq", dict(lora_dim=2, decompose_both=True), "w1 a/b, w2 a/b"),
    ("linear", dict(lora_dim=2, full_matrix=True), "w1 full, w2 full"),
    ("linear", dict(lora_dim=2, factor=4), "w1 full, w2 a/b"),
    ("conv3", dict(lora_dim=2), "w1 full, w2 a/b"),
    ("conv3", dict(lora_dim=2, use_tucker=True), "w1 full, w2 tucker"),
    ("conv3", dict(lora_dim=16), "w1 full, w2 full"),  # rank too big -> LyCORIS forces a full w2
]


@pytest.mark.parametrize("m", MULTS)
@pytest.mark.parametrize("layer_kind,kw,desc", LOKR_CASES)
def test_lokr(layer_kind, kw, desc, m):
    ours = check_against_lycoris(LokrModule, layer_kind, m, alpha=3.0, **kw)
    assert desc in describe(ours), describe(ours)


# ---------------------------------------------------------------- IA3
@pytest.mark.parametrize("m", MULTS)
@pytest.mark.parametrize("layer_kind", ["linear", "conv3"])
@pytest.mark.parametrize("on_input", [False, True])
def test_ia3(layer_kind, on_input, m):
    ours = check_against_lycoris(IA3Module, layer_kind, m, train_on_input=on_input)
    assert ours.kind == "ia3" and ours.on_input == on_input


# ---------------------------------------------------------------- full
@pytest.mark.parametrize("m", MULTS)
@pytest.mark.parametrize("layer_kind", ["linear", "conv3"])
def test_full(layer_kind, m):
    ours = check_against_lycoris(FullModule, layer_kind, m, pre_apply=True)
    assert ours.kind == "full" and ours.diff_b is not None


# ---------------------------------------------------------------- norm
@pytest.mark.parametrize("m", MULTS)
@pytest.mark.parametrize("layer_kind", ["layernorm", "groupnorm"])
def test_norm(layer_kind, m):
    ours = check_against_lycoris(NormModule, layer_kind, m)
    assert ours.kind == "norm"


# ---------------------------------------------------------------- diag-OFT
@pytest.mark.parametrize("m", MULTS)
@pytest.mark.parametrize("layer_kind,constraint,rescaled", [
    ("linear", 0.0, False),
    ("linear", 1e-3, False),  # constraint alpha*O active (||Q|| > 0.032)
    ("conv3", 0.0, False),
    ("linear", 0.0, True),
    ("conv3", 1e-3, True),
])
def test_diag_oft(layer_kind, constraint, rescaled, m):
    ours = check_against_lycoris(DiagOFTModule, layer_kind, m, lora_dim=4, constraint=constraint,
                                 rescaled=rescaled)
    assert ours.kind == "oft" and "lycoris diag" in describe(ours)


def test_diag_oft_constraint_is_active():
    # the constrained case above is only meaningful if LyCORIS actually clamps Q
    layer = make_layer("linear")
    mod = DiagOFTModule("t", layer, lora_dim=4, constraint=1e-3)
    randomise(mod)
    q = mod.oft_blocks - mod.oft_blocks.transpose(1, 2)
    assert torch.norm(q) > mod.constraint


# ---------------------------------------------------------------- BOFT
@pytest.mark.parametrize("m", MULTS)
@pytest.mark.parametrize("layer_kind,constraint,rescaled", [
    ("linear", 0.0, False),
    ("linear", 1e-3, True),
    ("conv3", 0.0, False),
])
def test_boft(layer_kind, constraint, rescaled, m):
    ours = check_against_lycoris(ButterflyOFTModule, layer_kind, m, lora_dim=4, constraint=constraint,
                                 rescaled=rescaled)
    assert ours.kind == "boft" and ours.blocks.shape[0] > 1  # several butterfly factors exercised


# ---------------------------------------------------------------- GLoRA
@pytest.mark.parametrize("m", MULTS)
@pytest.mark.parametrize("layer_kind", ["linear", "linear_sq", "conv3"])
def test_glora(layer_kind, m):
    ours = check_against_lycoris(GLoRAModule, layer_kind, m, lora_dim=4, alpha=2.0)
    assert "new layout" in describe(ours) and ours.rank() == 4


def _glora_tucker(mod):
    # LyCORIS 4.1.3 never enables GLoRA tucker (its use_tucker test is self-contradictory), but its weight
    # function honours bm: build the tucker B factors by hand so its _glora_weight runs the bm branch.
    layer = mod.org_module[0]
    g = torch.Generator().manual_seed(7)
    r = mod.lora_dim
    mod.b2 = nn.Conv2d(layer.in_channels, r, 1, bias=False)
    mod.bm = nn.Conv2d(r, r, layer.kernel_size, layer.stride, layer.padding, bias=False)
    with torch.no_grad():
        mod.b2.weight.copy_(0.2 * torch.randn(mod.b2.weight.shape, generator=g))
        mod.bm.weight.copy_(0.2 * torch.randn(mod.bm.weight.shape, generator=g))
    mod.tucker = True


@pytest.mark.parametrize("m", MULTS)
def test_glora_tucker_bm(m):
    ours = check_against_lycoris(GLoRAModule, "conv3", m, lora_dim=4, alpha=2.0, tweak=_glora_tucker)
    assert ours.bm is not None and "tucker" in describe(ours)


# ---------------------------------------------------------------- DoRA (dora_wd)
@pytest.mark.parametrize("m", MULTS)
@pytest.mark.parametrize("cls,layer_kind,kw", [
    (LoConModule, "linear", dict(lora_dim=4)),
    (LoConModule, "conv3", dict(lora_dim=4)),
    (LoConModule, "conv3", dict(lora_dim=4, use_tucker=True)),
    (LohaModule, "linear", dict(lora_dim=4)),
    (LokrModule, "linear", dict(lora_dim=2)),
    (LokrModule, "conv3", dict(lora_dim=2)),
])
@pytest.mark.parametrize("wd_on_out", [True, False])
def test_dora_lycoris(cls, layer_kind, kw, wd_on_out, m):
    ours = check_against_lycoris(cls, layer_kind, m, alpha=3.0, weight_decompose=True, wd_on_out=wd_on_out, **kw)
    assert ours.is_dora and ours.formula == "lycoris"
    assert ("per-output" if wd_on_out else "per-input") in describe(ours)


# ---------------------------------------------------------------- whole network via create_lycoris
@pytest.mark.parametrize("algo", ["lora", "loha", "lokr"])
def test_create_lycoris_network(algo):
    from lycoris import LycorisNetwork, create_lycoris

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 32))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    x = torch.randn(4, 16)
    orig = {n: p.detach().clone() for n, p in model.named_parameters()}
    LycorisNetwork.apply_preset({"target_name": [".*"]})
    net = create_lycoris(model, 1.0, linear_dim=4, linear_alpha=2, algo=algo)
    net.apply_to()
    randomise(net)
    net.set_multiplier(0.5)
    with torch.no_grad():
        y_ref = model(x)
    sd = {k: v.detach().clone() for k, v in net.state_dict().items()}
    groups = {}
    for k, v in sd.items():
        mk, suffix = k.split(".", 1)
        groups.setdefault(mk, {})[suffix] = v
    assert set(groups) == {"lycoris_0", "lycoris_2"}
    from lib_lora.formats.keymap import group_modules  # the loader's splitter must agree with ours
    assert {mk: set(sub) for mk, sub in group_modules(sd).items()} == {mk: set(g) for mk, g in groups.items()}
    W = {}
    for idx in (0, 2):
        w = orig[f"{idx}.weight"]
        mod = build_module(groups[f"lycoris_{idx}"], ModuleContext("lycoris", None, f"lycoris_{idx}"))
        W[idx] = w + mod.delta(w, 0.5)[0]
    h = F.gelu(F.linear(x, W[0], orig["0.bias"]))
    y_ours = F.linear(h, W[2], orig["2.bias"])
    torch.testing.assert_close(y_ours, y_ref, rtol=1e-4, atol=1e-4)
    net.restore()
