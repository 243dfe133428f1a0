"""Bad input ends in one line naming the file, row or value, and exit status 2 (README's promise).

Each case runs the real command line in-process (``steel.cli.main``) on tiny fixtures made in tmp_path:
empty files, paths that are files or missing, output folders that hold data, corrupt images and
checkpoints, configs that LightningCLI rejects. Valid odd inputs (header-only CSV, PNG named .jpg, RGB
JPEG) must work. Nothing here trains a model.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest

from steel.cli import main
from tests.conftest import SYNTH_SHAPE

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "experiments" / "tiny.yaml")


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A 12-image synthetic data set (64x320) with its 2-fold CSV, copied by every case."""
    root = tmp_path_factory.mktemp("bad_input")
    assert main(["synth", str(root / "data"), "--n-train", "12", "--n-test", "4", "--seed", "5",
                 "--height", str(SYNTH_SHAPE[0]), "--width", str(SYNTH_SHAPE[1])]) == 0  # fmt: skip
    assert main(["folds", str(root / "data"), "--n-folds", "2", "--out", str(root / "folds.csv")]) == 0
    return root


@pytest.fixture
def w(base, tmp_path, monkeypatch) -> Path:
    """A working dir (the cwd) holding data/ and folds.csv copied from ``base``."""
    shutil.copytree(base / "data", tmp_path / "data")
    shutil.copy(base / "folds.csv", tmp_path / "folds.csv")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def first_image(d: Path, split: str = "train_images") -> Path:
    return sorted((d / "data" / split).iterdir())[0]


def truncate(p: Path) -> Path:
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    return p


def shrink(p: Path) -> Path:
    """Re-save an image one row shorter (63x320 among 64x320 images)."""
    img = cv2.imread(str(p), cv2.IMREAD_GRAYSCALE)
    cv2.imwrite(str(p), img[:-1])
    return p


def fit(*extra: str) -> list[str]:
    return ["fit", "--config", TINY, "--data.data_dir", "data", "--data.folds_csv", "folds.csv",
            "--trainer.logger", "false", "--run_dir", "runs/r/fold-0", *extra]  # fmt: skip


def fake_run(d: Path, bad: str = "junk\n") -> Path:
    """A run dir whose fold-0 and fold-1 best.ckpt hold ``bad`` (not a checkpoint)."""
    run = d / "run"
    for k in (0, 1):
        (run / f"fold-{k}").mkdir(parents=True)
        (run / f"fold-{k}" / "best.ckpt").write_text(bad)
    shutil.copy(d / "folds.csv", run / "folds.csv")
    (run / "config.yaml").write_text(f"data:\n  data_dir: {d / 'data'}\n")
    return run


@dataclass
class Case:
    id: str
    setup: Callable[[Path], list[str]]  # prepares the case in the working dir, returns the argv
    names: str  # what the one error line must contain (formatted with w=working dir)


CASES = [
    # ---- steel synth
    Case("synth-into-file", lambda d: (d / "f").write_text("x") and ["synth", "f"], "f: is a file"),
    Case("synth-into-data", lambda d: ["synth", "data", "--n-train", "3"], "data: holds data already"),
    Case(
        "synth-overwrite-foreign",
        lambda d: (
            (d / "data" / "notes.txt").write_text("mine")
            and ["synth", "data", "--n-train", "3", "--overwrite"]
        ),
        "data/notes.txt: not part of",
    ),  # fmt: skip
    Case("synth-negative-n", lambda d: ["synth", "new", "--n-train", "-1"], "--n-train -1"),
    # ---- steel folds (every reader of train.csv and train_images/)
    Case("folds-missing-dir", lambda d: ["folds", "nope"], "nope: not found"),
    Case("folds-dir-is-file", lambda d: (d / "f").write_text("x") and ["folds", "f"], "f: is a file"),
    Case(
        "folds-empty-csv",
        lambda d: (d / "data/train.csv").write_text("") or ["folds", "data"],
        "data/train.csv: empty file",
    ),  # fmt: skip
    Case(
        "folds-blank-csv",
        lambda d: (d / "data/train.csv").write_text("\n\n") and ["folds", "data"],
        "data/train.csv: empty file",
    ),  # fmt: skip
    Case(
        "folds-binary-csv",
        lambda d: (d / "data/train.csv").write_bytes(bytes(range(128, 256))) and ["folds", "data"],
        "data/train.csv: not a readable CSV",
    ),  # fmt: skip
    Case(
        "folds-csv-is-dir",
        lambda d: (d / "data/train.csv").unlink() or (d / "data/train.csv").mkdir() or ["folds", "data"],
        "data/train.csv: is a directory",
    ),  # fmt: skip
    Case(
        "folds-wrong-columns",
        lambda d: (d / "data/train.csv").write_text("a,b,c\n1,2,3\n") and ["folds", "data"],
        "data/train.csv: missing column 'ImageId'",
    ),  # fmt: skip
    Case(
        "folds-extra-field-line-2",
        lambda d: (
            (d / "data/train.csv").write_text(
                f"ImageId,ClassId,EncodedPixels\n{first_image(d).name},1,1 3,9\n"
            )
            and ["folds", "data"]
        ),
        "data/train.csv: line 2: more fields",
    ),  # fmt: skip
    Case(
        "folds-extra-field-line-3",
        lambda d: (
            (d / "data/train.csv").write_text(
                f"ImageId,ClassId,EncodedPixels\n{first_image(d).name},1,1 3\n{first_image(d).name},2,1 3,9\n"
            )
            and ["folds", "data"]
        ),
        "line 3",
    ),  # fmt: skip
    Case(
        "folds-bad-class",
        lambda d: (
            (d / "data/train.csv").write_text(f"ImageId,ClassId,EncodedPixels\n{first_image(d).name},7,1 3\n")
            and ["folds", "data"]
        ),
        "data/train.csv: line 2: class '7'",
    ),  # fmt: skip
    Case(
        "folds-bad-rle",
        lambda d: (
            (d / "data/train.csv").write_text(f"ImageId,ClassId,EncodedPixels\n{first_image(d).name},1,5 x\n")
            and ["folds", "data"]
        ),
        "data/train.csv: line 2: RLE",
    ),  # fmt: skip
    Case(
        "folds-unknown-image",
        lambda d: (
            (d / "data/train.csv").write_text("ImageId,ClassId,EncodedPixels\nzzz.jpg,1,1 3\n")
            and ["folds", "data"]
        ),
        "data/train.csv: line 2: image zzz.jpg",
    ),  # fmt: skip
    Case(
        "folds-no-images-dir",
        lambda d: shutil.rmtree(d / "data/train_images") or ["folds", "data"],
        "data/train_images: image directory not found",
    ),  # fmt: skip
    Case(
        "folds-odd-first-image",
        lambda d: shrink(first_image(d)) and ["folds", "data"],
        "{first}: image is 63x320, but 11 of the 12 images are 64x320",
    ),  # fmt: skip
    Case(
        "folds-truncated-jpeg", lambda d: truncate(first_image(d)) and ["folds", "data"], "{first}: truncated"
    ),  # fmt: skip
    Case("folds-empty-image", lambda d: first_image(d).write_bytes(b"") or ["folds", "data"], "{first}: "),
    Case(
        "folds-out-is-dir",
        lambda d: (d / "o").mkdir() or ["folds", "data", "--n-folds", "2", "--out", "o"],
        "o: is a directory",
    ),  # fmt: skip
    Case("folds-one-fold", lambda d: ["folds", "data", "--n-folds", "1"], "--n-folds 1"),
    # ---- steel score
    Case(
        "score-empty-submission",
        lambda d: (
            (d / "s.csv").write_text("")
            or ["score", "s.csv", "--truth", "data/test_truth.csv", "--images", "data/test_images"]
        ),
        "s.csv: empty file",
    ),  # fmt: skip
    Case(
        "score-missing-submission",
        lambda d: ["score", "s.csv", "--truth", "data/test_truth.csv", "--images", "data/test_images"],
        "s.csv: file not found",
    ),  # fmt: skip
    Case(
        "score-header-only",
        lambda d: (
            (d / "s.csv").write_text("ImageId,EncodedPixels,ClassId\n")
            and ["score", "s.csv", "--truth", "data/test_truth.csv", "--images", "data/test_images"]
        ),
        "s.csv: 0 rows, expected 16",
    ),  # fmt: skip
    Case(
        "score-empty-truth",
        lambda d: (
            (d / "data/test_truth.csv").write_text("")
            or [
                "score",
                "data/sample_submission.csv",
                "--truth",
                "data/test_truth.csv",
                "--images",
                "data/test_images",
            ]
        ),
        "data/test_truth.csv: empty file",
    ),  # fmt: skip
    Case(
        "score-no-images",
        lambda d: (
            (d / "e").mkdir()
            or ["score", "data/sample_submission.csv", "--truth", "data/test_truth.csv", "--images", "e"]
        ),
        "e: no images",
    ),  # fmt: skip
    Case(
        "score-truncated-image",
        lambda d: (
            truncate(first_image(d, "test_images"))
            and [
                "score",
                "data/sample_submission.csv",
                "--truth",
                "data/test_truth.csv",
                "--images",
                "data/test_images",
            ]
        ),
        "{first_test}: truncated",
    ),  # fmt: skip
    # ---- steel oof: every checkpoint is opened before anything is predicted
    Case("oof-text-checkpoint", lambda d: fake_run(d) and ["oof", "run"], "run/fold-0/best.ckpt: not a"),
    Case("oof-empty-checkpoint", lambda d: fake_run(d, "") and ["oof", "run"], "run/fold-0/best.ckpt: "),
    # ---- steel advval
    Case(
        "advval-truncated-test-image",
        lambda d: (
            truncate(first_image(d, "test_images")) and ["advval", "data", "--n-splits", "2", "--out", "a"]
        ),
        "{first_test}: truncated",
    ),
    Case("advval-missing-dir", lambda d: ["advval", "nope", "--n-splits", "2", "--out", "a"], "nope"),
    # ---- steel demo
    Case("demo-out-is-file", lambda d: (d / "f").write_text("x") and ["demo", "--out", "f"], "f: is a file"),
]


def _format(names: str, d: Path) -> str:
    return names.format(
        first=first_image(d).relative_to(d), first_test=first_image(d, "test_images").relative_to(d)
    )


PROGRESS = re.compile(r"\| *\d+/\d+ \[")  # a tqdm bar: "desc:  75%|███  | 12/16 [00:00<00:00, ...]"


def check_one_line(code: int, err: str, names: str) -> str:
    """Exit status 2 and exactly one stderr line besides progress bars, ``steel CMD: error: ...``, containing
    ``names``."""
    lines = [line for line in err.splitlines() if line.strip() and not PROGRESS.search(line)]
    assert code == 2, err
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    assert lines[0].startswith("steel ") and ": error: " in lines[0], lines[0]
    assert names in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line(case: Case, w: Path, capsys):
    names = _format(case.names, w)  # before setup: it may change which image is first
    argv = case.setup(w)
    capsys.readouterr()
    code = main(argv)
    check_one_line(code, capsys.readouterr().err, names)


def test_odd_first_image_blames_it_in_fit_too(w, capsys):
    """`steel folds` on data whose first image is odd, then `steel fit`: both name the odd image."""
    odd = shrink(first_image(w)).relative_to(w)
    capsys.readouterr()
    check_one_line(
        main(["folds", "data", "--n-folds", "2", "--out", "f2.csv"]), capsys.readouterr().err, str(odd)
    )
    code = main(fit())
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("steel fit")]
    assert code == 2 and err and f"{odd}: image is 63x320" in err[0], err


def test_synth_overwrite_replaces_the_whole_data_set(w, capsys):
    old = {p.name for p in (w / "data" / "train_images").iterdir()}
    assert main(["synth", "data", "--n-train", "3", "--n-test", "1", "--seed", "9", "--overwrite",
                 "--height", "32", "--width", "64"]) == 0  # fmt: skip
    new = {p.name for p in (w / "data" / "train_images").iterdir()}
    assert len(new) == 3 and not (new & old)
    listed = {line.split(",")[0] for line in (w / "data" / "train.csv").read_text().splitlines()[1:]}
    assert listed <= new
    assert sorted(p.name for p in w.iterdir() if p.name.startswith(".")) == []  # no temp dir left


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(
            lambda d: (d / "data/train.csv").write_text("ImageId,ClassId,EncodedPixels\n"), id="header-only"
        ),
        pytest.param(
            lambda d: (
                cv2.imwrite(str(first_image(d)) + ".tmp.png", cv2.imread(str(first_image(d))))
                and Path(str(first_image(d)) + ".tmp.png").replace(first_image(d))
            ),
            id="png-named-jpg",
        ),  # fmt: skip
        pytest.param(
            lambda d: cv2.imwrite(str(first_image(d)), np.dstack([cv2.imread(str(first_image(d)), 0)] * 3)),
            id="rgb-jpeg",
        ),  # fmt: skip
    ],
)
def test_valid_odd_inputs_work(make, w, capsys):
    make(w)
    assert main(["folds", "data", "--n-folds", "2", "--out", "f2.csv"]) == 0, capsys.readouterr().err
    from steel.images import read_grey

    img = read_grey(first_image(w))
    assert img.dtype == np.uint8 and img.shape == SYNTH_SHAPE


FIT_CASES = [
    Case("fit-misspelled-key", lambda d: fit("--modle.lr", "3"), "--modle.lr"),
    Case(
        "fit-misspelled-key-in-config",
        lambda d: (d / "typo.yaml").write_text("model:\n  lrr: 0.1\n") and fit("--config", "typo.yaml"),
        "model.lrr",
    ),  # fmt: skip
    Case("fit-bad-value", lambda d: fit("--model.lr", "abc"), "model.lr"),
    Case("fit-missing-config", lambda d: fit("--config", "nope.yaml"), "nope.yaml"),
    Case("fit-fold-99", lambda d: fit("--data.fold", "99"), "fold 99"),
    Case("fit-unknown-encoder", lambda d: fit("--model.encoder", "nosuch"), "nosuch"),
    Case(
        "fit-empty-train-csv",
        lambda d: (d / "data/train.csv").write_text("") or fit(),
        "data/train.csv: empty",
    ),
    Case("fit-empty-folds-csv", lambda d: (d / "folds.csv").write_text("") or fit(), "folds.csv: empty"),
    Case("fit-config-is-dir", lambda d: fit("--config", "data"), "data: is a directory"),
    Case(
        "fit-empty-config",
        lambda d: (d / "e.yaml").write_text("") or fit("--config", "e.yaml"),
        "e.yaml: empty",
    ),
    Case(
        "fit-config-not-yaml",
        lambda d: (d / "b.yaml").write_text("model: [1, 2\n") and fit("--config", "b.yaml"),
        "b.yaml: line 2: not valid YAML",
    ),
    Case("fit-bad-logger", lambda d: fit("--trainer.logger", "NoSuchLogger"), "NoSuchLogger"),
    Case("fit-negative-epochs", lambda d: fit("--trainer.max_epochs", "-5"), "-5"),
    Case(
        "fit-resume-missing-checkpoint",
        lambda d: fit("--ckpt_path", "nope.ckpt"),
        "nope.ckpt: checkpoint not found",
    ),
    Case(
        "validate-text-checkpoint",
        lambda d: (d / "best.ckpt").write_text("junk") and ["validate", *fit("--ckpt_path", "best.ckpt")[1:]],
        "best.ckpt: not a readable checkpoint",
    ),
    Case(
        "fit-folds-csv-is-dir",
        lambda d: (d / "folds.csv").unlink() or (d / "folds.csv").mkdir() or fit(),
        "folds.csv: is a directory",
    ),  # fmt: skip
]


@pytest.mark.parametrize("case", FIT_CASES, ids=[c.id for c in FIT_CASES])
def test_fit_bad_input_is_one_line_and_leaves_no_run_dir(case: Case, w: Path, capsys):
    argv = case.setup(w)
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    check_one_line(code, err, case.names)
    assert not (w / "runs").exists(), sorted(map(str, (w / "runs").rglob("*")))


class _Raises:
    """A dataset whose item 0 raises a SteelError (as a corrupt image would in a DataLoader worker)."""

    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int):
        from steel.errors import SteelError

        raise SteelError("data/train_images/x.jpg: truncated or corrupt JPEG")


def test_error_from_a_dataloader_worker_is_one_line():
    """PyTorch re-raises a worker's SteelError with the worker's traceback in its message; the CLI line is
    the original message alone."""
    from torch.utils.data import DataLoader

    from steel.cli import one_line
    from steel.errors import SteelError

    with pytest.raises(SteelError) as e:
        next(iter(DataLoader(_Raises(), num_workers=1)))
    assert "Traceback" in str(e.value)  # what PyTorch hands back
    assert one_line(str(e.value)) == "data/train_images/x.jpg: truncated or corrupt JPEG"


def test_oof_opens_every_checkpoint_before_predicting(w, capsys):
    """fold 0 is a checkpoint of the right split, fold 1 is not: the error names fold 1 and nothing is written."""
    import torch

    from steel.rundir import SPLIT_KEY, split_of

    run = fake_run(w)
    torch.save({"state_dict": {}, SPLIT_KEY: split_of(run / "folds.csv", 0)}, run / "fold-0" / "best.ckpt")
    capsys.readouterr()
    check_one_line(
        main(["oof", "run"]), capsys.readouterr().err, "run/fold-1/best.ckpt: not a readable checkpoint"
    )
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml", "fold-0", "fold-1", "folds.csv"]
