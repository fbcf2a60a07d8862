//! Desk authentication: HS256 JWT bearer tokens on the WebSocket upgrade.
//!
//! Invariants: the algorithm is pinned to HS256 (a token naming any other, `none`
//! included, is refused before its signature is looked at); `exp` is required and `nbf`,
//! when present, enforced (5 s leeway); tokens are issued with the current secret and
//! verified against it and any previous secrets still configured (rotation with two valid
//! keys at once). No error message carries a token or a secret.

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// A role of the desk protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Role {
    /// May submit intents.
    Trader = 1,
    /// May approve other principals' intents.
    Approver = 2,
    /// May use the kill switch.
    Admin = 4,
    /// May read state.
    Auditor = 8,
}

impl Role {
    /// All roles.
    pub const ALL: [Role; 4] = [Role::Trader, Role::Approver, Role::Admin, Role::Auditor];

    /// Protocol name.
    pub const fn as_str(self) -> &'static str {
        match self {
            Role::Trader => "trader",
            Role::Approver => "approver",
            Role::Admin => "admin",
            Role::Auditor => "auditor",
        }
    }

    /// Parses a protocol name.
    pub fn parse(s: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

/// A set of roles.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Roles(u8);

impl Roles {
    /// Whether the set holds `r`.
    pub fn has(self, r: Role) -> bool {
        self.0 & r as u8 != 0
    }
    /// Adds `r`.
    pub fn with(self, r: Role) -> Roles {
        Roles(self.0 | r as u8)
    }
    /// Every role.
    pub fn all() -> Roles {
        Role::ALL.into_iter().fold(Roles::default(), Roles::with)
    }
    /// Role names.
    pub fn names(self) -> Vec<&'static str> {
        Role::ALL
            .into_iter()
            .filter(|r| self.has(*r))
            .map(Role::as_str)
            .collect()
    }
}

/// An authenticated desk principal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    /// `sub` claim.
    pub sub: String,
    /// Granted roles.
    pub roles: Roles,
}

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: String,
    roles: Vec<String>,
    exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    iat: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    nbf: Option<u64>,
}

/// Why a token was refused. The message never includes the token or the secret.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    /// No `Authorization` header.
    #[error("missing Authorization header (expected `Bearer <JWT>`)")]
    Missing,
    /// Header present but not `Bearer …`.
    #[error("Authorization header is not a Bearer token")]
    NotBearer,
    /// `exp` is in the past.
    #[error("token expired")]
    Expired,
    /// `nbf` is in the future.
    #[error("token not valid yet (nbf is in the future)")]
    NotYetValid,
    /// Signature, algorithm or structure is wrong.
    #[error("token rejected: {0}")]
    Invalid(String),
    /// A role outside the protocol's set.
    #[error("token carries unknown role `{0}`")]
    UnknownRole(String),
    /// The `sub` claim is empty.
    #[error("token has an empty sub")]
    EmptySubject,
}

/// Issues HS256 tokens with the current secret and verifies them against it and any
/// previous secrets.
pub struct JwtAuth {
    enc: EncodingKey,
    /// The current secret first, then the previous ones.
    dec: Vec<DecodingKey>,
    validation: Validation,
}

impl std::fmt::Debug for JwtAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtAuth").finish_non_exhaustive()
    }
}

impl JwtAuth {
    /// A verifier/issuer for `secret`. The algorithm is pinned to HS256.
    pub fn new(secret: &[u8]) -> Self {
        Self::with_previous(secret, &[])
    }

    /// Issues with `secret`; verifies with it and with each of `previous` (rotation).
    pub fn with_previous(secret: &[u8], previous: &[&[u8]]) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 5;
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp", "sub"]);
        let mut dec = vec![DecodingKey::from_secret(secret)];
        dec.extend(previous.iter().map(|p| DecodingKey::from_secret(p)));
        Self {
            enc: EncodingKey::from_secret(secret),
            dec,
            validation,
        }
    }

    /// Issues a token for `sub` with `roles`, valid for `ttl_secs`.
    pub fn issue(&self, sub: &str, roles: Roles, ttl_secs: u64) -> String {
        let now = unix_secs();
        let claims = Claims {
            sub: sub.to_owned(),
            roles: roles.names().into_iter().map(str::to_owned).collect(),
            exp: now + ttl_secs,
            iat: Some(now),
            nbf: None,
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.enc).unwrap_or_default()
    }

    /// Verifies the value of an `Authorization` header.
    pub fn verify_header(&self, header: Option<&str>) -> Result<Principal, AuthError> {
        let h = header.ok_or(AuthError::Missing)?;
        let token = h
            .strip_prefix("Bearer ")
            .or_else(|| h.strip_prefix("bearer "))
            .ok_or(AuthError::NotBearer)?;
        self.verify(token.trim())
    }

    /// Verifies a bare token.
    pub fn verify(&self, token: &str) -> Result<Principal, AuthError> {
        use jsonwebtoken::errors::ErrorKind;
        let mut last = AuthError::Invalid("no verification key".into());
        let mut decoded = None;
        for key in &self.dec {
            match jsonwebtoken::decode::<Claims>(token, key, &self.validation) {
                Ok(d) => {
                    decoded = Some(d);
                    break;
                }
                // Only a wrong signature is worth trying the next key for.
                Err(e) if matches!(e.kind(), ErrorKind::InvalidSignature) => {
                    last = AuthError::Invalid("InvalidSignature".into());
                }
                Err(e) => {
                    return Err(match e.kind() {
                        ErrorKind::ExpiredSignature => AuthError::Expired,
                        ErrorKind::ImmatureSignature => AuthError::NotYetValid,
                        k => AuthError::Invalid(format!("{k:?}")),
                    });
                }
            }
        }
        let data = decoded.ok_or(last)?;
        if data.claims.sub.is_empty() {
            return Err(AuthError::EmptySubject);
        }
        let mut roles = Roles::default();
        for r in &data.claims.roles {
            roles = roles.with(Role::parse(r).ok_or_else(|| AuthError::UnknownRole(r.clone()))?);
        }
        Ok(Principal {
            sub: data.claims.sub,
            roles,
        })
    }
}

fn unix_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Parses a comma-separated role list (`trader,approver`).
pub fn parse_roles(list: &str) -> Result<Roles, AuthError> {
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .try_fold(Roles::default(), |acc, r| {
            Role::parse(r)
                .map(|r| acc.with(r))
                .ok_or_else(|| AuthError::UnknownRole(r.to_owned()))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_refusals() {
        let a = JwtAuth::new(b"secret-a");
        let t = a.issue("alice", Roles::default().with(Role::Trader), 60);
        let p = a.verify_header(Some(&format!("Bearer {t}"))).unwrap();
        assert_eq!(p.sub, "alice");
        assert!(p.roles.has(Role::Trader) && !p.roles.has(Role::Admin));

        let b = JwtAuth::new(b"secret-b");
        assert!(matches!(b.verify(&t), Err(AuthError::Invalid(_))));
        assert_eq!(a.verify_header(None), Err(AuthError::Missing));
        assert_eq!(
            a.verify_header(Some("Basic abc")),
            Err(AuthError::NotBearer)
        );

        // Expired beyond the leeway.
        let claims = Claims {
            sub: "bob".into(),
            roles: vec!["trader".into()],
            exp: unix_secs() - 120,
            iat: None,
            nbf: None,
        };
        let old = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &a.enc).unwrap();
        assert_eq!(a.verify(&old), Err(AuthError::Expired));

        // Algorithm pinned: an HS384 token with the same secret is refused.
        let claims = Claims {
            sub: "eve".into(),
            roles: vec![],
            exp: unix_secs() + 60,
            iat: None,
            nbf: None,
        };
        let other = jsonwebtoken::encode(&Header::new(Algorithm::HS384), &claims, &a.enc).unwrap();
        assert!(matches!(a.verify(&other), Err(AuthError::Invalid(_))));

        let bad_role = Claims {
            sub: "x".into(),
            roles: vec!["root".into()],
            exp: unix_secs() + 60,
            iat: None,
            nbf: None,
        };
        let t = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &bad_role, &a.enc).unwrap();
        assert_eq!(a.verify(&t), Err(AuthError::UnknownRole("root".into())));
    }

    #[test]
    fn not_before_rotation_and_no_algorithm_but_hs256() {
        let a = JwtAuth::new(b"secret-a-0123456789");
        let claims = |nbf: Option<u64>| Claims {
            sub: "carol".into(),
            roles: vec!["trader".into()],
            exp: unix_secs() + 600,
            iat: None,
            nbf,
        };
        let sign = |c: &Claims, key: &[u8]| {
            jsonwebtoken::encode(
                &Header::new(Algorithm::HS256),
                c,
                &EncodingKey::from_secret(key),
            )
            .unwrap()
        };
        // nbf in the future (beyond the leeway) refused; in the past accepted.
        let early = sign(&claims(Some(unix_secs() + 300)), b"secret-a-0123456789");
        assert_eq!(a.verify(&early), Err(AuthError::NotYetValid));
        let ok = sign(&claims(Some(unix_secs() - 10)), b"secret-a-0123456789");
        assert_eq!(a.verify(&ok).unwrap().sub, "carol");

        // Rotation: the new secret issues, both verify; a third secret does not.
        let old_token = sign(&claims(None), b"secret-a-0123456789");
        let rotated = JwtAuth::with_previous(b"secret-b-0123456789", &[b"secret-a-0123456789"]);
        assert_eq!(rotated.verify(&old_token).unwrap().sub, "carol");
        let new_token = rotated.issue("dave", Roles::default().with(Role::Trader), 60);
        assert_eq!(rotated.verify(&new_token).unwrap().sub, "dave");
        assert!(matches!(a.verify(&new_token), Err(AuthError::Invalid(_))));
        let stranger = sign(&claims(None), b"secret-c-0123456789");
        assert!(matches!(
            rotated.verify(&stranger),
            Err(AuthError::Invalid(_))
        ));
        // An expired token is expired under any key, not "invalid".
        let mut c = claims(None);
        c.exp = unix_secs() - 120;
        assert_eq!(
            rotated.verify(&sign(&c, b"secret-a-0123456789")),
            Err(AuthError::Expired)
        );

        // `alg: none` (an unsigned token) is refused, whatever its claims.
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let head = b64.encode(br#"{"alg":"none","typ":"JWT"}"#);
        let body = b64.encode(serde_json::to_vec(&claims(None)).unwrap());
        for t in [format!("{head}.{body}."), format!("{head}.{body}")] {
            assert!(matches!(a.verify(&t), Err(AuthError::Invalid(_))), "{t}");
        }
        // Nor does an RS256 header with the HMAC secret pass (algorithm confusion).
        let head = b64.encode(br#"{"alg":"RS256","typ":"JWT"}"#);
        let forged = format!("{head}.{body}.{}", b64.encode([0u8; 32]));
        assert!(matches!(a.verify(&forged), Err(AuthError::Invalid(_))));
    }

    #[test]
    fn role_lists() {
        let r = parse_roles("trader, approver").unwrap();
        assert!(r.has(Role::Trader) && r.has(Role::Approver) && !r.has(Role::Admin));
        assert!(parse_roles("trader,god").is_err());
        assert_eq!(Roles::all().names().len(), 4);
    }
}

/// Interns principal names (`sub`) to small numbers, once per connection or policy load,
/// never per message. Number 0 is never assigned ("nobody").
#[derive(Debug, Default)]
pub struct Principals {
    inner: std::sync::Mutex<(std::collections::HashMap<String, u32>, Vec<String>)>,
}

impl Principals {
    /// The number of `sub`, assigned on first sight.
    pub fn intern(&self, sub: &str) -> u32 {
        let mut g = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(&n) = g.0.get(sub) {
            return n;
        }
        g.1.push(sub.to_owned());
        let n = g.1.len() as u32;
        g.0.insert(sub.to_owned(), n);
        n
    }

    /// The number of `sub`, if it was ever seen.
    pub fn lookup(&self, sub: &str) -> Option<u32> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .0
            .get(sub)
            .copied()
    }

    /// The name of number `n`.
    pub fn name(&self, n: u32) -> Option<String> {
        let g = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        n.checked_sub(1).and_then(|i| g.1.get(i as usize)).cloned()
    }
}
