"""Bounded LRU caches: ΔW tensors (by bytes) and loaded networks (by count)."""

from __future__ import annotations

import threading
from collections import OrderedDict


def _nbytes(value) -> int:
    if value is None:
        return 0
    if isinstance(value, (tuple, list)):
        return sum(_nbytes(v) for v in value)
    numel = getattr(value, "numel", None)
    if numel is not None:
        return int(numel()) * value.element_size()
    return 0


class DeltaCache:
    """LRU of computed deltas ``(dW, dB)`` bounded by total tensor bytes.

    Keys are built by the patcher: (network file key, target, part, multiplier, dyn, weight dtype, device, base-weight
    fingerprint). Tensors stay on the device they were computed on (fp32), so switching LoRA sets back and forth
    costs one add per module instead of a recomputation. ``max_mb=0`` disables caching.
    """

    def __init__(self, max_mb: float = 256.0):
        self._lock = threading.Lock()
        self._data: OrderedDict = OrderedDict()
        self._bytes = 0
        self.max_bytes = int(max_mb * 1024 * 1024)
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key) -> bool:
        return key in self._data

    def set_limit_mb(self, max_mb: float) -> None:
        with self._lock:
            self.max_bytes = int(max_mb * 1024 * 1024)
            self._evict()

    def get(self, key):
        with self._lock:
            item = self._data.get(key)
            if item is None:
                self.misses += 1
                return None
            self._data.move_to_end(key)
            self.hits += 1
            return item[0]

    def put(self, key, value) -> bool:
        """Store ``value``; returns False when it is larger than the whole cache (not stored)."""
        size = _nbytes(value)
        with self._lock:
            old = self._data.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            if size > self.max_bytes:
                return False
            self._data[key] = (value, size)
            self._bytes += size
            self._evict()
            return True

    def _evict(self) -> None:
        while self._bytes > self.max_bytes and self._data:
            _, (_, size) = self._data.popitem(last=False)
            self._bytes -= size
            self.evictions += 1

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self._bytes = 0


class LRU:
    """Small LRU (loaded networks), bounded by count and, with ``size_of``, by bytes (the newest item stays even
    when it alone is larger). ``max_items=0`` keeps nothing."""

    def __init__(self, max_items: int = 8, max_bytes: int | None = None, size_of=None):
        self._lock = threading.Lock()
        self._data: OrderedDict = OrderedDict()
        self.max_items = max_items
        self.max_bytes = max_bytes
        self._size_of = size_of

    def _bytes(self) -> int:
        return sum(self._size_of(v) for v in self._data.values())

    def get(self, key):
        with self._lock:
            if key not in self._data:
                return None
            self._data.move_to_end(key)
            return self._data[key]

    def put(self, key, value) -> None:
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > max(self.max_items, 0):
                self._data.popitem(last=False)
            if self.max_bytes is not None and self._size_of is not None:
                while len(self._data) > 1 and self._bytes() > self.max_bytes:
                    self._data.popitem(last=False)

    def pop_matching(self, pred) -> int:
        """Drop entries whose key satisfies ``pred``; returns how many."""
        with self._lock:
            dead = [k for k in self._data if pred(k)]
            for k in dead:
                del self._data[k]
            return len(dead)

    def __len__(self) -> int:
        return len(self._data)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
