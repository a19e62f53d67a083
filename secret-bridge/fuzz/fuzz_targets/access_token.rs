//! Access tokens from request headers: any text must parse or be refused, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use secret_bridge::crypto::AccessToken;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = text.parse::<AccessToken>();
    }
});
