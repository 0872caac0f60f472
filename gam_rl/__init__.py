"""gam_rl: Global Autoregressive Models trained with distributional reinforcement learning."""

import os

# MKL's strict conditional numerical reproducibility: its gemm then gives the same bits at any thread
# count (by default a long inner dimension, e.g. a head's weight gradient over all positions, is split
# between threads and summed in another order). MKL reads it at its first call, so it is set here, before
# anything of the package runs; a value of the user's own is kept. No cost measured on one thread;
# docs/configuration.md, "Threads and reproducibility".
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

__version__ = "0.1.0"
