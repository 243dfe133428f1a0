"""steel blend: the ensemble OOF is the (weighted / sharpened) row-wise blend of its members' OOF stores."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from steel.blend import blend
from steel.cli import main as steel_main
from steel.ensemble import predict_batch
from steel.errors import SteelError
from steel.oof import OOFStore, OOFWriter
from tests._ensemble import one_torch_thread, save_checkpoint, tiny_runs  # noqa: F401 (autouse fixture)
from tests.conftest import run_steel


@pytest.fixture(scope="module")
def runs(tmp_path_factory, synth_dir, folds_csv):
    return tiny_runs(tmp_path_factory, synth_dir, folds_csv)


def _p(store: OOFStore) -> np.ndarray:
    return np.asarray(store.masks, dtype=np.float32) / np.float32(255)


def _expect(stores, weights, t=1.0):
    """Blend of stores in float64 (reference) -> (masks prob, cls)."""
    w = np.asarray(weights, np.float64) / np.sum(weights)
    masks = sum(wi * (np.asarray(s.masks, np.float64) / 255) ** t for wi, s in zip(w, stores))
    cls = sum(wi * np.asarray(s.cls, np.float64) ** t for wi, s in zip(w, stores))
    return masks, cls


def _check_blend(out: Path, stores, weights, t=1.0):
    got = OOFStore(out)
    ref = stores[0]
    assert got.ids == ref.ids and np.array_equal(got.folds, ref.folds) and got.stride == ref.stride
    assert np.array_equal(got.truth, ref.truth)
    masks, cls = _expect(stores, weights, t)
    # requantised: within half a level of the exact blend (ties may round either way)
    assert np.abs(got.masks.astype(np.float64) / 255 - masks).max() <= 0.5 / 255 + 1e-6
    assert np.abs(got.cls - cls).max() < 1e-6
    return got


def test_blend_is_mean_of_member_stores(runs, tmp_path):
    a, b = OOFStore(runs["a"]), OOFStore(runs["b"])
    assert np.abs(_p(a) - _p(b)).max() > 0.01  # members differ, so the mean is not trivially either
    out = blend([runs["a"], runs["b"]], tmp_path / "ens")
    got = _check_blend(out / "oof", [a, b], [1, 1])
    spec = yaml.safe_load((out / "ensemble.yaml").read_text())
    assert [m["run_dir"] for m in spec["members"]] == [str(runs["a"].resolve()), str(runs["b"].resolve())]
    assert spec["members"][0]["checkpoints"] == [
        str(runs["a"].resolve() / f"fold-{k}" / "best.ckpt") for k in range(3)
    ]
    assert spec["mode"] == "mean" and spec["weights"] == [0.5, 0.5] and spec["members"][1]["tta"] == ["none"]
    assert got.meta["members"] == [m["run_dir"] for m in spec["members"]] and got.meta["mode"] == "mean"
    assert not (out / "members").exists()  # nothing recomputed: both stores already match


def test_blend_temperature_and_weights(runs, tmp_path):
    a, b = OOFStore(runs["a"]), OOFStore(runs["b"])
    out = tmp_path / "t"
    args = [
        "blend",
        runs["a"],
        runs["b"],
        "--out",
        out,
        "--mode",
        "temperature",
        "--temperature",
        3,
        "--weights",
        "1,3",
    ]
    assert steel_main([str(a) for a in args]) == 0  # the command line, in this process
    _check_blend(out / "oof", [a, b], [1, 3], t=3.0)
    spec = yaml.safe_load((out / "ensemble.yaml").read_text())
    assert spec["mode"] == "temperature" and spec["temperature"] == 3.0 and spec["weights"] == [0.25, 0.75]
    out = blend([runs["a"], runs["b"]], tmp_path / "w", weights=[0, 1])  # weight 0: exactly member b
    assert np.array_equal(OOFStore(out).masks, b.masks)


def _fake_store(
    run: Path, src: OOFStore, rows: np.ndarray, folds: np.ndarray | None = None, stride: int | None = None
):
    """A run dir whose OOF store holds ``rows`` of ``src`` (optionally other folds / stride)."""
    s = stride or src.stride
    folds = src.folds[rows] if folds is None else folds
    with OOFWriter(run / "oof", [src.ids[i] for i in rows], folds, src.height, src.width, s, src.meta) as w:
        w.write(np.arange(len(rows)), src.cls[rows], _p(src)[rows][..., ::s, ::s] if s != src.stride else _p(src)[rows],
                np.asarray(src.truth)[rows][..., ::s, ::s] if s != src.stride else np.asarray(src.truth)[rows])  # fmt: skip
    return run


@pytest.mark.parametrize(
    "kind, match",
    [
        ("subset", r"OOF images differ: .*a has 60, .* has 59"),
        ("order", r"OOF images differ: row 0 is"),
        ("folds", r"OOF folds differ: .* is fold \d in .* but fold \d in"),
        ("stride", r"OOF stride differs: .* has 1, .* has 2"),
    ],
)
def test_blend_rejects_mismatched_members(runs, tmp_path, kind, match):
    src = OOFStore(runs["a"])
    n = len(src)
    rows = {"subset": np.arange(n - 1), "order": np.roll(np.arange(n), 1)}.get(kind, np.arange(n))
    folds = (src.folds + 1) % 3 if kind == "folds" else None
    other = _fake_store(tmp_path / "other", src, rows, folds, 2 if kind == "stride" else None)
    with pytest.raises(SteelError, match=match):
        blend([runs["a"], other], tmp_path / "ens")
    assert not (tmp_path / "ens" / "oof").exists()


def test_blend_argument_errors(runs, tmp_path, capsys):
    a, b = runs["a"], runs["b"]
    cases = [
        (dict(run_dirs=[a, b], weights=[1]), "--weights has 1 values for 2 members"),
        (dict(run_dirs=[a, b], weights=[1, -1]), "need finite values >= 0"),
        (dict(run_dirs=[a, b], temperature=2.0), "--temperature needs --mode temperature"),
        (dict(run_dirs=[a, b], mode="temperature", temperature=0.0), "must be > 0"),
        (dict(run_dirs=[a, a]), "listed twice"),
        (dict(run_dirs=[a, tmp_path / "nothing"]), "not a run dir"),
        (dict(run_dirs=[a, b], tta="none,rot90"), "unknown TTA 'rot90'"),
        (dict(run_dirs=[a, b], average_top_k=1), "need 0 \\(off\\) or >= 2"),
    ]
    for kwargs, match in cases:
        with pytest.raises(SteelError, match=match):
            blend(out=tmp_path / "ens", **kwargs)
    capsys.readouterr()
    rc = steel_main(["blend", str(a), str(b), "--out", str(tmp_path / "ens"), "--weights", "1,x"])
    assert rc == 2 and capsys.readouterr().err.strip().splitlines() == [
        "steel blend: error: --weights '1,x': expected comma-separated numbers, e.g. 1,2,1"
    ]
    with pytest.raises(SteelError, match="must not be \\(inside\\) the member run dir"):
        blend([a, b], a / "ens")
    no_oof = tmp_path / "no_oof"
    (no_oof / "fold-0").mkdir(parents=True)
    (no_oof / "fold-0" / "best.ckpt").write_bytes(b"")
    with pytest.raises(SteelError, match="no OOF store"):
        blend([a, no_oof], tmp_path / "ens")


def _check_row_is_heldout_prediction(st: OOFStore, ckpt: str, fold: int, tta: list[str]) -> None:
    """A row of a recomputed store is the TTA prediction of the fold model that held that image out."""
    import cv2

    from steel.module import load_model

    i = int(np.flatnonzero(st.folds == fold)[0])
    model = load_model(ckpt)
    img = cv2.imread(str(Path(st.meta["data_dir"]) / "train_images" / st.ids[i]), cv2.IMREAD_GRAYSCALE)
    probs, cls = predict_batch(
        model.net, torch.from_numpy(img).float().div(255)[None, None], model.input_size, tta
    )
    assert np.abs(st.masks[i].astype(np.float32) / 255 - probs[0].numpy()).max() <= 0.5 / 255 + 1e-6
    assert np.allclose(st.cls[i], cls[0].numpy(), atol=1e-6)


def test_blend_recomputes_member_oof_for_requested_tta(runs, tmp_path):
    """--tta that a member's store was not made with: its OOF is recomputed inside the ensemble dir (the
    member's own store stays as it was) and the ensemble OOF reflects exactly that TTA."""
    before = os.stat(runs["b"] / "oof" / "masks.npy").st_mtime_ns
    out = blend([runs["b"]], tmp_path / "ens", tta="hflip", device="cpu", batch_size=20)
    spec = yaml.safe_load((out / "ensemble.yaml").read_text())
    m = spec["members"][0]
    assert spec["tta"] == ["hflip"] and m["tta"] == ["hflip"] and m["oof_recomputed"]
    st = OOFStore(m["oof"])
    assert (
        st.meta["tta"] == ["hflip"] and st.dir.is_relative_to(out) and OOFStore(out).meta["tta"] == ["hflip"]
    )
    assert (
        OOFStore(runs["b"]).meta["tta"] == ["none"]
        and os.stat(runs["b"] / "oof" / "masks.npy").st_mtime_ns == before
    )
    _check_blend(out / "oof", [st], [1])
    _check_row_is_heldout_prediction(st, m["checkpoints"][2], 2, ["hflip"])


@pytest.mark.slow
def test_blend_cli_two_members_with_tta(runs, tmp_path):
    proc = run_steel(
        "blend", runs["a"], runs["b"], "--out", tmp_path / "ens", "--tta", "none,hflip", "--device", "cpu"
    )
    assert proc.stdout.count("recomputing OOF") == 2
    out = tmp_path / "ens"
    spec = yaml.safe_load((out / "ensemble.yaml").read_text())
    assert all(m["tta"] == ["none", "hflip"] and m["oof_recomputed"] for m in spec["members"])
    stores = [OOFStore(m["oof"]) for m in spec["members"]]
    _check_blend(out / "oof", stores, [1, 1])
    _check_row_is_heldout_prediction(stores[1], spec["members"][1]["checkpoints"][1], 1, ["none", "hflip"])


def test_average_top_k_member(runs, tmp_path, synth_dir, folds_csv):
    """--average-top-k 2: each fold's two topk/ checkpoints averaged into one model whose OOF is recomputed."""
    import shutil

    from steel.io import read_json, write_json

    run = tmp_path / "c"
    for k in range(3):
        shutil.copytree(runs["a"] / f"fold-{k}", run / f"fold-{k}")
        for j in range(2):
            save_checkpoint(run / f"fold-{k}" / "topk" / f"epoch{j:03d}.ckpt", 100 + 10 * k + j)
    for name in ("folds.csv", "config.yaml"):
        shutil.copyfile(runs["a"] / name, run / name)
    shutil.copytree(runs["a"] / "oof", run / "oof")  # best.ckpt are a's, so a's OOF is c's
    meta = read_json(run / "oof" / "meta.json")
    write_json(
        run / "oof" / "meta.json",
        {**meta, "checkpoints": [str(run / f"fold-{k}" / "best.ckpt") for k in range(3)]},
    )
    out = blend([run], tmp_path / "ens", average_top_k=2)
    spec = yaml.safe_load((out / "ensemble.yaml").read_text())
    ck = spec["members"][0]["checkpoints"][1]
    assert (
        Path(ck).is_relative_to(out) and spec["average_top_k"] == 2 and spec["members"][0]["oof_recomputed"]
    )
    avg = torch.load(ck, map_location="cpu", weights_only=False)["state_dict"]
    tops = [
        torch.load(p, map_location="cpu", weights_only=False)["state_dict"]
        for p in sorted((run / "fold-1" / "topk").glob("*.ckpt"))
    ]
    key = next(k for k, v in avg.items() if k.endswith("weight") and v.is_floating_point())
    assert torch.allclose(avg[key], (tops[0][key] + tops[1][key]) / 2)
    # the OOF of the averaged models, not of best.ckpt
    assert not np.array_equal(OOFStore(out).masks, OOFStore(run).masks)
    with pytest.raises(SteelError, match="top-k checkpoints in topk/, need 3"):
        blend([run], tmp_path / "ens3", average_top_k=3)


def test_reblend_drops_stale_thresholds_first_and_keeps_old_oof_until_complete(runs, tmp_path, monkeypatch):
    """A re-blend that dies while writing its oof/: the old thresholds.json / ensemble.yaml (made for the old
    blend) are already gone, the old oof/ is intact and readable, and no partial store is left behind."""
    import steel.oof
    from tests._ensemble import write_thresholds

    out = blend([runs["a"]], tmp_path / "ens")
    write_thresholds(out)
    old = OOFStore(out)
    old_masks, old_meta = np.array(old.masks), dict(old.meta)

    def crash(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(steel.oof.OOFWriter, "write", crash)
    with pytest.raises(OSError, match="disk full"):
        blend([runs["a"], runs["b"]], out)
    assert not (out / "thresholds.json").exists() and not (out / "ensemble.yaml").exists()
    kept = OOFStore(out)
    assert kept.meta == old_meta and np.array_equal(kept.masks, old_masks)
    assert sorted(p.name for p in out.iterdir()) == ["oof"]  # no .oof.partial / .oof.old
    monkeypatch.undo()
    blend([runs["a"], runs["b"]], out)
    new = OOFStore(out)
    assert new.meta["members"] == [str(runs["a"].resolve()), str(runs["b"].resolve())]
    assert np.array_equal(old_masks, np.asarray(OOFStore(runs["a"]).masks))  # old blend of a alone was a
    assert not np.array_equal(np.asarray(new.masks), old_masks)
