"""Print a Markdown table of the key figures of one or more gam-rl run folders.

usage: python scripts/summarize_runs.py RUN_DIR [RUN_DIR ...]
"""

import json
import sys
from pathlib import Path

COLUMNS = [("|D|", "dataset_size"), ("method", "method"), ("H", "entropy_true"), ("CE(T,r)", "ce_test_r"),
           ("CE(T,p_lambda)", "ce_test_p_lambda"), ("CE(T,pi)", "ce_test_pi"), ("mtf r", "motif_freq_r"),
           ("mtf pi", "motif_freq_pi"), ("len r", "avg_len_r"), ("len pi", "avg_len_pi"),
           ("T1 L1 mismatch", "moment_mismatch_l1"), ("swaps", "swap_count"), ("accept", "distill_acceptance_rate")]


def cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e-2 else f"{value:.4f}"
    return str(value)


def main(paths: list[str]) -> None:
    print("| " + " | ".join(name for name, _ in COLUMNS) + " | seconds per stage | samples per stage |")
    print("|" + "---|" * (len(COLUMNS) + 2))
    for path in paths:
        results = json.loads((Path(path) / "results.json").read_text())
        if results.get("status") != "ok":
            print(f"| {path}: {results.get('status')} {results.get('error', '')} |")
            continue
        timings = ", ".join(f"{k} {v:.0f}" for k, v in results["timings"].items())
        samples = ", ".join(f"{k} {v}" for k, v in results["samples"].items())
        print("| " + " | ".join(cell(results.get(key)) for _, key in COLUMNS) + f" | {timings} | {samples} |")


if __name__ == "__main__":
    main(sys.argv[1:])
