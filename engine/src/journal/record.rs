//! The journal's records: fixed-size structs of integers and byte arrays (no heap field),
//! archived with rkyv and read back with validation (bytecheck).
//!
//! Each record kind has a kind byte ([`KIND_PRINCIPAL`] …) and an rkyv archive of a fixed
//! size; [`IntentRec`] and [`SignedRec`] are followed in the frame by a variable tail
//! (calldata, raw signed transaction) whose length is a field of the record, filled in by
//! the writer. Text fields ([`Text`]) are UTF-8, at most `N` bytes, zero-padded.
//!
//! 128-bit quantities (fees) are stored as 16 little-endian bytes: an archived `u128` needs
//! 16-byte alignment and frames are 8-byte aligned.

use std::fmt;

use rkyv::api::low::LowSerializer;
use rkyv::rancor::{Error as RkyvError, Failure};
use rkyv::ser::allocator::SubAllocator;
use rkyv::ser::writer::Buffer;
use rkyv::{Archive, Deserialize, Serialize};

/// Kind byte of a [`PrincipalRec`].
pub const KIND_PRINCIPAL: u8 = 1;
/// Kind byte of an [`IntentRec`] (tail: calldata).
pub const KIND_INTENT: u8 = 2;
/// Kind byte of a [`SignedRec`] (tail: the raw signed transaction).
pub const KIND_SIGNED: u8 = 3;
/// Kind byte of a [`StateRec`].
pub const KIND_STATE: u8 = 4;
/// Kind byte of a [`DoneRec`].
pub const KIND_DONE: u8 = 5;

/// Whether `kind` is one of the record kinds above.
pub const fn is_known_kind(kind: u8) -> bool {
    matches!(
        kind,
        KIND_PRINCIPAL | KIND_INTENT | KIND_SIGNED | KIND_STATE | KIND_DONE
    )
}

/// A short UTF-8 string stored inline: at most `N` bytes (`N` ≤ 255), zero-padded.
///
/// Built with [`Text::new`], which cuts a longer string at the last character boundary
/// that fits; a record read back is checked to hold a valid `Text` (length, UTF-8, zero
/// padding).
#[derive(Archive, Serialize, Deserialize, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Text<const N: usize> {
    len: u8,
    bytes: [u8; N],
}

impl<const N: usize> Text<N> {
    const FITS: () = assert!(N <= u8::MAX as usize, "Text<N> needs N <= 255");

    /// `s`, cut at the last character boundary at or below `N` bytes.
    pub fn new(s: &str) -> Text<N> {
        #[allow(clippy::let_unit_value)]
        let () = Self::FITS;
        let mut end = s.len().min(N);
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        let mut bytes = [0u8; N];
        bytes[..end].copy_from_slice(&s.as_bytes()[..end]);
        Text {
            len: end as u8,
            bytes,
        }
    }

    /// The string.
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(self.as_bytes()).unwrap_or("")
    }

    /// The string's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..(self.len as usize).min(N)]
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.as_bytes().len()
    }

    /// Whether it is the empty string.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether the length fits, the bytes are UTF-8 and the padding is zero (always true
    /// for a `Text` made by [`Text::new`]).
    pub fn is_valid(&self) -> bool {
        let n = self.len as usize;
        n <= N
            && std::str::from_utf8(&self.bytes[..n]).is_ok()
            && self.bytes[n..].iter().all(|&b| b == 0)
    }
}

impl<const N: usize> Default for Text<N> {
    fn default() -> Self {
        Text {
            len: 0,
            bytes: [0; N],
        }
    }
}

impl<const N: usize> fmt::Debug for Text<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

/// The interned number of a JWT subject in one run, with its name. Numbers are not stable
/// across restarts; names are. Written before the first intent of that principal in a run.
#[derive(Archive, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PrincipalRec {
    /// The principal's number in the run that wrote the record.
    pub idx: u32,
    /// The principal's name (the JWT `sub`).
    pub name: Text<64>,
}

impl PrincipalRec {
    /// Principal `idx` named `name` (cut to 64 bytes).
    pub fn new(idx: u32, name: &str) -> PrincipalRec {
        PrincipalRec {
            idx,
            name: Text::new(name),
        }
    }

    /// The name.
    pub fn name(&self) -> &str {
        self.name.as_str()
    }
}

/// An intent as intake accepted it. Tail: its calldata.
#[derive(Archive, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IntentRec {
    /// Sequence number.
    pub seq: u64,
    /// Principal number (of the run that wrote it; see [`PrincipalRec`]).
    pub principal: u32,
    /// The desk's idempotency key.
    pub id: Text<64>,
    /// Account address.
    pub account: [u8; 20],
    /// Account index in the configuration of the run that wrote it.
    pub account_idx: u16,
    /// Intent kind (the engine's enum as a byte).
    pub kind: u8,
    /// Route (the engine's enum as a byte).
    pub route: u8,
    /// Sent to every provider at once.
    pub urgent: bool,
    /// Private route with public fallback.
    pub public_fallback: bool,
    /// Destination address.
    pub to: [u8; 20],
    /// Value in wei, big-endian U256.
    pub value: [u8; 32],
    /// Gas limit.
    pub gas_limit: u64,
    /// Fee cap (wei per gas), u128 little-endian.
    pub max_fee_cap: [u8; 16],
    /// A travel-rule record is attached.
    pub travel_present: bool,
    /// Travel rule: the counterparty VASP's key.
    pub travel_vasp_key: u64,
    /// Travel rule: hash of the record.
    pub travel_hash: [u8; 32],
    /// Principal number of the approver (0: none).
    pub approved_by: u32,
    /// When it was recorded (unix ns).
    pub at_unix_ns: u64,
    /// Length of the calldata tail; set by the writer from the tail it is given.
    pub calldata_len: u32,
}

impl IntentRec {
    /// An idempotency key as stored (cut to 64 bytes).
    pub fn id_bytes(id: &str) -> Text<64> {
        Text::new(id)
    }

    /// The idempotency key.
    pub fn id(&self) -> &str {
        self.id.as_str()
    }
}

/// A transaction the signing stage signed. Tail: the raw signed transaction.
#[derive(Archive, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SignedRec {
    /// Sequence number of its intent.
    pub seq: u64,
    /// Account address.
    pub account: [u8; 20],
    /// Account index in the configuration of the run that wrote it.
    pub account_idx: u16,
    /// Nonce.
    pub nonce: u64,
    /// 0 for the intent's first transaction, then one more per replacement.
    pub generation: u16,
    /// Why it was made (the engine's enum as a byte).
    pub purpose: u8,
    /// Max fee per gas, u128 little-endian.
    pub max_fee: [u8; 16],
    /// Max priority fee per gas, u128 little-endian.
    pub priority_fee: [u8; 16],
    /// Transaction hash.
    pub tx_hash: [u8; 32],
    /// Route (the engine's enum as a byte).
    pub route: u8,
    /// Sent to every provider at once.
    pub urgent: bool,
    /// Private route with public fallback.
    pub public_fallback: bool,
    /// Last block a private relay may include it in (0: none).
    pub max_block: u64,
    /// When it was recorded (unix ns).
    pub at_unix_ns: u64,
    /// Length of the raw transaction tail; set by the writer from the tail it is given.
    pub raw_len: u32,
}

/// A state change of an intent, as the status thread saw it.
#[derive(Archive, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StateRec {
    /// Sequence number of the intent.
    pub seq: u64,
    /// State (the engine's enum as a byte).
    pub state: u8,
    /// Reason (the engine's enum as a byte).
    pub reason: u8,
    /// Transaction hash (zero when none).
    pub tx_hash: [u8; 32],
    /// Sending account.
    pub from: [u8; 20],
    /// Nonce.
    pub nonce: u64,
    /// Block number (inclusion).
    pub block_number: u64,
    /// Block hash (inclusion).
    pub block_hash: [u8; 32],
    /// Gas used (inclusion).
    pub gas_used: u64,
    /// Receipt status.
    pub success: bool,
    /// Confirmation depth.
    pub depth: u32,
    /// Route (the engine's enum as a byte).
    pub route: u8,
    /// Venues that accepted it.
    pub venues: u32,
    /// Policy version that decided it.
    pub policy_version: u32,
    /// Human-readable detail (cut to 96 bytes).
    pub detail: Text<96>,
    /// When the event was made (unix µs).
    pub at_unix_us: u64,
}

impl StateRec {
    /// A detail text as stored (cut to 96 bytes).
    pub fn detail_bytes(detail: &str) -> Text<96> {
        Text::new(detail)
    }

    /// The detail text.
    pub fn detail(&self) -> &str {
        self.detail.as_str()
    }
}

/// The compact form of a finished intent, kept by compaction so its idempotency key and
/// end survive.
#[derive(Archive, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DoneRec {
    /// Sequence number.
    pub seq: u64,
    /// Principal name (names are stable across restarts; numbers are not).
    pub principal_name: Text<64>,
    /// The desk's idempotency key.
    pub id: Text<64>,
    /// Final state (the engine's enum as a byte).
    pub state: u8,
    /// Reason (the engine's enum as a byte).
    pub reason: u8,
    /// The transaction that settled it (zero when none).
    pub tx_hash: [u8; 32],
    /// Its block (0 when none).
    pub block_number: u64,
    /// When it ended (unix µs; 0 when not known).
    pub at_unix_us: u64,
}

impl DoneRec {
    /// A finished intent (names cut to 64 bytes).
    pub fn new(
        seq: u64,
        principal_name: &str,
        id: &str,
        state: u8,
        reason: u8,
        tx_hash: [u8; 32],
        block_number: u64,
    ) -> DoneRec {
        DoneRec {
            seq,
            principal_name: Text::new(principal_name),
            id: Text::new(id),
            state,
            reason,
            tx_hash,
            block_number,
            at_unix_us: 0,
        }
    }

    /// The principal's name.
    pub fn principal_name(&self) -> &str {
        self.principal_name.as_str()
    }

    /// The idempotency key.
    pub fn id(&self) -> &str {
        self.id.as_str()
    }
}

/// A record read back from the journal, owned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OwnedRecord {
    /// A principal's name.
    Principal(PrincipalRec),
    /// An intent and its calldata.
    Intent(IntentRec, Vec<u8>),
    /// A signed transaction and its raw bytes.
    Signed(SignedRec, Vec<u8>),
    /// A state change.
    State(StateRec),
    /// A finished intent (compacted).
    Done(DoneRec),
}

impl OwnedRecord {
    /// Its kind byte.
    pub fn kind(&self) -> u8 {
        match self {
            OwnedRecord::Principal(_) => KIND_PRINCIPAL,
            OwnedRecord::Intent(..) => KIND_INTENT,
            OwnedRecord::Signed(..) => KIND_SIGNED,
            OwnedRecord::State(_) => KIND_STATE,
            OwnedRecord::Done(_) => KIND_DONE,
        }
    }

    /// The intent's sequence number (`None` for a principal record).
    pub fn seq(&self) -> Option<u64> {
        match self {
            OwnedRecord::Principal(_) => None,
            OwnedRecord::Intent(r, _) => Some(r.seq),
            OwnedRecord::Signed(r, _) => Some(r.seq),
            OwnedRecord::State(r) => Some(r.seq),
            OwnedRecord::Done(r) => Some(r.seq),
        }
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for super::PrincipalRec {}
    impl Sealed for super::IntentRec {}
    impl Sealed for super::SignedRec {}
    impl Sealed for super::StateRec {}
    impl Sealed for super::DoneRec {}
}

/// A record struct the journal can append (implemented by the five record types only).
pub trait Record: sealed::Sealed + Copy {
    /// Its kind byte.
    const KIND: u8;
    /// Whether a variable tail follows it.
    const HAS_TAIL: bool;
    /// Size in bytes of its rkyv archive.
    const ARCHIVED_SIZE: usize;
    /// Sets the tail-length field (no-op for records without a tail).
    fn set_tail_len(&mut self, len: u32);
    /// Writes the rkyv archive into `out` (exactly [`Record::ARCHIVED_SIZE`] bytes), without
    /// allocating. Fails only if `out` is too short.
    fn encode(&self, out: &mut [u8]) -> Result<(), Failure>;
}

/// Serializes `value` into `out` with rkyv's low-level API: a fixed buffer, no allocator
/// (the records have no out-of-line data), so nothing is allocated.
fn encode_into<T>(value: &T, out: &mut [u8]) -> Result<usize, Failure>
where
    T: for<'a> Serialize<LowSerializer<Buffer<'a>, SubAllocator<'a>, Failure>>,
{
    let written = rkyv::api::low::to_bytes_in_with_alloc::<_, _, Failure>(
        value,
        Buffer::from(out),
        SubAllocator::empty(),
    )?;
    Ok(written.len())
}

macro_rules! record {
    ($ty:ty, $kind:expr, tail: $tail:ident) => {
        impl Record for $ty {
            const KIND: u8 = $kind;
            const HAS_TAIL: bool = true;
            const ARCHIVED_SIZE: usize = size_of::<<$ty as Archive>::Archived>();
            fn set_tail_len(&mut self, len: u32) {
                self.$tail = len;
            }
            fn encode(&self, out: &mut [u8]) -> Result<(), Failure> {
                match encode_into(self, out) {
                    Ok(n) if n == Self::ARCHIVED_SIZE => Ok(()),
                    _ => Err(Failure),
                }
            }
        }
    };
    ($ty:ty, $kind:expr) => {
        impl Record for $ty {
            const KIND: u8 = $kind;
            const HAS_TAIL: bool = false;
            const ARCHIVED_SIZE: usize = size_of::<<$ty as Archive>::Archived>();
            fn set_tail_len(&mut self, _: u32) {}
            fn encode(&self, out: &mut [u8]) -> Result<(), Failure> {
                match encode_into(self, out) {
                    Ok(n) if n == Self::ARCHIVED_SIZE => Ok(()),
                    _ => Err(Failure),
                }
            }
        }
    };
}

record!(PrincipalRec, KIND_PRINCIPAL);
record!(IntentRec, KIND_INTENT, tail: calldata_len);
record!(SignedRec, KIND_SIGNED, tail: raw_len);
record!(StateRec, KIND_STATE);
record!(DoneRec, KIND_DONE);

/// Bytes before the archive in a payload: the kind byte and 7 zero bytes.
pub(crate) const KIND_HEADER: usize = 8;

/// Checks and reads the archive of a `T` (validated with bytecheck, then deserialized).
fn read<T>(bytes: &[u8]) -> Result<T, String>
where
    T: Archive,
    T::Archived: rkyv::Portable
        + for<'a> rkyv::bytecheck::CheckBytes<rkyv::api::low::LowValidator<'a, RkyvError>>
        + Deserialize<T, rkyv::api::low::LowDeserializer<RkyvError>>,
{
    let archived = if (bytes.as_ptr() as usize).is_multiple_of(align_of::<T::Archived>()) {
        rkyv::api::low::access::<T::Archived, RkyvError>(bytes)
            .map_err(|e| format!("record check failed: {e}"))?
    } else {
        // Only for a caller's unaligned buffer; frames in a segment are 8-byte aligned.
        let mut copy = rkyv::util::AlignedVec::<16>::with_capacity(bytes.len());
        copy.extend_from_slice(bytes);
        let a = rkyv::api::low::access::<T::Archived, RkyvError>(&copy)
            .map_err(|e| format!("record check failed: {e}"))?;
        return rkyv::api::low::deserialize::<T, RkyvError>(a)
            .map_err(|e| format!("record check failed: {e}"));
    };
    rkyv::api::low::deserialize::<T, RkyvError>(archived)
        .map_err(|e| format!("record check failed: {e}"))
}

/// Splits `body` (after the kind header) into a `T` and its tail, checking the tail length.
fn with_tail<T>(body: &[u8], tail_len: impl Fn(&T) -> u32) -> Result<(T, Vec<u8>), String>
where
    T: Record + Archive,
    T::Archived: rkyv::Portable
        + for<'a> rkyv::bytecheck::CheckBytes<rkyv::api::low::LowValidator<'a, RkyvError>>
        + Deserialize<T, rkyv::api::low::LowDeserializer<RkyvError>>,
{
    if body.len() < T::ARCHIVED_SIZE {
        return Err(format!(
            "record of kind {} is {} bytes, shorter than its {} fixed bytes",
            T::KIND,
            body.len(),
            T::ARCHIVED_SIZE
        ));
    }
    let (fixed, tail) = body.split_at(T::ARCHIVED_SIZE);
    let rec: T = read(fixed)?;
    if tail_len(&rec) as usize != tail.len() {
        return Err(format!(
            "record of kind {} says its tail is {} bytes, the frame holds {}",
            T::KIND,
            tail_len(&rec),
            tail.len()
        ));
    }
    Ok((rec, tail.to_vec()))
}

fn texts_valid(ok: bool, kind: u8) -> Result<(), String> {
    if ok {
        Ok(())
    } else {
        Err(format!("record of kind {kind} holds an invalid text field"))
    }
}

/// Reads a frame's payload (kind header, archive, tail) back into an owned record.
pub(crate) fn decode_payload(payload: &[u8]) -> Result<OwnedRecord, String> {
    if payload.len() < KIND_HEADER {
        return Err("payload shorter than its kind header".into());
    }
    let kind = payload[0];
    if payload[1..KIND_HEADER].iter().any(|&b| b != 0) {
        return Err("nonzero bytes in the kind header's padding".into());
    }
    let body = &payload[KIND_HEADER..];
    let rec = match kind {
        KIND_PRINCIPAL => {
            let (r, _) = with_tail::<PrincipalRec>(body, |_| 0)?;
            texts_valid(r.name.is_valid(), kind)?;
            OwnedRecord::Principal(r)
        }
        KIND_INTENT => {
            let (r, data) = with_tail::<IntentRec>(body, |r| r.calldata_len)?;
            texts_valid(r.id.is_valid(), kind)?;
            OwnedRecord::Intent(r, data)
        }
        KIND_SIGNED => {
            let (r, raw) = with_tail::<SignedRec>(body, |r| r.raw_len)?;
            OwnedRecord::Signed(r, raw)
        }
        KIND_STATE => {
            let (r, _) = with_tail::<StateRec>(body, |_| 0)?;
            texts_valid(r.detail.is_valid(), kind)?;
            OwnedRecord::State(r)
        }
        KIND_DONE => {
            let (r, _) = with_tail::<DoneRec>(body, |_| 0)?;
            texts_valid(r.principal_name.is_valid() && r.id.is_valid(), kind)?;
            OwnedRecord::Done(r)
        }
        other => return Err(format!("unknown record kind {other}")),
    };
    Ok(rec)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload<R: Record>(r: &R, tail: &[u8]) -> Vec<u8> {
        let mut r = *r;
        r.set_tail_len(tail.len() as u32);
        let mut p = vec![0u8; KIND_HEADER + R::ARCHIVED_SIZE];
        p[0] = R::KIND;
        r.encode(&mut p[KIND_HEADER..]).unwrap();
        p.extend_from_slice(tail);
        p
    }

    #[test]
    fn text_cuts_at_a_char_boundary_and_checks_itself() {
        let t = Text::<4>::new("abcdé");
        assert_eq!(t.as_str(), "abcd");
        let t = Text::<4>::new("abé");
        assert_eq!(t.as_str(), "abé");
        let t = Text::<4>::new("abcé");
        assert_eq!(t.as_str(), "abc");
        assert!(t.is_valid());
        let bad = Text::<4> {
            len: 5,
            bytes: *b"abcd",
        };
        assert!(!bad.is_valid());
        assert_eq!(Text::<64>::default().as_str(), "");
    }

    #[test]
    fn archive_sizes_are_fixed_and_8_byte_multiples_where_a_tail_follows() {
        assert_eq!(IntentRec::ARCHIVED_SIZE % 8, 0);
        assert_eq!(SignedRec::ARCHIVED_SIZE % 8, 0);
        for s in [
            PrincipalRec::ARCHIVED_SIZE,
            IntentRec::ARCHIVED_SIZE,
            SignedRec::ARCHIVED_SIZE,
            StateRec::ARCHIVED_SIZE,
            DoneRec::ARCHIVED_SIZE,
        ] {
            assert!(s > 0 && s < 512, "{s}");
        }
    }

    #[test]
    fn every_kind_round_trips() {
        let i = IntentRec {
            seq: 7,
            principal: 3,
            id: IntentRec::id_bytes("order-1"),
            urgent: true,
            max_fee_cap: 123u128.to_le_bytes(),
            value: [9; 32],
            ..IntentRec::default()
        };
        let got = decode_payload(&payload(&i, b"calldata")).unwrap();
        let mut want = i;
        want.calldata_len = 8;
        assert_eq!(got, OwnedRecord::Intent(want, b"calldata".to_vec()));
        let s = SignedRec {
            seq: 7,
            nonce: 4,
            priority_fee: 5u128.to_le_bytes(),
            ..SignedRec::default()
        };
        let got = decode_payload(&payload(&s, &[1, 2, 3])).unwrap();
        assert!(matches!(got, OwnedRecord::Signed(r, raw) if r.nonce == 4 && raw == [1, 2, 3]));
        let p = PrincipalRec::new(2, "desk-a");
        assert_eq!(
            decode_payload(&payload(&p, &[])).unwrap(),
            OwnedRecord::Principal(p)
        );
        let st = StateRec {
            seq: 9,
            detail: StateRec::detail_bytes("nonce too low"),
            success: true,
            ..StateRec::default()
        };
        assert_eq!(
            decode_payload(&payload(&st, &[])).unwrap(),
            OwnedRecord::State(st)
        );
        let d = DoneRec::new(9, "desk-a", "order-9", 5, 1, [7; 32], 100);
        assert_eq!(
            decode_payload(&payload(&d, &[])).unwrap(),
            OwnedRecord::Done(d)
        );
    }

    #[test]
    fn bad_records_are_errors() {
        let s = StateRec::default();
        let mut p = payload(&s, &[]);
        // An out-of-range bool fails bytecheck.
        let st = StateRec {
            success: true,
            ..StateRec::default()
        };
        let q = payload(&st, &[]);
        let at = p.iter().zip(&q).position(|(a, b)| a != b).unwrap();
        p[at] = 2;
        assert!(decode_payload(&p).unwrap_err().contains("check"), "bool 2");
        // A tail length that disagrees with the frame.
        let mut p = payload(&IntentRec::default(), b"abc");
        p.pop();
        assert!(decode_payload(&p).unwrap_err().contains("tail"));
        // Unknown kind, short payload, nonzero padding.
        assert!(decode_payload(&[9, 0, 0, 0, 0, 0, 0, 0]).is_err());
        assert!(decode_payload(&[1, 0]).is_err());
        let mut p = payload(&PrincipalRec::new(1, "x"), &[]);
        p[3] = 1;
        assert!(decode_payload(&p).is_err());
        // A text whose length passes its capacity.
        let mut p = payload(&PrincipalRec::new(1, "x"), &[]);
        let q = payload(&PrincipalRec::new(1, "xy"), &[]);
        let at = p.iter().zip(&q).position(|(a, b)| a != b).unwrap();
        p[at] = 200;
        assert!(decode_payload(&p).unwrap_err().contains("text"));
        // Trailing garbage after a tail-less record.
        let mut p = payload(&PrincipalRec::new(1, "x"), &[]);
        p.push(0);
        assert!(decode_payload(&p).is_err());
    }
}
