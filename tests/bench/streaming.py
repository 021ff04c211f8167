#!/usr/bin/env python3
"""Large in-progress transactions (issue 26): one transaction of 2M rows of
the benchmark table (benchlib's COLS) captured to Kafka with and without
`source.streaming`, each through its own slot and a fresh walcast (release
build, JSON), Postgres's logical_decoding_work_mem at its default (64MB).

Reported per mode: the INSERT's duration (the transaction runs while
walcast reads it, when streaming), commit-to-Kafka latency (from COMMIT
returning to the slot's confirmed_flush_lsn reaching the commit's end:
walcast confirms only once Kafka acknowledged every record, and sends the
position within 0.5 s, so the figure is at most that much late), the
slot's pg_stat_replication_slots counters (spill_bytes: what the server
wrote to its disk; stream_bytes: what it streamed) and walcast's peak RSS.

Usage (stack env loaded, `cargo build --release` done):
  python3 tests/bench/streaming.py            # appends to RESULTS.md
WALCAST_BENCH_STREAMING_ROWS (2000000), WALCAST_BENCH_BIN
(target/release/walcast), WALCAST_BENCH_APPEND=0 to only print.
"""

import datetime
import os
import shutil
import signal
import subprocess
import tempfile
import time

from benchlib import COLS, ROW_EXPR, log, psql

E = os.environ
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
BIN = E.get("WALCAST_BENCH_BIN", os.path.join(ROOT, "target", "release", "walcast"))
ROWS = int(E.get("WALCAST_BENCH_STREAMING_ROWS", "2000000"))


def rss_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        return 0
    return 0


def config(db, work, streaming):
    return f"""[admin]
listen = "127.0.0.1:0"
[pipelines.bench]
kind = "capture"
topic_prefix = "{db}"
format = "json"
state_dir = "{work}/state"
[pipelines.bench.source]
port = {E["WALCAST_TEST_PG_PORT"]}
database = "{db}"
user = "postgres"
tables = ["public.bench"]
snapshot = "never"
streaming = {str(streaming).lower()}
[[pipelines.bench.sinks]]
type = "kafka"
bootstrap_servers = "{E["WALCAST_TEST_KAFKA_BOOTSTRAP"]}"
create_topics = true
"""


def lsn(db, sql):
    return int(psql(f"SELECT ({sql} - '0/0')::bigint", db) or 0)


def run(streaming):
    db = f"bench_streaming_{int(streaming)}_{os.getpid()}"
    psql(f"DROP DATABASE IF EXISTS {db}", "postgres")
    psql(f"CREATE DATABASE {db}", "postgres")
    psql(f"CREATE TABLE bench ({COLS})", db)
    work = tempfile.mkdtemp(prefix="walcast-bench-streaming-")
    with open(f"{work}/walcast.toml", "w") as f:
        f.write(config(db, work, streaming))
    logf = open(f"{work}/walcast.log", "w")
    p = subprocess.Popen([BIN, "run", "-c", f"{work}/walcast.toml"], cwd=work, stderr=logf, stdout=subprocess.DEVNULL)
    slot = "walcast_bench"
    try:
        deadline = time.time() + 120
        while psql(f"SELECT active FROM pg_replication_slots WHERE slot_name = '{slot}' AND database = '{db}'", db) != "t":
            assert time.time() < deadline and p.poll() is None, open(f"{work}/walcast.log").read()[-3000:]
            time.sleep(0.2)
        log(f"streaming={streaming}: inserting {ROWS:,} rows in one transaction")
        t0 = time.time()
        psql(f"INSERT INTO bench SELECT {ROW_EXPR} FROM generate_series(1, {ROWS}) g", db)
        committed = time.time()
        end = lsn(db, "pg_current_wal_lsn()")
        while lsn(db, f"(SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = '{slot}' AND database = '{db}')") < end:
            assert p.poll() is None, open(f"{work}/walcast.log").read()[-3000:]
            time.sleep(0.02)
        confirmed = time.time()
        time.sleep(1.5)  # the slot statistics are flushed a little after decoding
        stats = psql("SELECT spill_txns, spill_bytes, stream_txns, stream_bytes FROM pg_stat_replication_slots "
                     f"WHERE slot_name = '{slot}'", db).split("|")
        peak = rss_kib(p.pid)
        row = dict(mode="streaming" if streaming else "protocol 1", insert_s=committed - t0,
                   latency_s=confirmed - committed, spill_txns=int(stats[0]), spill_bytes=int(stats[1]),
                   stream_txns=int(stats[2]), stream_bytes=int(stats[3]), rss_mib=peak / 1024)
        log(row)
        return row
    finally:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
        psql(f"SELECT pg_drop_replication_slot('{slot}') FROM pg_replication_slots WHERE slot_name = '{slot}' AND database = '{db}'", "postgres")
        psql(f"DROP DATABASE IF EXISTS {db}", "postgres")
        shutil.rmtree(work, ignore_errors=True)


def main():
    rows = [run(False), run(True)]
    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    load = os.getloadavg()
    quiet = os.path.exists("/work/helpers/quiet")
    out = [f"## Streaming large transactions, {datetime.datetime.now():%Y-%m-%d %H:%M} (commit {commit}, tests/bench/streaming.py)",
           "",
           f"- one transaction of {ROWS:,} rows of the 8-column table, logical_decoding_work_mem 64MB (default), {os.path.relpath(BIN, ROOT)}, "
           f"{os.cpu_count()} cores, load average {load[0]:.1f} at the end"
           + ("" if quiet else " (machine not quiet: other work was running)"),
           "- latency: COMMIT returned → the slot confirmed the commit's end (every record acknowledged by Kafka; ≤ 0.5 s late)",
           "",
           "| mode | INSERT s | commit-to-Kafka s | spill_txns | spill_bytes MB | stream_txns | stream_bytes MB | peak RSS MiB |",
           "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['mode']} | {r['insert_s']:.1f} | {r['latency_s']:.1f} | {r['spill_txns']} | {r['spill_bytes'] / 1e6:.0f} "
                   f"| {r['stream_txns']} | {r['stream_bytes'] / 1e6:.0f} | {r['rss_mib']:.0f} |")
    text = "\n".join(out) + "\n"
    print(text)
    if E.get("WALCAST_BENCH_APPEND", "1") == "1":
        with open(os.path.join(ROOT, "tests", "bench", "RESULTS.md"), "a") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
