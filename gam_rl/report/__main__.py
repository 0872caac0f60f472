"""`python -m gam_rl.report SWEEP_DIR...`: the same as gam-rl-report."""

import sys

from gam_rl.report.cli import main

sys.exit(main())
