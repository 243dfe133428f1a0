from tests.conftest import run_steel, steel_in_process


def test_help_lists_every_command(monkeypatch):
    import re

    monkeypatch.setenv("COLUMNS", "200")  # argparse wraps help lines to the terminal width
    from steel import __version__
    from steel.cli import COMMANDS

    out = steel_in_process("--help").stdout
    # the command table: "    name   help text", one line per registered command, in registry order
    listed = re.findall(r"^    (\w+)\s{2,}(\S.*)$", out, flags=re.MULTILINE)
    assert [name for name, _ in listed] == list(COMMANDS)
    assert {name: text for name, text in listed} == {name: text for name, (_, text) in COMMANDS.items()}
    core = {
        "synth",
        "folds",
        "fit",
        "validate",
        "launch",
        "oof",
        "sweep",
        "blend",
        "export",
        "predict",
        "score",
        "demo",
    }
    assert core <= set(COMMANDS)  # the CLI contract of ARCHITECTURE.md
    assert steel_in_process("--version").stdout.strip() == f"steel {__version__}"
    bare = steel_in_process(check=False)  # no command: the same help, and exit status 2 (nothing was done)
    assert bare.returncode == 2
    assert re.findall(r"^    (\w+)\s{2,}", bare.stdout, flags=re.MULTILINE) == list(COMMANDS)


def test_user_mistakes_are_one_line(tmp_path):
    proc = run_steel("folds", tmp_path / "nope", check=False)
    assert (
        proc.returncode == 2
        and proc.stderr.strip()
        == f"steel folds: error: {tmp_path / 'nope'}: not found; expected a data directory with train.csv and train_images/"
    )
    # a missing submission, with valid truth and images: the one line names the file
    import cv2
    import numpy as np

    (tmp_path / "imgs").mkdir()
    cv2.imwrite(str(tmp_path / "imgs" / "a.jpg"), np.zeros((4, 5), np.uint8))
    (tmp_path / "t.csv").write_text("ImageId,ClassId,EncodedPixels\na.jpg,1,1 2\n")
    proc = run_steel(
        "score", tmp_path / "x.csv", "--truth", tmp_path / "t.csv", "--images", tmp_path / "imgs", check=False
    )
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"steel score: error: {tmp_path / 'x.csv'}: "), proc.stderr
