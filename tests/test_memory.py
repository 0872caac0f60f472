"""gam_rl.memory: freed blocks stay in the process, so re-allocating them costs no page faults."""

import os
import platform
import subprocess
import sys

import pytest

glibc_only = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt thresholds are glibc's")

PROBE = """
import resource, torch
from gam_rl.bench import data_like_tokens
from gam_rl.memory import retain_freed_memory
from gam_rl.policy import LSTMPolicy
applied = retain_freed_memory()
torch.manual_seed(0)
policy = LSTMPolicy(64, 2, 0.2).train()
optimiser = torch.optim.Adam(policy.parameters())
tokens = data_like_tokens(500, torch.device("cpu"), torch.Generator().manual_seed(1))

def step():  # the bench's 2 x 64 training step
    optimiser.zero_grad()
    (-policy.log_prob(tokens).mean()).backward()
    optimiser.step()

for _ in range(3):  # warm up: the heap grows to its peak
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print(applied, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 5)
"""


def probe(**env) -> tuple[bool, int]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GAM_RL_MALLOC"))}
    out = subprocess.run([sys.executable, "-c", PROBE], env={**clean, **env}, capture_output=True, text=True,
                         check=True).stdout.split()
    return out[0] == "True", int(out[1])


@glibc_only
def test_freed_blocks_are_reused_without_page_faults():
    """A 2 x 64 training step at batch 500: without the thresholds it faults ~3,000 pages in again
    every step (measured); with them the heap keeps its blocks and a step faults ~0."""
    applied, faults = probe()
    assert applied
    assert faults < 100
    off, faults_off = probe(GAM_RL_MALLOC="0")
    assert not off
    assert faults_off > 1000  # the probe does see the faults that the setting removes


@glibc_only
def test_a_users_own_malloc_setting_is_left_alone():
    applied, _ = probe(MALLOC_TRIM_THRESHOLD_="131072")
    assert not applied
