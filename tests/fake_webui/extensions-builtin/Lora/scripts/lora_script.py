"""Test fake of the built-in Lora's ``scripts/lora_script.py`` (A1111 v1.10.1), written from what it documentedly
does at import (reference §9.1): patch the torch classes, register its callbacks (model_loaded, script_unloaded,
before_ui, infotext_pasted) and add its settings to ``options_templates``. Its ``before_ui`` registers the
``lora`` extra network and the ``lyco`` alias (the card page is left out)."""
import re

import extra_networks_lora
import lora_patches
import networks
from modules import extra_networks, script_callbacks, shared


def unload():
    networks.originals.undo()


def before_ui():
    networks.extra_network_lora = extra_networks_lora.ExtraNetworkLora()
    extra_networks.register_extra_network(networks.extra_network_lora)
    extra_networks.register_extra_network_alias(networks.extra_network_lora, "lyco")


networks.originals = lora_patches.LoraPatches()

script_callbacks.on_model_loaded(networks.assign_network_names_to_compvis_modules)
script_callbacks.on_script_unloaded(unload)
script_callbacks.on_before_ui(before_ui)
script_callbacks.on_infotext_pasted(networks.infotext_pasted)


def infotext_pasted(infotext, d):
    """The built-in's hash renaming: every <lora:NAME: whose "Lora hashes" entry it has cached becomes that file's
    alias (A1111 lora_script.py infotext_pasted)."""
    hashes = d.get("Lora hashes")
    if not hashes:
        return
    pairs = [x.strip().split(":", 1) for x in hashes.split(",")]
    hashes = {x[0].strip().replace(",", ""): x[1].strip() for x in pairs}

    def network_replacement(m):
        shorthash = hashes.get(m.group(1))
        on_disk = networks.available_network_hash_lookup.get(shorthash) if shorthash else None
        return m.group(0) if on_disk is None else f"<lora:{on_disk.get_alias()}:"

    d["Prompt"] = re.sub(re_lora, network_replacement, d["Prompt"])


re_lora = re.compile("<lora:([^:]+):")
script_callbacks.on_infotext_pasted(infotext_pasted)

shared.options_templates.update(shared.options_section(("extra_networks", "Extra Networks"), {
    "sd_lora": shared.OptionInfo("None", "LoRA added to every prompt"),
    "lora_preferred_name": shared.OptionInfo("Alias from file", "Name cards use in the tag"),
    "lora_add_hashes_to_infotext": shared.OptionInfo(True, "Write LoRA hashes to the infotext"),
    "lora_show_all": shared.OptionInfo(False, "Show cards of every model family"),
    "lora_hide_unknown_for_versions": shared.OptionInfo([], "Hide cards of unknown family for these models"),
}))
