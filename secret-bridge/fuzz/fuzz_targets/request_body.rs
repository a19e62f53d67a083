//! ESO request bodies: any bytes must give a body or an error, never a panic.
#![no_main]

use axum::body::Bytes;
use axum::http::StatusCode;
use libfuzzer_sys::fuzz_target;
use secret_bridge::api::Body;

fuzz_target!(|data: &[u8]| {
    if let Ok(body) = Body::parse(&Bytes::copy_from_slice(data), StatusCode::BAD_REQUEST) {
        for field in ["id", "key", "value", "note", "organizationId"] {
            let _ = body.text(field, StatusCode::BAD_REQUEST);
        }
        for field in ["ids", "projectIds"] {
            let _ = body.list(field, StatusCode::BAD_REQUEST);
        }
    }
});
