//! Probes: one check of one target, bounded in time and in what it reads, with an outcome and a
//! reason from a small fixed set (never error text in a label).

mod databases;
mod web;

use std::time::Duration;

pub use databases::{PostgresProbe, RedisProbe};
pub use web::WebProbe;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Outcome {
    Success,
    Failure,
    Timeout,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Success => "success",
            Self::Failure => "failure",
            Self::Timeout => "timeout",
        }
    }

    pub const ALL: [Self; 3] = [Self::Success, Self::Failure, Self::Timeout];
}

/// Why a probe failed: the `reason` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Reason {
    /// No connection (refused, unreachable, name unknown).
    Connect,
    /// No answer within the probe's deadline.
    Timeout,
    /// The TLS handshake or certificate failed.
    Tls,
    /// An HTTP answer that is not 2xx or 3xx.
    HttpStatus,
    /// The server refused the credentials.
    Auth,
    /// The server answered, but not what was expected (a query failed, garbage came back).
    Protocol,
    /// What should exist does not (a Service, a Secret, an Ingress).
    Missing,
    /// It exists and says it is not ready (an ExternalSecret).
    NotReady,
    /// The Ingress has no host name from the operator yet.
    NoHostname,
    /// The annotation asking for the probe is not valid.
    InvalidAnnotation,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Connect => "connect",
            Self::Timeout => "timeout",
            Self::Tls => "tls",
            Self::HttpStatus => "http_status",
            Self::Auth => "auth",
            Self::Protocol => "protocol",
            Self::Missing => "missing",
            Self::NotReady => "not_ready",
            Self::NoHostname => "no_hostname",
            Self::InvalidAnnotation => "invalid_annotation",
        }
    }
}

/// What a probe learned besides up or down, for the upstream exporters' metric names.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum Detail {
    #[default]
    None,
    Http {
        status: u16,
    },
    Tls {
        /// Unix seconds when the certificate of the chain that expires first expires.
        earliest_expiry: i64,
    },
    Postgres {
        databases: Vec<Database>,
    },
    Redis {
        connected_clients: i64,
        memory_used_bytes: i64,
        /// (index, keys)
        keys: Vec<(u8, i64)>,
    },
}

/// One database as PostgreSQL reports it.
#[derive(Clone, Debug, PartialEq)]
pub struct Database {
    pub oid: u32,
    pub name: String,
    /// `None` when the monitoring role may not see it.
    pub size_bytes: Option<i64>,
    pub backends: i64,
}

/// One probe's result.
#[derive(Clone, Debug, PartialEq)]
pub struct Report {
    pub outcome: Outcome,
    pub reason: Option<Reason>,
    /// For people (the status page, the log): what happened, never a credential.
    pub message: String,
    pub detail: Detail,
    pub duration: Duration,
}

impl Report {
    pub fn success(detail: Detail) -> Self {
        Self {
            outcome: Outcome::Success,
            reason: None,
            message: String::new(),
            detail,
            duration: Duration::ZERO,
        }
    }

    /// A failure; one for want of time counts as a timeout.
    pub fn failure(reason: Reason, message: impl Into<String>) -> Self {
        Self {
            outcome: if reason == Reason::Timeout {
                Outcome::Timeout
            } else {
                Outcome::Failure
            },
            reason: Some(reason),
            message: message.into(),
            detail: Detail::None,
            duration: Duration::ZERO,
        }
    }

    /// A failure that still learned something (an HTTP 500 has a status code).
    pub fn failure_with(reason: Reason, message: impl Into<String>, detail: Detail) -> Self {
        Self {
            detail,
            ..Self::failure(reason, message)
        }
    }

    pub fn timeout(after: Duration) -> Self {
        Self {
            duration: after,
            ..Self::failure(Reason::Timeout, format!("no answer within {after:?}"))
        }
    }
}
