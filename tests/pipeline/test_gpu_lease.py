"""pipeline/gpu_lease.py: jobs side by side lease disjoint GPUs, wait for them in turn, and see who
holds them; a lock dies with its process."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

from pipeline.gpu_lease import aligned_groups, gpu_lease
from tests.conftest import ROOT


def test_a_job_waits_for_gpus_another_process_holds_until_it_dies(tmp_path, monkeypatch):
    monkeypatch.setenv("OPTIPIPE_GPU_LOCKS", str(tmp_path))
    hold = ("import time\nfrom pipeline.gpu_lease import gpu_lease\n"
            "with gpu_lease(['2'], 1):\n    print('held', flush=True)\n    time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", hold], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        killer = threading.Timer(0.5, holder.kill)  # SIGKILL: the kernel drops its lock, no file to clean
        killer.start()
        said: list[str] = []
        started = time.monotonic()
        with gpu_lease(["0", "1", "2", "3"], 4, say=said.append, poll_s=0.05) as four:
            waited = time.monotonic() - started
        assert four == ["0", "1", "2", "3"] and waited >= 0.4
        assert len(said) == 1 and "waiting for 4 free GPU(s) of 0,1,2,3" in said[0]
        assert f"GPU 2: pid {holder.pid}" in said[0] and "GPU 0" not in said[0]  # who holds what: the waiter says
    finally:
        holder.kill()
        holder.wait()


def test_a_large_job_is_not_overtaken_by_later_small_ones(tmp_path, monkeypatch):
    """While a 4-GPU job waits, a 1-GPU job that asks later must not take the GPUs that are free."""
    monkeypatch.setenv("OPTIPIPE_GPU_LOCKS", str(tmp_path))
    ids, order = ["0", "1", "2", "3"], []
    hold = ("import time\nfrom pipeline.gpu_lease import gpu_lease\n"
            "with gpu_lease(['0'], 1):\n    print('held', flush=True)\n    time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", hold], cwd=ROOT, stdout=subprocess.PIPE, text=True)

    def job(name: str, size: int) -> None:
        with gpu_lease(ids, size, say=lambda _: None, poll_s=0.05) as got:
            order.append((name, got))
            time.sleep(0.2)

    try:
        assert holder.stdout.readline().strip() == "held"
        big = threading.Thread(target=job, args=("four", 4))
        big.start()
        time.sleep(0.3)  # the 4-GPU job is waiting for GPU 0
        small = threading.Thread(target=job, args=("one", 1))
        small.start()
        time.sleep(0.3)
        assert order == []  # GPUs 1-3 are free, but the small job waits its turn
        holder.kill()
        big.join(10)
        small.join(10)
        assert order == [("four", ids), ("one", ["0"])]
    finally:
        holder.kill()
        holder.wait()


def test_gpu_groups_are_aligned():
    assert aligned_groups(["0", "1", "2", "3"], 2) == [["0", "1"], ["2", "3"]]
    assert aligned_groups(["0", "1", "2"], 2) == [["0", "1"]]
    assert aligned_groups(["0", "1"], 4) == [["0", "1"]]  # more than there are: all of them
