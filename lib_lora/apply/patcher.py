"""Merge network deltas into a model's weights in place, and put the originals back bit-exactly.

Design (see also lora-formats.md §3.1 and pitfalls 3, 9, 12, 13):

- Merging only: weights are rewritten once per change of the wanted set; nothing runs per sampling step (no hooks,
  no patched ``forward``).
- Before a parameter is first written, a clone is kept on the CPU in its original dtype. Every merge starts from
  that backup: ``W = (backup.float() + Σ ΔWᵢ).to(dtype)``, with ΔW summed in fp32 on the module's current device.
  Rounding therefore never accumulates across cycles, and ``restore`` is ``param.copy_(backup)``: bit-exact.
- Stacking: every network's ΔW is computed from the ORIGINAL weight and the ΔWs are added in prompt order. For linear
  types (LoRA/LoHa/LoKr/full/norm) this equals A1111. For the non-linear ones (DoRA, OFT/BOFT, GLoRA's W·A term,
  IA3) A1111 feeds each network the weight already merged with the previous networks, so the result depends on
  the order; here it does not, and a ΔW can be cached independently of the other networks.
- nn.MultiheadAttention: q/k/v targets are row blocks of ``in_proj_weight`` (and ``in_proj_bias``); a projection
  the file lacks is a zero delta (A1111 needs all four). ``out_proj`` is its own Linear target: MHA.forward reads
  ``out_proj.weight`` directly, so merging into that tensor is what changes the output.
- Staleness: after writing we remember (parameter object, ``_version``, a 16-value sample). If the host rewrote
  the weight behind our back (checkpoint reload into the same modules bumps ``_version`` via ``copy_``), the
  backup is dropped instead of being restored over the new weights. Device/dtype moves (``module.to``) keep the
  object and the version, so lowvram shuffling is not mistaken for a reload.
- Cache: ΔWs are kept in a bounded LRU (``DeltaCache``) keyed by network file identity, target, multiplier, dyn,
  weight dtype/device and a fingerprint of the original weight, so switching sets back and forth is cheap.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch import nn

from .cache import DeltaCache

log = logging.getLogger("lora_studio.apply")

SUPPORTED_TYPES = (nn.Linear, nn.Conv2d, nn.GroupNorm, nn.LayerNorm, nn.MultiheadAttention)
_PARTS = ("q", "k", "v")
_RE_X_PROJ = re.compile(r"(.*)_([qkv])_proj$")
_SAMPLE = 16


# ----------------------------------------------------------------------------------------------------------- results

@dataclass
class NetworkApplyStats:
    name: str
    matched: int = 0  # (target, module) pairs found in the layer mapping
    unmatched: list[str] = field(default_factory=list)  # targets absent from the mapping or of an unsupported type
    errors: list[str] = field(default_factory=list)  # ΔW computation failures (per target)
    skipped: list[str] = field(default_factory=list)  # e.g. weights on 'meta'

    @property
    def unmatched_count(self) -> int:
        return len(self.unmatched)

    @property
    def applied(self) -> int:
        """Targets whose delta is in the weights (found, computed, and not skipped)."""
        return max(0, self.matched - len(self.errors) - len(self.skipped))

    def summary(self) -> str:
        total = self.matched + len(self.unmatched)
        s = f"lora '{self.name}': {self.applied}/{total} targets applied"
        if self.unmatched:
            s += f", {len(self.unmatched)} not in the model"
        if self.errors:
            s += f", {len(self.errors)} failed"
        if self.skipped:
            s += f", {len(self.skipped)} skipped"
        return s


@dataclass
class ApplyResult:
    networks: list[NetworkApplyStats] = field(default_factory=list)
    modules_merged: int = 0  # modules whose weights were (re)written by this call
    modules_restored: int = 0  # modules put back to their original weights
    modules_unchanged: int = 0  # modules already in the wanted state
    deltas_computed: int = 0
    cache_hits: int = 0
    stale_dropped: int = 0  # backups dropped because the host changed the weights
    messages: list[str] = field(default_factory=list)

    @property
    def noop(self) -> bool:
        return self.modules_merged == 0 and self.modules_restored == 0

    @property
    def ok(self) -> bool:
        return not any(n.errors for n in self.networks)

    def summary(self) -> str:
        parts = [n.summary() for n in self.networks]
        parts.append(f"{self.modules_merged} modules merged, {self.modules_restored} restored, "
                     f"{self.modules_unchanged} unchanged ({self.deltas_computed} deltas computed, "
                     f"{self.cache_hits} from cache)")
        return "; ".join(parts)


# ---------------------------------------------------------------------------------------------------- internal state

@dataclass
class _Mark:
    ref: Any  # weakref to the Parameter we left behind
    version: int
    sample: tuple


@dataclass
class _ModState:
    name: str
    module: nn.Module
    backups: dict[str, torch.Tensor | None] = field(default_factory=dict)  # None: parameter was absent (created)
    base_fp: dict[str, tuple] = field(default_factory=dict)  # content fingerprint of each backup (cache key)
    written: set[str] = field(default_factory=set)  # params currently holding merged values
    marks: dict[str, _Mark] = field(default_factory=dict)
    signature: tuple | None = None
    errors: list[tuple[int, str]] = field(default_factory=list)  # (contribution position, message), last merge


@dataclass
class _Contrib:
    index: int  # position in `wanted`
    net_key: Any
    target: Any
    module: Any  # NetworkModule
    mult: float
    dyn: int | None


def _sample(t: torch.Tensor) -> tuple:
    flat = t.detach().reshape(-1)
    n = flat.numel()
    if n == 0:
        return ()
    idx = torch.linspace(0, n - 1, steps=min(n, _SAMPLE), device=flat.device).long()
    return tuple(flat[idx].double().tolist())


def _content_fp(t: torch.Tensor) -> tuple:
    """Cheap identity of an original weight's content: changes when a different checkpoint is loaded."""
    t = t.detach()
    try:
        total = torch.sum(t, dtype=torch.float64)
    except RuntimeError:  # dtypes without a float64 reduction (fp8 storage)
        total = torch.sum(t.float(), dtype=torch.float64)
    return (tuple(t.shape), str(t.dtype), float(total), _sample(t))


def _net_key(net) -> Any:
    key = getattr(net, "key", None)
    if key is not None:
        return key
    path = getattr(net, "path", None)
    if path is not None:
        return (str(path), getattr(net, "mtime", None), getattr(net, "size", None))
    return ("id", id(net))


def _net_name(net) -> str:
    return str(getattr(net, "name", None) or getattr(net, "path", None) or f"network@{id(net):x}")


def _is_te(target, name: str) -> bool:
    comp = getattr(target, "component", None)
    if comp:
        return comp != "unet"
    return "transformer" in name[:20]  # A1111 `NetworkModule.multiplier` rule


def _no_autocast():
    # A1111 activates networks under devices.autocast(): ΔW must still be computed in fp32.
    stack = contextlib.ExitStack()
    stack.enter_context(torch.autocast("cpu", enabled=False))
    if torch.cuda.is_available():
        stack.enter_context(torch.autocast("cuda", enabled=False))
    stack.enter_context(torch.no_grad())
    return stack


def _primary_param(module: nn.Module, part: str | None) -> str:
    if isinstance(module, nn.MultiheadAttention):
        if module.in_proj_weight is None and part is not None:
            return f"{part}_proj_weight"
        return "in_proj_weight"
    return "weight"


def _bias_param(module: nn.Module) -> str:
    return "in_proj_bias" if isinstance(module, nn.MultiheadAttention) else "bias"


def _module_device(module: nn.Module) -> torch.device | None:
    for p in module.parameters(recurse=False):
        return p.device
    return None


# ------------------------------------------------------------------------------------------------------------ patcher

class Patcher:
    """Keeps a model's weights merged with a wanted list of networks. One instance per process/model host."""

    def __init__(self, cache_mb: float = 1024.0, cache: DeltaCache | None = None):
        self.cache = cache if cache is not None else DeltaCache(cache_mb)
        self._state: dict[nn.Module, _ModState] = {}
        self._lock = threading.RLock()
        self.deltas_computed = 0  # lifetime counter (tests, diagnostics)
        self.last_result: ApplyResult | None = None

    # ---- public -------------------------------------------------------------------------------------------------

    @property
    def patched_names(self) -> list[str]:
        return [st.name for st in self._state.values() if st.written]

    def is_patched(self) -> bool:
        return any(st.written for st in self._state.values())

    def apply(self, layer_mapping: dict[str, nn.Module], wanted: Iterable) -> ApplyResult:
        """Make the model's weights equal original + Σ deltas of ``wanted``.

        ``wanted``: list of ``(LoadedNetwork, te, unet, dyn)`` in prompt order (``dyn`` optional). Each network
        needs ``.modules: dict[target_name, list[(Target, NetworkModule)]]``. An empty list restores everything.
        """
        with self._lock, _no_autocast():
            result = ApplyResult()
            desired, names = self._plan(layer_mapping, list(wanted), result)

            for module in list(self._state):
                if module not in desired:
                    self._restore_module(self._state.pop(module), result)
                    result.modules_restored += 1

            for module, contribs in desired.items():
                sig = tuple((c.net_key, c.target.name, getattr(c.target, "part", None), c.mult, c.dyn)
                            for c in contribs)
                st = self._state.get(module)
                # Validate first: a stale backup must never become the base of a new merge.
                if st is not None and self._validate(st, result) and st.signature == sig:
                    result.modules_unchanged += 1
                    for pos, msg in st.errors:  # same signature: same contributions in the same order
                        result.networks[contribs[pos].index].errors.append(msg)
                    continue
                if st is None:
                    st = _ModState(name=names[module], module=module)
                    self._state[module] = st
                if self._merge(st, contribs, sig, result):
                    result.modules_merged += 1

            for st in [s for s in self._state.values() if not s.written and not s.backups]:
                self._state.pop(st.module, None)
            for n in result.networks:
                if n.unmatched:
                    result.messages.append(
                        f"lora '{n.name}': {len(n.unmatched)} target(s) not found in the loaded model: "
                        + ", ".join(n.unmatched[:5]) + (" …" if len(n.unmatched) > 5 else ""))
                for e in n.errors[:5]:
                    result.messages.append(f"lora '{n.name}': {e}")
            self.last_result = result
            return result

    def restore(self) -> ApplyResult:
        """Put every patched weight back (bit-exact) and drop all backups."""
        with self._lock, _no_autocast():
            result = ApplyResult()
            for module in list(self._state):
                self._restore_module(self._state.pop(module), result)
                result.modules_restored += 1
            self.last_result = result
            return result

    def forget(self, module: nn.Module | None = None) -> int:
        """Drop backups WITHOUT restoring: the host reloaded the weights (``on_model_loaded``).

        ``module`` may be any root (e.g. the whole ``sd_model``): the state of it and all its submodules is
        dropped. ``None`` forgets everything and clears the delta cache. Returns how many modules were forgotten.
        """
        with self._lock:
            if module is None:
                n = len(self._state)
                self._state.clear()
                self.cache.clear()
                return n
            subs = set(module.modules())
            dead = [m for m in self._state if m in subs]
            for m in dead:
                del self._state[m]
            return len(dead)

    # ---- planning -----------------------------------------------------------------------------------------------

    def _plan(self, mapping, wanted, result):
        desired: dict[nn.Module, list[_Contrib]] = {}
        names: dict[nn.Module, str] = {}
        for idx, entry in enumerate(wanted):
            net, te, unet = entry[0], float(entry[1]), float(entry[2])
            dyn = entry[3] if len(entry) > 3 else None
            stats = NetworkApplyStats(name=_net_name(net))
            result.networks.append(stats)
            key = _net_key(net)
            for tname, items in getattr(net, "modules", {}).items():
                for target, netmod in items:
                    part = getattr(target, "part", None)
                    name = getattr(target, "name", None) or tname
                    module = mapping.get(name)
                    if module is None and part is None:
                        # A1111 fallback: `…_attn_q_proj` addresses the rows of an MHA `…_attn`.
                        m = _RE_X_PROJ.match(name)
                        if m and isinstance(mapping.get(m.group(1)), nn.MultiheadAttention):
                            module, name, part = mapping[m.group(1)], m.group(1), m.group(2)
                            target = _PartTarget(name, part, getattr(target, "component", None))
                    label = name if part is None else f"{name}[{part}]"
                    if module is None:
                        stats.unmatched.append(label)
                        continue
                    if not isinstance(module, SUPPORTED_TYPES) or _primary_tensor(module, part) is None:
                        stats.unmatched.append(f"{label} ({type(module).__name__} is not a patchable layer)")
                        continue
                    if part is not None and part not in _PARTS:
                        stats.unmatched.append(f"{label} (unknown projection part '{part}')")
                        continue
                    stats.matched += 1
                    mult = te if _is_te(target, name) else unet
                    if mult == 0.0:
                        continue  # strength 0: same as absent (and nothing to compute)
                    desired.setdefault(module, []).append(_Contrib(idx, key, target, netmod, mult, dyn))
                    names[module] = name
        return desired, names

    # ---- state checks -------------------------------------------------------------------------------------------

    def _unchanged(self, module, pname, mark: _Mark) -> bool:
        p = getattr(module, pname, None)
        if p is None:
            return False
        if mark.ref() is p and p._version == mark.version:
            return True  # same object, no in-place write since ours (device/dtype moves keep both)
        if p.is_meta:
            return False
        try:
            same = _sample(p) == mark.sample
        except RuntimeError:
            return False
        if same:  # moved or re-wrapped but same content: refresh the mark
            mark.ref, mark.version = weakref.ref(p), p._version
        return same

    def _validate(self, st: _ModState, result: ApplyResult) -> bool:
        """Drop backups of parameters the host changed; returns False if anything was dropped."""
        ok = True
        for pname in list(st.backups):
            if st.backups[pname] is None and pname not in st.written:
                continue  # an absent parameter (e.g. no bias) we never created
            mark = st.marks.get(pname)
            if mark is not None and self._unchanged(st.module, pname, mark):
                continue
            ok = False
            st.backups.pop(pname, None)
            st.base_fp.pop(pname, None)
            st.marks.pop(pname, None)
            st.written.discard(pname)
        if not ok:
            st.signature = None
            result.stale_dropped += 1
            msg = (f"{st.name}: weights were changed outside LoRA Studio (checkpoint reload?); "
                   f"kept them and dropped the old backup")
            result.messages.append(msg)
            log.info(msg)
        return ok

    def _mark(self, st: _ModState, pname: str) -> None:
        p = getattr(st.module, pname, None)
        if p is None:
            st.marks.pop(pname, None)
            return
        st.marks[pname] = _Mark(weakref.ref(p), p._version, _sample(p))

    # ---- merge / restore ----------------------------------------------------------------------------------------

    def _backup(self, st: _ModState, pname: str) -> None:
        if pname in st.backups:
            return
        p = getattr(st.module, pname, None)
        if p is None:
            st.backups[pname] = None
            st.base_fp[pname] = ("absent",)
            return
        st.base_fp[pname] = _content_fp(p)  # on the weight's device (fast on GPU), before the CPU copy
        st.backups[pname] = p.detach().to(device="cpu", copy=True)
        self._mark(st, pname)

    def _base32(self, st, pname, dev, cache: dict):
        if pname not in cache:
            b = st.backups[pname]
            if b is None:
                cache[pname] = None
            else:
                # A fresh fp32 copy: a network's delta() never sees (or could mutate) the backup itself.
                t = torch.empty(b.shape, dtype=torch.float32, device=dev)
                t.copy_(b)
                cache[pname] = t
        return cache[pname]

    def _delta(self, st, c: _Contrib, w: torch.Tensor, b: torch.Tensor | None, pname: str, dtype, dev, result):
        # Linear types are cached once at m=1 in the weight's dtype (half the memory of fp32 for fp16 models, and
        # a changed weight costs a multiply, not a recompute); the same rounding applies to fresh deltas, so a cache
        # hit and a miss merge to identical weights.
        linear = bool(getattr(c.module, "linear_in_multiplier", lambda: False)())  # unknown: recompute per m
        mult = 1.0 if linear else c.mult
        key = (c.net_key, c.target.name, getattr(c.target, "part", None), mult, c.dyn, str(dtype), str(dev),
               st.base_fp.get(pname))
        got = self.cache.get(key) if self.cache.max_bytes > 0 else None
        if got is not None:
            result.cache_hits += 1
        else:
            dW, dB = self._compute(st, c, w, b, mult)
            store = dtype if dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32
            got = (None if dW is None else dW.to(store), None if dB is None else dB.to(store))
            self.deltas_computed += 1
            result.deltas_computed += 1
            if self.cache.max_bytes > 0:
                # kept in RAM, not VRAM: the cache must never cost the GPU memory generation needs
                self.cache.put(key, tuple(None if t is None else t.to("cpu") for t in got))
        dW, dB = got
        scale = c.mult if linear else 1.0
        return (None if dW is None else dW.to(dev).float() * scale,
                None if dB is None else dB.to(dev).float() * scale)

    def _compute(self, st, c: _Contrib, w, b, mult: float):
        module = st.module
        try:
            dW, dB = c.module.delta(w, mult, dyn=c.dyn, bias=b)
        except Exception as e:  # noqa: BLE001 - retried below for the inpainting case, else re-raised
            # Inpainting UNet: conv_in has 9 input channels, LoRAs are trained on 4 (A1111 pads with zeros).
            if isinstance(module, nn.Conv2d) and w.dim() == 4 and w.shape[1] == 9:
                dW, dB = c.module.delta(w[:, :4].contiguous(), mult, dyn=c.dyn, bias=b)
                if dW is not None:
                    dW = torch.nn.functional.pad(dW, (0, 0, 0, 0, 0, 5))
            else:
                raise e
        if dW is not None:
            dW = dW.to(device=w.device, dtype=torch.float32)
            if dW.shape != w.shape:
                if dW.numel() == w.numel():
                    dW = dW.reshape(w.shape)  # linear <-> 1x1 conv (SD1 proj_in/out are convs)
                else:
                    raise ValueError(f"delta shape {tuple(dW.shape)} does not fit weight {tuple(w.shape)}")
        if dB is not None:
            dB = dB.to(device=w.device, dtype=torch.float32).reshape(-1)
        return dW, dB

    def _merge(self, st: _ModState, contribs: list[_Contrib], sig: tuple, result: ApplyResult) -> bool:
        module = st.module
        st.errors = []
        dev = _module_device(module)
        if dev is None or dev.type == "meta":
            for c in contribs:
                result.networks[c.index].skipped.append(f"{st.name}: weights are on 'meta' (model unloaded?)")
            self._restore_module(st, result)  # nothing can be written; forget what we had
            self._state.pop(module, None)
            return False

        acc: dict[str, torch.Tensor] = {}
        base: dict[str, torch.Tensor | None] = {}
        bias_name = _bias_param(module)
        for pos, c in enumerate(contribs):
            part = getattr(c.target, "part", None)
            wname = _primary_param(module, part)
            try:
                self._backup(st, wname)
                self._backup(st, bias_name)
                w_full = self._base32(st, wname, dev, base)
                b_full = self._base32(st, bias_name, dev, base)
                rows = _rows(module, wname, part, w_full)
                w = w_full if rows is None else w_full[rows]
                b = None
                if b_full is not None:
                    b = b_full if part is None else b_full[_bias_rows(part, b_full)]
                dtype = getattr(module, wname).dtype
                dW, dB = self._delta(st, c, w, b, wname, dtype, dev, result)
            except Exception as e:  # noqa: BLE001 - one bad target must not stop the others; reported per network
                label = st.name if part is None else f"{st.name}[{part}]"
                # a LoraError says what is wrong in words; anything else is a bug: keep its class for the report
                msg = f"{label}: {e}" if _is_user_error(e) else f"{label}: {type(e).__name__}: {e}"
                st.errors.append((pos, msg))
                result.networks[c.index].errors.append(msg)
                log.debug("delta failed for %s", label, exc_info=True)
                continue
            if dW is not None:
                a = acc.get(wname)
                if a is None:
                    a = acc[wname] = torch.zeros_like(w_full)
                if rows is None:
                    a.add_(dW)
                else:
                    a[rows].add_(dW)
            if dB is not None:
                n_out = b_full.numel() if b_full is not None else _bias_len(module, wname, part)
                a = acc.get(bias_name)
                if a is None:
                    a = acc[bias_name] = torch.zeros(n_out, dtype=torch.float32, device=dev)
                if part is None:
                    a.add_(dB.reshape(a.shape))
                else:
                    a[_bias_rows(part, a)].add_(dB)

        dtype_w = None
        for pname in list(st.backups):
            p = getattr(module, pname, None)
            if pname in acc:
                if p is None:  # bias delta on a layer without bias: create it (A1111 does too)
                    dtype_w = dtype_w or getattr(module, _primary_param(module, None)).dtype
                    setattr(module, pname, nn.Parameter(acc[pname].to(dtype_w), requires_grad=False))
                else:
                    src = self._base32(st, pname, dev, base)
                    p.copy_((acc[pname] if src is None else src + acc[pname]).to(p.dtype))
                st.written.add(pname)
            elif pname in st.written:  # was merged before, no delta now: back to the original
                self._restore_param(st, pname)
                st.written.discard(pname)
            self._mark(st, pname)
        st.signature = sig
        return True

    def _restore_param(self, st: _ModState, pname: str) -> None:
        b = st.backups.get(pname)
        if b is None:
            setattr(st.module, pname, None)  # we created it
        else:
            getattr(st.module, pname).copy_(b)

    def _restore_module(self, st: _ModState, result: ApplyResult) -> None:
        for pname in list(st.written):
            mark = st.marks.get(pname)
            if mark is None or not self._unchanged(st.module, pname, mark):
                msg = (f"{st.name}: weights were changed outside LoRA Studio (checkpoint reload?); "
                       f"kept them instead of restoring the old backup")
                result.messages.append(msg)
                result.stale_dropped += 1
                log.info(msg)
                continue
            p = getattr(st.module, pname)
            if p.is_meta:
                continue  # the model was unloaded to 'meta'; nothing to restore into
            self._restore_param(st, pname)
        st.written.clear()
        st.backups.clear()
        st.marks.clear()
        st.base_fp.clear()
        st.signature = None


@dataclass(frozen=True)
class _PartTarget:
    name: str
    part: str | None
    component: str | None


def _primary_tensor(module: nn.Module, part: str | None):
    return getattr(module, _primary_param(module, part), None)


def _rows(module: nn.Module, wname: str, part: str | None, w: torch.Tensor):
    """Row slice of the primary weight that a q/k/v target addresses (None: the whole tensor)."""
    if part is None or (wname.endswith("_proj_weight") and wname != "in_proj_weight"):
        return None
    n = w.shape[0]
    if n % 3:
        raise ValueError(f"a '{part}' projection needs a fused q/k/v weight, this one has {n} rows")
    d = n // 3
    i = _PARTS.index(part)
    return slice(i * d, (i + 1) * d)


def _bias_rows(part: str, b: torch.Tensor):
    d = b.shape[0] // 3
    i = _PARTS.index(part)
    return slice(i * d, (i + 1) * d)


def _bias_len(module: nn.Module, wname: str, part: str | None) -> int:
    if isinstance(module, nn.MultiheadAttention):
        return 3 * module.embed_dim
    return getattr(module, wname).shape[0]


def _is_user_error(e: Exception) -> bool:
    from ..formats.errors import LoraError
    return isinstance(e, LoraError)
