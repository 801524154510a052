"""stages/gpus.py reads nvidia-smi's CSV: one value per GPU, per line (names hold spaces)."""

from __future__ import annotations

import os
import stat

from stages import gpus

FAKE = '''#!/bin/sh
case "$1" in
  --query-gpu=name) printf 'NVIDIA H200\\nNVIDIA A100-SXM4-80GB\\n' ;;
  --query-gpu=compute_cap) printf '9.0\\n8.0\\n' ;;
  --query-gpu=memory.total) printf '143771\\n81920\\n' ;;
  --query-gpu=driver_version) printf 'N/A\\n' ;;
  *) echo "unknown field" >&2; exit 2 ;;
esac
'''


def fake_nvidia_smi(tmp_path, monkeypatch, script: str) -> None:
    tool = tmp_path / "nvidia-smi"
    tool.write_text(script)
    tool.chmod(tool.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")


def test_each_gpu_is_one_line_and_the_numbers_are_read(tmp_path, monkeypatch):
    fake_nvidia_smi(tmp_path, monkeypatch, FAKE)
    assert gpus.query("name") == ["NVIDIA H200", "NVIDIA A100-SXM4-80GB"]
    assert gpus.compute_capabilities() == [9.0, 8.0]
    assert gpus.memory_bytes() == 81920 * 2**20  # the smallest card decides what fits
    assert gpus.query("pci.bus_id") is None  # nvidia-smi failed: unknown, not an error


def test_unreadable_or_missing_nvidia_smi_means_unknown(tmp_path, monkeypatch):
    fake_nvidia_smi(tmp_path, monkeypatch, "#!/bin/sh\necho '[N/A]'\n")
    assert gpus.compute_capabilities() is None and gpus.memory_bytes() is None
    fake_nvidia_smi(tmp_path, monkeypatch, "#!/bin/sh\nexit 0\n")
    assert gpus.query("name") is None
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert gpus.query("name") is None
