"""`gam-rl-sample`: draw from, or score strings under, a finished run's r, pi or p_lambda.

    gam-rl-sample run=RUN_DIR model=r|pi|p_lambda n=1000 sampler=auto|ancestral|rs|qrs|smc out=samples.jsonl
    gam-rl-sample run=RUN_DIR sampler=smc proposal=pi twist=RUN_DIR bounds=true
    gam-rl-sample run=RUN_DIR score=strings.txt out=scored.jsonl

A run folder of `gam-rl` holds what a model needs: config.yaml (motif, features, n, max_len),
results.json (lambda, the data's feature means), r.pt and pi.pt. p_lambda = r exp(lambda . phi) / Z
is not autoregressive, so it is sampled from a proposal q (r, or the run's pi):

- rs: exact rejection sampling from r, accepting x with probability exp(lambda . phi(x) - M), where
  M = max_x lambda . phi(x) from the features' ranges (Tilt.log_upper_bound). The acceptance rate
  a estimates Z = a e^M without bias.
- qrs: quasi-rejection sampling (Eikema et al. 2022): accept with probability min(1, w / beta),
  w = P/q. The samples follow p_beta = min(q, P/beta) / a(beta); each line's `log_weight` is
  log max(1, w / beta), the importance weight from p_beta back to p. beta is `log_beta`, or the
  cheapest one whose TV(p, p_beta), estimated on a pilot of q, is at most `qrs_max_tv`.
- smc: sequential Monte Carlo (gam_rl/smc.py), runs of `particles` particles from q, twisted by a
  twist learner's learned values (`twist=RUN_DIR`, its twist.pt) or not; each line's `log_weight`
  is the particle's log W (self-normalise over the file). Z-hat, the mean of the runs' unbiased
  estimates, and with `bounds=true` a lower bound on log Z (the mean of log Z-hat over
  `bound_runs` runs) and an upper one (conditional SMC seeded with exact samples of p_lambda,
  drawn by rejection from r).

Every line of `out` (JSON lines) holds the string, its length, log r, log pi, log P_lambda
(= log r + lambda . phi, unnormalised), phi by feature name, whether it contains the motif,
whether it was truncated at max_len (no EOS), and the sampler's log weight where it has one.
The configuration is checked before any work (exit 2, nothing written); `out` is written to a
temporary file and renamed at the end, so a failed command never leaves a partial file.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra import compose, initialize_config_module
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from gam_rl import schema
from gam_rl.config_fields import MISSING, setting
from gam_rl.cpu import flush_denormals
from gam_rl.estimators import (
    EstimatorError,
    choose_log_beta,
    quasi_rejection_sample,
    rejection_sample,
)
from gam_rl.features import Features
from gam_rl.files import atomic_write_lines, unwritable
from gam_rl.policy import LSTMPolicy, eval_mode
from gam_rl.potentials import gam
from gam_rl.process import MotifProcess
from gam_rl.progress import Progress
from gam_rl.run_io import by_feature, run_problems
from gam_rl.tokens import EOS, bit_lengths, decode, encode, pad_cat

log = logging.getLogger("gam_rl")

MODELS = ("r", "pi", "p_lambda")
SAMPLERS = ("auto", "ancestral", "rs", "qrs", "smc")


@dataclass
class SampleConfig:
    """`gam-rl-sample`'s keys (conf/sample.yaml)."""

    run: str = setting(MISSING)  # a gam-rl run folder (config.yaml, results.json, r.pt, pi.pt)
    model: str = setting("p_lambda", choices=MODELS)
    sampler: str = setting("auto", choices=SAMPLERS)  # auto: ancestral for r and pi, rs for p_lambda
    n: int = setting(1000, ge=1)  # samples to draw
    out: str = "samples.jsonl"  # JSON lines, one per sample (or scored string)
    score: str | None = None  # a text file of bit strings, one per line: score them instead of sampling
    proposal: str = setting("r", choices=("r", "pi"))  # q for qrs and smc (rs needs r: P/r is bounded, P/pi is not)
    log_beta: float | None = None  # qrs: log beta; None: chosen on a pilot for qrs_max_tv
    qrs_max_tv: float = setting(0.05, gt=0, lt=1)  # qrs without log_beta: the largest TV(p, p_beta) accepted
    pilot: int = setting(50000, ge=100)  # qrs without log_beta: draws of q that choose beta
    batch_size: int = setting(10000, ge=1)  # draws of q (or of r, pi) per batch
    max_proposals: int = setting(100_000_000, ge=1)  # rs / qrs: give up after this many draws of q
    particles: int = setting(1000, ge=2)  # smc: particles per run (n is rounded up to whole runs)
    ess_threshold: float = setting(0.5, ge=0, le=1)  # smc: resample when ESS < ess_threshold x particles
    twist: str | None = None  # smc: a twist learner's run folder (its twist.pt); None: untwisted
    bounds: bool = False  # smc: also bound log Z (bound_runs runs each way)
    bound_runs: int = setting(20, ge=2)  # smc bounds: independent runs, and exact samples for the upper bound
    seed: int = setting(0, ge=0)
    threads: int | None = setting(None, ge=1)  # torch intra-op threads; None: torch's default

    def chosen_sampler(self) -> str:
        if self.sampler != "auto":
            return self.sampler
        return "rs" if self.model == "p_lambda" else "ancestral"

    def problems(self) -> list[str]:
        out = []
        sampler = self.chosen_sampler()
        if self.score is None:
            if self.model in ("r", "pi") and sampler != "ancestral":
                out.append(f"sampler={self.sampler!r} with model={self.model!r}: {self.model} is autoregressive and "
                           "sampled exactly by sampler=ancestral (rs and qrs sample p_lambda)")
            if self.model == "p_lambda" and sampler == "ancestral":
                out.append("sampler='ancestral' with model='p_lambda': p_lambda is not autoregressive; use "
                           "sampler=rs (exact) or sampler=qrs")
            if sampler == "rs" and self.proposal != "r":
                out.append(f"proposal={self.proposal!r} with sampler='rs': P_lambda / pi has no known bound; "
                           "rejection sampling uses proposal=r (or use sampler=qrs)")
            if self.log_beta is not None and sampler != "qrs":
                out.append(f"log_beta={self.log_beta}: only sampler=qrs has a beta")
            if sampler != "smc":
                out += [f"{key}={value!r}: only sampler=smc has a {key}" for key, value in
                        (("twist", self.twist), ("bounds", self.bounds)) if value not in (None, False)]
            elif self.twist is not None and not (Path(self.twist) / "twist.pt").is_file():
                out.append(f"twist={self.twist!r}: no twist.pt there (a run of a twist learner, pcl, ac_dpg, ppo_dpg, "
                           "subtb or ctl, saves its learned values in it)")
        problem = unwritable(Path(self.out).absolute().parent)
        if problem:
            out.append(f"out={self.out!r}: {problem}")
        if Path(self.out).resolve() == (Path(self.score).resolve() if self.score else None):
            out.append(f"out={self.out!r}: the same file as score=; it would overwrite the strings")
        return out


class SampleError(ValueError):
    """A bad input found before any work: the command exits 2 and writes nothing."""


# ---- the run ------------------------------------------------------------------------------------

@dataclass
class LoadedRun:
    path: Path
    cfg: schema.Config
    results: dict
    r: LSTMPolicy
    pi: LSTMPolicy
    features: Features
    lam: torch.Tensor
    process: MotifProcess

    @property
    def max_len(self) -> int:
        return self.cfg.max_len

    def target(self):
        return gam(self.r, self.features, self.lam)  # P_lambda = r exp(lambda . phi)


def load_run(path: Path, device: str = "cpu") -> LoadedRun:
    """The run's models and GAM; SampleError naming what is wrong."""
    problems = run_problems(path)
    if problems:
        raise SampleError("; ".join(problems))
    results = json.loads((path / "results.json").read_text())
    try:
        cfg = schema.load(OmegaConf.load(path / "config.yaml"))
    except schema.ConfigError as err:
        raise SampleError(f"run={str(path)!r}: its config.yaml does not pass this version's check (a run of an "
                          f"older version?): {'; '.join(err.problems[:3])}") from None
    features = Features.from_config(cfg.features, cfg.motif.pattern)
    lam_by_name = by_feature(results, "lambda")
    if list(lam_by_name) != features.names:
        raise SampleError(f"run={str(path)!r}: results.json's features {list(lam_by_name)} are not the ones its "
                          f"config.yaml gives ({features.names})")
    models = {}
    for name in ("r", "pi"):
        models[name] = LSTMPolicy.load(path / f"{name}.pt", device)
    lam = torch.tensor(list(lam_by_name.values()), dtype=torch.float32, device=device)
    return LoadedRun(path, cfg, results, models["r"], models["pi"], features, lam,
                     MotifProcess(cfg.motif.pattern, cfg.n))


# ---- scoring ------------------------------------------------------------------------------------

def read_strings(path: Path, max_bits: int) -> list[str]:
    """The bit strings of a file, one per line (blank lines skipped); SampleError naming the first bad line."""
    if not path.is_file():
        raise SampleError(f"score={str(path)!r}: no such file")
    strings = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        text = line.strip()
        if not text:
            continue
        bad = sorted(set(text) - {"0", "1"})
        if bad:
            raise SampleError(f"score={str(path)!r}, line {number}: {text[:40]!r} holds {''.join(bad)!r}; only the "
                              "bits 0 and 1 are allowed")
        if len(text) > max_bits:
            raise SampleError(f"score={str(path)!r}, line {number}: {len(text)} bits, over this run's limit of "
                              f"{max_bits} (max_len: a string of max_len bits is scored as truncated, without EOS)")
        strings.append(text)
    if not strings:
        raise SampleError(f"score={str(path)!r}: no strings in the file")
    return strings


@dataclass
class Scored:
    """The columns of a batch of sequences (tensors of one row per sequence)."""

    tokens: torch.Tensor
    log_r: torch.Tensor
    log_pi: torch.Tensor
    phi: torch.Tensor  # (B, features)
    log_p: torch.Tensor  # log P_lambda = log r + lambda . phi (unnormalised)
    motif: torch.Tensor  # bool
    truncated: torch.Tensor  # bool: no EOS (stopped at max_len)
    log_weight: torch.Tensor | None = None  # the sampler's, where it has one


def score(run: LoadedRun, tokens: torch.Tensor, batch_size: int = 10000) -> Scored:
    """Every column for a padded token batch, in batches, without gradients and without dropout."""
    parts = []
    with torch.no_grad(), eval_mode(run.r), eval_mode(run.pi):
        for chunk in tokens.split(batch_size):
            phi = run.features(chunk)
            log_r = run.r.log_prob(chunk).double()
            parts.append((log_r, run.pi.log_prob(chunk).double(), phi, log_r + (phi @ run.lam).double(),
                          run.process.contains_motif(chunk), ~chunk.eq(EOS).any(1)))
    cols = [torch.cat(c) for c in zip(*parts, strict=True)]
    return Scored(tokens, *cols)


def lines(run: LoadedRun, scored: Scored):
    """The JSON lines of scored sequences."""
    strings, lengths = decode(scored.tokens), bit_lengths(scored.tokens).tolist()
    names = run.features.names
    log_r, log_pi, log_p, phi, motif, truncated = (t.tolist() for t in (
        scored.log_r, scored.log_pi, scored.log_p, scored.phi, scored.motif, scored.truncated))
    weights = [None] * len(strings) if scored.log_weight is None else scored.log_weight.tolist()
    for i, text in enumerate(strings):
        yield json.dumps({"string": text, "length": lengths[i], "log_r": log_r[i], "log_pi": log_pi[i],
                          "log_p_lambda": log_p[i], "phi": dict(zip(names, phi[i], strict=True)), "motif": motif[i],
                          "truncated": truncated[i], "log_weight": weights[i]})


# ---- sampling -----------------------------------------------------------------------------------

@dataclass
class Draw:
    tokens: torch.Tensor
    log_weight: torch.Tensor | None  # per sample (None: plain samples of the model)
    facts: dict  # what the sampler measured: acceptance, Z-hat, ...


def ancestral(policy: LSTMPolicy, cfg: SampleConfig, max_len: int, generator: torch.Generator) -> Draw:
    bar, parts = Progress("sample", cfg.n, "samples"), []
    with torch.no_grad():
        for start in range(0, cfg.n, cfg.batch_size):
            parts.append(policy.sample(min(cfg.batch_size, cfg.n - start), max_len, generator).tokens)
            bar.update(start + len(parts[-1]))
    bar.close()
    return Draw(pad_cat(parts), None, {})


def rejection(run: LoadedRun, cfg: SampleConfig, generator: torch.Generator) -> Draw:
    """Exact samples of p_lambda from r; Z-hat = acceptance x e^M (unbiased), with its binomial s.e."""
    target = run.target()
    result = rejection_sample(run.r, target, cfg.n, run.max_len, cfg.batch_size, cfg.max_proposals, generator)
    log_bound = target.log_weight_bound(run.r, run.max_len)  # M = max lambda . phi
    a = result.acceptance_rate
    a_se = math.sqrt(a * (1 - a) / result.proposals)
    return Draw(result.tokens, torch.zeros(len(result.tokens), dtype=torch.float64),
                {"acceptance": a, "proposals": result.proposals, "log_bound": log_bound,
                 "log_z": math.log(a) + log_bound, "log_z_se": a_se / a})


def quasi_rejection(run: LoadedRun, cfg: SampleConfig, generator: torch.Generator) -> Draw:
    """Samples of p_beta from q; each one's log weight log max(1, w / beta) takes p_beta back to p."""
    target, q = run.target(), (run.r if cfg.proposal == "r" else run.pi)
    facts: dict = {"proposal": cfg.proposal}
    log_beta = cfg.log_beta
    if log_beta is None:  # the cheapest beta whose pilot-estimated TV(p, p_beta) <= qrs_max_tv
        with torch.no_grad():
            pilot = q.sample(cfg.pilot, run.max_len, generator)
            log_w = target.log_weight(q, pilot).double()
        chosen = choose_log_beta(log_w, max_tv=cfg.qrs_max_tv)
        log_beta = chosen.log_beta
        facts.update(pilot=cfg.pilot, pilot_tv=chosen.tv, pilot_acceptance=chosen.acceptance)
    result = quasi_rejection_sample(q, target, cfg.n, run.max_len, cfg.batch_size, cfg.max_proposals, log_beta,
                                    generator)
    facts.update(log_beta=log_beta, acceptance=result.acceptance_rate, proposals=result.proposals)
    return Draw(result.tokens, None, facts)  # the weights come from the scored columns (qrs_log_weights)


def qrs_log_weights(scored: Scored, proposal: str, log_beta: float) -> torch.Tensor:
    """log max(1, w / beta), w = P / q, from the columns `score` computed anyway (q is r or pi): the weight
    that takes p_beta back to p."""
    log_q = scored.log_r if proposal == "r" else scored.log_pi
    return (scored.log_p - log_q - log_beta).clamp(min=0.0)


def sequential_mc(run: LoadedRun, cfg: SampleConfig, generator: torch.Generator) -> Draw:
    """ceil(n / particles) SMC runs from q (twisted by cfg.twist's values, if any); the particles with their
    log W, Z-hat = the mean of the runs' Z-hats (unbiased), and with cfg.bounds the bounds on log Z."""
    from gam_rl.methods.saved_twist import load_twist
    from gam_rl.smc import log_z_bounds, pooled_log_z, smc_runs

    target, q = run.target(), (run.r if cfg.proposal == "r" else run.pi)
    try:
        twist = None if cfg.twist is None else load_twist(Path(cfg.twist), run.r)
    except (ValueError, RuntimeError) as err:  # another format, or another run's model sizes
        raise SampleError(f"twist={cfg.twist!r}: cannot be this run's twist ({str(err).splitlines()[0]})") from None
    runs = math.ceil(cfg.n / cfg.particles)
    per_batch = max(1, cfg.batch_size // cfg.particles)  # runs batched as one set of particles, as the Z stage does
    bar = Progress("smc", runs, "runs")
    parts = []
    for start in range(0, runs, per_batch):
        parts.append(smc_runs(target, q, run.r, cfg.particles, run.max_len, min(per_batch, runs - start),
                              twist=twist, ess_threshold=cfg.ess_threshold, generator=generator))
        bar.update(start + len(parts[-1].log_z))
    bar.close()
    log_z, rel_se = pooled_log_z(torch.cat([p.log_z for p in parts]))  # log of the mean Z-hat, its relative s.e.
    facts = {"runs": runs, "particles": cfg.particles, "proposal": cfg.proposal, "twist": cfg.twist or "none",
             "log_z": log_z, "log_z_se": rel_se if runs > 1 else math.nan,
             "resamples": int(sum(int(p.resamples.sum()) for p in parts)),
             "min_ess": float(min(float(p.min_ess.min()) for p in parts)),
             "proposals": sum(p.proposals for p in parts)}
    if cfg.bounds:
        exact = rejection_sample(run.r, target, cfg.bound_runs, run.max_len, cfg.batch_size, cfg.max_proposals,
                                 generator, progress="exact samples").tokens
        bounds = log_z_bounds(target, q, run.r, cfg.particles, run.max_len, cfg.bound_runs, twist=twist,
                              exact_samples=exact, ess_threshold=cfg.ess_threshold, generator=generator)
        facts.update(lower=bounds.lower, lower_se=bounds.lower_se, upper=bounds.upper, upper_se=bounds.upper_se,
                     bound_runs=cfg.bound_runs)
    tokens = [p.tokens.reshape(-1, p.tokens.shape[-1]) for p in parts]
    return Draw(pad_cat(tokens), torch.cat([p.log_weights.reshape(-1) for p in parts]), facts)


def draw(run: LoadedRun, cfg: SampleConfig, generator: torch.Generator) -> Draw:
    sampler = cfg.chosen_sampler()
    if sampler == "smc":
        return sequential_mc(run, cfg, generator)
    if sampler == "ancestral":
        return ancestral(run.r if cfg.model == "r" else run.pi, cfg, run.max_len, generator)
    if sampler == "rs":
        return rejection(run, cfg, generator)
    return quasi_rejection(run, cfg, generator)


# ---- the summary ----------------------------------------------------------------------------------

def summary(run: LoadedRun, scored: Scored, facts: dict, what: str, seconds: float) -> str:
    """One screen: motif frequency, mean length and features (weighted where the sampler has weights) against
    D's means, the sampler's own figures, and the run's own estimate of Z beside any estimate here."""
    if scored.log_weight is not None:
        w = torch.softmax(scored.log_weight, 0)  # self-normalised weights
    else:
        w = torch.full((len(scored.tokens),), 1.0 / len(scored.tokens), dtype=torch.float64)
    mean = lambda x: float((w * x.double()).sum())  # noqa: E731
    out = [f"=== gam-rl-sample: {what}: {len(scored.tokens)} sequences in {seconds:.1f} s ===",
           f"  motif frequency  {mean(scored.motif):.4f}   mean length {mean(bit_lengths(scored.tokens)):.2f} bits"
           f"   truncated {mean(scored.truncated):.4f}"]
    data_means = by_feature(run.results, "moments_data")
    out.append("  features         " + "  ".join(
        f"{name} {mean(scored.phi[:, k]):.3f} (D {data_means[name]:.3f})" for k, name in enumerate(run.features.names)))
    if scored.log_weight is not None and bool((scored.log_weight != scored.log_weight[0]).any()):  # unequal weights
        out.append(f"  weights          ESS {float(1.0 / (w ** 2).sum()):.1f} of {len(w)} (self-normalised)")
    for key in ("proposal", "acceptance", "proposals", "log_beta", "pilot_tv", "runs", "particles", "resamples",
                "min_ess", "twist"):
        if key in facts:
            value = facts[key]
            shown = f"{value:,}" if isinstance(value, int) else value if isinstance(value, str) else f"{value:.4g}"
            out.append(f"  {key:<16} {shown}")
    if "log_z" in facts:
        exact = (run.results.get("exact") or {}).get("log_z")  # under eval.exact (the toy profile)
        se = facts.get("log_z_se", math.nan)
        spread = f"+- {se:.4f}" if math.isfinite(se) else "(one run: no s.e.; n >= 2 x particles gives one)"
        out.append(f"  log Z-hat        {facts['log_z']:.4f} {spread}   "
                   f"(the run's importance-sampled {run.results.get('log_z_hat', math.nan):.4f}"
                   + (f"; exact {exact:.4f})" if exact is not None else ")"))
    if "lower" in facts:  # E[log Z-hat] <= log Z <= E[log Z-hat of conditional SMC]
        out.append(f"  log Z bounds     [{facts['lower']:.4f} +- {facts['lower_se']:.4f}, {facts['upper']:.4f} +- "
                   f"{facts['upper_se']:.4f}] ({facts['bound_runs']} runs of {facts['particles']} particles each way)")
    return "\n".join(out)


# ---- the command ----------------------------------------------------------------------------------

def compose_config(overrides: list[str]) -> tuple[SampleConfig | None, list[str]]:
    """conf/sample.yaml with the command line's key=value overrides, checked like a run's: every problem
    at once, unknown keys with a did-you-mean (the overrides go into the plain config, where the schema sees
    them, not through Hydra's compose, which would stop at the first)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from gam_rl.cli import apply_override, describe_hydra_error

    try:
        with initialize_config_module("gam_rl.conf", version_base="1.3"):
            container = OmegaConf.to_container(compose("sample"), resolve=True)
        parsed = OverridesParser.create().parse_overrides(overrides)
    except (HydraException, OmegaConfBaseException) as err:
        return None, [describe_hydra_error(err)]
    problems = [p for o in parsed for p in [apply_override(container, o)] if p]
    cfg, found = schema.check_command(SampleConfig, container)
    problems += found
    if cfg is not None:
        problems += run_problems(Path(cfg.run))
    return (cfg if not problems else None), problems


USAGE = __doc__.split("\n\n")[1]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help") for a in args):
        print(__doc__.split("\n\n", 1)[0] + "\n" + USAGE + "\n\nKeys (conf/sample.yaml):")
        for name, field in SampleConfig.__dataclass_fields__.items():
            print(f"  {name}={field.default!r}" if field.default is not MISSING else f"  {name}=... (required)")
        return 0
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    cfg, problems = compose_config(args)
    if problems:
        print("gam-rl-sample: invalid configuration:\n  - " + "\n  - ".join(problems), file=sys.stderr)
        return 2
    flush_denormals()  # as every gam-rl job does (gam_rl/cpu.py)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    started = time.perf_counter()
    try:
        run = load_run(Path(cfg.run))
        if cfg.score is not None:
            # k < max_len bits end with EOS; max_len bits are a truncated output (no EOS), as the samplers leave them
            tokens = encode(read_strings(Path(cfg.score), run.max_len))[:, : run.max_len]
            scored, facts, what = score(run, tokens, cfg.batch_size), {}, f"scored {cfg.score}"
        else:
            generator = torch.Generator().manual_seed(cfg.seed)
            drawn = draw(run, cfg, generator)
            scored = score(run, drawn.tokens, cfg.batch_size)
            scored.log_weight, facts = drawn.log_weight, drawn.facts
            if cfg.chosen_sampler() == "qrs":
                scored.log_weight = qrs_log_weights(scored, cfg.proposal, facts["log_beta"])
            what = f"{cfg.model} by {cfg.chosen_sampler()} from {run.path}"
    except SampleError as err:
        print(f"gam-rl-sample: {err}", file=sys.stderr)
        return 2
    except EstimatorError as err:
        print(f"gam-rl-sample: sampling failed: {err}", file=sys.stderr)
        return 1
    Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
    written = atomic_write_lines(Path(cfg.out), lines(run, scored))
    print(summary(run, scored, facts, what, time.perf_counter() - started))
    print(f"  file             {cfg.out} ({written} lines)")
    return 0


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
