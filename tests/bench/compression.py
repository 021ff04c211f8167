#!/usr/bin/env python3
"""Kafka compression codecs on walcast's JSON records: ratio and CPU cost.

Why this way: librdkafka compresses each partition's record batch as one
buffer, with a fresh context per batch (zstd: ZSTD_createCStream +
ZSTD_initCStream_srcSize at `compression.level`, 3 by default; lz4: an LZ4F
frame of independent 64 KiB blocks at level 0 unless set). This script does
the same with the same libraries (python-zstandard bundles zstd 1.5.7, the
version rdkafka-sys links; python-lz4 binds lz4 1.9.4, the version bundled in
librdkafka) on record batches of the benchmark table's JSON envelopes (the
8-column row of tests/bench, key and value as walcast's JSON encoder writes
them, framed as Kafka v2 records), so the figures isolate the codec: what
the broker and the consumers receive (ratio) and what the producer pays per
MB of JSON (CPU seconds, single thread).

Needs `pip install zstandard lz4` (a venv is fine). Usage:
    python3 tests/bench/compression.py [--seconds 1.0]
Prints a Markdown table; the method is in this docstring.
"""

import argparse
import json
import random
import time

import lz4.frame
import zstandard


def varint(n):
    """Kafka's zigzag varint."""
    n = (n << 1) ^ (n >> 63)
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def ts(micros):
    secs, frac = divmod(micros, 1_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{frac:06d}Z"


WORDS = ("order shipped refund pending invoice customer account balance transfer delivery "
         "address street city warehouse returned damaged express standard priority note "
         "payment card bank approved declined review manual check duplicate partial").split()


def envelope(i, varied=False):
    """What walcast's JSON encoder writes for row i of bench_rows (an insert).
    `varied`: the bench's row generator is very regular (row i+1 repeats row
    i but for counters); varied rows have random amounts, accounts, labels
    and notes of random words, closer to real tables."""
    lsn = 0x1_0000_0000 + i * 120
    rnd = random.Random(i)
    row = {
        "id": i,
        "account": rnd.randrange(10**9) if varied else i % 9973,
        "label": "-".join(rnd.choices(WORDS, k=2)) + f"-{rnd.randrange(10**6)}" if varied else f"label-{i}",
        "amount": f"{rnd.randrange(10**7)}.{rnd.randrange(100):02d}" if varied else f"{i % 100000}.{i % 100:02d}",
        "currency": rnd.choice(("EUR", "USD", "GBP", "CHF")) if varied else "EUR",
        "note": " ".join(rnd.choices(WORDS, k=rnd.randrange(3, 12))) if varied
        else "some free text that a real row might carry, about sixty bytes",
        # now() in the workload's INSERT ... SELECT: one value per 1000-row transaction.
        "created_at": ts(1_717_000_000_000_000 + i // 1000 * 1_000_123),
        "updated_at": ts(1_717_000_000_000_000 + i // 1000 * 1_000_123),
    }
    ev = {
        "before": None,
        "after": row,
        "source": {
            "version": "0.1.0", "connector": "postgresql", "name": "bench",
            "ts_ms": 1_717_000_000_123 + i // 1000, "ts_us": 1_717_000_000_123_456 + i // 1000 * 1000,
            "ts_ns": (1_717_000_000_123_456 + i // 1000 * 1000) * 1000, "snapshot": "false",
            "db": "walcast_bench", "schema": "public", "table": "bench_rows", "txId": 7_654_321 + i // 1000,
            "lsn": lsn, "xmin": None, "commit_lsn": lsn + 4096,
        },
        "op": "c",
        "ts_ms": 1_717_000_000_200 + i // 50,
        "ts_us": (1_717_000_000_200 + i // 50) * 1000,
        "ts_ns": (1_717_000_000_200 + i // 50) * 1_000_000,
        "transaction": {"id": f"{7_654_321 + i // 1000}:{lsn + 4096}", "total_order": i % 1000 + 1,
                        "data_collection_order": i % 1000 + 1},
    }
    dump = lambda o: json.dumps(o, separators=(",", ":"), ensure_ascii=False).encode()
    return dump({"id": i}), dump(ev)


def batch(start, n, varied):
    """The records section of a Kafka v2 record batch: what librdkafka compresses."""
    out = bytearray()
    for k in range(n):
        key, value = envelope(start + k, varied)
        body = b"\x00" + varint(0) + varint(k) + varint(len(key)) + key + varint(len(value)) + value + varint(0)
        out += varint(len(body)) + body
    return bytes(out)


CODECS = [("zstd", lvl) for lvl in (1, 3, 6, 9)] + [("lz4", 0), ("lz4", 9)]


def compress(codec, level, data):
    if codec == "zstd":
        # A new context per batch, size known up front, as librdkafka does.
        return zstandard.ZstdCompressor(level=level).compress(data)
    return lz4.frame.compress(data, compression_level=level, block_size=lz4.frame.BLOCKSIZE_MAX64KB,
                              block_linked=False, content_checksum=False)


def decompress(codec, data):
    if codec == "zstd":
        return zstandard.ZstdDecompressor().decompress(data)
    return lz4.frame.decompress(data)


def measure(fn, seconds):
    """CPU seconds per call (process time: this process is single-threaded)."""
    calls, start = 0, time.process_time()
    while True:
        fn()
        calls += 1
        spent = time.process_time() - start
        if spent >= seconds:
            return spent / calls


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=1.0, help="CPU seconds per measurement")
    args = ap.parse_args()
    print(f"zstd {'.'.join(map(str, zstandard.ZSTD_VERSION))}, lz4 {lz4.library_version_string()}")
    print()
    print("| rows | records per batch | batch KiB | codec | level | ratio (compressed ÷ raw) "
          "| compress CPU ms per MB | MB/s per core | decompress CPU ms per MB |")
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|")
    for varied, n in [(v, n) for v in (False, True) for n in (10, 100, 1000)]:
        batches = [batch(b * n, n, varied) for b in range(max(1, 3000 // n))]
        raw = sum(map(len, batches))
        for codec, level in CODECS:
            packed = [compress(codec, level, b) for b in batches]
            assert [decompress(codec, p) for p in packed] == batches
            ratio = sum(map(len, packed)) / raw
            c = measure(lambda: [compress(codec, level, b) for b in batches], args.seconds)
            d = measure(lambda: [decompress(codec, p) for p in packed], args.seconds)
            mb = raw / 1e6
            print(f"| {'varied' if varied else 'bench'} | {n} | {raw / len(batches) / 1024:.1f} | {codec} | {level} | {ratio:.3f} "
                  f"| {c / mb * 1e3:.2f} | {mb / c:.0f} | {d / mb * 1e3:.2f} |", flush=True)


if __name__ == "__main__":
    main()
