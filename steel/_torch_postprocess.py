"""Batched torch post-processing, identical to ``steel.postprocess.postprocess`` (see there for the rules).

Two versions, bit-identical to each other and to the numpy reference, CPU or CUDA:
  * ``postprocess_torch`` (eager: the ensemble's forward, validation): Python control flow over values, host
    synchronisation to skip work; imported as ``steel.postprocess.postprocess_torch``;
  * ``postprocess_static`` (what ``steel export`` puts in the .pt2 / AOTInductor / ONNX program): no Python
    control flow over values; data-dependent sizes come from ``nonzero`` and the labelling loops are
    ``torch.while_loop`` (``component_sizes_static``, at the end of this file).

Connected components (8-connectivity) are labelled on horizontal runs rather than pixels, so that the number
of rounds no longer grows with a component's length (the former 3x3 max-pool propagation needed as many
rounds as the longest path inside a component: ~1000 for a scratch across the image):

1. runs: one pass finds every run's start and length (``_runs``);
2. edges: run i touches the runs lo[i] .. hi[i] - 1 of the next row (columns overlapping its own widened by
   one), counted by ``searchsorted`` when runs are few or by a cumulative count of run boundaries when they
   are many; the edges are listed without expanding those ranges (``_components``);
3. Shiloach-Vishkin style hooking on the run graph: every root takes the smallest root across its edges
   (``scatter_reduce(amin)``), then pointer jumping (``parent = parent[parent]``) until every run points at
   its root; parents only decrease, so the forest stays acyclic. Rounds repeat until no edge joins two trees
   (exact whatever their number); every root with a smaller neighbouring root hooks in each round, so they
   are few: 1-2 for a snake or spiral across a 256x1600 image, 2-4 for noise, each O(log R) jumps;
4. component areas by ``index_add`` over the roots; runs of too-small components are cleared.
"""

from __future__ import annotations

import torch


def _compress(parent: torch.Tensor) -> torch.Tensor:
    """Pointer jumping until every node's parent is a root (parent[parent[x]] == parent[x]); returns parent."""
    moved = torch.zeros(0, dtype=torch.bool, device=parent.device)
    while True:  # whole-array jumps while many nodes move
        grand = parent.index_select(0, parent)
        moved = grand != parent
        count = int(torch.count_nonzero(moved))
        parent = grand
        if count * 8 < parent.numel():
            break
    node = moved.nonzero().squeeze(1)  # the others point at a root already
    up = parent.index_select(0, node)
    while node.numel() > 0:  # then jump the nodes that still move only
        grand = parent.index_select(0, up)
        moving = (grand != up).nonzero().squeeze(1)
        node, up = node.index_select(0, moving), grand.index_select(0, moving)
        parent.index_copy_(0, node, up)
    return parent


def _runs(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Horizontal runs of mask bool (N, H, W): flat start index into N*H*W and length, int64 (R,), sorted."""
    n, h, w = mask.shape
    pad = torch.zeros(n * h, 1, dtype=torch.bool, device=mask.device)
    padded = torch.cat([pad, mask.reshape(n * h, w), pad], 1)
    at = (padded[:, 1:] != padded[:, :-1]).reshape(-1).nonzero().squeeze(1)  # each run's start col, end + 1
    first = at[0::2]
    return first - torch.div(first, w + 1, rounding_mode="floor"), at[1::2] - first  # (W + 1)- to W-wide


def _components(start: torch.Tensor, length: torch.Tensor, n: int, h: int, w: int) -> torch.Tensor:
    """Component root (the smallest run index in it) of each run (R,) of a mask (N, H, W); 8-connectivity.

    ``start`` / ``length``: all the runs of the mask, as ``_runs`` gives them.
    """
    r = start.numel()
    dev = start.device
    parent = torch.arange(r, device=dev)
    if r < 2:
        return parent
    row = torch.div(start, w, rounding_mode="floor")
    # Runs of the next row touching columns [c0 - 1, c1 + 1] of run i (8-connectivity) are lo[i] .. hi[i] - 1:
    # lo = number of runs ending before column c0 - 1 of the next row, hi = number of runs starting at or
    # before its column c1 + 1.
    nxt = (row + 1) * w
    if r * 24 < n * h * w:  # few runs: binary search
        col = start - row * w
        lo = torch.searchsorted(start + length - 1, nxt + (col - 1).clamp(min=0))
        hi = torch.searchsorted(start, nxt + (col + length).clamp(max=w - 1), right=True)
    else:  # many runs: count flips (start, end + 1) in a (W + 1)-wide layout, where they alternate
        first = start + row
        size = n * h * (w + 1)
        dtype = torch.int32 if size < 2147483647 else torch.int64
        flips = torch.zeros(size, dtype=dtype, device=dev)
        flips.index_fill_(0, first, 1)
        flips.index_fill_(0, first + length, 1)
        seen = torch.cumsum(flips, 0, dtype=dtype)
        top = seen.numel() - 1
        lo = torch.div(seen.index_select(0, (first + w).clamp(max=top)), 2, rounding_mode="floor").long()
        hi = torch.div(
            seen.index_select(0, (first + length + w + 1).clamp(max=top)) + 1, 2, rounding_mode="floor"
        )
        hi = hi.long()
    count = (hi - lo).clamp(min=0) * (torch.remainder(row, h) != h - 1).long()  # no edges across planes
    # Edges (i, j), j in lo[i] .. hi[i] - 1, without expanding them: the first and the last j, and the j strictly
    # between, whose columns lie inside run i's, so that i is their only neighbour above (cummax finds it).
    one = (count >= 1).nonzero().squeeze(1)
    two = (count >= 2).nonzero().squeeze(1)
    three = (count >= 3).nonzero().squeeze(1)
    owner = torch.full((r,), -1, dtype=torch.int64, device=dev)
    owner.index_copy_(0, lo.index_select(0, three) + 1, three)
    owner = torch.cummax(owner, 0).values
    j = torch.arange(r, device=dev)
    inside = ((owner >= 0) & (j < hi.index_select(0, owner.clamp(min=0)) - 1)).nonzero().squeeze(1)
    u = torch.cat([one, two, owner.index_select(0, inside)])
    v = torch.cat([lo.index_select(0, one), hi.index_select(0, two) - 1, inside])
    # Shiloach-Vishkin style: roots hook onto the smallest root across their edges, then full pointer jumping.
    # parent[x] <= x always, so the forest stays acyclic; an edge inside one tree stays so and is dropped.
    parent.scatter_reduce_(0, v, u, "amin")  # the first round: u < v and every run is its own root
    while True:
        parent = _compress(parent)
        pu = parent.index_select(0, u)
        pv = parent.index_select(0, v)
        differ = (pu != pv).nonzero().squeeze(1)
        if differ.numel() == 0:
            break
        u, v = u.index_select(0, differ), v.index_select(0, differ)
        pu, pv = pu.index_select(0, differ), pv.index_select(0, differ)
        parent.scatter_reduce_(0, torch.maximum(pu, pv), torch.minimum(pu, pv), "amin")
    return parent


def _expand(start: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
    """Flat pixel indices of runs (start (R,), length (R,)) -> (sum(length),) int64."""
    total = int(length.sum())
    first = torch.cumsum(length, 0) - length
    return (start - first).repeat_interleave(length) + torch.arange(total, device=start.device)


def plane_thresholds(
    prob: torch.Tensor,
    cls: torch.Tensor,
    pixel_thr: torch.Tensor,
    scale_thr: torch.Tensor | None,
    soft: bool,
) -> torch.Tensor:
    """Pixel threshold (B, 4) of every plane in the dtype of prob: ``pixel`` (hard, soft) or scaled mode's
    ``pixel * (1 + scale * (0.5 - cls))``, in the order of ``steel.postprocess.pixel_thresholds``."""
    b, c = cls.shape
    pix = pixel_thr.to(device=prob.device, dtype=prob.dtype).view(1, c)
    if soft or scale_thr is None:
        return pix.expand(b, c)
    scale = scale_thr.to(device=prob.device, dtype=prob.dtype).view(1, c)
    return pix * (1.0 + scale * (0.5 - cls.to(prob.dtype)))


def component_sizes_torch(mask: torch.Tensor) -> torch.Tensor:
    """Size of the 8-connected component of every pixel: mask bool (N, H, W) -> int64 (N, H, W), 0 off the mask."""
    n, h, w = mask.shape
    start, length = _runs(mask)
    root = _components(start, length, n, h, w)
    area = torch.zeros_like(length).index_add_(0, root, length).index_select(0, root)
    out = torch.zeros(mask.numel(), dtype=torch.int64, device=mask.device)
    out[_expand(start, length)] = area.repeat_interleave(length)
    return out.view(mask.shape)


def postprocess_torch(
    prob: torch.Tensor,
    cls: torch.Tensor,
    label_thr: torch.Tensor,
    pixel_thr: torch.Tensor,
    min_area: torch.Tensor,
    min_component: torch.Tensor,
    soft: bool = False,
    stride: int = 1,
    scale_thr: torch.Tensor | None = None,
) -> torch.Tensor:
    """Masks bool (B, 4, H, W) from prob (B, 4, H, W) in [0, 1], cls (B, 4) and per-class thresholds (4,).

    ``min_area`` / ``min_component`` are in full-resolution pixels; areas are multiplied by ``stride**2``.
    ``scale_thr`` (4,): scaled mode's scales (None or 0: hard); ignored when ``soft``.
    Components are only labelled in the (image, class) planes that can keep pixels: label gate passed,
    ``min_component > 0``, and an area (before component removal) that is not already below ``min_area``.
    """
    b, c, h, w = prob.shape
    hw = h * w
    dev = prob.device
    s2 = float(stride * stride)
    mc = min_component.to(device=dev, dtype=torch.float64).repeat(b)
    ma = min_area.to(device=dev, dtype=torch.float64).repeat(b)
    pix = plane_thresholds(prob, cls, pixel_thr, scale_thr, soft).reshape(-1)
    gate = (cls >= label_thr.to(device=dev, dtype=cls.dtype).view(1, c)).reshape(-1)
    # threshold only the planes that pass the label gate (a loop over planes, not pixels); clear the others
    mask = torch.empty(b, c, h, w, dtype=torch.bool, device=dev)
    flat = mask.view(b * c, hw)
    probs = prob.reshape(b * c, hw)
    scale = cls.to(prob.dtype).reshape(-1)
    passed: list[bool] = gate.tolist()
    for i in range(b * c):
        if passed[i]:
            torch.ge(probs[i] * scale[i] if soft else probs[i], pix[i], out=flat[i])
        else:
            flat[i].zero_()
    area = torch.zeros(b * c, dtype=torch.int64, device=dev)
    plain = (gate & (mc <= 0)).nonzero().squeeze(1)  # no component removal: the area is all we need
    if plain.numel() > 0:
        area.index_copy_(0, plain, torch.count_nonzero(flat.index_select(0, plain), 1))
    cand = (gate & (mc > 0)).nonzero().squeeze(1)
    if cand.numel() > 0:
        start, length = _runs(flat.index_select(0, cand).view(-1, h, w))
        plane = torch.div(start, hw, rounding_mode="floor")  # index into cand
        sub_area = torch.zeros(cand.numel(), dtype=torch.int64, device=dev).index_add_(0, plane, length)
        area.index_copy_(0, cand, sub_area)
        todo = (sub_area > 0) & (sub_area.to(torch.float64) * s2 >= ma.index_select(0, cand))
        if bool(todo.any()):  # label the runs of those planes, stacked as (L, H, W)
            if not bool(todo.all()):
                pick = todo.index_select(0, plane).nonzero().squeeze(1)
                start, length, plane = start[pick], length[pick], plane[pick]
            slot = torch.cumsum(todo.long(), 0) - 1  # index into cand -> index among the labelled planes
            root = _components(start + (slot[plane] - plane) * hw, length, int(todo.sum()), h, w)
            size = torch.zeros_like(length).index_add_(0, root, length).index_select(0, root)
            drop = (size.to(torch.float64) * s2 < mc.index_select(0, cand)[plane]).nonzero().squeeze(1)
            start, length, plane = start[drop], length[drop], plane[drop]
            target = cand[plane]  # index into all B * 4 planes
            flat.view(-1)[_expand(start + (target - plane) * hw, length)] = False
            area.index_add_(0, target, -length)
    small: list[int] = (gate & (area.to(torch.float64) * s2 < ma)).nonzero().squeeze(1).tolist()
    for i in small:  # below min_area after component removal
        flat[i].zero_()
    return mask


# ---- static shapes, for torch.export / AOTInductor / torch.compile ---------------------------------------
def _while(cond, body, init: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """``torch.while_loop`` when traced (export, compile), a Python loop otherwise (eager ``while_loop`` would
    call torch.compile on every new shape): the same iterations either way."""
    if torch.compiler.is_compiling():
        return tuple(torch.while_loop(cond, body, init))
    while bool(cond(*init)):
        init = tuple(body(*init))
    return init


def _jump_all(parent: torch.Tensor) -> torch.Tensor:
    """Pointer jumping until every node points at a root (parent[parent] == parent)."""

    def body(p: torch.Tensor, go: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        grand = p.index_select(0, p)
        return grand, (grand != p).any()

    return _while(
        lambda p, go: go.clone(), body, (parent, torch.ones((), dtype=torch.bool, device=parent.device))
    )[0]


def component_sizes_static(mask: torch.Tensor, compact: bool = True) -> torch.Tensor:
    """``component_sizes_torch`` without host synchronisation or Python control flow over values (for
    torch.export, AOTInductor, ONNX and torch.compile): mask bool (N, H, W) -> int64 (N, H, W), the size of
    each pixel's 8-connected component, 0 off the mask.

    Runs are numbered 1.. in reading order by a cumulative sum of run starts (0 = background). Run B touches
    the runs of the row above that overlap its columns widened by one; each such pair is listed once or
    twice (at B's first pixel: the runs over its up-left and up pixels; at any pixel of B: a run starting
    over its up-right pixel), so the edges are O(runs), not O(pixels). Then rounds of hooking (the larger
    of two roots across an edge takes the smaller: ``scatter_reduce(amin)``, parents only decrease, so the
    forest stays acyclic) and full pointer jumping, in ``torch.while_loop`` loops that end when no edge joins
    two trees: exact whatever the number of rounds (a few in practice). Everything after the pixel passes
    works on arrays of runs and edges.

    ``compact=False``: the same with every size fixed by the mask's shape (runs and edges padded to one slot
    a pixel, unused edges join the background to itself; no ``nonzero``): slower on the CPU, for exporters
    that cannot trace data-dependent sizes inside ``while_loop`` (older torch).
    """
    n, h, w = mask.shape
    run, size, _ = _run_sizes(mask, compact)
    return torch.where(mask.reshape(-1), size.index_select(0, run), 0).view(n, h, w)


def _run_sizes(mask: torch.Tensor, compact: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``component_sizes_static`` by runs: (run, size, first) = run number of every pixel (int32 (N*H*W,), 0 off
    the mask), size of each run's component (int64 (R + 1,), 0 for run 0) and, ``compact`` only, the flat
    index of each run's first pixel (int64 (R,); None otherwise). Pixel arrays are bool or int32: an int64
    array a pixel costs more than the rest of the labelling on the CPU."""
    n, h, w = mask.shape
    col = torch.zeros_like(mask[:, :, :1])
    left = torch.cat([col, mask[:, :, :-1]], 2)
    up = torch.cat([torch.zeros_like(mask[:, :1]), mask[:, :-1]], 1)
    up_left = torch.cat([col, up[:, :, :-1]], 2)
    up_right = torch.cat([up[:, :, 1:], col], 2)
    start = mask & ~left
    flat = mask.reshape(-1)
    run = torch.cumsum(start.reshape(-1), 0, dtype=torch.int32)  # run number (1..) of each mask pixel
    first = start.reshape(-1).nonzero().squeeze(1) if compact else None
    if compact:  # run lengths from counts of mask pixels before each run (runs never span rows)
        count = torch.cumsum(flat, 0, dtype=torch.int32)
        before = count.index_select(0, first) - 1
        length = torch.cat([before.new_zeros(1), torch.cat([before, count[-1:]])[1:] - before]).long()
    else:  # int64 index: ONNX's ScatterND takes no other
        length = torch.zeros(flat.shape[0] + 1, dtype=torch.int64, device=mask.device).index_add(
            0, run.long(), flat.long()
        )
    pairs = []
    for touch, offset in ((start & up_left, w + 1), (start & up, w), (mask & up_right & ~up, w - 1)):
        if compact:
            at = touch.reshape(-1).nonzero().squeeze(1)
            pairs.append((run.index_select(0, at), run.index_select(0, at - offset)))
        else:  # every pixel: its edge where it touches, else background -> background
            on = touch.reshape(-1)
            above = run.index_select(0, (torch.arange(on.shape[0], device=mask.device) - offset).clamp(min=0))
            pairs.append((torch.where(on, run, 0), torch.where(on, above, 0)))
    lo = torch.cat([q for _, q in pairs])  # the run above: always the smaller number
    hi = torch.cat([p for p, _ in pairs])

    def body(parent: torch.Tensor, go: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = parent.index_select(0, lo), parent.index_select(0, hi)
        parent = _jump_all(parent.scatter_reduce(0, torch.maximum(a, b), torch.minimum(a, b), "amin"))
        return parent, (parent.index_select(0, lo) != parent.index_select(0, hi)).any()

    parent = torch.arange(length.shape[0], device=mask.device)
    go = torch.ones((), dtype=torch.bool, device=mask.device)
    root = _while(lambda p, go: go.clone(), body, (parent, go))[0]
    size = torch.zeros_like(length).index_add(0, root, length).index_select(0, root)
    return run, size, first


def postprocess_static(
    prob: torch.Tensor,
    cls: torch.Tensor,
    label_thr: torch.Tensor,
    pixel_thr: torch.Tensor,
    min_area: torch.Tensor,
    min_component: torch.Tensor,
    soft: bool = False,
    stride: int = 1,
    compact: bool = True,
    scale_thr: torch.Tensor | None = None,
) -> torch.Tensor:
    """``postprocess_torch`` without host synchronisation or Python loops over values (for torch.export,
    AOTInductor and torch.compile; bit-identical to it and to the numpy reference). Components are labelled
    only in the planes that can keep pixels (gate passed, ``min_component > 0``, area not below ``min_area``):
    ``compact`` selects those planes (``nonzero``), else the others are emptied and every shape stays fixed
    (``component_sizes_static(compact=False)``)."""
    b, c, h, w = prob.shape
    dev = prob.device
    s2 = float(stride * stride)
    gate = cls >= label_thr.to(device=dev, dtype=cls.dtype).view(1, c)
    x = prob * cls.to(prob.dtype).view(b, c, 1, 1) if soft else prob
    mask = (x >= plane_thresholds(prob, cls, pixel_thr, scale_thr, soft).view(b, c, 1, 1)) & gate.view(
        b, c, 1, 1
    )
    flat = mask.reshape(b * c, h, w)
    mc = min_component.to(device=dev, dtype=torch.float64).view(1, c).expand(b, c).reshape(-1)
    ma = min_area.to(device=dev, dtype=torch.float64).view(1, c).expand(b, c).reshape(-1)
    area = flat.sum((1, 2), dtype=torch.int32)  # a bool sum would widen every pixel to int64 first
    need = (mc > 0) & (area > 0) & (area.to(torch.float64) * s2 >= ma)
    if not compact:
        sizes = component_sizes_static(flat & need.view(-1, 1, 1), compact=False)
        flat = flat & (~need.view(-1, 1, 1) | (sizes.to(torch.float64) * s2 >= mc.view(-1, 1, 1)))
        area = flat.sum((1, 2))
        return (flat & (area.to(torch.float64) * s2 >= ma).view(-1, 1, 1)).view(b, c, h, w)
    need = need.nonzero().squeeze(1)
    # plane 0 of ``sub`` is an empty spare, so that the number of planes is never 0 (torch.export proves it)
    sub = torch.cat([torch.zeros_like(flat[:1]), flat.index_select(0, need)])
    run, size, first = _run_sizes(sub, True)
    # each run kept or not by its component's size against its plane's min_component (run 0: background)
    plane = torch.cat([first.new_zeros(1), first // (h * w)])
    mc_sub = torch.cat([mc.new_zeros(1), mc.index_select(0, need)])
    keep = size.to(torch.float64) * s2 >= mc_sub.index_select(0, plane)
    kept = sub.reshape(-1) & keep.index_select(0, run)
    flat = flat.index_copy(0, need, kept.view(sub.shape)[1:])
    area = flat.sum((1, 2), dtype=torch.int32)
    return (flat & (area.to(torch.float64) * s2 >= ma).view(-1, 1, 1)).view(b, c, h, w)
