//! API tokens: made for a principal, kept only as SHA-256, revocable, with an optional expiry.
//! A token is `ketch_<id>_<secret>`: the id names it in listings and revocations, the secret
//! (256 random bits) is what proves it.

use std::collections::BTreeMap;

use sha2::{Digest, Sha256};

use ketch_protocol::messages::TokenInfo;

/// Prefix of every token, so secret scanners and people recognise one.
pub const TOKEN_PREFIX: &str = "ketch_";
const ID_BYTES: usize = 8;
const SECRET_BYTES: usize = 32;

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TokenRecord {
    pub id: String,
    pub principal: String,
    /// SHA-256 of the whole token, hex.
    pub sha256: String,
    pub created_at_ms: i64,
    pub expires_at_ms: Option<i64>,
    pub revoked_at_ms: Option<i64>,
}

impl TokenRecord {
    pub fn info(&self) -> TokenInfo {
        TokenInfo {
            id: self.id.clone(),
            principal: self.principal.clone(),
            created_at_ms: self.created_at_ms,
            expires_at_ms: self.expires_at_ms.unwrap_or(-1),
            revoked_at_ms: self.revoked_at_ms.unwrap_or(-1),
        }
    }

    /// Why this token does not authenticate at `now_ms`, if it does not.
    pub fn refusal(&self, now_ms: i64) -> Option<String> {
        if self.revoked_at_ms.is_some() {
            return Some(format!("token {} was revoked", self.id));
        }
        match self.expires_at_ms {
            Some(at) if now_ms >= at => Some(format!("token {} expired", self.id)),
            _ => None,
        }
    }
}

/// The tokens, by id.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Tokens {
    pub tokens: BTreeMap<String, TokenRecord>,
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn random_hex(len: usize) -> String {
    use ring::rand::SecureRandom;
    let mut bytes = vec![0u8; len];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .expect("the system random source works");
    hex(&bytes)
}

/// The id a token names, if it has the token's shape.
pub fn token_id(token: &str) -> Option<&str> {
    let rest = token.strip_prefix(TOKEN_PREFIX)?;
    let (id, secret) = rest.split_once('_')?;
    (id.len() == ID_BYTES * 2 && secret.len() == SECRET_BYTES * 2).then_some(id)
}

impl Tokens {
    /// A new token for `principal`: its record (to store) and the token (to hand out once).
    pub fn make(principal: &str, now_ms: i64, expires_at_ms: Option<i64>) -> (TokenRecord, String) {
        let id = random_hex(ID_BYTES);
        let token = format!("{TOKEN_PREFIX}{id}_{}", random_hex(SECRET_BYTES));
        let record = TokenRecord {
            id,
            principal: principal.to_owned(),
            sha256: sha256_hex(token.as_bytes()),
            created_at_ms: now_ms,
            expires_at_ms,
            revoked_at_ms: None,
        };
        (record, token)
    }

    /// The record a presented token proves, whatever its state (the caller checks
    /// [`TokenRecord::refusal`]).
    pub fn find(&self, token: &str) -> Option<&TokenRecord> {
        let record = self.tokens.get(token_id(token)?)?;
        // Digests of equal length: comparing them leaks nothing useful about the secret.
        (record.sha256 == sha256_hex(token.as_bytes())).then_some(record)
    }

    /// The id of the token named by itself or by its id.
    pub fn resolve(&self, token_or_id: &str) -> Option<String> {
        if let Some(record) = self.find(token_or_id) {
            return Some(record.id.clone());
        }
        self.tokens
            .contains_key(token_or_id)
            .then(|| token_or_id.to_owned())
    }

    pub fn is_valid(&self, id: &str, now_ms: i64) -> Result<&TokenRecord, String> {
        let record = self
            .tokens
            .get(id)
            .ok_or_else(|| format!("token {id} no longer exists"))?;
        match record.refusal(now_ms) {
            Some(why) => Err(why),
            None => Ok(record),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_prove_themselves_until_revoked_or_expired() {
        let mut tokens = Tokens::default();
        let (record, token) = Tokens::make("alice", 1_000, Some(5_000));
        assert!(token.starts_with("ketch_"));
        assert_eq!(token_id(&token), Some(record.id.as_str()));
        assert!(
            !serde_json::to_string(&record)
                .unwrap()
                .contains(&token[15..]),
            "secret stored"
        );
        tokens.tokens.insert(record.id.clone(), record.clone());
        let found = tokens.find(&token).expect("found");
        assert_eq!(found.principal, "alice");
        assert_eq!(found.refusal(4_999), None);
        assert!(found.refusal(5_000).unwrap().contains("expired"));
        // A token with the right id and a wrong secret proves nothing.
        let forged = format!("ketch_{}_{}", record.id, "0".repeat(64));
        assert!(tokens.find(&forged).is_none());
        assert!(tokens.find("ketch_short_x").is_none());
        assert!(tokens.find("").is_none());
        assert_eq!(tokens.resolve(&token), Some(record.id.clone()));
        assert_eq!(tokens.resolve(&record.id), Some(record.id.clone()));
        assert_eq!(tokens.resolve("nope"), None);
        tokens.tokens.get_mut(&record.id).unwrap().revoked_at_ms = Some(2_000);
        assert!(
            tokens
                .is_valid(&record.id, 2_001)
                .unwrap_err()
                .contains("revoked")
        );
        assert!(
            tokens
                .is_valid("gone", 0)
                .unwrap_err()
                .contains("no longer exists")
        );
    }
}
