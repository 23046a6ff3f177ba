"""Write requirements/lock.txt: the exact version, in this environment, of every distribution that ponder
and its `dev` extra need, for `pip install -c requirements/lock.txt ...` (what `make` and `.ci/run` do).

    python requirements/make_lock.py [requirements/lock.txt]     (or: make lock)

Why: the demo's figures move with library versions (transformers 5.25.0 against an earlier one moved
arithmetic pass@1 0.932 -> 0.945), so the versions they were measured with are kept. This is `pip freeze`
narrowed to ponder's own requirements (pyproject.toml's dependencies and the `dev` extra) and everything
those require in turn, with markers evaluated here; other packages in the environment are left out.

torch itself is not a line of the lock: the Makefile installs it first from its own pin (TORCH, from PyTorch's
CPU index when TORCH_INDEX names it), and a constraint on it would make pip replace a machine's own torch
build (on a stock Linux machine with PyPI's multi-gigabyte CUDA wheel). Its version is recorded in the
header (`# torch: 2.13.0`, local label such as +cpu dropped) and must equal the Makefile's pin. A lock that
would name a CUDA build or NVIDIA's CUDA wheels (nvidia-*) is refused: generate it on the CPU build. (triton is
pinned: the dev extra names it for the interpreter that runs the GPU kernels' tests on CPU.)
"""

from __future__ import annotations

import platform
import sys
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
EXTRAS = ("dev",)  # the tests' extra: `make test` installs `.[dev]`; the demo installs a subset of it
CUDA_ONLY = ("nvidia-",)  # distributions only a CUDA build of torch pulls in


class LockError(Exception):
    pass


def project_requirements(pyproject: Path = ROOT / "pyproject.toml", extras=EXTRAS) -> list[Requirement]:
    """ponder's own requirements, read from the tree's pyproject.toml (not an installed, maybe older, copy)."""
    try:
        import tomllib
    except ImportError:  # Python 3.10: pip vendors the same parser
        from pip._vendor import tomli as tomllib

    project = tomllib.loads(pyproject.read_text())["project"]
    names = list(project["dependencies"]) + [r for e in extras for r in project["optional-dependencies"][e]]
    return [Requirement(r) for r in names]


def installed(name: str) -> tuple[str, list[str]]:
    """(version, requirement strings) of an installed distribution."""
    dist = metadata.distribution(name)
    return dist.version, list(dist.requires or [])


def closure(roots: list[Requirement], lookup=installed, env: dict | None = None) -> dict[str, str]:
    """{canonical name: version} of the roots and all they require, with each requirement's markers evaluated
    for this environment and the extras asked of it."""
    env = env or default_environment()
    pins: dict[str, str] = {}
    seen: set[tuple[str, str]] = set()
    todo = [(r, "ponder") for r in roots if r.marker is None or r.marker.evaluate(env | {"extra": ""})]
    while todo:
        req, parent = todo.pop()
        name = canonicalize_name(req.name)
        extras = sorted(req.extras)
        if (name, ",".join(extras)) in seen:
            continue
        seen.add((name, ",".join(extras)))
        try:
            version, requires = lookup(name)
        except metadata.PackageNotFoundError:
            raise LockError(f"{req.name} (required by {parent}) is not installed; run `make setup` first") from None
        pins[name] = version
        for text in requires:
            sub = Requirement(text)
            # a requirement applies when its marker holds with no extra, or with one of the extras asked for
            if sub.marker is None or any(sub.marker.evaluate(env | {"extra": e}) for e in ["", *extras]):
                todo.append((sub, name))
    return pins


def lock_lines(pins: dict[str, str]) -> tuple[str, list[str]]:
    """(torch's public version, the `name==version` lines of everything else)."""
    lines, torch = [], None
    for name, version in sorted(pins.items()):
        public, _, local = version.partition("+")
        if name.startswith(CUDA_ONLY) or (name == "torch" and local.startswith("cu")):
            raise LockError(f"{name}=={version} is part of a CUDA build of torch; generate the lock in an "
                            f"environment with the CPU build (make TORCH_INDEX=https://download.pytorch.org/whl/cpu setup)")
        if name == "torch":
            torch = public
        else:
            lines.append(f"{name}=={public}")
    return torch, lines


def makefile_torch(makefile: Path = ROOT / "Makefile") -> str:
    """The version of the Makefile's `TORCH ?= torch==X` pin."""
    for line in makefile.read_text().splitlines():
        if line.replace(" ", "").startswith("TORCH?=torch=="):
            return line.split("==", 1)[1].strip()
    raise LockError("the Makefile has no `TORCH ?= torch==X` line")


def main(argv: list[str]) -> int:
    out = Path(argv[0]) if argv else ROOT / "requirements" / "lock.txt"
    try:
        torch, lines = lock_lines(closure(project_requirements()))
        if torch != makefile_torch():
            raise LockError(f"this environment has torch {torch} but the Makefile pins torch=={makefile_torch()}; "
                            f"install that torch first, or change TORCH in the Makefile")
    except LockError as e:
        print(f"make_lock: error: {e}", file=sys.stderr)
        return 2
    head = [
        "# Exact versions of ponder's requirements and the `dev` extra's, everything they pull in included: the",
        "# versions the README's demo figures and the tests were measured with. Used as constraints (pip install",
        "# -c requirements/lock.txt ...) by `make` and `.ci/run`; `make LOCK= ...` installs unpinned.",
        f"# Generated by requirements/make_lock.py (make lock) on Python {platform.python_version()}, "
        f"{platform.system()} {platform.machine()}; do not edit by hand.",
        "# torch is installed first by the Makefile's own pin (TORCH), so it is not constrained here; it was:",
        f"# torch: {torch}",
        "# the Python these pins hold for (the Makefile refuses another unless LOCK= is given):",
        f"# python: {'.'.join(platform.python_version_tuple()[:2])}",
    ]
    out.write_text("\n".join(head + lines) + "\n")
    print(f"wrote {len(lines)} pins to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
