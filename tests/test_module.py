"""SteelModule: decision rule, schedules, optimisers, checkpoint loading/averaging, CLI errors."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from steel.blend import average_checkpoints
from steel.errors import SteelError
from steel.module import SteelModule, _cosine_lambda, load_model

pytest_plugins = ["tests.conftest_training"]

SMALL = {"encoder": "tu-test_resnet.r160_in1k", "arch_kwargs": {"decoder_channels": [16, 16, 8, 8, 8]}}


def test_decide_gating_rules() -> None:
    """val/dice decides like steel.postprocess: >= thresholds; soft = product AND label gate; none = no gate."""
    # pixel probs 0.6 / 0.4 in two pixels; class probs 0.7, 0.3, ~1, ~0
    probs = torch.tensor([0.6, 0.4]).view(1, 1, 1, 2).repeat(1, 4, 1, 1)
    cls = torch.tensor([[0.7, 0.3, 1.0 - 1e-6, 1e-6]])
    none = SteelModule(**SMALL, gating="none").decide(probs, cls)
    assert none[0, :, 0].tolist() == [[True, False]] * 4
    hard = SteelModule(**SMALL, gating="hard").decide(probs, cls)
    assert hard[0, :, 0].tolist() == [[True, False], [False, False], [True, False], [False, False]]
    # soft: 0.6 * 0.7 = 0.42 < 0.5 -> nothing for class 1; 0.6 * ~1 for class 3
    soft = SteelModule(**SMALL, gating="soft").decide(probs, cls)
    assert soft[0, :, 0].tolist() == [[False, False], [False, False], [True, False], [False, False]]
    soft_low = SteelModule(**SMALL, gating="soft", pixel_threshold=0.4).decide(probs, cls)
    assert soft_low[0, 0, 0].tolist() == [True, False]
    # soft keeps the label gate: 1.0 * 0.45 >= 0.4 but 0.45 < label 0.5
    gated = SteelModule(**SMALL, gating="soft", pixel_threshold=0.4).decide(
        torch.ones(1, 4, 1, 2), torch.tensor([[0.45, 0.5, 0.45, 0.5]])
    )
    assert gated[0, :, 0, 0].tolist() == [False, True, False, True]
    # a probability equal to the threshold is a defect pixel (>=), as in the sweep and the submission
    edge = SteelModule(**SMALL, gating="hard").decide(torch.full((1, 4, 1, 1), 0.5), torch.full((1, 4), 0.5))
    assert edge.all()
    with pytest.raises(SteelError, match="gating 'maybe'"):
        SteelModule(**SMALL, gating="maybe")


def test_lr_lambda_by_hand() -> None:
    f = lambda s: _cosine_lambda(s, total=110, warmup=10, min_ratio=0.0, cosine=True)  # noqa: E731
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(60) == pytest.approx(0.5) and f(110) == pytest.approx(0.0)
    assert _cosine_lambda(60, total=110, warmup=10, min_ratio=0.2, cosine=True) == pytest.approx(0.6)
    assert _cosine_lambda(80, total=110, warmup=10, min_ratio=0.0, cosine=False) == 1.0


@pytest.mark.parametrize(
    "optimizer, cls",
    [
        ("sgd", torch.optim.SGD),
        ("adam", torch.optim.Adam),
        ("adamw", torch.optim.AdamW),
        ("radam", torch.optim.RAdam),
    ],
)
def test_optimizers(optimizer: str, cls: type) -> None:
    m = SteelModule(**SMALL, optimizer=optimizer, scheduler="none", lr=0.02, weight_decay=0.001)
    opt = m.configure_optimizers()
    assert isinstance(opt, cls) and opt.defaults["lr"] == 0.02 and opt.defaults["weight_decay"] == 0.001


def test_schedulers() -> None:
    m = SteelModule(
        **SMALL, optimizer="sgd", scheduler="warmup_cosine", lr=1.0, warmup_epochs=1, min_lr_ratio=0.0
    )
    m._trainer = SimpleNamespace(estimated_stepping_batches=100, max_epochs=10)  # 10 steps an epoch
    conf = m.configure_optimizers()
    sched = conf["lr_scheduler"]["scheduler"]
    assert conf["lr_scheduler"]["interval"] == "step"
    lrs = []
    for _ in range(100):
        lrs.append(conf["optimizer"].param_groups[0]["lr"])
        conf["optimizer"].step()
        sched.step()
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0) and lrs[55] == pytest.approx(0.5)
    m = SteelModule(**SMALL, scheduler="plateau")
    conf = m.configure_optimizers()
    assert conf["lr_scheduler"]["monitor"] == "val/dice" and conf["lr_scheduler"]["scheduler"].mode == "max"


def test_bad_input_size() -> None:
    with pytest.raises(SteelError, match="input_size"):
        SteelModule(**SMALL, input_size=[64, 100])


def test_average_checkpoints(tmp_path: Path) -> None:
    torch.manual_seed(0)
    m = SteelModule(**SMALL)
    states = []
    for i in range(3):
        for p in m.parameters():
            p.data.fill_(float(i))
        states.append(
            {
                "state_dict": {k: v.clone() for k, v in m.state_dict().items()},
                "hyper_parameters": dict(m.hparams),
            }
        )
        torch.save(states[-1], tmp_path / f"{i}.ckpt")
    out = average_checkpoints([tmp_path / f"{i}.ckpt" for i in range(3)], tmp_path / "swa.ckpt")
    avg = torch.load(out, weights_only=False)["state_dict"]
    w = "net.net.segmentation_head.0.weight"
    assert torch.all(avg[w] == 1.0)  # mean of 0, 1, 2
    bn = next(k for k in avg if k.endswith("num_batches_tracked"))
    assert avg[bn].dtype == torch.long
    with pytest.raises(SteelError):
        average_checkpoints([], tmp_path / "x.ckpt")


def test_load_model_from_run(tiny_run: Path) -> None:
    model = load_model(tiny_run / "best.ckpt")
    assert isinstance(model, SteelModule) and not model.training
    assert model.hparams.encoder_weights is None and model.input_size is None
    ckpt = torch.load(tiny_run / "best.ckpt", map_location="cpu", weights_only=False)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, ckpt["state_dict"][k])
    x = torch.rand(2, 1, 64, 320)
    mask, label = model.predict_proba(x)
    assert mask.shape == (2, 4, 64, 320) and label.shape == (2, 4)
    assert 0 <= mask.min() and mask.max() <= 1
    pred = model.predict_step({"image": x, "image_id": ["a.jpg", "b.jpg"]}, 0)
    assert pred["image_id"] == ["a.jpg", "b.jpg"]
    torch.testing.assert_close(pred["mask"], mask)
    with pytest.raises(SteelError, match="checkpoint not found"):
        load_model(tiny_run / "nope.ckpt")


def test_fit_user_error_is_one_line(synth_dir: Path, tmp_path: Path) -> None:
    """Exit status 2, the error on stderr, no traceback (in this process: an uncaught exception would fail)."""
    from tests.conftest import steel_in_process
    from tests.conftest_training import TINY

    proc = steel_in_process(
        "fit",
        "--config",
        TINY,
        "--data.data_dir",
        synth_dir,
        "--data.folds_csv",
        tmp_path / "missing.csv",
        "--run_dir",
        tmp_path / "run",
        "--trainer.logger",
        "false",
        check=False,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "steel fit: error:" in proc.stderr and "missing.csv: folds file not found" in proc.stderr
    assert "Traceback" not in proc.stderr
