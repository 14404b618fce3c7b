"""`egmla bench multigpu`'s job runner where a GPU call would lose the rest of its runs: a run that hangs (a stuck
collective) is stopped at its own limit, not at the end of the call budget; a stopped torchrun's workers, which
torchrun starts in sessions of their own, are killed with it, not left holding the GPUs; and a child's output that
is not UTF-8 does not crash the report."""
import os
import sys
import time

import pytest

from egmla.bench import multigpu

# a stand-in for torchrun: one worker in a session of its own that ignores SIGTERM (a rank stuck in a collective);
# on SIGTERM it forwards the signal and waits for the worker, as torchrun's agent does
FAKE_TORCHRUN = """
import signal, subprocess, sys
worker = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                           "print('worker up', flush=True); time.sleep(120)"], start_new_session=True)
open(sys.argv[1], "w").write(str(worker.pid))
signal.signal(signal.SIGTERM, lambda *_: worker.terminate())
while True:
    try:
        worker.wait()
        break
    except InterruptedError:
        pass
"""


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is dead
    except OSError:
        return False


def test_a_hung_run_stops_at_its_own_limit_and_takes_its_workers_with_it(tmp_path, monkeypatch):
    monkeypatch.setattr(multigpu, "STOP_GRACE_S", 1.0)
    jobs = multigpu.Jobs(tmp_path / "log", dict(os.environ), deadline=time.monotonic() + 300)
    pid_file = tmp_path / "worker.pid"
    started = time.monotonic()
    job = jobs.run("hung", [sys.executable, "-c", FAKE_TORCHRUN, str(pid_file)], expected_s=30.0, limit_s=3.0)
    assert time.monotonic() - started < 30  # not the 300 s left in the call
    assert job["status"].startswith("stopped after 3s") and "limit" in job["status"]
    worker = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while alive(worker) and time.monotonic() < deadline:
        time.sleep(0.1)
    if alive(worker):  # clean up before failing
        os.kill(worker, 9)
        pytest.fail("torchrun's worker survived the stop")


def test_run_limit():
    assert multigpu.run_limit_s({}, 30.0) is None  # nothing finished yet: no prediction to hold the run to
    done = {"single": {"wall_s": 60.0, "trained_steps": 100, "median_step_s": 0.2, "processes": 1}}
    assert multigpu.run_limit_s(done, 30.0) == multigpu.RUN_LIMIT_MIN_S
    assert multigpu.run_limit_s(done, 100.0) == pytest.approx(multigpu.RUN_LIMIT_FACTOR * 100.0)


def test_output_that_is_not_utf8(tmp_path):
    jobs = multigpu.Jobs(tmp_path / "log", dict(os.environ), deadline=time.monotonic() + 100)
    job = jobs.run("bytes", [sys.executable, "-c", "import sys; sys.stdout.buffer.write(b'ok \\xff\\xfe\\n')"])
    assert job["status"] == "ok" and "ok \ufffd\ufffd" in job["output"]


def test_plot_reads_this_calls_records_over_issue_10s_beside_them(tmp_path):
    """docs/benchmarks.md §5 lets the new call's files land beside issue 10's metrics_RUN.jsonl: the plot must show
    the new `single` and `resume`, not issue 10's runs of the same names."""
    import json

    new = [{"run": name, "kind": "train", "step": 1, "loss": 1.0, "step_s": 0.1} for name in ("single", "resume")]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in new))
    (tmp_path / "metrics_single.jsonl").write_text(json.dumps({"kind": "train", "step": 1, "loss": 9.0,
                                                               "step_s": 0.2}) + "\n")
    runs = multigpu.plotted_records(tmp_path)
    assert set(runs) == {"single", "resume"} and runs["single"][0]["loss"] == 1.0
    (tmp_path / "metrics.jsonl").unlink()  # issue 10's folder alone: its files
    assert multigpu.plotted_records(tmp_path)["single"][0]["loss"] == 9.0
