"""Reading a user's text file with one-line errors; writing a directory so that readers only ever see it complete."""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from tune.errors import DataError


def read_utf8(path, what: str) -> str:
    """The text of the user's file `path` (a `what`: "task file", "data file", ...), a leading byte-order mark
    dropped. DataError naming the file and the fix when it cannot be read or is not UTF-8 (with the byte offset)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read {what} ({e.strerror}); check the path") from None
    try:
        return data.decode("utf-8-sig")  # a spreadsheet's byte-order mark is not part of the first column's name
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 (byte offset {e.start}: {e.reason}); re-encode the {what} as "
                        "UTF-8") from None


def file_head(path, size: int = 4096) -> str | None:
    """The first `size` characters of a UTF-8 text file (a BOM dropped), for sniffing its format; None when it
    cannot be read as UTF-8."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            return f.read(size)
    except (OSError, UnicodeDecodeError):
        return None


@contextmanager
def directory_written_aside(final: Path, is_complete: Callable[[Path], bool] = lambda path: False) -> Iterator[Path]:
    """Yield an empty temporary sibling of `final` to write into; when the block ends without an error,
    rename it to `final`. An existing `final` is replaced unless `is_complete(final)` (then a concurrent
    writer finished first and its copy is kept). On an error nothing is left behind and `final` is untouched.
    Raises ValueError for a `final` that holds the working directory (".", "..": replacing it would delete the
    directory the process runs in and all beside it)."""
    final = Path(final).resolve()  # "..".with_name would put the temporary inside `final`
    if Path.cwd().resolve().is_relative_to(final):
        raise ValueError(f"{final} holds the working directory; write to a new directory instead")
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
