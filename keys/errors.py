"""The keys package's named errors. Messages are one line and never carry a secret.

>>> try:
...     keyring.unlock(b"not it")
... except WrongPassphraseError as e:
...     print(e)            # "wrong passphrase for keyring /var/lib/mediaseal/keyring"
"""

from __future__ import annotations


class KeysError(Exception):
    """Base class: a key, keyring or key set operation failed."""


class InvalidJWKError(KeysError):
    """A JWK is not a well-formed RSA public key (bad kty, bad base64url, non-minimal integers)."""


class KeyringLockedError(KeysError):
    """The private side of the keyring could not be opened with the secret given."""


class WrongPassphraseError(KeyringLockedError):
    """The passphrase does not open the keyring's protected keys (or they were altered)."""


class PassphraseRequiredError(KeyringLockedError):
    """The keyring is passphrase-protected and no passphrase was given."""


class PassphraseSourceError(KeysError):
    """A passphrase file could not be read, or it is empty."""


class KeyringFormatError(KeysError):
    """A keyring file (keyring.json, a PEM, a protected-key envelope) is malformed or inconsistent."""


class KeyringExistsError(KeysError):
    """`init` was pointed at a directory that is not empty."""


class KeyringNotFoundError(KeysError):
    """There is no keyring at the path (no keyring.json)."""


class UnknownKeyError(KeysError):
    """No key with that kid in the keyring."""


class KeyStateError(KeysError):
    """A key state change that the rules forbid (a retired key back, the current key demoted, ...)."""


class KeySetError(KeysError):
    """Base class: a published key set was rejected."""


class BadSignatureError(KeySetError):
    """The key set is not signed by the pinned signer (or was altered after signing)."""


class KeySetFormatError(KeySetError):
    """The key set is signed but violates the format or its rules (current key, kids, algorithms)."""


class KeySetExpiredError(KeySetError):
    """The key set's expires_at (plus any allowed staleness) is in the past."""
