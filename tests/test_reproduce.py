"""reproduce.py --quick runs every notebook and "ours" command for a few steps, so none can rot."""
import json
import os

from conftest import HAS_FASHION, SHARED, run_cli
from reproduce import ROW_IDS, ROWS


def test_quick_mode_runs_every_command_and_writes_the_table(tmp_path):
    rows = [r for r in ROW_IDS if HAS_FASHION or r != "001"]   # 001 trains on Fashion-MNIST
    args = ["reproduce.py", *rows, "--quick", "--seeds", "1", "--results", str(tmp_path)]
    result = run_cli(args + (["--data-dir", SHARED] if HAS_FASHION else []))
    assert result.returncode == 0, result.stderr
    recorded = json.load(open(tmp_path / "quick" / "reproduce.json"))
    expected = {f"{rid}/{kind}" for rid, *_, nb, ours in ROWS if rid in rows
                for kind, flags in (("notebook", nb), ("ours", ours)) if flags}
    assert set(recorded) == expected
    assert all(len(runs) == 1 and 0 <= runs[0]["acc"] <= 100 for runs in recorded.values())
    table = open(tmp_path / "quick" / "reproduce.md").read()
    assert all(f"| {rid} |" in table for rid in rows) and "python train.py" in table
    # A second call finds every run recorded and only rebuilds the table.
    again = run_cli(args + (["--data-dir", SHARED] if HAS_FASHION else []))
    assert again.returncode == 0 and "seed 0:" not in again.stdout


def test_unknown_row_is_refused(tmp_path):
    result = run_cli(["reproduce.py", "007", "--results", str(tmp_path)])
    assert result.returncode == 2 and "unknown row '007'" in result.stderr
    assert not os.listdir(tmp_path)
