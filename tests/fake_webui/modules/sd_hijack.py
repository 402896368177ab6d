"""Test fake of A1111 v1.10.1 ``modules/sd_hijack.py`` (reference §6.5): the attention part, and the
textual-inversion database (`model_hijack.embedding_db`, where LoRAs register their bundled embeddings):
``model_hijack.optimization_method`` names the cross-attention optimization in use (None before one is applied);
the module-level ``undo_optimizations()`` puts the stock attention back and ``apply_optimizations(option=None)``
applies the chosen one again (returning its name). Nothing is replaced here: ``calls`` records both, in order."""
calls = []


def undo_optimizations():
    calls.append("undo")


def apply_optimizations(option=None):
    calls.append("apply")
    return model_hijack.optimization_method


class EmbeddingDatabase:
    """textual_inversion.EmbeddingDatabase's registry part (no tokenizer: names are the keys)."""
    def __init__(self):
        self.word_embeddings = {}
        self.skipped_embeddings = {}
        self.expected_shape = 768  # the tiny SD1 model's CLIP-L width

    def register_embedding(self, embedding, model):
        return self.register_embedding_by_name(embedding, model, embedding.name)

    def register_embedding_by_name(self, embedding, model, name):
        if embedding is None:
            self.word_embeddings.pop(name, None)
            return None
        self.word_embeddings[name] = embedding
        return embedding


class StableDiffusionModelHijack:
    optimization_method = None

    def __init__(self):
        self.embedding_db = EmbeddingDatabase()

    def apply_optimizations(self, option=None):
        self.optimization_method = apply_optimizations(option)


model_hijack = StableDiffusionModelHijack()
