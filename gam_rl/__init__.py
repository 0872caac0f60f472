"""gam_rl: Global Autoregressive Models trained with distributional reinforcement learning."""

__version__ = "0.1.0"
