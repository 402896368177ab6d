"""Patcher: merge/restore on a small model with every supported layer type, with fake networks.

The fake network modules implement only the contract's ``delta(weight, multiplier, dyn, bias)``; the expected merged
weights are computed here independently, in closed form.
"""

import random
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from lib_lora.apply.cache import DeltaCache
from lib_lora.apply.patcher import Patcher

torch.set_num_threads(1)


@dataclass(frozen=True)
class T:  # stands in for formats.keymap.Target
    name: str
    part: str | None = None
    component: str = "unet"


class FakeLora:
    """Plain LoRA: dW = m · (alpha/r) · up[:, :dyn] @ down[:dyn], reshaped to the weight (A1111 dyn semantics)."""
    kind = "lora"

    def __init__(self, up, down, alpha=None, bias=None):
        self.up, self.down = up, down
        self.alpha = alpha
        self.bias = bias
        self.calls = 0

    def rank(self):
        return self.down.shape[0]

    def scale(self):
        return 1.0 if self.alpha is None else self.alpha / self.down.shape[0]

    def delta(self, weight, multiplier, dyn=None, bias=None):
        self.calls += 1
        up, down = self.up.float(), self.down.float()
        if dyn is not None:
            up, down = up[:, :dyn], down[:dyn]
        dW = (up.flatten(1) @ down.flatten(1)).reshape(weight.shape) * (self.scale() * multiplier)
        dB = None if self.bias is None else self.bias.float() * multiplier
        return dW.to(weight.device), (None if dB is None else dB.to(weight.device))


class FakeNorm:
    kind = "norm"

    def __init__(self, w, b):
        self.w, self.b = w, b

    def delta(self, weight, multiplier, dyn=None, bias=None):
        return self.w.float() * multiplier, self.b.float() * multiplier


class FakeScaleW:
    """Non-linear-in-W type (IA3/DoRA-like): dW = m · s ⊙ W — depends on the weight it is given."""
    kind = "ia3"

    def __init__(self, s):
        self.s = s

    def delta(self, weight, multiplier, dyn=None, bias=None):
        return weight.float() * self.s * multiplier, None


class Broken:
    kind = "lora"

    def delta(self, weight, multiplier, dyn=None, bias=None):
        raise RuntimeError("shape mismatch on purpose")


class FakeNet:
    def __init__(self, name, modules):
        self.name = name
        self.key = ("fake", name)
        self.modules = modules  # target_name -> [(Target, module)]


class Tiny(nn.Module):
    def __init__(self, d=16, heads=4):
        super().__init__()
        self.lin = nn.Linear(d, 24)
        self.lin_nobias = nn.Linear(24, d, bias=False)
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.conv1x1 = nn.Conv2d(8, 8, 1)
        self.gn = nn.GroupNorm(2, 8)
        self.ln = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads)
        self.emb = nn.Embedding(10, d)
        with torch.no_grad():  # non-trivial norms
            for m in (self.gn, self.ln):
                m.weight.normal_()
                m.bias.normal_()
            self.attn.in_proj_bias.normal_()
            self.attn.out_proj.bias.normal_()


def mapping_of(model):
    return {n.replace(".", "_"): m for n, m in model.named_modules()}


def rnd(*shape, g):
    return torch.randn(*shape, generator=g) * 0.1


def make_lora_for(module, g, rank=4, part=False, bias=False):
    if isinstance(module, nn.Conv2d):
        o, i, kh, kw = module.weight.shape
        return FakeLora(rnd(o, rank, 1, 1, g=g), rnd(rank, i, kh, kw, g=g), alpha=float(rank) / 2,
                        bias=rnd(o, g=g) if bias else None)
    if isinstance(module, nn.MultiheadAttention):
        d = module.embed_dim
        return FakeLora(rnd(d, rank, g=g), rnd(rank, d, g=g), alpha=1.0, bias=rnd(d, g=g) if bias else None)
    o, i = module.weight.shape
    return FakeLora(rnd(o, rank, g=g), rnd(rank, i, g=g), alpha=2.0, bias=rnd(o, g=g) if bias else None)


def make_nets(model, seed=0):
    """Three networks with overlapping targets over all layer types (one with q/v only on the MHA)."""
    g = torch.Generator().manual_seed(seed)
    mp = mapping_of(model)
    d = model.ln.weight.shape[0]
    a = {
        "lin": [(T("lin"), make_lora_for(model.lin, g, bias=True))],
        "conv": [(T("conv"), make_lora_for(model.conv, g))],
        "gn": [(T("gn"), FakeNorm(rnd(8, g=g), rnd(8, g=g)))],
        "attn": [(T("attn", p, "te1"), make_lora_for(model.attn, g)) for p in ("q", "k", "v")],
        "attn_out_proj": [(T("attn_out_proj", None, "te1"), make_lora_for(mp["attn_out_proj"], g, bias=True))],
    }
    b = {
        "lin": [(T("lin"), make_lora_for(model.lin, g))],
        "conv1x1": [(T("conv1x1"), make_lora_for(model.conv1x1, g))],
        "ln": [(T("ln", None, "te1"), FakeNorm(rnd(d, g=g), rnd(d, g=g)))],
        "attn": [(T("attn", p, "te1"), make_lora_for(model.attn, g, bias=True)) for p in ("q", "v")],
        "lin_nobias": [(T("lin_nobias"), make_lora_for(model.lin_nobias, g))],
    }
    c = {
        "conv": [(T("conv"), make_lora_for(model.conv, g, bias=True))],
        "gn": [(T("gn"), FakeNorm(rnd(8, g=g), rnd(8, g=g)))],
        "ln": [(T("ln", None, "te1"), FakeNorm(rnd(d, g=g), rnd(d, g=g)))],
        "attn": [(T("attn", "k", "te1"), make_lora_for(model.attn, g))],
        "attn_out_proj": [(T("attn_out_proj", None, "te1"), make_lora_for(mp["attn_out_proj"], g))],
        "lin": [(T("lin"), FakeScaleW(rnd(24, d, g=g)))],
    }
    return [FakeNet("a", a), FakeNet("b", b), FakeNet("c", c)]


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items() if v is not None}


def assert_same(model, snap):
    now = {k: v for k, v in model.state_dict(keep_vars=True).items() if v is not None}
    assert now.keys() == snap.keys()
    for k in snap:
        assert now[k].dtype == snap[k].dtype, k
        assert torch.equal(now[k].detach(), snap[k]), k


KEYS = {"attn": ("attn.in_proj_weight", "attn.in_proj_bias"),
        "attn_out_proj": ("attn.out_proj.weight", "attn.out_proj.bias")}


def expected_params(model, orig, wanted):
    """Closed form: for each parameter, (orig.float() + Σ m·ΔW).to(dtype), every ΔW from the ORIGINAL weight."""
    params = {k: v for k, v in orig.items()}
    acc = {}

    def add(key, rows, val):
        base = params[key] if key in params else None
        shape = base.shape if base is not None else val.shape
        a = acc.setdefault(key, torch.zeros(shape))
        if rows is None:
            a += val.reshape(shape)
        else:
            a[rows] += val

    for net, te, unet, dyn in wanted:
        for tname, items in net.modules.items():
            for t, mod in items:
                m = te if t.component != "unet" else unet
                if m == 0:
                    continue
                wkey, bkey = KEYS.get(tname, (f"{tname}.weight", f"{tname}.bias"))
                w = orig[wkey].float()
                rows = None
                if t.part is not None:
                    dd = w.shape[0] // 3
                    i = "qkv".index(t.part)
                    rows = slice(i * dd, (i + 1) * dd)
                    w = w[rows]
                if isinstance(mod, FakeLora):
                    up, down = mod.up.float(), mod.down.float()
                    if dyn is not None:
                        up, down = up[:, :dyn], down[:dyn]
                    dW = m * mod.scale() * (up.flatten(1) @ down.flatten(1)).reshape(w.shape)
                    dB = None if mod.bias is None else m * mod.bias.float()
                elif isinstance(mod, FakeNorm):
                    dW, dB = m * mod.w.float(), m * mod.b.float()
                else:
                    dW, dB = m * mod.s * w, None
                add(wkey, rows, dW)
                if dB is not None:
                    add(bkey, rows, dB)
    out = {}
    for k, a in acc.items():
        base = orig.get(k)
        dtype = base.dtype if base is not None else orig[k[:-4] + "weight"].dtype
        out[k] = ((base.float() if base is not None else 0) + a).to(dtype)
    return out


def check_expected(model, orig, wanted, exact=False):
    exp = expected_params(model, orig, wanted)
    now = dict(model.state_dict(keep_vars=True))
    for k, v in orig.items():
        want = exp.get(k, v)
        got = now[k].detach().cpu()
        if exact or k not in exp:
            assert torch.equal(got, want), k
        else:
            tol = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-2}[got.dtype]
            torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol, msg=k)


DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_1000_random_cycles_bit_exact(dtype):
    torch.manual_seed(0)
    model = Tiny().to(dtype)
    orig = snapshot(model)
    nets = make_nets(model)
    mp = mapping_of(model)
    patcher = Patcher(cache_mb=1.0)
    rng = random.Random(1234)
    mults = [0.0, 0.25, 0.5, 1.0, -0.7, 1.3]
    checks = 0
    for cycle in range(1000):
        if rng.random() < 0.3:
            if rng.random() < 0.5:
                patcher.apply(mp, [])
            else:
                patcher.restore()
            assert_same(model, orig)
            continue
        chosen = rng.sample(nets, rng.randint(1, 3))
        wanted = [(n, rng.choice(mults), rng.choice(mults), rng.choice([None, None, 2])) for n in chosen]
        res = patcher.apply(mp, wanted)
        assert res.ok, res.messages
        if cycle % 50 == 0:
            check_expected(model, orig, wanted)
            checks += 1
    patcher.restore()
    assert_same(model, orig)
    assert not patcher.is_patched()
    assert checks >= 10


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_merged_weights_match_closed_form(dtype):
    torch.manual_seed(1)
    model = Tiny().to(dtype)
    orig = snapshot(model)
    nets = make_nets(model, seed=3)
    mp = mapping_of(model)
    p = Patcher()
    wanted = [(nets[0], 0.8, 0.6, None), (nets[1], -0.5, 1.2, 2), (nets[2], 1.0, 0.3, None)]
    p.apply(mp, wanted)
    check_expected(model, orig, wanted)
    # and the bias-less Linear got a created bias? (b has no bias delta there, so still None)
    assert model.lin_nobias.bias is None
    p.restore()
    assert_same(model, orig)


def test_closed_form_exact_fp32_single_lora():
    """W + m·s·up@down, computed in the test, equals the merged weight for a plain fp32 Linear."""
    torch.manual_seed(2)
    lin = nn.Linear(12, 10)
    w0 = lin.weight.detach().clone()
    up, down = torch.randn(10, 3), torch.randn(3, 12)
    net = FakeNet("x", {"lin": [(T("lin"), FakeLora(up, down, alpha=1.5))]})
    Patcher().apply({"lin": lin}, [(net, 1.0, 0.7, None)])
    torch.testing.assert_close(lin.weight.detach(), w0 + 0.7 * 0.5 * up @ down, rtol=1e-6, atol=1e-6)


def _mha_reference(x, Wq, Wk, Wv, bq, bk, bv, Wo, bo, heads):
    """Attention computed from separate projections (seq, batch, d) layout."""
    L, B, D = x.shape
    hd = D // heads
    q = x @ Wq.T + bq
    k = x @ Wk.T + bk
    v = x @ Wv.T + bv

    def split(t):
        return t.reshape(L, B * heads, hd).transpose(0, 1)

    q, k, v = split(q), split(k), split(v)
    att = torch.softmax((q @ k.transpose(1, 2)) / hd ** 0.5, dim=-1)
    o = (att @ v).transpose(0, 1).reshape(L, B, D)
    return o @ Wo.T + bo


@pytest.mark.parametrize("parts", [("q", "k", "v"), ("q", "v"), ("k",)])
def test_mha_qkv_out_placement(parts):
    torch.manual_seed(3)
    d, heads = 16, 4
    mha = nn.MultiheadAttention(d, heads)
    with torch.no_grad():
        mha.in_proj_bias.normal_()
        mha.out_proj.bias.normal_()
    mha.eval()
    g = torch.Generator().manual_seed(5)
    w_in = mha.in_proj_weight.detach().clone()
    b_in = mha.in_proj_bias.detach().clone()
    Wo, bo = mha.out_proj.weight.detach().clone(), mha.out_proj.bias.detach().clone()
    loras = {p: FakeLora(rnd(d, 2, g=g) * 5, rnd(2, d, g=g) * 5, bias=rnd(d, g=g)) for p in parts}
    out_lora = FakeLora(rnd(d, 2, g=g) * 5, rnd(2, d, g=g) * 5)
    modules = {"attn": [(T("attn", p, "te2"), loras[p]) for p in parts],
               "attn_out_proj": [(T("attn_out_proj", None, "te2"), out_lora)]}
    net = FakeNet("mha", modules)
    mapping = {"attn": mha, "attn_out_proj": mha.out_proj}
    m = 0.9
    Patcher().apply(mapping, [(net, m, 0.0, None)])  # te multiplier applies (component te2)

    W = dict(zip("qkv", w_in.chunk(3)))
    Bv = dict(zip("qkv", b_in.chunk(3)))
    for p in parts:
        lo = loras[p]
        W[p] = W[p] + m * (lo.up @ lo.down)
        Bv[p] = Bv[p] + m * lo.bias
    Wo2 = Wo + m * (out_lora.up @ out_lora.down)
    x = torch.randn(5, 2, d)
    ref = _mha_reference(x, W["q"], W["k"], W["v"], Bv["q"], Bv["k"], Bv["v"], Wo2, bo, heads)
    with torch.no_grad():
        got, _ = mha(x, x, x, need_weights=False)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    # untouched projections: rows bit-identical
    for i, p in enumerate("qkv"):
        if p not in parts:
            assert torch.equal(mha.in_proj_weight.detach()[i * d:(i + 1) * d], w_in[i * d:(i + 1) * d])


def test_mha_q_proj_names_fall_back_like_a1111():
    """A target named `…_attn_q_proj` with no part reaches the MHA rows (A1111's re_x_proj fallback)."""
    d = 8
    mha = nn.MultiheadAttention(d, 2)
    w0 = mha.in_proj_weight.detach().clone()
    lo = FakeLora(torch.ones(d, 1), torch.ones(1, d))
    net = FakeNet("n", {"attn_v_proj": [(T("attn_v_proj", None, "te1"), lo)]})
    res = Patcher().apply({"attn": mha}, [(net, 1.0, 1.0, None)])
    assert res.networks[0].matched == 1
    diff = mha.in_proj_weight.detach() - w0
    assert torch.equal(diff[:2 * d], torch.zeros(2 * d, d))
    torch.testing.assert_close(diff[2 * d:], torch.ones(d, d))


def test_noop_reapply_computes_nothing():
    model = Tiny()
    mp = mapping_of(model)
    nets = make_nets(model)
    p = Patcher()
    wanted = [(nets[0], 1.0, 0.5, None), (nets[1], 0.3, 0.3, None)]
    r1 = p.apply(mp, wanted)
    assert r1.deltas_computed > 0 and r1.modules_merged > 0
    before = p.deltas_computed
    snap = snapshot(model)
    r2 = p.apply(mp, list(wanted))
    assert r2.noop and r2.deltas_computed == 0 and r2.cache_hits == 0
    assert p.deltas_computed == before
    assert r2.modules_unchanged == r1.modules_merged
    assert_same(model, snap)


def _touched(net, mapping):
    return {id(mapping[t]) for t in net.modules}


def _contribs(net):
    return sum(len(v) for v in net.modules.values())


def test_changing_one_multiplier_recomputes_only_its_modules():
    model = Tiny()
    mp = mapping_of(model)
    a, b, c = make_nets(model)
    p = Patcher()
    p.apply(mp, [(a, 1.0, 1.0, None), (b, 1.0, 1.0, None), (c, 1.0, 1.0, None)])
    before = p.deltas_computed
    r = p.apply(mp, [(a, 1.0, 1.0, None), (b, 0.5, 0.5, None), (c, 1.0, 1.0, None)])
    assert r.modules_merged == len(_touched(b, mp))
    assert r.deltas_computed == _contribs(b)  # a and c come from the cache
    assert p.deltas_computed - before == _contribs(b)
    assert r.modules_unchanged == len(_touched(a, mp) | _touched(c, mp)) - len(
        (_touched(a, mp) | _touched(c, mp)) & _touched(b, mp))


def test_changing_one_multiplier_without_cache_still_only_touches_its_modules():
    model = Tiny()
    mp = mapping_of(model)
    a, b, c = make_nets(model)
    p = Patcher(cache_mb=0)
    p.apply(mp, [(a, 1.0, 1.0, None), (b, 1.0, 1.0, None)])
    r = p.apply(mp, [(a, 1.0, 1.0, None), (b, 0.2, 0.2, None)])
    assert r.modules_merged == len(_touched(b, mp))
    # only the UNet multiplier changes: b's text-encoder modules stay as they are
    r = p.apply(mp, [(a, 1.0, 1.0, None), (b, 0.2, 0.7, None)])
    unet_targets = {id(mp[t]) for t, items in b.modules.items() if items[0][0].component == "unet"}
    assert r.modules_merged == len(unet_targets)


def test_switching_back_and_forth_hits_cache():
    model = Tiny()
    mp = mapping_of(model)
    a, b, _ = make_nets(model)
    p = Patcher(cache_mb=8)
    p.apply(mp, [(a, 1.0, 1.0, None)])
    p.apply(mp, [(b, 1.0, 1.0, None)])
    p.apply(mp, [])
    r = p.apply(mp, [(a, 1.0, 1.0, None)])
    assert r.deltas_computed == 0 and r.cache_hits == _contribs(a)
    r = p.apply(mp, [(b, 1.0, 1.0, None)])
    assert r.deltas_computed == 0


def test_cache_is_bounded_lru():
    c = DeltaCache(max_mb=1.0)
    t = torch.zeros(65536)  # 256 KiB of fp32
    assert c.put("a", (t.clone(), None))
    assert c.put("b", (t.clone(), None))
    assert c.put("c", (t.clone(), None))
    assert c.get("a") is not None  # a becomes most recent
    assert c.put("d", (t.clone(), None))
    assert c.put("e", (t.clone(), None))  # over 1 MiB: evict LRU = b
    assert "b" not in c and "a" in c
    assert c.nbytes <= c.max_bytes
    assert not c.put("huge", (torch.zeros(1024 * 1024), None))
    c.set_limit_mb(0.3)
    assert len(c) == 1


def test_cache_key_tracks_original_weight_content():
    """A W-dependent delta must not be reused after the host loads different weights."""
    lin = nn.Linear(4, 4)
    net = FakeNet("s", {"lin": [(T("lin"), FakeScaleW(torch.full((4, 4), 0.5)))]})
    p = Patcher()
    p.apply({"lin": lin}, [(net, 1.0, 1.0, None)])
    p.restore()
    with torch.no_grad():
        lin.weight.copy_(torch.arange(16.0).reshape(4, 4))
    p.forget(lin)
    r = p.apply({"lin": lin}, [(net, 1.0, 1.0, None)])
    assert r.deltas_computed == 1
    torch.testing.assert_close(lin.weight.detach(), torch.arange(16.0).reshape(4, 4) * 1.5)


def test_nonlinear_types_see_original_weight_and_stack_order_free():
    lin = nn.Linear(6, 6)
    w0 = lin.weight.detach().clone()
    s1, s2 = torch.full((6, 6), 0.5), torch.full((6, 6), -0.25)
    n1 = FakeNet("n1", {"lin": [(T("lin"), FakeScaleW(s1))]})
    n2 = FakeNet("n2", {"lin": [(T("lin"), FakeScaleW(s2))]})
    p = Patcher()
    p.apply({"lin": lin}, [(n1, 1, 1, None), (n2, 1, 1, None)])
    w12 = lin.weight.detach().clone()
    p.apply({"lin": lin}, [(n2, 1, 1, None), (n1, 1, 1, None)])
    torch.testing.assert_close(lin.weight.detach(), w12)
    torch.testing.assert_close(w12, w0 + w0 * s1 + w0 * s2)  # not W1 + W1·s2 (A1111's merged-W chain)


def test_staleness_checkpoint_reload_is_not_overwritten():
    model = Tiny()
    mp = mapping_of(model)
    nets = make_nets(model)
    p = Patcher()
    p.apply(mp, [(nets[0], 1.0, 1.0, None), (nets[1], 1.0, 1.0, None)])
    # host reloads a different checkpoint into the same module instances (A1111 same-config reload)
    new = Tiny()
    new_sd = snapshot(new)
    model.load_state_dict(new_sd, strict=False)
    r = p.restore()
    assert r.stale_dropped > 0 and any("changed outside" in m for m in r.messages)
    assert_same(model, {k: v for k, v in new_sd.items()})
    # re-applying merges on top of the NEW weights and restores to them
    wanted = [(nets[0], 0.5, 0.5, None)]
    p.apply(mp, wanted)
    check_expected(model, new_sd, wanted)
    p.restore()
    assert_same(model, new_sd)


def test_staleness_then_same_set_reapplied_remerges():
    model = Tiny()
    mp = mapping_of(model)
    a = make_nets(model)[0]
    p = Patcher()
    wanted = [(a, 1.0, 1.0, None)]
    p.apply(mp, wanted)
    new_sd = snapshot(Tiny())
    model.load_state_dict(new_sd, strict=False)  # reload while patched, nobody called forget()
    r = p.apply(mp, wanted)  # same wanted set: must NOT be a no-op now
    assert r.modules_merged == len(_touched(a, mp))
    check_expected(model, new_sd, wanted)
    p.restore()
    assert_same(model, new_sd)


def test_forget_drops_backups_without_restoring():
    model = Tiny()
    mp = mapping_of(model)
    a = make_nets(model)[0]
    p = Patcher()
    p.apply(mp, [(a, 1.0, 1.0, None)])
    merged = snapshot(model)
    assert p.forget(model) > 0
    assert not p.is_patched()
    p.restore()
    assert_same(model, merged)  # nothing was written back
    p.apply(mp, [(a, 1.0, 1.0, None)])
    p.forget()  # all
    assert len(p.cache) == 0


def test_device_move_same_object_is_not_stale():
    """lowvram moves modules with `.to()` (param.data swapped, same Parameter, same _version)."""
    model = Tiny()
    orig = snapshot(model)
    mp = mapping_of(model)
    a = make_nets(model)[0]
    p = Patcher()
    p.apply(mp, [(a, 1.0, 1.0, None)])
    for prm in model.parameters():
        prm.data = prm.data.clone()  # what Module.to() does
    model.lin.weight = nn.Parameter(model.lin.weight.detach().clone())  # even a re-wrapped parameter
    r = p.apply(mp, [(a, 1.0, 1.0, None)])
    assert r.noop and r.stale_dropped == 0
    p.restore()
    assert_same(model, orig)


def test_meta_weights_are_skipped_with_report():
    lin = nn.Linear(4, 4, device="meta")
    net = FakeNet("m", {"lin": [(T("lin"), FakeLora(torch.ones(4, 1), torch.ones(1, 4)))]})
    r = Patcher().apply({"lin": lin}, [(net, 1.0, 1.0, None)])
    assert r.networks[0].skipped and "meta" in r.networks[0].skipped[0]
    assert r.modules_merged == 0


def test_unmatched_and_unsupported_targets_reported():
    model = Tiny()
    mp = mapping_of(model)
    g = torch.Generator().manual_seed(0)
    net = FakeNet("u", {
        "lin": [(T("lin"), make_lora_for(model.lin, g))],
        "nowhere_q_proj": [(T("nowhere_q_proj"), make_lora_for(model.lin, g))],
        "missing_layer": [(T("missing_layer"), make_lora_for(model.lin, g))],
        "emb": [(T("emb"), make_lora_for(model.lin, g))],
    })
    r = Patcher().apply(mp, [(net, 1.0, 1.0, None)])
    st = r.networks[0]
    assert st.matched == 1 and st.unmatched_count == 3
    assert any("Embedding" in u for u in st.unmatched)
    assert "missing_layer" in st.unmatched
    assert any("not found in the loaded model" in m for m in r.messages)
    assert "1/4" in st.summary()


def test_failed_delta_is_reported_and_others_applied():
    model = Tiny()
    orig = snapshot(model)
    mp = mapping_of(model)
    g = torch.Generator().manual_seed(0)
    good = make_lora_for(model.lin, g)
    net = FakeNet("f", {"lin": [(T("lin"), good)], "conv": [(T("conv"), Broken())]})
    p = Patcher()
    r = p.apply(mp, [(net, 1.0, 1.0, None)])
    assert not r.ok and "shape mismatch on purpose" in r.networks[0].errors[0]
    assert not torch.equal(model.lin.weight.detach(), orig["lin.weight"])
    assert torch.equal(model.conv.weight.detach(), orig["conv.weight"])
    r2 = p.apply(mp, [(net, 1.0, 1.0, None)])
    assert r2.noop and r2.networks[0].errors  # still reported on a no-op
    other = FakeNet("other", {"lin_nobias": [(T("lin_nobias"), make_lora_for(model.lin_nobias, g))]})
    r3 = p.apply(mp, [(other, 1.0, 1.0, None), (net, 1.0, 1.0, None)])
    assert not r3.networks[0].errors and r3.networks[1].errors  # attributed to the right network
    p.apply(mp, [(net, 1.0, 1.0, None)])
    p.restore()
    assert_same(model, orig)


def test_bias_delta_on_biasless_layer_creates_and_removes_bias():
    lin = nn.Linear(4, 3, bias=False)
    w0 = lin.weight.detach().clone()
    b = torch.tensor([1.0, 2.0, 3.0])
    net = FakeNet("b", {"lin": [(T("lin"), FakeLora(torch.zeros(3, 1), torch.zeros(1, 4), bias=b))]})
    p = Patcher()
    p.apply({"lin": lin}, [(net, 0.5, 0.5, None)])
    torch.testing.assert_close(lin.bias.detach(), b * 0.5)
    p.apply({"lin": lin}, [(net, 1.0, 1.0, None)])
    torch.testing.assert_close(lin.bias.detach(), b)
    p.restore()
    assert lin.bias is None and torch.equal(lin.weight.detach(), w0)


def test_te_and_unet_multipliers_by_component():
    te_lin, unet_lin = nn.Linear(4, 4), nn.Linear(4, 4)
    w_te, w_unet = te_lin.weight.detach().clone(), unet_lin.weight.detach().clone()
    one = lambda: FakeLora(torch.ones(4, 1), torch.ones(1, 4))  # noqa: E731
    net = FakeNet("tu", {"te": [(T("te", None, "te1"), one())], "un": [(T("un", None, "unet"), one())]})
    Patcher().apply({"te": te_lin, "un": unet_lin}, [(net, 0.25, 2.0, None)])
    torch.testing.assert_close(te_lin.weight.detach() - w_te, torch.full((4, 4), 0.25))
    torch.testing.assert_close(unet_lin.weight.detach() - w_unet, torch.full((4, 4), 2.0))


def test_inpainting_conv_in_is_zero_padded():
    conv = nn.Conv2d(9, 8, 3, padding=1)
    w0 = conv.weight.detach().clone()
    g = torch.Generator().manual_seed(0)
    lo = FakeLora(rnd(8, 2, 1, 1, g=g), rnd(2, 4, 3, 3, g=g))
    net = FakeNet("inp", {"conv": [(T("conv"), lo)]})
    r = Patcher().apply({"conv": conv}, [(net, 1.0, 1.0, None)])
    assert r.ok, r.messages
    d = conv.weight.detach() - w0
    torch.testing.assert_close(d[:, :4], (lo.up.flatten(1) @ lo.down.flatten(1)).reshape(8, 4, 3, 3))
    assert torch.equal(d[:, 4:], torch.zeros(8, 5, 3, 3))


def test_apply_under_autocast_still_fp32_deltas():
    lin = nn.Linear(8, 8)
    w0 = lin.weight.detach().clone()
    g = torch.Generator().manual_seed(0)
    lo = FakeLora(rnd(8, 4, g=g), rnd(4, 8, g=g))
    net = FakeNet("ac", {"lin": [(T("lin"), lo)]})
    with torch.autocast("cpu", dtype=torch.bfloat16):
        Patcher().apply({"lin": lin}, [(net, 1.0, 1.0, None)])
    torch.testing.assert_close(lin.weight.detach(), w0 + lo.up @ lo.down, rtol=1e-6, atol=1e-6)


def test_duplicate_network_adds_twice_like_a1111():
    lin = nn.Linear(4, 4)
    w0 = lin.weight.detach().clone()
    net = FakeNet("d", {"lin": [(T("lin"), FakeLora(torch.ones(4, 1), torch.ones(1, 4)))]})
    p = Patcher()
    r = p.apply({"lin": lin}, [(net, 1.0, 1.0, None), (net, 0.5, 0.5, None)])
    torch.testing.assert_close(lin.weight.detach() - w0, torch.full((4, 4), 1.5))
    assert r.deltas_computed == 2


def test_dropping_a_network_restores_only_its_unshared_modules():
    model = Tiny()
    orig = snapshot(model)
    mp = mapping_of(model)
    a, b, _ = make_nets(model)
    p = Patcher()
    p.apply(mp, [(a, 1.0, 1.0, None), (b, 1.0, 1.0, None)])
    r = p.apply(mp, [(a, 1.0, 1.0, None)])
    only_b = _touched(b, mp) - _touched(a, mp)
    assert r.modules_restored == len(only_b)
    assert torch.equal(model.conv1x1.weight.detach(), orig["conv1x1.weight"])
    check_expected(model, orig, [(a, 1.0, 1.0, None)])


@pytest.mark.parametrize("apply_mode,restore_mode", [("inference", "grad"), ("grad", "inference"),
                                                      ("inference", "inference")])
def test_inference_mode_either_side(apply_mode, restore_mode):
    model = Tiny()
    orig = snapshot(model)
    mp = mapping_of(model)
    a, b, _ = make_nets(model)
    p = Patcher()

    def ctx(mode):
        return torch.inference_mode() if mode == "inference" else torch.enable_grad()

    with ctx(apply_mode):
        p.apply(mp, [(a, 1.0, 1.0, None)])
    check_expected(model, orig, [(a, 1.0, 1.0, None)])
    with ctx(restore_mode):
        r = p.apply(mp, [(b, 0.5, 0.5, None)])
        assert r.stale_dropped == 0
        p.restore()
    assert_same(model, orig)
    assert all(not prm.is_inference() for prm in model.parameters())


def test_host_dtype_change_while_patched_restores_in_new_dtype():
    """`module.to(dtype)` keeps the Parameter and its version: not stale, restore casts the backup."""
    model = Tiny()
    orig = snapshot(model)
    mp = mapping_of(model)
    a = make_nets(model)[0]
    p = Patcher()
    p.apply(mp, [(a, 1.0, 1.0, None)])
    model.double()
    r = p.restore()
    assert r.stale_dropped == 0
    for k, v in model.state_dict().items():
        assert torch.equal(v, orig[k].double()), k


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_mixed_devices_lowvram_moves_and_autocast():
    model = Tiny().half()
    orig = snapshot(model)
    mp = mapping_of(model)
    a, b, _ = make_nets(model)
    wanted = [(a, 1.0, 1.0, None), (b, 0.5, -0.5, 2)]
    model.lin.cuda()
    model.attn.cuda()  # lowvram: some modules on the GPU, the rest on the CPU
    p = Patcher()
    with torch.autocast("cuda"):
        p.apply(mp, wanted)
    assert model.lin.weight.device.type == "cuda" and model.conv.weight.device.type == "cpu"
    check_expected(model, orig, wanted)
    model.cpu()
    model.conv.cuda()  # shuffled like lowvram's hooks do
    r = p.apply(mp, wanted)
    assert r.noop and r.stale_dropped == 0
    p.restore()
    model.cpu()
    assert_same(model, orig)


def _real_nets(model, seed=0):
    """The networks helper's real types on every layer kind (skipped if lib_lora.networks is unavailable)."""
    networks = pytest.importorskip("lib_lora.networks")
    from lib_lora.networks import ModuleContext, build_module
    g = torch.Generator().manual_seed(seed)

    def r(*s):
        return torch.randn(*s, generator=g) * 0.1

    def mod(key, t):
        return build_module(t, ModuleContext(writer="lycoris", adapter_config=None, module_key=key))

    nets = []
    for i in range(3):
        nets.append(FakeNet(f"real{i}", {
            "lin": [(T("lin"), mod("lin", {"lora_up.weight": r(24, 4), "lora_down.weight": r(4, 16),
                                           "alpha": torch.tensor(2.0), "dora_scale": r(1, 16) + 1.0}))],
            "conv": [(T("conv"), mod("conv", {"hada_w1_a": r(8, 2), "hada_w1_b": r(2, 36), "hada_w2_a": r(8, 2),
                                             "hada_w2_b": r(2, 36), "alpha": torch.tensor(2.0)}))],
            "gn": [(T("gn"), mod("gn", {"w_norm": r(8), "b_norm": r(8)}))],
            "ln": [(T("ln", None, "te1"), mod("ln", {"diff": r(16), "diff_b": r(16)}))],
            "attn": [(T("attn", "q", "te1"), mod("attn_q", {"lokr_w1": r(4, 4), "lokr_w2": r(4, 4)}))],
            "attn_out_proj": [(T("attn_out_proj", None, "te1"),
                               mod("attn_out", {"oft_blocks": r(4, 4, 4), "alpha": torch.tensor(1e-3)}))],
        }))
    assert networks  # imported
    return nets


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_real_network_types_random_cycles_bit_exact(dtype):
    model = Tiny().to(dtype)
    orig = snapshot(model)
    mp = mapping_of(model)
    nets = _real_nets(model)
    p = Patcher(cache_mb=0.05)
    rng = random.Random(7)
    for _ in range(150):
        if rng.random() < 0.25:
            p.apply(mp, [])
            assert_same(model, orig)
            continue
        chosen = rng.sample(nets, rng.randint(1, 3))
        res = p.apply(mp, [(n, rng.choice([0.5, 1.0, -0.3]), rng.choice([0.5, 1.0, 0.0]), None) for n in chosen])
        assert res.ok, res.messages
    p.restore()
    assert_same(model, orig)
