//! Travel-rule data (FATF recommendation 16) as a desk attaches it to an intent: the
//! subset of the IVMS101 data model a desk can fill, validated when the frame is decoded.
//!
//! Only a summary travels through the rings ([`TravelInfo`]): that data was given, a key
//! of the beneficiary VASP, and the keccak256 of the canonical JSON of the data. The hash
//! is the evidence the audit trail records; the data itself stays with the desk's records.

use alloy_primitives::keccak256;
use serde::{Deserialize, Serialize};

use crate::msg::TravelInfo;

/// IVMS101 person type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PersonType {
    /// `NaturalPerson`.
    Natural,
    /// `LegalPerson`.
    Legal,
}

/// An originator or beneficiary (IVMS101 subset; names follow its fields in snake case).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Person {
    /// Natural or legal person.
    #[serde(rename = "type")]
    pub kind: PersonType,
    /// `primaryIdentifier`: surname, or the legal person's name.
    pub primary_identifier: String,
    /// `secondaryIdentifier`: given names (natural persons).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secondary_identifier: Option<String>,
    /// `accountNumber`: the wallet address or the account at the VASP.
    pub account_number: String,
    /// `countryOfResidence` (natural) or `countryOfRegistration` (legal), ISO 3166-1 alpha-2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub country: Option<String>,
    /// `dateOfBirth`, `YYYY-MM-DD` (natural persons).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub date_of_birth: Option<String>,
    /// `nationalIdentifier` (a national id, or an LEI for legal persons).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub national_identifier: Option<String>,
}

/// The `travel_rule` object of an intent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TravelRuleData {
    /// The customer sending.
    pub originator: Person,
    /// The customer receiving.
    pub beneficiary: Person,
    /// The beneficiary's VASP (LEI or registered name); absent for a self-hosted wallet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub beneficiary_vasp: Option<String>,
}

fn text(field: &'static str, s: &str, max: usize) -> Result<(), (&'static str, String)> {
    if s.trim().is_empty() {
        return Err((field, "must not be empty".into()));
    }
    if s.len() > max {
        return Err((field, format!("longer than {max} bytes")));
    }
    Ok(())
}

impl Person {
    fn validate(&self, originator: bool) -> Result<(), (&'static str, String)> {
        let (pi, an, co, dob) = if originator {
            (
                "intent.travel_rule.originator.primary_identifier",
                "intent.travel_rule.originator.account_number",
                "intent.travel_rule.originator.country",
                "intent.travel_rule.originator.date_of_birth",
            )
        } else {
            (
                "intent.travel_rule.beneficiary.primary_identifier",
                "intent.travel_rule.beneficiary.account_number",
                "intent.travel_rule.beneficiary.country",
                "intent.travel_rule.beneficiary.date_of_birth",
            )
        };
        text(pi, &self.primary_identifier, 140)?;
        text(an, &self.account_number, 100)?;
        if let Some(c) = &self.country
            && (c.len() != 2 || !c.bytes().all(|b| b.is_ascii_uppercase()))
        {
            return Err((
                co,
                "must be an ISO 3166-1 alpha-2 code such as \"CH\"".into(),
            ));
        }
        if let Some(d) = &self.date_of_birth
            && chrono::NaiveDate::parse_from_str(d, "%Y-%m-%d").is_err()
        {
            return Err((dob, "must be a date YYYY-MM-DD".into()));
        }
        // FATF R.16: the originator's name and account, plus an address, a national
        // identifier or a date of birth (here: country, national identifier or birth date).
        if originator
            && self.country.is_none()
            && self.national_identifier.is_none()
            && self.date_of_birth.is_none()
        {
            return Err((
                "intent.travel_rule.originator",
                "needs country, national_identifier or date_of_birth".into(),
            ));
        }
        Ok(())
    }
}

impl TravelRuleData {
    /// Checks what the types cannot; the error names the field.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        self.originator.validate(true)?;
        self.beneficiary.validate(false)?;
        if let Some(v) = &self.beneficiary_vasp {
            text("intent.travel_rule.beneficiary_vasp", v, 140)?;
        }
        Ok(())
    }

    /// The summary that travels with the intent.
    pub fn summary(&self) -> TravelInfo {
        let canonical = serde_json::to_vec(self).unwrap_or_default();
        TravelInfo {
            present: true,
            vasp_key: self.beneficiary_vasp.as_deref().map_or(0, vasp_key),
            hash: keccak256(&canonical),
        }
    }
}

/// Key of a VASP identifier: case and surrounding space do not matter; never 0.
pub fn vasp_key(id: &str) -> u64 {
    let norm = id.trim().to_ascii_lowercase();
    let h = keccak256(norm.as_bytes());
    let k = u64::from_be_bytes(h[..8].try_into().unwrap_or([0; 8]));
    k.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data() -> TravelRuleData {
        serde_json::from_value(serde_json::json!({
            "originator": {"type": "legal", "primary_identifier": "Example Fund Ltd",
                           "account_number": "treasury-1", "country": "CH"},
            "beneficiary": {"type": "natural", "primary_identifier": "Doe",
                            "secondary_identifier": "Jane", "account_number": "0xabc"},
            "beneficiary_vasp": "LEI:5493001KJTIIGC8Y1R12"
        }))
        .unwrap()
    }

    #[test]
    fn summary_is_stable_and_vasp_key_normalises() {
        let d = data();
        d.validate().unwrap();
        let s = d.summary();
        assert!(s.present);
        assert_eq!(s, d.clone().summary());
        assert_eq!(s.vasp_key, vasp_key("  lei:5493001kjtiigc8y1r12 "));
        let mut other = d.clone();
        other.beneficiary.primary_identifier = "Roe".into();
        assert_ne!(other.summary().hash, s.hash);
    }

    #[test]
    fn missing_pieces_are_named() {
        let mut d = data();
        d.originator.country = None;
        assert_eq!(d.validate().unwrap_err().0, "intent.travel_rule.originator");
        let mut d = data();
        d.beneficiary.account_number = " ".into();
        assert_eq!(
            d.validate().unwrap_err().0,
            "intent.travel_rule.beneficiary.account_number"
        );
        let mut d = data();
        d.originator.country = Some("Switzerland".into());
        assert_eq!(
            d.validate().unwrap_err().0,
            "intent.travel_rule.originator.country"
        );
    }
}
