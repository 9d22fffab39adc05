#!/usr/bin/env python3
"""Writes docs/reference/protocol.md from proto/fedpref/v1/*.proto and their doc comments.

    python3 doc-check/protocol.py > docs/reference/protocol.md

Every service, method, message, field, enum and value of fedpref.v1 has a doc comment
(proto/tests/invariant.rs checks that); this lays them out as tables, one section per file.
"""

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FILES = ["device", "secagg", "admin", "common", "manifest", "ledger"]
WHAT = {
    "device": "DeviceService: what devices call",
    "secagg": "SecureAggregationService: the stages of a distributed round",
    "admin": "AdminService: what operators call",
    "common": "shared messages: tensors, model versions",
    "manifest": "the run manifest as a message",
    "ledger": "ledger entries and verification",
}

RPC = re.compile(r"rpc\s+(\w+)\s*\(\s*(stream\s+)?([\w.]+)\s*\)\s*returns\s*\(\s*(stream\s+)?([\w.]+)\s*\)")
FIELD = re.compile(r"^(repeated\s+|optional\s+)?(map<[^>]+>|[\w.]+)\s+(\w+)\s*=\s*(\d+)")
ENUM_VALUE = re.compile(r"^(\w+)\s*=\s*(-?\d+)")


def escape(text: str) -> str:
    """Markdown-safe table cell: `<` outside code spans escaped, `|` escaped."""
    out, code = [], False
    for ch in text:
        if ch == "`":
            code = not code
        if ch == "<" and not code:
            out.append("&lt;")
        elif ch == "|":
            out.append("\\|")
        else:
            out.append(ch)
    return "".join(out)


def anchor(name: str) -> str:
    return re.sub(r"[^a-z0-9_ -]", "", name.lower()).replace(" ", "-")


def parse(path: Path):
    """Returns (header comment, [items]) where items are dicts in file order."""
    header, items, stack, comment = [], [], [], []
    seen_syntax = False
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line.startswith("//"):
            comment.append(line[2:].strip())
            continue
        if not line:
            if not seen_syntax and comment:
                header.extend(comment + [""])
            comment = []
            continue
        if line.startswith("syntax"):
            seen_syntax = True
            if comment:
                header.extend(comment)
            comment = []
            continue
        if line.startswith(("package", "import", "option")):
            comment = []
            continue
        doc = " ".join(c for c in comment if c)
        comment = []
        m = re.match(r"(message|enum|service|oneof)\s+(\w+)\s*\{", line)
        if m:
            kind, name = m.groups()
            if kind == "oneof":
                stack.append(("oneof", name, None))
                continue
            qualified = ".".join([s[1] for s in stack if s[0] == "message"] + [name])
            item = {"kind": kind, "name": qualified, "doc": doc, "rows": []}
            items.append(item)
            stack.append((kind, name, item))
            continue
        if line.startswith("}"):
            stack.pop()
            continue
        if line.startswith("reserved"):
            continue
        owner = next((s[2] for s in reversed(stack) if s[2] is not None), None)
        oneof = stack[-1][1] if stack and stack[-1][0] == "oneof" else None
        m = RPC.search(line)
        if m and owner:
            name, s_in, req, s_out, resp = m.groups()
            owner["rows"].append(("rpc", name, (bool(s_in), req, bool(s_out), resp), doc))
            continue
        if owner and owner["kind"] == "enum":
            m = ENUM_VALUE.match(line)
            if m:
                owner["rows"].append(("value", m.group(1), m.group(2), doc))
            continue
        m = FIELD.match(line)
        if m and owner:
            label, typ, name, number = m.groups()
            typ = (label or "").strip() + (" " if label else "") + typ
            owner["rows"].append(("field", name, (typ, number, oneof), doc))
    return "\n".join(header).strip(), items


def main() -> None:
    parsed = {f: parse(ROOT / "proto" / "fedpref" / "v1" / f"{f}.proto") for f in FILES}
    known = {item["name"] for _, items in parsed.values() for item in items}

    def type_link(typ: str) -> str:
        words = typ.split()
        base = words[-1]
        short = base.removeprefix("fedpref.v1.")
        if short in known:
            words[-1] = f"[`{short}`](#{anchor(short)})"
            return " ".join(words[:-1] + [words[-1]])
        return "`" + typ + "`"

    out = [
        "# The protocol: `fedpref.v1`\n",
        "The gRPC protocol between devices, operators and the coordinator, from the `.proto` files in",
        "[`proto/fedpref/v1/`](../../proto/fedpref/v1/), which are the contract: fields are added,",
        "never renumbered or repurposed. This page is generated from their doc comments; after",
        "changing a `.proto` file, regenerate it:\n",
        "```sh\npython3 doc-check/protocol.py > docs/reference/protocol.md\n```\n",
        "Both coordinator ports serve `grpc.health.v1.Health` and server reflection, so stock tools",
        "(grpcurl, grpcio) need no `.proto` files; how devices authenticate and which status codes",
        "mean what is in [Operators](../operators.md#what-the-services-do).\n",
    ]
    for f in FILES:
        out.append(f"- [`{f}.proto`](#{anchor(f + '.proto')}): {WHAT[f]}")
    out.append("")
    for f in FILES:
        header, items = parsed[f]
        out.append(f"## {f}.proto\n")
        if header:
            out.append("```text\n" + header + "\n```\n")
        for item in items:
            out.append(f"### `{item['name']}`\n")
            out.append(f"{item['kind'].capitalize()}. {escape(item['doc'])}\n")
            rows = item["rows"]
            if item["kind"] == "service":
                out.append("| method | request | response | |\n|---|---|---|---|")
                for _, name, (s_in, req, s_out, resp), doc in rows:
                    req_s = ("stream " if s_in else "") + type_link(req)
                    resp_s = ("stream " if s_out else "") + type_link(resp)
                    out.append(f"| `{name}` | {req_s} | {resp_s} | {escape(doc)} |")
            elif item["kind"] == "enum":
                out.append("| value | number | meaning |\n|---|---|---|")
                for _, name, number, doc in rows:
                    out.append(f"| `{name}` | {number} | {escape(doc)} |")
            elif rows:
                out.append("| field | type | number | meaning |\n|---|---|---|---|")
                for _, name, (typ, number, oneof), doc in rows:
                    note = f" (one of `{oneof}`)" if oneof else ""
                    out.append(f"| `{name}`{note} | {type_link(typ)} | {number} | {escape(doc)} |")
            else:
                out.append("(no fields)")
            out.append("")
    sys.stdout.write("\n".join(out))


if __name__ == "__main__":
    main()
