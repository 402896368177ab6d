"""Test fake of A1111 v1.10.1 ``modules/textual_inversion/textual_inversion.py``: ``Embedding`` and
``create_embedding_from_data`` with the same branches (TI ``string_to_param``, SDXL ``clip_l``/``clip_g``, a one-tensor
diffusers concept) and attributes; the embedding database lives in the fake ``sd_hijack``."""
import torch


class Embedding:
    def __init__(self, vec, name, step=None):
        self.vec = vec
        self.name = name
        self.step = step
        self.shape = None
        self.vectors = 0
        self.filename = None
        self.hash = None
        self.shorthash = None


def create_embedding_from_data(data, name, filename="unknown embedding file", filepath=None):
    if "string_to_param" in data:
        param_dict = data["string_to_param"]
        assert len(param_dict) == 1, "embedding file has multiple terms in it"
        vec = next(iter(param_dict.values())).detach().to(torch.float32)
        shape, vectors = vec.shape[-1], vec.shape[0]
    elif isinstance(data, dict) and "clip_g" in data and "clip_l" in data:
        vec = {k: v.detach().to(torch.float32) for k, v in data.items()}
        shape, vectors = data["clip_g"].shape[-1] + data["clip_l"].shape[-1], data["clip_g"].shape[0]
    elif isinstance(data, dict) and isinstance(next(iter(data.values())), torch.Tensor):
        assert len(data) == 1, "embedding file has multiple terms in it"
        emb = next(iter(data.values()))
        vec = (emb.unsqueeze(0) if emb.dim() == 1 else emb).detach().to(torch.float32)
        shape, vectors = vec.shape[-1], vec.shape[0]
    else:
        raise Exception(f"Couldn't identify {filename} as neither textual inversion embedding nor diffuser concept.")
    embedding = Embedding(vec, name)
    embedding.vectors = vectors
    embedding.shape = shape
    return embedding
