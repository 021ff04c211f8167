"""Reading every output back with off-the-shelf clients, and comparing.

- Postgres: psycopg, one SELECT per table of pgtypes.pg_expr() columns.
- Kafka: confluent-kafka's Consumer (read_committed) over every topic of the
  run; Avro values through confluent-kafka's schema-registry
  AvroDeserializer (fastavro underneath), JSON with json.loads. None of
  walcast's decoder is used. Each table is rebuilt by applying its events
  in (commit_lsn, snapshot first, transaction.total_order) order, dropping
  exact replays (same commit_lsn, total_order, op and key: at-least-once
  duplicates after a crash); op c/u/r set the row, d removes it, t empties
  the table, tombstones are skipped. Key-less tables are multisets (an
  update removes one copy of its before image and adds the after image).
- Redis: SCAN of the run's key prefixes (invalidate, upsert JSON, upsert
  hash), GET/HGETALL.
- OpenSearch: every document of each table's index (scroll).

Comparison is both ways per table: rows missing from the output, rows the
output has that Postgres does not, and per column differences. Each
difference names the seed, the table, the key, the column, both values and
the LSNs (commit_lsn/lsn, op) of the last Kafka events of that key.
"""

import json
import time
from collections import Counter, defaultdict

import fastavro.read
import requests

from pgtypes import (PLACEHOLDER, avro_name, from_avro, from_hash, from_pg, is_placeholder,
                     key_part, pg_expr, qi, same)

# Python's datetime cannot hold ±infinity or BC dates: read the date and time
# logical types as their raw ints (the canonical form of date/time/timestamp
# is the int anyway; timestamptz is rendered from it in pgtypes.from_avro).
for _name in ("int-date", "long-time-micros", "long-timestamp-micros", "long-local-timestamp-micros",
              "int-time-millis", "long-timestamp-millis", "long-local-timestamp-millis"):
    fastavro.read.LOGICAL_READERS[_name] = lambda d, *a, **k: d


def pg_rows(conn, t):
    """{key tuple: {col: canonical}} (key-less: Counter of row JSON)."""
    names = [c for c, _, _ in t.cols]
    sel = ", ".join(pg_expr(t.kind[c], qi(c)) for c in names)
    with conn.cursor() as cur:
        cur.execute(f"SELECT {sel} FROM {t.qname}")
        rows = [dict(zip(names, (from_pg(t.kind[c], v) for c, v in zip(names, rec)))) for rec in cur.fetchall()]
    return index_rows(t, rows)


def index_rows(t, rows):
    if t.keyless:
        return Counter(row_json(r) for r in rows)
    return {tuple(r[k] for k in t.key): r for r in rows}


def row_json(r):
    return json.dumps(r, sort_keys=True, default=str)


def key_id(t, key):
    """Redis {id} and OpenSearch _id: key values joined by ':'."""
    return ":".join(key_part(v) for v in key)


def sanitize_index(raw):
    out = "".join("_" if c in '\\/*?"<>|,#: ' else c for c in raw.lower())
    return out.lstrip("-_+")[:255]


class KafkaRebuild:
    def __init__(self, bootstrap, registry, fmt, prefixes, tables, run):
        from confluent_kafka import Consumer
        self.fmt, self.tables = fmt, tables
        self.by_name = {}
        for t in tables:
            self.by_name[(t.schema, t.name)] = t
            for p in t.partitions:
                self.by_name[(t.schema, p)] = t
        self.consumer = Consumer({
            "bootstrap.servers": bootstrap,
            "group.id": f"{run}-oracle",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "isolation.level": "read_committed",
        })
        # Partitions are assigned by hand from the beginning (no group
        # membership: a broker killed -9 would otherwise leave the oracle's
        # own consumer waiting out a rebalance).
        self.prefixes = [p + "." for p in prefixes]
        self.assigned = set()
        self.deser = None
        if fmt == "avro":
            from confluent_kafka.schema_registry import SchemaRegistryClient, topic_subject_name_strategy
            from confluent_kafka.schema_registry.avro import AvroDeserializer
            # The topic strategy named: since 2.16 the default asks the
            # registry for Confluent's "associations" (not Apicurio's API)
            # per topic, and one such request hung the oracle for good.
            self.deser = AvroDeserializer(SchemaRegistryClient({"url": registry, "timeout": 30}),
                                          conf={"subject.name.strategy": topic_subject_name_strategy})
        self.events = defaultdict(dict)  # table label -> {dedupe key: event}
        self.count = 0
        self.unknown = Counter()
        self.offsets = defaultdict(set)  # topic -> {(partition, offset)} of records with a value
        # (topic prefix, commit_lsn) -> {total_order: where}: every pipeline
        # numbers the events of a transaction 1..n across its tables, so a
        # gap is an event that never reached Kafka (or the oracle).
        self.orders = defaultdict(dict)
        self.read = Counter()  # (topic, partition) -> records read, tombstones included
        self.raw = []  # (topic, partition, offset, key bytes, tombstone) of every record, for diagnostics
        self.topic_table = {}  # topic -> table label

    def poll(self, idle=2.0, limit=120.0):
        """Reads until nothing arrived for `idle` seconds."""
        from confluent_kafka.serialization import MessageField, SerializationContext
        from confluent_kafka import OFFSET_BEGINNING, KafkaException, TopicPartition
        last = time.time()
        start = time.time()
        while time.time() - last < idle and time.time() - start < limit:
            try:
                md = self.consumer.list_topics(timeout=10)
            except KafkaException:
                time.sleep(1)
                continue
            new = [TopicPartition(t, p, OFFSET_BEGINNING) for t, tm in md.topics.items()
                   if any(t.startswith(x) for x in self.prefixes) for p in tm.partitions
                   if (t, p) not in self.assigned]
            if new:
                self.consumer.incremental_assign(new)
                self.assigned |= {(tp.topic, tp.partition) for tp in new}
                last = time.time()
            msgs = self.consumer.consume(500, 0.5)
            for m in msgs:
                if m.error():
                    continue
                last = time.time()
                self.read[(m.topic(), m.partition())] += 1
                self.raw.append((m.topic(), m.partition(), m.offset(), m.key() or b"", m.value() is None))
                if m.value() is None:
                    continue  # tombstone
                self.offsets[m.topic()].add((m.partition(), m.offset()))
                if self.deser:
                    v = self.deser(m.value(), SerializationContext(m.topic(), MessageField.VALUE))
                else:
                    v = json.loads(m.value())
                self.add(v, m)

    def add(self, v, m):
        src = v["source"]
        t = self.by_name.get((src["schema"], src["table"]))
        if t is None:
            self.unknown[(src["schema"], src["table"])] += 1
            return
        self.count += 1
        self.topic_table[m.topic()] = t.label
        op = v["op"]
        tx = v.get("transaction") or {}
        order = tx.get("total_order", 0) if op != "r" else -1
        before = self.image(t, v.get("before"))
        after = self.image(t, v.get("after"))
        img = after or before or {}
        key = tuple(img.get(k) for k in t.key) if t.key else (row_json(img) if img else None)
        ev = {"op": op, "commit_lsn": src.get("commit_lsn"), "lsn": src.get("lsn"), "order": order,
              "before": before, "after": after, "key": key, "txId": src.get("txId"),
              "where": f"{m.topic()}[{m.partition()}]@{m.offset()}"}
        dedupe = (ev["commit_lsn"], order, op, json.dumps(key, default=str), src["table"])
        if op != "r" and tx:
            prefix = next((p for p in self.prefixes if m.topic().startswith(p)), "")
            self.orders[(prefix, ev["commit_lsn"])].setdefault(order, ev)
        self.events[t.label].setdefault(dedupe, ev)

    def partition_report(self):
        """Lines for the partitions whose log does not start at offset 0
        (records deleted by retention) or whose records the oracle did not
        all read: printed on failure, to tell a record that never reached
        Kafka from one the broker or the reader lost."""
        from confluent_kafka import TopicPartition
        out = []
        for (topic, part) in sorted(self.assigned):
            try:
                low, high = self.consumer.get_watermark_offsets(TopicPartition(topic, part), timeout=5)
            except Exception as e:  # noqa: BLE001 - a diagnostic only
                out.append(f"{topic}[{part}]: watermarks unavailable ({e})")
                continue
            n = self.read[(topic, part)]
            if low > 0 or n < high - low:
                out.append(f"{topic}[{part}]: log offsets {low}..{high}, {n} records read")
        return out

    def behind(self):
        """Partitions whose records the oracle has not all read yet (read
        fewer than the log holds between its watermarks). In a transactional
        topic the commit markers take offsets too, so such a partition always
        looks behind: callers bound how long they wait on this."""
        from confluent_kafka import TopicPartition
        short = []
        for (topic, part) in sorted(self.assigned):
            try:
                low, high = self.consumer.get_watermark_offsets(TopicPartition(topic, part), timeout=5)
            except Exception:  # noqa: BLE001 - unknown counts as behind
                short.append((topic, part))
                continue
            if self.read[(topic, part)] < high - low:
                short.append((topic, part))
        return short

    def records_with_key(self, text, limit=6):
        """Records (tombstones included) whose raw key contains `text`:
        tells a record that is absent from one that is there but unread."""
        needle = str(text).encode()
        hits = [f"{t}[{p}]@{o}{' tombstone' if tomb else ''}" for t, p, o, k, tomb in self.raw if needle in k]
        return hits[:limit] + ([f"... {len(hits) - limit} more"] if len(hits) > limit else [])

    def snapshot_rows(self, t):
        """The rows of the snapshot events (op r), as rebuild gives rows."""
        reads = [e for e in self.events[t.label].values() if e["op"] == "r"]
        if t.keyless:
            return Counter(row_json(e["after"]) for e in reads)
        return {e["key"]: e["after"] for e in reads}

    def gaps(self):
        """Transactions whose events are not numbered 1..n without a hole:
        [(prefix, commit_lsn, missing orders, events around them)]."""
        out = []
        for (prefix, lsn), seen in self.orders.items():
            top = max(seen)
            missing = [o for o in range(1, top + 1) if o not in seen]
            if missing:
                # The events numbered nearest the first hole (a hole may be
                # wider than the events on either side of it).
                near = [seen[o] for o in sorted(sorted(seen, key=lambda o: abs(o - missing[0]))[:4])]
                out.append((prefix, lsn, missing, near))
        return out

    def image(self, t, img):
        if img is None:
            return None
        out = {}
        for c, _, _ in t.cols:
            if self.fmt == "avro":
                raw = img.get(avro_name(c))
                out[c] = PLACEHOLDER if is_placeholder(raw) else from_avro(t.kind[c], raw)
            else:
                raw = img.get(c)
                out[c] = PLACEHOLDER if is_placeholder(raw) else raw
        return out

    def rebuild(self, t):
        """(rows, history): rows as pg_rows gives them; history[key] = events."""
        evs = sorted(self.events[t.label].values(), key=lambda e: (e["commit_lsn"] or 0, e["order"] != -1, e["order"]))
        history = defaultdict(list)
        if t.keyless:
            rows = Counter()
            for e in evs:
                if e["op"] == "t":
                    rows.clear()
                    continue
                if e["before"] is not None and e["op"] in ("u", "d"):
                    bj = row_json(e["before"])
                    if rows[bj] > 0:
                        rows[bj] -= 1
                    else:
                        history["__unmatched_before__"].append(e)
                if e["after"] is not None and e["op"] in ("c", "u", "r"):
                    rows[row_json(e["after"])] += 1
            return +rows, history
        rows = {}
        deleted = {}  # (commit_lsn, order) -> row the delete removed (key changes)
        for e in evs:
            if e["op"] == "t":
                rows.clear()
                continue
            k = e["key"]
            history[k].append(e)
            if e["op"] == "d":
                old_key = tuple((e["before"] or {}).get(c) for c in t.key)
                deleted[(e["commit_lsn"], e["order"])] = rows.pop(old_key, None)
                continue
            new = dict(e["after"])
            prev = rows.get(k)
            if prev is None:  # a key change: the delete of the old key just before
                prev = deleted.get((e["commit_lsn"], e["order"] - 1)) or deleted.get((e["commit_lsn"], e["order"]))
            for c, v in new.items():
                if v == PLACEHOLDER and prev is not None:
                    new[c] = prev.get(c)
            rows[k] = new
        return rows, history


def lsns(history, key, n=4):
    evs = history.get(key, [])[-n:]
    return "; ".join(f"{e['op']} commit_lsn={e['commit_lsn']} lsn={e['lsn']} order={e['order']} txId={e['txId']} at {e['where']}" for e in evs) or "no Kafka event"


class Diff:
    def __init__(self, seed, limit=6):
        self.seed, self.limit = seed, limit
        self.lines, self.total = [], 0
        self.per = Counter()
        self.missing_keys = []  # (output, table label, key) of rows an output lacks
        self.incomplete = 0  # columns documented as incomplete (never_carried)
        self.wiped = 0  # Redis rows lost to a redis_stop (lost_in_wipe)

    def add(self, where, t, key, col, pg, out, history):
        self.total += 1
        kind = "missing" if out == "row missing" else "extra" if pg == "no such row" else "value"
        if kind == "missing":
            self.missing_keys.append((where, t.label, key))
        self.per[(where, t.label, kind)] += 1
        if self.per[(where, t.label, kind)] <= self.limit:
            self.lines.append(
                f"DIFF seed={self.seed} output={where} table={t.label!r} key={key!r} column={col!r}\n"
                f"     postgres: {short(pg)}\n     {where}: {short(out)}\n     events: {lsns(history, key)}")


def short(v):
    s = json.dumps(v, ensure_ascii=False, default=str) if not isinstance(v, str) else repr(v)
    return s if len(s) < 300 else s[:140] + f"...({len(s)} chars)..." + s[-60:]


INCOMPLETE = "__walcast_incomplete"


def never_carried(events, col, wiped_lsn=0):
    """Whether a sink may lack `col` of a key and list it in
    `__walcast_incomplete` as documented: no event of the key since its last
    delete carried a value for it (each had the unchanged-TOAST placeholder,
    after a key change for example), or, for Redis after a redis_stop, every
    event that carried one committed before the wipe LSN. Such an event may
    have reached Redis before the wipe and been lost with it, and a later
    placeholder-only update then recreated the row without the value:
    `wiped_lsn` is Postgres's WAL position when Redis stopped, an upper bound
    of what walcast had applied, since a capture behind its backlog applies
    earlier commits after the restart (seeds 9000-9002 of the 2026-12-06
    long run)."""
    since = []
    for e in events or []:
        if e["op"] == "d":
            since = []
        elif e["after"] is not None:
            since.append(e)
    carried = [e for e in since if e["after"].get(col) != PLACEHOLDER]
    return bool(since) and all((e["commit_lsn"] or 0) < wiped_lsn for e in carried)


def lost_in_wipe(events, wiped_lsn):
    """Redis only: the stack's Redis has no persistence, so a redis_stop
    fault wipes it (README "How this is checked"): a row whose last change
    committed before the wipe may be missing, never stale or extra."""
    return bool(wiped_lsn) and bool(events) and (events[-1]["commit_lsn"] or 0) < wiped_lsn


def compare_rows(diff, where, t, expected, got, history, hash_mode=False, wiped_lsn=0):
    """Both ways: missing, extra, and per column. A column a sink lists in
    `__walcast_incomplete` and leaves out counts as documented only when
    no Kafka event of that key carried its value (never_carried)."""
    if t.keyless:
        for rj, n in (expected - got).items():
            diff.add(where, t, "(key-less row)", "*", json.loads(rj), f"missing ({n}x)", history)
        for rj, n in (got - expected).items():
            diff.add(where, t, "(key-less row)", "*", f"absent ({n}x)", json.loads(rj), history)
        return
    for k, row in expected.items():
        if k not in got:
            if lost_in_wipe(history.get(k), wiped_lsn):
                diff.wiped += 1
                continue
            diff.add(where, t, k, "*", "row present", "row missing", history)
            continue
        g = got[k]
        incomplete = g.get(INCOMPLETE) or []
        if isinstance(incomplete, str):  # a hash field holds the JSON array
            incomplete = json.loads(incomplete)
        for c, _, _ in t.cols:
            pv = row.get(c)
            gv = g.get(c)
            if hash_mode:
                gv = from_hash(pv, gv)
            if not same(pv, gv):
                if c in incomplete and gv in (None, "(field absent)") and never_carried(history.get(k), c, wiped_lsn):
                    diff.incomplete += 1
                    continue
                diff.add(where, t, k, c, pv, gv, history)
    for k in got:
        if k not in expected:
            diff.add(where, t, k, "*", "no such row", got[k], history)


def redis_rows(rds, prefix, t, hash_mode):
    """{key id string: row} for one table under `prefix`."""
    out = {}
    pat = prefix + t.schema + "." + t.name + ":"
    for raw in rds.scan_iter(match=glob_escape(pat) + "*", count=1000):
        name = raw.decode()
        kid = name[len(pat):]
        if hash_mode == "keys":
            out[kid] = None
        elif hash_mode:
            h = rds.hgetall(raw)
            out[kid] = {k.decode(): v.decode() for k, v in h.items()}
        else:
            v = rds.get(raw)
            out[kid] = json.loads(v) if v is not None else None
    return out


def glob_escape(s):
    return "".join("\\" + c if c in "*?[]\\" else c for c in s)


def search_rows(url, index):
    """{_id: _source}, or None when the index does not exist."""
    requests.post(f"{url}/{index}/_refresh", timeout=30)
    r = requests.post(f"{url}/{index}/_search?scroll=1m", json={"size": 1000, "query": {"match_all": {}}}, timeout=30)
    if r.status_code == 404:
        return None
    r.raise_for_status()
    body = r.json()
    out = {}
    while body["hits"]["hits"]:
        for h in body["hits"]["hits"]:
            out[h["_id"]] = h["_source"]
        r = requests.post(f"{url}/_search/scroll", json={"scroll": "1m", "scroll_id": body["_scroll_id"]}, timeout=30)
        r.raise_for_status()
        body = r.json()
    return out


class Topic:
    """Stands for a table in a difference about a whole topic."""

    def __init__(self, name):
        self.label = name


def dead_letters(bootstrap, topic, run):
    """[(source topic, partition, offset, error)] of the relay's dead-letter
    topic (README `on_refused`: headers walcast.topic/partition/offset/error)."""
    from confluent_kafka import Consumer, TopicPartition, OFFSET_BEGINNING
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"{run}-dlq-reader", "enable.auto.commit": False,
                  "isolation.level": "read_committed"})
    out = []
    try:
        md = c.list_topics(topic, timeout=10)
        parts = list((md.topics.get(topic).partitions or {}).keys()) if md.topics.get(topic) else []
        ends = {}
        for p in parts:
            low, high = c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            if high > low:
                ends[p] = high
        if not ends:
            return out
        c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in ends])
        deadline, last = time.time() + 60, time.time()
        while time.time() - last < 3 and time.time() < deadline:
            m = c.poll(0.5)
            if m is None or m.error():
                continue
            last = time.time()
            h = {k: (v.decode() if v is not None else None) for k, v in (m.headers() or [])}
            out.append((h.get("walcast.topic"), int(h.get("walcast.partition", -1)), int(h.get("walcast.offset", -1)),
                        h.get("walcast.error")))
        return out
    finally:
        c.close()


def relay_lag(bootstrap, group, prefix):
    """{topic: records not yet committed by the relay's consumer group}."""
    from confluent_kafka import Consumer, TopicPartition
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        md = c.list_topics(timeout=10)
        parts = [TopicPartition(t, p) for t, tm in md.topics.items() if t.startswith(prefix + ".") for p in tm.partitions]
        lag = Counter()
        for tp in c.committed(parts, timeout=10):
            low, high = c.get_watermark_offsets(tp, timeout=10)
            done = tp.offset if tp.offset >= 0 else low
            if high > done:
                lag[tp.topic] += high - done
        return lag
    finally:
        c.close()
