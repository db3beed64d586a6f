"""Progress of long steps on the terminal: counts, rate and time left (tqdm), or a line now and then in a log."""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence

from tqdm import tqdm


def bar(total: int | None, description: str, unit: str = "it") -> tqdm:
    """A progress bar on stderr; redrawn twice a second on a terminal, every 30 s in a log file."""
    interactive = sys.stderr.isatty()
    return tqdm(total=total if total and total > 0 else None, desc=description, unit=unit, file=sys.stderr,
                mininterval=0.5 if interactive else 30, dynamic_ncols=interactive, ascii=not interactive)


def each(items: Sequence, description: str, unit: str = "it") -> Iterator:
    """`items` one by one, with a progress bar."""
    with bar(len(items), description, unit) as progress:
        for item in items:
            yield item
            progress.update()
