"""README's numbers agree with each other where they repeat, and every time in its table of times says
its host and date. (What the numbers are is measured by hand; that they say one thing is checked here.)"""

import re
from pathlib import Path

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def section(title: str) -> str:
    start = README.index(f"## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start:end if end > 0 else None]


def times_table() -> dict[str, list[str]]:
    rows = [line for line in section("Two commands").splitlines() if line.startswith("| `")]
    return {row.split("|")[1].strip(): [cell.strip() for cell in row.split("|")[2:-1]] for row in rows}


def test_the_table_of_times_names_its_hosts_dates_and_commit():
    header = next(line for line in section("Two commands").splitlines() if line.startswith("| command |"))
    assert re.search(r"Intel VM, \d{4}-\d{2}-\d{2}, commit [0-9a-f]{7}", header), header
    assert "AMD EPYC" in header
    table = times_table()
    for command in ("`make run` from a fresh clone, install included", "`make test` (pytest)", "`make test-slow`",
                    "`gam-rl-bench --quick`"):
        assert any(key.startswith(command) for key in table), command


def test_make_runs_time_is_the_same_wherever_readme_gives_it():
    table = times_table()
    install, run = re.match(r"([\d.]+) min \(the run itself ([\d.]+) min\)",
                            next(v for k, v in table.items() if k.startswith("`make run`"))[0]).groups()
    two = section("Two commands")
    assert f"It\nends like this ({install} min with the install" in two or f"ends like this ({install} min" in two
    assert re.search(rf"wall time\s+{re.escape(run)} min \(", two), "the example's wall time"
    commit = re.search(r"commit ([0-9a-f]{7})", two.splitlines()[next(
        i for i, line in enumerate(two.splitlines()) if line.startswith("| command |"))]).group(1)
    assert f"commit {commit};" in two  # the example output is the table's run


def test_the_bench_time_agrees_with_the_benchs_own_help():
    from gam_rl.bench import QUICK_TIME

    table = times_table()
    bench = next(v for k, v in table.items() if k.startswith("`gam-rl-bench --quick`"))[0]
    assert QUICK_TIME.startswith(bench)  # gam-rl-bench --help says the same
    assert f"`gam-rl-bench --quick` ({bench})" in README  # and so does "Where next"
