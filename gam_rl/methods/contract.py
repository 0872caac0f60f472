"""What every Training-2 method receives and returns: one signature for all of them.

A method is `train(cfg, inputs) -> Training2Result`, registered under its `algorithm` name
(methods/registry.py). The pipeline, the exact-evaluation script and the tests call it the same
way whatever the method; what only one method knows (a learned log Z, QRS's beta and its
estimates) travels in `results` (merged into results.json) and in `exact_extras` (a function of
the exact target, called under eval.exact).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from gam_rl.policy import LSTMPolicy
from gam_rl.potentials import Potential


@dataclass
class Training2Inputs:
    """Everything a Training-2 method may use; nothing else reaches it.

    pi starts with the weights the pipeline chose (`method.init`: fresh or a copy of r) and is
    trained in place. `target_ce_valid` is the line (1 + method.target_margin) CE(V, p_lambda) whose
    first crossing by CE(V, pi) a method records (None: no line, e.g. a target other than p_lambda)."""

    pi: LSTMPolicy
    r: LSTMPolicy  # the base model of the GAM and the first proposal
    p_lambda: Potential  # P_lambda = r exp(lambda . phi)
    true_process: Potential | None  # P = the true process (method.target=true), where the method allows it
    train: torch.Tensor  # D (tokens)
    valid: torch.Tensor  # V (tokens): every check of CE(V, pi)
    max_len: int  # symbols when sampling
    symbols: int  # symbols per sequence of the data (n + 1): CE in nats per symbol
    ce_valid_r: float  # CE(V, r)
    ce_valid_p_lambda: float | None  # CE(V, p_lambda) with the importance-sampled log Z-hat
    log_z_hat: float | None  # log Z-hat of P_lambda (importance sampling from r)
    log_z_se: float = 0.0  # its standard error (delta method: the relative s.e. of Z-hat); 0: unknown
    seed: int = 0
    logger: Any = None
    accelerator: str = "cpu"
    callbacks: list = field(default_factory=list)  # Lightning callbacks of the checks (e.g. exact.ExactCurve)
    exact: Any = None  # exact.ExactTarget under eval.exact (for callbacks a method builds itself), else None
    motif: str | None = None  # the data process's motif (method.plant_motif plants it); None: unknown

    def target_ce_valid(self, margin: float) -> float | None:
        """(1 + margin) CE(V, p_lambda): the target line (None when CE(V, p_lambda) is unknown)."""
        return None if self.ce_valid_p_lambda is None else (1.0 + margin) * self.ce_valid_p_lambda

    def valid_log_p(self) -> torch.Tensor | None:
        """log p_lambda(x) = log P_lambda(x) - log Z-hat of every sequence of V (float64), for the gap to
        p_lambda at every check; None when Z-hat is unknown."""
        if self.log_z_hat is None:
            return None
        with torch.no_grad():
            return self.p_lambda.log_potential(self.valid).double() - self.log_z_hat

    def potential(self, target: str) -> Potential:
        """The potential a method trains towards: `gam` (P_lambda) or `true` (the true process)."""
        if target == "gam":
            return self.p_lambda
        if self.true_process is None:
            raise ValueError("method.target='true': this run has no true process to train towards")
        return self.true_process


@dataclass
class Training2Result:
    """What every method returns. `draws`: the samples its Training-2 drew (proposals, for
    distillation); `ce_valid_pi`: CE(V, pi) of the returned pi on V alone; `reached_target`: the first
    check (or, for a method without checks, the end) where CE(V, pi) <= the target line, as
    {samples, seconds, ce_valid_pi, ...}, or None; `curve`: one dict per check (draws, ce_valid_pi, ...).
    `results`: the method's own keys for results.json. `exact_extras`: exact diagnostics only this
    method can give (its learned values against the enumeration, QRS's p_beta), from the exact target."""

    pi: LSTMPolicy
    draws: int
    seconds: float
    ce_valid_pi: float
    target_ce_valid: float | None = None  # the target line the method judged (None: none, e.g. target=true)
    reached_target: dict | None = None
    curve: list[dict] = field(default_factory=list)
    results: dict = field(default_factory=dict)
    exact_extras: Callable[[Any], dict] | None = None
    learned_log_z: float | None = None  # a method that learns log Z (V(empty prefix)): its value
    twist: dict | None = None  # a twist learner's values for SMC, as twist.pt holds them (methods/saved_twist.py)

    start_ce_valid: float | None = None  # CE(V) of pi's starting weights (check 0 of the selection)
    trained_ce_valid: float | None = None  # the best CE(V) of the method's own checks
    kept_start: bool = False  # no check beat the start: pi holds its starting weights again

    def keep_start_unless_beaten(self, start_ce_valid: float, start_weights: dict) -> None:
        """The start is check 0 of every method's selection: unless the method's best check is better on V
        than where pi started (a tie, a NaN: not better), the result's pi is the start again: a copy of pi
        with its starting weights, so that what the method keeps of its own (its critic, the values that
        exact_extras and `twist` read off the trained pi) still describes its best check."""
        self.start_ce_valid, self.trained_ce_valid = start_ce_valid, self.ce_valid_pi
        self.kept_start = not self.ce_valid_pi < start_ce_valid
        if self.kept_start:
            self.pi = copy.deepcopy(self.pi)
            self.pi.load_state_dict(start_weights)
            self.ce_valid_pi = start_ce_valid
            self.results["t2_best_epoch"] = 0  # checks count from 1; 0 is the start

    def reached_at_start(self, start_ce_valid: float) -> None:
        """The start is check 0 of the target line too: a pi that starts on the line (init=r where r is within
        the margin of p_lambda already, as at |D| = 5000 on some cells) reached it after 0 draws, whatever its
        own checks did next."""
        if self.target_ce_valid is not None and start_ce_valid <= self.target_ce_valid:
            self.reached_target = {"samples": 0, "updates": 0, "seconds": 0.0, "ce_valid_pi": start_ce_valid,
                                   "at_start": True}

    def record(self) -> dict:
        """results.json's Training-2 keys: the common ones and the method's own."""
        return {"ce_valid_pi": self.ce_valid_pi, "t2_target_ce_valid": self.target_ce_valid,
                "t2_reached_target": self.reached_target, "t2_learned_log_z": self.learned_log_z,
                "t2_curve": self.curve, "t2_start_ce_valid": self.start_ce_valid,
                "t2_trained_ce_valid": self.trained_ce_valid, "t2_kept_start": self.kept_start, **self.results}
