"""Random schemas and random concurrent DML, from one seed.

A scenario is a set of tables in a few schemas with awkward identifiers
(capitals, spaces, quotes, dots, non-ASCII letters). Each table draws its
columns from every type of types.catalog(), and a key shape: a single
column, a composite key, none (REPLICA IDENTITY FULL, listed in
keyless_tables), a unique index used as REPLICA IDENTITY USING INDEX, or a
hash-partitioned table. Every table also has a `wr` column naming the
writer that owns the row, so concurrent writers pick their own rows.

Tables are split in two groups: "sink" tables, which reach Redis and
OpenSearch (through the relay or directly), and "kafka" tables, which only
reach Kafka. Features the landed code gets wrong in the sinks (see the
switches in oracle.py) are still generated on Kafka-only tables, so the
Kafka rebuild keeps checking them.
"""

import random
import threading
import time

import psycopg

import uuid

from pgtypes import avro_name, catalog, ql, qi

SCHEMA_NAMES = ["public", "Sales Ünï", 'qu"o.te', "MiXed"]
COLUMN_WORDS = ["Col A", "ñandú", 'say "hi"', "UPPER", "lower", "Ümlaut", "x y z", "dot.ted", "9lives", "Ω"]


class Table:
    def __init__(self, schema, name, cols, key, shape, sinks, toast):
        self.schema, self.name = schema, name
        self.cols = cols  # [(name, Ty, notnull)]
        self.key = key  # key column names ([] for key-less)
        self.shape = shape  # single | composite | full | index | partitioned
        self.sinks = sinks  # reaches Redis/OpenSearch
        self.toast = toast  # gets values large enough to be TOASTed
        self.partitions = []
        self.kind = {c: t.kind for c, t, _ in cols}
        self.ty = {c: t for c, t, _ in cols}

    @property
    def qname(self):
        return f"{qi(self.schema)}.{qi(self.name)}"

    @property
    def config_name(self):
        return '"' + self.schema.replace('"', '""') + '"."' + self.name.replace('"', '""') + '"'

    @property
    def label(self):
        return f"{self.schema}.{self.name}"

    @property
    def keyless(self):
        return not self.key

    def value_cols(self):
        return [c for c, _, _ in self.cols if c not in self.key and c != "wr"]


def make_scenario(seed, switches, fmt):
    """Tables and DDL for `seed`."""
    r = random.Random(seed)
    enum_name, dom_int, dom_text = "Mood ü", "pos int", "Dom.Text"
    types = [t for t in catalog(enum_name, dom_int, dom_text) if t.name not in switches.get("exclude_types", ())]
    keyable = {t.name: t for t in types if t.keyable}
    ddl = [
        f"CREATE TYPE {qi(enum_name)} AS ENUM ('ünï', 'with space', 'Quote''s', 'plain')",
        f"CREATE DOMAIN {qi(dom_int)} AS integer CHECK (VALUE > 0)",
        f"CREATE DOMAIN {qi(dom_text)} AS text CHECK (VALUE LIKE 'd-%')",
    ]
    schemas = ["public"] + r.sample(SCHEMA_NAMES[1:], 2)
    for s in schemas[1:]:
        ddl.append(f"CREATE SCHEMA {qi(s)}")
    shapes = ["single", "single", "composite", "full", "index", "single", "composite"]
    if switches["partitioned"]:
        shapes.append("partitioned")
    r.shuffle(shapes)
    tables = []
    for i, shape in enumerate(shapes):
        schema = r.choice(schemas)
        name = f"t{i} " + r.choice(["Ünïcode", "with space", 'q"uote', "dot.ted", "CamelCase", "ясно"])
        # Kafka-only tables: key-less ones always (no document id or Redis
        # key exists for them), others by chance.
        sinks = shape != "full" and r.random() < 0.7
        if shape == "full" and switches["keyless_in_sinks"]:
            sinks = True
        toast = r.random() < 0.6
        # USING INDEX and FULL exclude each other (FULL would make it key-less)
        identity_full = shape == "full" or (shape != "index" and r.random() < 0.25)
        if toast and sinks and not identity_full and not switches["toast_unchanged_in_sinks"]:
            if shape == "index":
                sinks = False
            else:
                identity_full = True
        cols = []
        if shape in ("single", "partitioned"):
            kt = keyable["int8"] if shape == "partitioned" else keyable[r.choice(["int8", "int8", "int4", "text", "uuid"])]
            cols.append(("id", kt, True))
            key = ["id"]
        elif shape == "composite":
            cols.append(("Region Ü", keyable["text"], True))
            cols.append(("id", keyable[r.choice(["int8", "int4"])], True))
            key = ["Region Ü", "id"]
            if switches.get("pk_order_reversed"):
                # The primary key's index in another order than the columns
                # (Debezium orders key fields as the index does).
                key.reverse()
        elif shape == "index":
            pair = [("id", keyable["int8"], True), ("code", keyable["text"], True)]
            if not switches["relay_key_order"]:
                pair.reverse()  # key columns in byte order of their names: see the switch
            cols += pair
            key = [c for c, _, _ in pair]
        else:
            cols.append(("id", keyable["int8"], False))
            key = []
        cols.append(("wr", keyable["int2"], True))
        picked = r.sample(types, r.randint(8, 16))
        if toast:
            picked += [t for t in types if t.toastable and t not in picked][: r.randint(1, 2)]
        used = {avro_name(c) for c, _, _ in cols}
        for j, t in enumerate(picked):
            base = r.choice(COLUMN_WORDS)
            if base == "dot.ted" and sinks:
                base = "dot ted"  # OpenSearch reads dots in field names as paths
            cname = f"{base} {t.name}{j}"
            if avro_name(cname) in used:
                continue
            used.add(avro_name(cname))
            cols.append((cname, t, False))
        t = Table(schema, name, cols, key, shape, sinks, toast)
        t.identity_full = identity_full
        defaults = {}
        if switches.get("not_null_defaults"):
            # NOT NULL value columns with a DEFAULT, some of them: what a
            # key-only before image holds for them, and the schema's
            # `default`, are Debezium's to compare. Drawn from a generator
            # of their own, so the other draws of the scenario stay as they were.
            dr = random.Random(seed * 7919 + i)
            for n, (c, ty, nn) in enumerate(cols):
                if not nn and c not in key and c != "id" and dr.random() < 0.35:
                    cols[n] = (c, ty, True)
                    defaults[c] = ty.value(dr)
        coldefs = ", ".join(f"{qi(c)} {ty.sql}" + (" NOT NULL" if nn else "") +
                            (f" DEFAULT {defaults[c]}" if c in defaults else "") for c, ty, nn in cols)
        if shape == "partitioned":
            ddl.append(f"CREATE TABLE {t.qname} ({coldefs}, PRIMARY KEY (id)) PARTITION BY HASH (id)")
            for p in range(3):
                pname = f"{name} p{p}"
                t.partitions.append(pname)
                ddl.append(f"CREATE TABLE {qi(schema)}.{qi(pname)} PARTITION OF {t.qname} FOR VALUES WITH (MODULUS 3, REMAINDER {p})")
        elif shape in ("single", "composite"):
            ddl.append(f"CREATE TABLE {t.qname} ({coldefs}, PRIMARY KEY ({', '.join(qi(k) for k in key)}))")
        elif shape == "index":
            ddl.append(f"CREATE TABLE {t.qname} ({coldefs})")
            ddl.append(f"CREATE UNIQUE INDEX {qi(f'ux{i} Ü')} ON {t.qname} ({', '.join(qi(k) for k in key)})")
            ddl.append(f"ALTER TABLE {t.qname} REPLICA IDENTITY USING INDEX {qi(f'ux{i} Ü')}")
        else:
            ddl.append(f"CREATE TABLE {t.qname} ({coldefs})")
        if identity_full:
            ddl.append(f"ALTER TABLE {t.qname} REPLICA IDENTITY FULL")
            if shape == "partitioned":
                for p in t.partitions:
                    ddl.append(f"ALTER TABLE {qi(schema)}.{qi(p)} REPLICA IDENTITY FULL")
        tables.append(t)
    return tables, ddl


def allowed_specials(table, switches, fmt, mode):
    """Switch names whose values may be written to `table`."""
    allow = set()
    kafka_only = not table.sinks
    if kafka_only or switches["search_special_values"]:
        allow.add("infinite_dates")
        # A relay of JSON topics knows no column types: a "NaN" string in a
        # field dynamic mapping made `double` is refused and dead-lettered
        # (README "Relays": use Avro for typed search indices).
        if kafka_only or not (fmt == "json" and mode == "relay"):
            allow.add("float_special")
    # NaN/±Infinity in an unconstrained numeric: Avro carries them as
    # strings (unconstrained_numeric = "string", the default).
    if fmt == "json" or switches["numeric_nan_avro"]:
        allow.add("numeric_nan")
    # NaN in a numeric(p, s): an Avro decimal cannot hold it, and the
    # pipeline stops (schemas/MAPPING.md "Values Avro cannot carry").
    if fmt == "json":
        allow.add("numeric_nan_constrained")
    return allow


class Writer(threading.Thread):
    """One session writing random transactions until told to stop."""

    def __init__(self, wid, nwriters, seed, conninfo, tables, switches, fmt, stop, redis_sentinel=None, large=True, mode="direct", large_rows=(1500, 3000)):
        super().__init__(daemon=True, name=f"writer-{wid}")
        self.wid, self.n, self.r = wid, nwriters, random.Random(seed * 1000 + wid)
        self.conninfo, self.tables, self.switches, self.fmt, self.mode = conninfo, tables, switches, fmt, mode
        self.stop_evt = stop
        self.sentinel = redis_sentinel  # callable(table, key_values) -> set an invalidate sentinel
        self.counter = 0
        self.large = large
        self.large_rows = large_rows  # rows of a large transaction (min, max)
        self.stats = {"commits": 0, "rollbacks": 0, "errors": 0, "statements": 0}
        self.conn = None
        self.pending = []  # invalidate sentinels set by the open transaction

    # --- keys owned by this writer
    def new_key_values(self, t):
        self.counter += 1
        n = self.counter * self.n + self.wid + 1_000_000 * self.r.randint(0, 1)
        out = {}
        for k in t.key:
            kind = t.ty[k].name
            if kind in ("int8", "int4", "int2"):
                out[k] = str(n if kind != "int2" else n % 30000)
            elif kind == "text":
                out[k] = ql(f"k{self.wid}-{n}-" + self.r.choice(["Ü", "漢", "x y", "'q'"]))
            elif kind == "uuid":
                out[k] = ql(str(uuid.UUID(int=self.r.getrandbits(128))))
        if not t.key:
            out["id"] = str(n)
        return out

    def row_literals(self, t, key_lits, big=None):
        allow = allowed_specials(t, self.switches, self.fmt, self.mode)
        vals = {}
        for c, ty, nn in t.cols:
            if c in key_lits:
                vals[c] = key_lits[c]
            elif c == "wr":
                vals[c] = str(self.wid)
            elif not nn and self.r.random() < 0.15:
                vals[c] = "NULL"
            else:
                b = t.toast and ty.toastable and (self.r.random() < 0.5 if big is None else big)
                vals[c] = ty.value(self.r, big=b, allow=allow)
        return vals

    def insert_sql(self, t, rows):
        cols = [c for c, _, _ in t.cols]
        values = ", ".join("(" + ", ".join(v[c] for c in cols) + ")" for v in rows)
        return f"INSERT INTO {t.qname} ({', '.join(qi(c) for c in cols)}) VALUES {values}"

    def pick(self, cur, t):
        """(where clause, key dict) of one of this writer's rows, or None."""
        if t.keyless:
            cur.execute(f"SELECT ctid::text FROM {t.qname} WHERE wr = %s ORDER BY random() LIMIT 1", (self.wid,))
            row = cur.fetchone()
            return (f"ctid = {ql(row[0])}::tid", None) if row else None
        cur.execute(f"SELECT {', '.join(qi(k) + '::text' for k in t.key)} FROM {t.qname} WHERE wr = %s ORDER BY random() LIMIT 1", (self.wid,))
        row = cur.fetchone()
        if not row:
            return None
        where = " AND ".join(f"{qi(k)} = {ql(v)}::{t.ty[k].sql}" for k, v in zip(t.key, row))
        return where, dict(zip(t.key, row))

    def sentinel_for(self, t, key_text):
        if self.sentinel and t.sinks and key_text:
            self.sentinel(t, key_text, True)
            self.pending.append((t, key_text))

    def drop_sentinels(self, entries):
        for t, key in entries:
            self.sentinel(t, key, False)

    def op(self, cur, t):
        r = self.r
        x = r.random()
        cur.execute(f"SELECT count(*) FROM {t.qname} WHERE wr = %s", (self.wid,))
        mine = cur.fetchone()[0]
        if mine > 150:
            x = 0.95  # keep tables small: delete
        if x < 0.35:
            rows = [self.row_literals(t, self.new_key_values(t)) for _ in range(r.randint(1, 3))]
            for v in rows:
                self.sentinel_for(t, self.key_text(cur, t, v))
            cur.execute(self.insert_sql(t, rows))
            return
        picked = self.pick(cur, t)
        if picked is None:
            return
        where, key = picked
        if key:
            self.sentinel_for(t, key)
        if x < 0.75:
            # update: touch the large columns, or leave them alone
            cols = t.value_cols()
            touch_big = r.random() < 0.4
            chosen = [c for c in cols if (touch_big or not t.ty[c].toastable) and r.random() < 0.5] or [c for c in cols if not t.ty[c].toastable][:1]
            if not chosen:
                return
            vals = self.row_literals(t, {}, big=touch_big)
            sets = ", ".join(f"{qi(c)} = {vals[c]}" for c in chosen)
            cur.execute(f"UPDATE {t.qname} SET {sets} WHERE {where}")
        elif x < 0.85 and t.key:
            # primary-key change (moves the row across partitions too)
            new = self.new_key_values(t)
            self.sentinel_for(t, self.key_text(cur, t, new))
            sets = ", ".join(f"{qi(k)} = {new[k]}" for k in t.key)
            cur.execute(f"UPDATE {t.qname} SET {sets} WHERE {where}")
        else:
            cur.execute(f"DELETE FROM {t.qname} WHERE {where}")

    def key_text(self, cur, t, lits):
        if not t.key or not self.sentinel:
            return None
        cur.execute("SELECT " + ", ".join(f"({lits[k]})::{t.ty[k].sql}::text" for k in t.key))
        return dict(zip(t.key, cur.fetchone()))

    def transaction(self, cur):
        r = self.r
        kind = r.random()
        if self.large and kind < 0.02:
            # a large transaction: many rows in one go, then an update of them all
            t = r.choice(self.tables)
            rows = [self.row_literals(t, self.new_key_values(t), big=False) for _ in range(r.randint(*self.large_rows))]
            for i in range(0, len(rows), 500):
                cur.execute(self.insert_sql(t, rows[i:i + 500]))
            nullable = {c for c, _, nn in t.cols if not nn}
            small = [c for c in t.value_cols() if not t.ty[c].toastable and t.ty[c].kind == "int" and c in nullable]
            if small:
                cur.execute(f"UPDATE {t.qname} SET {qi(small[0])} = NULL WHERE wr = %s", (self.wid,))
            cur.execute(f"DELETE FROM {t.qname} WHERE wr = %s", (self.wid,))
            return "large"
        if kind < 0.035:
            t = r.choice([t for t in self.tables if not t.sinks or self.switches["truncate_in_sinks"]] or [None])
            if t is None:
                return "commit"
            cur.execute(f"TRUNCATE {t.qname}")
            return "truncate"
        for _ in range(r.randint(1, 6)):
            t = r.choice(self.tables)
            if r.random() < 0.1:
                cur.execute("SAVEPOINT sp")
                before = len(self.pending)
                self.op(cur, t)
                cur.execute("ROLLBACK TO SAVEPOINT sp")
                self.drop_sentinels(self.pending[before:])
                del self.pending[before:]
            else:
                self.op(cur, t)
            self.stats["statements"] += 1
        return "rollback" if r.random() < 0.07 else "commit"

    def connect(self):
        while not self.stop_evt.is_set():
            try:
                self.conn = psycopg.connect(self.conninfo, autocommit=False, connect_timeout=5)
                with self.conn.cursor() as c:
                    c.execute("SET lock_timeout = '5s'; SET deadlock_timeout = '100ms'")
                self.conn.commit()
                return True
            except psycopg.Error:
                time.sleep(0.5)
        return False

    def run(self):
        if not self.connect():
            return
        while not self.stop_evt.is_set():
            self.pending = []
            try:
                with self.conn.cursor() as cur:
                    outcome = self.transaction(cur)
                if outcome == "rollback":
                    self.conn.rollback()
                    self.drop_sentinels(self.pending)
                    self.stats["rollbacks"] += 1
                else:
                    self.conn.commit()
                    self.stats["commits"] += 1
            except psycopg.OperationalError:
                # The commit may or may not have happened: drop the sentinels
                # (if it happened, the invalidation removes them anyway).
                self.drop_sentinels(self.pending)
                self.stats["errors"] += 1
                try:
                    self.conn.close()
                except Exception:
                    pass
                if not self.connect():
                    return
            except psycopg.Error:
                # deadlocks, lock timeouts, check violations: Postgres is the truth
                self.stats["errors"] += 1
                self.drop_sentinels(self.pending)
                try:
                    self.conn.rollback()
                except psycopg.Error:
                    self.connect()
            time.sleep(self.r.random() * 0.02)
        try:
            self.conn.close()
        except Exception:
            pass
