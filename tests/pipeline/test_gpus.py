"""pipeline/gpus.py reads nvidia-smi's CSV: one value per GPU, per line (names hold spaces)."""

from __future__ import annotations

import os
import stat

from pipeline import gpus

FAKE = '''#!/bin/sh
case "$1" in
  --query-gpu=name) printf 'NVIDIA H200\\nNVIDIA A100-SXM4-80GB\\n' ;;
  --query-gpu=compute_cap) printf '9.0\\n8.0\\n' ;;
  --query-gpu=memory.total) printf '143771\\n81920\\n' ;;
  --query-gpu=driver_version) printf 'N/A\\n' ;;
  --query-gpu=index,uuid,name,memory.total) printf '0, GPU-aaaa-1, NVIDIA H200, 143771\\n1, GPU-bbbb-2, NVIDIA H200, 143000\\n2, GPU-cccc-3, NVIDIA A100-SXM4-80GB, 81920\\n' ;;
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


def test_cuda_visible_devices_picks_the_gpus_the_rules_read(tmp_path, monkeypatch):
    """Indices or UUID prefixes, up to the first entry naming no GPU (as CUDA reads it); unknown
    where nvidia-smi's numbering and CUDA's may differ."""
    fake_nvidia_smi(tmp_path, monkeypatch, FAKE)
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    for visible, expected in (("1", 143000), ("2,0", 81920), ("GPU-bbbb", 143000), ("0,7,2", 143771), ("", None),
                              ("-1", None), ("MIG-1234", None)):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
        assert gpus.memory_bytes() == (expected and expected * 2**20), visible
    monkeypatch.delenv("CUDA_DEVICE_ORDER")  # mixed GPUs, CUDA's default order: an index is ambiguous
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert gpus.memory_bytes() is None
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-cccc")  # a UUID is not
    assert gpus.memory_bytes() == 81920 * 2**20
