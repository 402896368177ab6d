"""Test fake of A1111 v1.10.1 ``modules/call_queue.py`` (reference §7): ``queue_lock`` serialises GPU work and is
NOT re-entrant (a thread that holds it and asks again waits forever; ``acquire(blocking=False)`` answers False).
The real ``FIFOLock`` also hands the lock out in arrival order; this one only keeps the non-re-entrancy."""
import threading


class FIFOLock:
    def __init__(self):
        self._lock = threading.Lock()

    def acquire(self, blocking=True, timeout=-1):
        return self._lock.acquire(blocking, timeout)

    def release(self):
        self._lock.release()

    def locked(self):
        return self._lock.locked()

    __enter__ = acquire

    def __exit__(self, *exc):
        self.release()


queue_lock = FIFOLock()
