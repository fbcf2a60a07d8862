//! PKCS#11 HSM backend (feature `hsm`).
