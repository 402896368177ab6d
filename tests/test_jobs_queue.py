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


def test_a_cancel_asked_before_the_webui_stopped_stands_after_the_restart(tmp_path):
    """The WebUI stopped (or died) while a cancel waited for the job's slow set-up: the job did not run again."""
    gate = threading.Event()
    q = JobQueue(str(tmp_path), _runner([], gate), autostart=False)
    a = q.submit({"output_name": "a"})
    q.start()
    for _ in range(100):
        if q.get(a.id).status == "running":
            break
        time.sleep(0.02)
    q.cancel(a.id)
    # the process dies here: the file holds a running job with the cancel asked
    data = json.loads((tmp_path / "queue.json").read_text())
    assert data["jobs"][0]["status"] == "running" and data["jobs"][0]["cancel_asked"] is True
    q2 = JobQueue(str(tmp_path), None, autostart=False)
    job = q2.get(a.id)
    assert job.status == CANCELLED and job.message == ("cancelled (the WebUI stopped before the cancel was done); "
                                                       "no resumable state was saved")
    assert q2.pending() == []  # (nothing to run again)
    gate.set()
    q.stop(5)


def test_unreadable_queue_file_is_kept_not_lost(tmp_path):
    (tmp_path / "queue.json").write_text("{not json")
    q = JobQueue(str(tmp_path), None, autostart=False)
    assert q.list() == []
    assert "could not be read" in q.load_error
    assert any(p.name.startswith("queue.json.unreadable-") for p in tmp_path.iterdir())


def test_a_job_cut_off_by_a_restart_continues_from_its_newest_state(tmp_path):
    """The queue records each state the run saves; after a restart the job says it continues from there, gets it
    as its resume state, and its history is not repeated. Without a state it says it starts again and its record
    starts again too."""
    import shutil

    state = tmp_path / "a-step00000002-state.lsstate"
    gate, cut = threading.Event(), threading.Event()

    def first_run(job, emit, should_cancel):
        for s in (1, 2, 3):
            emit(TrainEvent("step", step=s, total=5, epoch=1, epochs=1, loss=1.0 / s))
            if s == 2:
                state.write_bytes(b"state")
                (tmp_path / "a-step00000002.safetensors").write_bytes(b"lora")
                emit(TrainEvent("save", step=2, path=str(tmp_path / "a-step00000002.safetensors")))
                emit(TrainEvent("state", step=2, path=str(state)))
                emit(TrainEvent("note", message="a note of the run"))
        cut.set()
        gate.wait(10)  # (the WebUI "dies" here: the test copies the queue file as it stands)
        return TrainResult("done", [], None, 3, [], [])

    live = tmp_path / "live"
    q = JobQueue(str(live), first_run)
    a = q.submit({"output_name": "a"})
    b = q.submit({"output_name": "b"})
    assert cut.wait(10)
    restarted = tmp_path / "restarted"
    restarted.mkdir()
    shutil.copy(live / "queue.json", restarted / "queue.json")
    gate.set()
    q.wait_idle(10)
    q.stop(5)

    seen = {}

    def second_run(job, emit, should_cancel):
        seen[job.name] = (job.resume_state, list(job.notes), job.step)
        start = 3 if job.resume_state else 1
        for s in range(start, 6):
            emit(TrainEvent("step", step=s, total=5, epoch=1, epochs=1, loss=1.0 / s))
        emit(TrainEvent("save", step=2, path=str(tmp_path / "a-step00000002.safetensors")))  # (saved again)
        return TrainResult("done", [str(tmp_path / "a.safetensors")], None, 5, [], [])

    q2 = JobQueue(str(restarted), second_run, autostart=False)
    j = q2.get(a.id)
    assert j.status == INTERRUPTED
    assert j.message == ("the WebUI stopped while this job ran; it will continue from its last saved state "
                         "(a-step00000002-state.lsstate, step 2)")
    q2.start()
    assert q2.wait_idle(10)
    q2.stop(5)
    resume, notes, step = seen["a"]
    assert resume == str(state) and step == 2
    assert notes == ["the WebUI stopped while this job ran; it continues from its last saved state "
                     "(a-step00000002-state.lsstate, step 2)"]  # (the run says its own notes again)
    j = q2.get(a.id)
    assert j.status == DONE and [p[0] for p in j.losses] == [1, 2, 3, 4, 5]
    assert j.notes[0].startswith("the WebUI stopped while this job ran; it continues from")
    assert j.files == [str(tmp_path / "a-step00000002.safetensors"), str(tmp_path / "a.safetensors")]
    assert q2.get(b.id).status == DONE

    # the same cut without any state saved: said, and the record starts again
    state.unlink()
    q3 = JobQueue(str(tmp_path / "again"), None, autostart=False)
    shutil.copy(restarted / "queue.json", tmp_path / "again" / "queue.json")
    data = json.loads((tmp_path / "again" / "queue.json").read_text())
    data["jobs"][0].update(status="running", losses=[[1, 1.0], [2, 0.5], [3, 0.3]], step=3)
    (tmp_path / "again" / "queue.json").write_text(json.dumps(data))
    seen.clear()
    q3 = JobQueue(str(tmp_path / "again"), second_run, autostart=False)
    assert "no resumable state had been saved (save_state keeps one with each save), so it will start again from " \
           "the beginning" in q3.get(a.id).message
    q3.start()
    assert q3.wait_idle(10)
    q3.stop(5)
    assert seen["a"][0] is None and seen["a"][2] == 0
    assert [p[0] for p in q3.get(a.id).losses] == [1, 2, 3, 4, 5]


def test_a_queue_stopped_under_a_running_job_keeps_it_to_go_on_later(tmp_path):
    """The WebUI going away (a reload, a signal) stops the queue: the running job saves a state as on a cancel,
    but stays in line as interrupted and continues from that state when the queue runs again. A cancel the user
    asked for stays a cancel."""
    gate = threading.Event()
    state = tmp_path / "a-cancelled-state.lsstate"

    def run(job, emit, should_cancel):
        for s in range(1, 100):
            emit(TrainEvent("step", step=s, total=99, epoch=1, epochs=1, loss=1.0))
            gate.set()
            if should_cancel():
                state.write_bytes(b"state")
                return TrainResult("cancelled", [], None, s, [], [], state_file=str(state))
            time.sleep(0.01)
        return TrainResult("done", [], None, 99, [], [])

    q = JobQueue(str(tmp_path / "q"), run)
    a = q.submit({"output_name": "a"})
    assert gate.wait(10)
    q.stop(10)
    j = q.get(a.id)
    assert j.status == INTERRUPTED and j.resume_state == str(state) and j.resume_step == j.step
    assert j.message == ("the WebUI stopped while this job ran; it will continue from its last saved state "
                         f"(a-cancelled-state.lsstate, step {j.step})")
    seen = []
    q2 = JobQueue(str(tmp_path / "q"), lambda job, emit, sc: seen.append(job.resume_state) or TrainResult(
        "done", [], None, 99, [], []), autostart=False)
    assert q2.get(a.id).status == INTERRUPTED
    q2.start()
    assert q2.wait_idle(10)
    q2.stop(5)
    assert seen == [str(state)] and q2.get(a.id).status == DONE

    gate.clear()
    q3 = JobQueue(str(tmp_path / "q3"), run)
    b = q3.submit({"output_name": "b"})
    assert gate.wait(10)
    q3.cancel(b.id)
    assert q3.wait_idle(10)
    q3.stop(5)
    assert q3.get(b.id).status == CANCELLED


def test_a_full_disk_under_the_queue_file_stops_neither_the_job_nor_the_queue(tmp_path, monkeypatch, capsys):
    """The queue is saved after events; when the disk fills mid-job the save fails: the running job still ends
    (with a note), the next one runs, the console says so once, and saving resumes when there is room."""
    import errno

    import lib_lora.jobs.queue as queue_mod
    real = queue_mod.write_atomic
    full = {"now": False}

    def write_atomic(path, *a, **k):
        if full["now"]:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, *a, **k)
    monkeypatch.setattr(queue_mod, "write_atomic", write_atomic)

    def runner(job, emit, should_cancel):
        full["now"] = job.name == "a"  # fills during the first job, freed for the second
        emit(TrainEvent("note", message="a note"))
        if job.name == "b":  # (what the trainer says where the WebUI's console should show it too)
            emit(TrainEvent("note", message="waiting for room", extra={"console": True}))
        emit(TrainEvent("step", step=1, total=1, epoch=1, epochs=1, loss=1.0))
        return TrainResult("done", ["out.safetensors"], "out.safetensors", 1, [], ["a note"])
    q = JobQueue(str(tmp_path), runner, autostart=False)
    a, b = q.submit({"output_name": "a"}), q.submit({"output_name": "b"})
    q.start()
    assert q.wait_idle(20)
    q.stop(5)
    assert q.get(a.id).status == DONE and q.get(b.id).status == DONE
    problem = (f"the job queue could not be saved to {q.path} (the disk is full); it goes on running, but a WebUI "
               "restart would not bring back what changed since. Free some space")
    assert q.get(a.id).notes == ["a note", problem] and q.get(b.id).notes == ["a note"]
    out = capsys.readouterr().out
    assert out.count(problem) == 1 and "LoRA Studio: the job queue is saved again" in out
    assert "LoRA Studio: job 'b': waiting for room" in out and "a note" not in out
    assert q.save_error is None
    saved = {j["name"]: j["status"] for j in json.load(open(q.path))["jobs"]}
    assert saved == {"a": DONE, "b": DONE}


def test_a_resumed_run_starts_its_record_at_the_states_step(tmp_path):
    """The start event of a run continued from a state carries that step: the list showed step 0 of N while the
    latents were cached, until the first step."""
    seen = []

    def run(job, emit, should_cancel):
        emit(TrainEvent("start", step=120, total=180, epochs=10, message="LoRA for 72 modules"))
        seen.append((job.step, job.total))
        emit(TrainEvent("cache", step=1, total=180, message="caching latents 1/4"))
        seen.append((job.step, job.total))
        return TrainResult("done", [], None, 180, [], [])

    q = JobQueue(str(tmp_path), run)
    q.submit({"output_name": "a", "resume": "a-state.lsstate"})
    assert q.wait_idle(20)
    q.stop(5)
    assert seen == [(120, 180), (120, 180)]


def test_cancelling_stays_said_while_the_current_image_or_step_finishes(tmp_path):
    """A cancel during latent caching waits for the image being encoded; the list said 'caching latents 2/4' again
    at the next image, as if the cancel had been lost."""
    asked, seen = threading.Event(), []

    def run(job, emit, should_cancel):
        emit(TrainEvent("cache", step=0, total=8, message="caching latents 0/4"))
        asked.wait(10)
        emit(TrainEvent("cache", step=1, total=8, message="caching latents 1/4"))
        seen.append(job.message)
        return TrainResult("cancelled", [], None, 0, [], [])

    q = JobQueue(str(tmp_path), run)
    job = q.submit({"output_name": "a"})
    for _ in range(100):
        if q.get(job.id).message.startswith("caching latents 0/4"):
            break
        time.sleep(0.05)
    q.cancel(job.id)
    asked.set()
    assert q.wait_idle(20)
    q.stop(5)
    assert seen == ["cancelling…"]


def test_clear_finished_keeps_waiting_jobs_and_resumable_ones(tmp_path):
    q = JobQueue(str(tmp_path), None, autostart=False)
    done, failed, cancelled, resumable, waiting = (q.submit({"output_name": n}) for n in "abcde")
    state = tmp_path / "d-cancelled-state.lsstate"
    state.write_bytes(b"state")
    for job, status in ((done, DONE), (failed, FAILED), (cancelled, CANCELLED), (resumable, CANCELLED)):
        job.status = status
    cancelled.resume_state = str(tmp_path / "gone.lsstate")  # (its state was deleted: nothing left to resume)
    resumable.resume_state = str(state)
    done.resume_state = str(state)  # (a finished run's own state: the job is done, the file stays on disk)
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / f"{done.id}.png").write_bytes(b"png")

    removed, kept = q.clear_finished()
    assert [j.id for j in removed] == [done.id, failed.id, cancelled.id] and [j.id for j in kept] == [resumable.id]
    assert [j.id for j in q.list()] == [resumable.id, waiting.id]
    assert not (tmp_path / "plots" / f"{done.id}.png").exists() and state.exists()
    # the list on disk changed too: a restart brings back what is left
    assert [j.id for j in JobQueue(str(tmp_path), None, autostart=False).list()] == [resumable.id, waiting.id]
    # and the resumable one goes when asked
    removed, kept = q.clear_finished(keep_resumable=False)
    assert [j.id for j in removed] == [resumable.id] and kept == [] and [j.id for j in q.list()] == [waiting.id]
    assert q.clear_finished() == ([], [])
