"""stages/kernel_launch.py: the switch our Triton kernels read at launch (generate.fast_pdl)."""

from __future__ import annotations

import torch

from stages import kernel_launch


def test_dependent_launch_is_scoped_and_never_on_a_cpu(monkeypatch):
    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert not kernel_launch.dependent(gpu)
    with kernel_launch.dependent_launch(True):
        assert kernel_launch.dependent(gpu) and not kernel_launch.dependent(torch.device("cpu"))
        with kernel_launch.dependent_launch(False):
            assert not kernel_launch.dependent(gpu)
        assert kernel_launch.dependent(gpu)  # the outer answer again
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
        assert not kernel_launch.dependent(gpu)  # an A100 has no programmatic dependent launch
    assert not kernel_launch.dependent(gpu)
    assert kernel_launch.options(True) == {"launch_pdl": True} and kernel_launch.options(False) == {}
