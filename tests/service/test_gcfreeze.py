"""service/gcfreeze.py: objects alive at the freeze are out of the collector's sight, later
garbage is still collected, and a second freeze frees what died in between."""

from __future__ import annotations

import gc
import weakref

from service.gcfreeze import freeze_long_lived


class Node:
    def __init__(self) -> None:
        self.me = self  # a cycle: only the cyclic collector can free it


def test_freeze_then_thaw_and_collect() -> None:
    try:
        kept = Node()
        kept_ref = weakref.ref(kept)
        assert freeze_long_lived() > 0
        assert gc.get_freeze_count() > 0
        del kept
        gc.collect()
        assert kept_ref() is not None  # frozen: full collections no longer look at it

        later = Node()
        later_ref = weakref.ref(later)
        del later
        gc.collect()
        assert later_ref() is None  # made after the freeze: collected as before

        freeze_long_lived()  # a second call thaws, collects, freezes again
        assert kept_ref() is None
    finally:
        gc.unfreeze()
