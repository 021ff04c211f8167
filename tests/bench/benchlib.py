"""What bench.py and snapshot.py share: the benchmark table's shape and
small helpers. Kept free of bench.py's Kafka imports, because snapshot.py
runs with the system Python."""

import os
import socket
import subprocess
import time

PGBIN = os.environ["WALCAST_TEST_PG_BIN"]
PGPORT = os.environ["WALCAST_TEST_PG_PORT"]

# The 8-column table of issue #17's workload (a), used by both benchmarks.
COLS = "id bigint PRIMARY KEY, account bigint NOT NULL, label text NOT NULL, amount numeric(12,2), currency char(3), note text, created_at timestamptz NOT NULL, updated_at timestamptz"
ROW_EXPR = ("g, g % 9973, 'label-' || g, (g % 100000) + (g % 100) / 100.0, 'EUR', "
            "'some free text that a real row might carry, about sixty bytes', now(), now()")


def log(*a):
    print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)


def psql(sql, db):
    r = subprocess.run([f"{PGBIN}/psql", "-h", "127.0.0.1", "-p", PGPORT, "-U", "postgres", "-d", db,
                        "-v", "ON_ERROR_STOP=1", "-qAtX", "-c", sql], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"psql failed: {sql[:200]}\n{r.stderr}")
    return r.stdout.strip()


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p
