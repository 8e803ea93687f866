"""`aws_kms` KEK provider: DEKs wrapped by an AWS KMS key (symmetric, ENCRYPT_DECRYPT).

The KEK never leaves KMS: `wrap` is a KMS `Encrypt` of the 32-byte DEK and `unwrap` a
`Decrypt`, both with an *encryption context* that carries the keyring entry's associated
data, so KMS itself refuses a wrapped DEK moved to another entry, and CloudTrail records
which entry was opened. Unwrapping happens once per key per keyring load (start and
SIGHUP), never per value.

Credentials and region come from boto3's standard chain (environment, shared config,
instance or task role); `endpoint_url` points at a VPC endpoint or a test double. boto3 is
an optional dependency (`pip install 'strongroom[aws]'`), imported only by this provider.
"""

from __future__ import annotations

import base64
from typing import Any

from keys.providers.base import KekProvider, ProviderError, UnwrapError

_CONTEXT_KEY = "strongroom-dek"
# Decrypt refusals that mean "this blob does not open here": wrong key, wrong entry
# (encryption context), tampered blob; AccessDenied also covers a blob naming a key this
# principal cannot use. Anything else (throttling, network) is an AwsKmsError.
_REFUSED = frozenset({"InvalidCiphertextException", "IncorrectKeyException",
                      "AccessDeniedException"})


class AwsKmsError(ProviderError):
    """The KMS key cannot be used (no boto3, no credentials, unknown or disabled key)."""


def _context(associated_data: bytes) -> dict[str, str]:
    return {_CONTEXT_KEY: base64.b64encode(associated_data).decode()}


class AwsKmsKekProvider(KekProvider):
    kind = "aws_kms"

    def __init__(self, key_id: str, region: str | None = None,
                 endpoint_url: str | None = None, client: Any = None) -> None:
        if client is None:
            try:
                import boto3
            except ImportError:
                raise AwsKmsError("the aws_kms provider needs boto3: "
                                  "pip install 'strongroom[aws]'") from None
            client = boto3.client("kms", region_name=region, endpoint_url=endpoint_url)
        self._kms = client
        try:
            meta = client.describe_key(KeyId=key_id)["KeyMetadata"]
        except Exception as exc:  # botocore's errors: name the key, not the credentials
            raise AwsKmsError(f"KMS key {key_id}: {_reason(exc)}") from None
        usage = meta.get("KeyUsage") or "ENCRYPT_DECRYPT"  # (KMS's default when created)
        spec = meta.get("KeySpec") or "SYMMETRIC_DEFAULT"
        if usage != "ENCRYPT_DECRYPT" or spec != "SYMMETRIC_DEFAULT":
            raise AwsKmsError(f"KMS key {key_id} must be a symmetric ENCRYPT_DECRYPT key")
        if meta.get("KeyState") not in (None, "Enabled"):
            raise AwsKmsError(f"KMS key {key_id} is {meta.get('KeyState')}")
        # The ARN, not an alias: the keyring records which key wrapped it, and an alias can
        # be repointed to another key.
        self._arn = str(meta["Arn"])

    @property
    def key_id(self) -> str:
        return f"aws-kms:{self._arn}"

    @property
    def description(self) -> str:
        return f"aws_kms KEK {self.key_id}"

    def _wrap(self, dek: bytes, associated_data: bytes) -> bytes:
        try:
            out = self._kms.encrypt(KeyId=self._arn, Plaintext=dek,
                                    EncryptionContext=_context(associated_data))
        except Exception as exc:
            raise AwsKmsError(
                f"KMS Encrypt with {self._arn}: {_reason(exc, text=False)}"
            ) from None
        return bytes(out["CiphertextBlob"])

    def _unwrap(self, blob: bytes, associated_data: bytes) -> bytes:
        try:
            out = self._kms.decrypt(KeyId=self._arn, CiphertextBlob=blob,
                                    EncryptionContext=_context(associated_data))
        except Exception as exc:
            if _code(exc) in _REFUSED:
                raise UnwrapError(f"KMS refused: {_code(exc)}") from None
            raise AwsKmsError(
                f"KMS Decrypt with {self._arn}: {_reason(exc, text=False)}"
            ) from None
        return bytes(out["Plaintext"])


def _error(exc: Exception) -> dict[str, Any]:
    response = getattr(exc, "response", None)
    return response.get("Error", {}) if isinstance(response, dict) else {}


def _code(exc: Exception) -> str:
    return str(_error(exc).get("Code", ""))


def _reason(exc: Exception, text: bool = True) -> str:
    """botocore ClientError code and message (never request parameters); for anything
    else (no credentials, endpoint unreachable) the exception's own text, except around
    Encrypt/Decrypt (`text=False`): a parameter validation error would quote the DEK."""
    err = _error(exc)
    if err:
        return f"{err.get('Code', 'error')}: {err.get('Message', '')}".rstrip(": ")
    return f"{type(exc).__name__}: {exc}" if text else type(exc).__name__
