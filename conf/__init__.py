"""Hydra configs of gam_rl, shipped inside the package as gam_rl.conf."""
