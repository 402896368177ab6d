"""Test fake of A1111 v1.10.1 ``modules/shared_state.py`` (reference §7): the job state behind the progress bar.
``begin(job)`` starts a job (clears ``interrupted``/``skipped``, ``job_count`` -1), ``end()`` ends it,
``interrupt()`` is the Interrupt button. ``calls`` records begin/end with the job name, for tests."""
import time


class State:
    def __init__(self):
        self.skipped = False
        self.interrupted = False
        self.job = ""
        self.job_no = 0
        self.job_count = 0
        self.sampling_step = 0
        self.sampling_steps = 0
        self.textinfo = None
        self.time_start = None
        self.calls = []

    def begin(self, job: str = "(unknown)"):
        self.calls.append(("begin", job))
        self.job = job
        self.job_no = 0
        self.job_count = -1
        self.sampling_step = 0
        self.textinfo = None
        self.interrupted = False
        self.skipped = False
        self.time_start = time.time()

    def end(self):
        self.calls.append(("end", self.job))
        self.job = ""
        self.job_count = 0

    def interrupt(self):
        self.interrupted = True

    def skip(self):
        self.skipped = True

    def nextjob(self):
        self.job_no += 1
        self.sampling_step = 0
