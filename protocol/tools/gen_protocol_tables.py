#!/usr/bin/env python3
"""Generates the tables of protocol/PROTOCOL.md from the Rust sources, so they cannot drift.

Reads src/messages.rs (the `wire_struct!` block, the `apis!` table, `Acks`, `OffsetSpec`) and
src/error.rs (`ErrorCode`, `is_retriable`, `name`) and rewrites every region of PROTOCOL.md
between `<!-- generated:begin NAME -->` and `<!-- generated:end NAME -->`. Everything outside
those regions is written by hand.

    python3 protocol/tools/gen_protocol_tables.py          # rewrite PROTOCOL.md
    python3 protocol/tools/gen_protocol_tables.py --check  # exit 1 if PROTOCOL.md is stale

Standard library only. The parser knows exactly the shapes the sources use and fails loudly on
anything else, rather than guessing.
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

PROTOCOL_DIR = Path(__file__).resolve().parent.parent
MESSAGES_RS = PROTOCOL_DIR / "src" / "messages.rs"
ERROR_RS = PROTOCOL_DIR / "src" / "error.rs"
PROTOCOL_MD = PROTOCOL_DIR / "PROTOCOL.md"

# Meanings of error codes that have no doc comment in error.rs. A doc comment on the variant
# takes precedence; a new code with neither fails the generator, so it cannot go undocumented.
ERROR_MEANINGS = {
    "None": "Success. The body is the API's response.",
    "MalformedFrame": "The request frame or body did not decode: truncated, invalid UTF-8, "
    "an invalid bool/option/enum tag, trailing bytes, or a frame shorter than its header.",
    "FrameTooLarge": "The frame's length prefix exceeds the receiver's frame limit.",
    "UnsupportedApi": "The broker does not know this API key.",
    "UnsupportedVersion": "The broker does not support this version of the API.",
    "UnknownTopic": "No topic has this name (it may be being created: refresh metadata and retry).",
    "UnknownPartition": "The topic has no partition with this number.",
    "TopicAlreadyExists": "A topic with this name exists already.",
    "InvalidTopicName": "The topic name is not allowed.",
    "InvalidPartitions": "The partition count (or replication factor) is out of range.",
    "InvalidConfig": "A configuration key is unknown or its value is invalid.",
    "CorruptBatch": "A record batch failed validation: header, length, CRC or record layout.",
    "RecordTooLarge": "A batch (or a record) exceeds the broker's size limit.",
    "OffsetOutOfRange": "The offset is outside the partition's log (before its start or past its end).",
    "NotLeader": "This broker does not lead the partition: refresh metadata and send to the leader.",
    "Timeout": "The request did not complete within its time limit (e.g. `acks=all` replication).",
    "DuplicateSequence": "An idempotent producer's batch was already appended (a retry): "
    "the data is in the log once.",
    "OutOfOrderSequence": "An idempotent producer's base sequence is not the next one expected "
    "for the partition.",
    "InvalidProducerEpoch": "The producer epoch is older than the current one for this producer id "
    "(the producer was fenced).",
    "UnknownProducer": "The broker has no state for this producer id.",
    "UnknownMember": "The consumer-group coordinator does not know this member id: rejoin.",
    "StaleMemberEpoch": "The member epoch is not the coordinator's current one for this member.",
    "InvalidGroupId": "The group id is empty or not allowed.",
    "UnknownFilter": "No Wasm filter has this name.",
    "InvalidFilter": "The uploaded Wasm module failed validation.",
    "FilterRejected": "A produce-path Wasm filter rejected the batch; the message says why.",
    "FilterFailed": "A Wasm filter trapped, timed out, exceeded its memory or returned a malformed output; the message names the module, its version and the reason.",
    "FilterInUse": "The Wasm filter is attached to a topic, subscription or transform; delete it with force.",
    "Unauthorized": "The client may not perform this operation.",
    "ShuttingDown": "The broker is shutting down.",
    "InvalidRequest": "The request decoded but its contents are invalid (out-of-range or "
    "inconsistent fields).",
    "UnsupportedCompression": "The batch uses a compression codec the broker does not support "
    "(Ketch supports none yet).",
    "GroupNotFound": "No consumer group has this id.",
}

FIXED_SIZES = {
    "u8": 1, "i8": 1, "bool": 1, "u16": 2, "i16": 2, "u32": 4, "i32": 4, "u64": 8, "i64": 8,
    "ErrorCode": 2, "Acks": 1,
}
WIRE_NAMES = {
    "String": "string",
    "Bytes": "bytes",
    "ErrorCode": "[error_code](#6-error-codes) (u16)",
    "Acks": "[acks](#acks) (i8)",
    "OffsetSpec": "[offset_spec](#offsetspec)",
}


class SourceError(Exception):
    pass


@dataclass
class Field:
    name: str
    ty: str
    doc: str
    since: int = 0


@dataclass
class Struct:
    name: str
    doc: str
    fields: list[Field] = field(default_factory=list)


@dataclass
class Api:
    key: int
    name: str
    min_version: int
    max_version: int
    request: str
    response: str


@dataclass
class Code:
    number: int
    variant: str
    doc: str
    name: str = ""
    retriable: bool = False


def block_after(text: str, opener: str) -> str:
    """The text inside the braces that follow the last occurrence of `opener`."""
    start = text.rfind(opener)
    if start < 0:
        raise SourceError(f"{opener!r} not found")
    brace = text.index("{", start + len(opener) - 1)
    depth = 0
    for i in range(brace, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[brace + 1 : i]
    raise SourceError(f"unbalanced braces after {opener!r}")


def doc_text(lines: list[str]) -> str:
    # Doc text lands in Markdown table cells, where a bare `|` would end the cell.
    return " ".join(line.strip() for line in lines if line.strip()).replace("|", "\\|")


def parse_structs(messages: str) -> dict[str, Struct]:
    body = block_after(messages, "\nwire_struct! {")
    structs: dict[str, Struct] = {}
    pending: list[str] = []
    current: Struct | None = None
    for raw in body.splitlines():
        line = raw.strip()
        if not line or (line.startswith("//") and not line.startswith("///")):
            continue
        if line.startswith("///"):
            pending.append(line[3:])
            continue
        if current is None:
            m = re.fullmatch(r"pub struct (\w+) \{(\})?", line)
            if not m:
                raise SourceError(f"unexpected line in wire_struct!: {line!r}")
            current = Struct(m.group(1), doc_text(pending))
            pending = []
            structs[current.name] = current
            if m.group(2):
                current = None
            continue
        if line == "}":
            current = None
            continue
        m = re.fullmatch(r"pub (\w+): ([\w<>]+)(?: => since (\d+))?,", line)
        if not m:
            raise SourceError(f"unexpected field line in {current.name}: {line!r}")
        since = int(m.group(3)) if m.group(3) else 0
        current.fields.append(Field(m.group(1), m.group(2), doc_text(pending), since))
        pending = []
    return structs


def parse_apis(messages: str) -> list[Api]:
    table = block_after(messages, "\napis! {")
    apis = []
    for line in table.strip().splitlines():
        m = re.fullmatch(r"\s*(\d+) (\w+) \[(\d+) \.\.= (\d+)\] => (\w+), (\w+);\s*", line)
        if not m:
            raise SourceError(f"unexpected line in apis!: {line!r}")
        low, high = int(m.group(3)), int(m.group(4))
        if low > high:
            raise SourceError(f"API {m.group(2)}: versions {low}..={high} are empty")
        apis.append(Api(int(m.group(1)), m.group(2), low, high, m.group(5), m.group(6)))
    return apis


def parse_enum_variants(source: str, enum: str) -> list[tuple[str, str | None, str]]:
    """(variant, discriminant or None, doc) for a fieldless-or-tuple enum."""
    body = block_after(source, f"pub enum {enum} {{")
    variants = []
    pending: list[str] = []
    for raw in body.splitlines():
        line = raw.strip()
        if not line:
            continue
        if line.startswith("///"):
            pending.append(line[3:])
            continue
        if line.startswith("#["):
            continue
        m = re.fullmatch(r"(\w+)(?:\((\w+)\))?(?: = (-?\d+))?,", line)
        if not m:
            raise SourceError(f"unexpected line in enum {enum}: {line!r}")
        variants.append((m.group(1), m.group(3) if m.group(3) is not None else m.group(2),
                         doc_text(pending)))
        pending = []
    return variants


def parse_offset_spec(messages: str) -> list[tuple[int, str, str, str]]:
    """(tag, variant, payload type or '', doc) from `OffsetSpec`'s decoder and definition."""
    docs = {v: (payload or "", doc) for v, payload, doc in parse_enum_variants(messages, "OffsetSpec")}
    decode = block_after(messages, "impl Wire for OffsetSpec {")
    tags = re.findall(r"(\d+) => Ok\(OffsetSpec::(\w+)", decode)
    if sorted(v for _, v in tags) != sorted(docs):
        raise SourceError("OffsetSpec decoder and definition disagree")
    return [(int(tag), v, docs[v][0], docs[v][1]) for tag, v in tags]


def parse_error_codes(error: str) -> list[Code]:
    codes = [Code(int(n), v, d) for v, n, d in parse_enum_variants(error, "ErrorCode")]
    retriable = block_after(error, "pub fn is_retriable(self) -> bool {")
    retriable_set = set(re.findall(r"ErrorCode::(\w+)", retriable))
    names = dict(re.findall(r'ErrorCode::(\w+) => "(\w+)"', block_after(error, "pub fn name(self)")))
    for code in codes:
        if code.variant not in names:
            raise SourceError(f"ErrorCode::{code.variant} has no name()")
        code.name = names[code.variant]
        code.retriable = code.variant in retriable_set
        if not code.doc:
            if code.variant not in ERROR_MEANINGS:
                raise SourceError(
                    f"ErrorCode::{code.variant} has no doc comment and no entry in ERROR_MEANINGS"
                )
            code.doc = ERROR_MEANINGS[code.variant]
    # Numbers are allotted in ranges (one per line of work), so gaps are allowed; order and
    # uniqueness are not negotiable.
    numbers = [c.number for c in codes]
    if not numbers or numbers[0] != 0 or numbers != sorted(set(numbers)):
        raise SourceError("error codes must start at 0 and increase")
    return codes


def anchor(name: str) -> str:
    return "#" + name.lower()


def wire_type(ty: str, structs: dict[str, Struct]) -> str:
    m = re.fullmatch(r"(Option|Vec)<(.+)>", ty)
    if m:
        inner = wire_type(m.group(2), structs)
        return ("option of " if m.group(1) == "Option" else "array of ") + inner
    if ty in WIRE_NAMES:
        return WIRE_NAMES[ty]
    if ty in FIXED_SIZES:
        return ty
    if ty in structs:
        return f"[{ty}]({anchor(ty)})"
    raise SourceError(f"no wire name for type {ty!r}")


def size_of(ty: str) -> str:
    return str(FIXED_SIZES[ty]) if ty in FIXED_SIZES else "var"


def nested_structs(ty: str, structs: dict[str, Struct]) -> list[str]:
    m = re.fullmatch(r"(?:Option|Vec)<(.+)>", ty)
    if m:
        return nested_structs(m.group(1), structs)
    return [ty] if ty in structs else []


def render_struct(struct: Struct, structs: dict[str, Struct]) -> list[str]:
    out = [f"#### {struct.name}", ""]
    if struct.doc:
        out += [struct.doc, ""]
    if not struct.fields:
        out += ["Empty: no bytes.", ""]
        return out
    out += ["| # | field | type | bytes | notes |", "|---|---|---|---|---|"]
    for i, f in enumerate(struct.fields, 1):
        since = f"**Version {f.since} and later only.** " if f.since else ""
        out.append(
            f"| {i} | `{f.name}` | {wire_type(f.ty, structs)} | {size_of(f.ty)} | {since}{f.doc} |"
        )
    out.append("")
    return out


def generate(messages: str, error: str) -> dict[str, str]:
    structs = parse_structs(messages)
    apis = parse_apis(messages)
    for api in apis:
        for name in (api.request, api.response):
            if name not in structs:
                raise SourceError(f"API {api.name} names {name}, which wire_struct! does not define")

    sections: dict[str, str] = {}

    lines = ["| key | API | versions | request | response |", "|---|---|---|---|---|"]
    for api in apis:
        versions = (
            str(api.min_version)
            if api.min_version == api.max_version
            else f"{api.min_version}–{api.max_version}"
        )
        lines.append(
            f"| {api.key} | {api.name} | {versions} | [{api.request}]({anchor(api.request)}) "
            f"| [{api.response}]({anchor(api.response)}) |"
        )
    sections["api-keys"] = "\n".join(lines)

    rendered: set[str] = set()
    lines = []

    def render_tree(name: str) -> None:
        if name in rendered:
            return
        rendered.add(name)
        struct = structs[name]
        lines.extend(render_struct(struct, structs))
        for f in struct.fields:
            for child in nested_structs(f.ty, structs):
                render_tree(child)

    for api in apis:
        lines += [f"### {api.key} {api.name}", ""]
        for role, name in (("Request", api.request), ("Response", api.response)):
            if name in rendered:
                lines += [f"{role}: [{name}]({anchor(name)}), defined above.", ""]
        for name in (api.request, api.response):
            render_tree(name)
    leftovers = [name for name in structs if name not in rendered]
    if leftovers:
        raise SourceError(f"structs reachable from no API: {leftovers}")
    sections["messages"] = "\n".join(lines).rstrip()

    lines = ["| value (i8) | variant | meaning |", "|---|---|---|"]
    for variant, value, doc in parse_enum_variants(messages, "Acks"):
        lines.append(f"| {value} | `{variant}` | {doc} |")
    sections["acks"] = "\n".join(lines)

    lines = ["| tag (u8) | variant | followed by | meaning |", "|---|---|---|---|"]
    for tag, variant, payload, doc in parse_offset_spec(messages):
        lines.append(f"| {tag} | `{variant}` | {payload or 'nothing'} | {doc} |")
    sections["offset-spec"] = "\n".join(lines)

    lines = ["| code | name | variant | retriable | meaning |", "|---|---|---|---|---|"]
    for code in parse_error_codes(error):
        retriable = "yes" if code.retriable else "no"
        lines.append(f"| {code.number} | `{code.name}` | `{code.variant}` | {retriable} | {code.doc} |")
    sections["error-codes"] = "\n".join(lines)
    return sections


def apply(document: str, sections: dict[str, str]) -> str:
    for name, content in sections.items():
        pattern = re.compile(
            rf"(<!-- generated:begin {re.escape(name)} -->\n).*?(\n<!-- generated:end {re.escape(name)} -->)",
            re.DOTALL,
        )
        document, count = pattern.subn(lambda m: m.group(1) + content + m.group(2), document)
        if count != 1:
            raise SourceError(f"PROTOCOL.md needs exactly one generated region {name!r}, has {count}")
    return document


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if PROTOCOL.md is stale")
    args = parser.parse_args()
    try:
        sections = generate(MESSAGES_RS.read_text(), ERROR_RS.read_text())
        current = PROTOCOL_MD.read_text()
        updated = apply(current, sections)
    except SourceError as e:
        print(f"gen_protocol_tables: {e}", file=sys.stderr)
        return 2
    if args.check:
        if current != updated:
            sys.stdout.writelines(
                difflib.unified_diff(
                    current.splitlines(keepends=True),
                    updated.splitlines(keepends=True),
                    "PROTOCOL.md",
                    "PROTOCOL.md (regenerated)",
                )
            )
            print("PROTOCOL.md is stale: run python3 protocol/tools/gen_protocol_tables.py",
                  file=sys.stderr)
            return 1
        return 0
    if current != updated:
        PROTOCOL_MD.write_text(updated)
    return 0


if __name__ == "__main__":
    sys.exit(main())
