"""Moved to tune/packing.py (the engine-facing batch source belongs to the library core); re-exported here."""

from tune.packing import (MASK_MODES, NIBatches, Units, best_fit_decreasing, cached_packs, collate_packed,  # noqa: F401
                          collate_padded, example_lengths, example_rows, pack_examples)
