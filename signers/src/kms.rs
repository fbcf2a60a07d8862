//! AWS KMS backend (feature `kms`).
