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


def test_component_sizes_torch_match_opencv():
    rng = np.random.default_rng(0)
    masks = [rng.random((3, 17, 29)) < d for d in (0.2, 0.45, 0.6)]
    masks.append(serpentine(21, 30)[None])
    assert component_sizes_torch(torch.from_numpy(masks[-1])).max() == masks[-1].sum()
    masks.append(np.zeros((1, 5, 7), bool))
    for m in masks:
        sizes = component_sizes_torch(torch.from_numpy(m)).numpy()
        for i in range(len(m)):
            _, lab = cv2.connectedComponents(m[i].astype(np.uint8), connectivity=8)
            ref = np.bincount(lab.ravel())[lab] * m[i]
            assert np.array_equal(sizes[i], ref)


def test_remove_small_components_matches_scipy_eight_connectivity():
    from scipy import ndimage

    rng = np.random.default_rng(1)
    m = rng.random((40, 60)) < 0.4
    lab, _ = ndimage.label(m, structure=np.ones((3, 3)))
    size = np.bincount(lab.ravel())[lab]
    assert np.array_equal(remove_small_components(m, 5), m & (size >= 5))


@pytest.mark.filterwarnings(
    "ignore::FutureWarning"
)  # torch.jit.script is deprecated but still what export uses
@pytest.mark.parametrize("scripted", [False, True])
def test_numpy_torch_parity_random(scripted):
    fn = torch.jit.script(postprocess_torch) if scripted else postprocess_torch
    rng = np.random.default_rng(2 + scripted)
    for _ in range(12):
        b, h, w = 3, int(rng.integers(8, 30)), int(rng.integers(8, 40))
        prob = (rng.random((b, 4, h, w)) ** rng.uniform(0.3, 3)).astype(np.float32)
        prob = np.round(prob * 255).astype(np.float32) / 255  # quantised levels, thresholds hit exactly
        cls = rng.random((b, 4)).astype(np.float32)
        params = Params(
            tuple(
                ClassParams(
                    float(rng.choice([0.0, 0.3, 0.5])),
                    float(rng.choice([0.3, 0.4, 0.5, 0.6])),
                    float(rng.integers(0, 120)),
                    float(rng.choice([0, 4, 12, 30])),
                )
                for _ in range(4)
            ),
            str(rng.choice(["hard", "soft"])),
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
        )
        assert out.dtype == torch.bool and np.array_equal(out.numpy(), ref)
