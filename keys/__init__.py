"""mediaseal keys: KEK records, the managed keyring, key protection at rest, and the signed key set.

>>> kr = Keyring.init(Path("keyring"), passphrase_from(os.environ, None))
>>> header, dek_keys = codec.new_package(metadata, [Keyring.open(Path("keyring")).recipient()])
>>> reader = codec.open_package(f, kr.unlock(passphrase))
>>> keyset = verify_keyset(kr.publish(passphrase), load_signer(Path("keyring/signer.pem").read_bytes()))
"""

from mediaseal.keys.errors import (
    BadSignatureError,
    InvalidJWKError,
    KeyringExistsError,
    KeyringFormatError,
    KeyringLockedError,
    KeyringNotFoundError,
    KeysError,
    KeySetError,
    KeySetExpiredError,
    KeySetFormatError,
    KeyStateError,
    PassphraseRequiredError,
    PassphraseSourceError,
    UnknownKeyError,
    WrongPassphraseError,
)
from mediaseal.keys.jwk import public_jwk, public_key_from_jwk, thumbprint
from mediaseal.keys.keyring import (
    MASTER_KEY,
    PASSPHRASE,
    PASSPHRASE_ENV,
    KeyRecord,
    Keyring,
    KeyringUnwrapper,
    generate_kek,
    passphrase_from,
)
from mediaseal.keys.keyset import (
    ACTIVE,
    DECRYPT_ONLY,
    FORMAT,
    PENDING,
    RETIRED,
    STATES,
    KeySet,
    KeySetKey,
    KeyState,
    build_keyset,
    load_signer,
    signer_id,
    verify_keyset,
)
from mediaseal.keys.protect import MasterKeyProtector, PassphraseProtector, Protector, key_aad

__all__ = [
    "ACTIVE", "DECRYPT_ONLY", "FORMAT", "MASTER_KEY", "PASSPHRASE", "PASSPHRASE_ENV", "PENDING", "RETIRED",
    "STATES", "BadSignatureError", "InvalidJWKError", "KeyRecord", "KeySet", "KeySetError", "KeySetExpiredError",
    "KeySetFormatError", "KeySetKey", "KeyState", "KeyStateError", "Keyring", "KeyringExistsError",
    "KeyringFormatError",
    "KeyringLockedError", "KeyringNotFoundError", "KeyringUnwrapper", "KeysError", "MasterKeyProtector",
    "PassphraseProtector", "PassphraseRequiredError", "PassphraseSourceError", "Protector", "UnknownKeyError",
    "WrongPassphraseError", "build_keyset", "generate_kek", "key_aad", "load_signer", "passphrase_from",
    "public_jwk", "public_key_from_jwk", "signer_id", "thumbprint", "verify_keyset",
]
