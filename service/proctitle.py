"""Process titles: ``ps`` shows each server process's role (``llave: engine``,
``llave: api-0``, ``llave: store``, ``llave: server``)."""

from __future__ import annotations


def set_role(role: str) -> None:
    try:
        import setproctitle
    except ImportError:  # a nicety, never a reason to fail
        return
    setproctitle.setproctitle(f"llave: {role}")
