"""Runs the fused all-reduce + add + RMSNorm kernel (stages/shard/all_reduce_norm.py) in Triton's
interpreter on a CPU: WORLD forked processes play the ranks (the interpreter is not thread-safe), each
rank's "GPU memory" a shared CPU buffer mapped at the same address in every process, as symmetric
memory gives each GPU its peers'. Several calls in a row exercise the rotation of receive areas, the
per-row call counters and the emptying of what was read.

    TRITON_INTERPRET=1 python push_kernel_interpreted.py WORLD DTYPE [in_turn|together]      (exit 0: all checks passed)

Checked: every rank gets the same bits; the residual and the normed rows match the unfused ops
(exactly for the float32 residual; within rounding of the interpreter's bf16); every receive area is
empty again afterwards; a -0.0 in the input (the empty mark) neither hangs nor changes the sum. A rank
that waits forever (a slot never filled) fails the run after a timeout instead of hanging the test.
"""

from __future__ import annotations

import os
import signal
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from stages.shard.all_reduce import EMPTY_BITS, PUSH_COPIES  # noqa: E402
from stages.shard.all_reduce_norm import _triton_kernel, add_rms_norm  # noqa: E402

WIDTH, ROWS, MAX_BYTES, CALLS, EPS = 48, 3, 4096, 5, 1e-5


def main(world: int, dtype: torch.dtype, wait: str = "in_turn") -> None:
    torch.set_num_threads(1)  # no OpenMP pool in the parent: forked children would hang on it
    kernel = _triton_kernel()
    assert kernel is not None and os.environ.get("TRITON_INTERPRET") == "1"
    bits, empty = EMPTY_BITS[dtype]
    # shared before the ranks fork: every process sees the same bytes at the same addresses
    buffers = [torch.zeros(2 * MAX_BYTES + PUSH_COPIES * world * MAX_BYTES, dtype=torch.uint8).share_memory_()
               for _ in range(world)]
    for b in buffers:
        b[2 * MAX_BYTES:].view(bits).fill_(empty)
    peers = torch.tensor([b.data_ptr() for b in buffers], dtype=torch.int64)
    counters = [torch.zeros(MAX_BYTES // 2, dtype=torch.int32).share_memory_() for _ in range(world)]
    out_h = torch.zeros(world, CALLS, ROWS, WIDTH, dtype=dtype).share_memory_()
    out_normed = torch.zeros(world, CALLS, ROWS, WIDTH, dtype=dtype).share_memory_()
    torch.manual_seed(0)
    weight, residual = torch.randn(WIDTH, dtype=dtype), torch.randn(ROWS, WIDTH, dtype=dtype)
    parts = [[torch.randn(ROWS, WIDTH, dtype=dtype) for _ in range(world)] for _ in range(CALLS)]
    parts[1][0][1, 3] = -0.0  # the empty mark as a real value: sent as +0.0

    def rank(r: int) -> None:
        for call in range(CALLS):
            kernel[(ROWS,)](parts[call][r], residual, weight, out_h[r, call], out_normed[r, call], peers,
                            2 * MAX_BYTES, MAX_BYTES // parts[call][r].element_size(), counters[r], EPS, N=WIDTH,
                            RANK=r, WORLD=world, COPIES=PUSH_COPIES, EMPTY=empty, WIDE=dtype == torch.float32,
                            BLOCK=64, TOGETHER=wait == "together", WP=1 << (world - 1).bit_length())

    children = []
    for r in range(world):
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                rank(r)
            except BaseException as e:  # noqa: BLE001 - reported, and the parent fails the run
                print(f"rank {r}: {type(e).__name__}: {e}", flush=True)
                code = 1
            os._exit(code)
        children.append(pid)
    deadline, codes = time.time() + 240, {}
    while len(codes) < world and time.time() < deadline:
        for pid in children:
            if pid not in codes:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    codes[pid] = os.waitstatus_to_exitcode(status)
        time.sleep(0.05)
    if len(codes) < world:
        for pid in children:
            if pid not in codes:
                os.kill(pid, signal.SIGKILL)
        print("a rank is still waiting for a peer's row", flush=True)
        os._exit(3)
    assert all(code == 0 for code in codes.values()), f"a rank failed: exit codes {list(codes.values())}"
    results = {(r, c): (out_h[r, c], out_normed[r, c]) for r in range(world) for c in range(CALLS)}
    for call in range(CALLS):
        summed = sum(p.float() for p in parts[call]).to(dtype)  # rank order, float32, one rounding
        want_h, want_normed = add_rms_norm(summed, residual, weight, EPS, upcast=True)
        for r in range(world):
            h, normed = results[(r, call)]
            assert torch.equal(h, results[(0, call)][0]) and torch.equal(normed, results[(0, call)][1]), (r, call)
        h, normed = results[(0, call)]
        if dtype == torch.float32:
            assert torch.equal(h, want_h), call
            torch.testing.assert_close(normed, want_normed)
        else:  # the interpreter rounds bf16 its own way: within one step of bf16
            torch.testing.assert_close(h, want_h, atol=0.07, rtol=0.01)
            torch.testing.assert_close(normed, want_normed, atol=0.07, rtol=0.02)
    for b in buffers:
        assert bool((b[2 * MAX_BYTES:].view(bits) == empty).all()), "a receive area was left filled"
    assert all(bool((c[:ROWS] == CALLS).all()) and int(c[ROWS:].sum()) == 0 for c in counters)
    print("ok", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), getattr(torch, sys.argv[2]), *sys.argv[3:4])
