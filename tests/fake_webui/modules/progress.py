"""Test fake of A1111 v1.10.1 ``modules/progress.py`` (reference §7): the task bookkeeping ``/internal/progress``
reads. ``add_task_to_queue`` marks a task as waiting, ``start_task`` makes it the current one, ``finish_task``
ends it (the last 16 finished ids are kept). ``calls`` records every call, in order, for tests."""
import time

current_task = None
pending_tasks = {}
finished_tasks = []
calls = []


def add_task_to_queue(id_job):
    calls.append(("add_task_to_queue", id_job))
    pending_tasks[id_job] = time.time()


def start_task(id_task):
    global current_task
    calls.append(("start_task", id_task))
    current_task = id_task
    pending_tasks.pop(id_task, None)


def finish_task(id_task):
    global current_task
    calls.append(("finish_task", id_task))
    if current_task == id_task:
        current_task = None
    finished_tasks.append(id_task)
    del finished_tasks[:-16]
