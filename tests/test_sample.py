"""gam-rl-sample against exact answers on a run folder small enough to enumerate."""

import json

import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf
from scipy import stats

from gam_rl import schema
from gam_rl.cli import rewrite_axes
from gam_rl.exact import OutputSpace
from gam_rl.features import Features
from gam_rl.policy import LSTMPolicy
from gam_rl.potentials import gam
from gam_rl.sample import load_run, main
from gam_rl.tokens import decode

MAX_LEN = 6  # n = 4 bits: 127 outputs


def write_run(folder, status="ok"):
    """A finished run folder as gam-rl leaves it: config.yaml, results.json, r.pt, pi.pt (tiny random LSTMs)."""
    folder.mkdir(parents=True, exist_ok=True)
    with initialize_config_module("gam_rl.conf", version_base="1.3"):
        cfg = schema.load(compose("config", overrides=rewrite_axes(
            ["profile=toy", "motif=110", "n=4", f"max_len={MAX_LEN}", "eval.max_len=6", "model.hidden=8"])))
    OmegaConf.save(OmegaConf.create(schema.record(cfg)), folder / "config.yaml")
    features = Features.from_config(cfg.features, cfg.motif.pattern)
    lam = {name: value for name, value in zip(features.names, (-2.0, 0.7, -0.5, 0.3, 0.2, 0.1, 0.4), strict=False)}
    results = {"status": status, "feature_names": features.names, "lambda": lam, "log_z_hat": -0.5,
               "moments_data": dict.fromkeys(features.names, 0.5)}
    if status != "ok":
        results["error"] = "RuntimeError: something broke\ntraceback ..."
    (folder / "results.json").write_text(json.dumps(results))
    for k, name in enumerate(("r", "pi")):
        torch.manual_seed(k)
        policy = LSTMPolicy(8, 1, 0.0)
        torch.save({"config": policy.config(), "state_dict": policy.state_dict()}, folder / f"{name}.pt")
    return folder


@pytest.fixture
def run_dir(tmp_path):
    return write_run(tmp_path / "run")


def exact_p_lambda(run_dir):
    run = load_run(run_dir)
    space = OutputSpace(MAX_LEN)
    log_p = space.log_potential(gam(run.r, run.features, run.lam)).double()
    tokens = torch.cat([b.long() for b in space.batches])
    return decode(tokens), log_p - torch.logsumexp(log_p, 0), float(torch.logsumexp(log_p, 0))


def read_lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def chi_square_p_value(strings, log_p, sampled):
    counts = dict.fromkeys(strings, 0)
    for text in sampled:
        counts[text] += 1
    observed = torch.tensor([counts[s] for s in strings], dtype=torch.float64)
    expected = log_p.exp() * len(sampled)
    big = expected >= 5  # pool the cells too small for the test into one
    obs = torch.cat([observed[big], observed[~big].sum().reshape(1)])
    exp = torch.cat([expected[big], expected[~big].sum().reshape(1)])
    return stats.chisquare(obs.numpy(), exp.numpy() * obs.sum().item() / exp.sum().item()).pvalue


def test_rejection_samples_follow_the_enumerated_p_lambda_and_estimate_z(run_dir, tmp_path, capsys):
    out = tmp_path / "s.jsonl"
    assert main([f"run={run_dir}", "n=20000", f"out={out}", "seed=3"]) == 0  # sampler auto: rs for p_lambda
    rows = read_lines(out)
    strings, log_p, log_z = exact_p_lambda(run_dir)
    # a truncated output (no EOS) shows as its bits: tell it apart by the column
    sampled = [r["string"] + ("" if not r["truncated"] else "+") for r in rows]
    keys = [s if len(s) < MAX_LEN else s + "+" for s in strings]
    assert len(rows) == 20000 and chi_square_p_value(keys, log_p, sampled) > 1e-3
    printed = capsys.readouterr().out
    line = next(x for x in printed.splitlines() if "log Z-hat" in x)
    estimate, se = float(line.split()[2]), float(line.split()[4])
    assert abs(estimate - log_z) < 4 * se, (estimate, se, log_z)  # acceptance x e^M estimates Z


def test_scored_columns_are_the_models_own_log_probabilities(run_dir, tmp_path):
    strings = tmp_path / "strings.txt"
    # a blank line is skipped; max_len (6) bits are a truncated output, scored without EOS as the samplers leave it
    strings.write_text("0110\n\n1\n11011\n110110\n")
    out = tmp_path / "scored.jsonl"
    assert main([f"run={run_dir}", f"score={strings}", f"out={out}"]) == 0
    rows = read_lines(out)
    run = load_run(run_dir)
    from gam_rl.tokens import encode

    tokens = encode(["0110", "1", "11011", "110110"])[:, :MAX_LEN]  # the last without EOS
    with torch.no_grad():
        log_r, log_pi, phi = run.r.log_prob(tokens), run.pi.log_prob(tokens), run.features(tokens)
    assert [r["string"] for r in rows] == ["0110", "1", "11011", "110110"]
    assert [r["length"] for r in rows] == [4, 1, 5, 6]
    assert [r["truncated"] for r in rows] == [False, False, False, True]
    for i, row in enumerate(rows):
        assert row["log_r"] == pytest.approx(float(log_r[i]), abs=1e-5)
        assert row["log_pi"] == pytest.approx(float(log_pi[i]), abs=1e-5)
        assert list(row["phi"].values()) == pytest.approx(phi[i].tolist())
        assert row["log_p_lambda"] == pytest.approx(float(log_r[i] + phi[i] @ run.lam), abs=1e-5)
        assert row["log_weight"] is None and row["motif"] == ("110" in row["string"])


def test_qrs_weights_take_p_beta_back_to_p_lambda(run_dir, tmp_path):
    out = tmp_path / "q.jsonl"
    # a beta under max P/q: p_beta != p, and the weights max(1, w / beta) correct it
    assert main([f"run={run_dir}", "sampler=qrs", "log_beta=-1.0", "n=20000", f"out={out}", "seed=0"]) == 0
    rows = read_lines(out)
    strings, log_p, _ = exact_p_lambda(run_dir)
    exact_len = float((log_p.exp() * torch.tensor([len(s) for s in strings], dtype=torch.float64)).sum())
    w = torch.softmax(torch.tensor([r["log_weight"] for r in rows], dtype=torch.float64), 0)
    lengths = torch.tensor([r["length"] for r in rows], dtype=torch.float64)
    plain, weighted = float(lengths.mean()), float((w * lengths).sum())
    se = float(((w * (lengths - weighted)) ** 2).sum().sqrt())  # the self-normalised estimate's s.e. (delta method)
    assert any(r["log_weight"] > 0 for r in rows)
    assert abs(weighted - exact_len) < 4 * se and abs(plain - exact_len) > 20 * se  # the weights take it to p


def test_smc_particles_weights_and_bounds_agree_with_the_exact_log_z(run_dir, tmp_path, capsys):
    from gam_rl.methods.twist_loop import Critic, twist_payload

    run = load_run(run_dir)
    torch.manual_seed(1)
    critic = Critic("head", run.pi, run.r)
    with torch.no_grad():  # some twist, not the exact one: SMC stays unbiased whatever it is
        critic.value.weight.normal_(std=0.5)
    twisted = write_run(tmp_path / "twisted")
    torch.save(twist_payload("ac_dpg", "critic", run.pi, critic), twisted / "twist.pt")
    strings, log_p, log_z = exact_p_lambda(run_dir)
    exact_len = float((log_p.exp() * torch.tensor([len(s) for s in strings], dtype=torch.float64)).sum())
    for extra in ([], ["proposal=pi", f"twist={twisted}", "ess_threshold=1.0"]):
        out = tmp_path / "smc.jsonl"
        assert main([f"run={run_dir}", "sampler=smc", "n=4000", "particles=200", "bounds=true", "bound_runs=30",
                     f"out={out}", "seed=2", *extra]) == 0
        rows = read_lines(out)
        text = capsys.readouterr().out
        assert len(rows) == 4000 and "runs             20" in text
        bounds = next(x for x in text.splitlines() if "log Z bounds" in x).split("[")[1].split("]")[0]
        lower, lower_se, upper, upper_se = (float(v) for v in bounds.replace(",", "").replace("+-", "").split())
        assert lower - 3 * lower_se <= log_z <= upper + 3 * upper_se, (lower, upper, log_z)
        w = torch.softmax(torch.tensor([r["log_weight"] for r in rows], dtype=torch.float64), 0)
        lengths = torch.tensor([r["length"] for r in rows], dtype=torch.float64)
        weighted = float((w * lengths).sum())
        se = float(((w * (lengths - weighted)) ** 2).sum().sqrt())
        assert abs(weighted - exact_len) < 4 * se, (weighted, exact_len, se)
    assert main([f"run={run_dir}", "sampler=smc", f"twist={run_dir}", f"out={tmp_path / 'x.jsonl'}"]) == 2
    assert "no twist.pt there" in capsys.readouterr().err


@pytest.mark.parametrize(("args", "expected"), [
    (["model=r", "sampler=rs"], "sampler='rs' with model='r'"),
    (["sampler=ancestral"], "p_lambda is not autoregressive"),
    (["sampler=rs", "proposal=pi"], "proposal='pi' with sampler='rs'"),
    (["modle=r"], "modle: unknown key; did you mean model?"),
    (["n=0"], "n=0: must be >= 1"),
    (["bounds=true"], "bounds=True: only sampler=smc has a bounds"),
])
def test_bad_settings_fail_before_any_work(run_dir, tmp_path, capsys, args, expected):
    out = tmp_path / "never.jsonl"
    assert main([f"run={run_dir}", f"out={out}", *args]) == 2
    assert expected in capsys.readouterr().err and not out.exists()


def test_bad_run_folders_and_strings_are_named(tmp_path, capsys):
    out = tmp_path / "never.jsonl"
    assert main([f"run={tmp_path / 'nowhere'}", f"out={out}"]) == 2
    assert "no such folder" in capsys.readouterr().err
    no_pi = write_run(tmp_path / "no_pi")
    (no_pi / "pi.pt").unlink()
    assert main([f"run={no_pi}", f"out={out}"]) == 2
    assert "pi.pt missing" in capsys.readouterr().err
    failed = write_run(tmp_path / "failed", status="failed")
    assert main([f"run={failed}", f"out={out}"]) == 2
    assert "did not finish (status 'failed': RuntimeError: something broke)" in capsys.readouterr().err
    run = write_run(tmp_path / "ok")
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert main([f"run={run}", f"out={blocker}/samples.jsonl"]) == 2  # out's folder cannot be made: before any work
    assert f"{blocker} is a file, not a folder" in capsys.readouterr().err
    for text, expected in (("0101\n01x1\n", "line 2: '01x1' holds 'x'"),
                           ("0\n" * 3 + "1" * 7 + "\n", "line 4: 7 bits")):
        bad = tmp_path / "bad.txt"
        bad.write_text(text)
        assert main([f"run={run}", f"score={bad}", f"out={out}"]) == 2
        assert expected in capsys.readouterr().err and not out.exists()
