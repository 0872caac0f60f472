"""gam-rl-bench: runs end to end (tiny sizes) and reports every figure. No timing assertions. The runs are
`slow` (make test-slow, CI): the benchmark's own start-up is most of the 10 s."""

import json
import math
import subprocess
import sys
from importlib.metadata import entry_points

import pytest

FIGURES = [
    "gemm_gflops", "gemm_gflops_train", "gemm_gflops_2x64", "gemm_gflops_train_2x64",
    "sampler_seq_per_s", "sampler_gflops", "sampler_roofline_ratio", "sampler_symbols_per_seq",
    "train_seq_per_s", "train_gflops", "train_roofline_ratio",
    "sampler_seq_per_s_2x64", "sampler_roofline_ratio_2x64", "train_seq_per_s_2x64", "train_roofline_ratio_2x64",
    "features_seq_per_s", "features_seq_per_s_Mv1001111",
    "snis_step_s", "dpg_update_s", "dpg_update_s_q_is_r", "z_samples_per_s", "sweep_job_s",
]
RATIOS = [k for k in FIGURES if "roofline_ratio" in k]
# counts the host decides (a warm allocator can take no page fault at all): reported, never asserted positive
HOST_COUNTS = ["train_page_faults_per_step_2x64"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "gam_rl.bench", "--tiny", "--device", "cpu", "--threads", "1",
                           "--out", str(out), "--json"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, out


@pytest.mark.slow
def test_bench_prints_one_json_object_and_writes_it(tiny_run):
    proc, out = tiny_run
    result = json.loads(proc.stdout)  # stdout holds exactly one JSON object; progress is on stderr
    assert json.loads(out.read_text()) == result
    assert "[gam-rl-bench]" in proc.stderr


@pytest.mark.slow
def test_bench_reports_every_figure_finite_and_every_timing_and_rate_positive(tiny_run):
    result = json.loads(tiny_run[0].stdout)
    for key in FIGURES:
        value = result[key]
        assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, (key, value)
    for key in HOST_COUNTS:
        value = result[key]
        assert isinstance(value, (int, float)) and math.isfinite(value) and value >= 0, (key, value)
    for key in RATIOS:  # loose: tiny batches on a shared machine say nothing about efficiency
        assert 0 < result[key] < 1000, (key, result[key])
    assert result["sampler_symbols_per_seq"] == 31  # the benchmark policy runs every row to max_len
    assert result["mode"] == "tiny" and result["threads"] == 1 and result["device_type"] == "cpu"
    for key in ("device", "torch", "date", "flops", "sampler_policy"):
        assert isinstance(result[key], str) and result[key]
    assert "2*(input+hidden)*4*hidden" in result["flops"]
    # the sweep job ran end to end: its own stage seconds sum to at most the wall time around it
    stages = result["sweep_job_stage_s"]
    assert {"r", "training1", "z", "training2"} <= set(stages) and 0 < sum(stages.values()) < result["sweep_job_s"]
    assert "profile=smoke" in result["sweep_job_overrides"]
    # per-figure FLOPs per sequence: paper LSTM 2x200 over 31 symbols, training step = 3 forwards
    fwd = (2 * (3 + 200) * 800 + 2 * (200 + 200) * 800) * 31
    assert result["flops_per_seq"]["sampler_seq_per_s"] == fwd
    assert result["flops_per_seq"]["train_seq_per_s"] == 3 * fwd


@pytest.mark.slow
def test_bench_prints_a_summary_without_json(tiny_run):
    from gam_rl.bench import summary

    text = summary(json.loads(tiny_run[0].stdout))
    assert "sampler 2 x 64" in text and "of the matmul rate" in text and "--json" in text and "sweep job" in text


def test_bench_console_script_is_declared():
    scripts = {ep.name: ep.value for ep in entry_points(group="console_scripts")}
    assert scripts.get("gam-rl-bench") == "gam_rl.bench:main"


@pytest.mark.slow
def test_bench_refuses_bad_arguments():
    proc = subprocess.run([sys.executable, "-m", "gam_rl.bench", "--threads", "0"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "--threads" in proc.stderr
