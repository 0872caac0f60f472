"""gam-rl-report on fabricated run folders (no training): Table 1 as ratios of per-method means (the
paper's aggregates reproduced), the per-cell ratios, each run's own H, failed/missing runs listed and
excluded, infinite ratios counted, the paper compared only with profile paper, figures, CLI."""

import csv
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from matplotlib.image import imread

from gam_rl.report.cli import main

ROOT = Path(__file__).resolve().parents[1]
M1, M2 = "1000101000101", "10001011111000"
H = {M1: 0.5, M2: 0.4}  # deliberately different, so a single-H report gives other numbers
SEEDS = (1234, 4444)
SIZES = (500, 1000)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_values(motif: str, seed: int, size: int, method: str) -> dict:
    """Known metrics: CE(T, pi)/H = k, with k depending on seed, size and method only."""
    k = 1.1 + 0.1 * SEEDS.index(seed) + 0.02 * SIZES.index(size) + (0.05 if method == "distill" else 0.0)
    ce_r = H[motif] * (1.5 - 0.1 * SIZES.index(size)) + 0.001 * SEEDS.index(seed)
    return {"entropy_true": H[motif], "ce_test_r": ce_r, "ce_test_p_lambda": ce_r * 0.9, "ce_test_pi": H[motif] * k,
            "motif_freq_r": 0.01 + 0.002 * SEEDS.index(seed) + 0.5 * SIZES.index(size),
            "motif_freq_pi": 0.9 + 0.01 * SEEDS.index(seed) + (0.03 if method == "dpg_off" else 0.0),
            "avg_len_r": 30.0, "avg_len_pi": 29.0 + SEEDS.index(seed)}


def write_run(folder: Path, results: dict | None, config: dict | None = None) -> Path:
    folder.mkdir(parents=True)
    if results is not None:
        (folder / "results.json").write_text(json.dumps(results))
    if config is not None:
        (folder / ".hydra").mkdir()
        lines = [f"{k}: {v}" if not isinstance(v, dict) else f"{k}:\n  name: {v['name']}" for k, v in config.items()]
        (folder / ".hydra" / "config.yaml").write_text("\n".join(lines) + "\n")
    return folder


def ok_results(motif, seed, size, method, profile="cpu", **overrides) -> dict:
    results = {"status": "ok", "motif": motif, "features": "1001111", "dataset_size": size, "seed": seed,
               "method": method, "profile": profile, **run_values(motif, seed, size, method),
               "lambda": [-5.0], "moments_data": [0.0], "moments_model": [0.01], "z_hat": 0.01,
               "timings": {"r": 1.0}, "samples": {"z": 100}, "wall_time_s": 12.5}
    results.update(overrides)
    return results


def hydra_config(motif, seed, size, method, profile="cpu") -> dict:
    # motif written bare, as Hydra saves a bit string typed on the command line (an int)
    return {"motif": motif, "features": "'1001111'", "dataset_size": size, "seed": seed,
            "method": {"name": method}, "profile": profile}


# The sweep: 2 motifs x 2 seeds x 2 sizes x {dpg_off, distill}, with these exceptions
FAILED = (M2, 4444, 1000, "distill")  # status failed
MISSING = (M1, 4444, 1000, "dpg_off")  # only .hydra/config.yaml (job killed)
ZERO_MTF_R = (M1, 1234, 500, "dpg_off")  # motif_freq_r = 0: mtf dpg/r is infinite
INF_P_LAMBDA = (M2, 1234, 500, "distill")  # ce_test_p_lambda = "inf"


@pytest.fixture
def sweep(tmp_path) -> Path:
    root = tmp_path / "sweep"
    for motif in (M1, M2):
        for seed in SEEDS:
            for size in SIZES:
                for method in ("dpg_off", "distill"):
                    key = (motif, seed, size, method)
                    folder = root / f"{motif}_D{size}_s{seed}_{method}"
                    if key == MISSING:
                        write_run(folder, None, hydra_config(*key))
                    elif key == FAILED:
                        write_run(folder, {**ok_results(*key), "status": "failed",
                                           "error": "RuntimeError: rejection sampling gave up",
                                           "ce_test_pi": None}, hydra_config(*key))
                    elif key == ZERO_MTF_R:
                        write_run(folder, ok_results(*key, motif_freq_r=0.0), hydra_config(*key))
                    elif key == INF_P_LAMBDA:
                        write_run(folder, ok_results(*key, ce_test_p_lambda="inf"), hydra_config(*key))
                    else:
                        write_run(folder, ok_results(*key), hydra_config(*key))
    # another method: only in the per-cell and raw tables
    write_run(root / "extra" / "pg", ok_results(M1, 1234, 500, "pg"))
    # a configuration error: results.json without the cell, named by .hydra/config.yaml
    write_run(root / "extra" / "bad", {"status": "failed", "error": "invalid configuration: dpg.lr=-1",
                                       "stage": "config"}, hydra_config(M2, 1234, 1000, "dpg_on"))
    return root


def ok_values(size: int, methods: set[str]) -> list[dict[str, dict]]:
    """{method: values} of the cells of |D| = size where every one of the methods ran ok."""
    out = []
    for motif in (M1, M2):
        for seed in SEEDS:
            if any((motif, seed, size, m) in (FAILED, MISSING) for m in methods):
                continue
            values = {m: run_values(motif, seed, size, m) for m in methods}
            if (motif, seed, size, "dpg_off") == ZERO_MTF_R and "dpg_off" in values:
                values["dpg_off"]["motif_freq_r"] = 0.0
            out.append(values)
    return out


def mean_of(cells: list[dict], method: str, key: str) -> float:
    return statistics.fmean(c[method][key] for c in cells)


def expected_column(num: tuple[str, str], den: tuple[str, str], size: int) -> list[float]:
    """Per-cell ratios straight from the fabricated values, skipping failed/missing/infinite cells."""
    ratios = []
    for motif in (M1, M2):
        for seed in SEEDS:
            needed = {num[0], den[0]}
            if any((motif, seed, size, m) in (FAILED, MISSING) for m in needed):
                continue
            values = {m: run_values(motif, seed, size, m) for m in needed}
            if "dpg_off" in values and (motif, seed, size, "dpg_off") == ZERO_MTF_R:
                values["dpg_off"]["motif_freq_r"] = 0.0
            denominator = values[den[0]][den[1]]
            if denominator == 0:
                continue
            ratios.append(values[num[0]][num[1]] / denominator)
    return ratios


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_table1_is_ratios_of_per_method_means(sweep):
    main([str(sweep)])
    rows = {int(r["dataset_size"]): r for r in read_csv(sweep / "report" / "table1.csv")}
    for size in SIZES:
        dpg, dis = ok_values(size, {"dpg_off"}), ok_values(size, {"distill"})
        both = ok_values(size, {"dpg_off", "distill"})
        expected = {
            "ce_dpg_dis": mean_of(both, "dpg_off", "ce_test_pi") / mean_of(both, "distill", "ce_test_pi"),
            "mtf_dpg_dis": (mean_of(both, "dpg_off", "motif_freq_pi") / mean_of(both, "dpg_off", "motif_freq_r"))
            / (mean_of(both, "distill", "motif_freq_pi") / mean_of(both, "distill", "motif_freq_r")),
            "ce_dpg_r": mean_of(dpg, "dpg_off", "ce_test_pi") / mean_of(dpg, "dpg_off", "ce_test_r"),
            "ce_dpg_h": mean_of(dpg, "dpg_off", "ce_test_pi") / mean_of(dpg, "dpg_off", "entropy_true"),
            "mtf_dpg_r": mean_of(dpg, "dpg_off", "motif_freq_pi") / mean_of(dpg, "dpg_off", "motif_freq_r"),
            "ce_dis_r": mean_of(dis, "distill", "ce_test_pi") / mean_of(dis, "distill", "ce_test_r"),
            "mtf_dis_r": mean_of(dis, "distill", "motif_freq_pi") / mean_of(dis, "distill", "motif_freq_r")}
        for key, value in expected.items():
            assert float(rows[size][key]) == pytest.approx(value, rel=1e-12), (size, key)
        assert int(rows[size]["ce_dpg_dis_n"]) == len(both) and int(rows[size]["ce_dpg_r_n"]) == len(dpg)
    # a run with mtf r = 0 is kept in the ratio of means (only a zero mean would be undefined)
    assert int(rows[500]["mtf_dpg_r_n"]) == 4


def test_the_papers_aggregates_are_reproduced_from_per_run_values(tmp_path):
    """Runs whose per-method means are the paper's: CE(T, r) 1.0 on average, CE(T, pi) / CE(T, r)
    and motif frequencies / r's as in Table 1 at |D| = 500; the dpg/dis columns come out as the
    paper's ratios of those means (mtf dpg/dis 281.51 / 224.94 = 1.2515)."""
    root = tmp_path / "paper"
    for seed, wobble in zip(SEEDS, (-1, 1), strict=True):  # two runs per method whose means are the targets
        for method, ce_ratio, mtf_ratio in (("dpg_off", 0.76, 281.51), ("distill", 0.758, 224.94)):
            mtf_r = 0.003 * (1 + 0.1 * wobble)
            values = {"ce_test_r": 1.0 + 0.01 * wobble, "ce_test_pi": ce_ratio * (1.0 + 0.02 * wobble),
                      "entropy_true": 0.644, "motif_freq_r": mtf_r,
                      "motif_freq_pi": mtf_ratio * 0.003 * (1 + 0.05 * wobble)}
            write_run(root / f"{method}_{seed}", {**ok_results(M2, seed, 500, method, profile="paper"), **values})
    main([str(root)])
    row = read_csv(root / "report" / "table1.csv")[0]
    assert float(row["mtf_dpg_r"]) == pytest.approx(281.51) and float(row["mtf_dis_r"]) == pytest.approx(224.94)
    assert float(row["mtf_dpg_dis"]) == pytest.approx(281.51 / 224.94) == pytest.approx(1.2515, abs=1e-4)
    assert float(row["ce_dpg_r"]) == pytest.approx(0.76) and float(row["ce_dis_r"]) == pytest.approx(0.758)
    assert float(row["ce_dpg_dis"]) == pytest.approx(0.76 / 0.758)
    assert float(row["ce_dpg_h"]) == pytest.approx(0.76 / 0.644)
    assert float(row["mtf_dpg_dis_paper"]) == 1.252 and float(row["mtf_dpg_dis_ours_over_paper"]) == pytest.approx(
        281.51 / 224.94 / 1.252)
    text = (root / "report" / "table1.md").read_text()
    assert "· paper 1.252 ·" in text and "not set against the paper" not in text


def test_per_cell_ratios_means_std_counts(sweep, capsys):
    out = sweep / "report"
    assert main([str(sweep)]) == 0
    rows = {int(r["dataset_size"]): r for r in read_csv(out / "table1.csv")}
    assert set(rows) == set(SIZES) and all(r["profile"] == "cpu" for r in rows.values())
    columns = {"ce_dpg_dis": (("dpg_off", "ce_test_pi"), ("distill", "ce_test_pi")),
               "mtf_dpg_dis": (("dpg_off", "motif_freq_pi"), ("distill", "motif_freq_pi")),
               "ce_dpg_r": (("dpg_off", "ce_test_pi"), ("dpg_off", "ce_test_r")),
               "ce_dpg_h": (("dpg_off", "ce_test_pi"), ("dpg_off", "entropy_true")),
               "mtf_dpg_r": (("dpg_off", "motif_freq_pi"), ("dpg_off", "motif_freq_r")),
               "ce_dis_r": (("distill", "ce_test_pi"), ("distill", "ce_test_r")),
               "mtf_dis_r": (("distill", "motif_freq_pi"), ("distill", "motif_freq_r"))}
    for size in SIZES:
        for key, (num, den) in columns.items():
            ratios = expected_column(num, den, size)
            row = rows[size]
            assert int(row[f"{key}_cell_n"]) == len(ratios), (size, key)
            assert float(row[f"{key}_cell_mean"]) == pytest.approx(sum(ratios) / len(ratios), rel=1e-12), (size, key)
            assert float(row[f"{key}_cell_std"]) == pytest.approx(statistics.stdev(ratios), rel=1e-12), (size, key)
    # counts, by hand: |D| = 1000 lacks the dpg_off run of (M1, 4444) and the distill run of (M2, 4444)
    assert [int(rows[1000][f"{k}_cell_n"]) for k in columns] == [2, 2, 3, 3, 3, 3, 3]
    assert [int(rows[500][f"{k}_cell_n"]) for k in columns] == [4, 4, 4, 4, 3, 4, 4]
    # profile cpu is not set against the paper
    assert rows[500]["mtf_dpg_r_paper"] == "" and rows[500]["mtf_dpg_r_ours_over_paper"] == ""
    printed = capsys.readouterr().out
    assert "| 500 |" in printed and "Profile `cpu` is not set against the paper" in printed and "· paper" not in printed


def test_ce_over_h_uses_each_runs_own_entropy(sweep):
    main([str(sweep)])
    row = next(r for r in read_csv(sweep / "report" / "table1.csv") if r["dataset_size"] == "500")
    # CE(T, pi) = H_own * k with k = 1.1 (seed 1234) or 1.2 (seed 4444) for both motifs at |D| = 500
    assert float(row["ce_dpg_h_cell_mean"]) == pytest.approx(1.15, rel=1e-12)
    assert float(row["ce_dpg_h_cell_std"]) == pytest.approx(statistics.stdev([1.1, 1.2, 1.1, 1.2]), rel=1e-12)
    single_h = statistics.fmean([H[m] * k / H[M2] for m in (M1, M2) for k in (1.1, 1.2)])
    assert abs(float(row["ce_dpg_h_cell_mean"]) - single_h) > 0.05
    # the ratio of means: <H k> / <H> over the four runs, each with its own H
    assert float(row["ce_dpg_h"]) == pytest.approx(statistics.fmean([H[m] * k for m in (M1, M2) for k in (1.1, 1.2)])
                                                   / statistics.fmean([H[M1], H[M1], H[M2], H[M2]]), rel=1e-12)


def test_failed_missing_and_infinite_are_listed_not_averaged(sweep, capsys):
    main([str(sweep)])
    text = (sweep / "report" / "table1.md").read_text()
    missing = text.split("### Missing or failed", 1)[1]
    assert f"{M2}/1001111/D1000/s4444 distill: failed" in missing
    assert "rejection sampling gave up" in missing
    assert f"{M1}/1001111/D1000/s4444 dpg_off: missing" in missing
    # the configuration error is named from .hydra/config.yaml (motif parsed by YAML as an int)
    assert f"{M2}/1001111/D1000/s1234 dpg_on: failed" in missing and "dpg.lr=-1" in missing
    assert "Missing or failed" in capsys.readouterr().out
    # the infinite ratio is counted in the table and explained in a footnote
    row = next(r for r in read_csv(sweep / "report" / "table1.csv") if r["dataset_size"] == "500")
    assert row["mtf_dpg_r_cell_excluded"] == "1" and row["mtf_dpg_r_cell_n"] == "3"
    assert math.isfinite(float(row["mtf_dpg_r_cell_mean"]))
    assert "n=3, 1 excl.*" in text
    assert f"{M1}/1001111/D500/s1234 (mtf r (dpg_off) = 0 (infinite ratio))" in text
    # the "inf" string in results.json is read as a non-finite value and kept out of the raw mean
    raw = {(r["dataset_size"], r["method"]): r for r in read_csv(sweep / "report" / "raw_means.csv")}
    assert raw[("500", "distill")]["ce_test_p_lambda_excluded"] == "1"
    assert raw[("500", "distill")]["ce_test_p_lambda_n"] == "3"
    assert raw[("1000", "distill")]["runs_ok"] == "3"
    # other methods: raw means and per-cell table, never the paper columns
    assert raw[("500", "pg")]["runs_ok"] == "1"
    cells = read_csv(sweep / "report" / "cells.csv")
    assert len(cells) == 2 * 2 * 2 * 2 + 2
    by_key = {(c["motif"], c["seed"], c["dataset_size"], c["method"]): c for c in cells}
    assert by_key[(M1, "4444", "1000", "dpg_off")]["status"] == "missing"
    assert by_key[(M2, "4444", "1000", "distill")]["status"] == "failed"
    assert by_key[(M1, "1234", "500", "pg")]["status"] == "ok"
    assert float(by_key[(M2, "1234", "500", "dpg_off")]["ce_pi_over_h"]) == pytest.approx(1.1, rel=1e-12)


def test_files_exist_and_pngs_are_images(sweep):
    out = sweep / "elsewhere"
    main([str(sweep), "--out", str(out)])
    for name in ("table1.md", "table1.csv", "table1.tex", "raw_means.csv", "cells.md", "cells.csv"):
        assert (out / name).stat().st_size > 0, name
    for name in ("figure2.png", "dpg_vs_distill.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
        image = imread(out / name)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    tex = (out / "table1.tex").read_text()
    assert r"\begin{tabular}" in tex and r"\end{table}" in tex and "not comparable" in tex and "(281.5)" not in tex
    assert not (sweep / "report").exists()
    # figures 3-5 need runs this sweep does not have: not drawn, and the report says why
    text = (out / "table1.md").read_text()
    for name in ("figure3.png", "figure4.png", "figure5.png"):
        assert not (out / name).exists() and f"not drawn: {name}:" in text


def test_dpg_vs_distill_says_how_to_read_it_outside_its_points(sweep, monkeypatch, tmp_path):
    """The scatter's reading ('below the line: DPG_off better') is never drawn over its points."""
    from gam_rl.report import figures
    from gam_rl.report.model import choose_runs, collect, group_by_profile

    drawn = []
    monkeypatch.setattr(figures, "save_figure", lambda fig, path: (fig.canvas.draw(), drawn.append(fig)))
    profile_data = next(iter(group_by_profile(choose_runs(collect([sweep], None)[0])[0]).values()))
    assert figures.dpg_vs_distill_figure(profile_data, tmp_path / "f.png") is None
    (ax,) = drawn[0].axes
    assert "below the line" in ax.get_title() and not ax.texts  # no text inside the axes
    points = [xy for coll in ax.collections for xy in ax.transData.transform(coll.get_offsets())]
    box = ax.get_legend().get_window_extent()
    assert points and not any(box.contains(x, y) for x, y in points)  # the legend hides no point


def test_a_cells_shared_training1_is_not_charged_to_the_job_that_computed_it(tmp_path):
    root = tmp_path / "runs"
    t1 = {"r": 100.0, "eval_r": 5.0, "training1": 30.0, "z": 5.0}
    write_run(root / "first", ok_results(M1, 1234, 500, "dpg_off", timings={**t1, "training2": 50.0},
                                         wall_time_s=200.0, training1_cache={"hit": False}))
    write_run(root / "second", ok_results(M1, 1234, 500, "distill", wall_time_s=70.0,
                                          timings={**dict.fromkeys(t1, 0.0), "training2": 60.0},
                                          training1_cache={"hit": True, "source_timings": t1}))
    main([str(root)])
    cells = {r["method"]: r for r in read_csv(root / "report" / "cells.csv")}
    assert float(cells["dpg_off"]["t1_s"]) == float(cells["distill"]["t1_s"]) == 140.0  # the cell's, either way
    assert float(cells["dpg_off"]["own_s"]) == 60.0 and float(cells["distill"]["own_s"]) == 70.0


def test_figures_3_4_5_are_drawn_from_the_runs_they_need(tmp_path):
    root = tmp_path / "runs"
    for size in SIZES:
        for seed in SEEDS:
            for features in ("1001111", "Mv1001111"):
                for method in ("dpg_off", "distill"):
                    write_run(root / f"{features}_{method}_{size}_{seed}",
                              ok_results(M2, seed, size, method, features=features))
            write_run(root / f"rs_{size}_{seed}", ok_results(M2, seed, size, "distill", training1_estimator="rs"))
            write_run(root / f"true_{size}_{seed}", ok_results(M2, seed, size, "dpg_true", target="true"))
    main([str(root)])
    for name in ("figure2", "dpg_vs_distill", "figure3", "figure4", "figure5"):
        assert imread(root / "report" / f"{name}.png").shape[0] > 100, name
    assert "not drawn" not in (root / "report" / "table1.md").read_text()


def test_duplicate_prefers_ok_run_and_notes_it(sweep):
    write_run(sweep / "rerun", {**ok_results(M1, 1234, 500, "distill"), "status": "failed", "error": "boom"})
    main([str(sweep)])
    text = (sweep / "report" / "table1.md").read_text()
    missing = text.split("### Missing or failed")[1].split("###")[0]  # the run set aside is listed there, with why
    assert f"{M1}/1001111/D500/s1234 distill: not counted (failed), a re-run of the same configuration" in missing
    row = next(r for r in read_csv(sweep / "report" / "table1.csv") if r["dataset_size"] == "500")
    assert row["ce_dpg_dis_n"] == "4"


def test_runs_whose_configurations_differ_are_reported_apart_and_a_narrowed_sweep_misses_nothing(tmp_path):
    """Two distill runs of one cell that differ in method.max_proposals (a sweep over it): two methods of the
    report, named by the key; nothing set aside. A sweep of distill alone lists no dpg_off as absent."""
    root = tmp_path / "sweep"
    for budget in (100, 1000000):
        config = {"profile": "cpu", "motif": {"pattern": M1}, "features": {"name": "1001111"},
                  "dataset_size": {"size": 500}, "seed": 1234,
                  "method": {"name": "distill", "max_proposals": budget}, "hydra": {"run": {"dir": str(budget)}}}
        folder = root / f"distill_{budget}"
        folder.mkdir(parents=True)
        (folder / "config.yaml").write_text(yaml.safe_dump(config))
        (folder / "results.json").write_text(json.dumps(ok_results(M1, 1234, 500, "distill")))
    main([str(root)])
    text = (root / "report" / "table1.md").read_text()
    missing = text.split("### Missing or failed")[1].split("###")[0]
    assert "not counted" not in text and "absent" not in missing
    cells = read_csv(root / "report" / "cells.csv")
    assert sorted({r["method"] for r in cells}) == ["distill@method.max_proposals=100",
                                                    "distill@method.max_proposals=1000000"]


def test_a_paper_method_on_another_target_is_kept_out_of_the_table1_columns(sweep):
    # dpg_off re-pointed at the true target (method.target=true): its own method, never averaged with dpg_off
    write_run(sweep / "true_target", ok_results(M1, 1234, 500, "dpg_off", target="true", ce_test_pi=99.0))
    main([str(sweep)])
    row = next(r for r in read_csv(sweep / "report" / "table1.csv") if r["dataset_size"] == "500")
    assert float(row["ce_dpg_dis_cell_mean"]) == pytest.approx(statistics.mean(
        expected_column(("dpg_off", "ce_test_pi"), ("distill", "ce_test_pi"), 500)))
    assert "dpg_off@target=true" in (sweep / "report" / "table1.md").read_text()


def test_any_method_on_another_target_than_gam_is_its_own_method(tmp_path):
    """The @target suffix follows the run's target, whatever the method's name (no list of methods);
    dpg_true, whose config sets its target, keeps its name."""
    dpg_true_target = yaml.safe_load((ROOT / "conf" / "method" / "dpg_true.yaml").read_text())["target"]
    root = tmp_path / "runs"
    runs = {"my_variant": "true", "fdpg_kl": "true", "pcl": "gam", "dpg_true": dpg_true_target, "distill": None}
    for method, target in runs.items():
        extra = {} if target is None else {"target": target}
        write_run(root / method, ok_results(M1, 1234, 500, method, **extra))
    # no target in results.json: the config's method.target names it
    folder = write_run(root / "from_config", ok_results(M1, 4444, 500, "my_variant"))
    (folder / ".hydra").mkdir()
    (folder / ".hydra" / "config.yaml").write_text("method:\n  name: my_variant\n  target: 'true'\n")
    main([str(root)])
    found = {(r["seed"], r["method"]) for r in read_csv(root / "report" / "cells.csv")}
    assert found == {("1234", "my_variant@target=true"), ("1234", "fdpg_kl@target=true"), ("1234", "pcl"),
                     ("1234", "dpg_true"), ("1234", "distill"), ("4444", "my_variant@target=true")}


def test_profiles_are_reported_separately(tmp_path):
    root = tmp_path / "runs"
    for profile in ("cpu", "smoke"):
        for method in ("dpg_off", "distill"):
            write_run(root / profile / method, ok_results(M1, 1234, 500, method, profile=profile))
    main([str(root)])
    rows = read_csv(root / "report" / "table1.csv")
    assert [(r["profile"], r["ce_dpg_dis_n"]) for r in rows] == [("cpu", "1"), ("smoke", "1")]
    assert rows[0]["ce_dpg_dis_cell_std"] == ""  # one cell: no standard deviation
    for name in ("figure2_cpu.png", "figure2_smoke.png", "dpg_vs_distill_smoke.png"):
        assert (root / "report" / name).read_bytes()[:8] == PNG_MAGIC
    text = (root / "report" / "table1.md").read_text()
    assert "## Profile `cpu`" in text and "## Profile `smoke`" in text

    main([str(root), "--profile", "smoke", "--out", str(tmp_path / "smoke")])
    assert [r["profile"] for r in read_csv(tmp_path / "smoke" / "table1.csv")] == ["smoke"]
    assert (tmp_path / "smoke" / "figure2.png").exists()
    with pytest.raises(SystemExit) as exit_info:
        main([str(root), "--profile", "paper", "--out", str(tmp_path / "none")])
    assert exit_info.value.code == 2


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gam_rl.report", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, PYTHONPATH=str(ROOT)))


def test_a_job_the_launcher_lost_is_listed_from_lost_jobs_json(sweep):
    """A job whose folder could not be made (a file in its place) exists only in the sweep's lost_jobs.json
    (gam_rl/launcher.py): the report lists it as failed, with the reason, identified by its recorded config."""
    import shutil

    lost = sweep / f"{M1}_D1000_s1234_distill"
    shutil.rmtree(lost)
    lost.write_text("")
    config = {"motif": {"pattern": M1}, "features": {"name": "1001111"}, "dataset_size": {"size": 1000},
              "seed": 1234, "method": {"name": "distill"}, "profile": "cpu"}
    error = f"lost: Hydra's job set-up failed: FileExistsError: [Errno 17] File exists: '{lost}'"
    # and a job killed between Hydra's set-up and its own first results.json: the launcher wrote one
    # without the job's keys, and Hydra's config names the method unresolved
    killed = sweep / f"{M2}_D1000_s1234_dpg_off"
    shutil.rmtree(killed)
    killed_error = "lost: its process was killed by SIGKILL after 3 s (the out-of-memory killer, or kill -9)"
    write_run(killed, {"status": "failed", "error": killed_error}, {**hydra_config(M2, 1234, 1000, "dpg_off"),
                                                                    "method": {"name": "${method_name:dpg_off}"}})
    killed_config = {**config, "motif": {"pattern": M2}, "method": {"name": "dpg_off"}}
    (sweep / "lost_jobs.json").write_text(json.dumps({
        str(lost): {"job": 3, "overrides": ["method=distill"], "error": error, "config": config, "time": 1.0},
        str(killed): {"job": 5, "overrides": [], "error": killed_error, "config": killed_config, "time": 1.0}}))
    main([str(sweep)])
    missing = (sweep / "report" / "table1.md").read_text().split("### Missing or failed", 1)[1]
    assert f"{M1}/1001111/D1000/s1234 distill: failed: lost: Hydra's job set-up failed: FileExistsError" in missing
    assert f"{M2}/1001111/D1000/s1234 dpg_off: failed: lost: its process was killed by SIGKILL" in missing
    assert "absent" not in missing and "${" not in missing


def test_cli_subprocess(sweep, tmp_path):
    proc = run_cli(str(sweep), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    header = "| \\|D\\| | CE dpg/dis | mtf dpg/dis | CE dpg/r | CE dpg/H | mtf dpg/r | CE dis/r | mtf dis/r |"
    assert header in proc.stdout
    assert "### Missing or failed" in proc.stdout
    assert (sweep / "report" / "figure2.png").exists()


def test_cli_exit_2_without_runs(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = run_cli(str(tmp_path / "empty"), cwd=tmp_path)
    assert proc.returncode == 2 and "no run folder" in proc.stderr
    proc = run_cli(str(tmp_path / "nope"), cwd=tmp_path)
    assert proc.returncode == 2 and "no such folder" in proc.stderr


def test_methods_table_draws_to_target_and_exact_divergences(tmp_path):
    """The methods table: mean draws to target over the runs that reached it, k/n reached, the ratio to
    dpg_off's draws at the same |D|, exact means; the figure draws the exact KL curves of metrics.csv."""
    root = tmp_path / "runs"
    draws = {"dpg_off": (1000, 3000), "kl_control": (250, None), "distill": (5000, 5000)}
    for seed in SEEDS:
        for method, (first, second) in draws.items():
            hit = first if seed == SEEDS[0] else second
            line, reached = ("distill_target_ce_valid", "distill_reached_target") if method == "distill" else (
                "dpg_target_ce_valid", "dpg_reached_target")
            folder = write_run(root / f"{method}_{seed}", ok_results(
                M2, seed, 500, method, profile="toy", samples={"training2": 8000}, timings={"training2": 20.0},
                exact={"kl_p_pi": 0.1 * SEEDS.index(seed) + 0.05, "kl_pi_p": 0.2, "tv_p_pi": 0.3},
                **{line: 0.5, reached: ({"samples": hit} if method == "distill" else {"samples": hit, "seconds": 4.0})
                   if hit else None}))
            if method != "distill":
                rows = ["time,stage,step,name,value"] + [f"0,dpg,{s},{name},{v}" for s in (9, 19) for name, v in (
                    ("draws", 1000 * (s + 1)), ("val_ce_pi", 0.6 - 0.001 * s), ("exact_kl_p_pi", 0.5 - 0.01 * s))]
                (folder / "metrics.csv").write_text("\n".join(rows) + "\n")
        write_run(root / f"true_{seed}", ok_results(M2, seed, 500, "dpg_true", profile="toy", target="true",
                                                    dpg_target_ce_valid=None, dpg_reached_target=None))
    main([str(root)])
    rows = {r["method"]: r for r in read_csv(root / "report" / "methods.csv")}
    assert (rows["dpg_off"]["reached"], float(rows["dpg_off"]["draws_to_target"])) == ("2", 2000.0)
    assert float(rows["dpg_off"]["draws_to_target_sd"]) == pytest.approx(statistics.stdev([1000, 3000]))
    assert rows["kl_control"]["draws_to_target_sd"] == ""  # one run reached: no spread
    assert (rows["kl_control"]["reached"], rows["kl_control"]["recorded"]) == ("1", "2")
    assert float(rows["kl_control"]["x_dpg_off"]) == pytest.approx(250 / 2000)
    assert float(rows["distill"]["seconds_to_target"]) == 20.0  # distillation: its whole Training-2
    assert float(rows["dpg_off"]["kl_p_pi"]) == pytest.approx(0.1)
    assert rows["dpg_true"]["recorded"] == "0" and rows["dpg_true"]["draws_to_target"] == ""
    text = (root / "report" / "table1.md").read_text()
    assert "| 500 | kl_control | 1/2 | 1/2 | 250 | 0.125 | 1 |" in text and "KL(p\\|\\|pi)" in text
    assert "| 500 | dpg_off | 2/2 | 2/2 | 2,000 ± 1,414 | 1 | 1 |" in text
    assert "- x dpg_off, x dpg_off s at \\|D\\| = 500: against dpg_off's means" in text
    assert imread(root / "report" / "methods.png").shape[0] > 100


def test_methods_table_compares_with_the_tuned_dpg_off_and_counts_the_runs_under_the_motif_bar(tmp_path):
    """Where a |D| has runs of dpg_off_tuned, `x dpg_off` (draws) and `x dpg_off s` (seconds) are against its
    means, not the untuned dpg_off's; a run on the line whose pi writes the motif in under 0.9 of its samples
    counts as reached but not under the bar."""
    root = tmp_path / "runs"
    # method: (draws to the line, seconds to it, motif frequency of pi) of the run of each seed
    runs = {"dpg_off": ((2_000_000, 400.0, 0.95), (2_000_000, 400.0, 0.95)),
            "dpg_off_tuned": ((100_000, 100.0, 0.96), (140_000, 140.0, 0.97)),
            "distill_tuned": ((1_200_000, 60.0, 0.86), (1_200_000, 60.0, 0.93))}
    for method, per_seed in runs.items():
        for seed, (hit, seconds, motif) in zip(SEEDS, per_seed, strict=True):
            write_run(root / f"{method}_{seed}", ok_results(
                M2, seed, 500, method, samples={"training2": 3_000_000}, timings={"training2": 500.0},
                motif_freq_pi=motif, t2_target_ce_valid=0.5, t2_reached_target={"samples": hit, "seconds": seconds}))
    main([str(root)])
    rows = {r["method"]: r for r in read_csv(root / "report" / "methods.csv")}
    assert {r["dpg_off_reference"] for r in rows.values()} == {"dpg_off_tuned"}
    assert float(rows["distill_tuned"]["x_dpg_off"]) == pytest.approx(1_200_000 / 120_000)
    assert float(rows["distill_tuned"]["x_dpg_off_seconds"]) == pytest.approx(60 / 120)
    assert float(rows["dpg_off"]["x_dpg_off"]) == pytest.approx(2_000_000 / 120_000)
    assert (rows["distill_tuned"]["reached"], rows["distill_tuned"]["reached_motif_bar"]) == ("2", "1")
    assert rows["dpg_off_tuned"]["reached_motif_bar"] == "2"
    text = (root / "report" / "table1.md").read_text()
    assert "| 500 | distill_tuned | 2/2 | 1/2 | 1,200,000 ± 0 | 10 | 0.5 | 60 |" in text
    assert "- x dpg_off, x dpg_off s at \\|D\\| = 500: against dpg_off_tuned's means" in text


def test_training2_seeds_of_one_cell_are_cells_of_their_own(tmp_path):
    """Two runs of one Table 1 cell and method that differ only in training2_seed: two cells of the report (not a
    re-run, not two methods), both counted in the method's means and its spread; the cell names say the seed."""
    root = tmp_path / "runs"
    for t2, hit in ((5, 1000), (6, 3000)):
        config = {**hydra_config(M2, 1234, 500, "dpg_off"), "training2_seed": t2}
        write_run(root / f"t{t2}", ok_results(M2, 1234, 500, "dpg_off", training2_seed=t2, dpg_target_ce_valid=0.5,
                                              dpg_reached_target={"samples": hit, "seconds": 1.0}), config)
    main([str(root)])
    rows = {r["method"]: r for r in read_csv(root / "report" / "methods.csv")}
    assert list(rows) == ["dpg_off"] and rows["dpg_off"]["runs"] == "2"
    assert float(rows["dpg_off"]["draws_to_target"]) == 2000.0
    assert float(rows["dpg_off"]["draws_to_target_sd"]) == pytest.approx(statistics.stdev([1000, 3000]))
    cells = read_csv(root / "report" / "cells.csv")
    assert sorted(c["training2"] for c in cells) == ["t5", "t6"] and {c["method"] for c in cells} == {"dpg_off"}
    assert "not counted" not in (root / "report" / "table1.md").read_text()
