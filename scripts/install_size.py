"""What the core install (`make install`: the project and `tensorflow-cpu`) holds, by distribution, and what a
change to its requirements would take off.

    .venv/bin/python scripts/install_size.py                 # every distribution the core pulls in, largest first
    .venv/bin/python scripts/install_size.py --swap mlflow=mlflow-skinny,sqlalchemy,alembic --swap scikit-learn=

It reads the metadata of the distributions installed where it runs: from the project's own requirements (no
extras but `cpu`) it follows every requirement down, with the extras each asks for, and sums each distribution's
installed files (its RECORD, bytecode included) on disk, as `du` counts them. `--swap A=B,C` replaces A by B and
C (or by nothing) wherever it is required, and prints what would no longer be installed. Every distribution it reaches must be installed here (`make install-all`
holds them all).
"""

from __future__ import annotations

import argparse
import sys
from importlib import metadata

import pandas as pd
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from src import cli
from src.config import UserError

PROJECT = "flowers"
EXTRA = "cpu"


def requirements(name: str, extras: frozenset[str] = frozenset()) -> list[tuple[str, frozenset[str]]]:
    """The installed distribution's requirements that apply here with `extras` (name, the extras it asks for)."""
    try:
        dist = metadata.distribution(name)
    except metadata.PackageNotFoundError:
        raise UserError(f"{name} is not installed here; run this in an environment that holds the core "
                        "(make install-all)") from None
    environments = [{"extra": extra} for extra in {"", *extras}]
    wanted = [Requirement(text) for text in dist.requires or []]
    return [(canonicalize_name(r.name), frozenset(r.extras)) for r in wanted
            if r.marker is None or any(r.marker.evaluate(environment) for environment in environments)]


def closure(swaps: dict[str, list[str]]) -> set[str]:
    """Every distribution the project's core pulls in, extras its requirements ask for included, with `swaps`."""
    extras_of: dict[str, frozenset[str]] = {}
    todo = requirements(PROJECT, frozenset({EXTRA}))
    while todo:
        name, extras = todo.pop()
        if name in swaps:
            todo.extend((other, frozenset()) for other in swaps[name])
        elif name not in extras_of or not extras <= extras_of[name]:
            extras_of[name] = extras_of.get(name, frozenset()) | extras
            todo.extend(requirements(name, extras_of[name]))
    return set(extras_of)


def size_mb(name: str) -> float:
    """The distribution's installed files (its RECORD) on disk, in blocks as `du` counts them."""
    paths = (f.locate() for f in metadata.distribution(name).files or [])
    return sum(p.stat().st_blocks * 512 for p in paths if p.is_file()) / 2**20


def parse_swap(text: str) -> tuple[str, list[str]]:
    name, sep, replacements = text.partition("=")
    if not sep or not name:
        raise UserError(f"--swap {text!r} is not NAME=[OTHER,...]; e.g. --swap mlflow=mlflow-skinny,sqlalchemy")
    return canonicalize_name(name), [canonicalize_name(r) for r in replacements.split(",") if r]


@cli.command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--swap", action="append", default=[], type=parse_swap, metavar="NAME=[OTHER,...]")
    args = parser.parse_args(argv)
    core = closure({})
    sizes = pd.Series({name: size_mb(name) for name in core}).sort_values(ascending=False)
    print(sizes.round(1).rename("MB").to_markdown(floatfmt=".1f"))
    print(f"core: {len(core)} distributions, {sizes.sum():,.0f} MB on disk")
    if args.swap:
        swaps = dict(args.swap)
        swapped = closure(swaps)
        gone, added = sorted(core - swapped, key=lambda n: -sizes[n]), sorted(swapped - core)
        described = ", ".join(f"{name} -> {'+'.join(others) or 'nothing'}" for name, others in swaps.items())
        print(f"with {described}: "
              f"{len(gone)} fewer ({', '.join(f'{n} {sizes[n]:.0f}' for n in gone)}), "
              f"{len(added)} more ({', '.join(added) or 'none'}); "
              f"{sum(size_mb(n) for n in swapped):,.0f} MB (-{sizes[gone].sum():,.0f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
