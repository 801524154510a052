"""stages/load/publish.py: a cache folder is built once, by one process, however many ask at once."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from pathlib import Path

import pytest

from pipeline.contract import StageError
from stages.load.publish import publish


def _build_slowly(tmp: Path, log: Path, seconds: float) -> None:
    with open(log, "a") as f:
        f.write(f"{os.getpid()}\n")
    time.sleep(seconds)
    (tmp / "config.json").write_text("{}")


def _ask(dest: str, log: str, seconds: float) -> None:
    assert publish(lambda tmp: _build_slowly(tmp, Path(log), seconds), Path(dest)) == Path(dest)


def test_processes_asking_at_once_get_one_build(tmp_path):
    dest, log = tmp_path / "cache" / "model", tmp_path / "builds.log"
    fork = multiprocessing.get_context("fork")
    askers = [fork.Process(target=_ask, args=(str(dest), str(log), 1.0)) for _ in range(4)]
    for p in askers:
        p.start()
    for p in askers:
        p.join(30)
    assert [p.exitcode for p in askers] == [0, 0, 0, 0]
    assert len(log.read_text().split()) == 1  # without the lock each asker built its own
    assert (dest / "config.json").is_file()
    assert [p.name for p in dest.parent.iterdir() if not p.name.startswith(".")] == ["model"]  # no temp dirs left


def test_a_builder_killed_mid_build_leaves_no_folder_and_the_next_builds(tmp_path):
    dest, log = tmp_path / "model", tmp_path / "builds.log"
    fork = multiprocessing.get_context("fork")
    first = fork.Process(target=_ask, args=(str(dest), str(log), 60.0))
    first.start()
    deadline = time.time() + 20
    while not log.exists() and time.time() < deadline:
        time.sleep(0.05)
    waiter = fork.Process(target=_ask, args=(str(dest), str(log), 0.0))
    waiter.start()
    time.sleep(0.5)
    assert waiter.is_alive() and not dest.exists()  # waiting on the builder, nothing half-built to read
    os.kill(first.pid, signal.SIGKILL)
    waiter.join(20)
    first.join(5)
    assert waiter.exitcode == 0 and len(log.read_text().split()) == 2 and (dest / "config.json").is_file()


def test_a_folder_in_the_way_is_refused_with_the_fix(tmp_path):
    dest = tmp_path / "model"
    dest.mkdir()
    (dest / "weights.bin").write_text("?")
    with pytest.raises(StageError, match="holds no config.json") as e:
        publish(lambda tmp: (tmp / "config.json").write_text("{}"), dest)
    assert e.value.hint == f"delete it (rm -r {dest}) and run again; it is built anew"
