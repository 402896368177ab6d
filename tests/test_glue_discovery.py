"""LoRA discovery as the built-in does it (names, aliases, forbidden aliases, hashes, sd version) + our additions
(sub/folder paths, unicode and spaces, JSON hash cache, family from shapes). No WebUI needed."""
import hashlib
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "fake_webui"))
from lora_files import write_lora  # noqa: E402

from lib_lora.host.discovery import Discovery, decode_metadata  # noqa: E402


def addnet(path):
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        f.seek(8 + n)
        return hashlib.sha256(f.read()).hexdigest()


@pytest.fixture()
def library(tmp_path):
    root = tmp_path / "Lora"
    lyco = tmp_path / "LyCORIS"
    files = {
        "plain": write_lora(str(root / "plain.safetensors"), seed=1),
        "sub": write_lora(str(root / "chars" / "deep dir" / "hero v2.safetensors"), seed=2,
                          metadata={"ss_output_name": "hero"}),
        "unicode": write_lora(str(root / "日本語" / "スタイル é.safetensors"), seed=3),
        "dup_a": write_lora(str(root / "a" / "twin.safetensors"), seed=4, metadata={"ss_output_name": "shared"}),
        "dup_b": write_lora(str(root / "b" / "other.safetensors"), seed=5, metadata={"ss_output_name": "shared"}),
        "same_stem": write_lora(str(root / "z" / "plain.safetensors"), seed=6),
        "sdxl": write_lora(str(root / "xl.safetensors"), seed=7, metadata={"ss_base_model_version": "sdxl_base_v1-0"}),
        "lyco": write_lora(str(lyco / "old.safetensors"), seed=8),
    }
    pt = root / "legacy.pt"
    pt.write_bytes(b"\x80\x02}q\x00.")  # a pickle: listed (like A1111) but never loaded
    disc = Discovery(dirs=lambda: [str(root), str(lyco)], cache_path=str(tmp_path / "cache" / "files.json"))
    disc.refresh()
    return disc, files, root, tmp_path


def test_names_aliases_and_subfolders(library):
    disc, files, root, _ = library
    assert len(disc.entries()) == 9  # 8 safetensors + the .pt
    hero = disc.resolve("hero")
    assert hero.filename == os.path.abspath(files["sub"]) and hero.name == "hero v2"
    assert disc.resolve("hero v2") is hero                         # the stem works too (A1111 maps both)
    assert disc.resolve("chars/deep dir/hero v2") is hero          # our addition: relative path
    assert disc.resolve("chars\\deep dir\\hero v2.safetensors") is hero
    assert hero.relname == "chars/deep dir/hero v2"
    uni = disc.resolve("スタイル é")
    assert uni is not None and uni.relname == "日本語/スタイル é"
    assert disc.resolve("old").root == os.path.abspath(str(library[3] / "LyCORIS"))  # lyco_dir_backcompat


def test_duplicate_alias_is_forbidden_and_same_stem(library):
    disc, files, root, _ = library
    # two files claim ss_output_name "shared": A1111 forbids the alias; each must be addressed by name
    assert "shared" in disc.forbidden
    assert disc.get_alias(disc.resolve("twin")) == "twin"
    assert disc.get_alias(disc.resolve("other")) == "other"
    assert disc.get_alias(disc.resolve("hero")) == "hero"
    # equal stems: the later one in walk order wins the bare name, as in A1111; the other by path
    assert disc.resolve("plain").filename == os.path.abspath(files["same_stem"])
    assert disc.resolve("plain", rescan=False) is disc.by_name["plain"]
    assert disc.resolve("plain").relname == "z/plain"
    assert disc.resolve("plain") is not disc.by_relname["plain"]
    assert "plain" in disc.forbidden  # the second 'plain' alias collided with the first


def test_sd_version_rules(library):
    disc, *_ = library
    assert disc.resolve("xl").sd_version == "SDXL"          # ss_base_model_version sdxl_*
    assert disc.resolve("twin").sd_version == "SD1"         # kohya keys with 768-wide TE and 32-ch UNet layers
    assert disc.resolve("legacy").sd_version == "Unknown"   # no metadata at all


def test_hashes_addnet_cached_by_mtime(library, monkeypatch):
    disc, files, root, tmp = library
    entry = disc.resolve("hero")
    assert entry.hash == ""  # lazily, like A1111's read_hash()
    h = disc.read_hash(entry)
    assert h == addnet(files["sub"]) and entry.shorthash == h[:12]
    assert disc.find_by_shorthash(h[:12]) is entry
    cache = json.load(open(tmp / "cache" / "files.json", encoding="utf8"))
    assert cache["files"][entry.filename]["sha256"] == h
    # a new Discovery reads it back without hashing
    import lib_lora.formats.hashes as fh
    monkeypatch.setattr(fh, "addnet_hash", lambda p: pytest.fail("re-hashed a cached file"))
    disc2 = Discovery(dirs=disc._dirs, cache_path=str(tmp / "cache" / "files.json"))
    assert disc2.resolve("hero").hash == h
    # a changed file (new mtime/size) is hashed again
    monkeypatch.undo()
    write_lora(files["sub"], seed=99, metadata={"ss_output_name": "hero"})
    os.utime(files["sub"], (1, 1))
    disc2.refresh()
    assert disc2.resolve("hero").hash == ""
    assert disc2.read_hash(disc2.resolve("hero")) == addnet(files["sub"])


def test_sshs_metadata_hash_is_trusted_and_no_hashing(library):
    disc, files, root, tmp = library
    p = write_lora(str(root / "signed.safetensors"), metadata={"sshs_model_hash": "ABCDEF0123456789" + "0" * 48})
    disc.refresh()
    assert disc.resolve("signed").shorthash == "abcdef012345"
    off = Discovery(dirs=disc._dirs, cache_path=None, can_hash=lambda: False)
    assert off.read_hash(off.resolve("plain")) == ""  # --no-hashing
    assert p


def test_rescan_on_miss_and_deleted_file(library):
    disc, files, root, _ = library
    new = write_lora(str(root / "late arrival.safetensors"), seed=11)
    assert disc.resolve("late arrival").filename == os.path.abspath(new)  # unknown name → one rescan
    os.remove(new)
    assert disc.resolve("late arrival") is None


def test_metadata_decoding_like_a1111():
    md = decode_metadata({"ss_tag_frequency": '{"a": {"x": 1}}', "ss_output_name": "x", "bad": "{nope"})
    assert md["ss_tag_frequency"] == {"a": {"x": 1}} and md["ss_output_name"] == "x" and md["bad"] == "{nope"


def test_unreadable_file_is_listed_with_its_error(library):
    disc, files, root, _ = library
    bad = root / "broken.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")
    disc.refresh()
    e = disc.resolve("broken")
    assert e is not None and e.error and "broken.safetensors" in e.error
