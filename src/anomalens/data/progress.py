"""Progress bars on stderr (tqdm), silent when disabled or not wanted."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

from tqdm import tqdm


@contextlib.contextmanager
def progress_bar(total: int, desc: str, enabled: bool = True, unit: str = "img") -> Iterator[tqdm | None]:
    if not enabled:
        yield None
        return
    with tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True, leave=False) as bar:
        yield bar
