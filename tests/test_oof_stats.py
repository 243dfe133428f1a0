"""OOF statistics and the exact threshold solver against brute force (``steel.postprocess`` + Dice on the same
store), and thresholds tuned at stride 2 checked at full resolution (issue 10, item 4)."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from steel import oof_stats
from steel.oof import OOFStore
from steel.oof_stats import LevelComponents, compute_stats, image_levels, level_index, load_or_compute_stats
from steel.postprocess import ClassParams, Params, pixel_thresholds
from steel.sweep_config import load_config, scale_grid, sweep_grids
from steel.sweep_solver import (
    Evaluator,
    Folds,
    brute_force_dice,
    grid_candidates,
    objective_value,
    scaled_candidates,
    solve,
    top_k,
)
from steel.synth import write_synthetic_oof


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> OOFStore:
    """64 synthetic images of 64x320 at stride 2 (drawn at the strided size: no full-resolution data), 3 folds."""
    root = tmp_path_factory.mktemp("stats")
    write_synthetic_oof(root / "oof", 64, height=64, width=320, stride=2, n_folds=3, seed=5)
    return OOFStore(root / "oof")


def small_config(tmp_path: Path, mode: str = "hard", objective: str = "mean"):
    f = tmp_path / "small.yaml"
    f.write_text(
        f"mode: {mode}\nobjective: {objective}\nspace:\n"
        "  label: {low: 0.3, high: 0.75, step: 0.15}\n  pixel: {low: 0.35, high: 0.65, step: 0.15}\n"
        "  min_area: {low: 0, high: 300, step: 100}\n  min_component: {low: 0, high: 100, step: 50}\n"
        "  scale: {low: 0, high: 1.2, step: 1.2}\n"
    )
    return load_config(f)


def random_params(cfg, rng, mode) -> Params:
    keys = Params(mode=mode).keys()
    out = []
    for dims in cfg["dims"]:
        out.append(
            ClassParams(**{k: d.values()[int(rng.integers(d.n))] for k, d in dims.items() if k in keys})
        )
    return Params(tuple(out), mode)


def all_stats(store: OOFStore, cfg, mode: str, **kw) -> list:
    """The statistics of every scale of the config (one in hard and soft mode)."""
    return [
        compute_stats(store, *sweep_grids(cfg), mode, scale=s, progress=False, **kw) for s in scale_grid(cfg)
    ]


@pytest.mark.parametrize("mode", ["hard", "soft", "scaled"])
def test_statistics_equal_brute_force(store, mode):
    cfg = load_config(None)
    cfg["mode"] = mode
    stats = all_stats(store, cfg, mode, chunk=16)
    assert [s.scale for s in stats] == ([0.0, 0.5, 1.0, 1.5] if mode == "scaled" else [0.0])
    assert not stats[0].full_res and stats[0].kept_area.shape == (4, 9, 7, 64)
    ev = Evaluator(stats, store, bound=1000, base=[0.3] * 4)  # at or above 0.3: labelled on packed components
    rng = np.random.default_rng(0)
    comp_active = area_active = 0
    for _ in range(60):
        p = random_params(cfg, rng, mode)
        f = ev.per_pair(p)
        assert np.abs(f - brute_force_dice(store, p)).max() <= 1e-9
        no_comp = Params(tuple(ClassParams(c.label, c.pixel, c.min_area, 0) for c in p.classes), mode)
        no_area = Params(tuple(ClassParams(c.label, c.pixel, 0, c.min_component) for c in p.classes), mode)
        comp_active += not np.array_equal(ev.per_pair(no_comp), f)
        area_active += not np.array_equal(ev.per_pair(no_area), f)
    assert comp_active > 20 and area_active > 20  # components and min-area really change the result
    # off the grid: any pixel threshold through the histograms, any component size by labelling on demand
    for p in (Params.uniform(0.4, 0.123, 300, 0, mode), Params.uniform(0.45, 0.777, 0, 0, mode),
              Params.uniform(0.35, 0.456, 100, 73, mode), Params.uniform(0.5, 0.61, 0, 230, mode),
              Params.uniform(0.5, 0.25, 0, 120, mode)):  # fmt: skip
        if mode == "scaled":  # at a scale of the grid
            p = Params(tuple(ClassParams(**{**c.__dict__, "scale": 1.0}) for c in p.classes), mode)
        assert np.abs(ev.per_pair(p) - brute_force_dice(store, p)).max() <= 1e-9
    if mode == "scaled":  # a scale without statistics is refused, not guessed
        with pytest.raises(ValueError, match="no statistics for mode scaled scale 0.7"):
            ev.per_pair(Params((ClassParams(scale=0.7),) * 4, "scaled"))


@pytest.mark.parametrize("mode", ["hard", "soft", "scaled"])
def test_components_on_packed_strips_equal_labelling_the_planes(store, mode):
    """A threshold at or above the base is labelled on the base's components cut out and packed: the same
    components as labelling every plane at that threshold."""
    stats = compute_stats(store, np.array([0.5]), np.array([0.0]), mode, progress=False, scale=1.5)
    direct = LevelComponents(store, stats, mode, bound=1e9)
    packed = LevelComponents(store, stats, mode, bound=1e9, workers=2, base=[0.3, 0.32, 0.3, 0.4])
    for c, pixel in itertools.product(range(4), (0.4, 0.5, 0.577, 0.7, 0.9)):
        a, b = direct.get(c, pixel), packed.get(c, pixel)
        for m in (0, 5, 17, 60, 1e9):
            assert all(np.array_equal(x, y) for x, y in zip(a.kept(m, 4), b.kept(m, 4)))
        assert sorted(zip(a.image, a.size, a.size_inter)) == sorted(zip(b.image, b.size, b.size_inter))
    assert set(packed._strips) == {0, 1, 2, 3} and not direct._strips  # the packed path was taken


def test_level_index_matches_thresholding():
    prob = np.arange(256, dtype=np.float32) / np.float32(255.0)  # as OOFStore / postprocess dequantise
    pix = np.array([0.0, 0.3, 0.5, 0.55, 0.6, 1 / 3, 0.7, 1.0])
    for t, i in zip(pix, level_index(pix)):
        assert (prob >= np.float32(t)).argmax() == i and (prob[i:] >= np.float32(t)).all()
    cls = np.array([[0.0, 0.3, 0.55, 1.0]], np.float32)
    soft = level_index(pix, cls)
    for c, (j, t) in itertools.product(range(4), enumerate(pix)):
        assert soft[0, c, j] == int(((prob * cls[0, c]) < np.float32(t)).sum())
    assert np.array_equal(image_levels(pix, cls, "soft"), soft)
    assert np.array_equal(image_levels(pix, cls, "hard"), np.broadcast_to(level_index(pix), soft.shape))
    assert np.array_equal(image_levels(pix, cls, "scaled", 0.0), image_levels(pix, cls, "hard"))
    scaled = image_levels(pix, cls, "scaled", 1.5)  # prob >= pixel * (1 + 1.5 * (0.5 - cls))
    for c, (j, t) in itertools.product(range(4), enumerate(pix)):
        assert scaled[0, c, j] == int((prob < pixel_thresholds(t, cls[0, c], 1.5)).sum())
    # cls 0.3 raises the threshold 0.3 to 0.3 * 1.3 = 0.39: levels 0..99 (99 / 255 = 0.388) are below it
    assert scaled[0, 1, 1] == 100 and scaled[0, 3, 6] == int(np.ceil(0.7 * 0.25 * 255))


@pytest.mark.parametrize("mode", ["hard", "soft", "scaled"])
def test_exact_solver_equals_brute_force_on_every_grid_point(store, tmp_path, mode):
    """Every (pixel, component, label, min-area[, scale]) point of a small grid, brute-forced with
    steel.postprocess: the solver's Dice sums per point and fold agree to 1e-9, and its choice is the
    brute-force best."""
    cfg = small_config(tmp_path, mode)
    stats = all_stats(store, cfg, mode)
    folds = Folds.of(store.folds)
    cands = [scaled_candidates(stats, c, cfg["dims"][c], folds) for c in range(4)]
    assert len(cands[0].sums) == 3 * 3 * 4 * 4 * (2 if mode == "scaled" else 1)
    brute = np.zeros((4, len(cands[0].sums), folds.n))
    for m in range(len(cands[0].sums)):  # the same point for all 4 classes: one postprocess pass each
        d = brute_force_dice(store, Params(tuple(c.params(m) for c in cands), mode))
        for c in range(4):
            brute[c, m] = np.bincount(folds.index, weights=d[:, c], minlength=folds.n)
    for c in range(4):
        assert np.abs(cands[c].sums - brute[c]).max() <= 1e-9
    best = solve(cands, folds, "mean")
    for c, m in enumerate(best.choice):
        assert brute[c, m].sum() >= brute[c].sum(1).max() - 1e-9
    params = Params(tuple(c.params(m) for c, m in zip(cands, best.choice)), mode)
    assert abs(best.value - brute_force_dice(store, params).mean()) <= 1e-9
    assert [c.sums.sum(1)[top_k(c, 3)[0]] for c in cands] == [c.sums.sum(1).max() for c in cands]


def test_robust_objective_coordinate_ascent(store, tmp_path):
    """robust = fold mean - k * fold std of per-image Dice: the value of the solver's choice equals brute force,
    no single class can improve it, and on a grid small enough to enumerate it is the global optimum."""
    cfg = small_config(tmp_path, "hard", "robust")
    stats = compute_stats(store, *sweep_grids(cfg), "hard", progress=False)
    folds = Folds.of(store.folds)
    cands = [grid_candidates(stats, c, cfg["dims"][c], folds) for c in range(4)]
    sol = solve(cands, folds, "robust", 2.0)
    params = Params(tuple(c.params(m) for c, m in zip(cands, sol.choice)), "hard")
    d = brute_force_dice(store, params).mean(1)
    fold_means = np.array([d[store.folds == f].mean() for f in np.unique(store.folds)])
    assert abs(sol.value - (fold_means.mean() - 2.0 * fold_means.std())) <= 1e-9
    total = sum(c.sums[m] for c, m in zip(cands, sol.choice))
    for ci, c in enumerate(cands):  # coordinate-wise optimal
        others = total - c.sums[sol.choice[ci]]
        assert objective_value(c.sums + others, folds, "robust", 2.0).max() <= sol.value + 1e-12
    # global optimum over 12^4 combinations of a sub-grid (pixel x label, min-area 0, no components)
    sub = [np.flatnonzero((c.min_area == 0) & (c.min_component == 0)) for c in cands]
    sums = [c.sums[s] for c, s in zip(cands, sub)]
    total4 = sums[0][:, None, None, None] + sums[1][None, :, None, None] + sums[2][None, None, :, None]
    total4 = total4 + sums[3][None, None, None, :]
    best_all = objective_value(total4, folds, "robust", 2.0).max()
    sub_cands = [
        type(c)(c.sums[s], c.pixel[s], c.min_component[s], c.label[s], c.min_area[s])
        for c, s in zip(cands, sub)
    ]
    assert abs(solve(sub_cands, folds, "robust", 2.0).value - best_all) <= 1e-12


def test_statistics_cache_and_threads(store, monkeypatch):
    pixel, comp = np.array([0.4, 0.6]), np.array([0.0, 100.0])
    stats, path = load_or_compute_stats(store, pixel, comp, "hard", progress=False)
    assert path.parent == store.dir and path.name.startswith("stats-") and path.suffix == ".npz"
    par = compute_stats(store, pixel, comp, "hard", workers=2, chunk=10, progress=False)
    for k in ("kept_area", "kept_inter", "ge_all", "ge_true"):
        assert np.array_equal(getattr(stats, k), getattr(par, k))

    def boom(*a, **k):
        raise AssertionError("recomputed although cached")

    monkeypatch.setattr(oof_stats, "compute_stats", boom)
    again, path2 = load_or_compute_stats(store, pixel, comp, "hard", progress=False)
    assert path2 == path and np.array_equal(again.kept_area, stats.kept_area)
    with pytest.raises(AssertionError, match="recomputed"):  # another grid is another cache file
        load_or_compute_stats(store, np.array([0.45]), comp, "hard", progress=False)


# ------------------------------------------------------------------------------------ stride (issue 10)
@pytest.fixture(scope="module")
def stride_pair(tmp_path_factory) -> tuple[OOFStore, OOFStore]:
    """The same full-resolution synthetic maps (96x480, with 1-px vertical scratches for class 2) written at
    stride 1 and at stride 2, as ``steel oof`` writes them (the writer takes every 2nd pixel)."""
    root = tmp_path_factory.mktemp("stride")
    for s in (1, 2):
        write_synthetic_oof(root / f"s{s}", 160, 96, 480, s, n_folds=3, seed=5, full_res=True, thin_lines=0.6)
    return OOFStore(root / "s1"), OOFStore(root / "s2")


def tune(store: OOFStore, cfg) -> tuple[Params, float]:
    stats = compute_stats(store, *sweep_grids(cfg), cfg["mode"], progress=False)
    folds = Folds.of(stats.folds)
    cands = [grid_candidates(stats, c, cfg["dims"][c], folds) for c in range(4)]
    sol = solve(cands, folds)
    return Params(tuple(c.params(m) for c, m in zip(cands, sol.choice)), cfg["mode"]), sol.value


def test_stride2_thresholds_hold_at_full_resolution(stride_pair):
    full, strided = stride_pair
    area = np.asarray(full.truth[:, 1]).sum((1, 2))
    seen = 4 * np.asarray(strided.truth[:, 1]).sum((1, 2))  # stride-2 pixels count 4 full-resolution ones
    assert (np.abs(seen - area) > 0.5 * area).sum() >= 5  # 1-px scratches: gone or doubled at stride 2
    assert strided.full_hist is not None  # the writer got full-resolution maps: it kept their histograms
    cfg = load_config(None)
    params, oof_dice = tune(strided, cfg)
    applied = brute_force_dice(full, params).mean()  # as export / predict apply them: full resolution
    assert abs(oof_dice - applied) <= 0.002, (oof_dice, applied)
    # the same store without the full-resolution histograms: areas of a stride-2 map, off by more
    strided.full_hist = None
    naive, naive_dice = tune(strided, cfg)
    assert abs(naive_dice - brute_force_dice(full, naive).mean()) > 0.002


def test_full_resolution_statistics_exact_without_component_removal(stride_pair):
    full, strided = stride_pair
    stats = compute_stats(OOFStore(strided.dir), np.array([0.35, 0.5, 0.65]), np.array([0.0]), progress=False)
    assert stats.full_res
    ev = Evaluator(stats)
    rng = np.random.default_rng(1)
    for _ in range(10):
        p = Params(tuple(ClassParams(float(rng.choice([0.3, 0.5, 0.7])), float(rng.choice([0.35, 0.5, 0.65])),
                                     int(rng.integers(0, 6)) * 100, 0) for _ in range(4)))  # fmt: skip
        assert np.abs(ev.per_pair(p) - brute_force_dice(full, p)).max() <= 1e-9


def test_steel_oof_at_stride_2_keeps_full_resolution_histograms(tmp_path, synth_dir, folds_csv):
    """`steel oof --stride 2` (build_oof) hands the writer full-resolution maps: the store's hist.npy equals the
    level histograms of the same run's stride-1 store, and the sweep's statistics use them."""
    import torch

    from steel.oof import build_oof, level_histograms
    from tests._ensemble import make_run

    torch.set_num_threads(1)
    run = make_run(tmp_path, "run", synth_dir, folds_csv, seed=3, oof=False)
    full = OOFStore(build_oof(run, stride=1, batch_size=20, device="cpu"))
    expect = np.stack(
        [
            level_histograms(np.asarray(full.masks[i]), np.asarray(full.truth[i]) != 0)
            for i in range(len(full))
        ]
    )
    strided = OOFStore(build_oof(run, stride=2, batch_size=20, device="cpu"))
    assert strided.stride == 2 and strided.full_hist is not None
    assert np.array_equal(np.asarray(strided.full_hist), expect)
    assert compute_stats(strided, np.array([0.5]), np.array([0.0]), progress=False).full_res
