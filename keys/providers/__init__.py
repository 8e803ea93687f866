"""KEK providers: something that wraps and unwraps DEKs without showing its key.

- `local`: a 32-byte key file (development, single host).
- `env`: a base64 key in an environment variable (containers with injected secrets).
- `pkcs11`: an AES key inside an HSM token (SoftHSM2 in tests); it never leaves the token.
- `aws_kms`: a symmetric AWS KMS key; wrap/unwrap are KMS Encrypt/Decrypt calls.
"""

from keys.providers.base import KekProvider, UnwrapError

__all__ = ["KekProvider", "UnwrapError"]
