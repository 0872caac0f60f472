"""Flush subnormal floats to zero in every gam-rl process, before its first parallel tensor op.

A float32 below 1.2e-38 is subnormal, and x86 cores take a microcode assist on every operation that
reads or writes one: about 100x the normal cost. A training update whose loss coefficients are tiny
(an f-DPG draw whose items all have pi/q near 0, so that c_i ~ 1e-22 and the LSTM's backward carries
gradients of 1e-30 and less) then runs its backward in subnormals: measured on the Intel VM, 1.29 s
instead of 10 ms for 256 strings of length 30 (docs/measurements.md, "subnormal floats"). Such an
update moves pi by nothing a float32 can hold anyway, so flushing them to zero (FTZ, and reading them as
zero, DAZ) changes no result that matters and keeps every update at its normal cost.

The flags live in each thread's floating-point control register, and a new thread copies its creator's:
so this runs before the first parallel region, whose OpenMP workers then inherit it (set after they
exist, only the calling thread flushes, and the measured backward with 2 threads stayed 50x slower).
GAM_RL_FLUSH_DENORMAL=0 leaves IEEE subnormals on.
"""

from __future__ import annotations

import functools
import os

import torch


@functools.cache  # once per process
def flush_denormals() -> bool:
    """Set FTZ/DAZ for this thread (and the threads it starts from now on); False where it does not apply:
    switched off (GAM_RL_FLUSH_DENORMAL=0), or a CPU without the flags (torch says so)."""
    if os.environ.get("GAM_RL_FLUSH_DENORMAL", "1") == "0":
        return False
    return bool(torch.set_flush_denormal(True))
