"""LoRA file formats: safetensors I/O, A1111/kohya hashes, key mapping, family detection, match reports."""
from .errors import FamilyMismatchError, LoraError, LoraFileError, UnsupportedFamilyError
from .family import FamilyInfo, detect_family, families_from_keys, family_from_metadata
from .hashes import addnet_hash, legacy_model_hash, lora_hash, precalculate_safetensors_hashes, sha256_file, \
    shorthash, sshs_hashes
from .keymap import FAMILIES, FAMILY_LABELS, SUFFIXES, Target, component_of, group_modules, map_module_key, \
    map_module_key_with_reason, split_key
from .report import MatchReport
from .safetensors_io import load_tensors, read_header, read_metadata, read_shapes, refuse_pickle, save_file_atomic, \
    write_atomic

__all__ = [
    "LoraError", "LoraFileError", "FamilyMismatchError", "UnsupportedFamilyError",
    "read_header", "read_metadata", "read_shapes", "load_tensors", "save_file_atomic", "write_atomic", "refuse_pickle",
    "addnet_hash", "sha256_file", "legacy_model_hash", "shorthash", "precalculate_safetensors_hashes",
    "sshs_hashes", "lora_hash",
    "Target", "split_key", "group_modules", "map_module_key", "map_module_key_with_reason", "component_of",
    "FAMILIES", "FAMILY_LABELS", "SUFFIXES",
    "FamilyInfo", "detect_family", "family_from_metadata", "families_from_keys",
    "MatchReport",
]
