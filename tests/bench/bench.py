#!/usr/bin/env python3
"""walcast benchmarks: throughput against a ceiling and a peer, latency,
memory and CPU. Run through tests/bench/run, which provides the stack's
WALCAST_TEST_* variables, the release binary and this script's venv.

Method (the same for every system):
  catch-up throughput: for each workload, every reader's slot is created
  first (pg_recvlogical's, walcast-json's, walcast-avro's, Debezium's),
  then the workload is written and committed, then each reader is started
  alone, one after the other, and timed from its start until its last
  event is durable: pg_recvlogical until it exits at --endpos (the WAL
  read ceiling), walcast and Debezium until the end offsets of their
  topic sum to the expected record count. The timer includes process /
  connector start-up for both walcast and Debezium.
  latency: each system alone streams a pgbench TPC-B-like load at a fixed
  rate; topics use LogAppendTime, so a record's Kafka timestamp is the
  broker's append time; latency = append time - source.ts_us (the commit
  time Postgres wrote), the same field for walcast and Debezium.
  memory/CPU: /proc/PID/status VmRSS sampled every 200 ms (peak and a
  time series), utime+stime from /proc/PID/stat before and after.
  Debezium is the Kafka Connect JVM (already running; its RSS includes the
  idle worker), walcast and pg_recvlogical are their own processes.

Sizes: full sizes times WALCAST_BENCH_SCALE (default 0.2; 1.0 = the
issue's full sizes: (a) 1M rows in 1000-row transactions, (b) 100k
single-row transactions, (c) 500k updates under REPLICA IDENTITY FULL in
1000-row transactions, (e) one 2M-row transaction; latency 60 s at full
scale, 30 s otherwise, at WALCAST_BENCH_LAT_TPS TPC-B transactions/s (4 row
changes each; default 2500 = 10k rows/s)).
"""

import datetime
import json
import os
import platform
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import benchlib
from benchlib import COLS, ROW_EXPR, free_port, log
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
E = os.environ
SCALE = float(E.get("WALCAST_BENCH_SCALE", "0.2"))
WORK = E.get("WALCAST_BENCH_WORK", os.path.join(ROOT, "target", "bench-run"))
BIN = E.get("WALCAST_BENCH_BIN", os.path.join(ROOT, "target", "bench", "release", "walcast"))
PGBIN = E["WALCAST_TEST_PG_BIN"]
PGPORT = E["WALCAST_TEST_PG_PORT"]
BOOT = E["WALCAST_TEST_KAFKA_BOOTSTRAP"]
REGISTRY = E["WALCAST_TEST_REGISTRY_URL"]
CONNECT = E.get("WALCAST_TEST_CONNECT_URL")
CONNECT_PID = E.get("WALCAST_TEST_CONNECT_PIDFILE")
DB = "walcast_bench"
PARTITIONS = int(E.get("WALCAST_BENCH_PARTITIONS", "3"))
LAT_TPS = int(E.get("WALCAST_BENCH_LAT_TPS", "2500"))
LAT_SECONDS = int(E.get("WALCAST_BENCH_LAT_SECONDS", "60" if SCALE >= 1 else "30"))
SYSTEMS = E.get("WALCAST_BENCH_SYSTEMS", "pg_recvlogical,walcast-json,walcast-avro,debezium").split(",")
if not CONNECT and "debezium" in SYSTEMS:
    SYSTEMS.remove("debezium")
TIMEOUT = float(E.get("WALCAST_BENCH_TIMEOUT", "900"))  # per reader run
CLK = os.sysconf("SC_CLK_TCK")
RUN_ID = datetime.datetime.now().strftime("%H%M%S")

WORKLOADS = {
    # name: (description, expected events, table)
    "a": ("inserts, 1000-row txs", int(1_000_000 * SCALE), "bench_rows"),
    "b": ("inserts, 1-row txs", int(100_000 * SCALE), "bench_rows"),
    "c": ("updates, REPLICA IDENTITY FULL, 1000-row txs", int(500_000 * SCALE), "bench_full"),
    "e": ("one big tx (inserts)", int(2_000_000 * SCALE), "bench_rows"),
}
TABLES = ["public.bench_rows", "public.bench_full"]
LAT_TABLES = ["public.pgbench_accounts", "public.pgbench_tellers", "public.pgbench_branches", "public.pgbench_history"]


def psql(sql, db=DB):
    return benchlib.psql(sql, db)


# ---------------------------------------------------------------- sampling
def cpu_seconds(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK
    except OSError:
        return None


class Sampler:
    """VmRSS every 200 ms; CPU from the last reading taken while alive."""

    def __init__(self, pid):
        self.pid, self.series, self.peak, self.hwm = pid, [], 0, 0
        self.cpu0 = cpu_seconds(pid) or 0.0
        self.cpu_last = self.cpu0
        self.t0 = time.monotonic()
        self._stop = threading.Event()
        self._th = threading.Thread(target=self._run, daemon=True)
        self._th.start()

    def _run(self):
        while not self._stop.is_set():
            try:
                with open(f"/proc/{self.pid}/status") as f:
                    st = f.read()
                rss = int(re.search(r"VmRSS:\s+(\d+)", st).group(1)) * 1024
                hwm = int(re.search(r"VmHWM:\s+(\d+)", st).group(1)) * 1024
                c = cpu_seconds(self.pid)
                if c is not None:
                    self.cpu_last = c
                self.peak, self.hwm = max(self.peak, rss), max(self.hwm, hwm)
                self.series.append((time.monotonic() - self.t0, rss))
            except (OSError, AttributeError):
                pass
            self._stop.wait(0.2)

    def stop(self):
        c = cpu_seconds(self.pid)
        if c is not None:
            self.cpu_last = c
        self._stop.set()
        self._th.join()
        return {"peak_rss": self.peak, "cpu_s": self.cpu_last - self.cpu0, "rss_series": self.series}


# ---------------------------------------------------------------- kafka
admin = AdminClient({"bootstrap.servers": BOOT})
offsets_consumer = Consumer({"bootstrap.servers": BOOT, "group.id": "walcast-bench-offsets", "enable.auto.commit": False})


def create_topics(topics):
    fs = admin.create_topics([NewTopic(t, num_partitions=PARTITIONS, replication_factor=1,
                                       config={"message.timestamp.type": "LogAppendTime"}) for t in topics])
    for t, f in fs.items():
        try:
            f.result()
        except Exception as e:  # exists from a previous run
            if "TOPIC_ALREADY_EXISTS" not in str(e):
                raise


def end_offsets(topics):
    total = 0
    for t in topics:
        for p in range(PARTITIONS):
            try:
                total += offsets_consumer.get_watermark_offsets(TopicPartition(t, p), timeout=5)[1]
            except Exception:
                pass
    return total


def wait_offsets(topics, expected, t0, proc=None, what=""):
    deadline = t0 + TIMEOUT
    last_log = time.monotonic()
    global FIRST
    FIRST = None
    while True:
        n = end_offsets(topics)
        if n > 0 and FIRST is None:
            FIRST = (time.monotonic(), n)
        if n >= expected:
            return time.monotonic(), n
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} after {n}/{expected} records")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: timed out at {n}/{expected} records")
        if time.monotonic() - last_log > 15:
            log(f"  {what}: {n}/{expected}")
            last_log = time.monotonic()
        time.sleep(0.1)


# ---------------------------------------------------------------- postgres
def slot_drop(name):
    for _ in range(100):
        r = psql(f"SELECT active FROM pg_replication_slots WHERE slot_name = '{name}'")
        if r == "":
            return
        if r == "f":
            psql(f"SELECT pg_drop_replication_slot('{name}')")
            return
        time.sleep(0.2)
    raise RuntimeError(f"slot {name} stays active")


def slot_wait_active(name, seconds=120, proc=None):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode} before streaming")
        if psql(f"SELECT active FROM pg_replication_slots WHERE slot_name = '{name}'") == "t":
            return
        time.sleep(0.1)
    raise RuntimeError(f"slot {name} never became active")




def setup_db():
    if psql(f"SELECT 1 FROM pg_database WHERE datname = '{DB}'", db="postgres") != "1":
        psql(f"CREATE DATABASE {DB}", db="postgres")
    for s in psql("SELECT slot_name FROM pg_replication_slots WHERE slot_name LIKE 'bench_%'").split():
        slot_drop(s)
    psql(f"DROP TABLE IF EXISTS bench_rows, bench_full; CREATE TABLE bench_rows ({COLS}); CREATE TABLE bench_full ({COLS});"
         "ALTER TABLE bench_full REPLICA IDENTITY FULL; CREATE SEQUENCE IF NOT EXISTS bench_ids;"
         "DROP PUBLICATION IF EXISTS bench_pub; CREATE PUBLICATION bench_pub FOR TABLE bench_rows, bench_full;")


def write_workload(w):
    n = WORKLOADS[w][1]
    if w == "a":
        psql(f"""DO $$ DECLARE base bigint; BEGIN
                 FOR k IN 0..{n // 1000 - 1} LOOP
                   base := nextval('bench_ids') * 1000;
                   INSERT INTO bench_rows SELECT {ROW_EXPR} FROM generate_series(base, base + 999) g;
                   COMMIT;
                 END LOOP; END $$""")
    elif w == "b":
        script = os.path.join(WORK, "single.sql")
        with open(script, "w") as f:
            f.write("INSERT INTO bench_rows SELECT " + ROW_EXPR +
                    " FROM (SELECT nextval('bench_ids') * 1000 AS g) x;\n")
        clients = 8
        r = subprocess.run([f"{PGBIN}/pgbench", "-h", "127.0.0.1", "-p", PGPORT, "-U", "postgres", "-n",
                            "-c", str(clients), "-j", "2", "-t", str(n // clients), "-f", script, DB],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(r.stderr)
    elif w == "c":
        psql(f"""DO $$ BEGIN
                 FOR k IN 0..{n // 1000 - 1} LOOP
                   UPDATE bench_full SET account = account + 1, amount = amount + 0.01, updated_at = now()
                    WHERE id >= k * 1000 AND id < (k + 1) * 1000;
                   COMMIT;
                 END LOOP; END $$""")
    elif w == "e":
        psql(f"INSERT INTO bench_rows SELECT {ROW_EXPR} FROM generate_series(nextval('bench_ids') * 10000000, "
             f"currval('bench_ids') * 10000000 + {n - 1}) g")


def prepare_workload(w):
    """Empties the table, creates every reader's slot, writes the workload."""
    n = WORKLOADS[w][1]
    psql("TRUNCATE bench_rows")
    if w == "c":
        psql(f"TRUNCATE bench_full; INSERT INTO bench_full SELECT {ROW_EXPR} FROM generate_series(0, {n - 1}) g")
        psql("VACUUM ANALYZE bench_full")
    psql("CHECKPOINT")
    for s in SYSTEMS:
        psql(f"SELECT pg_create_logical_replication_slot('{slot_name(s)}', 'pgoutput')")
    t0 = time.monotonic()
    write_workload(w)
    wt = time.monotonic() - t0
    end_lsn = psql("SELECT pg_current_wal_lsn()")
    wal = int(psql(f"SELECT pg_wal_lsn_diff('{end_lsn}', (SELECT restart_lsn FROM pg_replication_slots "
                   f"WHERE slot_name = '{slot_name(SYSTEMS[0])}'))"))
    log(f"workload {w}: {n} rows written in {wt:.1f} s ({n / wt:,.0f} rows/s), WAL {wal / 1e6:.0f} MB, end {end_lsn}")
    return end_lsn, wt, wal


SHORT = {"pg_recvlogical": "recv", "walcast-json": "wcj", "walcast-avro": "wca", "debezium": "dbz"}


def slot_name(system):
    return "bench_" + system.replace("-", "_").replace("pg_recvlogical", "recv")


# ---------------------------------------------------------------- readers
def run_recvlogical(w, end_lsn):
    t0 = time.monotonic()
    p = subprocess.Popen([f"{PGBIN}/pg_recvlogical", "-h", "127.0.0.1", "-p", PGPORT, "-U", "postgres", "-d", DB,
                          "--slot", slot_name("pg_recvlogical"), "--start", "--endpos", end_lsn,
                          "-o", "proto_version=1", "-o", "publication_names=bench_pub", "-f", "/dev/null"])
    s = Sampler(p.pid)
    try:
        p.wait(timeout=TIMEOUT)
    finally:
        if p.poll() is None:
            p.kill()
    t1 = time.monotonic()
    r = s.stop()
    if p.returncode != 0:
        raise RuntimeError(f"pg_recvlogical exited {p.returncode}")
    r["seconds"] = t1 - t0
    return r


def walcast_config(name, fmt, prefix, slot, publication, tables, keyless=(), create_slot=False, admin_port=None):
    reg = f'\n[pipelines.{name}.registry]\nurl = "{REGISTRY}"\n' if fmt == "avro" else ""
    return f"""[admin]
listen = "127.0.0.1:{admin_port}"
[log]
level = "warn"
[pipelines.{name}]
kind = "capture"
topic_prefix = "{prefix}"
format = "{fmt}"
{reg}
[pipelines.{name}.source]
host = "127.0.0.1"
port = {PGPORT}
database = "{DB}"
user = "postgres"
slot = "{slot}"
publication = "{publication}"
create_slot = {str(create_slot).lower()}
create_publication = false
# Streaming only, as Debezium's snapshot.mode = no_data here: the latency
# run creates its slot, and an initial snapshot of the pgbench tables would
# be measured as latency.
snapshot = "never"
tables = {json.dumps(list(tables))}
keyless_tables = {json.dumps(list(keyless))}
[[pipelines.{name}.sinks]]
type = "kafka"
bootstrap_servers = "{BOOT}"
create_topics = false
""" + E.get("WALCAST_BENCH_SINK_EXTRA", "")


class Walcast:
    def __init__(self, tag, fmt, prefix, slot, publication, tables, keyless=(), create_slot=False):
        self.port = free_port()
        d = os.path.join(WORK, f"walcast-{tag}")
        os.makedirs(d, exist_ok=True)
        cfg = os.path.join(d, "walcast.toml")
        with open(cfg, "w") as f:
            f.write(walcast_config("bench", fmt, prefix, slot, publication, tables, keyless, create_slot, self.port))
        self.logf = open(os.path.join(d, "walcast.log"), "ab")
        self.p = subprocess.Popen([BIN, "run", "-c", cfg], stdin=subprocess.DEVNULL, stdout=self.logf, stderr=self.logf)

    def http(self, path):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as r:
            return r.read().decode()

    def stop(self):
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        self.logf.close()


def run_walcast(w, fmt, expected, topics, prefix):
    create_topics(topics)
    t0 = time.monotonic()
    wc = Walcast(f"{w}-{fmt}", fmt, prefix, slot_name(f"walcast-{fmt}"), "bench_pub", TABLES)
    s = Sampler(wc.p.pid)
    try:
        t1, n = wait_offsets(topics, expected, t0, wc.p, f"walcast-{fmt}")
    finally:
        r = s.stop()
        wc.stop()
    r.update(seconds=t1 - t0, records=n, first_s=FIRST[0] - t0,
             steady_rows_s=(n - FIRST[1]) / max(1e-3, t1 - FIRST[0]))
    return r


def connect_req(method, path, body=None):
    req = urllib.request.Request(CONNECT + path, method=method,
                                 data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        txt = r.read().decode()
        return json.loads(txt) if txt else None


def debezium_config(name, prefix, slot, publication, tables):
    return {"name": name, "config": {
        "connector.class": "io.debezium.connector.postgresql.PostgresConnector",
        "tasks.max": "1",
        "plugin.name": "pgoutput",
        "database.hostname": "127.0.0.1", "database.port": PGPORT, "database.user": "postgres",
        "database.password": "unused", "database.dbname": DB,
        "slot.name": slot, "publication.name": publication, "publication.autocreate.mode": "filtered",
        "table.include.list": ",".join(tables), "topic.prefix": prefix,
        "snapshot.mode": "no_data",
        "key.converter": "org.apache.kafka.connect.json.JsonConverter", "key.converter.schemas.enable": "false",
        "value.converter": "org.apache.kafka.connect.json.JsonConverter", "value.converter.schemas.enable": "false",
        # throughput tuning per Debezium's docs
        "max.batch.size": "20480", "max.queue.size": "81920", "poll.interval.ms": "50",
        # the producer as walcast's defaults: idempotent, acks=all, zstd, linger 5 ms
        "producer.override.linger.ms": "5", "producer.override.batch.size": "524288",
        "producer.override.compression.type": "zstd", "producer.override.acks": "all",
        "producer.override.enable.idempotence": "true",
    }}


def connect_pid():
    with open(CONNECT_PID) as f:
        return int(f.read().strip())


def run_debezium(w, expected, topics, prefix, slot="bench_debezium", publication="bench_pub", tables=TABLES):
    create_topics(topics)
    name = f"bench-{prefix}"
    s = Sampler(connect_pid())
    t0 = time.monotonic()
    connect_req("POST", "/connectors", debezium_config(name, prefix, slot, publication, tables))
    try:
        t1, n = wait_offsets(topics, expected, t0, None, "debezium")
    finally:
        r = s.stop()
        connect_req("DELETE", f"/connectors/{name}")
    r.update(seconds=t1 - t0, records=n, first_s=FIRST[0] - t0,
             steady_rows_s=(n - FIRST[1]) / max(1e-3, t1 - FIRST[0]))
    return r


def throughput(w):
    desc, n, table = WORKLOADS[w]
    log(f"=== workload {w}: {desc}, {n} events")
    end_lsn, wt, wal = prepare_workload(w)
    res = {"workload": w, "desc": desc, "events": n, "write_s": wt, "wal_bytes": wal, "systems": {}}
    for s in SYSTEMS:
        prefix = f"b{RUN_ID}{w}{SHORT[s]}"
        topics = [f"{prefix}.public.{table}"]
        try:
            if s == "pg_recvlogical":
                r = run_recvlogical(w, end_lsn)
            elif s.startswith("walcast-"):
                r = run_walcast(w, s.split("-")[1], n, topics, prefix)
            elif s == "debezium":
                r = run_debezium(w, n, topics, prefix)
            r["rows_s"] = n / r["seconds"]
            r["cpu_per_100k"] = r["cpu_s"] / n * 100_000
            log(f"  {s}: {r['seconds']:.2f} s, {r['rows_s']:,.0f} rows/s (first record after {r.get('first_s', 0):.1f} s, "
                f"then {r.get('steady_rows_s', r['rows_s']):,.0f} rows/s), peak RSS {r['peak_rss'] / 2**20:.0f} MiB, "
                f"CPU {r['cpu_s']:.1f} s ({r['cpu_per_100k']:.2f} s/100k)")
        except Exception as e:
            log(f"  {s}: FAILED: {e}")
            r = {"error": str(e)}
        res["systems"][s] = r
        slot_drop(slot_name(s))
    return res


# ---------------------------------------------------------------- latency
def setup_pgbench():
    r = subprocess.run([f"{PGBIN}/pgbench", "-h", "127.0.0.1", "-p", PGPORT, "-U", "postgres", "-i", "-q",
                        "-s", "10", "-I", "dtgvp", DB], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(r.stderr)
    # pgbench_history has no key and is insert-only; walcast refuses a
    # key-less table with REPLICA IDENTITY DEFAULT (even in keyless_tables),
    # so it gets FULL, for every system alike (inserts log no old row).
    psql("ALTER TABLE pgbench_history REPLICA IDENTITY FULL")
    psql("DROP PUBLICATION IF EXISTS bench_lat_pub; CREATE PUBLICATION bench_lat_pub FOR TABLE "
         + ", ".join(LAT_TABLES))


def pgbench_rate():
    r = subprocess.run([f"{PGBIN}/pgbench", "-h", "127.0.0.1", "-p", PGPORT, "-U", "postgres", "-n",
                        "-c", "8", "-j", "2", "-R", str(LAT_TPS), "-T", str(LAT_SECONDS), DB],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(r.stderr + r.stdout)
    m = re.search(r"number of transactions actually processed: (\d+)", r.stdout)
    return int(m.group(1)), r.stdout


def consume_latencies(topics, expected):
    c = Consumer({"bootstrap.servers": BOOT, "group.id": f"bench-lat-{time.time()}", "auto.offset.reset": "earliest",
                  "enable.auto.commit": False})
    c.assign([TopicPartition(t, p, 0) for t in topics for p in range(PARTITIONS)])
    lat, got, deadline = [], 0, time.monotonic() + 300
    while got < expected and time.monotonic() < deadline:
        for m in c.consume(num_messages=5000, timeout=1.0):
            if m.error() or m.value() is None:
                continue
            got += 1
            v = json.loads(m.value())
            ts_us = v["source"].get("ts_us") or v["source"]["ts_ms"] * 1000
            lat.append(m.timestamp()[1] - ts_us / 1000.0)
    c.close()
    return sorted(lat)


def pct(xs, q):
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def histogram_quantiles(metrics_text):
    """p50/p99 from walcast_commit_to_ack_seconds buckets (upper bounds)."""
    b = {}
    for m in re.finditer(r'walcast_commit_to_ack_seconds_bucket\{[^}]*le="([^"]+)"[^}]*\}\s+(\d+)', metrics_text):
        le = float("inf") if m.group(1) == "+Inf" else float(m.group(1))
        b[le] = b.get(le, 0) + int(m.group(2))
    if not b or max(b.values()) == 0:
        return None
    total = b[max(b)]
    out = {}
    for q in (0.5, 0.99):
        out[q] = next(le for le in sorted(b) if b[le] >= q * total) * 1000
    return out


def latency(system):
    log(f"=== latency: {system}, pgbench TPC-B-like at {LAT_TPS} tx/s (~{LAT_TPS * 4} rows/s) for {LAT_SECONDS} s")
    prefix = f"l{RUN_ID}{SHORT[system]}"
    topics = [f"{prefix}.{t}" for t in LAT_TABLES]
    create_topics(topics)
    slot = "bench_lat_" + system.replace("-", "_")
    wc = None
    t_start = time.monotonic()
    if system == "debezium":
        name = f"bench-{prefix}"
        connect_req("POST", "/connectors", debezium_config(name, prefix, slot, "bench_lat_pub", LAT_TABLES))
        pid = connect_pid()
    else:
        wc = Walcast(f"lat-{system}", system.split("-")[1], prefix, slot, "bench_lat_pub", LAT_TABLES,
                     keyless=["public.pgbench_history"], create_slot=True)
        pid = wc.p.pid
    res = {}
    try:
        slot_wait_active(slot, proc=wc.p if wc else None)
        time.sleep(2)
        base = end_offsets(topics)
        s = Sampler(pid)
        txs, out = pgbench_rate()
        expected = txs * 4
        res["tps"] = txs / LAT_SECONDS
        wait_offsets(topics, base + expected, t_start, wc.p if wc else None, system)
        r = s.stop()
        res.update(peak_rss=r["peak_rss"], cpu_s=r["cpu_s"], cpu_per_100k=r["cpu_s"] / expected * 100_000, events=expected)
        if wc:
            q = histogram_quantiles(wc.http("/metrics"))
            if q:
                res["histogram_p50_ms"], res["histogram_p99_ms"] = q[0.5], q[0.99]
    finally:
        if wc:
            wc.stop()
        else:
            connect_req("DELETE", f"/connectors/{name}")
    lat = consume_latencies(topics, base + expected)
    slot_drop(slot)
    res.update(p50=pct(lat, 0.5), p99=pct(lat, 0.99), max=lat[-1] if lat else float("nan"), n=len(lat), lat=lat)
    log(f"  {system}: {res['tps']:.0f} tx/s, {len(lat)} records, p50 {res['p50']:.1f} ms, p99 {res['p99']:.1f} ms, "
        f"max {res['max']:.1f} ms" + (f"; histogram p50<={res['histogram_p50_ms']:.0f} ms p99<={res['histogram_p99_ms']:.0f} ms"
                                      if "histogram_p50_ms" in res else ""))
    return res


# ---------------------------------------------------------------- report
def machine():
    model = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem = int(f.readline().split()[1]) / 2**20
    return f"{os.cpu_count()} CPU ({model}), {mem:.0f} GiB RAM, {platform.system()} {platform.release()}"


def fmt(x, spec=",.0f"):
    return "—" if x is None or x != x else format(x, spec)


def command_line(script):
    """The run's command as it could be typed again: the WALCAST_BENCH_* and
    WALCAST_STACK_PG_FSYNC settings it saw, then the script."""
    env = " ".join(f"{k}={v}" for k, v in sorted(E.items())
                   if k.startswith("WALCAST_BENCH_") and k not in ("WALCAST_BENCH_COMMIT", "WALCAST_BENCH_BIN"))
    return f"{env} {script}".strip()


def report(results, lats, micro, started):
    commit = E.get("WALCAST_BENCH_COMMIT")
    dirty = ""
    if not commit:
        commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True).stdout.strip()
    load = os.getloadavg()
    L = [f"\n## {started:%Y-%m-%d %H:%M} — commit {commit}{' (+ uncommitted changes)' if dirty else ''}\n",
         f"- machine: {machine()}; load average at start {load[0]:.1f} (the machine is shared)",
         f"- command: `{command_line('tests/bench/run')}`",
         f"- scale {SCALE} (WALCAST_BENCH_SCALE; 1.0 = the issue's full sizes), {PARTITIONS} partitions per topic, "
         f"Postgres 15 with fsync on, Kafka 4.3.1 single node, Debezium 3.6.1.Final on Connect 4.3.1 (heap 512 MB)",
         "- catch-up method: all slots created, workload written, then each reader alone from its start "
         "(process/connector start included) to its last record durable in Kafka (end offsets) — pg_recvlogical to --endpos\n",
         "| workload | events | WAL MB | system | s | rows/s | × ceiling | walcast ÷ Debezium | 1st record s | rows/s after 1st | peak RSS MiB | CPU s / 100k |",
         "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        ceil = r["systems"].get("pg_recvlogical", {}).get("rows_s")
        dbz = r["systems"].get("debezium", {}).get("rows_s")
        for s, x in r["systems"].items():
            if "error" in x:
                L.append(f"| {r['workload']} {r['desc']} | {r['events']:,} | {r['wal_bytes'] / 1e6:.0f} | {s} | failed: {x['error'][:80]} |||||||")
                continue
            rc = fmt(x["rows_s"] / ceil, ".2f") if ceil else "—"
            rd = fmt(x["rows_s"] / dbz, ".2f") if dbz and s.startswith("walcast") else ""
            L.append(f"| {r['workload']} {r['desc']} | {r['events']:,} | {r['wal_bytes'] / 1e6:.0f} | {s} | {x['seconds']:.1f} | "
                     f"{fmt(x['rows_s'])} | {rc} | {rd} | {fmt(x.get('first_s'), '.1f')} | {fmt(x.get('steady_rows_s'))} | "
                     f"{x['peak_rss'] / 2**20:.0f} | {x['cpu_per_100k']:.2f} |")
    if lats:
        L += ["", f"Latency, commit (source.ts_us) to Kafka append (LogAppendTime), pgbench TPC-B-like -R {LAT_TPS} "
                  f"(4 row changes per tx) for {LAT_SECONDS} s, each system alone:\n",
              "| system | achieved tx/s | records | p50 ms | p99 ms | max ms | peak RSS MiB | CPU s / 100k | walcast histogram p50/p99 ms (bucket bounds) |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        for s, x in lats.items():
            if "error" in x:
                L.append(f"| {s} | failed: {x['error'][:80]} ||||||||")
                continue
            h = f"≤{x['histogram_p50_ms']:.0f} / ≤{x['histogram_p99_ms']:.0f}" if "histogram_p50_ms" in x else ""
            L.append(f"| {s} | {x['tps']:.0f} | {x['n']:,} | {x['p50']:.1f} | {x['p99']:.1f} | {x['max']:.1f} | "
                     f"{x['peak_rss'] / 2**20:.0f} | {x['cpu_per_100k']:.2f} | {h} |")
    if micro:
        L += ["", "Micro-benchmarks (criterion, one thread = per core), 8-column row:\n", "| benchmark | events/s per core |", "|---|---:|"]
        for k, v in micro:
            L.append(f"| {k} | {v:,.0f} |")
    L.append("\nCharts: [throughput](throughput.png), [latency CDF](latency_cdf.png), [RSS over time](rss.png)\n")
    path = os.path.join(HERE, "RESULTS.md")
    if not os.path.exists(path):
        with open(path, "w") as f:
            f.write("# walcast benchmark results\n\nAppended by `tests/bench/run` (see tests/bench/bench.py for the method). "
                    "Tracked goals, not assertions. The PNGs next to this file are from the latest run.\n"
                    "Columns: *s* and *rows/s* from the reader's start (process or connector start-up included) to its last "
                    "record durable in Kafka; *× ceiling* = rows/s ÷ pg_recvlogical's rows/s on the same WAL; "
                    "*1st record s* / *rows/s after 1st* separate start-up from streaming; RSS is the sampled peak "
                    "(Debezium: the whole Connect JVM); CPU is utime+stime of that process per 100k events.\n")
    with open(path, "a") as f:
        f.write("\n".join(L) + "\n")
    print("\n".join(L))


def charts(results, lats):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    colors = {"pg_recvlogical": "#888888", "walcast-json": "#1f77b4", "walcast-avro": "#2ca02c", "debezium": "#d62728"}
    # throughput
    fig, ax = plt.subplots(figsize=(10, 5.5))
    width = 0.8 / max(1, len(SYSTEMS))
    for i, s in enumerate(SYSTEMS):
        xs, ys = [], []
        for j, r in enumerate(results):
            x = r["systems"].get(s, {})
            if "rows_s" in x:
                xs.append(j + i * width)
                ys.append(x["rows_s"])
        bars = ax.bar(xs, ys, width, label=s, color=colors.get(s))
        for b, y in zip(bars, ys):
            ax.text(b.get_x() + b.get_width() / 2, y, f"{y / 1000:.0f}k", ha="center", va="bottom", fontsize=8)
    ax.set_xticks([j + width * (len(SYSTEMS) - 1) / 2 for j in range(len(results))])
    ax.set_xticklabels([f"({r['workload']}) " + r['desc'].replace(", ", "\n") + f"\n{r['events']:,} events" for r in results], fontsize=8)
    ax.set_ylabel("rows/s (catch-up, to durable in Kafka)")
    ax.set_title(f"Catch-up throughput, scale {SCALE} ({time.strftime('%Y-%m-%d')})")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(HERE, "throughput.png"), dpi=110)
    plt.close(fig)
    # latency CDF
    if lats:
        fig, ax = plt.subplots(figsize=(8, 5))
        for s, x in lats.items():
            if x.get("lat"):
                n = len(x["lat"])
                ax.plot(x["lat"], [(i + 1) / n for i in range(n)], label=f"{s} at {x['tps']:.0f} tx/s achieved (p50 {x['p50']:.0f} ms, p99 {x['p99']:.0f} ms)",
                        color=colors.get(s))
        ax.set_xscale("log")
        ax.set_xlim(left=1)
        ax.set_xlabel("commit → Kafka append latency, ms (log scale)")
        ax.set_ylabel("fraction of records")
        ax.set_title(f"Latency CDF, pgbench TPC-B-like, target {LAT_TPS} tx/s (4 rows/tx), each system alone")
        ax.grid(alpha=0.3, which="both")
        ax.legend(loc="lower right")
        fig.tight_layout()
        fig.savefig(os.path.join(HERE, "latency_cdf.png"), dpi=110)
        plt.close(fig)
    # RSS over time for (a) and (e)
    sel = [r for r in results if r["workload"] in ("a", "e")]
    if sel:
        fig, axes = plt.subplots(1, len(sel), figsize=(6 * len(sel), 4.5), squeeze=False)
        for ax, r in zip(axes[0], sel):
            for s, x in r["systems"].items():
                if x.get("rss_series"):
                    ax.plot([t for t, _ in x["rss_series"]], [v / 2**20 for _, v in x["rss_series"]], label=s, color=colors.get(s))
            ax.set_title(f"({r['workload']}) {r['desc']}, {r['events']:,} events", fontsize=10)
            ax.set_xlabel("seconds since reader start")
            ax.set_ylabel("RSS MiB (Debezium: whole Connect JVM)")
            ax.set_yscale("log")
            ax.set_ylim(bottom=1)
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(HERE, "rss.png"), dpi=110)
        plt.close(fig)


def micro_results():
    """Criterion estimates written by `cargo bench` (run by tests/bench/run)."""
    base = os.path.join(E.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")), "criterion")
    out = []
    for group in ("pgoutput", "convert", "json", "avro"):
        d = os.path.join(base, group)
        if not os.path.isdir(d):
            continue
        for b in sorted(os.listdir(d)):
            f = os.path.join(d, b, "new", "estimates.json")
            if os.path.exists(f):
                with open(f) as fh:
                    ns = json.load(fh)["median"]["point_estimate"]
                out.append((f"{group}/{b}", 1e9 / ns))
    return out


def main():
    os.makedirs(WORK, exist_ok=True)
    if sys.argv[1:] == ["--charts-only"]:  # redraw the PNGs from the last run's raw data
        with open(os.path.join(WORK, "raw.json")) as f:
            raw = json.load(f)
        charts(raw["results"], raw["latency"])
        return
    started = datetime.datetime.now()
    log(f"scale {SCALE}, systems {SYSTEMS}, binary {BIN}")
    setup_db()
    only = E.get("WALCAST_BENCH_WORKLOADS", "a,b,c,e,d").split(",")
    results, lats = [], {}
    for w in ("a", "b", "c", "e"):
        if w in only:
            results.append(throughput(w))
    if "d" in only:
        setup_pgbench()
        for s in [s for s in SYSTEMS if s in ("walcast-json", "debezium")]:
            try:
                lats[s] = latency(s)
            except Exception as e:
                log(f"  {s}: latency FAILED: {e}")
                lats[s] = {"error": str(e)}
    with open(os.path.join(WORK, "raw.json"), "w") as f:
        json.dump({"results": results, "latency": lats}, f)
    if E.get("WALCAST_BENCH_NO_REPORT") != "1":
        report(results, lats, micro_results(), started)
        charts(results, lats)
    with open(os.path.join(WORK, "results.json"), "w") as f:
        json.dump({"results": [{**r, "systems": {k: {kk: vv for kk, vv in v.items() if kk != "rss_series"}
                                                  for k, v in r["systems"].items()}} for r in results],
                   "latency": {k: {kk: vv for kk, vv in v.items() if kk != "lat"} for k, v in lats.items()}}, f, indent=1)


if __name__ == "__main__":
    main()
