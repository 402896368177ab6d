"""The job queue: one at a time, persisted, reorderable, cancellable; survives a restart."""

import json
import threading
import time

from lib_lora.jobs.queue import CANCELLED, DONE, FAILED, INTERRUPTED, QUEUED, JobQueue
from lib_lora.train.trainer import TrainEvent, TrainResult


def _runner(log, gate=None):
    def run(job, emit, should_cancel):
        log.append(job.name)
        for s in range(1, 6):
            if gate is not None:
                gate.wait(5)
            if should_cancel():
                return TrainResult("cancelled", [], None, s, [], [], state_file="x-state.lsstate")
            emit(TrainEvent("step", step=s, total=5, epoch=1, epochs=1, loss=1.0 / s))
        if job.config.get("fail"):
            raise ValueError("the dataset folder is empty")
        return TrainResult("done", ["out.safetensors"], "out.safetensors", 5, [], ["a note"])
    return run


def test_runs_in_order_records_progress_and_failures(tmp_path, capsys):
    log = []
    q = JobQueue(str(tmp_path), _runner(log), autostart=False)
    a = q.submit({"output_name": "a"})
    b = q.submit({"output_name": "b", "fail": True})
    c = q.submit({"output_name": "c"})
    q.move(c.id, 0)
    q.start()
    assert q.wait_idle(20)
    q.stop(5)
    assert log == ["c", "a", "b"]
    assert q.get(a.id).status == DONE and q.get(a.id).step == 5 and len(q.get(a.id).losses) == 5
    assert q.get(b.id).status == FAILED and "dataset folder is empty" in q.get(b.id).error
    assert q.get(c.id).notes == ["a note"]
    # each job's end is in the console too, with the traceback of an unexpected error
    out, err = capsys.readouterr()
    assert "LoRA Studio: job 'b' failed: the dataset folder is empty" in out
    assert "LoRA Studio: job 'a' finished (1 file(s) in " in out
    assert "Traceback" in err and "ValueError: the dataset folder is empty" in err


def test_cancel_running_and_waiting(tmp_path):
    gate = threading.Event()
    q = JobQueue(str(tmp_path), _runner([], gate))
    a = q.submit({"output_name": "a"})
    b = q.submit({"output_name": "b"})
    for _ in range(100):
        if q.get(a.id).status == "running":
            break
        time.sleep(0.02)
    q.cancel(b.id)
    q.cancel(a.id)
    gate.set()
    assert q.wait_idle(20)
    q.stop(5)
    assert q.get(a.id).status == CANCELLED and q.get(a.id).resume_state == "x-state.lsstate"
    assert q.get(b.id).status == CANCELLED


def test_a_removed_job_takes_its_loss_plot_along(tmp_path):
    q = JobQueue(str(tmp_path), None, autostart=False)
    a, b = q.submit({"output_name": "a"}), q.submit({"output_name": "b"})
    (tmp_path / "plots").mkdir()
    for j in (a, b):
        (tmp_path / "plots" / f"{j.id}.png").write_bytes(b"png")
    q.remove(a.id)
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == [f"{b.id}.png"]


def test_persists_across_restart(tmp_path):
    q = JobQueue(str(tmp_path), None, autostart=False)
    a = q.submit({"output_name": "a"})
    b = q.submit({"output_name": "b"})
    # simulate a WebUI that died while job a ran
    data = json.loads((tmp_path / "queue.json").read_text())
    data["jobs"][0]["status"] = "running"
    (tmp_path / "queue.json").write_text(json.dumps(data))
    q2 = JobQueue(str(tmp_path), None, autostart=False)
    assert [j.id for j in q2.list()] == [a.id, b.id]
    assert q2.get(a.id).status == INTERRUPTED and q2.get(b.id).status == QUEUED
    q2.remove(b.id)
    assert [j.id for j in JobQueue(str(tmp_path), None, autostart=False).list()] == [a.id]


def test_unreadable_queue_file_is_kept_not_lost(tmp_path):
    (tmp_path / "queue.json").write_text("{not json")
    q = JobQueue(str(tmp_path), None, autostart=False)
    assert q.list() == []
    assert "could not be read" in q.load_error
    assert any(p.name.startswith("queue.json.unreadable-") for p in tmp_path.iterdir())
