import numpy as np
import pytest
import torch

from gam_rl.features import FeatureMaskError, Features, parse_mask
from gam_rl.tokens import encode

MOTIF = "10001011111000"


def slow_features(s: str, mask: str, motif: str, max_len: int = 100) -> list[float]:
    """Obviously-correct reference on Python strings (paper.md section 3)."""
    L = len(motif)
    letters, digits = mask[:-7], mask[-7:]
    patterns = [motif, motif + "0", motif[: L // 2], None,
                ("10101" * 10)[:L], ("1001001" * 10)[: L + 2], ("00110011" * 10)[: L // 2]]
    out = []
    for letter in letters:
        out.append(len(s) / max_len if letter == "M" else (len(s) / max_len) ** 2)
    for on, pattern in zip(digits, patterns, strict=True):
        if on == "1":
            out.append(float(not s.startswith("1")) if pattern is None else float(pattern not in s))
    return out


def random_strings(rng, count, motif):
    out = []
    for i in range(count):
        length = int(rng.integers(0, 45))
        s = "".join(rng.choice(["0", "1"], size=length))
        if i % 3 == 0 and length >= len(motif):  # plant patterns so both values occur
            at = int(rng.integers(0, length - len(motif) + 1))
            s = s[:at] + motif + s[at + len(motif):]
        out.append(s)
    return out + ["", "1", "0", motif, motif + "0", "1010110101101010"]


@pytest.mark.parametrize("mask", ["1001111", "Mv1001111", "0111111", "1111111", "vM0000001", "M1000000"])
@pytest.mark.parametrize("motif", [MOTIF, "1011100111001", "10001"])
def test_features_match_slow_reference_on_padded_batches(mask, motif):
    rng = np.random.default_rng(1)
    strings = random_strings(rng, 300, motif)
    phi = Features(mask, motif)(encode(strings))  # rows padded to the longest string
    expected = torch.tensor([slow_features(s, mask, motif) for s in strings], dtype=torch.float32)
    assert phi.shape == expected.shape
    assert torch.allclose(phi, expected, atol=1e-7)


def test_features_ignore_padding_width_and_truncation():
    f = Features("Mv1001111", MOTIF)
    x = encode(["1000101111100", "1"])
    wide = torch.cat([x, torch.full((2, 20), 3)], dim=1)
    assert torch.equal(f(x), f(wide))
    truncated = encode([MOTIF])[:, : len(MOTIF)]  # no EOS: hit the length limit
    assert f(truncated)[0, 2].item() == 0.0  # motif present -> feature 0


def test_mask_names_and_order():
    assert [s.name for s in parse_mask("Mv1001111", MOTIF)] == [
        "M", "v", "motif", "first_bit", "distractor_10101", "distractor_1001001", "distractor_00110011"]
    assert Features("1001111", MOTIF).binary and not Features("Mv1001111", MOTIF).binary


@pytest.mark.parametrize("mask, fragment", [
    ("", "non-empty"), ("100111", "7 positional"), ("Xv1001111", "unknown feature letter"),
    ("10011a1", "must be 0/1"), ("MM1001111", "repeated"), ("0000000", "selects no feature"),
])
def test_bad_masks_raise_clear_errors(mask, fragment):
    with pytest.raises(FeatureMaskError, match=fragment):
        parse_mask(mask, MOTIF)
