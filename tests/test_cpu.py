"""gam_rl/cpu.py: every gam-rl process flushes subnormal floats to zero, in its OpenMP threads too."""

import os
import subprocess
import sys

import pytest
import torch

# in a fresh process: the flags are per thread and set once, and the test process must keep IEEE subnormals
PROBE = """
import torch
torch.set_num_threads(2)
from gam_rl.cpu import flush_denormals
applied = flush_denormals()
x = torch.full((2_000_000,), 1e-39)  # subnormal in float32
y = x * 2.0  # a parallel elementwise op: chunks of it run in torch's worker threads
print(applied, int((y != 0).sum()), float(torch.tensor([1e-39]) * 2.0))
"""


def probe(flush: str | None) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k != "GAM_RL_FLUSH_DENORMAL"}
    if flush is not None:
        env["GAM_RL_FLUSH_DENORMAL"] = flush
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    return out.stdout.split()


@pytest.mark.skipif(not torch.backends.cpu.get_cpu_capability() or
                    os.uname().machine not in ("x86_64", "AMD64", "aarch64", "arm64"),
                    reason="torch flushes subnormals on x86 (SSE3) and AArch64 only")
def test_a_process_flushes_subnormals_in_every_thread_unless_told_not_to():
    applied, nonzero, single = probe(None)
    assert applied == "True" and nonzero == "0" and float(single) == 0.0  # every chunk of the parallel op flushed
    applied, nonzero, single = probe("0")
    assert applied == "False" and nonzero == "2000000" and float(single) == pytest.approx(2e-39)
