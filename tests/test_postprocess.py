import json

import cv2
import numpy as np
import pytest
import torch

from steel.errors import SteelError
from steel.postprocess import (
    ClassParams,
    Params,
    component_sizes_torch,
    postprocess,
    postprocess_torch,
    remove_small_components,
)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """torch on one thread while this module runs: the 2 test cores are shared, and oversubscribed intra-op
    threads make the many small run-graph ops several times slower (restored afterwards)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# One class map (6, 8): a 3x3 block (9 px), a diagonal pair (one 8-connected component of 2 px, two
# 4-connected ones) and an isolated pixel; 0.5 exactly counts as foreground (prob >= pixel).
PLANE = np.zeros((6, 8), np.float32)
PLANE[0:3, 0:3] = 0.9
PLANE[4, 5] = PLANE[5, 6] = 0.8
PLANE[0, 7] = 0.5
PLANE[4, 0] = 0.49  # just below the threshold


def one_class(plane: np.ndarray, c: int = 2) -> np.ndarray:
    prob = np.zeros((4, *plane.shape), np.float32)
    prob[c] = plane
    return prob


def params_for(c: int, **kw) -> Params:
    classes = [ClassParams(label=0.5, pixel=0.5)] * 4
    classes[c] = ClassParams(**{"label": 0.5, "pixel": 0.5, **kw})
    return Params(tuple(classes))


def fg(mask: np.ndarray) -> set[tuple[int, int]]:
    return set(map(tuple, np.argwhere(mask)))


BLOCK = {(r, c) for r in range(3) for c in range(3)}
PAIR = {(4, 5), (5, 6)}
SINGLE = {(0, 7)}
CLS = np.array([0.9, 0.9, 0.9, 0.9], np.float32)


def test_threshold_components_eight_connected():
    out = postprocess(one_class(PLANE), CLS, params_for(2))
    assert out.dtype == bool and out.shape == (4, 6, 8)
    assert fg(out[2]) == BLOCK | PAIR | SINGLE and not out[[0, 1, 3]].any()
    # min_component 2: the diagonal pair is ONE component of 2 (8-connectivity) and stays; the single goes
    assert fg(postprocess(one_class(PLANE), CLS, params_for(2, min_component=2))[2]) == BLOCK | PAIR
    assert fg(postprocess(one_class(PLANE), CLS, params_for(2, min_component=3))[2]) == BLOCK
    assert fg(postprocess(one_class(PLANE), CLS, params_for(2, min_component=10))[2]) == set()


def test_label_gate_min_area_and_stride():
    cls = CLS.copy()
    cls[2] = 0.49
    assert not postprocess(one_class(PLANE), cls, params_for(2)).any()  # cls 0.49 < label 0.5
    cls[2] = 0.5
    assert postprocess(one_class(PLANE), cls, params_for(2)).any()  # >= passes
    # remaining area after component removal: 9 (block) -> kept at min_area 9, dropped at 10
    assert fg(postprocess(one_class(PLANE), CLS, params_for(2, min_component=3, min_area=9))[2]) == BLOCK
    assert not postprocess(one_class(PLANE), CLS, params_for(2, min_component=3, min_area=10)).any()
    # at stride 2 each pixel is 4 full-res pixels: pair = 8, single = 4, block = 36
    s2 = postprocess(one_class(PLANE), CLS, params_for(2, min_component=8), stride=2)
    assert fg(s2[2]) == BLOCK | PAIR
    assert fg(postprocess(one_class(PLANE), CLS, params_for(2, min_component=9), stride=2)[2]) == BLOCK
    assert postprocess(one_class(PLANE), CLS, params_for(2, min_component=9, min_area=36), stride=2).any()
    assert not postprocess(one_class(PLANE), CLS, params_for(2, min_component=9, min_area=37), stride=2).any()


def test_quantised_input_reads_like_the_oof_store():
    rng = np.random.default_rng(3)
    q = rng.integers(0, 256, (4, 12, 20), dtype=np.uint8)
    cls = rng.random(4).astype(np.float32)
    p = Params.uniform(0.2, 128 / 255, 0, 3)  # a threshold exactly on a level
    assert np.array_equal(postprocess(q, cls, p), postprocess(q.astype(np.float32) / 255.0, cls, p))
    with pytest.raises(TypeError, match="int64"):
        postprocess(q.astype(np.int64), cls, p)


def test_soft_gating():
    p = Params(tuple([ClassParams(label=0.3, pixel=0.5)] * 4), "soft")
    cls = np.array([0.9, 0.9, 0.5, 0.7], np.float32)
    prob = np.stack([PLANE] * 4)
    out = postprocess(prob, cls, p)
    assert fg(out[2]) == set()  # 0.9 * 0.5 = 0.45 < 0.5
    assert fg(out[3]) == BLOCK | PAIR  # 0.9*0.7=0.63, 0.8*0.7=0.56 kept; 0.5*0.7 dropped
    assert fg(out[0]) == BLOCK | PAIR  # 0.5 * 0.9 = 0.45 < 0.5
    hard = postprocess(prob, cls, Params(p.classes, "hard"))
    assert fg(hard[2]) == BLOCK | PAIR | SINGLE


def test_scaled_threshold_hand_computed():
    """Scaled mode: prob >= pixel * (1 + scale * (0.5 - cls)). PLANE holds 0.9 (block), 0.8 (pair), 0.5
    (single) and 0.49; pixel 0.6, scale 1, label 0.05 give per class probability these thresholds:
    cls 0.95 -> 0.6 * 0.55 = 0.33 (all four), 0.8 -> 0.42 (all four), 0.5 -> 0.6 (block, pair),
    0.1 -> 0.6 * 1.4 = 0.84 (block only); hard mode keeps block and pair at 0.6 whatever cls is."""
    from steel._torch_postprocess import postprocess_static

    p = Params(tuple([ClassParams(label=0.05, pixel=0.6, scale=1.0)] * 4), "scaled")
    cls = np.array([0.95, 0.8, 0.5, 0.1], np.float32)
    prob = np.stack([PLANE] * 4)
    out = postprocess(prob, cls, p)
    low = {(4, 0)}
    assert [fg(m) for m in out] == [
        BLOCK | PAIR | SINGLE | low,
        BLOCK | PAIR | SINGLE | low,
        BLOCK | PAIR,
        BLOCK,
    ]
    hard = postprocess(prob, cls, Params(tuple([ClassParams(label=0.05, pixel=0.6)] * 4), "hard"))
    assert [fg(m) for m in hard] == [BLOCK | PAIR] * 4
    cls[3] = 0.04  # below the label gate: dropped in every mode
    assert not postprocess(prob, cls, p)[3].any()
    cls[3] = 0.1
    # the eager and static torch versions make the same masks from the same numbers
    a = {k: torch.from_numpy(v) for k, v in p.arrays().items()}
    args = (torch.from_numpy(prob[None]), torch.from_numpy(cls[None]), a["label"], a["pixel"], a["min_area"],
            a["min_component"], False, 1)  # fmt: skip
    assert np.array_equal(postprocess_torch(*args, scale_thr=a["scale"])[0].numpy(), out)
    assert np.array_equal(postprocess_static(*args, scale_thr=a["scale"])[0].numpy(), out)
    assert np.array_equal(postprocess_torch(*args)[0].numpy(), hard)  # no scales: hard
    # the threshold file: scale only in scaled mode, 0 <= scale < 2
    assert p.to_dict()["classes"]["1"] == {
        "label": 0.05,
        "pixel": 0.6,
        "min_area": 0,
        "min_component": 0,
        "scale": 1.0,
    }
    assert "scale" not in Params.uniform().to_dict()["classes"]["1"]
    assert Params.from_dict(p.to_dict()) == p
    with pytest.raises(SteelError, match="class 1 scale = 0.5 needs mode scaled, not hard"):
        Params((ClassParams(scale=0.5),) * 4, "hard")
    with pytest.raises(SteelError, match=r"class 1 scale = 2.0 is not a number in \[0, 2\)"):
        Params((ClassParams(scale=2.0),) * 4, "scaled")


def test_params_round_trip_and_errors(tmp_path):
    p = Params(
        (
            ClassParams(0.7, 0.55, 600, 150),
            ClassParams(0.7, 0.55, 600, 150),
            ClassParams(0.6, 0.55, 900, 150),
            ClassParams(0.6, 0.5, 2000, 0),
        ),
        "soft",
    )
    p.save(tmp_path / "thresholds.json", oof_dice={"mean": 0.9, "per_class": [0.9] * 4}, stride=2)
    assert Params.load(tmp_path) == p  # a run dir works too
    d = json.loads((tmp_path / "thresholds.json").read_text())
    assert d["classes"]["3"] == {"label": 0.6, "pixel": 0.55, "min_area": 900, "min_component": 150}
    assert d["stride"] == 2 and d["mode"] == "soft" and d["oof_dice"]["mean"] == 0.9
    assert p.arrays()["min_area"].tolist() == [600, 600, 900, 2000]

    def bad(obj, match):
        (tmp_path / "bad.json").write_text(json.dumps(obj))
        with pytest.raises(SteelError, match=match):
            Params.load(tmp_path / "bad.json")

    good = p.to_dict()
    bad({**good, "classes": {k: v for k, v in good["classes"].items() if k != "4"}}, "must be exactly")
    bad({**good, "classes": {**good["classes"], "2": {"label": 1.5, "pixel": 0.5}}}, "class 2 label = 1.5")
    bad(
        {**good, "classes": {**good["classes"], "1": {"label": 0.5, "pixel": 0.5, "area": 3}}},
        "class 1 needs keys",
    )
    bad(
        {**good, "classes": {**good["classes"], "3": {"label": 0.5, "pixel": 0.5, "min_area": -1}}},
        "min_area = -1",
    )
    bad({**good, "mode": "fuzzy"}, "mode 'fuzzy'")
    with pytest.raises(SteelError, match="not found"):
        Params.load(tmp_path / "nope")


def serpentine(h: int, w: int) -> np.ndarray:
    """One long 1-pixel-wide path (rows joined alternately at the right and left end): worst case for propagation."""
    m = np.zeros((h, w), bool)
    m[::2] = True
    for i, r in enumerate(range(1, h, 2)):
        m[r, w - 1 if i % 2 == 0 else 0] = True
    return m


def column_snake(h: int, w: int) -> np.ndarray:
    """The serpentine turned sideways: 1-pixel-wide columns joined alternately at the bottom and top (many runs)."""
    return np.ascontiguousarray(serpentine(w, h).T)


def spiral(h: int, w: int) -> np.ndarray:
    """A square spiral path, 1 pixel wide with 1-pixel gaps, walked inwards from the top-left corner."""
    m = np.zeros((h, w), bool)
    r, c, k = 0, 0, 0
    steps = [w - 1, h - 1, w - 1, h - 3]  # right, down, left, up; each later pair 2 shorter
    while steps[k % 4] > 0:
        n = steps[k % 4]
        dr, dc = [(0, 1), (1, 0), (0, -1), (-1, 0)][k % 4]
        rows, cols = r + dr * np.arange(n + 1), c + dc * np.arange(n + 1)
        m[rows, cols] = True
        r, c = r + dr * n, c + dc * n
        steps[k % 4] -= 2 if k == 0 else 4
        k += 1
    return m


def zigzag(h: int, w: int) -> np.ndarray:
    """One pixel per column bouncing between the top and bottom rows: connected by diagonal steps only."""
    m = np.zeros((h, w), bool)
    x = np.arange(w)
    t = x % (2 * h - 2)
    m[np.where(t < h, t, 2 * h - 2 - t), x] = True
    return m


def checkerboard(h: int, w: int) -> np.ndarray:
    """Diagonal neighbours only: one 8-connected component of h*w/2 pixels (h*w/2 of them 4-connected)."""
    return (np.add.outer(np.arange(h), np.arange(w)) % 2) == 0


def dust(h: int, w: int) -> np.ndarray:
    """Many tiny components: isolated pixels on every other row and column, plus 2x1 and 1x2 specks."""
    m = np.zeros((h, w), bool)
    m[::2, ::2] = True
    m[::4, 1::8] = True  # join some pixels into horizontal pairs and triples
    m[1::4, ::6] = True  # and vertical ones
    return m


def hard_planes(h: int, w: int) -> np.ndarray:
    """bool (N, H, W): the shapes above, plus their flips, random noise around the percolation threshold."""
    rng = np.random.default_rng(7)
    shapes = [
        serpentine(h, w),
        column_snake(h, w),
        spiral(h, w),
        zigzag(h, w),
        checkerboard(h, w),
        dust(h, w),
    ]
    shapes += [s[::-1, ::-1] for s in shapes[:4]] + [zigzag(h, w) | zigzag(h, w)[::-1]]
    shapes += [rng.random((h, w)) < d for d in (0.3, 0.41, 0.6)]
    shapes += [np.ones((h, w), bool), np.zeros((h, w), bool)]
    return np.stack([np.ascontiguousarray(s) for s in shapes])


def opencv_sizes(m: np.ndarray) -> np.ndarray:
    """The reference: component size of every pixel of bool (H, W), 8-connectivity, 0 off the mask."""
    _, lab = cv2.connectedComponents(m.astype(np.uint8), connectivity=8)
    return np.bincount(lab.ravel())[lab] * m


def test_hard_shapes_are_what_they_claim():
    assert cv2.connectedComponents(spiral(40, 64).astype(np.uint8), connectivity=8)[0] == 2  # background + 1
    assert cv2.connectedComponents(zigzag(16, 300).astype(np.uint8), connectivity=4)[0] == 301
    assert cv2.connectedComponents(zigzag(16, 300).astype(np.uint8), connectivity=8)[0] == 2
    assert cv2.connectedComponents(column_snake(20, 50).astype(np.uint8), connectivity=8)[0] == 2
    assert cv2.connectedComponents(dust(16, 40).astype(np.uint8), connectivity=8)[0] > 100
    assert spiral(40, 64).sum() > 40 * 64 / 2 - 64  # one path over half the pixels


def test_component_sizes_torch_match_opencv():
    rng = np.random.default_rng(0)
    masks = [rng.random((3, 17, 29)) < d for d in (0.2, 0.45, 0.6)]
    masks.append(serpentine(21, 30)[None])
    assert component_sizes_torch(torch.from_numpy(masks[-1])).max() == masks[-1].sum()
    masks.append(np.zeros((1, 5, 7), bool))
    masks += [np.ones((1, 1, 1), bool), np.ones((2, 1, 9), bool), rng.random((4, 9, 1)) < 0.5]
    for m in masks:
        sizes = component_sizes_torch(torch.from_numpy(m)).numpy()
        for i in range(len(m)):
            assert np.array_equal(sizes[i], opencv_sizes(m[i]))


@pytest.mark.parametrize("shape", [(256, 1600), (37, 53)])
def test_component_sizes_torch_hard_shapes(shape):
    """Kaggle-size snakes, spirals, diagonal-only paths, dust and noise (dense and sparse runs) vs OpenCV."""
    masks = hard_planes(*shape)
    sizes = component_sizes_torch(torch.from_numpy(masks)).numpy()
    for i, m in enumerate(masks):
        assert np.array_equal(sizes[i], opencv_sizes(m)), i
    # one plane at a time (few runs: the binary-search path) gives the same as the whole stack (many runs)
    for i in (0, 2, 3, 5):
        assert np.array_equal(component_sizes_torch(torch.from_numpy(masks[i : i + 1])).numpy()[0], sizes[i])
    snake = serpentine(*shape)
    assert sizes[0].max() == snake.sum() and sizes[4].max() == checkerboard(*shape).sum()


def test_postprocess_torch_hard_shapes_match_numpy():
    """Component removal on hard shapes (thresholds just around their sizes), stride 1 and 2, some classes off."""
    masks = hard_planes(64, 320).astype(np.float32)
    n = len(masks) // 4 * 4
    prob = masks[:n].reshape(-1, 4, 64, 320) * 0.8
    cls = np.full(prob.shape[:2], 0.9, np.float32)
    cls[1, 2] = 0.2  # gated out
    for stride in (1, 2):
        for mcs in ((1, 2, 3, 150), (0, 5, 0, 2000), (64 * 320, 1, 300, 0)):
            sizes = [ClassParams(0.5, 0.5, float(a), float(mc)) for a, mc in zip((0, 40, 0, 9000), mcs)]
            params = Params(tuple(sizes))
            ref = np.stack([postprocess(prob[i], cls[i], params, stride) for i in range(len(prob))])
            a = {k: torch.from_numpy(v) for k, v in params.arrays().items()}
            out = postprocess_torch(
                torch.from_numpy(prob),
                torch.from_numpy(cls),
                a["label"],
                a["pixel"],
                a["min_area"],
                a["min_component"],
                False,
                stride,
            )
            assert np.array_equal(out.numpy(), ref), (stride, mcs)
            assert ref.any() and not ref.all()


@pytest.mark.parametrize("stride", [1, 2])
def test_postprocess_torch_area_exactly_min_area(stride):
    """A plane whose area is exactly min_area is labelled: removing a speck then drops it (numpy does too)."""
    s2 = stride * stride
    prob = np.stack([one_class(PLANE, c) for c in range(4)])  # image c has PLANE (12 px) in class c
    cls = np.full((4, 4), 0.9, np.float32)
    cls[3, 3] = 0.4  # gated out
    p = Params(
        (
            ClassParams(0.5, 0.5, 12 * s2, 2 * s2),  # single speck removed -> 11 px < min_area: dropped
            ClassParams(0.5, 0.5, 12 * s2, 1 * s2),  # nothing removed -> 12 px: kept
            ClassParams(0.5, 0.5, 12 * s2, 0),  # no component removal: kept
            ClassParams(0.5, 0.5, 0, 3 * s2),  # pair and speck removed, gated out in image 3
        )
    )
    a = {k: torch.from_numpy(v) for k, v in p.arrays().items()}
    out = postprocess_torch(
        torch.from_numpy(prob), torch.from_numpy(cls), a["label"], a["pixel"], a["min_area"], a["min_component"],
        False, stride,
    ).numpy()  # fmt: skip
    ref = np.stack([postprocess(prob[i], cls[i], p, stride) for i in range(4)])
    assert np.array_equal(out, ref)
    assert [fg(out[c, c]) for c in range(4)] == [set(), BLOCK | PAIR | SINGLE, BLOCK | PAIR | SINGLE, set()]
    assert fg(postprocess(prob[3], np.full(4, 0.9, np.float32), p, stride)[3]) == BLOCK


def test_remove_small_components_matches_scipy_eight_connectivity():
    from scipy import ndimage

    rng = np.random.default_rng(1)
    m = rng.random((40, 60)) < 0.4
    lab, _ = ndimage.label(m, structure=np.ones((3, 3)))
    size = np.bincount(lab.ravel())[lab]
    assert np.array_equal(remove_small_components(m, 5), m & (size >= 5))


@pytest.mark.parametrize("static", [False, True])
def test_numpy_torch_parity_random(static):
    """numpy reference, eager torch and the static (exported) torch version agree bit for bit in every mode."""
    from steel._torch_postprocess import postprocess_static

    fn = postprocess_static if static else postprocess_torch
    rng = np.random.default_rng(2 + static)
    modes = []
    for _ in range(15):
        b, h, w = 3, int(rng.integers(8, 30)), int(rng.integers(8, 40))
        prob = (rng.random((b, 4, h, w)) ** rng.uniform(0.3, 3)).astype(np.float32)
        prob = np.round(prob * 255).astype(np.float32) / 255  # quantised levels, thresholds hit exactly
        cls = rng.random((b, 4)).astype(np.float32)
        mode = ("hard", "soft", "scaled")[_ % 3]
        params = Params(
            tuple(
                ClassParams(
                    float(rng.choice([0.0, 0.3, 0.5])),
                    float(rng.choice([0.3, 0.4, 0.5, 0.6])),
                    float(rng.integers(0, 120)),
                    float(rng.choice([0, 4, 12, 30])),
                    float(rng.choice([0.0, 0.5, 1.3, 1.9])) if mode == "scaled" else 0.0,
                )
                for _ in range(4)
            ),
            mode,
        )
        stride = int(rng.integers(1, 3))
        ref = np.stack([postprocess(prob[i], cls[i], params, stride) for i in range(b)])
        a = {k: torch.from_numpy(v) for k, v in params.arrays().items()}
        out = fn(
            torch.from_numpy(prob),
            torch.from_numpy(cls),
            a["label"],
            a["pixel"],
            a["min_area"],
            a["min_component"],
            params.mode == "soft",
            stride,
            scale_thr=a.get("scale"),
        )
        assert out.dtype == torch.bool and np.array_equal(out.numpy(), ref), params
        modes.append(mode)
    assert set(modes) == {"hard", "soft", "scaled"}


def test_gating_params_one_meaning_per_mode() -> None:
    """The val/dice rules as Params: hard/soft keep the label gate; none is hard with no label gate."""
    from steel.postprocess import gating_params

    prob = np.full((4, 2, 2), 0.6, np.float32)
    cls = np.array([0.3, 0.7, 0.3, 0.7], np.float32)
    assert gating_params("none", 0.5, 0.5) == Params.uniform(0.0, 0.5, 0, 0, "hard")
    assert postprocess(prob, cls, gating_params("none")).all()
    assert postprocess(prob, cls, gating_params("hard")).any((1, 2)).tolist() == [False, True, False, True]
    # soft: 0.6 * 0.7 = 0.42 passes pixel 0.4; 0.6 * 0.3 = 0.18 does not (its label 0.3 passes the gate 0.2)
    soft = gating_params("soft", pixel=0.4, label=0.2)
    assert soft.mode == "soft" and postprocess(prob, cls, soft).any((1, 2)).tolist() == [
        False,
        True,
        False,
        True,
    ]
    with pytest.raises(SteelError, match="gating 'x'"):
        gating_params("x")
