"""safetensors I/O: header parsing checked against the safetensors library, refusals, corrupt files, atomic save."""
import errno
import json
import os
import struct
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lib_lora.formats import LoraError, LoraFileError, load_tensors, read_header, read_metadata, read_shapes, \
    save_file_atomic
from lib_lora.formats import safetensors_io


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "lora_unet_a.lora_down.weight": torch.randn(4, 8, generator=g).half(),
        "lora_unet_a.lora_up.weight": torch.randn(8, 4, generator=g).to(torch.bfloat16),
        "lora_unet_a.alpha": torch.tensor(2.0),
        "lora_te_b.lora_down.weight": torch.randn(2, 3, 3, 3, generator=g),
    }


def _raw_file(path, header, data=b""):
    blob = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob + data)
    return path


def test_header_matches_safetensors_library(tmp_path):
    p = tmp_path / "ok.safetensors"
    meta = {"ss_network_dim": "4", "modelspec.title": "x", "ss_tag_frequency": json.dumps({"a": {"b": 1}})}
    save_file(_tensors(), str(p), metadata=meta)
    header = read_header(p)
    with safe_open(str(p), "pt") as f:
        assert read_metadata(p) == f.metadata() == meta
        assert set(header) - {"__metadata__"} == set(f.keys())
        assert read_shapes(p) == {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert header["lora_unet_a.lora_up.weight"]["dtype"] == "BF16"
    loaded = load_tensors(p)
    for k, v in _tensors().items():
        assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], v)


def test_no_metadata_gives_empty_dict(tmp_path):
    p = tmp_path / "nometa.safetensors"
    save_file({"x.alpha": torch.tensor(1.0)}, str(p))
    assert read_metadata(p) == {}


@pytest.mark.parametrize("ext", [".pt", ".ckpt", ".bin", ".pth", ".PT"])
def test_pickle_extensions_refused_before_opening(tmp_path, ext):
    p = tmp_path / f"my_lora{ext}"  # never created: refusal must not depend on reading it
    for fn in (read_header, read_metadata, load_tensors):
        with pytest.raises(LoraFileError) as e:
            fn(p)
        msg = str(e.value)
        assert f"my_lora{ext}" in msg and "pickle" in msg and "run code" in msg and ".safetensors" in msg
    with pytest.raises(LoraFileError, match="pickle"):
        save_file_atomic({"a": torch.zeros(1)}, tmp_path / f"out{ext}")


def test_torch_zip_with_safetensors_name_refused(tmp_path):
    p = tmp_path / "disguised.safetensors"
    torch.save({"a": torch.zeros(2)}, p)
    with pytest.raises(LoraFileError, match="disguised.safetensors.*zip"):
        read_header(p)


@pytest.mark.parametrize("content, words", [
    (b"", "empty"),
    (b"\x05\x00\x00", "too short"),
    (struct.pack("<Q", 10 ** 12), "not a valid safetensors"),
    (struct.pack("<Q", 50) + b"{}", "truncated"),
    (struct.pack("<Q", 4) + b"nope", "not valid JSON"),
    (struct.pack("<Q", 2) + b"[]", "not an object"),
])
def test_corrupt_files_name_the_file(tmp_path, content, words):
    p = tmp_path / "broken_lora.safetensors"
    p.write_bytes(content)
    with pytest.raises(LoraFileError) as e:
        read_metadata(p)
    assert "broken_lora.safetensors" in str(e.value) and words in str(e.value)
    assert "again" in str(e.value) or "convert" in str(e.value)  # says what to do


def test_offsets_past_eof_rejected_without_reading_data(tmp_path):
    p = _raw_file(tmp_path / "short.safetensors",
                  {"__metadata__": {"a": "b"}, "t": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}},
                  data=b"\0" * 100)
    with pytest.raises(LoraFileError, match=r"short\.safetensors is truncated.*4000.*100"):
        read_metadata(p)


@pytest.mark.parametrize("entry, words", [
    ({"dtype": "F99", "shape": [1], "data_offsets": [0, 4]}, "unknown dtype"),
    ({"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}, "needs 8"),
    ({"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}, "shape"),
    ({"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}, "data_offsets"),
])
def test_bad_entries(tmp_path, entry, words):
    p = _raw_file(tmp_path / "bad.safetensors", {"t": entry}, data=b"\0" * 4)
    with pytest.raises(LoraFileError, match=words):
        read_header(p)


def test_gaps_and_trailing_bytes_rejected(tmp_path):
    h = {"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}
    with pytest.raises(LoraFileError, match="starts at byte 4"):
        read_header(_raw_file(tmp_path / "gap.safetensors", h, b"\0" * 8))
    h = {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}
    with pytest.raises(LoraFileError, match="4 unexpected bytes"):
        read_header(_raw_file(tmp_path / "tail.safetensors", h, b"\0" * 8))
    with pytest.raises(LoraFileError, match="strings to strings"):
        read_header(_raw_file(tmp_path / "meta.safetensors", {"__metadata__": {"a": 1}}))


def test_truncated_real_file(tmp_path):
    p = tmp_path / "cut.safetensors"
    save_file(_tensors(), str(p))
    size = p.stat().st_size
    with open(p, "r+b") as f:
        f.truncate(size - 10)
    for fn in (read_metadata, load_tensors):
        with pytest.raises(LoraFileError, match=r"cut\.safetensors is truncated"):
            fn(p)


def test_metadata_of_large_file_reads_only_the_header(tmp_path, monkeypatch):
    n_bytes = 1 << 30  # 1 GiB of tensor data, sparse on disk
    p = tmp_path / "big.safetensors"
    header = {"__metadata__": {"ss_network_dim": "128"},
              "w": {"dtype": "U8", "shape": [n_bytes], "data_offsets": [0, n_bytes]}}
    blob = json.dumps(header).encode()
    with open(p, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        f.truncate(8 + len(blob) + n_bytes)
    read_total = []
    real_open = open

    class Counting:
        def __init__(self, f):
            self.f = f

        def read(self, *a):
            b = self.f.read(*a)
            read_total.append(len(b))
            return b

        def __getattr__(self, k):
            return getattr(self.f, k)

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.f.close()

    monkeypatch.setattr(safetensors_io, "open", lambda *a, **k: Counting(real_open(*a, **k)), raising=False)
    t = time.perf_counter()
    assert read_metadata(p) == {"ss_network_dim": "128"}
    assert time.perf_counter() - t < 0.5
    assert sum(read_total) == 8 + len(blob)


def test_save_atomic_roundtrip_and_replace(tmp_path):
    p = tmp_path / "out.safetensors"
    p.write_bytes(b"old")
    save_file_atomic(_tensors(), p, {"ss_network_dim": "4"})
    assert read_metadata(p) == {"ss_network_dim": "4"}
    loaded = load_tensors(p)
    assert all(torch.equal(loaded[k], v) for k, v in _tensors().items())
    assert os.listdir(tmp_path) == ["out.safetensors"]  # no temp file left behind
    # A non-contiguous tensor on input is fine (it is made contiguous).
    save_file_atomic({"x": torch.arange(6.).reshape(2, 3).t()}, p)
    assert torch.equal(load_tensors(p)["x"], torch.arange(6.).reshape(2, 3).t())


def test_save_rejects_non_string_metadata(tmp_path):
    with pytest.raises(LoraError, match="ss_network_dim"):
        save_file_atomic({"a": torch.zeros(1)}, tmp_path / "m.safetensors", {"ss_network_dim": 4})


def test_save_into_missing_folder(tmp_path):
    with pytest.raises(LoraFileError, match="does not exist"):
        save_file_atomic({"a": torch.zeros(1)}, tmp_path / "nope" / "m.safetensors")


@pytest.mark.parametrize("err, words", [(errno.ENOSPC, "disk is full"), (errno.EACCES, "could not write")])
def test_write_failure_keeps_old_file_and_cleans_up(tmp_path, monkeypatch, err, words):
    p = tmp_path / "keep.safetensors"
    save_file({"a": torch.ones(3)}, str(p))
    before = p.read_bytes()

    def failing_fsync(fd):
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(safetensors_io.os, "fsync", failing_fsync)
    with pytest.raises(LoraFileError) as e:
        save_file_atomic({"a": torch.zeros(3)}, p)
    msg = str(e.value)
    assert words in msg and "keep.safetensors" in msg and "Nothing was overwritten" in msg
    assert p.read_bytes() == before
    assert os.listdir(tmp_path) == ["keep.safetensors"]


def test_a_header_length_that_starts_like_a_pickle_is_still_safetensors(tmp_path):
    """A header of 0x30480 bytes starts the file with 80 04, a protocol-4 pickle's first bytes: a LoRA we trained
    (GLoRA, a few hundred modules) was refused as a pickle. The JSON right after the length decides; a real pickle
    and a zip named .safetensors are still refused."""
    import pickle
    t = {"lora_unet_a.lora_down.weight": torch.zeros(2, 3)}
    p = tmp_path / "a.safetensors"
    for pad in range(0, 4096, 8):  # metadata sized so that the header is exactly 0x30480 bytes long
        save_file(t, str(p), metadata={"pad": "x" * (0x30480 - 200 + pad)})
        if open(p, "rb").read(2) == b"\x80\x04":
            break
    assert open(p, "rb").read(2) == b"\x80\x04"
    assert torch.equal(load_tensors(p)["lora_unet_a.lora_down.weight"], t["lora_unet_a.lora_down.weight"])
    q = tmp_path / "b.safetensors"
    q.write_bytes(pickle.dumps({"x": list(range(100))}, protocol=4))
    with pytest.raises(LoraFileError, match="looks like a Python pickle"):
        read_header(q)
    z = tmp_path / "c.safetensors"
    torch.save({"x": torch.zeros(3)}, str(z))
    with pytest.raises(LoraFileError, match="zip archive"):
        read_header(z)


def test_write_atomic_gives_new_files_the_usual_mode_and_keeps_an_existing_one(tmp_path):
    """From the real WebUI: files written through a temp file (captions, reg images, sample and card pictures, the
    queue, states) came out 0600, from mkstemp, where a plain open() gives 0644."""
    from lib_lora.formats.safetensors_io import write_atomic
    new = tmp_path / "caption.txt"
    write_atomic(new, lambda f: f.write("svs bear"))
    assert os.stat(new).st_mode & 0o777 == 0o644 and new.read_text() == "svs bear"
    os.chmod(new, 0o640)
    write_atomic(new, lambda f: f.write("svs bear, grass"))
    assert os.stat(new).st_mode & 0o777 == 0o640 and new.read_text() == "svs bear, grass"
    assert os.listdir(tmp_path) == ["caption.txt"]
