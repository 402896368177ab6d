"""The delta cache: a changed multiplier or a switch back costs no recompute, and gives the same weights."""

import torch

import models
from lib_lora.apply import Patcher, layer_mapping, load_network
from test_apply_integration import SD1_KEYS, _with_parts, expected_delta, write_kohya


def test_multiplier_change_and_switch_back_hit_the_cache(tmp_path):
    sd1 = models.make_sd1(seed=4)
    mapping = layer_mapping(sd1)
    keys = _with_parts(SD1_KEYS)
    ta = write_kohya(tmp_path / "a.safetensors", keys, mapping, {"ss_network_module": "networks.lora"}, seed=1)
    write_kohya(tmp_path / "b.safetensors", keys, mapping, {"ss_network_module": "networks.lora"}, seed=2)
    a = load_network(str(tmp_path / "a.safetensors"), "sd1")
    b = load_network(str(tmp_path / "b.safetensors"), "sd1")
    p = Patcher(cache_mb=64)
    r1 = p.apply(mapping, [(a, 1.0, 1.0, None)])
    assert r1.deltas_computed == len(keys) and r1.cache_hits == 0
    r2 = p.apply(mapping, [(a, 0.5, 0.7, None)])  # new weights: a multiply, not a recompute
    assert r2.deltas_computed == 0 and r2.cache_hits == len(keys)
    key = "lora_unet_mid_block_attentions_0_proj_out"
    layer = mapping[SD1_KEYS[key]]
    w0 = p._state[layer].backups["weight"].float()
    # merged weight = original + 0.7 * delta (the UNet multiplier), closed form written in the test
    torch.testing.assert_close(layer.weight.float(), w0 + expected_delta(ta, key, w0.shape, 0.7),
                               rtol=1e-5, atol=1e-6)
    p.apply(mapping, [(b, 1.0, 1.0, None)])
    merged_b = layer.weight.clone()
    r4 = p.apply(mapping, [(a, 0.5, 0.7, None)])  # switch back
    assert r4.deltas_computed == 0
    fresh = Patcher(cache_mb=0)
    p.restore()
    fresh.apply(mapping, [(a, 0.5, 0.7, None)])
    want = layer.weight.clone()
    fresh.restore()
    p.apply(mapping, [(a, 0.5, 0.7, None)])
    assert torch.equal(layer.weight, want)  # cache hit == fresh computation, bit for bit
    assert not torch.equal(merged_b, want)
    p.restore()


def test_loaded_file_cache_is_bounded_by_bytes_too():
    """Eight multi-GB 'full' LoRAs must not all stay in RAM: the oldest go past the byte bound, the newest stays."""
    from types import SimpleNamespace

    from lib_lora.apply.cache import LRU
    lru = LRU(max_items=8, max_bytes=100, size_of=lambda v: v.size)
    for i, size in enumerate((40, 40, 40)):
        lru.put(i, SimpleNamespace(size=size))
    assert lru.get(0) is None and lru.get(1) is not None and lru.get(2) is not None  # 120 > 100: the oldest went
    lru.put("huge", SimpleNamespace(size=500))
    assert len(lru) == 1 and lru.get("huge") is not None  # alone larger than the bound: kept (it is in use)
    from lib_lora.apply.loader import DEFAULT_CACHE
    assert DEFAULT_CACHE.max_bytes == 2 << 30 and DEFAULT_CACHE.max_items == 8


def test_a_cached_file_does_not_hold_its_disk_space(tmp_path):
    """From the real WebUI: safetensors maps a file on the CPU, and the loaded-file cache kept those maps, so a LoRA
    the user deleted (or a job's epoch file they removed to make room) kept its disk space until the WebUI
    restarted. Cached networks now hold copies; no map of the file is left once it is loaded."""
    import gc
    import os

    sd1 = models.make_sd1(seed=4)
    mapping = layer_mapping(sd1)
    path = str(tmp_path / "held.safetensors")
    write_kohya(path, _with_parts(SD1_KEYS), mapping, {"ss_network_module": "networks.lora"}, seed=1)

    def mapped():
        gc.collect()
        with open("/proc/self/maps") as f:
            return [line for line in f if path in line]
    net = load_network(path, "sd1")
    assert mapped() == [], "the cached network still maps the file"
    p = Patcher(cache_mb=0)
    p.apply(mapping, [(net, 1.0, 1.0, None)])
    os.remove(path)
    assert mapped() == []
    p.restore()
