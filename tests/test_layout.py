"""The shape of the toolkit: who imports whom, how few modules a training run passes through, what
the user's guide may say, that the results report holds what the ledgers write, and quiet closed pipes."""

import ast
import glob
import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, run_script

ENTRY = {
    "train",
    "evaluate",
    "predict",
    "export",
    "demo",
    "bench",
    "reproduce",
    "top",
    "hubconf",
    "compare",
}  # commands, never imported
SOURCES = sorted(glob.glob(os.path.join(ROOT, "*.py")) + glob.glob(os.path.join(ROOT, "experiments", "*.py")))
LOCAL = {os.path.splitext(os.path.basename(p))[0] for p in SOURCES}


def local_imports(path):
    """The toolkit's own modules that PATH imports, at any depth of its code."""
    names = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names & LOCAL


GRAPH = {os.path.splitext(os.path.basename(p))[0]: local_imports(p) for p in SOURCES}


def test_no_command_imports_another_command():
    offenders = {m: sorted(deps & ENTRY) for m, deps in GRAPH.items() if deps & ENTRY}
    assert not offenders


def test_no_import_cycles():
    def visit(module, path):
        if module in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(module) :] + [module]))
        for dep in GRAPH.get(module, ()):
            visit(dep, path + [module])

    for module in GRAPH:
        visit(module, [])


def top_level_imports(path):
    tree = ast.parse(open(path).read())
    return {n.module.split(".")[0] for n in tree.body if isinstance(n, ast.ImportFrom) and n.module} | {
        a.name.split(".")[0] for n in tree.body if isinstance(n, ast.Import) for a in n.names
    }


def test_models_and_data_copy_out_alone(tmp_path):
    """Copied into an empty folder, each imports and works with torch alone: nothing of ours at import
    (their command lines use cli.py beside them, inside main)."""
    for name in ("models", "data"):
        assert not top_level_imports(os.path.join(ROOT, f"{name}.py")) & LOCAL, name
        shutil.copy(os.path.join(ROOT, f"{name}.py"), tmp_path)
    code = (
        "import sys; sys.modules['torchvision'] = sys.modules['numpy'] = sys.modules['PIL'] = None; "
        "import torch, models, data; m = models.get_model('strided'); "
        "x = torch.zeros(4, 1, 28, 28, dtype=torch.uint8); "
        "b = next(iter(data.Batches(x, torch.zeros(4, dtype=torch.long), 2, 0.1, 0.3).epoch())); "
        "print(m(b[0]).shape)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "torch.Size([2, 10])" in result.stdout, result.stderr


def test_the_lowest_module_imports_nothing_of_ours():
    assert GRAPH["cli"] == set()


def test_a_default_run_reads_in_train_py(synth_data, tmp_path, capsys):
    """A plain run passes through few of the toolkit's modules and functions (class bodies and
    comprehensions aside), none of them torchrun's or a user's-files reader's."""
    called = set()

    def profile(frame, event, arg):
        code = frame.f_code
        if (
            event == "call"
            and os.path.dirname(code.co_filename) == ROOT
            and code.co_flags & 2
            and code.co_name[0] != "<"
        ):
            called.add((os.path.basename(code.co_filename), code.co_qualname))

    sys.setprofile(profile)
    try:
        code, _, err = run_script(
            "train",
            [
                "--model",
                "cnn",
                "--epochs",
                "1",
                "--data-dir",
                synth_data,
                "--out",
                str(tmp_path / "run"),
                "--progress",
                "off",
            ],
            capsys,
        )
    finally:
        sys.setprofile(None)
    assert code == 0, err
    modules = {f for f, _ in called} - {"conftest.py"}
    assert modules <= {"train.py", "cli.py", "device.py", "data.py", "models.py", "checkpoint.py", "optimizers.py"}
    assert len(called) <= 100, sorted(called)
    assert ("train.py", "train_one_epoch") in called and ("train.py", "meet") not in called


def calls_of(path, owner, names):
    """Lines of PATH that call owner.NAME for a NAME in NAMES (os.replace, ...)."""
    return [
        n.lineno
        for n in ast.walk(ast.parse(open(path).read()))
        if isinstance(n, ast.Call)
        and isinstance(n.func, ast.Attribute)
        and n.func.attr in names
        and isinstance(n.func.value, ast.Name)
        and n.func.value.id == owner
    ]


def test_one_atomic_writer():
    """Only cli.py renames a temporary file over a target; data.py keeps its own cache write, as it
    copies out alone."""
    renames = {os.path.relpath(p, ROOT): calls_of(p, "os", {"replace", "rename"}) for p in SOURCES}
    assert {p for p, lines in renames.items() if lines} <= {"cli.py", "data.py"}


def test_the_resume_state_is_written_and_read_in_train_py_alone():
    """The keys only continuing a run reads are saved and restored side by side, in train.py; runs.py
    also reads "stopping", for why a run ended early (compare.py's status), and writes none of them."""

    def users(keys):
        return {
            os.path.relpath(p, ROOT)
            for p in SOURCES
            for n in ast.walk(ast.parse(open(p).read()))
            if isinstance(n, ast.Constant) and n.value in keys
        }

    assert users({"optimizer", "ema_steps", "scaler"}) == {"train.py"}
    assert users({"stopping"}) == {"train.py", "runs.py"}


def test_the_readme_file_table_names_every_module():
    """Every top-level .py file appears in the README's table of files, and nothing else does."""
    text = open(os.path.join(ROOT, "README.md")).read()
    table = text[text.index("## Files") :].split("\n## ")[0]
    named = set(re.findall(r"`([a-z_]+\.py)`", table))
    assert named == {os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "*.py"))}


USER_FILES = ["README.md", "data/README.md"] + [os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "*.py"))]


@pytest.mark.parametrize("name", USER_FILES)
def test_user_facing_files_speak_of_the_tool_only(name):
    """No path outside the repository, and nothing about where or how the toolkit was developed."""
    text = open(os.path.join(ROOT, name)).read()
    for phrase in ("../shared", "shared/datasets", r"\blent\b", "development (box|machine)", "shared machine"):
        assert not re.search(phrase, text, re.IGNORECASE), f"{name}: {phrase}"


def test_readme_is_a_short_guide_whose_links_resolve():
    text = open(os.path.join(ROOT, "README.md")).read()
    assert len(text.splitlines()) <= 250
    assert 'python -m pytest -q -m "not slow"' in text and "python -m pytest -q" in text
    for target in re.findall(r"\]\(([^)#]+)", text):
        assert os.path.exists(os.path.join(ROOT, target)), target
    for recipe in re.findall(r"@(recipes/[a-z0-9.-]+\.args)", text):
        assert os.path.exists(os.path.join(ROOT, recipe)), recipe


def test_ci_runs_the_readme_test_command():
    assert "python -m pytest -q" in open(os.path.join(ROOT, ".ci", "run")).read()


def test_results_report_holds_the_tables_the_ledgers_write(tmp_path, capsys):
    """Rebuilding both tables from the recorded runs leaves results/README.md exactly as it is."""
    results = os.path.join(ROOT, "results")
    for name in ("README.md", "reproduce.json", "top.json"):
        shutil.copy(os.path.join(results, name), tmp_path / name)
    for script in ("reproduce", "top"):
        code, _, err = run_script(script, ["--table", "--results", str(tmp_path)], capsys)
        assert code == 0, err
        assert (tmp_path / f"{script}.md").read_text() == open(os.path.join(results, f"{script}.md")).read()
    assert (tmp_path / "README.md").read_text() == open(os.path.join(results, "README.md")).read()


def closed_pipe(args):
    """Run a command whose stdout is a pipe nobody reads: its first write meets a closed pipe."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run(
            [sys.executable, *args], cwd=ROOT, stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=120
        )
    finally:
        os.close(write_end)


# Every command prints through cli.run, which handles the closed pipe; these stand for the rest.
@pytest.mark.parametrize("args", [["models.py"], pytest.param(["predict.py", "DIGIT"], marks=pytest.mark.slow)])
def test_commands_exit_quietly_when_their_output_pipe_closes(args, tmp_path):
    if "DIGIT" in args:
        from PIL import Image, ImageDraw

        image = Image.new("L", (64, 64), 255)
        ImageDraw.Draw(image).line([(32, 8), (32, 56)], fill=0, width=6)  # a one
        args = [str(tmp_path / "one.png") if a == "DIGIT" else a for a in args]
        image.save(args[-1])
    result = closed_pipe(args)
    assert result.returncode == 0 and not result.stderr, result.stderr


@pytest.mark.slow
def test_training_stops_when_its_output_pipe_closes(synth_data, tmp_path):
    out = str(tmp_path / "run")
    result = closed_pipe(
        ["train.py", "--model", "fast", "--epochs", "1", "--data-dir", synth_data, "--out", out, "--progress", "off"]
    )
    assert result.returncode == 141 and "Traceback" not in result.stderr, result.stderr
    assert f"Continue with: python train.py --resume {out}" in result.stderr
    # stopped inside epoch 1, before its first save: args.json lets --resume start it again
    assert os.path.exists(os.path.join(out, "args.json")) and not os.path.exists(os.path.join(out, "last.pt"))
