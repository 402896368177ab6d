"""Writing small kohya-format LoRA files for the glue tests (safetensors directly: an independent writer)."""
import json
import os

import torch
from safetensors.torch import save_file

# kohya module key -> A1111 layer name, for the tiny SD1 model of tests/models.py
SD1_TARGETS = {
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q":
        "diffusion_model_input_blocks_1_1_transformer_blocks_0_attn1_to_q",
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k":
        "diffusion_model_input_blocks_1_1_transformer_blocks_0_attn2_to_k",
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj": "transformer_text_model_encoder_layers_0_self_attn_q_proj",
    "lora_te_text_model_encoder_layers_1_mlp_fc1": "transformer_text_model_encoder_layers_1_mlp_fc1",
}
SD1_SHAPES = {  # (out, in) of those layers in the tiny SD1 model
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": (32, 32),
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k": (32, 768),
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj": (768, 768),
    "lora_te_text_model_encoder_layers_1_mlp_fc1": (3072, 768),
}


def write_lora(path, keys=None, rank=4, seed=0, metadata=None, extra_keys=None, shapes=None):
    """A LoRA with lora_down/lora_up/alpha for each module key; extra_keys: {key: (out, in)} added as given."""
    g = torch.Generator().manual_seed(seed)
    shapes = dict(shapes or SD1_SHAPES)
    shapes.update(extra_keys or {})
    tensors = {}
    for key in list(SD1_SHAPES if keys is None else keys) + list(extra_keys or {}):
        o, i = shapes[key]
        tensors[f"{key}.lora_down.weight"] = torch.randn(rank, i, generator=g) * 0.2
        tensors[f"{key}.lora_up.weight"] = torch.randn(o, rank, generator=g) * 0.2
        tensors[f"{key}.alpha"] = torch.tensor(float(rank))
    md = {"ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(rank)}
    md.update(metadata or {})
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_file(tensors, path, metadata={k: (v if isinstance(v, str) else json.dumps(v)) for k, v in md.items()})
    return path


def write_user_metadata(lora_path, **values):
    """The <stem>.json card sidecar A1111's editor writes (keys with spaces: 'activation text', …)."""
    data = {k.replace("_", " "): v for k, v in values.items()}
    with open(os.path.splitext(lora_path)[0] + ".json", "w", encoding="utf8") as f:
        json.dump(data, f)
