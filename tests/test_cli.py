"""cli.py's file writing: fresh temporary names in the target folder, no planted link followed, and
each file and its folder synced."""

import os

import pytest
import torch

import cli


def test_a_temporary_name_planted_as_a_link_is_not_followed(tmp_path, monkeypatch):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    monkeypatch.setattr(cli.secrets, "token_hex", lambda n: "0123456789ab")
    target = tmp_path / "args.json"
    os.symlink(victim, tmp_path / ".args.json.0123456789ab.tmp")
    with pytest.raises(cli.WriteError, match="cannot write .*args.json"):
        cli.write_text_atomic("{}", str(target))
    assert victim.read_text() == "precious" and not target.exists()


def test_temporary_names_are_fresh_and_in_the_target_folder(tmp_path, monkeypatch):
    made = []
    real = cli.open_new
    monkeypatch.setattr(cli, "open_new", lambda path, mode="wb": made.append(path) or real(path, mode))
    for _ in range(20):
        cli.write_text_atomic("{}", str(tmp_path / "last.pt"))
    assert len(set(made)) == 20 and all(os.path.dirname(n) == str(tmp_path) for n in made)
    assert sorted(os.listdir(tmp_path)) == ["last.pt"]


def test_a_checkpoint_save_syncs_the_file_and_its_folder(tmp_path, monkeypatch):
    from checkpoint import save_checkpoint

    synced = []
    real = os.fsync
    monkeypatch.setattr(cli.os, "fsync", lambda fd: synced.append(os.path.realpath(f"/proc/self/fd/{fd}")) or real(fd))
    save_checkpoint({"x": torch.zeros(3)}, str(tmp_path / "last.pt"))
    assert any(p.endswith(".tmp") for p in synced) and str(tmp_path) in synced


def test_names_from_files_reach_the_terminal_escaped():
    from cli import printable

    assert printable("a\x1b]0;pwned\x07b\r") == "a\\x1b]0;pwned\\x07b\\x0d"  # OSC title, BEL, CR
    assert printable("caf\udcff.png") == "caf\\xff.png"  # a file name that is not UTF-8 (os.fsdecode)
    assert printable("x\u202egnp.exe") == "x\\u202egnp.exe"  # a right-to-left override
    assert printable("Ünïcode ok 7") == "Ünïcode ok 7"


def test_csv_cells_are_quoted_and_never_run_as_formulas():
    import csv
    import io

    from cli import csv_table

    cells = ['=HYPERLINK("http://x","y")', "a,b", "-1", "-A1", "+cmd|' /C calc'!A0", "@sum", "--model fast"]
    text = csv_table([cells + [3, 0.5, "line\nbreak", "caf\udcff"]])
    got = next(csv.reader(io.StringIO(text)))
    assert got[:7] == ["'" + c if k in (0, 3, 4, 5) else c for k, c in enumerate(cells)]  # flags and numbers stay
    assert got[7:] == ["3", "0.5", "line\\x0abreak", "caf\\xff"]
    text.encode("utf-8")  # writable as UTF-8 whatever the names held


def test_an_output_named_as_a_link_is_written_through_and_stays_a_link(tmp_path):
    target = tmp_path / "real.csv"
    target.write_text("old")
    link = tmp_path / "link.csv"
    os.symlink(target, link)
    out = cli.output_path(str(link), "--out")
    cli.write_text_atomic("new", out)
    assert os.path.islink(link) and target.read_text() == "new"


def test_an_output_fifo_is_written_into_and_one_without_reader_is_one_line(tmp_path):
    import threading

    fifo = tmp_path / "pipe.csv"
    os.mkfifo(fifo)
    with pytest.raises(cli.WriteError, match="a FIFO that nothing reads"):  # at once, not a wait without end
        cli.write_text_atomic("rows\n", cli.output_path(str(fifo), "--out"))
    got = []
    reader = threading.Thread(target=lambda: got.append(open(fifo).read()))
    reader.start()
    for _ in range(200):  # the reader's open must come first, or the write would find no reader
        try:
            cli.write_text_atomic("rows\n", str(fifo))
            break
        except cli.WriteError:
            threading.Event().wait(0.01)
    reader.join(5)
    assert got == ["rows\n"] and os.path.exists(fifo) and not os.path.isfile(fifo)  # still the FIFO


def test_an_output_that_resolves_to_an_input_is_refused(tmp_path):
    data = tmp_path / "in" / "a.png"
    data.parent.mkdir()
    data.write_bytes(b"image")
    os.link(data, tmp_path / "hard.png")
    for name in (str(data), str(tmp_path / "in" / ".." / "in" / "a.png"), str(tmp_path / "hard.png")):
        with pytest.raises(cli.UserError, match="which this command reads"):
            cli.output_path(name, "--out", [str(data)])
    with pytest.raises(cli.UserError, match="is a folder"):
        cli.output_path(str(tmp_path / "in"), "--out")
    with pytest.raises(cli.UserError, match="does not exist"):
        cli.output_path(str(tmp_path / "gone" / "x.csv"), "--out")
    assert data.read_bytes() == b"image"


def test_argument_files_are_bounded_regular_files(tmp_path, capsys):
    from conftest import main_of

    (tmp_path / "self.args").write_text(f"--epochs 2\n@{tmp_path / 'other.args'}\n")
    (tmp_path / "other.args").write_text(f"@{tmp_path / 'self.args'}\n")
    os.symlink("/dev/zero", tmp_path / "zero.args")
    (tmp_path / "big.args").write_text("--epochs 2\n" * 200_000)
    chain = [tmp_path / f"{k}.args" for k in range(10)]
    for k, f in enumerate(chain[:-1]):
        f.write_text(f"@{chain[k + 1]}\n")
    chain[-1].write_text("--epochs 2\n")
    for name, message in (
        ("self.args", "names itself"),
        ("zero.args", "is not a regular file"),
        ("big.args", "is over 1 MB"),
        ("0.args", "nested 8 files deep"),
    ):
        assert main_of("train", [f"@{tmp_path / name}"]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.splitlines()) == 1, err


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="making a device node needs root")
def test_an_output_device_is_written_into_not_replaced(tmp_path):
    import stat

    null = tmp_path / "null"  # the same device as /dev/null, in a folder of the test's own
    os.mknod(null, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    cli.write_text_atomic("rows\n", cli.output_path(str(null), "--out"))
    assert stat.S_ISCHR(os.stat(null).st_mode)  # a rename would have left a regular file (as root: for /dev/null)
