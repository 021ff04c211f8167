#!/usr/bin/env python3
"""Relay sinks against their servers' own limits (issue 26, "sinks near
their servers' limits").

N rows of the 8-column benchmark table (benchlib's COLS / ROW_EXPR) are put
into one Kafka topic once (a walcast capture, `snapshot = "initial_only"`,
JSON, 3 partitions; not timed). Then, in the same run, one after the other:

  relay → Redis        `walcast run` with a relay pipeline (a new consumer
                       group) and a Redis sink in `upsert` mode, JSON
                       documents: timed from process start until the group's
                       committed offsets reach the topic's end (the relay
                       commits only what the sink applied).
  redis-cli --pipe     the same keys and values walcast wrote (the document
                       and its `<key>:__v` version marker, read back from
                       Redis after the relay run), as plain SETs in RESP
                       from a file through `redis-cli --pipe` (Redis's own
                       mass-insertion client: one connection, fully
                       pipelined), after FLUSHDB.
  EVALSHA --pipe       the same rows as walcast's own versioned writes
                       (EVALSHA of its compare-and-set script, taken from
                       connectors/redis/src/request.rs, with the same key,
                       version key, version and document), through
                       `redis-cli --pipe`, after FLUSHDB: the server's rate
                       for the writes walcast must make.
  relay → OpenSearch   the same, with an elasticsearch sink.
  plain _bulk          the documents walcast indexed (read back with their
                       ids), as `index` actions in NDJSON files of
                       `bulk_max_actions` (1000) actions, POSTed one after the
                       other over one keep-alive connection into a fresh
                       index with the same mapping.

The ceilings do less than walcast: no Kafka, no decoding, no versions
(walcast's Redis upsert is a compare-and-set script per row; its bulk uses
`version_type=external_gte`). The ratio is what a user pays for ordering and
replay safety on top of the server's raw write rate.

WALCAST_BENCH_RELAY_EXTRA: TOML lines added to the relays' `source` table
(for experiments, e.g. `consumer = { "queued.max.messages.kbytes" = "16384" }`).

Prints the figures and returns them as JSON on the last line (for
tests/bench/run); appends a section to tests/bench/RESULTS.md when run
alone (WALCAST_BENCH_APPEND=1, the default).
"""

import datetime
import http.client
import json
import os
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import benchlib
import redis
from benchlib import COLS, ROW_EXPR, free_port, log
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
E = os.environ
SCALE = float(E.get("WALCAST_BENCH_SCALE", "0.2"))
N = int(float(E.get("WALCAST_BENCH_SINK_ROWS", str(max(10_000, int(500_000 * SCALE))))))
BIN = E.get("WALCAST_BENCH_BIN", os.path.join(ROOT, "target", "bench", "release", "walcast"))
WORK = os.path.join(E.get("WALCAST_BENCH_WORK", os.path.join(ROOT, "target", "bench-run")), "sinks")
PGPORT = E["WALCAST_TEST_PG_PORT"]
BOOT = E["WALCAST_TEST_KAFKA_BOOTSTRAP"]
REDIS_PORT = E["WALCAST_TEST_REDIS_PORT"]
OPENSEARCH = E["WALCAST_TEST_OPENSEARCH_URL"].rstrip("/")
DB = "walcast_bench_sinks"
TOPIC = "sinkbench.public.sink_rows"
TIMEOUT = float(E.get("WALCAST_BENCH_TIMEOUT", "900"))
RUN_ID = datetime.datetime.now().strftime("%H%M%S")
BULK_ACTIONS = 1000


def psql(sql, db=DB):
    return benchlib.psql(sql, db)


def redis_cli(*args, stdin=None):
    r = subprocess.run(["redis-cli", "-p", REDIS_PORT, *args], input=stdin, capture_output=True)
    if r.returncode != 0:
        raise RuntimeError(f"redis-cli {args}: {r.stderr.decode()}")
    return r.stdout


def os_req(method, path, body=None, ctype="application/json"):
    data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(OPENSEARCH + path, data=data, method=method, headers={"Content-Type": ctype})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read() or b"null")


def rss_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def run_walcast(tag, body, done):
    """Starts walcast with `body` as its config, waits until done() or exit; returns (seconds, peak RSS KiB)."""
    d = os.path.join(WORK, tag)
    os.makedirs(d, exist_ok=True)
    cfg = os.path.join(d, "walcast.toml")
    with open(cfg, "w") as f:
        f.write(f'[admin]\nlisten = "127.0.0.1:{free_port()}"\n[log]\nlevel = "warn"\n' + body)
    logf = open(os.path.join(d, "walcast.log"), "ab")
    t0 = time.monotonic()
    p = subprocess.Popen([BIN, "run", "-c", cfg], stdin=subprocess.DEVNULL, stdout=logf, stderr=logf)
    peak = 0
    try:
        while True:
            peak = max(peak, rss_kib(p.pid))
            if done is None and p.poll() is not None:
                if p.returncode != 0:
                    raise RuntimeError(f"{tag}: walcast exited {p.returncode}; see {d}/walcast.log")
                break
            if done is not None and done():
                break
            if done is not None and p.poll() is not None:
                raise RuntimeError(f"{tag}: walcast exited {p.returncode}; see {d}/walcast.log")
            if time.monotonic() - t0 > TIMEOUT:
                raise RuntimeError(f"{tag}: not done after {TIMEOUT:.0f} s; see {d}/walcast.log")
            time.sleep(0.1)
        return time.monotonic() - t0, peak
    finally:
        if p.poll() is None:
            p.terminate()
            p.wait(timeout=60)
        logf.close()


def setup():
    if psql(f"SELECT 1 FROM pg_database WHERE datname = '{DB}'", db="postgres") != "1":
        psql(f"CREATE DATABASE {DB}", db="postgres")
    psql("DROP TABLE IF EXISTS sink_rows")
    psql(f"CREATE TABLE sink_rows ({COLS})")
    psql(f"INSERT INTO sink_rows SELECT {ROW_EXPR} FROM generate_series(1, {N}) g")
    admin = AdminClient({"bootstrap.servers": BOOT})
    if TOPIC in admin.list_topics(timeout=10).topics:
        for f in admin.delete_topics([TOPIC]).values():
            f.result()
        time.sleep(2)
    slot = f"sinkbench_{RUN_ID}"
    body = f"""[pipelines.fill]
kind = "capture"
topic_prefix = "sinkbench"
format = "json"
state_dir = "{WORK}/fill-state-{RUN_ID}"
[pipelines.fill.source]
host = "127.0.0.1"
port = {PGPORT}
database = "{DB}"
user = "postgres"
tables = ["public.sink_rows"]
slot = "{slot}"
publication = "sinkbench_pub"
snapshot = "initial_only"
[[pipelines.fill.sinks]]
type = "kafka"
bootstrap_servers = "{BOOT}"
create_topics = true
topic_creation = {{ partitions = 3 }}
"""
    s, _ = run_walcast("fill", body, None)
    psql(f"SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = '{slot}'")
    n = sum(end_offsets())
    if n != N:
        raise RuntimeError(f"the topic holds {n} records, not {N}")
    log(f"topic {TOPIC}: {N:,} records (filled in {s:.1f} s)")


def end_offsets():
    c = Consumer({"bootstrap.servers": BOOT, "group.id": "sinkbench-probe", "enable.auto.commit": False})
    try:
        parts = c.list_topics(TOPIC, timeout=10).topics[TOPIC].partitions
        return [c.get_watermark_offsets(TopicPartition(TOPIC, p), timeout=10)[1] for p in sorted(parts)]
    finally:
        c.close()


def committed_done(group, ends):
    c = Consumer({"bootstrap.servers": BOOT, "group.id": group, "enable.auto.commit": False})

    def done():
        tps = c.committed([TopicPartition(TOPIC, p) for p in range(len(ends))], timeout=10)
        return all(tp.offset >= end for tp, end in zip(tps, ends))
    return c, done


def relay(tag, sink_toml):
    group = f"sinkbench-{tag}-{RUN_ID}"
    ends = end_offsets()
    c, done = committed_done(group, ends)
    body = f"""[pipelines.relay]
kind = "relay"
[pipelines.relay.source]
bootstrap_servers = "{BOOT}"
group_id = "{group}"
subscribe = {{ topics = ["{TOPIC}"] }}
{E.get("WALCAST_BENCH_RELAY_EXTRA", "")}
[[pipelines.relay.sinks]]
{sink_toml}
"""
    try:
        return run_walcast(f"relay-{tag}", body, done)
    finally:
        c.close()


def redis_pair():
    redis_cli("FLUSHDB")
    s, rss = relay("redis", f'type = "redis"\nurls = ["redis://127.0.0.1:{REDIS_PORT}/"]\n'
                           'mode = { type = "upsert", key_template = "{schema}.{table}:{id}", format = "json" }')
    keys = int(redis_cli("DBSIZE").decode().strip())
    if keys != 2 * N:
        raise RuntimeError(f"Redis holds {keys} keys after the relay, not {2 * N} (a document and a version each)")
    log(f"relay → Redis: {s:.2f} s = {N / s:,.0f} rows/s, peak RSS {rss / 1024:.0f} MiB")
    # The same keys and values, read back, as RESP SETs.
    r = redis.Redis(port=int(REDIS_PORT))
    resp = bytearray()
    pairs = 0
    batch = []

    def flush():
        nonlocal pairs
        for k, v in zip(batch, r.mget(batch)):
            resp.extend(b"*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (len(k), k, len(v), v))
            pairs += 1
        batch.clear()
    for k in r.scan_iter(count=5000):
        batch.append(k)
        if len(batch) == 5000:
            flush()
    flush()
    r.close()
    if pairs != 2 * N:
        raise RuntimeError(f"read back {pairs} keys, not {2 * N}")
    path = os.path.join(WORK, "redis.resp")
    with open(path, "wb") as f:
        f.write(resp)
    redis_cli("FLUSHDB")
    t0 = time.monotonic()
    with open(path, "rb") as f:
        r = subprocess.run(["redis-cli", "-p", REDIS_PORT, "--pipe"], stdin=f, capture_output=True)
    c = time.monotonic() - t0
    if r.returncode != 0 or b"errors: 0" not in r.stdout:
        raise RuntimeError(f"redis-cli --pipe: {r.stdout.decode()} {r.stderr.decode()}")
    log(f"redis-cli --pipe, same {2 * N:,} keys: {c:.2f} s = {N / c:,.0f} rows/s")
    # The same rows as walcast's own versioned writes: EVALSHA of its script
    # (taken from the source) with the same key, version key, version and
    # document, pipelined the same way: what the server itself can do with
    # compare-and-set writes, so the two ratios separate walcast's overhead
    # from the price of the version check.
    sha = redis_cli("SCRIPT", "LOAD", versioned_write_lua()).decode().strip()
    docs = {}
    versions = {}
    for line in resp_pairs(bytes(resp)):
        k, v = line
        if k.endswith(b":__v"):
            versions[k] = v
        else:
            docs[k] = v
    evals = bytearray()
    for k, doc in docs.items():
        vk = b"{" + k + b"}:__v"
        if vk not in versions:
            raise RuntimeError(f"no version key {vk!r} for {k!r}")
        args = [b"EVALSHA", sha.encode(), b"2", k, vk, versions[vk], b"set", b"0", b"0", doc]
        evals.extend(b"*%d\r\n" % len(args))
        for a in args:
            evals.extend(b"$%d\r\n%s\r\n" % (len(a), a))
    path = os.path.join(WORK, "redis-eval.resp")
    with open(path, "wb") as f:
        f.write(evals)
    redis_cli("FLUSHDB")
    t0 = time.monotonic()
    with open(path, "rb") as f:
        r = subprocess.run(["redis-cli", "-p", REDIS_PORT, "--pipe"], stdin=f, capture_output=True)
    ce = time.monotonic() - t0
    if r.returncode != 0 or b"errors: 0" not in r.stdout:
        raise RuntimeError(f"redis-cli --pipe (EVALSHA): {r.stdout.decode()} {r.stderr.decode()}")
    keys = int(redis_cli("DBSIZE").decode().strip())
    if keys != 2 * N:
        raise RuntimeError(f"the EVALSHA ceiling left {keys} keys, not {2 * N}")
    log(f"redis-cli --pipe, the same {N:,} versioned writes (EVALSHA): {ce:.2f} s = {N / ce:,.0f} rows/s")
    redis_cli("FLUSHDB")
    return {"relay_s": s, "relay_rss_kib": rss, "ceiling_s": c, "eval_ceiling_s": ce}


def versioned_write_lua():
    """walcast's compare-and-set script, as its source defines it."""
    src = open(os.path.join(ROOT, "connectors", "redis", "src", "request.rs"), encoding="utf-8").read()
    start = src.index('pub const VERSIONED_WRITE_LUA: &str = r#"') + len('pub const VERSIONED_WRITE_LUA: &str = r#"')
    return src[start:src.index('"#;', start)]


def resp_pairs(buf):
    """(key, value) of each SET in a RESP buffer written by redis_pair."""
    i = 0
    while i < len(buf):
        parts = []
        assert buf[i:i + 1] == b"*"
        j = buf.index(b"\r\n", i)
        n = int(buf[i + 1:j])
        i = j + 2
        for _ in range(n):
            j = buf.index(b"\r\n", i)
            ln = int(buf[i + 1:j])
            parts.append(buf[j + 2:j + 2 + ln])
            i = j + 2 + ln + 2
        yield parts[1], parts[2]


def opensearch_pair():
    for idx in ("public.sink_rows", "ceiling.sink_rows"):
        try:
            os_req("DELETE", "/" + urllib.parse.quote(idx))
        except urllib.error.HTTPError:
            pass
    s, rss = relay("opensearch", f'type = "elasticsearch"\nurl = "{OPENSEARCH}"')
    os_req("POST", "/public.sink_rows/_refresh")
    count = os_req("GET", "/public.sink_rows/_count")["count"]
    if count != N:
        raise RuntimeError(f"the index holds {count} documents after the relay, not {N}")
    log(f"relay → OpenSearch: {s:.2f} s = {N / s:,.0f} rows/s, peak RSS {rss / 1024:.0f} MiB")
    mapping = os_req("GET", "/public.sink_rows/_mapping")["public.sink_rows"]["mappings"]
    # The same documents, read back with their ids, into NDJSON files of BULK_ACTIONS actions.
    files, buf, n, after = [], [], 0, None
    while True:
        q = {"size": 5000, "sort": [{"_id": "asc"}], "query": {"match_all": {}}}
        if after is not None:
            q["search_after"] = after
        hits = os_req("POST", "/public.sink_rows/_search", q)["hits"]["hits"]
        if not hits:
            break
        for h in hits:
            buf.append(json.dumps({"index": {"_id": h["_id"]}}) + "\n" + json.dumps(h["_source"]) + "\n")
            n += 1
            if len(buf) == BULK_ACTIONS:
                files.append("".join(buf).encode())
                buf = []
        after = hits[-1]["sort"]
    if buf:
        files.append("".join(buf).encode())
    if n != N:
        raise RuntimeError(f"read back {n} documents, not {N}")
    os_req("DELETE", "/public.sink_rows")
    os_req("PUT", "/ceiling.sink_rows", {"mappings": mapping})
    host = urllib.parse.urlsplit(OPENSEARCH)
    conn = http.client.HTTPConnection(host.hostname, host.port, timeout=120)
    t0 = time.monotonic()
    for body in files:
        conn.request("POST", "/ceiling.sink_rows/_bulk", body, {"Content-Type": "application/x-ndjson"})
        r = conn.getresponse()
        out = json.loads(r.read())
        if r.status != 200 or out.get("errors"):
            raise RuntimeError(f"_bulk: {r.status} {str(out)[:500]}")
    c = time.monotonic() - t0
    conn.close()
    os_req("POST", "/ceiling.sink_rows/_refresh")
    count = os_req("GET", "/ceiling.sink_rows/_count")["count"]
    if count != N:
        raise RuntimeError(f"plain _bulk indexed {count} documents, not {N}")
    log(f"plain _bulk, same {N:,} documents: {c:.2f} s = {N / c:,.0f} rows/s")
    os_req("DELETE", "/ceiling.sink_rows")
    return {"relay_s": s, "relay_rss_kib": rss, "ceiling_s": c}


def section(res, started):
    commit = E.get("WALCAST_BENCH_COMMIT") or subprocess.run(
        ["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    load = os.getloadavg()
    rows = []
    for name, ceiling, key in (("relay → Redis (upsert, JSON)", "`redis-cli --pipe`, the same keys and values", "redis"),
                               ("relay → OpenSearch", "plain `_bulk` of the same documents, 1,000 per request", "opensearch")):
        r = res.get(key)
        if r is None or "error" in r:
            rows.append(f"| {name} | FAILED: {r.get('error') if r else 'not run'} | | | | | |")
            continue
        rows.append(f"| {name} | {r['relay_s']:.2f} | {N / r['relay_s']:,.0f} | {ceiling} | {N / r['ceiling_s']:,.0f} | "
                    f"{r['ceiling_s'] / r['relay_s']:.2f} | {r['relay_rss_kib'] / 1024:.0f} |")
        if "eval_ceiling_s" in r:
            rows.append(f"| {name} | {r['relay_s']:.2f} | {N / r['relay_s']:,.0f} | `redis-cli --pipe`, the same versioned "
                        f"writes (EVALSHA of walcast's script) | {N / r['eval_ceiling_s']:,.0f} | "
                        f"{r['eval_ceiling_s'] / r['relay_s']:.2f} | {r['relay_rss_kib'] / 1024:.0f} |")
    return "\n".join([
        "",
        f"## Sinks against their servers' limits, {started:%Y-%m-%d %H:%M} (commit {commit}, tests/bench/sinks.py)",
        "",
        f"{N:,} rows of the 8-column benchmark table in one 3-partition topic (JSON), each relay a new consumer group "
        f"timed from process start to its committed offsets at the topic's end; the ceiling client writes what walcast "
        f"wrote, read back from the server. {os.cpu_count()} cores, load average {load[0]:.1f} at the end.",
        "",
        "Command: `" + " ".join([f"{k}={v}" for k, v in sorted(E.items())
                                 if k in ("WALCAST_BENCH_SCALE", "WALCAST_BENCH_SINK_ROWS")] + ["tests/bench/run"]) + "`.",
        "",
        "| relay | seconds | rows/s | ceiling | ceiling rows/s | ÷ ceiling | peak RSS MiB |",
        "|---|---:|---:|---|---:|---:|---:|",
        *rows,
        "",
    ])


def main():
    os.makedirs(WORK, exist_ok=True)
    started = datetime.datetime.now()
    setup()
    res = {}
    for key, f in (("redis", redis_pair), ("opensearch", opensearch_pair)):
        try:
            res[key] = f()
        except Exception as e:  # one failing pair still reports the other
            log(f"{key}: FAILED: {e}")
            res[key] = {"error": str(e)}
    text = section(res, started)
    print(text)
    if E.get("WALCAST_BENCH_APPEND", "1") == "1":
        with open(os.path.join(HERE, "RESULTS.md"), "a") as f:
            f.write(text)
    with open(os.path.join(WORK, "results.json"), "w") as f:
        json.dump({"rows": N, **res}, f)
    return 1 if any("error" in r for r in res.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
