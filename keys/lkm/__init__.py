"""The Local Key Manager: a key service whose private keys never leave it, and the client that uses it.

    keys.lkm.service   `mediaseal lkm serve`: LKMService wires the parts below, starts and stops, deep health
    keys.lkm.config    ServiceConfig (what `lkm serve` is told) and its loading from the options
    keys.lkm.gate      what every request passes first: authentication, rate limits, role, the audit line
    keys.lkm.api       the /v1 API handlers
    keys.lkm.genesys   the Genesys Cloud-compatible shim (/key-management/v1)
    keys.lkm.client    LKMClient: the `lkm` key provider (codec.Unwrapper, async batch unwrap, rewrap)
    keys.lkm.auth      clients file, HMAC-signed requests, Hawk, mutual TLS identities, the nonce cache
    keys.lkm.audit     ChainedAuditLog, the hash-chained audit log, and its verifier (`mediaseal lkm audit-verify`)
    keys.lkm.keystore  the service's view of a keyring (the one place its private keys are opened)
    keys.lkm.errors    the fixed error set (names and HTTP statuses) shared by both ends
    keys.lkm.options   command-line options (argparse), used by agent/cli.py

Importing this package imports no web framework; the service, gate, api, genesys and client modules
import aiohttp.
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
