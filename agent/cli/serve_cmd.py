"""`mediaseal serve --repository URL --listen HOST:PORT`: authenticated, audited playback over HTTP(S) with Range.

Former spellings still work, each with a deprecation line on stderr: the repository as a positional
(`serve URL`) and `--host H --port P` (now `--listen H:P`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mediaseal.agent.cli import argtypes
from mediaseal.agent.cli._common import async_unwrapper
from mediaseal.agent.cli._options import (
    Deprecated,
    SubParsers,
    command,
    listen_option,
    repository_options,
    unwrap_options,
)

DEFAULT_LISTEN = "127.0.0.1:8750"  # export.serve.DEFAULT_PORT (not imported here: it loads aiohttp)


def register(sub: SubParsers) -> None:
    sp = command(sub, "serve", cmd_serve,
                 "serve decrypted recordings over HTTP(S) with Range seeking (authenticated, audited)",
                 "mediaseal serve --repository file:///srv/recordings --audit-log audit.jsonl --tokens tokens"
                 " --keyring /var/lib/mediaseal/keyring",
                 "mediaseal serve --repository s3://recordings/site-a --listen 0.0.0.0:8750 --tls-cert tls.crt"
                 " --tls-key tls.key --client-ca ca.pem --audit-log audit.jsonl --lkm https://lkm:8443")
    repository_options(sp, legacy_positional=True)
    listen_option(sp, DEFAULT_LISTEN)
    sp.add_argument("--host", dest="legacy_host", action=Deprecated, replacement="--listen HOST:PORT")
    sp.add_argument("--port", dest="legacy_port", type=argtypes.port, action=Deprecated,
                    replacement="--listen HOST:PORT")
    g = sp.add_argument_group("access")
    g.add_argument("--audit-log", required=True, type=Path, metavar="FILE",
                   help="one JSON line per request is appended here (created 0600)")
    g.add_argument("--tokens", type=Path, metavar="FILE",
                   help="bearer tokens, one per line (name:token or token), file mode 0600")
    g.add_argument("--tls-cert", type=Path, metavar="FILE", help="server certificate chain (PEM)")
    g.add_argument("--tls-key", type=Path, metavar="FILE", help="server private key (PEM)")
    g.add_argument("--client-ca", type=Path, metavar="FILE", help="require client certificates from this CA (mTLS)")
    unwrap_options(sp)


def cmd_serve(args: argparse.Namespace) -> None:
    import asyncio

    from mediaseal.export.serve import ServeOptions, check_options, run_server

    host, port = args.listen
    host = args.legacy_host if args.legacy_host is not None else host
    port = args.legacy_port if args.legacy_port is not None else port
    options = ServeOptions(
        repository=args.repository, audit_log=args.audit_log, host=host, port=port,
        tokens_file=args.tokens, tls_cert=args.tls_cert, tls_key=args.tls_key, client_ca=args.client_ca,
        s3={"endpoint_url": args.endpoint_url} if args.endpoint_url else {},
    )
    check_options(options)  # before any key is unlocked

    async def serve() -> None:
        async with async_unwrapper(args) as unwrapper:
            await run_server(options, unwrapper)

    asyncio.run(serve())
