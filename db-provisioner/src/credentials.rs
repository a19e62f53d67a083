//! Passwords: generated once from the OS CSPRNG, and turned into what each server stores so
//! that the cleartext never travels to PostgreSQL or Redis.

use hearth_runtime::Sensitive;
use sha2::{Digest, Sha256};

use crate::Error;

/// 40 characters from 62: about 238 bits.
pub const PASSWORD_LEN: usize = 40;
const ALPHABET: &[u8; 62] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";

/// A new alphanumeric password. Alphanumeric only, so no URI, DSN or shell quoting can break it.
pub fn generate_password() -> Result<Sensitive<String>, Error> {
    let mut password = String::with_capacity(PASSWORD_LEN);
    let mut bytes = [0_u8; 64];
    while password.len() < PASSWORD_LEN {
        getrandom::fill(&mut bytes).map_err(|e| Error::Random(e.to_string()))?;
        // Rejection sampling: 248 = 4 × 62, so every kept byte maps uniformly.
        for byte in bytes.iter().filter(|b| **b < 248) {
            if password.len() == PASSWORD_LEN {
                break;
            }
            password.push(char::from(ALPHABET[usize::from(*byte % 62)]));
        }
    }
    Ok(Sensitive::new(password))
}

/// The SCRAM-SHA-256 verifier PostgreSQL stores as-is (random salt, 4096 iterations).
pub fn scram_verifier(password: &Sensitive<String>) -> Sensitive<String> {
    Sensitive::new(postgres_protocol::password::scram_sha_256(
        password.expose().as_bytes(),
    ))
}

/// The `#<sha256 hex>` form `ACL SETUSER` accepts instead of a cleartext password.
pub fn redis_password_hash(password: &Sensitive<String>) -> Sensitive<String> {
    let digest = Sha256::digest(password.expose().as_bytes());
    Sensitive::new(format!("#{}", hex::encode(digest)))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    #[test]
    fn passwords_are_long_alphanumeric_and_differ() {
        let passwords: BTreeSet<String> = (0..100)
            .map(|_| generate_password().unwrap().expose().clone())
            .collect();
        assert_eq!(passwords.len(), 100);
        for password in &passwords {
            assert_eq!(password.len(), PASSWORD_LEN);
            assert!(password.bytes().all(|b| b.is_ascii_alphanumeric()));
        }
    }

    #[test]
    fn verifiers_hide_the_password() {
        let password = Sensitive::new("correcthorsebatterystaple".to_owned());
        let scram = scram_verifier(&password);
        assert!(scram.expose().starts_with("SCRAM-SHA-256$4096:"));
        assert!(!scram.expose().contains("correcthorse"));
        let hash = redis_password_hash(&password);
        assert_eq!(hash.expose().len(), 65);
        assert!(hash.expose().starts_with('#'));
    }
}
