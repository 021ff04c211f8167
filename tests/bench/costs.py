#!/usr/bin/env python3
"""Cost curves (issue 26): how throughput and memory change as rows get
wider and as a pipeline captures more tables.

Width: three tables, each caught up from a backlog the way bench.py's
workloads are (every reader's slot created first, the rows written in
transactions, then each reader alone from its start to its last record
durable in Kafka; pg_recvlogical to --endpos is the ceiling on the same WAL):
  8 columns      the benchmark table (benchlib's COLS), 500k rows × scale
  50 columns     bigint/text/numeric/timestamptz/boolean columns, 200k × scale
  300 kB TOAST   an id, a label and a 300 kB text that does not compress
                 (md5 hex), 1,000 × scale rows, 10 per transaction
Tables: 1, 100 and 1,000 tables of the benchmark shape in one pipeline
(Avro, so each table also registers a key and a value schema; one partition
per topic), 100k × scale rows spread evenly, 1000-row transactions each on
one table; reported: the time to the first record (start-up: relation cache,
topic metadata, schema registration), the rows/s after it, peak RSS.

Run through tests/bench/run (WALCAST_BENCH_PARTS includes "costs") or alone
with the same environment. Prints the tables, appends them to RESULTS.md
(WALCAST_BENCH_APPEND=1, the default) and writes raw figures to
target/bench-run/costs/results.json.
"""

import datetime
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request

import bench
from bench import Sampler, log, psql, slot_drop
from confluent_kafka.admin import NewTopic

E = os.environ
SCALE = bench.SCALE
WORK = os.path.join(bench.WORK, "costs")
RUN_ID = bench.RUN_ID
READERS = E.get("WALCAST_BENCH_COST_READERS", "pg_recvlogical,walcast-json,walcast-avro").split(",")
TABLE_COUNTS = [int(x) for x in E.get("WALCAST_BENCH_COST_TABLES", "1,100,1000").split(",")]

COLS50 = ", ".join(["id bigint PRIMARY KEY"]
                   + [f"i{k} bigint" for k in range(10)] + [f"t{k} text" for k in range(10)]
                   + [f"n{k} numeric(12,2)" for k in range(10)] + [f"ts{k} timestamptz" for k in range(10)]
                   + [f"b{k} boolean" for k in range(9)])
EXPR50 = ", ".join(["g"] + [f"g * {k + 1}" for k in range(10)] + [f"'text value {k} of row ' || g" for k in range(10)]
                   + [f"(g % 100000) + {k} / 100.0" for k in range(10)] + ["now()"] * 10
                   + [f"g % {k + 2} = 0" for k in range(9)])
TOAST_COLS = "id bigint PRIMARY KEY, label text NOT NULL, body text NOT NULL"
TOAST_EXPR = "g, 'row ' || g, (SELECT string_agg(md5(g::text || '.' || i::text), '') FROM generate_series(1, 9375) i)"

WIDTHS = [
    # name, columns, row expression, rows, rows per transaction
    ("8 columns", bench.COLS, bench.ROW_EXPR, int(500_000 * SCALE), 1000),
    ("50 columns", COLS50, EXPR50, int(200_000 * SCALE), 1000),
    ("300 kB TOAST", TOAST_COLS, TOAST_EXPR, max(20, int(1_000 * SCALE)), 10),
]


def slot(reader, tag):
    return f"cost_{tag}_{reader.replace('-', '_').replace('pg_recvlogical', 'recv')}"


def write_rows(table, expr, rows, per_tx):
    psql(f"""DO $$ BEGIN
             FOR k IN 0..{(rows + per_tx - 1) // per_tx - 1} LOOP
               INSERT INTO {table} SELECT {expr}
                 FROM generate_series(k * {per_tx} + 1, least((k + 1) * {per_tx}, {rows})) g;
               COMMIT;
             END LOOP; END $$""")


def create_topics(topics, partitions):
    fs = bench.admin.create_topics([NewTopic(t, num_partitions=partitions, replication_factor=1) for t in topics])
    for f in fs.values():
        try:
            f.result()
        except Exception as e:
            if "TOPIC_ALREADY_EXISTS" not in str(e):
                raise


def end_offsets(consumer, topics, partitions):
    total, missing = 0, 0
    for t in topics:
        for p in range(partitions):
            try:
                total += consumer.get_watermark_offsets(bench.TopicPartition(t, p), timeout=5)[1]
            except Exception:
                missing += 1
    if missing:
        # A consumer may not know a topic created after its last metadata
        # refresh: ask for the topics' metadata before the next round.
        consumer.list_topics(timeout=10)
    return total


def wait_offsets(topics, partitions, expected, t0, proc, what):
    first = None
    consumer = bench.Consumer({"bootstrap.servers": bench.BOOT, "group.id": "walcast-bench-costs",
                               "enable.auto.commit": False})
    consumer.list_topics(timeout=10)
    try:
        while True:
            n = end_offsets(consumer, topics, partitions)
            now = time.monotonic()
            if n > 0 and first is None:
                first = (now, n)
            if n >= expected:
                return now, n, first
            if proc.poll() is not None:
                raise RuntimeError(f"{what} exited with {proc.returncode} after {n}/{expected} records")
            if now - t0 > bench.TIMEOUT:
                raise RuntimeError(f"{what}: timed out at {n}/{expected} records")
            time.sleep(0.2 if len(topics) > 50 else 0.1)
    finally:
        consumer.close()


def recvlogical(slot_name, publication, end_lsn):
    t0 = time.monotonic()
    p = subprocess.Popen([f"{bench.PGBIN}/pg_recvlogical", "-h", "127.0.0.1", "-p", bench.PGPORT, "-U", "postgres",
                          "-d", bench.DB, "--slot", slot_name, "--start", "--endpos", end_lsn,
                          "-o", "proto_version=1", "-o", f"publication_names={publication}", "-f", "/dev/null"])
    s = Sampler(p.pid)
    try:
        p.wait(timeout=bench.TIMEOUT)
    finally:
        if p.poll() is None:
            p.kill()
    r = s.stop()
    r.pop("rss_series")
    if p.returncode != 0:
        raise RuntimeError(f"pg_recvlogical exited {p.returncode}")
    r["seconds"] = time.monotonic() - t0
    return r


def walcast(tag, fmt, slot_name, publication, tables, topics, partitions, expected):
    prefix = topics[0].split(".")[0]
    t0 = time.monotonic()
    wc = bench.Walcast(f"cost-{tag}-{fmt}", fmt, prefix, slot_name, publication, tables)
    s = Sampler(wc.p.pid)
    try:
        t1, n, first = wait_offsets(topics, partitions, expected, t0, wc.p, f"walcast-{fmt}")
    finally:
        r = s.stop()
        wc.stop()
    r.pop("rss_series")
    r.update(seconds=t1 - t0, records=n, first_s=first[0] - t0,
             steady_rows_s=(n - first[1]) / max(1e-3, t1 - first[0]))
    return r


def measure(tag, tables, publication, write, expected, partitions):
    """Creates every reader's slot, writes, then runs each reader alone. Returns {reader: result}."""
    for r in READERS:
        slot_drop(slot(r, tag))
        psql(f"SELECT pg_create_logical_replication_slot('{slot(r, tag)}', 'pgoutput')")
    t0 = time.monotonic()
    write()
    wt = time.monotonic() - t0
    end_lsn = psql("SELECT pg_current_wal_lsn()")
    wal = int(psql(f"SELECT pg_wal_lsn_diff('{end_lsn}', (SELECT restart_lsn FROM pg_replication_slots "
                   f"WHERE slot_name = '{slot(READERS[0], tag)}'))"))
    log(f"{tag}: {expected:,} rows written in {wt:.1f} s, WAL {wal / 1e6:.0f} MB")
    out = {"wal_bytes": wal, "rows": expected, "readers": {}}
    for r in READERS:
        try:
            if r == "pg_recvlogical":
                res = recvlogical(slot(r, tag), publication, end_lsn)
            else:
                fmt = r.split("-")[1]
                prefix = f"c{RUN_ID}{tag}{fmt[0]}"
                topics = [f"{prefix}.{t}" for t in tables]
                create_topics(topics, partitions)
                res = walcast(tag, fmt, slot(r, tag), publication, tables, topics, partitions, expected)
            res["rows_s"] = expected / res["seconds"]
            log(f"  {r}: {res['seconds']:.2f} s, {res['rows_s']:,.0f} rows/s, peak RSS {res['peak_rss'] / 2**20:.0f} MiB"
                + (f", first record after {res['first_s']:.1f} s" if "first_s" in res else ""))
        except Exception as e:
            log(f"  {r}: FAILED: {e}")
            res = {"error": str(e)}
        out["readers"][r] = res
        slot_drop(slot(r, tag))
    return out


def widths():
    results = []
    for k, (name, cols, expr, rows, per_tx) in enumerate(WIDTHS):
        table = f"cost_w{k}"
        psql(f"DROP TABLE IF EXISTS {table}; CREATE TABLE {table} ({cols});"
             f"DROP PUBLICATION IF EXISTS cost_w{k}_pub; CREATE PUBLICATION cost_w{k}_pub FOR TABLE {table}")
        r = measure(f"w{k}", [f"public.{table}"], f"cost_w{k}_pub",
                    lambda: write_rows(table, expr, rows, per_tx), rows, bench.PARTITIONS)
        r["shape"] = name
        results.append(r)
        psql(f"DROP PUBLICATION cost_w{k}_pub; DROP TABLE {table}")
    return results


def subjects(topics):
    """How many of the topics' key and value subjects the registry has (one request each: a registry
    may page its subject list)."""
    n = 0
    for t in topics:
        for kind in ("key", "value"):
            try:
                with urllib.request.urlopen(f"{bench.REGISTRY.rstrip('/')}/subjects/{t}-{kind}/versions", timeout=30):
                    n += 1
            except urllib.error.HTTPError as e:
                if e.code != 404:
                    raise
    return n


def table_counts():
    results = []
    total = int(100_000 * SCALE)
    for count in TABLE_COUNTS:
        schema = f"cost_t{count}"
        names = [f"t{k:04d}" for k in range(count)]
        per_table = max(1, total // count)
        psql(f"DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema}")
        psql(f"""DO $$ BEGIN FOR k IN 0..{count - 1} LOOP
                   EXECUTE format('CREATE TABLE {schema}.%I ({bench.COLS})', 't' || lpad(k::text, 4, '0'));
                 END LOOP; END $$""")
        psql(f"DROP PUBLICATION IF EXISTS {schema}_pub; CREATE PUBLICATION {schema}_pub FOR TABLES IN SCHEMA {schema}")

        def write():
            # Each table's rows in transactions of at most 1000 rows, one table per transaction.
            psql(f"""DO $$ BEGIN FOR k IN 0..{count - 1} LOOP
                       FOR c IN 0..{(per_table + 999) // 1000 - 1} LOOP
                         EXECUTE format('INSERT INTO {schema}.%I SELECT {bench.ROW_EXPR.replace("'", "''").replace("%", "%%")} '
                                        'FROM generate_series(%s, %s) g', 't' || lpad(k::text, 4, '0'),
                                        c * 1000 + 1, least((c + 1) * 1000, {per_table}));
                         COMMIT;
                       END LOOP;
                     END LOOP; END $$""")
        r = measure(f"t{count}", [f"{schema}.{n}" for n in names], f"{schema}_pub", write, per_table * count, 1)
        avro = [f"c{RUN_ID}t{count}a.{schema}.{n}" for n in names]
        r.update(tables=count, subjects=subjects(avro) if "walcast-avro" in READERS else None)
        results.append(r)
        psql(f"DROP PUBLICATION {schema}_pub; DROP SCHEMA {schema} CASCADE")
    return results


def fmt_row(name, r, reader, ceiling):
    x = r["readers"].get(reader, {})
    if "error" in x or not x:
        return f"| {name} | {reader} | FAILED: {x.get('error', 'not run')} | | | | | |"
    ratio = f"{ceiling / x['seconds']:.2f}" if ceiling else ""
    first = f"{x['first_s']:.1f}" if "first_s" in x else "—"
    return (f"| {name} | {reader} | {x['seconds']:.2f} | {x['rows_s']:,.0f} | {r['wal_bytes'] / 1e6 / x['seconds']:.0f} | "
            f"{ratio} | {first} | {x['peak_rss'] / 2**20:.0f} |")


def report(ws, ts, started):
    commit = E.get("WALCAST_BENCH_COMMIT") or subprocess.run(
        ["git", "-C", bench.ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    lines = ["", f"## Cost curves, {started:%Y-%m-%d %H:%M} (commit {commit}, tests/bench/costs.py)", "",
             f"- scale {SCALE}; {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end; "
             "catch-up from a backlog as in the throughput table (each reader alone, slot created before the writes); "
             "× ceiling = pg_recvlogical's seconds ÷ the reader's on the same WAL",
             "- command: `" + " ".join([f"{k}={v}" for k, v in sorted(E.items())
                                        if k.startswith("WALCAST_BENCH_SCALE") or k.startswith("WALCAST_BENCH_COST")]
                                       + ["tests/bench/run"]) + "`", "",
             "| row shape (rows, WAL) | reader | s | rows/s | WAL MB/s | × ceiling | 1st record s | peak RSS MiB |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in ws:
        c = r["readers"].get("pg_recvlogical", {}).get("seconds")
        for reader in READERS:
            lines.append(fmt_row(f"{r['shape']} ({r['rows']:,}, {r['wal_bytes'] / 1e6:.0f} MB)", r, reader, c))
    lines += ["", "| tables in one pipeline (rows, WAL) | reader | s | rows/s | WAL MB/s | × ceiling | 1st record s | peak RSS MiB |",
              "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in ts:
        c = r["readers"].get("pg_recvlogical", {}).get("seconds")
        for reader in READERS:
            lines.append(fmt_row(f"{r['tables']:,} ({r['rows']:,}, {r['wal_bytes'] / 1e6:.0f} MB)", r, reader, c))
    lines.append("")
    lines.append("Registry subjects of the Avro tables runs (a key and a value subject per table): " + ", ".join(
        f"{r['tables']:,} tables → {r['subjects']}" for r in ts) + ".")
    lines.append("")
    return "\n".join(lines)


def main():
    os.makedirs(WORK, exist_ok=True)
    bench.setup_db()
    started = datetime.datetime.now()
    parts = E.get("WALCAST_BENCH_COST_PARTS", "widths,tables").split(",")
    ws = widths() if "widths" in parts else []
    ts = table_counts() if "tables" in parts else []
    text = report(ws, ts, started)
    print(text)
    if E.get("WALCAST_BENCH_APPEND", "1") == "1":
        with open(os.path.join(bench.HERE, "RESULTS.md"), "a") as f:
            f.write(text)
    with open(os.path.join(WORK, "results.json"), "w") as f:
        json.dump({"widths": ws, "tables": ts}, f, indent=1)
    failed = any("error" in x for r in ws + ts for x in r["readers"].values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
