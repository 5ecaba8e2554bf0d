"""``python -m bench.simserver [--old-design] ARGS...``: the server with a SIMULATED device.

Exactly ``python -m service ARGS...``, except that the process owning the model loads it
through ``bench.simdevice:load``: the real checkpoint (tokeniser, limits, dim) with a
stand-in forward pass that behaves like a GPU's (see bench/simdevice.py). Used by
``python bench/serve.py --simulate``.

- default (the engine-process design): ``service.__main__.main(argv,
  embedder_factory="bench.simdevice:load")``; the factory is called in the engine process.
- ``--old-design``: the in-process engine of commit 3b9179b and before, which has no such
  hook: ``service.inference.engine.EmbeddingEngine._load_model`` is replaced by the
  factory before the server starts. Run it with that tree first on ``PYTHONPATH`` (bench/
  serve.py --old-repo does this), e.g. a worktree made by
  ``git worktree add /tmp/old-design 3b9179b``.
- ``--batcher PATH``: load ``service.inference.batching`` from that file instead (e.g. this
  tree's adaptive batcher in the old design, whose engine uses the same batcher API).
"""

from __future__ import annotations

import inspect
import logging
import sys
from collections.abc import Sequence

FACTORY = "bench.simdevice:load"


def _factory():  # type: ignore[no-untyped-def]
    try:
        from bench import simdevice
    except ImportError:  # run as a script from bench/
        import simdevice  # type: ignore[no-redef]
    return simdevice.load


def _use_batcher(path: str) -> None:
    import importlib.util

    import service.inference

    spec = importlib.util.spec_from_file_location("service.inference.batching", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["service.inference.batching"] = module
    spec.loader.exec_module(module)
    service.inference.batching = module  # type: ignore[attr-defined]
    print(f"SIMULATED DEVICE: batcher from {path}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    old = "--old-design" in args
    args = [a for a in args if a != "--old-design"]
    if "--batcher" in args:
        i = args.index("--batcher")
        _use_batcher(args[i + 1])
        del args[i : i + 2]
    import service
    from service import __main__ as service_main

    log = logging.getLogger("llave.simserver")
    if old:
        from service.inference.engine import EmbeddingEngine

        load = _factory()

        def _load_model(self):  # type: ignore[no-untyped-def]  # device thread
            return load(self.settings)

        EmbeddingEngine._load_model = _load_model  # type: ignore[method-assign]
        print(f"SIMULATED DEVICE, old design: service from {service.__file__}", file=sys.stderr, flush=True)
        service_main.main(args)
        return
    if "embedder_factory" not in inspect.signature(service_main.main).parameters:
        raise SystemExit(
            f"{service.__file__}: service.__main__.main has no embedder_factory parameter "
            "(the engine-process design has not landed here); use --old-design"
        )
    log.info("SIMULATED DEVICE: embedder factory %s", FACTORY)
    print(f"SIMULATED DEVICE: service from {service.__file__}", file=sys.stderr, flush=True)
    service_main.main(args, embedder_factory=FACTORY)  # type: ignore[call-arg]


if __name__ == "__main__":
    main()
