"""`gam-rl-bench`: throughput of the hot paths against the machine's own matmul rate: a summary, the full JSON
with --json (or --out FILE).

Everything is measured in the same run, through the library's own code paths
(LSTMPolicy.sample / .log_prob, Features, the Training-1 estimator's step, the DPG draws and
loss, importance_z on the GAM potential), so the figures are what runs get. One JSON object
goes to stdout with --json (and to --out); progress goes to stderr.

FLOPs: an LSTM layer costs (input + hidden) 4 hidden multiply-adds, 2 (input + hidden) 4 hidden
FLOPs, per token forward (input = 3 for layer 0, the one-hot symbols; hidden for the layers
above): 29.9 MFLOP per 31-symbol sequence for the paper's 2 x 200. A training step
(forward, backward for activations and weights) counts as 3 forwards. The head (hidden x 3)
and the elementwise gate math are left out. A roofline ratio divides the achieved rate by
the fp32 matrix-multiply rate measured here at the shapes one LSTM step uses,
(B, in + H) @ (in + H, 4H) for every layer at the same batch size B.

  gam-rl-bench --quick --threads 1   # QUICK_TIME: a summary, the JSON with --json
  gam-rl-bench --device cuda --out bench.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from gam_rl.cpu import flush_denormals
from gam_rl.estimators import importance_z
from gam_rl.features import Features
from gam_rl.memory import retain_freed_memory
from gam_rl.methods.dpg import dpg_loss
from gam_rl.methods.draws import ProposalDraws
from gam_rl.policy import LSTMPolicy
from gam_rl.potentials import gam
from gam_rl.stages.moment_matching import MomentMatchingConfig, SampledMoments
from gam_rl.tokens import EOS, PAD, VOCAB

MOTIF = "10001011111000"  # Table 1's 14-bit motif
SYMBOLS = 31  # 30 bits + EOS: one data sequence
PAPER = (200, 2)  # hidden, layers
CPU_PROFILE = (64, 2)
LAMBDA_1001111 = (-10.0, 0.5, -0.5, 0.3, -0.2)  # a Training-1-like lambda (motif weight about -10)
FLOPS_FORMULA = ("2*(input+hidden)*4*hidden per LSTM layer per token forward (input=3 for layer 0, hidden for "
                 "layer>0); training step = 3x forward; head and gate elementwise math not counted")

# how long --quick takes, as README's table of times says too (tests/test_readme.py checks that they agree)
QUICK_TIME = "about 25 s on the 2-core Intel VM (2026-12-07), start-up included"


@dataclass(frozen=True)
class Sizes:
    sampler_batch: int  # sequences per sample() call (>= 4096 outside --tiny)
    train_batch: int  # sequences per training step (the paper's 500)
    features_batch: int
    snis_samples: int  # fresh r-samples per Training-1 step (paper 1000)
    snis_buffer: int  # re-weighted buffer (paper 10000)
    dpg_minibatch: int  # paper 500
    z_samples: int
    repeats: int  # timed calls per figure (the best is reported)
    warmup: int


SIZES = {
    "full": Sizes(10000, 500, 1_000_000, 1000, 10000, 500, 20000, 5, 1),
    "quick": Sizes(4096, 500, 200_000, 1000, 10000, 500, 8192, 3, 1),
    "tiny": Sizes(64, 16, 2000, 32, 320, 16, 128, 1, 1),  # for the test suite: seconds
}


def lstm_forward_flops(hidden: int, layers: int, inputs: int = VOCAB) -> int:
    """FLOPs per token of one forward step: sum over layers of 2 (in + H) 4H."""
    return sum(2 * ((inputs if layer == 0 else hidden) + hidden) * 4 * hidden for layer in range(layers))


def gemm_shapes(hidden: int, layers: int, batch: int) -> list[tuple[int, int, int]]:
    """(B, K, N) of the matmuls of one LSTM step: (B, in + H) @ (in + H, 4H) per layer."""
    return [(batch, (VOCAB if layer == 0 else hidden) + hidden, 4 * hidden) for layer in range(layers)]


def progress(msg: str) -> None:
    print(f"[gam-rl-bench] {msg}", file=sys.stderr, flush=True)


class Timer:
    def __init__(self, device: torch.device):
        self.device = device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def best(self, fn: Callable[[], object], repeats: int, warmup: int,
             between: Callable[[], object] | None = None) -> float:
        """Best wall time of `repeats` calls after `warmup` calls (synchronised on CUDA).
        `between` runs before every timed call and after the last (e.g. a matmul reference
        measured under the same load)."""
        for _ in range(warmup):
            fn()
        self.sync()
        best = math.inf
        for _ in range(repeats):
            if between is not None:
                between()
            start = time.perf_counter()
            fn()
            self.sync()
            best = min(best, time.perf_counter() - start)
        if between is not None:
            between()
        return best


class Gemm:
    """fp32 GFLOP/s of the matmuls of one LSTM step, (B, in + H) @ (in + H, 4H) for every
    layer at one batch size, timed in blocks of about 50 ms. `best` is the best block so far;
    `measure()` adds one block, so the reference can be re-measured next to each figure."""

    def __init__(self, timer: Timer, shapes: list[tuple[int, int, int]]):
        dev = timer.device
        self.timer, self.shapes, self.best = timer, shapes, 0.0
        self.mats = [(torch.randn(n, device=dev), torch.randn(b, k, device=dev), torch.randn(k, n, device=dev))
                     for b, k, n in shapes]
        self.flops = sum(2 * b * k * n for b, k, n in shapes)
        once = timer.best(self._step, 1, 1)
        self.inner = max(1, min(1000, math.ceil(0.05 / max(once, 1e-7))))

    def _step(self) -> None:
        for bias, a, w in self.mats:
            torch.addmm(bias, a, w)

    def _block(self) -> None:
        for _ in range(self.inner):
            self._step()

    def measure(self, repeats: int = 1) -> float:
        self.best = max(self.best, self.flops * self.inner / self.timer.best(self._block, repeats, 0) / 1e9)
        return self.best


def data_like_tokens(batch: int, device: torch.device, generator: torch.Generator) -> torch.Tensor:
    """(batch, 31): 30 random bits then EOS, like one data sequence."""
    tokens = torch.randint(0, 2, (batch, SYMBOLS), device=device, generator=generator)
    tokens[:, -1] = EOS
    return tokens


def full_length_policy(hidden: int, layers: int, device: torch.device, seed: int) -> LSTMPolicy:
    """An untrained LSTMPolicy (paper dropout 0.2) whose EOS logit is biased down by 30 nats,
    so every sampled row runs the full max_len symbols."""
    torch.manual_seed(seed)
    policy = LSTMPolicy(hidden, layers, 0.2).to(device).eval()
    with torch.no_grad():
        policy.head.bias[EOS] -= 30.0
    return policy


def bench_sampler(timer: Timer, hidden: int, layers: int, sizes: Sizes, gemm: Gemm) -> dict:
    policy = full_length_policy(hidden, layers, timer.device, seed=1)
    generator = torch.Generator(device=timer.device).manual_seed(0)
    symbols = []

    def call():
        samples = policy.sample(sizes.sampler_batch, SYMBOLS, generator)
        symbols.append(int((samples.tokens != PAD).sum()))

    seconds = timer.best(call, sizes.repeats, sizes.warmup, between=gemm.measure)
    per_seq = sum(symbols) / (len(symbols) * sizes.sampler_batch)  # symbols actually generated
    flops = lstm_forward_flops(hidden, layers) * per_seq
    return {"seq_per_s": sizes.sampler_batch / seconds, "gflops": sizes.sampler_batch * flops / seconds / 1e9,
            "symbols_per_seq": per_seq}


def bench_train(timer: Timer, hidden: int, layers: int, sizes: Sizes, gemm: Gemm) -> dict:
    torch.manual_seed(2)
    policy = LSTMPolicy(hidden, layers, 0.2).to(timer.device).train()
    optimiser = torch.optim.Adam(policy.parameters(), lr=1e-3)
    tokens = data_like_tokens(sizes.train_batch, timer.device, torch.Generator(device=timer.device).manual_seed(3))

    def step():
        optimiser.zero_grad(set_to_none=True)
        loss = -policy.log_prob(tokens).mean()
        loss.backward()
        optimiser.step()

    seconds = timer.best(step, sizes.repeats + 2, sizes.warmup + 1, between=gemm.measure)
    flops = 3 * lstm_forward_flops(hidden, layers) * SYMBOLS
    return {"seq_per_s": sizes.train_batch / seconds, "gflops": sizes.train_batch * flops / seconds / 1e9,
            "page_faults_per_step": page_faults_per_step(step)}


def page_faults_per_step(step: Callable[[], object], steps: int = 5) -> float:
    """Minor page faults per call of `step` after the heap has reached its peak (gam_rl/memory.py keeps
    freed blocks in the process: ~0 with it, ~3,000 per 2 x 64 training step at batch 500 without, on the
    hosts measured). A count the OS and its load decide: reported, never asserted."""
    step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(steps):
        step()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / steps


def bench_features(timer: Timer, sizes: Sizes) -> dict:
    tokens = data_like_tokens(sizes.features_batch, timer.device, torch.Generator(device=timer.device).manual_seed(4))
    out = {}
    for mask in ("1001111", "Mv1001111"):
        features = Features(mask, MOTIF)
        with torch.no_grad():
            out[mask] = sizes.features_batch / timer.best(lambda f=features: f(tokens), sizes.repeats + 2,
                                                          sizes.warmup)
    return out


def bench_snis_step(timer: Timer, sizes: Sizes) -> float:
    """One Training-1 step (snis_r, stages/moment_matching.py): SampledMoments.step (fresh r-samples,
    phi, the re-weighted buffer, SNIS moments) and the lambda move, on a full buffer."""
    dev = timer.device
    r = full_length_policy(*PAPER, dev, seed=5)
    features = Features("1001111", MOTIF)
    cfg = MomentMatchingConfig(samples_per_step=sizes.snis_samples, buffer=sizes.snis_buffer, heldout=1)
    estimator = SampledMoments(r, features, cfg, SYMBOLS, torch.Generator(device=dev).manual_seed(6))
    lam = torch.tensor(LAMBDA_1001111, device=dev)
    moments_data = torch.full((len(features),), 0.5, device=dev)
    state = {"lam": lam}
    with torch.no_grad():  # a full buffer, as from the second half of an epoch on
        for _ in range(math.ceil(sizes.snis_buffer / sizes.snis_samples)):
            estimator.step(lam)

    def step():
        with torch.no_grad():
            estimate = estimator.step(state["lam"])
            state["lam"] = state["lam"] + 10.0 * (moments_data - estimate.moments)

    return timer.best(step, sizes.repeats, sizes.warmup)


def bench_dpg_update(timer: Timer, sizes: Sizes, q_is_r: bool) -> float:
    """One DPG_off update at the paper's schedule (minibatch = proposal batch, Z = 1, no thinning),
    through the stage's own pieces: ProposalDraws.next_batch (x ~ q with log q(x) from the sampler,
    w = P_lambda(x) / q(x): exp(lambda . phi) alone while q is r, else P_lambda scored with r's
    dropout off), dpg_loss, backward through pi in training mode, grad-norm clip 0.25, Adam."""
    dev = timer.device
    r = full_length_policy(*PAPER, dev, seed=7)
    q = r if q_is_r else full_length_policy(*PAPER, dev, seed=8)
    torch.manual_seed(9)
    pi = LSTMPolicy(*PAPER, 0.2).to(dev).train()
    target = gam(r, Features("1001111", MOTIF), torch.tensor(LAMBDA_1001111))
    draws = ProposalDraws(q, target, minibatch=sizes.dpg_minibatch, proposal_batch=None, keep_per_draw=None,
                          replay=0, steps_per_draw=1, max_len=SYMBOLS,
                          generator=torch.Generator(device=dev).manual_seed(10))
    optimiser = torch.optim.Adam(pi.parameters(), lr=0.01)

    def update():
        draw = draws.next_batch()
        optimiser.zero_grad(set_to_none=True)
        dpg_loss(pi.log_prob(draw.tokens), draw).backward()
        torch.nn.utils.clip_grad_norm_(pi.parameters(), 0.25)
        optimiser.step()

    return timer.best(update, sizes.repeats, sizes.warmup)


def bench_z(timer: Timer, sizes: Sizes) -> float:
    """r-samples per second through importance_z on P_lambda = r exp(lambda . phi) (sample, phi,
    log w = lambda . phi), as the pipeline's Z stage draws them."""
    dev = timer.device
    r = full_length_policy(*PAPER, dev, seed=11)
    target = gam(r, Features("1001111", MOTIF), torch.tensor(LAMBDA_1001111))
    generator = torch.Generator(device=dev).manual_seed(12)
    # the sampler is warm by now: best of 2 calls, no warm-up call (each call is many batches)
    seconds = timer.best(lambda: importance_z(r, target, sizes.z_samples, sizes.sampler_batch, SYMBOLS, generator),
                         2, 0)
    return sizes.z_samples / seconds


# One reduced-size cpu-profile job, end to end in a fresh process (Hydra, data, r, Training-1, Z,
# DPG_off, evaluation): the same code and overheads as a sweep
# job at a few percent of its budgets. tiny (the test suite): the smoke profile.
SWEEP_JOB = {
    "quick": ["profile=cpu", "dataset_size=500", "method=dpg_off", "r.max_epochs=4", "training1.max_epochs=3",
              "z.samples=20000", "method.max_epochs=2", "method.updates_per_epoch=48", "eval.samples=1000"],
    "full": ["profile=cpu", "dataset_size=500", "method=dpg_off", "r.max_epochs=10", "training1.max_epochs=5",
             "z.samples=50000", "method.max_epochs=3", "method.updates_per_epoch=96", "eval.samples=2000"],
    "tiny": ["profile=smoke", "method=dpg_off"],
}


def bench_sweep_job(mode: str, device: torch.device) -> dict:
    """Wall seconds of `gam-rl <SWEEP_JOB[mode]>` run as a subprocess (one thread, csv logger, no
    Training-1 cache) and the job's own per-stage seconds from its results.json."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "gam_rl.cli", *SWEEP_JOB[mode], "motif=10001011111000", "features=1001111",
               "seed=1234", "threads=1", "logger=csv", "cache.training1=false", f"device={device.type}",
               f"hydra.run.dir={tmp}/job"]
        start = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, check=False,
                              env={**os.environ, "WANDB_MODE": "offline"})
        seconds = time.perf_counter() - start
        if done.returncode != 0:
            raise RuntimeError(f"the sweep job failed ({' '.join(cmd)}):\n{done.stderr[-3000:]}")
        results = json.loads((Path(tmp) / "job" / "results.json").read_text())
    return {"seconds": seconds, "stages": {k: v for k, v in results["timings"].items() if v is not None},
            "overrides": SWEEP_JOB[mode]}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def run_bench(mode: str, device: torch.device) -> dict:
    sizes = SIZES[mode]
    timer = Timer(device)
    started = time.time()
    out: dict = {
        "bench": "gam-rl-bench",
        "mode": mode,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
        "device_type": device.type,
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_avg_1min_start": load_average(),
        "timing": (f"best of {sizes.repeats} timed calls after {sizes.warmup} warm-up call(s) (train: best of "
                   f"{sizes.repeats + 2} after {sizes.warmup + 1}; z: best of 2, no warm-up); gemm: best ~50 ms "
                   "block of the run, blocks also being timed between the timed calls of the figure each one "
                   "divides, so both see the same load"),
        "flops": FLOPS_FORMULA,
    }
    if device.type == "cuda":
        out["tf32_matmul"] = bool(torch.backends.cuda.matmul.allow_tf32)
    fwd = {name: lstm_forward_flops(*shape) * SYMBOLS for name, shape in (("2x200", PAPER), ("2x64", CPU_PROFILE))}
    out["flops_per_seq"] = {
        "sampler_seq_per_s": fwd["2x200"], "train_seq_per_s": 3 * fwd["2x200"],
        "sampler_seq_per_s_2x64": fwd["2x64"], "train_seq_per_s_2x64": 3 * fwd["2x64"],
        "z_samples_per_s": fwd["2x200"], "snis_step_s": fwd["2x200"],
        # sample from q, score r (P_lambda), train pi (3x); q_is_r skips the r scoring
        "dpg_update_s": 5 * fwd["2x200"], "dpg_update_s_q_is_r": 4 * fwd["2x200"],
    }
    out["sizes"] = asdict(sizes)

    shapes = {}
    for suffix, shape in (("", PAPER), ("_2x64", CPU_PROFILE)):
        shapes[f"gemm_gflops{suffix}"] = gemm_shapes(*shape, sizes.sampler_batch)
        shapes[f"gemm_gflops_train{suffix}"] = gemm_shapes(*shape, sizes.train_batch)
    out["gemm_shapes"] = {k: [list(s) for s in v] for k, v in shapes.items()}
    gemms = {}
    for key, shape_list in shapes.items():
        progress(f"{key}: fp32 matmul at {shape_list}")
        gemms[key] = Gemm(timer, shape_list)
        gemms[key].measure(3)

    out["sampler_batch"], out["train_batch"], out["sampler_max_len"] = sizes.sampler_batch, sizes.train_batch, SYMBOLS
    out["sampler_policy"] = ("untrained LSTMPolicy with the EOS logit biased down by 30 nats: every row runs "
                             f"max_len={SYMBOLS} symbols; FLOPs use the symbols actually generated "
                             "(sampler_symbols_per_seq)")
    out["train_step"] = (f"LSTMPolicy.log_prob in training mode (dropout 0.2) on {sizes.train_batch} sequences of "
                         f"30 random bits + EOS, loss -mean log pi, backward, Adam step")
    for suffix, shape in (("", PAPER), ("_2x64", CPU_PROFILE)):
        name = f"{shape[1]}x{shape[0]}"  # layers x hidden
        progress(f"sampler {name}: {sizes.sampler_batch} sequences of {SYMBOLS} symbols")
        s = bench_sampler(timer, *shape, sizes, gemms[f"gemm_gflops{suffix}"])
        out[f"sampler_seq_per_s{suffix}"] = s["seq_per_s"]
        out[f"sampler_gflops{suffix}"] = s["gflops"]
        out[f"sampler_symbols_per_seq{suffix}"] = s["symbols_per_seq"]
        out[f"sampler_roofline_ratio{suffix}"] = s["gflops"] / gemms[f"gemm_gflops{suffix}"].best
        progress(f"train step {name}: {sizes.train_batch} sequences")
        t = bench_train(timer, *shape, sizes, gemms[f"gemm_gflops_train{suffix}"])
        out[f"train_seq_per_s{suffix}"] = t["seq_per_s"]
        out[f"train_gflops{suffix}"] = t["gflops"]
        out[f"train_roofline_ratio{suffix}"] = t["gflops"] / gemms[f"gemm_gflops_train{suffix}"].best
        out[f"train_page_faults_per_step{suffix}"] = t["page_faults_per_step"]

    for key, gemm in gemms.items():  # the best block of the run, including those next to each figure
        out[key] = gemm.best

    progress(f"features: {sizes.features_batch} sequences of {SYMBOLS} symbols")
    feats = bench_features(timer, sizes)
    out["features_batch"] = sizes.features_batch
    out["features_seq_per_s"] = feats["1001111"]
    out["features_seq_per_s_Mv1001111"] = feats["Mv1001111"]

    progress(f"Training-1 SNIS step: {sizes.snis_samples} r-samples, buffer {sizes.snis_buffer}")
    out["snis_step_s"] = bench_snis_step(timer, sizes)
    progress(f"DPG_off update: minibatch {sizes.dpg_minibatch} (q != r, P_lambda scored)")
    out["dpg_update_s"] = bench_dpg_update(timer, sizes, q_is_r=False)
    progress(f"DPG_off update: minibatch {sizes.dpg_minibatch} (q = r, weights exp(lambda . phi))")
    out["dpg_update_s_q_is_r"] = bench_dpg_update(timer, sizes, q_is_r=True)
    progress(f"Z: {sizes.z_samples} r-samples through importance_z")
    out["z_samples_per_s"] = bench_z(timer, sizes)
    progress(f"sweep job: gam-rl {' '.join(SWEEP_JOB[mode])} (one thread)")
    job = bench_sweep_job(mode, device)
    out["sweep_job_s"], out["sweep_job_stage_s"], out["sweep_job_overrides"] = (job["seconds"], job["stages"],
                                                                             job["overrides"])
    out["load_avg_1min_end"] = load_average()
    out["wall_s"] = round(time.time() - started, 1)
    return out


def summary(r: dict) -> str:
    """The figures a person reads, with the machine and its load."""
    return "\n".join([
        f"gam-rl-bench ({r['mode']}): {r['device']}, {r['threads']} thread(s), torch {r['torch']}, "
        f"load {r['load_avg_1min_start']} -> {r['load_avg_1min_end']}, {r['wall_s']} s",
        f"  matmul reference      {r['gemm_gflops']:8.1f} GFLOP/s (2 x 200 step shapes)",
        f"  sampler 2 x 200       {r['sampler_seq_per_s']:8.0f} seq/s   {r['sampler_roofline_ratio']:.2f}"
        " of the matmul rate",
        f"  train step 2 x 200    {r['train_seq_per_s']:8.0f} seq/s   {r['train_roofline_ratio']:.2f}",
        f"  sampler 2 x 64        {r['sampler_seq_per_s_2x64']:8.0f} seq/s   {r['sampler_roofline_ratio_2x64']:.2f}",
        f"  train step 2 x 64     {r['train_seq_per_s_2x64']:8.0f} seq/s   {r['train_roofline_ratio_2x64']:.2f}"
        f"   ({r['train_page_faults_per_step_2x64']:.0f} page faults per step)",
        f"  features 1001111      {r['features_seq_per_s'] / 1e6:8.2f} M seq/s",
        f"  Training-1 SNIS step  {r['snis_step_s']:8.3f} s",
        f"  DPG_off update        {r['dpg_update_s']:8.3f} s ({r['dpg_update_s_q_is_r']:.3f} s while q = r)",
        f"  Z                     {r['z_samples_per_s']:8.0f} r-samples/s",
        f"  sweep job             {r['sweep_job_s']:8.1f} s  (reduced cpu-profile dpg_off job, one thread: "
        + ", ".join(f"{k} {v:.1f}" for k, v in r["sweep_job_stage_s"].items() if v >= 0.05) + ")",
        "  (all figures: --json; --out FILE also writes them)",
    ])


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gam-rl-bench: --device cuda, but CUDA is not available")
    return torch.device(name)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="gam-rl-bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"smaller batches and fewer repeats ({QUICK_TIME})")
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # tests: seconds, figures meaningless
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--out", default=None, help="also write the full JSON to this file")
    parser.add_argument("--json", action="store_true", help="print the full JSON instead of the summary")
    args = parser.parse_args(argv)
    retain_freed_memory()  # as every gam-rl job does
    flush_denormals()
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    mode = "tiny" if args.tiny else "quick" if args.quick else "full"
    results = run_bench(mode, device)
    text = json.dumps(results, indent=2)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text if args.json else summary(results))


if __name__ == "__main__":
    main()
