"""Column types the oracle generates, and every normalisation it applies.

This module is the one place that says how a Postgres value is expected to
look in each output walcast writes. The reference ("canonical") form of a
value is what walcast's JSON encoder documents (README "The event",
schemas/MAPPING.md, connectors/sdk/src/json.rs's table):

| kind      | canonical (JSON) form                                              |
|-----------|--------------------------------------------------------------------|
| bool      | true / false                                                       |
| int       | integer                                                            |
| float4    | the real's shortest decimal form as a double (0.1); NaN/±Infinity as "NaN", "Infinity", "-Infinity" |
| float8    | double; NaN/±Infinity as strings as above                          |
| numeric   | Postgres's text of the value as a string ("12.50", "NaN")          |
| money     | the amount as a decimal string, no currency sign or grouping       |
| text      | the type's text output (char(n) keeps its padding)                 |
| bytea     | base64                                                             |
| uuid      | lower-case hyphenated string                                       |
| json      | the JSON text as Postgres prints it                                |
| date      | days since 1970-01-01; ±infinity = i32 max/min                     |
| time      | microseconds since midnight                                        |
| timetz    | "HH:MM:SS[.f]Z" in UTC, no trailing zeros (Debezium's ZonedTime)     |
| ts        | microseconds since epoch (no zone); ±infinity = i64 max/min        |
| tstz      | "YYYY-MM-DDTHH:MM:SS.ffffffZ" (proleptic, astronomical year; outside 0000-9999 signed as Java writes it: +10000, -0043); "infinity"/"-infinity" |
| interval  | microseconds, a month = 30.4375 days, computed in doubles as Debezium's MicroDuration |
| string    | the type's text output (inet, cidr, macaddr, enum, bit, tsvector, xml, ...) |
| array     | JSON array of canonical elements, null for NULL elements           |

How the expected value is obtained from Postgres: the oracle selects, for
each column, a SQL expression that lets Postgres itself compute the numbers
(epoch microseconds with extract(), day differences, base64 with encode())
and finishes in Python with the documented formatting (`from_pg`). Other
representations are mapped onto the canonical form:

- Avro (confluent-kafka AvroDeserializer, fastavro): decimals to plain
  decimal strings (format 'f'), io.debezium.data.VariableScaleDecimal
  records {scale, value} to a decimal string with that scale, bytes to
  base64, timestamp-micros (timestamptz) rendered as the JSON encoder
  renders it, date/time/timestamp logical types read as their raw ints
  (fastavro's logical readers for them are turned off, because Python's
  datetime cannot hold ±infinity or BC dates), float NaN/±inf to strings.
  Field names are the Avro-sanitised column names (MAPPING.md: every
  character outside [A-Za-z0-9_] becomes `_`, a leading digit gets `_`).
- Redis hash: a field per non-NULL column, strings as they are, anything
  else as its JSON text (compared after json.loads).
- Redis JSON upsert and OpenSearch _source: the canonical form itself.
- Floats compare by repr (so -0.0 differs from 0.0); everything else by ==.
- The unchanged-TOAST placeholder `__debezium_unavailable_value` (README
  Guarantees; MAPPING.md "Values Avro cannot carry": a string, bytea as its
  UTF-8 bytes, a one-element array for string arrays) means "unchanged"
  when rebuilding from Kafka: the previous value of the row is kept (for an
  update that changes the key, the value the delete of the old key carried).
"""

import base64
import json
import math
import string
import struct
import uuid
from decimal import Context, Decimal

EXACT = Context(prec=100_000)  # Decimal's default context rounds to 28 digits

PLACEHOLDER = "__debezium_unavailable_value"
I32_MAX, I32_MIN = 2**31 - 1, -(2**31)
I64_MAX, I64_MIN = 2**63 - 1, -(2**63)


def qi(name):
    """Quote a Postgres identifier."""
    return '"' + name.replace('"', '""') + '"'


def ql(text):
    """Quote a Postgres string literal (standard_conforming_strings on)."""
    return "'" + text.replace("'", "''") + "'"


def avro_name(name):
    """MAPPING.md's sanitising of identifiers into Avro names."""
    out = "".join(c if (c.isascii() and (c.isalnum() or c == "_")) else "_" for c in name)
    if out[:1].isdigit():
        out = "_" + out
    return out


def f32(x):
    """A real as walcast's JSON writes it (and Debezium's JsonConverter):
    the double nearest to the real's shortest decimal form (0.1, not the
    real widened, 0.10000000149011612)."""
    v = struct.unpack("f", struct.pack("f", x))[0]
    if math.isnan(v) or math.isinf(v):
        return v
    for digits in range(1, 10):
        s = "%.*g" % (digits, v)
        if struct.unpack("f", struct.pack("f", float(s)))[0] == v:
            return float(s)
    return v


# ---------------------------------------------------------------- rendering


def time_of_day(micros):
    secs, frac = divmod(micros, 1_000_000)
    return "%02d:%02d:%02d.%06d" % (secs // 3600, (secs // 60) % 60, secs % 60, frac)


def zoned_time(micros):
    """Debezium's ZonedTime in UTC: the fraction without trailing zeros."""
    secs, frac = divmod(micros, 1_000_000)
    out = "%02d:%02d:%02d" % (secs // 3600, (secs // 60) % 60, secs % 60)
    return out + (("." + ("%06d" % frac).rstrip("0")) if frac else "") + "Z"


def civil_from_days(days):
    z = days + 719_468
    era = z // 146_097
    doe = z % 146_097
    yoe = (doe - doe // 1460 + doe // 36_524 - doe // 146_096) // 365
    y = yoe + era * 400
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    d = doy - (153 * mp + 2) // 5 + 1
    m = mp + 3 if mp < 10 else mp - 9
    return (y + 1 if m <= 2 else y, m, d)


def timestamp_utc(micros):
    if micros == I64_MAX:
        return "infinity"
    if micros == I64_MIN:
        return "-infinity"
    days, rest = divmod(micros, 86_400_000_000)
    y, m, d = civil_from_days(days)
    return "%s-%02d-%02dT%sZ" % (iso_year(y), m, d, time_of_day(rest))


def interval_micros(months, days, micros):
    """Debezium's MicroDuration (walcast_sdk::json::interval_micros): in
    doubles, from days, hours, minutes and fractional seconds (the time's
    parts truncated toward zero, carrying its sign), truncated at the end."""
    sign = -1 if micros < 0 else 1
    hours = sign * (abs(micros) // 3_600_000_000)
    minutes = sign * (abs(micros) % 3_600_000_000 // 60_000_000)
    seconds = float(sign * (abs(micros) % 60_000_000)) / 1e6
    d = float(months) * 30.4375 + float(days)
    total = ((d * 24.0 + float(hours)) * 60.0 + float(minutes)) * 60.0 + seconds
    return int(total * 1e6)


def special_float(x):
    if isinstance(x, float):
        if math.isnan(x):
            return "NaN"
        if math.isinf(x):
            return "Infinity" if x > 0 else "-Infinity"
    return x


# ------------------------------------------------------------ SQL side


def pg_expr(kind, col):
    """A SQL expression over `col` giving text that `from_pg` finishes."""
    if kind.startswith("array:"):
        inner = pg_expr(kind[6:], "u.e")
        return (
            f"CASE WHEN {col} IS NULL THEN NULL ELSE array_to_json(ARRAY(SELECT {inner} "
            f"FROM unnest({col}) WITH ORDINALITY AS u(e, o) ORDER BY u.o))::text END"
        )
    e = {
        "bool": f"CASE WHEN {col} THEN 'true' ELSE 'false' END",
        "money": f"{col}::numeric::text",
        "text": f"concat({col})",  # the output function: char(n) keeps its padding
        "bytea": f"encode({col}, 'base64')",
        "date": f"CASE WHEN {col} = 'infinity' THEN '{I32_MAX}' WHEN {col} = '-infinity' THEN '{I32_MIN}' "
        f"ELSE ({col} - DATE '1970-01-01')::text END",
        "time": f"(extract(epoch FROM {col}) * 1000000)::bigint::text",
        "timetz": f"(extract(epoch FROM {col}) * 1000000)::bigint::text",
        "ts": f"CASE WHEN {col} = 'infinity' THEN '{I64_MAX}' WHEN {col} = '-infinity' THEN '{I64_MIN}' "
        f"ELSE (extract(epoch FROM {col}) * 1000000)::bigint::text END",
        "interval": f"concat_ws(',', extract(year FROM {col}) * 12 + extract(month FROM {col}), "
        f"extract(day FROM {col}), extract(hour FROM {col}) * 3600000000 + "
        f"extract(minute FROM {col}) * 60000000 + extract(microseconds FROM {col}))",
    }
    e["tstz"] = e["ts"]
    # concat() applies the type's output function, as pgoutput does; a
    # ::text cast differs for some types (inet::text always shows the mask).
    e = e.get(kind, f"concat({col})")
    return f"CASE WHEN {col} IS NULL THEN NULL ELSE {e} END"


def from_pg(kind, s):
    """Finish the canonical value from `pg_expr`'s text."""
    if s is None:
        return None
    if kind.startswith("array:"):
        return [from_pg(kind[6:], x) for x in json.loads(s)]
    if kind == "bool":
        return s == "true"
    if kind == "int":
        return int(s)
    if kind in ("float4", "float8"):
        if s in ("NaN", "Infinity", "-Infinity"):
            return s
        return f32(float(s)) if kind == "float4" else float(s)
    if kind == "bytea":
        return s.replace("\n", "")
    if kind in ("date", "time", "ts"):
        return int(s)
    if kind == "timetz":
        return zoned_time(int(s) % 86_400_000_000)
    if kind == "tstz":
        return timestamp_utc(int(s))
    if kind == "interval":
        months, days, micros = (int(Decimal(p)) for p in s.split(","))
        return interval_micros(months, days, micros)
    return s  # numeric, money, text, uuid, json, string


# ------------------------------------------------------- event side


PLACEHOLDER_BASE64 = base64.b64encode(PLACEHOLDER.encode()).decode()


def is_placeholder(v):
    # JSON writes a bytea's as base64 of its bytes, an array's as [it].
    return v == PLACEHOLDER or v == PLACEHOLDER.encode() or v == [PLACEHOLDER] or v == PLACEHOLDER_BASE64


def from_avro(kind, v):
    if v is None:
        return None
    if kind.startswith("array:"):
        return [from_avro(kind[6:], x) for x in v]
    if kind == "float4":
        return special_float(f32(float(v)))
    if kind == "float8":
        return special_float(float(v))
    if kind in ("numeric", "money"):
        if isinstance(v, str):  # unconstrained_numeric = "string" (the default): Postgres's text
            return v
        if isinstance(v, dict):  # io.debezium.data.VariableScaleDecimal
            unscaled = int.from_bytes(v["value"], "big", signed=True)
            return format(Decimal(unscaled).scaleb(-v["scale"], context=EXACT), "f")
        return format(v, "f")
    if kind == "bytea":
        return base64.b64encode(v).decode()
    if kind == "uuid":
        return str(v)
    if kind == "tstz":
        return timestamp_utc(v)
    return v


# ------------------------------------------------------- search documents


class Special:
    """A value the search sink set aside in `__walcast_special.<column>`
    (README "Values a field cannot hold"): the column is absent from the
    document and its Postgres text is there instead. Arrays compare by
    their parsed JSON text (the sink writes the whole array's JSON)."""

    def __init__(self, text):
        self.text = text

    def __eq__(self, other):
        return isinstance(other, Special) and same(self.text, other.text)

    def __repr__(self):
        return f"__walcast_special:{self.text!r}"


def iso_year(y):
    """connectors/elasticsearch/src/mapping.rs iso_year: ISO 8601's
    expanded years outside 0000-9999 (astronomical: -0043 is 44 BC)."""
    if 0 <= y <= 9999:
        return "%04d" % y
    return "-%04d" % -y if y < 0 else "+%d" % y


def _split_date(text):
    y, m, d = text.rsplit("-", 2)
    return int(y), m, d


# Which Postgres types a search document is typed by, per regime
# (README "Index mappings", "Relays"): `typed` = direct mode (the capture
# knows every column's type), `avro` = a relay of Avro topics (types from
# the writer schema; inet/cidr/macaddr and an unconstrained numeric travel
# as strings and come back as text), `untyped` = a relay of JSON topics (no
# types: every value as the JSON encoder wrote it, dynamic templates only).
_AS_TEXT_IN_AVRO = {"numfree", "inet", "cidr", "macaddr", "macaddr8"}
_UNKNOWN_TO_WALCAST = {"bit", "varbit", "tsvector", "xml", "bitsarr"}


def search_value(ty_name, kind, v, regime):
    """The canonical value `v` as the search sink documents it: the field's
    value, or Special(text) for a value its field cannot hold."""
    if v is None or regime == "untyped" or ty_name in _UNKNOWN_TO_WALCAST:
        return v
    if regime == "avro" and ty_name in _AS_TEXT_IN_AVRO:
        return v
    if kind.startswith("array:"):
        out = [search_value(ty_name, kind[6:], x, regime) for x in v]
        if any(isinstance(x, Special) for x in out):
            return Special(v)
        return out
    if kind in ("float4", "float8") and v in ("NaN", "Infinity", "-Infinity"):
        return Special(v)
    if kind in ("numeric", "money") and v in ("NaN", "Infinity", "-Infinity"):
        return Special(v)
    if kind == "date":
        if v == I32_MAX:
            return Special("infinity")
        if v == I32_MIN:
            return Special("-infinity")
        y, m, d = civil_from_days(v)
        return "%s-%02d-%02d" % (iso_year(y), m, d)
    if kind == "ts":
        if v == I64_MAX:
            return Special("infinity")
        if v == I64_MIN:
            return Special("-infinity")
        days, rest = divmod(v, 86_400_000_000)
        y, m, d = civil_from_days(days)
        return "%s-%02d-%02dT%s" % (iso_year(y), m, d, time_of_day(rest))
    if kind == "tstz":
        if v in ("infinity", "-infinity"):
            return Special(v)
        day, rest = v.split("T", 1)
        y, m, d = _split_date(day)
        return f"{iso_year(y)}-{m}-{d}T{rest}"
    if ty_name == "inet" and "/" in v:
        return Special(v)
    if kind == "json":
        parsed = json.loads(v)
        return parsed if isinstance(parsed, dict) else Special(v)
    return v


def search_doc(t, doc, regime):
    """A search document's columns, with those set aside read from
    `__walcast_special` (arrays parsed from their JSON text)."""
    special = doc.get("__walcast_special") or {}
    out = {}
    for c, ty, _ in t.cols:
        if c in special:
            text = special[c]
            out[c] = Special(json.loads(text) if t.kind[c].startswith("array:") else text)
        else:
            out[c] = doc.get(c, "(field absent)")
    out["__walcast_incomplete"] = doc.get("__walcast_incomplete")
    return out


def from_hash(expected, s):
    """A Redis hash field, read against the canonical value expected."""
    if s is None or isinstance(expected, str) or expected is None:
        return s
    try:
        return json.loads(s)
    except ValueError:
        return s


def same(a, b):
    if isinstance(a, Special) or isinstance(b, Special):
        return isinstance(a, Special) and isinstance(b, Special) and same(a.text, b.text)
    if isinstance(a, float) and isinstance(b, float):
        return repr(a) == repr(b)
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, int) or isinstance(a, int) and isinstance(b, float):
        return False
    return a == b


def key_part(v):
    """A key value in a Redis key or a document id (strings unquoted)."""
    return v if isinstance(v, str) else json.dumps(v, separators=(",", ":"))


# ------------------------------------------------------------ generators

UNI = "aé漢字ßЖ😀 'q\"\\,{}\n\t"


def rtext(r, n):
    return "".join(r.choice(UNI) if r.random() < 0.2 else r.choice(string.ascii_letters) for _ in range(n))


def big_text(r):
    # Random letters compress poorly enough to be stored out of line.
    n = r.randint(4000, 12000)
    return "".join(r.choices(string.ascii_letters + string.digits + "é漢", k=n))


def lit(text, cast):
    return f"{ql(text)}::{cast}"


class Ty:
    """A column type: SQL type, canonical kind, value generator."""

    def __init__(self, name, sql, kind, gen, *, toastable=False, keyable=False, special=None):
        self.name, self.sql, self.kind, self.gen = name, sql, kind, gen
        self.toastable, self.keyable = toastable, keyable
        # special(r) -> literal of a value behind a switch (NaN, infinity, ...);
        # returns (switch_name, literal)
        self.special = special

    def value(self, r, big=False, allow=()):
        if big and self.toastable:
            return self.big(r)
        if self.special and r.random() < 0.2:
            sw, v = self.special(r)
            if sw in allow:
                return v
        return self.gen(r)

    def big(self, r):
        if self.kind == "bytea":
            return f"'\\x{r.randbytes(r.randint(3000, 9000)).hex()}'::bytea"
        if self.kind == "json":
            return lit(json.dumps({"big": big_text(r), "ü": [1, 2]}, ensure_ascii=r.random() < 0.5), self.sql)
        if self.kind == "array:text":
            return "ARRAY[" + ", ".join(ql(big_text(r)) for _ in range(2)) + ", NULL]::text[]"
        return lit(("d-" if self.name == "dom_text" else "") + big_text(r), self.sql)


def _float4(r):
    return lit(repr(r.choice([3.4028235e38, -3.4028235e38, 1.17549435e-38, 1e-45, 0.0, -0.0, 1.5, r.uniform(-1e6, 1e6)])), "float4")


def _float8(r):
    return lit(repr(r.choice([5e-324, 2.2250738585072014e-308, 0.1, -0.0, 1e38, r.uniform(-1e12, 1e12), r.random()])), "float8")


def _f8special(r):
    # Beyond float32's range too: OpenSearch's dynamic mapping makes such
    # fields `float` and refuses them.
    return "float_special", lit(r.choice(["NaN", "Infinity", "-Infinity", "1.7976931348623157e308", "-1.7976931348623157e308", "1e300"]), "float8")


def _fspecial(sql):
    return lambda r: ("float_special", lit(r.choice(["NaN", "Infinity", "-Infinity"]), sql))


def _numeric(p, s):
    def g(r):
        digits = r.randint(1, p)
        n = r.randint(0, 10**digits - 1)
        v = Decimal(n).scaleb(-s)
        if r.random() < 0.3:
            v = -v
        return lit(format(v, "f"), f"numeric({p},{s})")
    return g


def _numeric_free(r):
    return lit(r.choice(["0", "-0.000", "1.500", "123456789012345678901234567890.123456789",
                         "0.00000000000000000001", str(r.randint(-10**12, 10**12)),
                         format(Decimal(r.randint(-10**9, 10**9)).scaleb(-r.randint(0, 12)), "f")]), "numeric")


def _money(r):
    return lit(r.choice(["-92233720368547758.08", "92233720368547758.07", "0", "12.34", str(r.randint(-10**8, 10**8) / 100)]), "money")


def _date(r):
    return lit(r.choice(["2000-02-29", "1970-01-01", "1969-12-31", "0001-01-01", f"{r.randint(1900, 2100)}-{r.randint(1, 12):02d}-{r.randint(1, 28):02d}"]), "date")


def _date_special(r):
    return "infinite_dates", lit(r.choice(["infinity", "-infinity", "0044-03-15 BC", "4713-01-01 BC", "5874897-12-31", "9999-12-31"]), "date")


def _ts(r, sql):
    base = f"{r.randint(1900, 2100)}-{r.randint(1, 12):02d}-{r.randint(1, 28):02d} {r.randint(0, 23):02d}:{r.randint(0, 59):02d}:{r.randint(0, 59):02d}.{r.randint(0, 999999):06d}"
    v = r.choice([base, "1970-01-01 00:00:00", "1999-12-31 23:59:59.999999", "2038-01-19 03:14:08"])
    if sql == "timestamptz":
        v += r.choice(["+00", "+05:30", "-08", "+14"])
    return lit(v, sql)


def _ts_special(sql):
    def g(r):
        v = r.choice(["infinity", "-infinity", "0044-03-15 12:00:00 BC", "4713-01-01 00:00:00 BC", "200000-12-31 23:59:59.999999", "10000-01-01 00:00:00"])
        if sql == "timestamptz" and "infinity" not in v:
            v = v.replace(" BC", "+00 BC") if "BC" in v else v + "+00"
        return "infinite_dates", lit(v, sql)
    return g


def _time(r):
    return lit(r.choice(["00:00:00", "23:59:59.999999", f"{r.randint(0, 23):02d}:{r.randint(0, 59):02d}:{r.randint(0, 59):02d}.{r.randint(0, 999999):06d}"]), "time")


def _timetz(r):
    return lit(f"{r.randint(0, 23):02d}:{r.randint(0, 59):02d}:{r.randint(0, 59):02d}.{r.randint(0, 999999):06d}" + r.choice(["+00", "+05:30", "-12", "+14", "-03:30"]), "timetz")


def _interval(r):
    return lit(r.choice(["0", "1 year 2 mons 3 days 04:05:06.789", "-1 mons +3 days -00:00:01", "1000000 hours", "-178000 years",
                         f"{r.randint(-100, 100)} mons {r.randint(-100, 100)} days {r.randint(-100, 100)}:{r.randint(0, 59):02d}:{r.randint(0, 59):02d}.{r.randint(0, 999999):06d}"]), "interval")


def _json(sql):
    def g(r):
        v = r.choice([{"a": 1, "ü": "漢字 😀", "n": None, "l": [1.5, True, "x\"y"]}, [], "str\\u00e9", 12.5, {"k": rtext(r, 8)}])
        return lit(json.dumps(v, ensure_ascii=r.random() < 0.5), sql)
    return g


def catalog(enum_name, domain_int, domain_text):
    """Every type, by name. Enum and domain names are created per run."""
    T = Ty
    return [
        T("bool", "boolean", "bool", lambda r: r.choice(["true", "false"])),
        T("int2", "smallint", "int", lambda r: str(r.choice([-32768, 32767, 0, r.randint(-999, 999)])), keyable=True),
        T("int4", "integer", "int", lambda r: str(r.choice([-2**31, 2**31 - 1, r.randint(-10**6, 10**6)])), keyable=True),
        T("int8", "bigint", "int", lambda r: str(r.choice([-2**63, 2**63 - 1, r.randint(-10**12, 10**12)])), keyable=True),
        T("float4", "real", "float4", _float4, special=_fspecial("float4")),
        T("float8", "double precision", "float8", _float8, special=_f8special),
        T("num", "numeric(12,4)", "numeric", _numeric(12, 4), special=lambda r: ("numeric_nan_constrained", lit("NaN", "numeric"))),
        T("num0", "numeric(20,0)", "numeric", _numeric(20, 0)),
        T("numfree", "numeric", "numeric", _numeric_free, special=lambda r: ("numeric_nan", lit(r.choice(["NaN", "Infinity", "-Infinity"]), "numeric"))),
        T("money", "money", "money", _money),
        T("text", "text", "text", lambda r: lit(rtext(r, r.randint(0, 30)), "text"), toastable=True, keyable=True),
        T("varchar", "varchar(40)", "text", lambda r: lit(rtext(r, r.randint(0, 40)), "varchar(40)")),
        T("char", "char(7)", "text", lambda r: lit(rtext(r, r.randint(0, 7)).replace("\n", " "), "char(7)")),
        T("bytea", "bytea", "bytea", lambda r: f"'\\x{r.randbytes(r.randint(0, 40)).hex()}'::bytea", toastable=True),
        T("uuid", "uuid", "uuid", lambda r: lit(str(uuid.UUID(int=r.getrandbits(128))), "uuid"), keyable=True),
        T("json", "json", "json", _json("json"), toastable=True),
        T("jsonb", "jsonb", "json", _json("jsonb"), toastable=True),
        T("date", "date", "date", _date, special=_date_special),
        T("time", "time", "time", _time),
        T("timetz", "timetz", "timetz", _timetz),
        T("ts", "timestamp", "ts", lambda r: _ts(r, "timestamp"), special=_ts_special("timestamp")),
        T("tstz", "timestamptz", "tstz", lambda r: _ts(r, "timestamptz"), special=_ts_special("timestamptz")),
        T("interval", "interval", "interval", _interval),
        T("inet", "inet", "string", lambda r: lit(r.choice(["192.168.0.1", "10.0.0.0/8", "::1", "2001:db8::1/64", "127.0.0.1/32"]), "inet")),
        T("cidr", "cidr", "string", lambda r: lit(r.choice(["10.0.0.0/8", "2001:db8::/32", "192.168.1.0/24"]), "cidr")),
        T("macaddr", "macaddr", "string", lambda r: lit(":".join("%02x" % r.randint(0, 255) for _ in range(6)), "macaddr")),
        T("macaddr8", "macaddr8", "string", lambda r: lit(":".join("%02x" % r.randint(0, 255) for _ in range(8)), "macaddr8")),
        T("enum", qi(enum_name), "string", lambda r: lit(r.choice(["ünï", "with space", "Quote's", "plain"]), qi(enum_name))),
        T("dom_int", qi(domain_int), "int", lambda r: str(r.randint(1, 10**6))),
        T("dom_text", qi(domain_text), "text", lambda r: lit("d-" + rtext(r, 10), qi(domain_text)), toastable=True),
        T("bit", "bit(8)", "string", lambda r: f"B'{r.getrandbits(8):08b}'"),
        T("varbit", "varbit(20)", "string", lambda r: f"B'{''.join(r.choice('01') for _ in range(r.randint(0, 20)))}'"),
        T("tsvector", "tsvector", "string", lambda r: lit(" ".join(r.choice(["fat", "cat", "rat:1A", "'quoted word'", "ünï"]) for _ in range(3)), "tsvector")),
        T("xml", "xml", "string", lambda r: lit(f"<a x=\"1\">{r.choice(['ü', 'text', '&amp;'])}</a>", "xml")),
        T("int4arr", "integer[]", "array:int", lambda r: "ARRAY[" + ", ".join(r.choice(["NULL", str(r.randint(-9, 9))]) for _ in range(r.randint(1, 5))) + "]::integer[]"),
        T("textarr", "text[]", "array:text", lambda r: "ARRAY[" + ", ".join(r.choice(["NULL", ql(rtext(r, 5)), "''", "'NULL'"]) for _ in range(r.randint(1, 4))) + "]::text[]", toastable=True),
        T("float8arr", "double precision[]", "array:float8", lambda r: "ARRAY[" + ", ".join(r.choice(["NULL", "1.5", "-0", "0.1"]) for _ in range(r.randint(1, 4))) + "]::float8[]",
          special=lambda r: ("float_special", "ARRAY[1e300, NULL, 'NaN', '-Infinity']::float8[]")),
        T("numarr", "numeric[]", "array:numeric", lambda r: "ARRAY[" + ", ".join(r.choice(["NULL", "1.50", "-12345678901234567890.5"]) for _ in range(r.randint(1, 4))) + "]::numeric[]"),
        T("boolarr", "boolean[]", "array:bool", lambda r: "'{t,NULL,f}'::boolean[]"),
        T("datearr", "date[]", "array:date", lambda r: "ARRAY['2020-01-01', NULL, '1960-06-30']::date[]"),
        T("tstzarr", "timestamptz[]", "array:tstz", lambda r: f"ARRAY[NULL, {_ts(r, 'timestamptz')}]::timestamptz[]"),
        T("uuidarr", "uuid[]", "array:uuid", lambda r: f"ARRAY[{ql(str(uuid.UUID(int=r.getrandbits(128))))}, NULL]::uuid[]"),
        T("emptyarr", "integer[]", "array:int", lambda r: "'{}'::integer[]"),
        T("bitsarr", "bit(8)[]", "array:string", lambda r: f"ARRAY[B'{r.getrandbits(8):08b}', NULL]::bit(8)[]"),
    ]
