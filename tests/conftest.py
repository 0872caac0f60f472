import os

import pytest
import torch

# keep tests off the user's cache and W&B account; small thread count for 2-core CI
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(min(2, torch.get_num_threads()))


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
