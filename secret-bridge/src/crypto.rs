//! The Bitwarden Secrets Manager crypto secret-bridge needs, natively: the machine-account
//! access token and the key derived from it, and EncString type 2 (AES-256-CBC with an
//! HMAC-SHA256 over IV and ciphertext, checked before anything is decrypted).
//!
//! Key material lives in `Zeroizing` buffers and is wiped when dropped. Errors never carry the
//! token, a key, or any plaintext.

use std::fmt;
use std::str::FromStr;

use aes::cipher::block_padding::Pkcs7;
use aes::cipher::{BlockDecryptMut, BlockEncryptMut, KeyIvInit};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};
use hearth_runtime::Sensitive;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use zeroize::{Zeroize, Zeroizing};

type HmacSha256 = Hmac<Sha256>;
type Aes256CbcEnc = cbc::Encryptor<aes::Aes256>;
type Aes256CbcDec = cbc::Decryptor<aes::Aes256>;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CryptoError {
    #[error("the access token is malformed: {0}")]
    AccessToken(&'static str),
    #[error("the encrypted string is malformed: {0}")]
    EncString(&'static str),
    #[error("the encrypted string's MAC does not match: wrong key or tampered data")]
    Mac,
    #[error("the encrypted string does not decrypt to valid padding")]
    Padding,
    #[error("a key must be 64 bytes (encryption key and MAC key), got {0}")]
    KeyLength(usize),
    #[error("the operating system's random source failed")]
    Random,
}

/// An AES-256 encryption key and an HMAC-SHA256 key, in one heap buffer that never moves and
/// is wiped when dropped.
pub struct SymmetricKey {
    /// The encryption key, then the MAC key (Bitwarden's layout).
    bytes: Zeroizing<Box<[u8]>>,
}

impl fmt::Debug for SymmetricKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SymmetricKey([redacted])")
    }
}

/// Overwrites the stack below the caller's frame. The ciphers' key schedules and HMAC's padded
/// key are built in stack frames and moved around by value; each move leaves a copy that drop
/// never wipes. Called on the way out of every use of a key, this wipes those frames too.
#[inline(never)]
fn scrub_stack() {
    let mut frames = [0_u8; 16 * 1024];
    frames.zeroize();
    std::hint::black_box(&frames);
}

impl SymmetricKey {
    /// From 64 bytes: the encryption key, then the MAC key (Bitwarden's layout).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, CryptoError> {
        if bytes.len() != 64 {
            return Err(CryptoError::KeyLength(bytes.len()));
        }
        let mut key = Zeroizing::new(vec![0_u8; 64].into_boxed_slice());
        key.copy_from_slice(bytes);
        Ok(Self { bytes: key })
    }

    fn enc(&self) -> &[u8] {
        &self.bytes[..32]
    }

    fn mac(&self) -> &[u8] {
        &self.bytes[32..]
    }

    fn tag(&self, iv: &[u8], ciphertext: &[u8]) -> HmacSha256 {
        // HMAC takes keys of any length, so this cannot fail for 32 bytes.
        let mut tag = <HmacSha256 as Mac>::new_from_slice(self.mac())
            .unwrap_or_else(|_| unreachable!("HMAC accepts every key length"));
        tag.update(iv);
        tag.update(ciphertext);
        tag
    }

    /// Checks the MAC (in constant time) and only then decrypts.
    pub fn decrypt(&self, encrypted: &EncString) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        let decrypted = self.decrypt_in_frames_below(encrypted);
        scrub_stack();
        decrypted
    }

    #[inline(never)]
    fn decrypt_in_frames_below(
        &self,
        encrypted: &EncString,
    ) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        self.tag(&encrypted.iv, &encrypted.ciphertext)
            .verify_slice(&encrypted.mac)
            .map_err(|_| CryptoError::Mac)?;
        let decryptor = Aes256CbcDec::new(self.enc().into(), (&encrypted.iv).into());
        decryptor
            .decrypt_padded_vec_mut::<Pkcs7>(&encrypted.ciphertext)
            .map(Zeroizing::new)
            .map_err(|_| CryptoError::Padding)
    }

    /// Encrypts under a fresh random IV.
    pub fn encrypt(&self, plaintext: &[u8]) -> Result<EncString, CryptoError> {
        let encrypted = self.encrypt_in_frames_below(plaintext);
        scrub_stack();
        encrypted
    }

    #[inline(never)]
    fn encrypt_in_frames_below(&self, plaintext: &[u8]) -> Result<EncString, CryptoError> {
        let mut iv = [0_u8; 16];
        getrandom::fill(&mut iv).map_err(|_| CryptoError::Random)?;
        let encryptor = Aes256CbcEnc::new(self.enc().into(), (&iv).into());
        let ciphertext = encryptor.encrypt_padded_vec_mut::<Pkcs7>(plaintext);
        let mut mac = [0_u8; 32];
        mac.copy_from_slice(&self.tag(&iv, &ciphertext).finalize().into_bytes());
        Ok(EncString {
            iv,
            ciphertext,
            mac,
        })
    }
}

/// A machine account's access token: `0.<client id>.<client secret>:<base64 16-byte seed>`.
pub struct AccessToken {
    /// The access token's id (a UUID): the `client_id` of the identity login.
    pub id: String,
    pub client_secret: Sensitive<String>,
    /// The key derived from the seed; it decrypts the login's encrypted payload.
    pub key: SymmetricKey,
}

impl fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AccessToken")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

fn is_uuid(text: &str) -> bool {
    let groups: Vec<&str> = text.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(group, len)| group.len() == len && group.bytes().all(|b| b.is_ascii_hexdigit()))
}

impl FromStr for AccessToken {
    type Err = CryptoError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (identity, seed) = text
            .split_once(':')
            .ok_or(CryptoError::AccessToken("no ':' before the key"))?;
        let parts: Vec<&str> = identity.split('.').collect();
        let [version, id, client_secret] = parts.as_slice() else {
            return Err(CryptoError::AccessToken(
                "expected three '.'-separated parts before the ':'",
            ));
        };
        if *version != "0" {
            return Err(CryptoError::AccessToken("unsupported version (expected 0)"));
        }
        if !is_uuid(id) {
            return Err(CryptoError::AccessToken(
                "the access token id is not a UUID",
            ));
        }
        if client_secret.is_empty() {
            return Err(CryptoError::AccessToken("the client secret is empty"));
        }
        let seed = Zeroizing::new(
            STANDARD
                .decode(seed)
                .or_else(|_| STANDARD_NO_PAD.decode(seed))
                .map_err(|_| CryptoError::AccessToken("the key is not base64"))?,
        );
        if seed.len() != 16 {
            return Err(CryptoError::AccessToken("the key is not 16 bytes"));
        }
        let key = derive_access_token_key(&seed);
        scrub_stack();
        Ok(Self {
            id: id.to_ascii_lowercase(),
            client_secret: Sensitive::new((*client_secret).to_owned()),
            key: key?,
        })
    }
}

/// Bitwarden's shareable-key derivation: PRK = HMAC-SHA256("bitwarden-accesstoken", seed),
/// then HKDF-Expand-SHA256(PRK, "sm-access-token") to 64 bytes.
#[inline(never)]
fn derive_access_token_key(seed: &[u8]) -> Result<SymmetricKey, CryptoError> {
    let mut extract = <HmacSha256 as Mac>::new_from_slice(b"bitwarden-accesstoken")
        .unwrap_or_else(|_| unreachable!("HMAC accepts every key length"));
    extract.update(seed);
    let mut prk = Zeroizing::new([0_u8; 32]);
    prk.copy_from_slice(&extract.finalize().into_bytes());
    let expand = hkdf::Hkdf::<Sha256>::from_prk(prk.as_slice())
        .map_err(|_| CryptoError::AccessToken("key derivation failed"))?;
    let mut okm = Zeroizing::new([0_u8; 64]);
    expand
        .expand(b"sm-access-token", okm.as_mut_slice())
        .map_err(|_| CryptoError::AccessToken("key derivation failed"))?;
    SymmetricKey::from_bytes(okm.as_slice())
}

/// EncString type 2: `2.<b64 iv>|<b64 ciphertext>|<b64 mac>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EncString {
    iv: [u8; 16],
    ciphertext: Vec<u8>,
    mac: [u8; 32],
}

impl FromStr for EncString {
    type Err = CryptoError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (kind, rest) = text
            .split_once('.')
            .ok_or(CryptoError::EncString("no type prefix"))?;
        if kind != "2" {
            return Err(CryptoError::EncString(
                "only type 2 (AES-256-CBC-HMAC-SHA256) is supported",
            ));
        }
        let parts: Vec<&str> = rest.split('|').collect();
        let [iv, ciphertext, mac] = parts.as_slice() else {
            return Err(CryptoError::EncString("expected iv|ciphertext|mac"));
        };
        let decode = |part: &str, what: &'static str| {
            STANDARD
                .decode(part)
                .map_err(|_| CryptoError::EncString(what))
        };
        let iv: [u8; 16] = decode(iv, "the IV is not base64")?
            .try_into()
            .map_err(|_| CryptoError::EncString("the IV is not 16 bytes"))?;
        let ciphertext = decode(ciphertext, "the ciphertext is not base64")?;
        if ciphertext.is_empty() || ciphertext.len() % 16 != 0 {
            return Err(CryptoError::EncString(
                "the ciphertext is not a whole number of AES blocks",
            ));
        }
        let mac: [u8; 32] = decode(mac, "the MAC is not base64")?
            .try_into()
            .map_err(|_| CryptoError::EncString("the MAC is not 32 bytes"))?;
        Ok(Self {
            iv,
            ciphertext,
            mac,
        })
    }
}

impl fmt::Display for EncString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "2.{}|{}|{}",
            STANDARD.encode(self.iv),
            STANDARD.encode(&self.ciphertext),
            STANDARD.encode(self.mac)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The SDK's own `can_decode_access_token` vector.
    const TOKEN: &str = "0.ec2c1d46-6a4b-4751-a310-af9601317f2d.C2IgxjjLF7qSshsbwe8JGcbM075YXw:X8vbvA0bduihIDe/qrzIQQ==";
    const DERIVED: &str =
        "H9/oIRLtL9nGCQOVDjSMoEbJsjWXSOCb3qeyDt6ckzS3FhyboEDWyTP/CQfbIszNmAVg2ExFganG1FVFGXO/Jg==";

    /// Made independently (Python `cryptography`) under enc key 0..32, MAC key 32..64,
    /// IV 100..116.
    const KNOWN: [(&str, &str); 3] = [
        (
            "TEST",
            "2.ZGVmZ2hpamtsbW5vcHFycw==|P62A1j6QYSetYN3V3Hj5WA==|EelYnO9HEspiylckNcJJQb07qjA/vEJMEusQOfJb6Ys=",
        ),
        (
            "",
            "2.ZGVmZ2hpamtsbW5vcHFycw==|95X26IAv0VGgIaQRUNSraQ==|w5/bRz27QXlnr7nU2sVc5I8DnbaRD3W7MftHgXRtU1s=",
        ),
        (
            "hearth-secret-value-0123456789",
            "2.ZGVmZ2hpamtsbW5vcHFycw==|G15iR5MVFIG+NBilkFLuHUD9G1G5SzUiJ7P7JN89ut0=|NE3ZR/cqPfsbGBKYEHhXg3IvSYN8di0oxjQKFaFT9ro=",
        ),
    ];

    fn test_key() -> SymmetricKey {
        SymmetricKey::from_bytes(&(0..64).collect::<Vec<u8>>()).unwrap()
    }

    #[test]
    fn the_access_token_vector_derives_the_sdks_key() {
        let token: AccessToken = TOKEN.parse().unwrap();
        assert_eq!(token.id, "ec2c1d46-6a4b-4751-a310-af9601317f2d");
        assert_eq!(
            token.client_secret.expose(),
            "C2IgxjjLF7qSshsbwe8JGcbM075YXw"
        );
        let derived = token.key.bytes.to_vec();
        assert_eq!(STANDARD.encode(derived), DERIVED);
        // Padding on the key is optional.
        assert!(TOKEN.trim_end_matches('=').parse::<AccessToken>().is_ok());
        // Debug output names the id only.
        let debug = format!("{token:?}");
        assert!(
            !debug.contains("C2Igxj") && !debug.contains("X8vb"),
            "{debug}"
        );
    }

    #[test]
    fn malformed_access_tokens_are_refused_without_echoing_them() {
        let bad = [
            "",
            "not a token",
            "1.ec2c1d46-6a4b-4751-a310-af9601317f2d.secret:X8vbvA0bduihIDe/qrzIQQ==",
            "0.not-a-uuid.secret:X8vbvA0bduihIDe/qrzIQQ==",
            "0.ec2c1d46-6a4b-4751-a310-af9601317f2d.:X8vbvA0bduihIDe/qrzIQQ==",
            "0.ec2c1d46-6a4b-4751-a310-af9601317f2d.secret:X8vbvA0bduihIDe/qrzI",
            "0.ec2c1d46-6a4b-4751-a310-af9601317f2d.secret:!!!!",
            "0.ec2c1d46-6a4b-4751-a310-af9601317f2d.secret.extra:X8vbvA0bduihIDe/qrzIQQ==",
        ];
        for token in bad {
            let error = token.parse::<AccessToken>().unwrap_err();
            assert!(!error.to_string().contains("secret:"), "{error}");
        }
    }

    #[test]
    fn known_ciphertexts_decrypt() {
        let key = test_key();
        for (plaintext, encrypted) in KNOWN {
            let parsed: EncString = encrypted.parse().unwrap();
            assert_eq!(parsed.to_string(), encrypted, "parse and print round-trip");
            assert_eq!(
                key.decrypt(&parsed).unwrap().as_slice(),
                plaintext.as_bytes()
            );
        }
    }

    #[test]
    fn encryption_round_trips_with_fresh_ivs() {
        let key = test_key();
        let first = key.encrypt(b"value").unwrap();
        let second = key.encrypt(b"value").unwrap();
        assert_ne!(first, second);
        assert_eq!(key.decrypt(&first).unwrap().as_slice(), b"value");
        let reparsed: EncString = first.to_string().parse().unwrap();
        assert_eq!(key.decrypt(&reparsed).unwrap().as_slice(), b"value");
    }

    #[test]
    fn the_mac_is_checked_before_decrypting() {
        let key = test_key();
        let mut tampered: EncString = KNOWN[0].1.parse().unwrap();
        tampered.ciphertext[0] ^= 1;
        assert_eq!(key.decrypt(&tampered).unwrap_err(), CryptoError::Mac);
        let other = SymmetricKey::from_bytes(&[7_u8; 64]).unwrap();
        let genuine: EncString = KNOWN[0].1.parse().unwrap();
        assert_eq!(other.decrypt(&genuine).unwrap_err(), CryptoError::Mac);
    }

    #[test]
    fn malformed_enc_strings_are_refused() {
        for text in [
            "",
            "2.",
            "0.aGVsbG8=|aGVsbG8=",
            "7.cose",
            "2.ZGVmZ2hpamtsbW5vcHFycw==|P62A1j6QYSetYN3V3Hj5WA==",
            "2.ZGVm|P62A1j6QYSetYN3V3Hj5WA==|EelYnO9HEspiylckNcJJQb07qjA/vEJMEusQOfJb6Ys=",
            "2.ZGVmZ2hpamtsbW5vcHFycw==|AAAA|EelYnO9HEspiylckNcJJQb07qjA/vEJMEusQOfJb6Ys=",
            "2.ZGVmZ2hpamtsbW5vcHFycw==|P62A1j6QYSetYN3V3Hj5WA==|AAAA",
            "2.ZGVmZ2hpamtsbW5vcHFycw==|P62A1j6QYSetYN3V3Hj5WA==|EelYnO9HEspiylckNcJJQb07qjA/vEJMEusQOfJb6Ys=|x",
        ] {
            assert!(text.parse::<EncString>().is_err(), "{text}");
        }
        assert_eq!(
            SymmetricKey::from_bytes(&[0; 32]).unwrap_err(),
            CryptoError::KeyLength(32)
        );
    }
}
