//! Desk authentication: HS256 JWT bearer tokens on the WebSocket upgrade.

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

/// Issues and verifies HS256 tokens with one shared secret.
pub struct JwtAuth {
    enc: EncodingKey,
    dec: DecodingKey,
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
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 5;
        validation.set_required_spec_claims(&["exp", "sub"]);
        Self {
            enc: EncodingKey::from_secret(secret),
            dec: DecodingKey::from_secret(secret),
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
        let data = jsonwebtoken::decode::<Claims>(token, &self.dec, &self.validation).map_err(
            |e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => AuthError::Expired,
                k => AuthError::Invalid(format!("{k:?}")),
            },
        )?;
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
        };
        let old = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &a.enc).unwrap();
        assert_eq!(a.verify(&old), Err(AuthError::Expired));

        // Algorithm pinned: an HS384 token with the same secret is refused.
        let claims = Claims {
            sub: "eve".into(),
            roles: vec![],
            exp: unix_secs() + 60,
            iat: None,
        };
        let other = jsonwebtoken::encode(&Header::new(Algorithm::HS384), &claims, &a.enc).unwrap();
        assert!(matches!(a.verify(&other), Err(AuthError::Invalid(_))));

        let bad_role = Claims {
            sub: "x".into(),
            roles: vec!["root".into()],
            exp: unix_secs() + 60,
            iat: None,
        };
        let t = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &bad_role, &a.enc).unwrap();
        assert_eq!(a.verify(&t), Err(AuthError::UnknownRole("root".into())));
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
