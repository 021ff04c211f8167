#!/usr/bin/env python3
"""Snapshot throughput: walcast's snapshots against Postgres's own COPY.

Loads N rows (WALCAST_BENCH_SNAPSHOT_ROWS, default 1,000,000) into the
8-column table the other benchmarks use (benchlib's COLS / ROW_EXPR), then,
in the same run, on the same table:

  ceiling      `COPY snap_rows TO STDOUT` through psql into /dev/null: what
               Postgres itself takes to read and send every row as text.
  initial      `walcast run` with `snapshot = "initial_only"` and a file sink
               to /dev/null (JSON lines: parsed, typed, encoded and written):
               timed from process start (slot creation included) to its exit.
  many tables  the same N rows in WALCAST_BENCH_SNAPSHOT_TABLES (8) tables of
               N/8 rows: the COPY of each, one after the other in one psql
               session, against walcast's initial snapshot of all of them.
  incremental  a streaming walcast (`snapshot = "never"`) told `walcast
               snapshot public.snap_rows`: timed from the command to
               /status saying the incremental snapshot is done (chunks
               between watermarks, on one SQL session).
  into Kafka   the initial snapshot of snap_rows into Kafka (JSON, 3
               partitions), walcast against Debezium's (`snapshot.mode =
               initial` on the stack's Kafka Connect, JsonConverter without
               schemas, the producer settings bench.py gives both): each
               timed from its start to the topic's end offsets holding
               every row. Needs the stack's Kafka and Connect (`stack up
               --with debezium`, as tests/bench/run starts it) and
               confluent-kafka; without them this part says it skipped.

Prints the figures and appends them to tests/bench/RESULTS.md. Run through
tests/bench/snapshot (release build, stack env); needs only python3.
"""

import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request

import benchlib
from benchlib import COLS, ROW_EXPR, free_port, log

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
E = os.environ
N = int(float(E.get("WALCAST_BENCH_SNAPSHOT_ROWS", "1000000")))
BIN = E.get("WALCAST_BENCH_BIN", os.path.join(ROOT, "target", "bench", "release", "walcast"))
PGBIN = E["WALCAST_TEST_PG_BIN"]
PGPORT = E["WALCAST_TEST_PG_PORT"]
DB = "walcast_bench_snap"
WORKERS = int(E.get("WALCAST_BENCH_SNAPSHOT_WORKERS", "2"))
TABLES = int(E.get("WALCAST_BENCH_SNAPSHOT_TABLES", "8"))
MANY = [f"snap_many_{i}" for i in range(1, TABLES + 1)]
CHUNK = int(E.get("WALCAST_BENCH_SNAPSHOT_CHUNK", "10000"))
TIMEOUT = float(E.get("WALCAST_BENCH_TIMEOUT", "900"))




def psql(sql, db=DB):
    return benchlib.psql(sql, db)


FILE_SINK = 'type = "file"\npath = "/dev/null"\n'


def config(work, mode, admin, tables=("snap_rows",), publication="bench_snap_pub", state="state",
           slot="bench_snap", sink=FILE_SINK, pipeline_extra=""):
    listed = ", ".join(f'"public.{t}"' for t in tables)
    return f"""[admin]
listen = "{admin}"
[log]
format = "json"
level = "info"
[pipelines.snapbench]
kind = "capture"
{pipeline_extra}state_dir = "{work}/{state}"
[pipelines.snapbench.source]
host = "127.0.0.1"
port = {PGPORT}
database = "{DB}"
user = "postgres"
tables = [{listed}]
slot = "{slot}"
publication = "{publication}"
snapshot = "{mode}"
snapshot_workers = {WORKERS}
snapshot_chunk_rows = {CHUNK}
[[pipelines.snapbench.sinks]]
{sink}"""


def setup():
    if psql(f"SELECT 1 FROM pg_database WHERE datname = '{DB}'", db="postgres") != "1":
        psql(f"CREATE DATABASE {DB}", db="postgres")
    if psql("SELECT 1 FROM pg_replication_slots WHERE slot_name = 'bench_snap'") == "1":
        psql("SELECT pg_drop_replication_slot('bench_snap')")
    have = psql("SELECT count(*) FROM pg_class WHERE relname = 'snap_rows'")
    if have == "1" and int(psql("SELECT count(*) FROM snap_rows")) == N:
        log(f"snap_rows already holds {N:,} rows")
    else:
        t0 = time.monotonic()
        psql(f"DROP TABLE IF EXISTS snap_rows; CREATE TABLE snap_rows ({COLS});"
             f"INSERT INTO snap_rows SELECT {ROW_EXPR} FROM generate_series(1, {N}) g")
        log(f"loaded {N:,} rows in {time.monotonic() - t0:.1f} s")
    psql("VACUUM ANALYZE snap_rows")
    psql("DROP PUBLICATION IF EXISTS bench_snap_pub; CREATE PUBLICATION bench_snap_pub FOR TABLE snap_rows")
    per = N // TABLES
    for i, t in enumerate(MANY):
        have = psql(f"SELECT count(*) FROM pg_class WHERE relname = '{t}'")
        if have == "1" and int(psql(f"SELECT count(*) FROM {t}")) == per:
            continue
        lo = i * per + 1
        psql(f"DROP TABLE IF EXISTS {t}; CREATE TABLE {t} ({COLS});"
             f"INSERT INTO {t} SELECT {ROW_EXPR} FROM generate_series({lo}, {lo + per - 1}) g")
        psql(f"VACUUM ANALYZE {t}")
    psql("DROP PUBLICATION IF EXISTS bench_snap_many; CREATE PUBLICATION bench_snap_many FOR TABLE "
         + ", ".join(MANY))
    psql("CHECKPOINT")
    return int(psql("SELECT pg_total_relation_size('snap_rows')"))


def ceiling(tables=("snap_rows",)):
    """COPY ... TO STDOUT into /dev/null, best of two (the first warms the
    cache); several tables one after the other in one session."""
    copies = []
    for t in tables:
        copies += ["-c", f"COPY {t} TO STDOUT"]
    best = None
    for _ in range(2):
        t0 = time.monotonic()
        with open(os.devnull, "wb") as null:
            subprocess.run([f"{PGBIN}/psql", "-h", "127.0.0.1", "-p", PGPORT, "-U", "postgres", "-d", DB,
                            "-qAtX"] + copies, stdout=null, check=True)
        dt = time.monotonic() - t0
        best = dt if best is None else min(best, dt)
    return best


def peak_rss_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def run_to_exit(work, name, text):
    """Runs `walcast run` on the config `text` until it exits (an
    `initial_only` snapshot exits once every record is acknowledged):
    (start time, seconds, peak RSS KiB, log path)."""
    cfg = os.path.join(work, f"{name}.toml")
    with open(cfg, "w") as f:
        f.write(text)
    logf = open(os.path.join(work, f"{name}.log"), "w")
    t0 = time.monotonic()
    p = subprocess.Popen([BIN, "run", "-c", cfg], stdout=subprocess.DEVNULL, stderr=logf, cwd=work)
    rss = 0
    while p.poll() is None:
        rss = max(rss, peak_rss_kib(p.pid))
        if time.monotonic() - t0 > TIMEOUT:
            p.kill()
            raise RuntimeError(f"walcast ({name}) timed out")
        time.sleep(0.05)
    dt = time.monotonic() - t0
    if p.returncode != 0:
        raise RuntimeError(f"walcast exited {p.returncode}; see {logf.name}")
    return t0, dt, rss, logf.name


def initial(work, name="initial", **kw):
    _, dt, rss, logname = run_to_exit(work, name, config(work, "initial_only", "", state=f"state-{name}", **kw))
    rows = None
    for line in open(logname):
        if '"snapshot done"' in line:
            rows = json.loads(line).get("rows")
    want = N // TABLES * TABLES if name == "many" else N
    if rows != want:
        raise RuntimeError(f"walcast's snapshot read {rows} rows, not {want}; see {logname}")
    return dt, rss


def kafka_topic_count(boot, topic):
    from confluent_kafka import Consumer, TopicPartition
    c = Consumer({"bootstrap.servers": boot, "group.id": "snapbench-offsets"})
    try:
        md = c.list_topics(topic, timeout=10).topics.get(topic)
        if md is None or md.error is not None:
            return 0
        return sum(c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in md.partitions)
    finally:
        c.close()


def create_topic(boot, topic, partitions=3):
    from confluent_kafka.admin import AdminClient, NewTopic
    admin = AdminClient({"bootstrap.servers": boot})  # alive until the futures resolve
    for f in admin.create_topics([NewTopic(topic, partitions, 1)]).values():
        f.result(30)


def connect(method, path, body=None):
    req = urllib.request.Request(E["WALCAST_TEST_CONNECT_URL"] + path, method=method,
                                 data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        txt = r.read().decode()
        return json.loads(txt) if txt else None


def wait_count(boot, topic, t0, what, proc=None):
    while True:
        n = kafka_topic_count(boot, topic)
        if n >= N:
            return time.monotonic() - t0
        if proc is not None and proc.poll() is not None and proc.returncode != 0:
            raise RuntimeError(f"{what} exited {proc.returncode} at {n:,}/{N:,} records")
        if time.monotonic() - t0 > TIMEOUT:
            raise RuntimeError(f"{what}: timed out at {n:,}/{N:,} records")
        time.sleep(0.1)


def into_kafka(work):
    """walcast's and Debezium's initial snapshot of snap_rows into Kafka, or
    None with the reason when this stack cannot run it."""
    boot, conn = E.get("WALCAST_TEST_KAFKA_BOOTSTRAP"), E.get("WALCAST_TEST_CONNECT_URL")
    if not boot or not conn:
        return None, "no Kafka or Kafka Connect in the stack's environment (stack up --with debezium)"
    try:
        import confluent_kafka  # noqa: F401
    except ImportError:
        return None, "confluent-kafka is not installed for this Python (tests/bench/run's venv has it)"
    stamp = time.strftime("%H%M%S")
    # walcast: the snapshot into Kafka, then exit (initial_only exits once
    # every record is acknowledged).
    wtopic = f"snapk{stamp}.public.snap_rows"
    create_topic(boot, wtopic)
    t0, _, rss, _ = run_to_exit(work, "kafka", config(
        work, "initial_only", "", state="state-kafka", slot="bench_snap_k",
        sink=f'type = "kafka"\nbootstrap_servers = "{boot}"\n',
        pipeline_extra=f'topic_prefix = "snapk{stamp}"\nformat = "json"\n'))
    w = wait_count(boot, wtopic, t0, "walcast")
    psql("SELECT pg_drop_replication_slot('bench_snap_k') FROM pg_replication_slots WHERE slot_name = 'bench_snap_k'")
    # Debezium: the same table, topic pre-created with 3 partitions.
    prefix = f"snapd{stamp}"
    dtopic = f"{prefix}.public.snap_rows"
    create_topic(boot, dtopic)
    name = f"snapbench-{stamp}"
    t0 = time.monotonic()
    connect("POST", "/connectors", {"name": name, "config": {
        "connector.class": "io.debezium.connector.postgresql.PostgresConnector", "tasks.max": "1",
        "plugin.name": "pgoutput", "database.hostname": "127.0.0.1", "database.port": PGPORT,
        "database.user": "postgres", "database.password": "unused", "database.dbname": DB,
        "slot.name": "bench_snap_dbz", "publication.name": "bench_snap_pub", "publication.autocreate.mode": "disabled",
        "table.include.list": "public.snap_rows", "topic.prefix": prefix, "snapshot.mode": "initial",
        "key.converter": "org.apache.kafka.connect.json.JsonConverter", "key.converter.schemas.enable": "false",
        "value.converter": "org.apache.kafka.connect.json.JsonConverter", "value.converter.schemas.enable": "false",
        "max.batch.size": "20480", "max.queue.size": "81920", "poll.interval.ms": "50",
        "producer.override.linger.ms": "5", "producer.override.batch.size": "524288",
        "producer.override.compression.type": "zstd", "producer.override.acks": "all",
        "producer.override.enable.idempotence": "true"}})
    try:
        d = wait_count(boot, dtopic, t0, "debezium")
    finally:
        connect("DELETE", f"/connectors/{name}")
        for _ in range(100):
            if psql("SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'bench_snap_dbz' AND NOT active") == "1":
                psql("SELECT pg_drop_replication_slot('bench_snap_dbz')")
                break
            time.sleep(0.2)
    return (w, rss, d), None


def status(admin):
    try:
        with urllib.request.urlopen(f"http://{admin}/status", timeout=2) as r:
            return json.load(r)
    except OSError:
        return None


def incremental(work):
    admin = f"127.0.0.1:{free_port()}"
    cfg = os.path.join(work, "incremental.toml")
    with open(cfg, "w") as f:
        f.write(config(work, "never", admin))
    logf = open(os.path.join(work, "incremental.log"), "w")
    p = subprocess.Popen([BIN, "run", "-c", cfg], stdout=subprocess.DEVNULL, stderr=logf, cwd=work)
    try:
        t0 = time.monotonic()
        while True:
            st = status(admin)
            if st and st["pipelines"][0]["state"] == "streaming":
                break
            if p.poll() is not None or time.monotonic() - t0 > 120:
                raise RuntimeError(f"walcast did not start streaming; see {logf.name}")
            time.sleep(0.1)
        t0 = time.monotonic()
        subprocess.run([BIN, "snapshot", "-c", cfg, "public.snap_rows"], check=True, capture_output=True)
        rss = 0
        while True:
            rss = max(rss, peak_rss_kib(p.pid))
            st = status(admin)
            prog = (st or {"pipelines": [{}]})["pipelines"][0].get("progress", {}).get("incremental_snapshot", {})
            if prog.get("state") == "done":
                break
            if p.poll() is not None or time.monotonic() - t0 > TIMEOUT:
                raise RuntimeError(f"incremental snapshot did not finish; see {logf.name}")
            time.sleep(0.05)
        dt = time.monotonic() - t0
        if prog.get("rows") != N:
            raise RuntimeError(f"incremental snapshot read {prog.get('rows')} rows, not {N}")
        return dt, rss
    finally:
        p.terminate()
        p.wait(timeout=60)
        psql("SELECT pg_drop_replication_slot('bench_snap') FROM pg_replication_slots WHERE slot_name = 'bench_snap'")


def main():
    work = tempfile.mkdtemp(prefix="walcast-snapbench-")
    started = datetime.datetime.now()
    size = setup()
    log(f"table: {N:,} rows, {size / 1e6:.0f} MB with indexes")
    c = ceiling()
    log(f"ceiling: COPY TO STDOUT > /dev/null {c:.2f} s = {N / c:,.0f} rows/s")
    i, irss = initial(work)
    log(f"walcast initial snapshot ({WORKERS} workers): {i:.2f} s = {N / i:,.0f} rows/s, "
        f"peak RSS {irss / 1024:.0f} MiB")
    m_rows = N // TABLES * TABLES
    mc = ceiling(MANY)
    log(f"ceiling, {TABLES} tables: COPY of each > /dev/null {mc:.2f} s = {m_rows / mc:,.0f} rows/s")
    mi, mrss = initial(work, "many", tables=MANY, publication="bench_snap_many")
    log(f"walcast initial snapshot of {TABLES} tables ({WORKERS} workers): {mi:.2f} s = {m_rows / mi:,.0f} rows/s, "
        f"peak RSS {mrss / 1024:.0f} MiB")
    n, nrss = incremental(work)
    log(f"walcast incremental snapshot (chunks of {CHUNK}): {n:.2f} s = {N / n:,.0f} rows/s, "
        f"peak RSS {nrss / 1024:.0f} MiB")
    k, why = into_kafka(work)
    if k:
        log(f"into Kafka: walcast {k[0]:.2f} s = {N / k[0]:,.0f} rows/s (peak RSS {k[1] / 1024:.0f} MiB), "
            f"Debezium {k[2]:.2f} s = {N / k[2]:,.0f} rows/s")
    else:
        log(f"into Kafka: SKIPPED, {why}")
    load = os.getloadavg()
    fsync = psql("SHOW fsync")
    commit = E.get("WALCAST_BENCH_COMMIT") or subprocess.run(
        ["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    lines = [
        "",
        f"## Snapshot throughput, {started:%Y-%m-%d %H:%M} (commit {commit}, tests/bench/snapshot)",
        "",
        f"{N:,} rows of the 8-column benchmark table ({size / 1e6:.0f} MB), file sink to /dev/null (JSON), "
        f"release build, {os.cpu_count()} cores, load average {load[0]:.1f} at the end, Postgres fsync={fsync}.",
        "",
        "Command: `" + " ".join([f"{k}={v}" for k, v in sorted(E.items())
                                 if k.startswith("WALCAST_BENCH_SNAPSHOT_")] + ["tests/bench/snapshot"]) + "`.",
        "",
        "| reader | seconds | rows/s | ÷ COPY | peak RSS |",
        "|---|---:|---:|---:|---:|",
        f"| `COPY snap_rows TO STDOUT` > /dev/null (psql) | {c:.2f} | {N / c:,.0f} | 1.00 | |",
        f"| walcast initial snapshot ({WORKERS} workers, block ranges) | {i:.2f} | {N / i:,.0f} | {c / i:.2f} | {irss / 1024:.0f} MiB |",
        f"| `COPY snap_many_N TO STDOUT` of {TABLES} tables of {m_rows // TABLES:,} rows, one after the other (psql) | {mc:.2f} | {m_rows / mc:,.0f} | 1.00 | |",
        f"| walcast initial snapshot of the {TABLES} tables ({WORKERS} workers) | {mi:.2f} | {m_rows / mi:,.0f} | {mc / mi:.2f} | {mrss / 1024:.0f} MiB |",
        f"| walcast incremental snapshot (1 session, chunks of {CHUNK:,}, while streaming) | {n:.2f} | {N / n:,.0f} | {c / n:.2f} | {nrss / 1024:.0f} MiB |",
    ] + ([
        f"| walcast initial snapshot into Kafka (JSON, 3 partitions, to the end offsets) | {k[0]:.2f} | {N / k[0]:,.0f} | {c / k[0]:.2f} | {k[1] / 1024:.0f} MiB |",
        f"| Debezium initial snapshot into Kafka (the same, `snapshot.mode = initial`) | {k[2]:.2f} | {N / k[2]:,.0f} | {c / k[2]:.2f} | |",
        "",
        f"Into Kafka, walcast ÷ Debezium: {k[2] / k[0]:.2f}× (the same table, topic layout and producer settings).",
    ] if k else ["", f"Into Kafka against Debezium: skipped, {why}."]) + [
        "",
    ]
    text = "\n".join(lines)
    print(text)
    with open(os.path.join(HERE, "RESULTS.md"), "a") as f:
        f.write(text)
    log(f"appended to {os.path.join(HERE, 'RESULTS.md')}; logs in {work}")


if __name__ == "__main__":
    sys.exit(main())
