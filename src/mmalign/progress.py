"""Progress bars with ETA for every long stage (training, sampling, evaluation, conversion): one helper, tqdm.

Library code stays quiet by default: a bar is drawn only where the caller allows it (``enabled``: the main
process) and the ``mmalign.progress`` logger is enabled for INFO, which the ``mmalign`` command line sets up
(``-q`` turns it off) and a library user does with ``logging.basicConfig(level=logging.INFO)``. Bars go to
stderr; when stderr is not a terminal (a log file) they redraw at most every 30 s so logs stay short.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, TypeVar

logger = logging.getLogger(__name__)
T = TypeVar("T")


def shown(enabled: bool = True) -> bool:
    """Whether bars are drawn: ``enabled`` and the ``mmalign.progress`` logger is on at INFO."""
    return enabled and logger.isEnabledFor(logging.INFO)


def progress(total: int | None, desc: str, *, initial: int = 0, enabled: bool = True, unit: str = "it") -> Any:
    """A tqdm bar (count, rate, ETA) of ``total`` steps starting at ``initial``; a no-op bar when not shown."""
    from tqdm.auto import tqdm

    interactive = sys.stderr.isatty()
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=not shown(enabled), file=sys.stderr,
                dynamic_ncols=True, mininterval=0.1 if interactive else 30.0)


def in_batches(items: Sequence[T], size: int, desc: str, *, enabled: bool = True, unit: str = "it"
               ) -> Iterator[Sequence[T]]:
    """``items`` in consecutive slices of ``size``, advancing a bar of ``len(items)`` by each slice."""
    with progress(len(items), desc, enabled=enabled, unit=unit) as bar:
        for start in range(0, len(items), size):
            chunk = items[start:start + size]
            yield chunk
            bar.update(len(chunk))


def track(items: Iterable[T], desc: str, *, total: int | None = None, enabled: bool = True, unit: str = "it"
          ) -> Iterator[T]:
    """``items`` passed through, advancing a bar by one per item (``total``: ``len(items)`` where it has one)."""
    if total is None and isinstance(items, Sequence):
        total = len(items)
    with progress(total, desc, enabled=enabled, unit=unit) as bar:
        for item in items:
            yield item
            bar.update(1)
