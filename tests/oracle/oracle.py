#!/usr/bin/env python3
"""walcast's generative differential oracle (issue 21, section 1).

One run = one seed. From the seed it draws a schema (pgtypes.catalog: every
type of schemas/MAPPING.md, awkward identifiers, single/composite/no key,
REPLICA IDENTITY FULL and USING INDEX, partitioned tables), a walcast
config (format avro|json; relay mode: capture -> Kafka -> relay -> Redis +
OpenSearch; direct mode: capture -> Kafka + Redis + OpenSearch), runs
concurrent random DML (generator.Writer) for a while, optionally with
faults, then rebuilds every table from every output with off-the-shelf
clients and compares it with Postgres both ways (compare.py). Exit status
0 = no difference, 1 = differences (printed as repros), 2 = could not run.

Each run has its own database, topic prefixes, slots, publications,
consumer groups, Redis key prefixes and index names (`orc<seed>x<nonce>`),
and removes them at the end (its folder under target/oracle/ keeps the
config and walcast's log).

Outputs and what is compared:
- Kafka, every table (Avro via the registry, or JSON);
- Redis: three sinks per run, `invalidate` (writers set a sentinel value
  under a row's invalidate key before changing the row; every sentinel of a
  committed change must be gone at the end, so any key left is a
  difference), `upsert` JSON and `upsert` hash (each compared with
  Postgres, both ways);
- OpenSearch: one index per table, compared both ways.
Only "sink" tables reach Redis/OpenSearch; "kafka" tables reach Kafka only.
Key-less sink tables (switch keyless_in_sinks) go through the relay, which
must set each of their records aside once in its dead-letter topic; in
direct mode `walcast check` must refuse them, and they reach Kafka only.

Faults (--faults, comma separated): walcast_kill (kill -9 of walcast, then
restart), broker_kill (kill -9 of the broker, restart after a pause),
pg_fast / pg_immediate (Postgres stopped with -m fast / immediate, started
again), redis_stop and search_stop (stopped for a while, started again),
walcast_takeover (a second walcast with the same config stands by from the
start; the active one is killed -9, the stand-by takes over and a new
stand-by is started: README "High availability"), pg_failover (Postgres 17+:
the run gets a primary and a physical standby of its own, tests/oracle/
pgpair.py, set up as the README's failover recipe says, and walcast lists
both hosts with `slot_failover = true`; once walcast's slots are
synchronised to the standby, the primary is stopped -m immediate under load
and the standby promoted, once per run; Postgres's truth is then the
promoted server. With pg_failover, pg_fast and pg_immediate are left out: the
stack's Postgres is not the run's).
Each fault is drawn at random from the list; with --fault-cycle the list is
shuffled and gone through in turn, so that a short run has each listed
fault once before any repeats (the CI seeds).
Service faults act on the stack named by WALCAST_TEST_STACK_DIR through
deploy/local/stack: never point them at a shared stack.

Switches (SWITCHES below; --enable/--disable or WALCAST_ORACLE_ENABLE /
WALCAST_ORACLE_DISABLE, comma separated) name features that were kept out
while walcast got them wrong; each says what it covers and, when off, why.
"""

import argparse
from collections import Counter
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import traceback

import psycopg
import redis
import requests

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from compare import (Diff, KafkaRebuild, Topic, compare_rows, dead_letters, key_id, pg_rows, redis_rows,  # noqa: E402
                     relay_lag, sanitize_index, search_rows)
from generator import Writer, make_scenario  # noqa: E402
from pgpair import PgPair, free_port, pg_major  # noqa: E402
from pgtypes import from_pg, key_part, search_doc, search_value  # noqa: E402

# Feature switches. True = generated in CI. Each False one fails on the code
# as it stands; the comment says how (see the final report of the oracle's
# author for the full output) and which defect it waits for.
SWITCHES = {
    # Partitioned tables (published via the partition root, README
    # "Partitioned tables").
    "partitioned": True,
    # Updates that leave TOASTed columns alone on tables that reach Redis
    # and OpenSearch (README Guarantees: the sinks keep the stored value;
    # with none stored, the column is left out and listed in
    # `__walcast_incomplete`, which compare.never_carried accepts only when
    # no event of the key carried the value). When off, sink tables holding
    # TOASTed values get REPLICA IDENTITY FULL.
    "toast_unchanged_in_sinks": True,
    # Key-less tables in the sink pipelines. Relay mode: the relay sets
    # their records aside in its dead-letter topic (`on_refused`), each
    # exactly once without faults, and commits past them. Direct mode:
    # `walcast check` must refuse them (keyless_tables with a search or
    # Redis-key sink), then they are captured to Kafka only. When off,
    # key-less tables reach Kafka only.
    "keyless_in_sinks": True,
    # NaN/±Infinity in an unconstrained numeric in Avro runs (a string under
    # the default unconstrained_numeric = "string"). NaN in a numeric(p, s)
    # stays JSON-only: an Avro decimal cannot carry it (MAPPING.md).
    "numeric_nan_avro": True,
    # Float NaN/±Infinity, ±infinity, BC and far-future dates/timestamps in
    # sink tables: the search sink sets values its fields cannot hold aside
    # in `__walcast_special` (pgtypes.search_value). Not in relays of JSON
    # topics, whose untyped indices refuse "NaN" in a double field (README
    # "Relays").
    "search_special_values": True,
    # Not a walcast defect: the local stack's OpenSearch (an embedded node
    # with transport-netty4 only, deploy/local/stack) has no reindex module,
    # so `_delete_by_query`, which the sink's `truncate = "delete_all"` uses,
    # answers HTTP 400 "no handler found" and the daemon stops (exit 1).
    # When off, truncates are generated on Kafka-only tables only.
    "truncate_in_sinks": False,
    # Composite keys whose columns are not in byte order of their names
    # (the relay once took them in that order; fixed in
    # connectors/sdk/src/relay.rs). When off, composite keys are generated
    # with their columns already in byte order.
    "relay_key_order": True,
    # Postgres fast/immediate shutdowns (the pg_fast and pg_immediate
    # faults, which only run with WALCAST_ORACLE_STACK_FAULTS=1). When off,
    # they are skipped.
    "pg_restart": True,
}


# Copies of one refused record in the relay's dead-letter topic beyond
# which the oracle calls it a loop (see Run.check_dead_letters).
MAX_DLQ_COPIES = 3


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')} oracle] {msg}", flush=True)


def env(name, default=None):
    v = os.environ.get(name, default)
    if v is None:
        raise SystemExit(f"{name} is not set: run with the stack's env (deploy/local/stack env)")
    return v


def toml_str(s):
    return json.dumps(s, ensure_ascii=False)


class Run:
    def __init__(self, args):
        self.args = args
        self.seed = args.seed
        r = random.Random(args.seed)
        self.fmt = args.format or r.choice(["avro", "json"])
        self.mode = args.mode or r.choice(["relay", "direct"])
        self.initial = {}
        self.failed = False  # a failed run keeps its database, topics, keys and indices
        self.switches = dict(SWITCHES)
        for name in filter(None, (os.environ.get("WALCAST_ORACLE_ENABLE", "") + "," + (args.enable or "")).split(",")):
            self.switches[name.strip()] = True
        for name in filter(None, (os.environ.get("WALCAST_ORACLE_DISABLE", "") + "," + (args.disable or "")).split(",")):
            self.switches[name.strip()] = False
        unknown = set(self.switches) - set(SWITCHES)
        if unknown:
            raise SystemExit(f"unknown switches: {sorted(unknown)}; known: {sorted(SWITCHES)}")
        self.faults = [f for f in (args.faults or "").split(",") if f]
        self.run_id = f"orc{args.seed}x{random.randrange(10**6)}"
        self.dir = os.path.join(args.workdir, self.run_id)
        os.makedirs(self.dir, exist_ok=True)
        self.pg = dict(host=env("WALCAST_TEST_PG_HOST", "127.0.0.1"), port=int(env("WALCAST_TEST_PG_PORT")), user="postgres")
        self.bootstrap = env("WALCAST_TEST_KAFKA_BOOTSTRAP")
        self.registry = env("WALCAST_TEST_REGISTRY_URL")
        self.redis_url = env("WALCAST_TEST_REDIS_URL")
        self.search = env("WALCAST_TEST_OPENSEARCH_URL")
        self.db = self.run_id
        self.proc = None
        self.admin = f"127.0.0.1:{free_port()}"
        self.rds = redis.Redis.from_url(self.redis_url)
        self.prefix_sink, self.prefix_kafka = f"{self.run_id}s", f"{self.run_id}k"
        self.rkey = {m: f"{self.run_id}:{m}:" for m in ("i", "j", "h")}
        self.fault_log = []
        self.dlq = f"{self.run_id}-relay-dlq"
        self.redis_wipe_lsn = 0  # LSN read just after the last Redis stop (fault redis_stop)
        self.exits = []  # exit codes of walcast processes that stopped by themselves
        # walcast_takeover: the stand-by daemon and its admin address.
        self.standby, self.standby_admin = None, f"127.0.0.1:{free_port()}"
        # pg_failover: the run's own primary and standby (pgpair.py).
        self.pair = None
        self.failed_over = False
        # Invalidate sentinels of changes acknowledged by the old primary
        # and lost with it (see outputs()).
        self.lost_in_failover = set()
        if "pg_failover" in self.faults:
            major = pg_major(env("WALCAST_TEST_PG_BIN"))
            if major < 17:
                log(f"SKIPPED fault pg_failover: Postgres {major} has no failover slots (17+); "
                    "tests/failover.rs checks that slot_failover is refused there")
                self.faults = [f for f in self.faults if f != "pg_failover"]
            else:
                self.pair = PgPair(self.dir, env("WALCAST_TEST_PG_BIN"), log)
                dropped = [f for f in self.faults if f in ("pg_fast", "pg_immediate")]
                if dropped:
                    log(f"faults left out with pg_failover (they act on the stack's Postgres): {dropped}")
                self.faults = [f for f in self.faults if f not in ("pg_fast", "pg_immediate")]

    def conninfo(self, db=None):
        return psycopg.conninfo.make_conninfo(dbname=db or self.db, **self.pg)

    # ----------------------------------------------------------- setup
    def setup(self):
        if self.pair:
            self.pair.start()
            self.pg = self.pair.conn_params()
        self.tables, ddl = make_scenario(self.seed, self.switches, self.fmt)
        with psycopg.connect(self.conninfo("postgres"), autocommit=True) as c:
            c.execute(f'CREATE DATABASE "{self.db}"')
        with psycopg.connect(self.conninfo(), autocommit=True) as c:
            for stmt in ddl:
                c.execute(stmt)
        with open(os.path.join(self.dir, "schema.sql"), "w") as f:
            f.write(";\n".join(ddl) + ";\n")
        log(f"seed {self.seed}: format={self.fmt} mode={self.mode} faults={self.faults or 'none'} db={self.db}")
        for t in self.tables:
            log(f"  table {t.label!r} shape={t.shape} sinks={t.sinks} toast={t.toast} full={t.identity_full} "
                f"columns={len(t.cols)}: " + ", ".join(f"{c}:{ty.name}" for c, ty, _ in t.cols))
        self.sink_tables = [t for t in self.tables if t.sinks]
        self.kafka_tables = [t for t in self.tables if not t.sinks]
        self.setup_problems = []

    def check_keyless_refused(self):
        """Direct mode: `walcast check` must refuse key-less tables in a
        pipeline with search and Redis-key sinks (README
        `source.keyless_tables`); they are then captured to Kafka only."""
        keyless = [t for t in self.sink_tables if t.keyless]
        if self.mode != "direct" or not keyless:
            return
        self.config()
        res = subprocess.run([self.args.bin, "check", "-c", self.config_path], cwd=self.dir,
                             capture_output=True, text=True, timeout=300)
        out = res.stdout + res.stderr
        if res.returncode == 0 or "keyless_tables" not in out:
            self.setup_problems.append(
                f"walcast check accepted key-less tables {[t.label for t in keyless]} for the search and Redis sinks "
                f"(exit {res.returncode}): {out[-600:]}")
        else:
            log(f"walcast check refused the key-less tables for the sinks, as documented (exit {res.returncode})")
        for t in keyless:
            t.sinks = False
        self.sink_tables = [t for t in self.tables if t.sinks]
        self.kafka_tables = [t for t in self.tables if not t.sinks]

    def initial_rows(self):
        """Rows present before walcast starts: read by the initial snapshot."""
        stop = threading.Event()
        w = Writer(0, 1, self.seed, self.conninfo(), self.tables, self.switches, self.fmt, stop, large=False, mode=self.mode)
        w.counter = 10_000
        with psycopg.connect(self.conninfo()) as c, c.cursor() as cur:
            for t in self.tables:
                rows = [w.row_literals(t, w.new_key_values(t)) for _ in range(20)]
                cur.execute(w.insert_sql(t, rows))
            c.commit()
            # What the initial snapshot must deliver, row for row.
            self.initial = {t.label: pg_rows(c, t) for t in self.tables}

    def config(self):
        registry = f'[pipelines.{{p}}.registry]\nurl = "{self.registry}"\n' if self.fmt == "avro" else ""
        redis_sinks = "".join(f"""
[[pipelines.{{p}}.sinks]]
type = "redis"
urls = [{toml_str(self.redis_url)}]
mode = {{{{ type = "{mode}", key_template = {toml_str(self.rkey[short] + '{schema}.{table}:{id}')}{extra} }}}}
retry_max_ms = 1000
""" for short, mode, extra in (("i", "invalidate", ""), ("j", "upsert", ', format = "json"'), ("h", "upsert", ', format = "hash"')))
        search_sink = f"""
[[pipelines.{{p}}.sinks]]
type = "elasticsearch"
url = "{self.search}"
index_template = {toml_str(self.run_id + '-{schema}.{table}')}
flush_interval_ms = 200
retry_max_ms = 1000
"""
        out = [f'[admin]\nlisten = "{self.admin}"\n[log]\nformat = "json"\n']

        def capture(name, prefix, tables, direct):
            if not tables:
                return
            keyless = [t.config_name for t in tables if t.keyless]
            text = f"""
[pipelines.{name}]
kind = "capture"
topic_prefix = "{prefix}"
format = "{self.fmt}"
state_dir = {toml_str(os.path.join(self.dir, 'state'))}
{registry}[pipelines.{name}.source]
host = "{self.pg['host']}"
port = {toml_str(self.pg['port']) if isinstance(self.pg['port'], str) else self.pg['port']}
{'slot_failover = true' + chr(10) + 'connect_timeout = "3s"' + chr(10) if self.pair else ''}database = "{self.db}"
user = "postgres"
slot = "{self.run_id}_{name}"
publication = "{self.run_id}_{name}"
status_interval = "1s"
retry_max_backoff = "2s"
tables = [{', '.join(toml_str(t.config_name) for t in tables)}]
keyless_tables = [{', '.join(toml_str(k) for k in keyless)}]
[[pipelines.{name}.sinks]]
type = "kafka"
bootstrap_servers = "{self.bootstrap}"
create_topics = true
topic_creation = {{ partitions = 3 }}
""" + (f'producer = {{{{ "debug" = {toml_str(os.environ["WALCAST_ORACLE_KAFKA_DEBUG"])} }}}}\n'
       if os.environ.get("WALCAST_ORACLE_KAFKA_DEBUG") else "")
            if direct:
                text += redis_sinks + search_sink
            out.append(text.replace("{p}", name))

        capture("sinkcap", self.prefix_sink, self.sink_tables, self.mode == "direct")
        capture("kafkacap", self.prefix_kafka, self.kafka_tables, False)
        if self.mode == "relay" and self.sink_tables:
            # A short session: after a kill -9 the group otherwise waits out
            # the dead member's 45 s session before the restarted relay reads.
            pattern = toml_str("^" + self.prefix_sink + "\\..*")
            text = f"""
[pipelines.relay]
kind = "relay"
on_refused = {{ dead_letter = {{ topic = "{self.dlq}" }} }}
{registry}[pipelines.relay.source]
bootstrap_servers = "{self.bootstrap}"
group_id = "{self.run_id}-relay"
subscribe = {{ pattern = {pattern} }}
consumer = {{ "topic.metadata.refresh.interval.ms" = "500", "session.timeout.ms" = "6000", "heartbeat.interval.ms" = "1000" }}
""" + redis_sinks + search_sink
            out.append(text.replace("{p}", "relay"))
        cfg = "".join(out).replace("{{", "{").replace("}}", "}")
        self.config_path = os.path.join(self.dir, "walcast.toml")
        with open(self.config_path, "w") as f:
            f.write(cfg)
        # The stand-by's config is the same but for its admin address.
        self.configs = {self.admin: self.config_path, self.standby_admin: os.path.join(self.dir, "walcast-b.toml")}
        with open(self.configs[self.standby_admin], "w") as f:
            f.write(cfg.replace(f'listen = "{self.admin}"', f'listen = "{self.standby_admin}"', 1))

    # ----------------------------------------------------------- walcast
    def spawn(self, admin):
        logf = open(os.path.join(self.dir, "walcast.log" if admin == self.admin else "walcast-standby.log"), "ab")
        return subprocess.Popen([self.args.bin, "run", "-c", self.configs[admin]], cwd=self.dir,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=logf)

    def start_walcast(self):
        self.proc = self.spawn(self.admin)

    def state(self, admin):
        try:
            st = requests.get(f"http://{admin}/status", timeout=2).json()
            return ",".join(sorted({p.get("state", "?") for p in st.get("pipelines", [])})) or "?"
        except (requests.RequestException, ValueError):
            return "unreachable"

    def start_standby(self):
        """A second walcast with the same config (README "High
        availability"); it must stand by while the active one holds the
        slots."""
        self.standby = self.spawn(self.standby_admin)
        deadline = time.time() + 60
        while time.time() < deadline:
            if self.standby.poll() is not None:
                raise RuntimeError(f"the stand-by walcast exited with {self.standby.returncode}")
            st = self.state(self.standby_admin)
            if "standby" in st:
                log(f"stand-by walcast at {self.standby_admin}: {st}")
                return
            time.sleep(0.5)
        log(f"the stand-by walcast did not report state standby within 60 s (state {self.state(self.standby_admin)})")

    def takeover(self, pause):
        """Kills the active walcast; the stand-by must take over. The log
        files follow the processes: walcast.log is always the active's."""
        if self.standby is None or self.standby.poll() is not None:
            self.start_standby()
        self.kill9()
        t0 = time.time()
        self.proc, self.standby = self.standby, None
        self.admin, self.standby_admin = self.standby_admin, self.admin
        os.replace(os.path.join(self.dir, "walcast.log"), os.path.join(self.dir, f"walcast-killed-{len(self.fault_log)}.log"))
        os.replace(os.path.join(self.dir, "walcast-standby.log"), os.path.join(self.dir, "walcast.log"))
        while time.time() - t0 < 60 and "standby" in self.state(self.admin) and self.proc.poll() is None:
            time.sleep(0.2)
        log(f"the stand-by took over in {time.time() - t0:.1f}s (state {self.state(self.admin)})")
        time.sleep(pause / 3)
        self.start_standby()

    def pg_failover(self):
        """Waits until walcast's slots are synchronised to the standby (what
        the promoted server resumes from), then fails the primary over."""
        slots = [f"{self.run_id}_{n}" for n, ts in (("sinkcap", self.sink_tables), ("kafkacap", self.kafka_tables)) if ts]
        deadline = time.time() + 120
        while not all(self.pair.slot_synced(s) for s in slots):
            if time.time() > deadline:
                log(f"walcast's slots {slots} were not synchronised to the standby within 120 s; failing over anyway")
                break
            time.sleep(0.5)
        self.pair.failover()
        self.failed_over = True

    def walcast_exited(self):
        return self.proc is not None and self.proc.poll() is not None

    def wait_ready(self, timeout=180):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.walcast_exited():
                return False
            try:
                if requests.get(f"http://{self.admin}/readyz", timeout=2).status_code == 200:
                    return True
            except requests.RequestException:
                pass
            time.sleep(0.5)
        return False

    def kill9(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def log_tail(self, n=30):
        try:
            lines = open(os.path.join(self.dir, "walcast.log"), errors="replace").read().splitlines()
        except OSError:
            return ""
        interesting = [line for line in lines if '"ERROR"' in line or ('"WARN"' in line and "no conversion for this type" not in line)]
        return "\n".join((interesting or lines)[-n:])

    # ----------------------------------------------------------- faults
    def stack(self, verb, svc):
        script = os.path.join(self.args.repo, "deploy/local/stack")
        res = subprocess.run(["bash", script, verb, svc], env={**os.environ, "WALCAST_STACK_DIR": env("WALCAST_TEST_STACK_DIR")},
                             capture_output=True, text=True)
        if res.returncode != 0:
            log(f"stack {verb} {svc} failed: {res.stderr[-500:]}")

    def pg_stop(self, mode):
        """Stops Postgres and waits until it is down. A fast shutdown waits
        for every walsender's client to confirm the WAL up to the shutdown
        checkpoint (Postgres's WalSndDone), so with walcast catching up a
        backlog it lasts as long as the catch-up: pg_ctl's own 60 s wait
        was too short (the 2026-12-06 17:37 long run left Postgres down)."""
        data, binary = env("WALCAST_TEST_PG_DATA"), env("WALCAST_TEST_PG_BIN")
        t0 = time.time()
        res = subprocess.run(["runuser", "-u", "postgres", "--", f"{binary}/pg_ctl", "-D", data, "-m", mode,
                              "-t", "600", "-w", "stop"], capture_output=True, text=True)
        took = time.time() - t0
        if res.returncode != 0:
            log(f"pg_ctl stop -m {mode} failed after {took:.0f}s: {res.stderr.strip()[-300:]}")
        elif took > 20:
            log(f"pg_ctl stop -m {mode} took {took:.0f}s (the walsenders waited for their clients to confirm)")

    def fault(self, kind, r):
        pause = r.uniform(2, 6)
        if kind == "pg_failover" and self.failed_over:
            kind = "walcast_kill"  # one failover per run: the old primary is gone
        self.fault_log.append(kind)
        log(f"fault: {kind} (pause {pause:.1f}s)")
        if kind == "walcast_takeover":
            self.takeover(pause)
        elif kind == "pg_failover":
            self.pg_failover()
        elif kind == "walcast_kill":
            self.kill9()
            time.sleep(pause / 3)
            self.start_walcast()
        elif kind == "broker_kill":
            pid = open(env("WALCAST_TEST_KAFKA_PIDFILE")).read().strip()
            subprocess.run(["kill", "-9", pid])
            time.sleep(pause)
            self.stack("start", "kafka")
        elif kind in ("pg_fast", "pg_immediate"):
            self.pg_stop("fast" if kind == "pg_fast" else "immediate")
            time.sleep(pause)
            self.stack("start", "postgres")
        elif kind == "redis_stop":
            self.stack("stop", "redis")
            # The stack's Redis has no persistence: the stop wipes it. Any
            # change committed after this LSN reaches Redis after the wipe.
            try:
                with psycopg.connect(self.conninfo(), autocommit=True, connect_timeout=5) as c:
                    self.redis_wipe_lsn = int(c.execute("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn").fetchone()[0])
            except psycopg.Error as e:
                log(f"reading the LSN at the Redis stop failed ({e}): Redis rows are compared as if never wiped")
            time.sleep(pause * 2)
            self.stack("start", "redis")
        elif kind == "search_stop":
            self.stack("stop", "opensearch")
            time.sleep(pause * 2)
            self.stack("start", "opensearch")
        else:
            raise SystemExit(f"unknown fault {kind}")

    # ----------------------------------------------------------- sentinels
    def sentinel(self, t, key_text, on):
        kid = ":".join(key_part(from_pg(t.kind[k], key_text[k])) for k in t.key)
        name = f"{self.rkey['i']}{t.schema}.{t.name}:{kid}"
        for _ in range(100):
            try:
                if on:
                    self.rds.set(name, "stale: set before a change the invalidate sink must clear")
                else:
                    self.rds.delete(name)
                return
            except redis.RedisError:
                time.sleep(0.2)  # Redis stopped by a fault

    # ----------------------------------------------------------- run
    def load(self):
        stop = threading.Event()
        writers = [Writer(w, self.args.writers, self.seed, self.conninfo(), self.tables, self.switches, self.fmt, stop,
                          redis_sentinel=self.sentinel, mode=self.mode, large_rows=self.large_rows()) for w in range(self.args.writers)]
        for w in writers:
            w.start()
        r = random.Random(self.seed + 7)
        end = time.time() + self.args.seconds
        faults = [f for f in self.faults if f not in ("pg_fast", "pg_immediate") or self.switches["pg_restart"]]
        skipped = sorted(set(self.faults) - set(faults))
        if skipped:
            log(f"faults skipped (switch pg_restart is off): {skipped}")
        cycle = r.sample(faults, len(faults)) if self.args.fault_cycle else None
        drawn = 0
        while time.time() < end:
            if faults and time.time() < end - 8:
                time.sleep(r.uniform(3, 8))
                if time.time() < end - 5:
                    self.fault(cycle[drawn % len(cycle)] if cycle else r.choice(faults), r)
                    drawn += 1
            else:
                time.sleep(0.5)
            if self.walcast_exited():
                log(f"walcast exited with {self.proc.returncode} during the load")
                self.exits.append(self.proc.returncode)
                break
        stop.set()
        for w in writers:
            w.join(60)
        stats = {k: sum(w.stats[k] for w in writers) for k in writers[0].stats}
        log(f"load done: {stats}")
        return stats

    def outputs(self, kafka):
        """Differences between Postgres and every output, now."""
        diff = Diff(self.seed)
        self.lost_in_failover = set()
        counts = {"kafka_events": kafka.count, "rows": 0, "redis_keys": 0, "search_docs": 0}
        with psycopg.connect(self.conninfo(), autocommit=True) as c:
            expected = {t.label: pg_rows(c, t) for t in self.tables}
        histories = {}
        for t in self.tables:
            rows, hist = kafka.rebuild(t)
            histories[t.label] = hist
            counts["rows"] += sum(expected[t.label].values()) if t.keyless else len(expected[t.label])
            compare_rows(diff, "kafka", t, expected[t.label], rows, hist)
        for t in self.tables:
            # The initial snapshot (op r) holds exactly the rows present
            # before walcast started, both ways (walcast starts after
            # initial_rows, and a kill during the load comes after the
            # snapshot completed: ready means streaming).
            if t.label in self.initial:
                compare_rows(diff, "kafka-snapshot", t, self.initial[t.label], kafka.snapshot_rows(t),
                             histories[t.label])
        for prefix, lsn, missing, around in kafka.gaps():
            diff.add("kafka-transaction", Topic(prefix.rstrip(".")), f"commit_lsn={lsn}", "total_order",
                     f"events 1..{max(e['order'] for e in around)} of the transaction",
                     f"orders {missing[:10]} missing", {f"commit_lsn={lsn}": around})
        for t in self.sink_tables:
            if t.keyless:
                continue
            exp = {key_id(t, k): row for k, row in expected[t.label].items()}
            hist = {key_id(t, k): v for k, v in histories[t.label].items() if isinstance(k, tuple)}
            for short, hash_mode in (("j", False), ("h", True)):
                got = redis_rows(self.rds, self.rkey[short], t, hash_mode)
                counts["redis_keys"] += len(got)
                compare_rows(diff, f"redis-{'hash' if hash_mode else 'json'}", t, exp, got, hist, hash_mode=hash_mode,
                             wiped_lsn=self.redis_wipe_lsn)
            left = redis_rows(self.rds, self.rkey["i"], t, "keys")
            for kid in left:
                if self.failed_over and kid not in hist:
                    # The old primary acknowledged the change, but its
                    # physical standby had not received it when the primary
                    # died (asynchronous replication): the promoted server
                    # never had it, so no event clears the sentinel. The
                    # comparisons with Postgres cover the rest: an event
                    # walcast lost would be missing from Kafka while the
                    # promoted server has the change.
                    self.lost_in_failover.add((t.label, kid))
                    continue
                diff.add("redis-invalidate", t, kid, "*", "key invalidated by a committed change", "stale key still present", hist)
            index = sanitize_index(f"{self.run_id}-{t.schema}.{t.name}")
            got = search_rows(self.search, index)
            if got is None:
                got = {}
                if exp:
                    diff.add("opensearch", t, "*", "*", f"{len(exp)} rows", f"no index {index}", hist)
                    continue
            counts["search_docs"] += len(got)
            regime = self.search_regime()
            exp_docs = {kid: {c: search_value(t.ty[c].name, t.kind[c], v, regime) for c, v in row.items()}
                        for kid, row in exp.items()}
            got_docs = {kid: search_doc(t, doc, regime) for kid, doc in got.items()}
            compare_rows(diff, "opensearch", t, exp_docs, got_docs, hist)
        if self.mode == "relay" and self.sink_tables:
            self.check_dead_letters(diff, kafka, histories)
            # At rest, the relay has applied and committed everything
            # (README: offsets committed only after the sinks applied).
            for topic, n in relay_lag(self.bootstrap, f"{self.run_id}-relay", self.prefix_sink).items():
                diff.add("relay-offsets", Topic(topic), "*", "*", "every record applied and committed",
                         f"{n} records not committed by group {self.run_id}-relay", {})
        return diff, counts

    def check_dead_letters(self, diff, kafka, histories):
        """The relay's dead-letter topic holds every record of the key-less
        sink tables (which no Redis key or document id can name), and
        nothing else; at least once each, as every relay delivery: a kill, or
        a consumer-group rebalance (a pattern subscription rebalances when
        the capture creates a topic) between the copy and the offset commit,
        copies again (seen in CI: seed 101 on Postgres 16, two copies of
        records read just before a rebalance). More than MAX_DLQ_COPIES
        copies without a kill would be a loop, and is a difference."""
        got = dead_letters(self.bootstrap, self.dlq, self.run_id)
        seen = Counter((tp, p, o) for tp, p, o, _ in got)
        keyless = {t.label for t in self.sink_tables if t.keyless}
        by_label = {t.label: t for t in self.sink_tables}
        expected = {(tp, p, o) for tp, offs in kafka.offsets.items() if kafka.topic_table.get(tp) in keyless
                    for p, o in offs}
        self.dlq_count = len(seen)
        reason = {}  # first error per record: one pass, not one scan per record
        for x, y, z, e in got:
            reason.setdefault((x, y, z), e)
        for (tp, p, o), n in seen.items():
            label = kafka.topic_table.get(tp)
            t = by_label.get(label) or Topic(tp or "?")
            if (tp, p, o) not in expected:
                err = reason.get((tp, p, o))
                diff.add("relay-dead-letter", t, f"{tp}[{p}]@{o}", "*", "applied by the sinks",
                         f"set aside: {err}", {})
            elif n > MAX_DLQ_COPIES and "walcast_kill" not in self.fault_log:
                diff.add("relay-dead-letter", t, f"{tp}[{p}]@{o}", "*", f"at most {MAX_DLQ_COPIES} copies",
                         f"{n} copies", {})
        for tp, p, o in sorted(expected - set(seen)):
            t = by_label.get(kafka.topic_table.get(tp)) or Topic(tp)
            diff.add("relay-dead-letter", t, f"{tp}[{p}]@{o}", "*", "record of a key-less table set aside",
                     "not in the dead-letter topic", {})

    def create_dlq(self):
        from confluent_kafka.admin import AdminClient, NewTopic
        admin = AdminClient({"bootstrap.servers": self.bootstrap})
        for f in admin.create_topics([NewTopic(self.dlq, 1, 1)]).values():
            try:
                f.result(30)
            except Exception as e:
                log(f"creating {self.dlq}: {e}")

    def large_rows(self):
        """Rows of a large transaction: fewer in the short form, whose
        minute each is mostly spent reading the topics back."""
        return (1500, 3000) if self.args.seconds >= 60 else (300, 800)

    def search_regime(self):
        """How search documents are typed (pgtypes.search_value)."""
        if self.mode == "direct":
            return "typed"
        return "avro" if self.fmt == "avro" else "untyped"

    def converge(self, kafka):
        deadline = time.time() + self.args.converge_seconds
        while True:
            kafka.poll(idle=2.0)
            try:
                diff, counts = self.outputs(kafka)
            except (requests.RequestException, redis.RedisError, psycopg.OperationalError) as e:
                if time.time() > deadline:
                    raise
                log(f"reading outputs failed ({e}); retrying")
                time.sleep(2)
                continue
            if diff.total == 0 or self.walcast_exited():
                return diff, counts
            if time.time() > deadline:
                # Differences the reader itself would explain are no finding:
                # read on (up to one more window) while partitions hold
                # records it has not read (the 2026-12-06 17:45 long run's
                # Avro seeds were compared short of their partitions' ends).
                short = kafka.behind()
                if short and time.time() < deadline + self.args.converge_seconds:
                    log(f"{diff.total} differences, but {len(short)} partitions not read to their end "
                        f"(e.g. {short[0][0]}[{short[0][1]}]); reading on before comparing")
                    continue
                return diff, counts
            log(f"{diff.total} differences so far; waiting for walcast to catch up")
            time.sleep(3)

    def stop_walcast(self):
        if self.standby is not None and self.standby.poll() is None:
            self.standby.terminate()
            try:
                self.standby.wait(30)
            except subprocess.TimeoutExpired:
                self.standby.kill()
        try:
            if self.proc and self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(30)
                except subprocess.TimeoutExpired:
                    self.kill9()
        except Exception:
            pass

    def cleanup(self, keep_data=False):
        """Drops what the run created; `keep_data` (a failed run) keeps the
        database, keys, indices and topics for inspection but still drops
        the slots, which would pin WAL and use up max_replication_slots."""
        try:
            with psycopg.connect(self.conninfo("postgres"), autocommit=True) as c:
                for (slot,) in c.execute("SELECT slot_name FROM pg_replication_slots WHERE slot_name LIKE %s", (self.run_id + "%",)).fetchall():
                    c.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
                if not keep_data:
                    c.execute(f'DROP DATABASE IF EXISTS "{self.db}" WITH (FORCE)')
        except Exception as e:
            log(f"cleanup of Postgres failed: {e}")
        if keep_data:
            return
        try:
            for key in self.rds.scan_iter(match=f"*{self.run_id}:*", count=1000):
                self.rds.delete(key)
        except Exception as e:
            log(f"cleanup of Redis failed: {e}")
        try:
            requests.delete(f"{self.search}/{self.run_id}-*", timeout=30)
        except Exception as e:
            log(f"cleanup of OpenSearch failed: {e}")
        try:
            from confluent_kafka.admin import AdminClient
            admin = AdminClient({"bootstrap.servers": self.bootstrap})
            topics = [t for t in admin.list_topics(timeout=10).topics if t.startswith(self.run_id)]
            if topics:
                for f in admin.delete_topics(topics).values():
                    try:
                        f.result(30)
                    except Exception:
                        pass
        except Exception as e:
            log(f"cleanup of Kafka failed: {e}")

    def main(self):
        t0 = time.time()
        try:
            self.setup()
            self.initial_rows()
            self.check_keyless_refused()
            self.config()
            if self.mode == "relay":
                self.create_dlq()
            self.start_walcast()
            if not self.wait_ready():
                log("walcast did not become ready:\n" + self.log_tail())
                return 1
            if "walcast_takeover" in self.faults:
                self.start_standby()
            log(f"walcast ready after {time.time() - t0:.1f}s")
            kafka = KafkaRebuild(self.bootstrap, self.registry, self.fmt, [self.prefix_sink, self.prefix_kafka], self.tables, self.run_id)
            stats = self.load()
            if self.walcast_exited():
                log(f"walcast is not running (exit {self.proc.returncode}); restarting it to let the outputs converge")
                self.start_walcast()
                self.fault_log.append("restart-after-exit")
            diff, counts = self.converge(kafka)
            exited = self.walcast_exited()
            if exited:
                self.exits.append(self.proc.returncode)
            with open(os.path.join(self.dir, "report.txt"), "w") as f:
                f.write("\n".join(diff.lines))
            summary = (f"seed {self.seed} format={self.fmt} mode={self.mode} faults={','.join(self.fault_log) or 'none'} "
                       f"tables={len(self.tables)} commits={stats['commits']} rows={counts['rows']} "
                       f"kafka_events={counts['kafka_events']} redis_keys={counts['redis_keys']} "
                       f"search_docs={counts['search_docs']} in {time.time() - t0:.0f}s")
            for p in self.setup_problems:
                diff.add("walcast-check", Topic("config"), "*", "*", "refused", p, {})
            if diff.incomplete:
                summary += f" incomplete_documented={diff.incomplete}"
            if diff.wiped:
                summary += f" redis_rows_lost_in_wipe={diff.wiped}"
            if self.redis_wipe_lsn:
                # Events at or after this commit LSN count as reaching Redis
                # after its wipe (compare.never_carried, lost_in_wipe).
                summary += f" redis_wipe_lsn={self.redis_wipe_lsn}"
            if self.lost_in_failover:
                summary += f" changes_lost_with_the_old_primary={len(self.lost_in_failover)}"
            if getattr(self, "dlq_count", 0):
                summary += f" dead_letters={self.dlq_count}"
            if diff.total or self.exits:
                for line in diff.lines:
                    print(line)
                for where, label, key in diff.missing_keys[:6]:
                    if where.startswith("kafka") and isinstance(key, tuple):
                        found = kafka.records_with_key(key[-1])
                        log(f"records of {label} whose key holds {key[-1]!r}: {found or 'none at all'}")
                for line in kafka.partition_report():
                    log(f"partition: {line}")
                if kafka.unknown:
                    log(f"events of unknown tables: {dict(kafka.unknown)}")
                log(f"walcast log (warnings and errors, last lines):\n{self.log_tail()}")
                log(f"FAIL {summary}: {diff.total} differences"
                    + (f"; walcast exited by itself with {self.exits}" if self.exits else "")
                    + f"; repro: tests/oracle/run --seed {self.seed} --format {self.fmt} --mode {self.mode} --seconds {self.args.seconds:g}"
                    + (f" --faults {','.join(self.faults)}" if self.faults else "")
                    + (" --fault-cycle" if self.args.fault_cycle else "")
                    + (f" --enable {','.join(k for k, v in self.switches.items() if v and not SWITCHES[k])}" if any(v and not SWITCHES[k] for k, v in self.switches.items()) else "")
                    + f"; files in {self.dir}")
                self.failed = True
                return 1
            log(f"PASS {summary}")
            return 0
        except Exception:
            traceback.print_exc()
            log("walcast log:\n" + self.log_tail())
            return 2
        finally:
            self.stop_walcast()
            if self.failed:
                self.cleanup(keep_data=True)
                log(f"kept the database {self.db}, the topics, keys and indices of run {self.run_id} for inspection (the slots are dropped)")
            elif not self.args.keep:
                self.cleanup()
            if self.pair:
                self.pair.stop(remove=not self.failed and not self.args.keep)


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    repo = os.path.abspath(os.path.join(here, "../.."))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--seconds", type=float, default=float(os.environ.get("WALCAST_ORACLE_SECONDS", 30)))
    ap.add_argument("--format", choices=["avro", "json"])
    ap.add_argument("--mode", choices=["relay", "direct"])
    ap.add_argument("--faults", default="")
    ap.add_argument("--fault-cycle", action="store_true",
                    help="go through the shuffled fault list in turn instead of drawing each fault")
    ap.add_argument("--writers", type=int, default=3)
    ap.add_argument("--enable", default="")
    ap.add_argument("--disable", default="")
    # How long the outputs may take to equal Postgres after the load. The
    # long form's debug build with service faults lags minutes behind
    # (run of 2026-12-06, tests/oracle/RESULTS.md): twice the load, at least 150 s.
    ap.add_argument("--converge-seconds", type=float, default=None)
    ap.add_argument("--bin", default=os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(repo, "target")), "debug/walcast"))
    ap.add_argument("--workdir", default=os.path.join(repo, "target/oracle"))
    ap.add_argument("--repo", default=repo)
    ap.add_argument("--keep", action="store_true", help="keep the database, topics, keys and indices")
    args = ap.parse_args()
    if args.converge_seconds is None:
        args.converge_seconds = max(150.0, 2 * args.seconds)
    sys.exit(Run(args).main())


if __name__ == "__main__":
    main()
