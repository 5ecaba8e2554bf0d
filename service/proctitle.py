"""Process titles (``ps`` shows each server process's role: ``llave: engine``,
``llave: api-0``, ``llave: store``, ``llave: server``) and tying a child's life to its
server's."""

from __future__ import annotations


def set_role(role: str) -> None:
    try:
        import setproctitle
    except ImportError:  # a nicety, never a reason to fail
        return
    setproctitle.setproctitle(f"llave: {role}")


def exit_with_parent() -> None:
    """Have the kernel send SIGTERM to this process when the process (thread) that started it
    dies, even by SIGKILL, so that no front end or store outlives its server (Linux only;
    elsewhere a no-op). Call it first thing in a child started from a long-lived thread."""
    import ctypes
    import signal
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass
