import os

import pytest
import torch

# keep tests off the user's cache and W&B account
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
# One torch thread, here and (OMP_NUM_THREADS) in the runs the tests start: their tensors are tiny, so a
# second thread saves nothing on a quiet 2-core host (the suite took 291 s either way) and on a busy one
# costs far more than it saves (a tiny op waits for the other thread: the suite took 1029 s at two threads
# beside other work). GAM_RL_TEST_THREADS=N asks for N.
THREADS = int(os.environ.get("GAM_RL_TEST_THREADS", "1"))
os.environ["OMP_NUM_THREADS"] = str(THREADS)
torch.set_num_threads(THREADS)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("GAM_RL_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def long_proposal(seed: int = 0, hidden: int = 8, bias: float = 0.9):
    """A small untrained one-layer LSTMPolicy whose EOS is made unlikely (head bias [b, b, -b]):
    long-ish sequences."""
    from gam_rl.policy import LSTMPolicy

    torch.manual_seed(seed)
    r = LSTMPolicy(hidden, 1, dropout=0.0).eval()
    with torch.no_grad():
        r.head.bias.copy_(torch.tensor([bias, bias, -bias]))
    return r


def all_bit_strings(n: int) -> list[str]:
    return [format(i, f"0{n}b") for i in range(2**n)] if n else [""]


def train_method(cfg, pi, r, target, valid, *, max_len: int, symbols: int, ce_valid_r: float, seed: int = 0,
                 log_z: float | None = None, log_z_se: float = 0.0, ce_valid_p_lambda: float | None = None,
                 train=None, callbacks=(), exact=None, motif: str | None = None):
    """Run the registered method of `cfg` on a small problem through the common contract, with `target`
    as the potential it trains towards (whatever it is: a GAM, the true process, r itself). log_z: the
    log Z that the loop's gap to the target and its noise stop use; ce_valid_p_lambda: the target line's
    reference; motif: the motif method.plant_motif plants."""
    from gam_rl.methods import registry
    from gam_rl.methods.contract import Training2Inputs

    inputs = Training2Inputs(pi=pi, r=r, p_lambda=target, true_process=target, valid=valid,
                             train=torch.empty(0, 1, dtype=torch.long) if train is None else train,
                             max_len=max_len, symbols=symbols, ce_valid_r=ce_valid_r,
                             ce_valid_p_lambda=ce_valid_p_lambda, log_z_hat=log_z, log_z_se=log_z_se, seed=seed,
                             callbacks=list(callbacks), exact=exact, motif=motif)
    return registry.train(cfg, inputs)
