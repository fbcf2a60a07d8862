//! One validator deposit as the desk hands it over: parsing from the staking deposit CLI's
//! `deposit_data.json` format, and a packed fixed-size binary form for storage and transport.
//!
//! Invariants:
//! - a parsed [`DepositEntry`] has every byte field at its exact spec length and a whole
//!   number of gwei as amount; the amount rules (minimum, per credential type) are the
//!   policy stage's, so that breaking one is a `rejected` with `invalid_deposit`, and the
//!   entry is *not* yet cryptographically checked (that is
//!   [`verify_entry`](super::verify_entry));
//! - a parsed list holds 1 to [`MAX_DEPOSITS_PER_INTENT`](super::MAX_DEPOSITS_PER_INTENT)
//!   entries;
//! - the packed form is canonical: [`DepositEntry::encode`] writes absent optional fields as
//!   zeros and [`DepositEntry::decode`] accepts only what `encode` can produce, so
//!   `decode(encode(e)) == Some(e)` and equal entries have equal bytes.

use serde_json::{Map, Value};

use super::{
    MAX_DEPOSITS_PER_INTENT, MAX_EFFECTIVE_BALANCE_0X01_GWEI, MAX_EFFECTIVE_BALANCE_0X02_GWEI,
};

/// Size of the packed binary form written by [`DepositEntry::encode`].
pub const DEPOSIT_ENTRY_BYTES: usize = 256;

const FLAG_MESSAGE_ROOT: u8 = 0b01;
const FLAG_FORK_VERSION: u8 = 0b10;

// Offsets of the packed form.
const PUBKEY_AT: usize = 0;
const WC_AT: usize = PUBKEY_AT + 48;
const AMOUNT_AT: usize = WC_AT + 32;
const SIGNATURE_AT: usize = AMOUNT_AT + 8;
const MESSAGE_ROOT_AT: usize = SIGNATURE_AT + 96;
const DATA_ROOT_AT: usize = MESSAGE_ROOT_AT + 32;
const FLAGS_AT: usize = DATA_ROOT_AT + 32;
const FORK_AT: usize = FLAGS_AT + 1;
const PAD_AT: usize = FORK_AT + 4;
const _: () = assert!(PAD_AT + 3 == DEPOSIT_ENTRY_BYTES);

/// One deposit: the `DepositData` fields plus the roots and fork version the CLI reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DepositEntry {
    /// Validator BLS public key (compressed G1).
    pub pubkey: [u8; 48],
    /// Withdrawal credentials: prefix byte (0x00 BLS, 0x01 address, 0x02 compounding) + body.
    pub withdrawal_credentials: [u8; 32],
    /// Deposit amount in gwei.
    pub amount_gwei: u64,
    /// BLS signature over the deposit message's signing root (compressed G2).
    pub signature: [u8; 96],
    /// `hash_tree_root(DepositMessage)` as the file states it, if it does.
    pub deposit_message_root: Option<[u8; 32]>,
    /// `hash_tree_root(DepositData)` as the file states it: the contract call's last argument.
    pub deposit_data_root: [u8; 32],
    /// The genesis fork version the file says it was signed for, if it does.
    pub fork_version: Option<[u8; 4]>,
}

/// Why a deposit list could not be parsed: which field, and what is wrong with it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct EntryError {
    /// Path of the offending field, e.g. `deposits[1].pubkey`, or `deposits` for the list.
    pub field: String,
    /// What is wrong, as a sentence for the desk.
    pub message: String,
}

impl EntryError {
    fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Parses the JSON array the desk sends, in the staking deposit CLI's `deposit_data.json`
/// format: objects with `pubkey`, `withdrawal_credentials`, `amount` (gwei, a JSON integer or a
/// decimal string), `signature`, `deposit_data_root`, and optionally `deposit_message_root`
/// and `fork_version` (absent or `null`). Hex may carry a `0x` prefix; every byte field must
/// have its exact length. Other fields (`network_name`, `deposit_cli_version`, …) are
/// ignored. The list must hold 1 to [`MAX_DEPOSITS_PER_INTENT`] entries.
///
/// The amount must be a whole number of gwei; its bounds (at least
/// [`MIN_DEPOSIT_GWEI`](super::MIN_DEPOSIT_GWEI),
/// at most [`max_effective_balance_gwei`]) are checked by the policy stage.
///
/// Signatures and roots are only checked for shape here; see
/// [`verify_entry`](super::verify_entry).
pub fn parse_entries(json: &str) -> Result<Vec<DepositEntry>, EntryError> {
    let value: Value = serde_json::from_str(json)
        .map_err(|e| EntryError::new("deposits", format!("is not valid JSON ({e})")))?;
    let Value::Array(items) = value else {
        return Err(EntryError::new(
            "deposits",
            "must be a JSON array of deposit objects",
        ));
    };
    if items.is_empty() {
        return Err(EntryError::new(
            "deposits",
            "must hold at least one deposit",
        ));
    }
    if items.len() > MAX_DEPOSITS_PER_INTENT {
        return Err(EntryError::new(
            "deposits",
            format!(
                "holds {} deposits; at most {MAX_DEPOSITS_PER_INTENT} are allowed per intent",
                items.len()
            ),
        ));
    }
    items
        .iter()
        .enumerate()
        .map(|(i, item)| parse_entry(i, item))
        .collect()
}

fn parse_entry(index: usize, item: &Value) -> Result<DepositEntry, EntryError> {
    let Value::Object(obj) = item else {
        return Err(EntryError::new(
            format!("deposits[{index}]"),
            "must be a JSON object",
        ));
    };
    let fields = Fields { index, obj };
    let pubkey = fields.required_hex::<48>("pubkey")?;
    let withdrawal_credentials = fields.required_hex::<32>("withdrawal_credentials")?;
    let amount_gwei = fields.amount(&withdrawal_credentials)?;
    let signature = fields.required_hex::<96>("signature")?;
    let deposit_message_root = fields.optional_hex::<32>("deposit_message_root")?;
    let deposit_data_root = fields.required_hex::<32>("deposit_data_root")?;
    let fork_version = fields.optional_hex::<4>("fork_version")?;
    Ok(DepositEntry {
        pubkey,
        withdrawal_credentials,
        amount_gwei,
        signature,
        deposit_message_root,
        deposit_data_root,
        fork_version,
    })
}

/// The fields of the deposit object at `index`, with errors naming their path.
struct Fields<'a> {
    index: usize,
    obj: &'a Map<String, Value>,
}

impl Fields<'_> {
    fn error(&self, name: &str, message: impl Into<String>) -> EntryError {
        EntryError::new(format!("deposits[{}].{name}", self.index), message)
    }

    fn present(&self, name: &str) -> Option<&Value> {
        self.obj.get(name).filter(|v| !v.is_null())
    }

    fn required_hex<const N: usize>(&self, name: &str) -> Result<[u8; N], EntryError> {
        match self.present(name) {
            Some(v) => self.hex_value(name, v),
            None => Err(self.error(name, "is missing")),
        }
    }

    fn optional_hex<const N: usize>(&self, name: &str) -> Result<Option<[u8; N]>, EntryError> {
        self.present(name)
            .map(|v| self.hex_value(name, v))
            .transpose()
    }

    fn hex_value<const N: usize>(&self, name: &str, value: &Value) -> Result<[u8; N], EntryError> {
        let Value::String(s) = value else {
            return Err(self.error(name, "must be a hex string"));
        };
        let digits = s.strip_prefix("0x").unwrap_or(s);
        let bytes =
            hex::decode(digits).map_err(|e| self.error(name, format!("is not hex ({e})")))?;
        <[u8; N]>::try_from(bytes.as_slice()).map_err(|_| {
            self.error(
                name,
                format!("must be exactly {N} bytes, got {}", bytes.len()),
            )
        })
    }

    fn amount(&self, withdrawal_credentials: &[u8; 32]) -> Result<u64, EntryError> {
        const NAME: &str = "amount";
        let not_integer = || {
            self.error(
                NAME,
                "must be a non-negative whole number of gwei below 2^64",
            )
        };
        let gwei = match self.present(NAME) {
            None => return Err(self.error(NAME, "is missing")),
            Some(Value::Number(n)) => n.as_u64().ok_or_else(not_integer)?,
            Some(Value::String(s)) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => {
                s.parse::<u64>().map_err(|_| not_integer())?
            }
            Some(_) => return Err(not_integer()),
        };
        let _ = withdrawal_credentials;
        Ok(gwei)
    }
}

/// The maximum effective balance a validator with these withdrawal credentials can have:
/// [`MAX_EFFECTIVE_BALANCE_0X02_GWEI`] for compounding (`0x02`) credentials,
/// [`MAX_EFFECTIVE_BALANCE_0X01_GWEI`] for every other prefix.
pub fn max_effective_balance_gwei(withdrawal_credentials: &[u8; 32]) -> u64 {
    if withdrawal_credentials[0] == 0x02 {
        MAX_EFFECTIVE_BALANCE_0X02_GWEI
    } else {
        MAX_EFFECTIVE_BALANCE_0X01_GWEI
    }
}

/// `N` bytes of `b` from `at`, or `None` if `b` is too short.
fn take<const N: usize>(b: &[u8], at: usize) -> Option<[u8; N]> {
    b.get(at..at.checked_add(N)?)?.try_into().ok()
}

/// Writes `src` into `out` at `at`; a no-op where it would not fit (the layout constants
/// guarantee it always fits).
fn put(out: &mut [u8], at: usize, src: &[u8]) {
    if let Some(dst) = at
        .checked_add(src.len())
        .and_then(|end| out.get_mut(at..end))
    {
        dst.copy_from_slice(src);
    }
}

/// An optional packed field: `Some(Some(bytes))` if its flag is set, `Some(None)` if not and
/// the bytes are zero, `None` (not canonical) otherwise.
fn optional_field<const N: usize>(given: bool, bytes: [u8; N]) -> Option<Option<[u8; N]>> {
    if given {
        Some(Some(bytes))
    } else if bytes == [0; N] {
        Some(None)
    } else {
        None
    }
}

impl DepositEntry {
    /// Writes the packed form: `pubkey 48 | withdrawal_credentials 32 | amount u64 big-endian 8
    /// | signature 96 | deposit_message_root 32 | deposit_data_root 32 | flags 1 | fork_version 4
    /// | zero pad 3`. Flag bit 0 marks a given message root, bit 1 a given fork version; an
    /// absent field is written as zeros.
    pub fn encode(&self, out: &mut [u8; DEPOSIT_ENTRY_BYTES]) {
        *out = [0u8; DEPOSIT_ENTRY_BYTES];
        put(out, PUBKEY_AT, &self.pubkey);
        put(out, WC_AT, &self.withdrawal_credentials);
        put(out, AMOUNT_AT, &self.amount_gwei.to_be_bytes());
        put(out, SIGNATURE_AT, &self.signature);
        let mut flags = 0u8;
        if let Some(root) = &self.deposit_message_root {
            flags |= FLAG_MESSAGE_ROOT;
            put(out, MESSAGE_ROOT_AT, root);
        }
        put(out, DATA_ROOT_AT, &self.deposit_data_root);
        if let Some(fork) = &self.fork_version {
            flags |= FLAG_FORK_VERSION;
            put(out, FORK_AT, fork);
        }
        put(out, FLAGS_AT, &[flags]);
    }

    /// The inverse of [`encode`](Self::encode). `None` unless `b` is exactly
    /// [`DEPOSIT_ENTRY_BYTES`] long with zero padding, no unknown flag bits, and zeros in the
    /// place of each absent optional field.
    pub fn decode(b: &[u8]) -> Option<DepositEntry> {
        if b.len() != DEPOSIT_ENTRY_BYTES {
            return None;
        }
        let [flags] = take::<1>(b, FLAGS_AT)?;
        if flags & !(FLAG_MESSAGE_ROOT | FLAG_FORK_VERSION) != 0 || take::<3>(b, PAD_AT)? != [0; 3]
        {
            return None;
        }
        let message_root = take::<32>(b, MESSAGE_ROOT_AT)?;
        let fork = take::<4>(b, FORK_AT)?;
        let deposit_message_root = optional_field(flags & FLAG_MESSAGE_ROOT != 0, message_root)?;
        let fork_version = optional_field(flags & FLAG_FORK_VERSION != 0, fork)?;
        Some(DepositEntry {
            pubkey: take(b, PUBKEY_AT)?,
            withdrawal_credentials: take(b, WC_AT)?,
            amount_gwei: u64::from_be_bytes(take(b, AMOUNT_AT)?),
            signature: take(b, SIGNATURE_AT)?,
            deposit_message_root,
            deposit_data_root: take(b, DATA_ROOT_AT)?,
            fork_version,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PK: &str = "88b6b3a9b391fa5593e8bce8d06102df1a56248368086929709fbb4a8570dc6a560febeef8159b19789e9c1fd13572f0";
    const WC: &str = "0100000000000000000000000f51bb10119727a7e5ea3538074fb341f56b09ad";
    const SIG: &str = "95db3dcba68c61c0a934e1cb36bb093867d92fc5c62f2c9f45fbacef290bb491fa0589cf356680f61a7b0ba06b7e776311eb0e96841f053c05f7ee41d32731001f9def95078b2e8d293e1b6d38d1d231245def298c480861beee891a3b314743";
    const DMR: &str = "62967565d11471da4af7769911926cd1826124048036b25616216f99bc320f13";
    const DDR: &str = "8224b6bcce0d2c0b34cca87ecb0bb0ff1e2c865ac6c5d6c0c3e5cd17affe45ad";

    fn object(amount: Value) -> Value {
        serde_json::json!({
            "pubkey": PK,
            "withdrawal_credentials": WC,
            "amount": amount,
            "signature": SIG,
            "deposit_message_root": DMR,
            "deposit_data_root": DDR,
            "fork_version": "10000910",
            "network_name": "hoodi",
            "deposit_cli_version": "1.3.1"
        })
    }

    fn parse_list(items: Vec<Value>) -> Result<Vec<DepositEntry>, EntryError> {
        parse_entries(&Value::Array(items).to_string())
    }

    fn field_error(items: Vec<Value>) -> EntryError {
        parse_list(items).expect_err("parse must fail")
    }

    fn sample() -> DepositEntry {
        parse_list(vec![object(32_000_000_000u64.into())]).unwrap()[0]
    }

    #[test]
    fn parses_the_cli_format() {
        let e = sample();
        assert_eq!(hex::encode(e.pubkey), PK);
        assert_eq!(hex::encode(e.withdrawal_credentials), WC);
        assert_eq!(e.amount_gwei, 32_000_000_000);
        assert_eq!(hex::encode(e.signature), SIG);
        assert_eq!(
            e.deposit_message_root.map(hex::encode).as_deref(),
            Some(DMR)
        );
        assert_eq!(hex::encode(e.deposit_data_root), DDR);
        assert_eq!(e.fork_version, Some([0x10, 0x00, 0x09, 0x10]));
    }

    #[test]
    fn accepts_0x_prefixes_string_amounts_and_absent_optionals() {
        let mut obj = object("32000000000".into());
        obj["pubkey"] = format!("0x{PK}").into();
        obj["signature"] = format!("0x{}", SIG.to_uppercase()).into();
        obj.as_object_mut().unwrap().remove("deposit_message_root");
        obj["fork_version"] = Value::Null;
        let e = parse_list(vec![obj]).unwrap()[0];
        assert_eq!(e.amount_gwei, 32_000_000_000);
        assert_eq!(hex::encode(e.pubkey), PK);
        assert_eq!(hex::encode(e.signature), SIG);
        assert_eq!(e.deposit_message_root, None);
        assert_eq!(e.fork_version, None);
    }

    #[test]
    fn list_shape_errors_name_the_list() {
        for json in ["{}", "[]", "not json", "null"] {
            let err = parse_entries(json).unwrap_err();
            assert_eq!(err.field, "deposits", "{json}");
        }
        let too_many = vec![object(32_000_000_000u64.into()); MAX_DEPOSITS_PER_INTENT + 1];
        let err = field_error(too_many);
        assert_eq!(err.field, "deposits");
        assert!(err.message.contains("at most 12"), "{err}");
        let max = vec![object(32_000_000_000u64.into()); MAX_DEPOSITS_PER_INTENT];
        assert_eq!(parse_list(max).unwrap().len(), MAX_DEPOSITS_PER_INTENT);
    }

    #[test]
    fn field_errors_name_the_field_and_index() {
        let good = object(32_000_000_000u64.into());
        let cases: Vec<(&str, Value, &str)> = vec![
            ("pubkey", PK[2..].into(), "exactly 48 bytes"),
            ("pubkey", "zz".into(), "not hex"),
            ("pubkey", 5.into(), "hex string"),
            (
                "withdrawal_credentials",
                format!("{WC}00").into(),
                "exactly 32 bytes",
            ),
            ("signature", Value::Null, "missing"),
            ("deposit_data_root", DDR[..62].into(), "exactly 32 bytes"),
            ("deposit_message_root", "0x1234".into(), "exactly 32 bytes"),
            ("fork_version", "0x100009".into(), "exactly 4 bytes"),
            ("amount", (-1).into(), "whole number"),
            ("amount", 3.2e10.into(), "whole number"),
            ("amount", "32 ETH".into(), "whole number"),
            ("amount", "18446744073709551616".into(), "whole number"),
        ];
        for (name, value, needle) in cases {
            let mut bad = good.clone();
            bad[name] = value;
            let err = field_error(vec![good.clone(), bad]);
            assert_eq!(err.field, format!("deposits[1].{name}"), "{err}");
            assert!(err.message.contains(needle), "{err}");
            assert!(
                err.to_string()
                    .starts_with(&format!("deposits[1].{name}: "))
            );
        }
        let mut missing = good.clone();
        missing.as_object_mut().unwrap().remove("deposit_data_root");
        assert_eq!(
            field_error(vec![missing]).field,
            "deposits[0].deposit_data_root"
        );
        assert_eq!(field_error(vec![good, 7.into()]).field, "deposits[1]");
    }

    #[test]
    fn compounding_credentials_allow_up_to_2048_eth() {
        let mut obj = object(MAX_EFFECTIVE_BALANCE_0X02_GWEI.into());
        obj["withdrawal_credentials"] = format!("02{}", &WC[2..]).into();
        assert_eq!(
            parse_list(vec![obj.clone()]).unwrap()[0].amount_gwei,
            MAX_EFFECTIVE_BALANCE_0X02_GWEI
        );
        // Bounds are policy's: parsing keeps an amount above them as it is.
        obj["amount"] = (MAX_EFFECTIVE_BALANCE_0X02_GWEI + 1).into();
        assert_eq!(
            parse_list(vec![obj]).unwrap()[0].amount_gwei,
            MAX_EFFECTIVE_BALANCE_0X02_GWEI + 1
        );
    }

    #[test]
    fn encode_decode_round_trip() {
        let full = sample();
        let mut partial = full;
        partial.deposit_message_root = None;
        let mut fork_only = full;
        fork_only.fork_version = None;
        for e in [full, partial, fork_only] {
            let mut buf = [0u8; DEPOSIT_ENTRY_BYTES];
            e.encode(&mut buf);
            assert_eq!(DepositEntry::decode(&buf), Some(e));
        }
    }

    #[test]
    fn packed_layout() {
        let e = sample();
        let mut buf = [0xaau8; DEPOSIT_ENTRY_BYTES];
        e.encode(&mut buf);
        assert_eq!(&buf[..48], &e.pubkey);
        assert_eq!(&buf[48..80], &e.withdrawal_credentials);
        assert_eq!(&buf[80..88], &32_000_000_000u64.to_be_bytes());
        assert_eq!(&buf[88..184], &e.signature);
        assert_eq!(&buf[184..216], &e.deposit_message_root.unwrap());
        assert_eq!(&buf[216..248], &e.deposit_data_root);
        assert_eq!(buf[248], 0b11);
        assert_eq!(&buf[249..253], &[0x10, 0x00, 0x09, 0x10]);
        assert_eq!(&buf[253..], &[0, 0, 0]);
    }

    #[test]
    fn decode_rejects_non_canonical_bytes() {
        let mut buf = [0u8; DEPOSIT_ENTRY_BYTES];
        sample().encode(&mut buf);
        assert!(DepositEntry::decode(&buf[..255]).is_none());
        assert!(DepositEntry::decode(&[buf.as_slice(), &[0]].concat()).is_none());
        assert!(DepositEntry::decode(&[]).is_none());
        for (at, value) in [(253, 1), (255, 1), (248, 0b111), (248, 0x80)] {
            let mut bad = buf;
            bad[at] = value;
            assert!(DepositEntry::decode(&bad).is_none(), "byte {at} = {value}");
        }
        // A flag cleared while its field still holds bytes is not canonical.
        for flags in [0b10, 0b01] {
            let mut bad = buf;
            bad[248] = flags;
            assert!(DepositEntry::decode(&bad).is_none(), "flags {flags:#b}");
        }
    }
}
