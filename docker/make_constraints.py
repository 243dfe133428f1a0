"""Write docker/constraints.txt: exact versions of the project's runtime dependencies, torch stack left out.

Run with the Python of an environment where `make test` passed (the versions CI tested):

    .venv/bin/python docker/make_constraints.py > docker/constraints.txt

It walks the `steel` distribution's requirements (no extras) through the installed metadata and pins every
package reached, except torch, torchvision, torchaudio, triton, the CUDA wheels (nvidia-*, cuda-*) and the
other packages that come only with torch (sympy, networkx, jinja2, ...): in the image those are the base
image's and are held at its versions by a second constraints file made inside the build.
"""

from __future__ import annotations

import re
import sys
from importlib import metadata

from packaging.requirements import Requirement

TORCH_STACK = re.compile(r"^(torch|torchvision|torchaudio|triton|nvidia-.*|cuda-.*)$")


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(root: str, stop=lambda n: False) -> dict[str, str]:
    """name -> installed version of every distribution reached from `root` (markers evaluated here)."""
    seen: dict[str, str] = {}
    done: set[tuple[str, str]] = set()  # (distribution, extra) already expanded; "" = its base requirements
    todo: list[tuple[str, str]] = [(root, "")]
    while todo:
        name, extra = todo.pop()
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # a dependency whose marker is false here, e.g. only for another platform
        key = norm(dist.metadata["Name"])
        if (key, extra) in done:
            continue
        done.add((key, extra))
        seen[key] = dist.version
        for spec in dist.requires or []:
            req = Requirement(spec)
            if req.marker is not None and not req.marker.evaluate({"extra": extra}):
                continue
            if extra and (req.marker is None or "extra" not in str(req.marker)):
                continue  # base requirements are expanded under ""
            if stop(norm(req.name)):
                continue
            todo.extend((req.name, e) for e in ("", *sorted(req.extras)))
    return seen


def main() -> int:
    steel = closure("steel")
    only_torch = set(closure("torch")) | set(closure("torchvision"))
    # packages torch brings that nothing else of the project reaches without passing through torch
    rest = closure("steel", stop=lambda n: n in {"torch", "torchvision"})
    lines = [
        "# Exact versions of steel's runtime dependencies, as tested by `make test` (torch stack excluded:",
        "# the base image's torch/torchvision/CUDA wheels are kept).  Regenerate with",
        "#   .venv/bin/python docker/make_constraints.py > docker/constraints.txt",
        f"# from an environment with torch {steel.get('torch', '?')}, Python {sys.version.split()[0]}.",
    ]
    for name in sorted(steel):
        if name == "steel" or TORCH_STACK.match(name) or (name in only_torch and name not in rest):
            continue
        lines.append(f"{name}=={steel[name]}")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
