"""Training-1: fit lambda so that E_{p_lambda}[phi] matches mean_D phi (r frozen).

The log-likelihood gradient in lambda is |D| (mean_D phi - E_{p_lambda} phi), so each step
moves lambda += lr_e (mean_chunk phi - E_hat phi), lr_e = lr / epoch, one step per chunk
of D. E_hat comes from samples of the fixed proposal r:
  snis_r: E_hat = sum_i w_i phi_i / sum_i w_i with w_i = exp(lambda . phi_i) (= P_lambda / r);
          the last `buffer` samples are reused, re-weighted with the current lambda (valid
          because r does not change): within the epoch (reuse=epoch, the reference) or across
          epochs too (reuse=run, more ESS per step when the tilt is strong).
  rs:     E_hat = mean phi over the buffer samples accepted with probability
          exp(lambda . phi - log beta), i.e. exact samples of p_lambda.
An epoch ends with the L1 mismatch |mean_D phi - E_hat phi|_1 under the current lambda;
early stopping watches it and the lambda with the smallest mismatch is kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import lightning.pytorch as pl
import torch

from gam_rl.estimators import EstimatorError, accept, check_unit_box, rejection_log_bound, snis_moments
from gam_rl.features import Features
from gam_rl.policy import LSTMPolicy
from gam_rl.stages.common import KeepBest, PlateauStop, ProgressLog, full_batch_loader, make_trainer

ESTIMATORS = ("snis_r", "rs")
REUSE = ("epoch", "run")


class MomentMatching(pl.LightningModule):
    def __init__(self, r: LSTMPolicy, features: Features, phi_data: torch.Tensor, *, estimator: str,
                 lr: float, samples_per_step: int, buffer: int, max_len: int, seed: int, reuse: str = "epoch"):
        super().__init__()
        if estimator not in ESTIMATORS:
            raise ValueError(f"training1.estimator={estimator!r}: choose one of {list(ESTIMATORS)}")
        if reuse not in REUSE:
            raise ValueError(f"training1.reuse={reuse!r}: choose one of {list(REUSE)}")
        self.reuse = reuse
        self.automatic_optimization = False  # lambda moves by its closed-form gradient
        self.r, self.features, self.estimator = r.eval(), features, estimator
        self.lr, self.samples_per_step, self.buffer_size, self.max_len = lr, samples_per_step, buffer, max_len
        self.register_buffer("lam", torch.zeros(len(features)))
        self.register_buffer("moments_data", phi_data.mean(0))
        self.generator_seed = seed
        self._generator: torch.Generator | None = None
        self._phi_buffer: list[torch.Tensor] = []
        self.samples_drawn = 0
        self.last_ess = float("nan")

    def configure_optimizers(self):
        return None

    def _gen(self) -> torch.Generator:
        if self._generator is None:
            self._generator = torch.Generator(device=self.lam.device).manual_seed(self.generator_seed)
        return self._generator

    def on_train_epoch_start(self):
        if self.reuse == "epoch":
            self._phi_buffer = []  # the reference keeps samples within an epoch only

    def _buffered_phi(self) -> torch.Tensor:
        phi = torch.cat(self._phi_buffer)[-self.buffer_size:]
        self._phi_buffer = [phi]
        return phi

    def model_moments(self, phi: torch.Tensor) -> tuple[torch.Tensor | None, float]:
        """E_hat_{p_lambda}[phi] from proposal samples phi (N, K) of r, and its ESS (for rs: the
        number accepted). None when rs accepted nothing."""
        log_tilt = phi @ self.lam
        if self.estimator == "snis_r":
            est = snis_moments(log_tilt, phi)
            return est.moments, est.ess
        check_unit_box(phi, self.features.names)
        keep = accept(log_tilt, rejection_log_bound(self.lam), self._gen())
        if not keep.any():
            return None, 0.0
        return phi[keep].mean(0), float(keep.sum())

    def training_step(self, phi_chunk, batch_idx):
        with torch.no_grad():
            samples = self.r.sample(self.samples_per_step, self.max_len, self._gen())
            self.samples_drawn += len(samples)
            self._phi_buffer.append(self.features(samples.tokens))
            moments, self.last_ess = self.model_moments(self._buffered_phi())
            if moments is None:  # rs accepted nothing in this step: no information, no move
                self.log("t1/rs_empty_step", 1.0, on_step=True, on_epoch=False)
                return None
            lr = self.lr / (self.current_epoch + 1)  # lr_e = lr / epoch, epochs counted from 1
            self.lam += lr * (phi_chunk.mean(0) - moments)
        self.log("t1/ess", self.last_ess, on_step=True, on_epoch=False, batch_size=len(phi_chunk))
        return None

    def validation_step(self, batch, batch_idx):
        pass  # the epoch's mismatch is computed once, in on_validation_epoch_end

    def on_validation_epoch_end(self):
        if not self._phi_buffer:
            return
        with torch.no_grad():
            moments, ess = self.model_moments(torch.cat(self._phi_buffer))
        if moments is None:
            raise EstimatorError("Training-1 (rs): no proposal was accepted in a whole epoch; "
                                 "raise training1.buffer or use training1.estimator=snis_r")
        mismatch = float((self.moments_data - moments).abs().sum())
        self.log("t1/mismatch", mismatch)
        self.log("t1/epoch_ess", ess)
        for name, value in zip(self.features.names, self.lam.tolist(), strict=True):
            self.log(f"t1/lambda_{name}", value)


@dataclass
class Training1Result:
    lam: torch.Tensor
    moments_data: torch.Tensor
    best_mismatch: float
    epochs: int
    samples: int


def fit_lambda(r: LSTMPolicy, features: Features, train_tokens: torch.Tensor, *, estimator: str, lr: float,
               chunk: int, samples_per_step: int, buffer: int, max_len: int, max_epochs: int, patience: int,
               seed: int, reuse: str = "epoch", logger=None, accelerator: str = "cpu",
               log_every: int = 1) -> Training1Result:
    with torch.no_grad():
        phi_data = features(train_tokens)
    module = MomentMatching(r, features, phi_data, estimator=estimator, lr=lr, samples_per_step=samples_per_step,
                            buffer=buffer, max_len=max_len, seed=seed, reuse=reuse)
    keep = KeepBest("t1/mismatch", "lam")
    callbacks = [keep, PlateauStop(keep, patience),
                 ProgressLog("training1", ["t1/mismatch", "t1/epoch_ess"], every=log_every)]
    trainer = make_trainer(max_epochs, callbacks, logger, accelerator)
    # one lambda step per chunk of D (in order); validation is a single no-op batch per epoch
    loader = full_batch_loader(phi_data, chunk, shuffle=False)
    trainer.fit(module, loader, full_batch_loader(phi_data[:1], 1, shuffle=False))
    return Training1Result(module.lam.detach().clone(), module.moments_data.clone(), keep.best,
                           trainer.current_epoch, module.samples_drawn)
