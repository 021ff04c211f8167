"""Decodes Confluent-framed Avro records with Confluent's own Python client.

Helper of schemas/tests/python_reader.rs; not a test on its own.

    decode_with_confluent.py <registry url> <topic> <file>...

Each file holds one record value (magic byte, schema id, Avro datum). For
each, prints one JSON line: the value as confluent_kafka's AvroDeserializer
(fastavro underneath) returns it, with Python types rendered so the Rust
side can compare exactly: Decimal as its str(), datetime/date/time as
isoformat(), UUID as str, bytes as hex.
"""

import datetime
import decimal
import json
import sys
import uuid

from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer
from confluent_kafka.serialization import MessageField, SerializationContext


def render(value):
    if isinstance(value, decimal.Decimal):
        return {"decimal": str(value)}
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return {type(value).__name__: value.isoformat()}
    if isinstance(value, uuid.UUID):
        return {"uuid": str(value)}
    if isinstance(value, bytes):
        return {"bytes": value.hex()}
    raise TypeError(f"cannot render {type(value).__name__}: {value!r}")


def main():
    url, topic, files = sys.argv[1], sys.argv[2], sys.argv[3:]
    client = SchemaRegistryClient({"url": url})
    deserializer = AvroDeserializer(client)
    context = SerializationContext(topic, MessageField.VALUE)
    for path in files:
        with open(path, "rb") as f:
            data = f.read()
        value = deserializer(data, context)
        print(json.dumps(value, default=render, sort_keys=True))


if __name__ == "__main__":
    main()
