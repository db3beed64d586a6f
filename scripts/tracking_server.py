"""A team MLflow tracking server: runs in PostgreSQL, artifacts proxied into a local folder (make tracking-server).

    python scripts/tracking_server.py [--workers 2 ...]   # more `mlflow server` options pass through

MLFLOW_BACKEND_STORE_URI (postgresql://postgres@127.0.0.1:5432/mlflow; the database is created if missing),
ARTIFACTS_DIR (the project's mlartifacts/), HOST (127.0.0.1) and MLFLOW_PORT (5001) configure it. Clients set
MLFLOW_TRACKING_URI=http://<host>:<port> and need no shared folder: artifacts go through the server.
"""

from __future__ import annotations

import os
import sys

import psycopg
from psycopg import sql
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from src import cli
from src.config import PROJECT_ROOT, UserError

DEFAULT_BACKEND = "postgresql://postgres@127.0.0.1:5432/mlflow"


def create_database(uri: str) -> None:
    """Create the URI's PostgreSQL database unless it exists."""
    try:
        url = make_url(uri)
    except ArgumentError:
        url = None
    if url is None or not url.drivername.startswith("postgresql") or not url.database:
        raise UserError(f"MLFLOW_BACKEND_STORE_URI={uri} is not a PostgreSQL database URI; "
                        f"set it like {DEFAULT_BACKEND}")
    admin = url.set(drivername="postgresql", database="postgres").render_as_string(hide_password=False)
    try:
        with psycopg.connect(admin, autocommit=True, connect_timeout=5) as connection:
            if not connection.execute("SELECT 1 FROM pg_database WHERE datname = %s", [url.database]).fetchone():
                connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(url.database)))
                print(f"created the database {url.database}", flush=True)
    except psycopg.Error as error:
        reason = str(error).strip().splitlines()[0]
        raise UserError(f"cannot use PostgreSQL at {url.host}:{url.port or 5432} ({reason}); start it, "
                        "or point MLFLOW_BACKEND_STORE_URI at one where this user may create databases") from None


@cli.command
def main(argv: list[str] | None = None) -> int:
    backend = os.environ.get("MLFLOW_BACKEND_STORE_URI", DEFAULT_BACKEND)
    create_database(backend)
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend, "--serve-artifacts",
               "--artifacts-destination", os.environ.get("ARTIFACTS_DIR", str(PROJECT_ROOT / "mlartifacts")),
               "--host", os.environ.get("HOST", "127.0.0.1"), "--port", os.environ.get("MLFLOW_PORT", "5001"),
               *(sys.argv[1:] if argv is None else argv)]
    os.execv(sys.executable, command)


if __name__ == "__main__":
    sys.exit(main())
