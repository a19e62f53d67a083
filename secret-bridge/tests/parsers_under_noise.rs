//! A quick, stable-toolchain run of what the fuzz targets do (`scripts/fuzz` runs them under
//! cargo-fuzz): valid inputs, mutated byte by byte, must never make a parser panic.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use axum::body::Bytes;
use axum::http::StatusCode;
use secret_bridge::api::Body;
use secret_bridge::crypto::{AccessToken, EncString, SymmetricKey};

/// xorshift64*: deterministic, so a failure reproduces.
struct Noise(u64);

impl Noise {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % n.max(1) as u64).unwrap()
    }

    /// Flips, inserts, deletes or truncates a few bytes.
    fn mutate(&mut self, seed: &[u8]) -> Vec<u8> {
        let mut bytes = seed.to_vec();
        for _ in 0..=self.below(4) {
            let at = self.below(bytes.len() + 1);
            match self.below(5) {
                0 if at < bytes.len() => bytes[at] ^= 1 << self.below(8),
                1 => bytes.insert(at, u8::try_from(self.below(256)).unwrap()),
                2 if at < bytes.len() => {
                    bytes.remove(at);
                }
                3 => bytes.truncate(at),
                _ => bytes.insert(at, b"\"{}[],:|.=\\\0"[self.below(12)]),
            }
        }
        bytes
    }
}

const SEEDS: [&str; 6] = [
    r#"{"id":"ec2c1d46-6a4b-4751-a310-af9601317f2d"}"#,
    r#"{"organizationID":"f4e44a7f-1190-432a-9d4a-af96013127cb"}"#,
    r#"{"key":"k","note":"n","organizationId":"o","projectIds":["p"],"value":"v"}"#,
    r#"{"ids":["a","b"]}"#,
    "2.ZGVmZ2hpamtsbW5vcHFycw==|P62A1j6QYSetYN3V3Hj5WA==|EelYnO9HEspiylckNcJJQb07qjA/vEJMEusQOfJb6Ys=",
    "0.ec2c1d46-6a4b-4751-a310-af9601317f2d.C2IgxjjLF7qSshsbwe8JGcbM075YXw:X8vbvA0bduihIDe/qrzIQQ==",
];

#[test]
fn mutated_inputs_never_panic_a_parser() {
    let key = SymmetricKey::from_bytes(&(0..64).collect::<Vec<u8>>()).unwrap();
    let mut noise = Noise(0x5eed_1234_abcd_9876);
    let mut parsed = 0_usize;
    for round in 0..60_000 {
        let input = noise.mutate(SEEDS[round % SEEDS.len()].as_bytes());
        if let Ok(body) = Body::parse(&Bytes::from(input.clone()), StatusCode::BAD_REQUEST) {
            parsed += 1;
            for field in ["id", "key", "value", "note", "organizationId"] {
                let _ = body.text(field, StatusCode::BAD_REQUEST);
            }
            let _ = body.list("ids", StatusCode::BAD_REQUEST);
        }
        if let Ok(text) = std::str::from_utf8(&input) {
            if let Ok(encrypted) = text.parse::<EncString>() {
                let _ = key.decrypt(&encrypted);
                assert_eq!(
                    encrypted.to_string().parse::<EncString>().ok(),
                    Some(encrypted)
                );
            }
            let _ = text.parse::<AccessToken>();
        }
    }
    assert!(
        parsed > 1000,
        "the mutations should keep many inputs valid: {parsed}"
    );
}
