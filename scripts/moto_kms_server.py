#!/usr/bin/env python3
"""moto's AWS KMS server on loopback, with `MessageType=DIGEST` implemented as AWS does.

Usage: .tools/venv/bin/python scripts/moto_kms_server.py --port PORT [--host 127.0.0.1]
       [--unpatched]   (moto as released; only to show that the correction matters)

Used by the KMS signer's tests and benches (signers/tests/support/moto.rs,
benches/benches/sign_kms.rs); scripts/setup.d/30-moto.sh installs moto into .tools/venv.

Why the patch: moto 5.2.5 reads `MessageType` in `Sign` and `Verify` but never passes it on,
so the key always signs with `ec.ECDSA(SHA256())`, i.e. it hashes the 32-byte digest a second
time (upstream moto pull request 10202 is still open). Real AWS KMS, given
`MessageType=DIGEST`, signs the message as the prehash itself. A signer that passes its tests
against unpatched moto would therefore be wrong against real AWS (the signature would not
recover to the key's address for the transaction hash), and a signer that is right for AWS
fails against unpatched moto.

What the patch does, and nothing else:
- `KmsResponse.sign` / `KmsResponse.verify` (moto/kms/responses.py) are wrapped so that the
  request's `MessageType` is recorded in a thread-local for the duration of the call (moto's
  server handles each request on its own thread).
- `ECDSAPrivateKey.sign` / `.verify` and `RSAPrivateKey.sign` / `.verify` (moto/kms/utils.py,
  called by `KmsBackend.sign` / `.verify` after its own key and algorithm checks) use the
  message as the prehash when that `MessageType` is `DIGEST`: `ec.ECDSA(Prehashed(SHA256()))`
  from `cryptography` (a dependency of moto), after checking that the digest has the length
  of the algorithm's hash, as AWS does (`ValidationException` otherwise).
- `RAW` (and a missing `MessageType`) behave exactly as before.
"""

import argparse
import sys
import threading

import moto
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from moto.kms import responses as kms_responses
from moto.kms import utils as kms_utils
from moto.kms.exceptions import ValidationException

EXPECTED_MOTO = "5.2.5"

_request = threading.local()


def _is_digest() -> bool:
    return getattr(_request, "message_type", None) == "DIGEST"


def _with_message_type(original):
    def wrapper(self, *args, **kwargs):
        _request.message_type = self._get_param("MessageType")
        try:
            return original(self, *args, **kwargs)
        finally:
            _request.message_type = None

    wrapper.__name__ = original.__name__
    wrapper.__doc__ = original.__doc__
    return wrapper


def _check_digest(message: bytes, hash_algorithm, signing_algorithm: str) -> None:
    if len(message) != hash_algorithm.digest_size:
        raise ValidationException(
            f"Digest is invalid length for algorithm {signing_algorithm}."
        )


def _ecdsa_hash(key, signing_algorithm: str):
    # Name-mangled private helper of ECDSAPrivateKey (SHA-256/384/512 by algorithm).
    return key._ECDSAPrivateKey__hash_algorithm(signing_algorithm)


def _patch_ecdsa() -> None:
    cls = kms_utils.ECDSAPrivateKey
    original_sign, original_verify = cls.sign, cls.verify

    def sign(self, message: bytes, signing_algorithm: str) -> bytes:
        if not _is_digest():
            return original_sign(self, message, signing_algorithm)
        kms_utils.validate_signing_algorithm(
            signing_algorithm, self.valid_signing_algorithms
        )
        hash_algorithm = _ecdsa_hash(self, signing_algorithm)
        _check_digest(message, hash_algorithm, signing_algorithm)
        return self.private_key.sign(message, ec.ECDSA(Prehashed(hash_algorithm)))

    def verify(self, message: bytes, signature: bytes, signing_algorithm: str) -> bool:
        if not _is_digest():
            return original_verify(self, message, signature, signing_algorithm)
        kms_utils.validate_signing_algorithm(
            signing_algorithm, self.valid_signing_algorithms
        )
        hash_algorithm = _ecdsa_hash(self, signing_algorithm)
        _check_digest(message, hash_algorithm, signing_algorithm)
        try:
            self.private_key.public_key().verify(
                signature, message, ec.ECDSA(Prehashed(hash_algorithm))
            )
            return True
        except InvalidSignature:
            return False

    cls.sign, cls.verify = sign, verify


def _patch_rsa() -> None:
    cls = kms_utils.RSAPrivateKey
    original_sign, original_verify = cls.sign, cls.verify

    def sign(self, message: bytes, signing_algorithm: str) -> bytes:
        if not _is_digest():
            return original_sign(self, message, signing_algorithm)
        kms_utils.validate_signing_algorithm(
            signing_algorithm, kms_utils.SigningAlgorithm.rsa_signing_algorithms()
        )
        pad, hash_algorithm = self._RSAPrivateKey__padding_and_hash_algorithm(
            signing_algorithm
        )
        _check_digest(message, hash_algorithm, signing_algorithm)
        return self.private_key.sign(message, pad, Prehashed(hash_algorithm))

    def verify(self, message: bytes, signature: bytes, signing_algorithm: str) -> bool:
        if not _is_digest():
            return original_verify(self, message, signature, signing_algorithm)
        kms_utils.validate_signing_algorithm(
            signing_algorithm, kms_utils.SigningAlgorithm.rsa_signing_algorithms()
        )
        pad, hash_algorithm = self._RSAPrivateKey__padding_and_hash_algorithm(
            signing_algorithm
        )
        _check_digest(message, hash_algorithm, signing_algorithm)
        try:
            self.private_key.public_key().verify(
                signature, message, pad, Prehashed(hash_algorithm)
            )
            return True
        except InvalidSignature:
            return False

    cls.sign, cls.verify = sign, verify


def apply_digest_patch() -> None:
    """Makes moto's KMS honour `MessageType=DIGEST` on `Sign` and `Verify`."""
    resp = kms_responses.KmsResponse
    resp.sign = _with_message_type(resp.sign)
    resp.verify = _with_message_type(resp.verify)
    _patch_ecdsa()
    _patch_rsa()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument(
        "--unpatched",
        action="store_true",
        help="run moto as released, without the DIGEST correction (for the test that shows"
        " the correction matters)",
    )
    args = parser.parse_args()
    if moto.__version__ != EXPECTED_MOTO:
        # The patch targets moto's private helpers of this exact version.
        sys.exit(
            f"moto_kms_server: moto {moto.__version__} installed, expected {EXPECTED_MOTO}"
            " (run scripts/setup.sh)"
        )
    if not args.unpatched:
        apply_digest_patch()
    from moto.server import main as moto_main

    moto_main(["--host", args.host, "--port", str(args.port)])


if __name__ == "__main__":
    main()
