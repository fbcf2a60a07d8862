//! Threshold ECDSA backend (feature `mpc`).
