"""The Local Key Manager: a key service whose private keys never leave it, and the client that uses it.

    keys.lkm.service   `mediaseal lkm serve`: the aiohttp HTTPS service (own /v1 API + Genesys-compatible shim)
    keys.lkm.client    LKMClient: the `lkm` key provider (codec.Unwrapper, async batch unwrap, rewrap)
    keys.lkm.auth      clients file, HMAC-signed requests, Hawk, mutual TLS identities, the nonce cache
    keys.lkm.audit     the hash-chained audit log and its verifier (`mediaseal lkm audit-verify`)
    keys.lkm.keystore  the service's view of a keyring (the one place its private keys are opened)
    keys.lkm.errors    the fixed error set (names and HTTP statuses) shared by both ends
    keys.lkm.options   command-line options (argparse), used by agent/cli.py

Importing this package imports no web framework; the service and client modules import aiohttp.
"""

from mediaseal.keys.lkm.errors import (
    ERROR_CLASSES,
    STATUS,
    KeyServiceUnreachableError,
    LKMConfigError,
    LKMError,
    LKMUnknownKeyError,
    UnwrapFailedError,
)

__all__ = [
    "ERROR_CLASSES", "STATUS", "KeyServiceUnreachableError", "LKMConfigError", "LKMError", "LKMUnknownKeyError",
    "UnwrapFailedError",
]
