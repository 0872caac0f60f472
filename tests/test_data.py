import json

import pytest

from gam_rl.data import ensure_split_files, load_splits, valid_size_for
from gam_rl.process import MotifProcess
from gam_rl.tokens import decode

POOLS = {"train": 300, "valid": 60, "test": 80}
MOTIF = "10001"


def test_valid_size_rule_matches_paper():
    assert [valid_size_for(d) for d in (500, 1000, 5000, 10000, 20000)] == [500, 500, 1000, 2000, 2000]
    assert valid_size_for(100) == 100  # below 500 the rounding would give an empty V


def test_splits_are_nested_valid_and_independent_of_run(tmp_path):
    small = load_splits(MOTIF, 12, 50, 20, POOLS, tmp_path)
    large = load_splits(MOTIF, 12, 200, 40, POOLS, tmp_path)
    assert decode(large.train)[:50] == decode(small.train)
    assert decode(large.valid)[:20] == decode(small.valid)
    assert decode(large.test) == decode(small.test) and len(decode(large.test)) == 80
    process = MotifProcess(MOTIF, 12)
    for tokens in (large.train, large.valid, large.test):
        assert bool((process.well_formed(tokens) & process.contains_motif(tokens)).all())
    lines = (small.data_dir / "train.txt").read_text().splitlines()
    assert len(lines) == 300 and all(len(s) == 12 and MOTIF in s for s in lines)


def test_same_key_reuses_cache_and_other_motif_gets_other_folder(tmp_path):
    a = ensure_split_files(MOTIF, 12, POOLS, tmp_path)
    mtime = (a / "train.txt").stat().st_mtime_ns
    assert ensure_split_files(MOTIF, 12, POOLS, tmp_path) == a
    assert (a / "train.txt").stat().st_mtime_ns == mtime
    b = ensure_split_files("1111", 12, POOLS, tmp_path)
    assert b != a and (b / "train.txt").read_text() != (a / "train.txt").read_text()


@pytest.mark.parametrize("tamper", ["edit_line", "bad_key", "drop_file"])
def test_cache_that_does_not_match_its_key_is_rebuilt(tmp_path, tamper):
    folder = ensure_split_files(MOTIF, 12, POOLS, tmp_path)
    original = (folder / "train.txt").read_text()
    if tamper == "edit_line":
        (folder / "train.txt").write_text("111111111111\n" + original.split("\n", 1)[1])
    elif tamper == "bad_key":
        meta = json.loads((folder / "meta.json").read_text())
        meta["key"]["n"] = 13
        (folder / "meta.json").write_text(json.dumps(meta))
    else:
        (folder / "test.txt").unlink()
    rebuilt = ensure_split_files(MOTIF, 12, POOLS, tmp_path)
    assert rebuilt == folder and (rebuilt / "train.txt").read_text() == original
    assert (rebuilt / "test.txt").exists()
