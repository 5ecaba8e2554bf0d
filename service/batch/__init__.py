"""Embedding a corpus on Ray Data: ``python -m service.batch`` (the ``batch`` extra).

``sources`` plans input blocks and reads their items, ``stages`` runs them (preprocess on
CPU, forward in a model actor pool, normalise and write), ``sinks`` and ``parquet`` write
them, ``manifest`` records finished blocks, ``job`` drives it all.
"""
