"""Writing a directory so that readers only ever see it complete."""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator


@contextmanager
def directory_written_aside(final: Path, is_complete: Callable[[Path], bool] = lambda path: False) -> Iterator[Path]:
    """Yield an empty temporary sibling of `final` to write into; when the block ends without an error,
    rename it to `final`. An existing `final` is replaced unless `is_complete(final)` (then a concurrent
    writer finished first and its copy is kept). On an error nothing is left behind and `final` is untouched."""
    final = Path(final)
    tmp = final.with_name(f".tmp-{final.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if final.exists() and not is_complete(final):
            shutil.rmtree(final)
        try:
            os.replace(tmp, final)
        except OSError:
            if not is_complete(final):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
