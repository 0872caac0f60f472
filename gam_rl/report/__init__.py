"""`gam-rl-report` (also `python -m gam_rl.report`): gam-rl runs aggregated into the paper's Table 1,
per-cell tables, the Training-2 methods table and the figures.

The modules depend one way: model (run folders, their identity, RunRecord, ProfileData, Stat and
the shared formatting) <- tables (Table 1 and the other tables), figures (the paper's figures) and
methods (the methods table and figure, drawn with figures' helpers) <- cli (the command line and
the driver that writes every file). This file imports nothing, so importing one module does not
load the others.
"""
