//! EncStrings from Bitwarden: parse, and if it parses, decrypt (the MAC check must hold).
#![no_main]

use libfuzzer_sys::fuzz_target;
use secret_bridge::crypto::{EncString, SymmetricKey};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(encrypted) = text.parse::<EncString>() {
        let key = SymmetricKey::from_bytes(&[7; 64]).expect("64 bytes");
        let _ = key.decrypt(&encrypted);
        assert_eq!(encrypted.to_string().parse::<EncString>().ok(), Some(encrypted));
    }
});
