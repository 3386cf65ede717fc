from pathlib import Path
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} not present (see README: getting the data)")
    return SHARED_DATA


@pytest.fixture
def shakespeare_slice(shared_data, tmp_path) -> Path:
    """The first 200 kB of Tiny Shakespeare as its own corpus file."""
    text = (shared_data / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")[:200_000]
    path = tmp_path / "shakespeare_slice.txt"
    path.write_text(text, encoding="utf-8")
    return path
