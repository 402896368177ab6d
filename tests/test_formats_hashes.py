"""Hashes: checked against hashlib computations written out here, following A1111 `modules/hashes.py`
(addnet_hash_safetensors), `sd_models.model_hash` and kohya `train_util.precalculate_safetensors_hashes`."""
import hashlib
import io

import pytest
import safetensors.torch
import torch
from safetensors.torch import save_file

from lib_lora.formats import LoraFileError, addnet_hash, legacy_model_hash, lora_hash, \
    precalculate_safetensors_hashes, save_file_atomic, sha256_file, shorthash, sshs_hashes

EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"  # sha256(b"")


def _tensors(big=False):
    g = torch.Generator().manual_seed(1)
    t = {"lora_unet_x.lora_down.weight": torch.randn(4, 64, generator=g).half(),
         "lora_unet_x.lora_up.weight": torch.randn(64, 4, generator=g).half(),
         "lora_unet_x.alpha": torch.tensor(4.0)}
    if big:  # > 1 MiB + 64 KiB so the legacy window is real data
        t["lora_unet_y.lora_down.weight"] = torch.randn(320, 1024, generator=g)
    return t


META = {"ss_network_dim": "4", "ss_network_alpha": "4.0", "modelspec.title": "demo", "my_note": "hello",
        "sshs_model_hash": "0" * 64, "sshs_legacy_hash": "01234567"}  # sshs_* are not ss_* keys


def _hand_addnet(data: bytes):
    n = int.from_bytes(data[:8], "little")
    return hashlib.sha256(data[8 + n:]).hexdigest()


@pytest.mark.parametrize("big", [False, True])
def test_file_hashes_match_hand_computation(tmp_path, big):
    p = tmp_path / "h.safetensors"
    save_file(_tensors(big), str(p), metadata=META)
    data = p.read_bytes()
    assert addnet_hash(p) == _hand_addnet(data)
    assert sha256_file(p) == hashlib.sha256(data).hexdigest()
    assert legacy_model_hash(p) == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    if not big:
        assert legacy_model_hash(p) == EMPTY_SHA256[:8]  # file under 1 MiB: hash of nothing
    assert shorthash(addnet_hash(p)) == _hand_addnet(data)[:12]


@pytest.mark.parametrize("big", [False, True])
def test_addnet_hash_equals_kohya_precalculated(tmp_path, big):
    """kohya's design: the sshs_model_hash computed in memory equals the addnet hash of the saved file, whatever
    other metadata the file carries."""
    t = _tensors(big)
    model_hash, legacy = precalculate_safetensors_hashes(t, META)
    for i, meta in enumerate([META, {"ss_network_dim": "4"}, {"totally": "different"}, None]):
        p = tmp_path / f"f{i}.safetensors"
        save_file_atomic(t, p, meta)
        assert addnet_hash(p) == model_hash
    # Hand computation of kohya's algorithm: keep ss_* metadata only, serialise, hash after the header.
    blob = safetensors.torch.save(t, {k: v for k, v in META.items() if k.startswith("ss_")})
    assert model_hash == _hand_addnet(blob)
    assert legacy == hashlib.sha256(blob[0x100000:0x110000]).hexdigest()[:8]
    if not big:
        assert legacy == EMPTY_SHA256[:8]
    assert sshs_hashes(t, META) == {"sshs_model_hash": model_hash, "sshs_legacy_hash": legacy}


def test_legacy_precalculated_ignores_non_ss_metadata_but_file_legacy_does_not(tmp_path):
    t = _tensors(big=True)
    a = precalculate_safetensors_hashes(t, META)
    b = precalculate_safetensors_hashes(t, {k: v for k, v in META.items() if k.startswith("ss_")})
    assert a == b
    p = tmp_path / "x.safetensors"
    save_file(t, str(p), metadata=META)  # the file also has modelspec/user keys: header is longer
    assert legacy_model_hash(p) != a[1]
    assert addnet_hash(p) == a[0]


def test_metadata_edit_changes_sha256_not_addnet(tmp_path):
    t = _tensors()
    p1, p2 = tmp_path / "1.safetensors", tmp_path / "2.safetensors"
    save_file(t, str(p1), metadata={"a": "1"})
    save_file(t, str(p2), metadata={"a": "2", "b": "3"})
    assert addnet_hash(p1) == addnet_hash(p2)
    assert sha256_file(p1) != sha256_file(p2)
    t2 = dict(t, **{"lora_unet_x.alpha": torch.tensor(3.0)})
    save_file(t2, str(p2))
    assert addnet_hash(p1) != addnet_hash(p2)


def test_lora_hash_prefers_metadata(tmp_path):
    p = tmp_path / "m.safetensors"
    save_file(_tensors(), str(p), metadata={"sshs_model_hash": "abc123"})
    assert lora_hash(p) == "abc123"
    save_file(_tensors(), str(p))
    assert lora_hash(p) == _hand_addnet(p.read_bytes())


def test_hash_of_corrupt_file_is_an_error(tmp_path):
    p = tmp_path / "junk.safetensors"
    p.write_bytes(b"\xff" * 20)
    with pytest.raises(LoraFileError, match="junk.safetensors"):
        addnet_hash(p)
    with pytest.raises(LoraFileError, match="missing.safetensors"):
        sha256_file(tmp_path / "missing.safetensors")


def test_in_memory_bytesio_matches_file_bytes(tmp_path):
    """safetensors.torch.save (bytes) and save_file (disk) give identical bytes, so in-memory == file hashes."""
    t = _tensors()
    p = tmp_path / "s.safetensors"
    save_file(t, str(p), metadata={"ss_x": "1"})
    assert io.BytesIO(safetensors.torch.save(t, {"ss_x": "1"})).getvalue() == p.read_bytes()
