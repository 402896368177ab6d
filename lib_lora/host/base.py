"""What the engine needs from whoever holds the model: the WebUI adapter or the headless loader.

Training and applying talk to this small interface only, so the same job runs inside the WebUI (queue lock,
progress bar, the WebUI's sampler) and on a rented GPU from the command line.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

import torch

from ..formats.family import model_family


class ModelHost:
    """A host around an already-built ldm/sgm model object (used headless and in tests)."""

    def __init__(self, sd_model, name: str = "model", path: str | None = None, device: torch.device | None = None,
                 sha256: str | None = None, legacy_hash: str | None = None):
        self.sd_model = sd_model
        self.family = model_family(sd_model)
        self.model_name = name
        self.model_path = path
        self.model_sha256 = sha256
        self.model_legacy_hash = legacy_hash
        self.device = device or next(sd_model.parameters()).device
        self._lock = threading.Lock()

    @property
    def model_id(self) -> str:
        """Identifies the weights for cache validation (latents depend on the VAE)."""
        return self.model_sha256 or self.model_legacy_hash or f"{self.model_name}:{id(self.sd_model)}"

    # cache_latents_to_disk's folder; None: ``.lora-studio-cache/latents`` in the run's output folder
    latent_cache_dir: str | None = None
    # who holds a run's lock, as a second run is told
    runs_as: str = "a LoRA Studio training"

    @property
    def parameterization(self) -> str:
        return getattr(self.sd_model, "parameterization", "eps")

    @contextmanager
    def lock(self):
        """Held for a whole training job; in the WebUI this is its queue lock (no generation meanwhile)."""
        with self._lock:
            yield

    @contextmanager
    def fp8_weights(self):
        """Entered while a job stores the base weights in FP8 (fp8_base): the WebUI's sampler is told so."""
        yield

    def describe(self) -> dict:
        return {"name": self.model_name, "family": self.family, "parameterization": self.parameterization,
                "hash": self.model_sha256[:10] if self.model_sha256 else self.model_legacy_hash}
