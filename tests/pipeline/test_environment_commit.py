"""The run's commit says when the code that ran differs from it."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from pipeline import environment


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_git_commit_marks_a_modified_tree(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    (repo / "pipeline").mkdir(parents=True)
    module = repo / "pipeline" / "environment.py"
    module.write_text("x = 1\n")

    def git(*args: str) -> str:
        return subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", *args], cwd=repo, check=True,
                              capture_output=True, text=True).stdout.strip()

    git("init", "-q")
    git("add", "-A")
    git("commit", "-qm", "one")
    head = git("rev-parse", "HEAD")
    monkeypatch.setattr(environment, "__file__", str(module))
    assert environment.git_commit() == head
    (repo / "untracked.txt").write_text("not part of the code")
    assert environment.git_commit() == head  # untracked files do not count
    module.write_text("x = 2\n")
    assert environment.git_commit() == head + "+modified"
    monkeypatch.setattr(environment, "__file__", str(tmp_path / "elsewhere" / "environment.py"))
    (tmp_path / "elsewhere").mkdir()
    assert environment.git_commit() is None  # not a checkout
