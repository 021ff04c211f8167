"""The Debezium parity workload, from the oracle's generator; the Rust test
tests/debezium_generated.rs drives it and compares what Debezium 3.6.1 and
walcast publish for it.

  parity.py scenario --seed N --format json|avro --dsn DSN
      creates the seed's tables (generator.make_scenario: every type of
      pgtypes.catalog(), awkward identifiers, single, composite, key-less
      and REPLICA IDENTITY USING INDEX tables, REPLICA IDENTITY FULL on
      some, TOASTed columns on some) and prints them as JSON.
  parity.py write --seed N --format F --dsn DSN --transactions K
      runs K transactions of one generator.Writer (inserts, updates that
      touch or leave alone the TOASTed columns, key changes, deletes,
      truncates, savepoints rolled back, rolled-back transactions, a few
      larger transactions), one after the other.
  parity.py dump --format F --bootstrap B [--registry URL] --pattern REGEX
                 [--expect N] [--timeout S]
      waits until the topics matching REGEX hold at least N records (or S
      seconds pass), then prints every record of them as JSON: topic,
      partition, offset, key and value (decoded: JSON as is; Avro with
      fastavro against the writer schema the registry returns for the
      record's id, rendered as tests/fixtures/avro_topic_dump.py does) and,
      for Avro, the writer schemas by id.

Everything one seed does is reproducible but for what Postgres decides
(which row `ORDER BY random()` picks: the session seeds it with setseed).
"""

import argparse
import copy
import io
import json
import os
import re
import struct
import sys
import threading
import time

import psycopg

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, here)
sys.path.insert(0, os.path.join(here, "..", "fixtures"))

from generator import Writer, make_scenario  # noqa: E402

# The generator's feature switches (oracle.py SWITCHES), as parity wants
# them: no partitioned tables (Debezium publishes partitions by their own
# names unless its publication says publish_via_partition_root, and the
# test's publication is shared by nothing else: not compared), truncates on
# every table, composite primary keys whose index order differs from the
# column order, and NOT NULL columns with a DEFAULT.
SWITCHES = {
    "partitioned": False,
    "toast_unchanged_in_sinks": True,
    "keyless_in_sinks": True,
    "numeric_nan_avro": False,
    "search_special_values": True,
    "truncate_in_sinks": True,
    "relay_key_order": True,
    "pk_order_reversed": True,
    "not_null_defaults": True,
    # Debezium 3.6.1 cannot read bit(n)[] columns ("Failed to read value of
    # array"; a NOT NULL one stops its task): not generated.
    "exclude_types": ["bitsarr"],
}


def scenario(args):
    tables, ddl = make_scenario(args.seed, SWITCHES, args.format)
    with psycopg.connect(args.dsn, autocommit=True) as conn:
        for stmt in ddl:
            conn.execute(stmt)
    out = []
    for t in tables:
        out.append({
            "schema": t.schema,
            "name": t.name,
            "quoted": t.qname,
            "config_name": t.config_name,
            # Debezium's table.include.list entry: a Java regular
            # expression matched against `schema.table`.
            "include": re.escape(t.schema) + r"\." + re.escape(t.name),
            "keyless": t.keyless,
            "shape": t.shape,
            "identity_full": t.identity_full,
            "columns": [{"name": c, "type": ty.sql, "not_null": nn} for c, ty, nn in t.cols],
        })
    json.dump({"tables": out}, sys.stdout, ensure_ascii=False)


def write(args):
    tables, _ = make_scenario(args.seed, SWITCHES, args.format)
    for t in tables:
        t.sinks = False  # Kafka only: every special value the format carries
    w = Writer(0, 1, args.seed, args.dsn, tables, SWITCHES, args.format, threading.Event(),
               large=True, large_rows=(20, 60))
    # Debezium (and walcast's debezium Avro shape) stop on NaN/±Infinity in
    # a numeric: Avro runs leave them out (generator.allowed_specials).
    if not w.connect():
        raise SystemExit("cannot connect to Postgres")
    with w.conn.cursor() as cur:
        cur.execute("SELECT setseed(%s)", (((args.seed % 1000) / 1000.0),))
    w.conn.commit()
    outcomes = {}
    for _ in range(args.transactions):
        try:
            with w.conn.cursor() as cur:
                outcome = w.transaction(cur)
            if outcome == "rollback":
                w.conn.rollback()
            else:
                w.conn.commit()
        except psycopg.Error as e:
            # check violations, lock timeouts: Postgres is the truth
            outcome = f"error {type(e).__name__}"
            w.conn.rollback()
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    w.conn.close()
    json.dump(outcomes, sys.stdout)


def dump(args):
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({
        "bootstrap.servers": args.bootstrap,
        "group.id": f"parity-dump-{time.time()}",
        "enable.auto.commit": False,
        "isolation.level": "read_committed",
    })
    pattern = re.compile(args.pattern)
    deadline = time.time() + args.timeout

    def watermarks():
        md = consumer.list_topics(timeout=10)
        out = {}
        for name, t in md.topics.items():
            if pattern.match(name):
                for p in t.partitions:
                    out[(name, p)] = consumer.get_watermark_offsets(TopicPartition(name, p), timeout=10)
        return out

    # Until the count is reached and stays put for a second (a producer
    # still writing ends up in the comparison as a difference).
    last = None
    while True:
        marks = watermarks()
        total = sum(h - lo for lo, h in marks.values())
        if (total >= args.expect and total == last) or time.time() > deadline:
            break
        last = total if total >= args.expect else None
        time.sleep(1)
    assignment = [TopicPartition(t, p, lo) for (t, p), (lo, h) in sorted(marks.items()) if h > lo]
    remaining = {(t, p): h for (t, p), (lo, h) in marks.items() if h > lo}
    decode = avro_decoder(args.registry) if args.format == "avro" else json_decoder()
    records = []
    if assignment:
        consumer.assign(assignment)
    read_deadline = time.time() + 60
    while remaining and time.time() < read_deadline:
        m = consumer.poll(0.5)
        if m is None or m.error():
            # Transaction markers take offsets no message has: done with a
            # partition once the position is past its end.
            for tp in consumer.position([TopicPartition(t, p) for t, p in remaining]):
                if tp.offset >= remaining[(tp.topic, tp.partition)]:
                    del remaining[(tp.topic, tp.partition)]
            continue
        key_id, key = decode.one(m.key())
        value_id, value = decode.one(m.value())
        records.append({"topic": m.topic(), "partition": m.partition(), "offset": m.offset(),
                        "key_id": key_id, "key": key, "value_id": value_id, "value": value})
        tp = (m.topic(), m.partition())
        if tp in remaining and m.offset() + 1 >= remaining[tp]:
            del remaining[tp]
    consumer.close()
    records.sort(key=lambda r: (r["topic"], r["partition"], r["offset"]))
    json.dump({"records": records, "schemas": decode.schemas(), "expected": args.expect},
              sys.stdout, ensure_ascii=False)


class json_decoder:
    def one(self, raw):
        return None, (None if raw is None else json.loads(raw))

    def schemas(self):
        return {}


class avro_decoder:
    def __init__(self, registry):
        import fastavro
        from confluent_kafka.schema_registry import SchemaRegistryClient
        from avro_topic_dump import as_java_reads_it, render
        self.fastavro, self.render, self.as_java_reads_it = fastavro, render, as_java_reads_it
        self.client = SchemaRegistryClient({"url": registry, "timeout": 30})
        self.raw, self.parsed = {}, {}

    def schema(self, i):
        if i not in self.parsed:
            self.raw[i] = json.loads(self.client.get_schema(i).schema_str)
            self.parsed[i] = self.fastavro.parse_schema(self.as_java_reads_it(copy.deepcopy(self.raw[i])))
        return self.parsed[i]

    def one(self, raw):
        if raw is None:
            return None, None
        if raw[0] != 0:
            raise SystemExit(f"not the Confluent wire format: {raw[:8]!r}")
        sid = struct.unpack(">I", raw[1:5])[0]
        return sid, self.render(self.fastavro.schemaless_reader(io.BytesIO(raw[5:]), self.schema(sid)))

    def schemas(self):
        return {str(k): v for k, v in self.raw.items()}


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("scenario", "write"):
        p = sub.add_parser(name)
        p.add_argument("--seed", type=int, required=True)
        p.add_argument("--format", choices=["json", "avro"], required=True)
        p.add_argument("--dsn", required=True)
        if name == "write":
            p.add_argument("--transactions", type=int, default=60)
    p = sub.add_parser("dump")
    p.add_argument("--format", choices=["json", "avro"], required=True)
    p.add_argument("--bootstrap", required=True)
    p.add_argument("--registry")
    p.add_argument("--pattern", required=True)
    p.add_argument("--expect", type=int, default=0)
    p.add_argument("--timeout", type=float, default=120)
    args = ap.parse_args()
    {"scenario": scenario, "write": write, "dump": dump}[args.cmd](args)


if __name__ == "__main__":
    main()
