"""`mediaseal inspect IN [--json]`: a package's header. Holds no key, so nothing shown is authenticated."""

from __future__ import annotations

import argparse
import json

from mediaseal import codec
from mediaseal.agent.cli._common import open_in, size_of
from mediaseal.agent.cli._options import SubParsers, command, json_option


def register(sub: SubParsers) -> None:
    sp = command(sub, "inspect", cmd_inspect, "show a package's header (no keys needed; nothing is authenticated)",
                 "mediaseal inspect call.mseal", "mediaseal inspect call.mseal --json | jq .wraps")
    sp.add_argument("input", metavar="IN", help="a package file, or - for stdin")
    json_option(sp)


def cmd_inspect(args: argparse.Namespace) -> None:
    with open_in(args.input) as src:
        header = codec.read_header(src)
        size = size_of(src)
    layout = codec.Layout(header.size, header.chunk_size, size) if size is not None else None
    doc = {
        "format_version": 1,
        "metadata": header.metadata.__dict__,
        "chunk_size": header.chunk_size,
        "header_size": header.size,
        "package_size": size,
        "plaintext_size": layout.plaintext_size if layout else None,
        "chunks": layout.chunks if layout else None,
        "wraps": [{"kid": w.kid, "alg": w.alg} for w in header.wraps],
        "authenticated": False,  # inspect holds no key: nothing here has been checked
    }
    if args.json:
        print(json.dumps(doc, indent=2))
        return
    m = header.metadata
    print("mediaseal package, format version 1 (unauthenticated view: use 'verify' to check it)")
    print(f"  recording  {m.recording_id}  kind={m.kind}  type={m.content_type}")
    print(f"  original   {m.original_name or '-'}  captured {m.captured_at or '-'}  agent {m.agent_id or '-'}")
    print(f"  chunks     {doc['chunks']} x {header.chunk_size} B, "
          f"plaintext {doc['plaintext_size']} B, package {size} B")
    for w in header.wraps:
        print(f"  wrap       {w.kid}  {w.alg}")
