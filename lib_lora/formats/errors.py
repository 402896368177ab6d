"""Errors raised by the engine. Every message names the file (when there is one) and says what to do."""
import os


class LoraError(Exception):
    """Base class: the message says what happened and what to do, and names the file when there is one."""

    def __init__(self, message, path=None, detail=None):
        self.path = os.fspath(path) if path is not None else None
        self.detail = detail  # evidence for the console and `inspect`, kept out of the one-line message
        if self.path is not None and os.path.basename(self.path) not in message:
            message = f"{os.path.basename(self.path)}: {message}"
        super().__init__(message)


class LoraFileError(LoraError):
    """Corrupt, truncated or unreadable file, not a safetensors file, or a pickle file we refuse to open."""


class FamilyMismatchError(LoraError):
    """The LoRA was made for another base-model family than the loaded one."""


class UnsupportedFamilyError(LoraError):
    """The LoRA (or the requested family) is not SD1.x, SD2.x or SDXL."""
