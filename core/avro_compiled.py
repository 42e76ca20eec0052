"""Avro readers compiled from the schemas, for the replay's hot path.

fastavro stays the codec of record: it writes every event and reads anything unusual.
Its reader walks the schema for each value and pulls each field through a file-like
object: about 6 µs of an event's decode, where a replay at 100k events/s has 10 µs
for everything. From the schemas we hold on disk this module generates, once at
import, one straight-line Python function per record schema that reads the bytes in
place (`read(data, pos) -> (value, pos)`): about half the time, and with `factories`
it builds the pydantic objects directly (measured: a whole event's decode from 10 µs
to 5 µs, bench/bench_replay.py).

A compiled reader only ever reads data written with its own schema (no resolution).
It is strict where a silent mistake could hide: a negative length or a union branch
out of range raises, and a caller must check that the value ends where the data
ends. Any exception means "read this with fastavro instead", which then reports the
corrupt bytes the usual way (core/codec.py). tests/test_avro_compiled.py proves the
two readers agree on every event type.
"""
from __future__ import annotations

import struct
from collections.abc import Callable, Mapping
from typing import Any

Reader = Callable[[bytes, int], tuple[Any, int]]


class Unsupported(ValueError):
    """A schema construct this compiler does not handle; use fastavro for it."""


class _Code:
    """Straight-line Python being generated: its lines, the constants it names, fresh names."""

    def __init__(self, consts: dict[str, Any] | None = None) -> None:
        self.lines: list[str] = []
        self.consts: dict[str, Any] = dict(consts or {})
        self._open: set[str] = set()  # names of the records being emitted (to refuse recursion)
        self._n = 0

    def var(self, stem: str = "v") -> str:
        self._n += 1
        return f"{stem}{self._n}"

    def const(self, value: Any) -> str:
        name = self.var("c")
        self.consts[name] = value
        return name

    def emit(self, indent: int, line: str) -> None:
        self.lines.append("    " * indent + line)


class _Emitter(_Code):
    def __init__(self, factories: dict[str, Callable[[dict], Any]],
                 embedded: dict[str, tuple[tuple[str, ...], Mapping[Any, Reader]]]) -> None:
        super().__init__()
        self.factories = factories
        self.embedded = embedded  # for the top-level record's fields only

    def long(self, indent: int, target: str) -> None:
        """target = the next zigzag varint."""
        self._varint(indent, target)
        self.emit(indent, f"{target} = ({target} >> 1) ^ -({target} & 1)")

    def length(self, indent: int, target: str) -> None:
        """target = the next zigzag varint, which must not be negative (odd when zigzagged)."""
        self._varint(indent, target)
        self.emit(indent, f"if {target} & 1: raise ValueError('negative length')")
        self.emit(indent, f"{target} >>= 1")

    def _varint(self, indent: int, target: str) -> None:
        """target = the next varint, still zigzag-encoded. Unrolled: a loop costs more than
        the bytes (a timestamp in ms takes 6)."""
        self.emit(indent, f"{target} = data[pos]; pos += 1")
        for k in range(1, 10):
            self.emit(indent + k - 1, f"if {target} > {(1 << (7 * k)) - 1}:")
            self.emit(indent + k, f"{target} += (data[pos] - 1) << {7 * k}; pos += 1")
        # A long is 64 bits: a 10th byte may add bit 63 and nothing more (fastavro would wrap
        # higher bits; a 10th byte that says "more" makes the varint longer than 10 bytes).
        self.emit(indent + 9, f"if {target} >= {1 << 64}: raise ValueError('varint beyond 64 bits or 10 bytes')")

    def value(self, schema: Any, indent: int, target: str, named: dict[str, Any]) -> None:
        """Emit code that reads one value of `schema` into the variable `target`."""
        if isinstance(schema, str) and schema in named:
            if schema in self._open:  # code is straight-line: a type that contains itself cannot be
                raise Unsupported(f"recursive type {schema!r}")
            schema = named[schema]
        if isinstance(schema, list):
            return self._union(schema, indent, target, named)
        kind = schema if isinstance(schema, str) else schema["type"]
        if isinstance(schema, dict) and "logicalType" in schema:
            raise Unsupported(f"logical type {schema['logicalType']}")
        if kind == "null":
            self.emit(indent, f"{target} = None")
        elif kind == "boolean":
            self.emit(indent, f"{target} = data[pos] != 0; pos += 1")  # as fastavro reads it
        elif kind in ("int", "long"):
            self.long(indent, target)
        elif kind in ("float", "double"):
            fmt = self.const(struct.Struct("<f" if kind == "float" else "<d"))
            self.emit(indent, f"{target} = {fmt}.unpack_from(data, pos)[0]; pos += {fmt}.size")
        elif kind in ("string", "bytes"):
            n = self.var("n")
            self.length(indent, n)
            decode = ".decode()" if kind == "string" else ""
            self.emit(indent, f"{target} = data[pos:pos + {n}]{decode}; pos += {n}")
        elif kind == "fixed":
            self._name(schema, named)
            size = int(schema["size"])
            self.emit(indent, f"{target} = data[pos:pos + {size}]; pos += {size}")
        elif kind == "enum":
            self._name(schema, named)
            symbols = self.const(tuple(schema["symbols"]))
            self.long(indent, target)
            self.emit(indent, f"if {target} < 0: raise ValueError('enum index')")
            self.emit(indent, f"{target} = {symbols}[{target}]")
        elif kind == "record":
            self._name(schema, named)
            self._open |= {schema.get("name", ""), f"{schema.get('namespace')}.{schema.get('name', '')}"}
            embedded, self.embedded = self.embedded, {}
            seen: dict[str, str] = {}  # field name -> its variable
            for f in schema["fields"]:
                v = seen[f["name"]] = self.var()
                if f["name"] in embedded:
                    self._embedded(f, embedded[f["name"]], seen, indent, v)
                else:
                    self.value(f["type"], indent, v, named)
            record = f"{{{', '.join(f'{name!r}: {v}' for name, v in seen.items())}}}"
            factory = self.factories.get(schema.get("name", ""))
            if factory is not None:
                record = f"{self.const(factory)}({record})"
            self.emit(indent, f"{target} = {record}")
            self._open -= {schema.get("name", ""), f"{schema.get('namespace')}.{schema.get('name', '')}"}
        elif kind in ("array", "map"):
            self._blocks(schema, kind, indent, target, named)
        else:
            raise Unsupported(f"type {kind!r}")

    def _embedded(self, f: dict, spec: tuple[tuple[str, ...], Mapping[Any, Reader]], seen: dict[str, str],
                  indent: int, target: str) -> None:
        """A `bytes` field holding another Avro value, read in place (no copy) by the reader
        that `spec` picks from the values of earlier fields; no reader: KeyError."""
        if f["type"] != "bytes":
            raise Unsupported(f"embedded field {f['name']!r} is not bytes")
        keys, readers = spec
        try:
            key = ", ".join(seen[k] for k in keys)
        except KeyError as exc:
            raise Unsupported(f"embedded field {f['name']!r} is keyed by a later field {exc}") from None
        n = self.var("n")
        self.length(indent, n)
        self.emit(indent, f"{target}, end = {self.const(readers)}[{key}{',' if len(keys) == 1 else ''}](data, pos)")
        self.emit(indent, f"if end != pos + {n}: raise ValueError('embedded value does not fill its bytes')")
        self.emit(indent, "pos = end")

    def _name(self, schema: dict, named: dict[str, Any]) -> None:
        name = schema.get("name", "")
        ns = schema.get("namespace")
        named[name] = schema
        if ns and "." not in name:
            named[f"{ns}.{name}"] = schema

    def _union(self, branches: list, indent: int, target: str, named: dict[str, Any]) -> None:
        i = self.var("u")
        self.long(indent, i)
        for k, branch in enumerate(branches):
            self.emit(indent, f"{'if' if k == 0 else 'elif'} {i} == {k}:")
            self.value(branch, indent + 1, target, named)
        self.emit(indent, "else: raise ValueError('union branch out of range')")

    def _blocks(self, schema: dict, kind: str, indent: int, target: str, named: dict[str, Any]) -> None:
        count, size, item = self.var("k"), self.var("s"), self.var()
        self.emit(indent, f"{target} = {'[]' if kind == 'array' else '{}'}")
        self.emit(indent, "while True:")
        self.long(indent + 1, count)
        self.emit(indent + 1, f"if {count} == 0: break")
        self.emit(indent + 1, f"if {count} < 0:")
        self.emit(indent + 2, f"{count} = -{count}")
        self.long(indent + 2, size)
        self.emit(indent + 1, f"for _ in range({count}):")
        if kind == "array":
            self.value(schema["items"], indent + 2, item, named)
            self.emit(indent + 2, f"{target}.append({item})")
        else:
            key = self.var("key")
            self.value("string", indent + 2, key, named)
            self.value(schema["values"], indent + 2, item, named)
            self.emit(indent + 2, f"{target}[{key}] = {item}")


def compile_reader(
    schema: dict,
    factories: dict[str, Callable[[dict], Any]] | None = None,
    embedded: dict[str, tuple[tuple[str, ...], Mapping[Any, Reader]]] | None = None,
) -> Reader:
    """A reader for data written with the record schema `schema` (the raw JSON schema, as
    in the .avsc file).

    `factories` maps record names (as written in the schema, without namespace) to a
    callable that turns the record's dict into the value returned for it. `embedded` maps
    a `bytes` field of the top-level record to (names of earlier fields, readers): its
    bytes are read by `readers[(values of those fields)]`, and its value is what that
    reader returns. Raises Unsupported for constructs it does not compile."""
    if not isinstance(schema, dict) or schema.get("type") != "record":
        raise Unsupported("only record schemas compile")
    em = _Emitter(factories or {}, embedded or {})
    em.emit(0, "def read(data, pos):")
    em.value(schema, 1, "out", {})
    em.emit(1, "return out, pos")
    namespace: dict[str, Any] = dict(em.consts)
    exec(compile("\n".join(em.lines), f"<avro reader {schema.get('name')}>", "exec"), namespace)
    return namespace["read"]


# -- writers ----------------------------------------------------------------------------------
# The other direction, for the append's hot path: one straight-line function per record
# schema that writes a value (a dict, or a pydantic model's fields) into a bytearray, byte
# for byte what fastavro's schemaless_writer writes (tests/test_avro_compiled.py proves it
# on every event type). It trusts its input's types (a validated payload, an envelope the
# writer built); anything it cannot write raises, and the caller then asks fastavro.
Writer = Callable[[Any, bytearray], None]


def write_long(out: bytearray, n: int) -> None:
    """Append `n` as a zigzag varint."""
    if not -(1 << 63) <= n < (1 << 63):
        raise ValueError(f"{n} does not fit in a long")
    n = (n << 1) ^ (n >> 63)
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)


def write_string(out: bytearray, s: str) -> None:
    data = s.encode()
    write_long(out, len(data))
    out += data


class _WriterEmitter(_Code):
    def __init__(self) -> None:
        super().__init__({"write_long": write_long, "write_string": write_string})

    def value(self, schema: Any, indent: int, source: str, named: dict[str, Any]) -> None:
        """Emit code that writes the value of the expression `source` as `schema`."""
        if isinstance(schema, str) and schema in named:
            if schema in self._open:
                raise Unsupported(f"recursive type {schema!r}")
            schema = named[schema]
        if isinstance(schema, list):
            return self._union(schema, indent, source, named)
        kind = schema if isinstance(schema, str) else schema["type"]
        if isinstance(schema, dict) and "logicalType" in schema:
            raise Unsupported(f"logical type {schema['logicalType']}")
        if kind == "null":
            self.emit(indent, f"if {source} is not None: raise TypeError('null expected')")
        elif kind == "boolean":
            self.emit(indent, f"out.append(1 if {source} else 0)")
        elif kind in ("int", "long"):
            self.emit(indent, f"write_long(out, {source})")
        elif kind in ("float", "double"):
            fmt = self.const(struct.Struct("<f" if kind == "float" else "<d"))
            self.emit(indent, f"out += {fmt}.pack({source})")
        elif kind == "string":
            self.emit(indent, f"write_string(out, {source})")
        elif kind == "bytes":
            v = self.var()
            self.emit(indent, f"{v} = {source}")
            self.emit(indent, f"write_long(out, len({v})); out += {v}")
        elif kind == "fixed":
            self._name(schema, named)
            v = self.var()
            self.emit(indent, f"{v} = {source}")
            self.emit(indent, f"if len({v}) != {int(schema['size'])}: raise ValueError('fixed size')")
            self.emit(indent, f"out += {v}")
        elif kind == "enum":
            self._name(schema, named)
            index = self.const({s: i for i, s in enumerate(schema["symbols"])})
            self.emit(indent, f"write_long(out, {index}[{source}])")
        elif kind == "record":
            self._name(schema, named)
            names = {schema.get("name", ""), f"{schema.get('namespace')}.{schema.get('name', '')}"}
            self._open |= names
            d = self.var("d")
            self.emit(indent, f"{d} = {source}")
            self.emit(indent, f"if type({d}) is not dict: {d} = {d}.__dict__")
            for f in schema["fields"]:
                self.value(f["type"], indent, f"{d}[{f['name']!r}]", named)
            self._open -= names
        elif kind in ("array", "map"):
            items, item = self.var("a"), self.var()
            self.emit(indent, f"{items} = {source}")
            self.emit(indent, f"if {items}:")
            self.emit(indent + 1, f"write_long(out, len({items}))")
            if kind == "array":
                self.emit(indent + 1, f"for {item} in {items}:")
                self.value(schema["items"], indent + 2, item, named)
            else:
                key = self.var("key")
                self.emit(indent + 1, f"for {key}, {item} in {items}.items():")
                self.emit(indent + 2, f"write_string(out, {key})")
                self.value(schema["values"], indent + 2, item, named)
            self.emit(indent, "out.append(0)")
        else:
            raise Unsupported(f"type {kind!r}")

    def _name(self, schema: dict, named: dict[str, Any]) -> None:
        name = schema.get("name", "")
        ns = schema.get("namespace")
        named[name] = schema
        if ns and "." not in name:
            named[f"{ns}.{name}"] = schema

    def _union(self, branches: list, indent: int, source: str, named: dict[str, Any]) -> None:
        """Only an optional value ([null, T] or [T, null]): which branch a value of a wider
        union takes is fastavro's call."""
        if len(branches) != 2 or "null" not in branches:
            raise Unsupported("a union other than an optional value")
        null = branches.index("null")
        v = self.var()
        self.emit(indent, f"{v} = {source}")
        self.emit(indent, f"if {v} is None: out.append({2 * null})")  # zigzag of the branch index
        self.emit(indent, "else:")
        self.emit(indent + 1, f"out.append({2 * (1 - null)})")
        self.value(branches[1 - null], indent + 1, v, named)


def compile_writer(schema: dict) -> Writer:
    """A writer for the record schema `schema` (the raw JSON schema): `write(value, out)`
    appends the value's Avro bytes to the bytearray `out`. A record is a dict or an object
    whose `__dict__` holds its fields (a pydantic model). Raises Unsupported for constructs
    it does not compile (unions other than an optional value, recursion, logical types)."""
    if not isinstance(schema, dict) or schema.get("type") != "record":
        raise Unsupported("only record schemas compile")
    em = _WriterEmitter()
    em.emit(0, "def write(value, out):")
    em.value(schema, 1, "value", {})
    namespace: dict[str, Any] = dict(em.consts)
    exec(compile("\n".join(em.lines), f"<avro writer {schema.get('name')}>", "exec"), namespace)
    return namespace["write"]
