//! Encryption at rest: AES-256-GCM with a fresh data key per segment, wrapped by a
//! key-encryption key (KEK) held in an HSM or KMS (`signers::kek`).
//!
//! The journal (`crate::journal`) and the audit log (`crate::audit`) both keep their data
//! in segment files. With `[at_rest]` configured, each new segment gets its own random
//! 256-bit data key; the segment stores only that key wrapped by the KEK (its *key
//! header*), and every record in it is encrypted and authenticated with the data key.
//! Opening a segment unwraps its key once (one HSM or KMS call); appending a record is
//! one AES-GCM pass in process memory, no call out.
//!
//! # Invariants
//!
//! - A data key is never written anywhere in clear; it lives in this process only, inside
//!   the cipher's key schedule (zeroed on drop).
//! - A `(key, nonce)` pair is used once: the nonce is the record's position in its
//!   segment (byte offset in the journal, line number in the audit log), and a segment is
//!   never appended to again after the process that created it stops (a reopened
//!   journal or audit log starts new segments).
//! - What is encrypted is authenticated too (GCM tag): a changed byte fails to decrypt
//!   with [`SealError::Auth`], never into other plaintext.
//!
//! # Key header
//!
//! `u16 kek_id_len | u16 wrapped_len | kek id (UTF-8) | wrapped key`, little endian. The
//! KEK id says which KEK to ask; [`Sealer::open_key`] refuses a header for another KEK.

use std::fmt;
use std::sync::Arc;

use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce, Tag};
use signers::kek::{DATA_KEY_LEN, DataKey, KeyWrap};

/// Bytes a GCM tag adds to each sealed record.
pub const TAG_LEN: usize = 16;

/// What can go wrong sealing or opening.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    /// The KEK could not wrap or unwrap a data key.
    #[error("key-encryption key `{kek}`: {source}")]
    Kek {
        /// KEK id.
        kek: String,
        /// What the custody backend said.
        #[source]
        source: Box<signers::SignerError>,
    },
    /// A segment's key was wrapped by another KEK than the one configured.
    #[error("the segment's data key is wrapped by `{found}`, not by the configured `{configured}`")]
    OtherKek {
        /// KEK id in the segment.
        found: String,
        /// KEK id configured.
        configured: String,
    },
    /// A segment is encrypted and no `[at_rest]` KEK is configured to read it.
    #[error(
        "the segment is encrypted (data key wrapped by `{kek}`) and no [at_rest] key-encryption key is configured"
    )]
    NoKek {
        /// KEK id in the segment.
        kek: String,
    },
    /// A key header does not parse.
    #[error("bad key header: {0}")]
    Header(&'static str),
    /// A sealed record does not authenticate: changed bytes, or the wrong key.
    #[error("a sealed record does not authenticate (changed bytes or another key)")]
    Auth,
}

/// Seals segments: makes and opens their data keys with the configured KEK.
#[derive(Clone)]
pub struct Sealer {
    kek: Arc<dyn KeyWrap>,
}

impl fmt::Debug for Sealer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sealer")
            .field("kek", &self.kek.id())
            .finish()
    }
}

impl Sealer {
    /// A sealer wrapping data keys with `kek`.
    pub fn new(kek: Arc<dyn KeyWrap>) -> Sealer {
        Sealer { kek }
    }

    /// The KEK's id.
    pub fn kek_id(&self) -> &str {
        self.kek.id()
    }

    /// A fresh random data key for a new segment, wrapped by the KEK (one KEK call).
    pub fn new_key(&self) -> Result<SegmentKey, SealError> {
        let mut bytes = [0u8; DATA_KEY_LEN];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut bytes);
        let key = DataKey::new(bytes);
        bytes.iter_mut().for_each(|b| *b = 0);
        let wrapped = self.kek.wrap(&key).map_err(|source| SealError::Kek {
            kek: self.kek.id().to_owned(),
            source: Box::new(source),
        })?;
        Ok(SegmentKey::from_parts(&key, self.kek.id(), wrapped))
    }

    /// The data key of an existing segment, from its key header (one KEK call).
    pub fn open_key(&self, header: &KeyHeader<'_>) -> Result<SegmentKey, SealError> {
        if header.kek_id != self.kek.id() {
            return Err(SealError::OtherKek {
                found: header.kek_id.to_owned(),
                configured: self.kek.id().to_owned(),
            });
        }
        let key = self
            .kek
            .unwrap(header.wrapped)
            .map_err(|source| SealError::Kek {
                kek: self.kek.id().to_owned(),
                source: Box::new(source),
            })?;
        Ok(SegmentKey::from_parts(
            &key,
            header.kek_id,
            header.wrapped.to_vec(),
        ))
    }
}

/// Opens a key header with `sealer`, or says that one is needed.
pub fn open_key(sealer: Option<&Sealer>, header: &KeyHeader<'_>) -> Result<SegmentKey, SealError> {
    match sealer {
        Some(s) => s.open_key(header),
        None => Err(SealError::NoKek {
            kek: header.kek_id.to_owned(),
        }),
    }
}

/// One segment's data key, ready to seal and open its records.
pub struct SegmentKey {
    cipher: Aes256Gcm,
    kek_id: String,
    wrapped: Vec<u8>,
}

impl fmt::Debug for SegmentKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SegmentKey")
            .field("kek", &self.kek_id)
            .finish_non_exhaustive()
    }
}

fn nonce(n: u64) -> Nonce<aes_gcm::aead::consts::U12> {
    let mut b = [0u8; 12];
    b[..8].copy_from_slice(&n.to_le_bytes());
    Nonce::from(b)
}

impl SegmentKey {
    fn from_parts(key: &DataKey, kek_id: &str, wrapped: Vec<u8>) -> SegmentKey {
        SegmentKey {
            cipher: Aes256Gcm::new(key.bytes().into()),
            kek_id: kek_id.to_owned(),
            wrapped,
        }
    }

    /// The key header to store in the segment (the wrapped key, never the key).
    pub fn header(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(4 + self.kek_id.len() + self.wrapped.len());
        out.extend_from_slice(&(self.kek_id.len() as u16).to_le_bytes());
        out.extend_from_slice(&(self.wrapped.len() as u16).to_le_bytes());
        out.extend_from_slice(self.kek_id.as_bytes());
        out.extend_from_slice(&self.wrapped);
        out
    }

    /// Encrypts `buf` in place under nonce `n` (unique per record of this segment), binding
    /// `aad`; returns the tag. Allocates nothing.
    pub fn seal(&self, n: u64, aad: &[u8], buf: &mut [u8]) -> [u8; TAG_LEN] {
        match self.cipher.encrypt_in_place_detached(&nonce(n), aad, buf) {
            Ok(tag) => tag.into(),
            // aes-gcm fails only for a message longer than 2^36 bytes; frames and lines
            // are capped far below.
            Err(_) => unreachable!("AES-GCM message over 64 GiB"),
        }
    }

    /// Decrypts `buf` in place, checking `tag` and `aad`. Allocates nothing.
    pub fn open(&self, n: u64, aad: &[u8], buf: &mut [u8], tag: &[u8]) -> Result<(), SealError> {
        if tag.len() != TAG_LEN {
            return Err(SealError::Auth);
        }
        self.cipher
            .decrypt_in_place_detached(
                &nonce(n),
                aad,
                buf,
                &Tag::from(<[u8; TAG_LEN]>::try_from(tag).map_err(|_| SealError::Auth)?),
            )
            .map_err(|_| SealError::Auth)
    }
}

/// A parsed key header, borrowing the bytes it was read from.
#[derive(Clone, Copy, Debug)]
pub struct KeyHeader<'a> {
    /// Which KEK wrapped the data key.
    pub kek_id: &'a str,
    /// The wrapped data key.
    pub wrapped: &'a [u8],
}

impl<'a> KeyHeader<'a> {
    /// Parses a key header that makes up the whole of `b`.
    pub fn parse(b: &'a [u8]) -> Result<KeyHeader<'a>, SealError> {
        if b.len() < 4 {
            return Err(SealError::Header("shorter than its lengths"));
        }
        let id_len = u16::from_le_bytes([b[0], b[1]]) as usize;
        let w_len = u16::from_le_bytes([b[2], b[3]]) as usize;
        if b.len() != 4 + id_len + w_len {
            return Err(SealError::Header("its lengths do not add up"));
        }
        let kek_id = std::str::from_utf8(&b[4..4 + id_len])
            .map_err(|_| SealError::Header("the KEK id is not UTF-8"))?;
        if w_len == 0 {
            return Err(SealError::Header("no wrapped key"));
        }
        Ok(KeyHeader {
            kek_id,
            wrapped: &b[4 + id_len..],
        })
    }
}

/// A KEK that lives in process memory, for unit tests of the formats only: the engine
/// accepts no such KEK from configuration.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    pub(crate) struct MemoryKek {
        id: String,
        cipher: Aes256Gcm,
        pub(crate) calls: std::sync::atomic::AtomicU64,
    }

    impl fmt::Debug for MemoryKek {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(&self.id)
        }
    }

    impl MemoryKek {
        pub(crate) fn new(id: &str) -> Arc<MemoryKek> {
            Arc::new(MemoryKek {
                id: id.to_owned(),
                cipher: Aes256Gcm::new(&[7u8; 32].into()),
                calls: Default::default(),
            })
        }
    }

    impl KeyWrap for MemoryKek {
        fn id(&self) -> &str {
            &self.id
        }
        fn wrap(&self, key: &DataKey) -> Result<Vec<u8>, signers::SignerError> {
            self.calls
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let mut iv = [0u8; 12];
            rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut iv);
            let mut buf = key.bytes().to_vec();
            let tag = self
                .cipher
                .encrypt_in_place_detached(&iv.into(), b"kek", &mut buf)
                .expect("small");
            let mut out = iv.to_vec();
            out.extend_from_slice(&buf);
            out.extend_from_slice(&tag);
            Ok(out)
        }
        fn unwrap(&self, w: &[u8]) -> Result<DataKey, signers::SignerError> {
            self.calls
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let bad = || signers::SignerError::Signing {
                key_id: self.id.clone(),
                reason: "does not authenticate".into(),
            };
            if w.len() != 12 + 32 + 16 {
                return Err(bad());
            }
            let mut buf = w[12..44].to_vec();
            let iv: [u8; 12] = w[..12].try_into().expect("12");
            self.cipher
                .decrypt_in_place_detached(
                    &iv.into(),
                    b"kek",
                    &mut buf,
                    &Tag::from(<[u8; 16]>::try_from(&w[44..]).expect("16")),
                )
                .map_err(|_| bad())?;
            let mut k = [0u8; 32];
            k.copy_from_slice(&buf);
            Ok(DataKey::new(k))
        }
    }

    pub(crate) fn sealer() -> Sealer {
        Sealer::new(MemoryKek::new("test:memory"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_record_opens_with_its_key_and_nonce_only() {
        let s = testing::sealer();
        let k = s.new_key().unwrap();
        let mut buf = *b"intent calldata 0xdeadbeef";
        let tag = k.seal(64, b"aad", &mut buf);
        assert_ne!(&buf, b"intent calldata 0xdeadbeef");
        let header = k.header();
        let again = s.open_key(&KeyHeader::parse(&header).unwrap()).unwrap();
        let mut wrong_nonce = buf;
        assert!(matches!(
            again.open(72, b"aad", &mut wrong_nonce, &tag),
            Err(SealError::Auth)
        ));
        let mut flipped = buf;
        flipped[3] ^= 1;
        assert!(matches!(
            again.open(64, b"aad", &mut flipped, &tag),
            Err(SealError::Auth)
        ));
        let other = s.new_key().unwrap();
        let mut other_key = buf;
        assert!(matches!(
            other.open(64, b"aad", &mut other_key, &tag),
            Err(SealError::Auth)
        ));
        again.open(64, b"aad", &mut buf, &tag).unwrap();
        assert_eq!(&buf, b"intent calldata 0xdeadbeef");
    }

    #[test]
    fn a_header_names_its_kek_and_only_that_kek_opens_it() {
        let s = testing::sealer();
        let k = s.new_key().unwrap();
        let h = k.header();
        let parsed = KeyHeader::parse(&h).unwrap();
        assert_eq!(parsed.kek_id, "test:memory");
        let other = Sealer::new(testing::MemoryKek::new("test:other"));
        assert!(matches!(
            other.open_key(&parsed),
            Err(SealError::OtherKek { .. })
        ));
        assert!(matches!(
            open_key(None, &parsed),
            Err(SealError::NoKek { .. })
        ));
        assert!(KeyHeader::parse(&h[..h.len() - 1]).is_err());
        assert!(KeyHeader::parse(&[1]).is_err());
    }
}
