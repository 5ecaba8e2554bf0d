"""Keep the garbage collector off the objects a process holds for its whole life.

A front end holds the model core's modules (torch, transformers, the tokenizer: some
430,000 objects), and the engine the model. Python's full collections walk every object
the collector tracks, so each of them took ~250 ms in a front end, a few every ten seconds
under load: a third of the front end's CPU per request and a stall of its event loop each
time (measured: bench/README.md, "Profile of one request"). ``gc.freeze()`` moves the
objects alive now into a permanent generation that collections skip; the requests' own
objects are collected as before.

``freeze_long_lived()`` is called once a process holds what it keeps: a front end after
it has greeted an engine (the preprocessor has arrived), the engine after its warm-up.
The first call collects the young generations only (a full collection is what costs);
cyclic garbage already in the oldest generation then stays frozen, once. A later call (a
restarted engine greeted anew) thaws what was frozen and runs a full collection first, so
the previous engine's objects that have died since are freed, then freezes again.
"""

from __future__ import annotations

import gc


def freeze_long_lived() -> int:
    """Collect, then freeze every object alive; returns how many are frozen."""
    if gc.get_freeze_count():
        gc.unfreeze()
        gc.collect()
    else:
        gc.collect(1)
    gc.freeze()
    return gc.get_freeze_count()
