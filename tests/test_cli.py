from tests.conftest import run_steel


def test_help_lists_every_command():
    out = run_steel("--help").stdout
    for cmd in (
        "synth",
        "folds",
        "fit",
        "launch",
        "oof",
        "sweep",
        "blend",
        "export",
        "predict",
        "score",
        "demo",
    ):
        assert cmd in out


def test_user_mistakes_are_one_line(tmp_path):
    proc = run_steel("folds", tmp_path / "nope", check=False)
    assert (
        proc.returncode == 2
        and proc.stderr.strip()
        == f"steel folds: error: {tmp_path / 'nope'}: not found; expected a data directory with train.csv and train_images/"
    )
    proc = run_steel(
        "score", tmp_path / "x.csv", "--truth", tmp_path / "t.csv", "--images", tmp_path, check=False
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
