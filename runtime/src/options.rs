//! Options every hearth service takes, flattened into each service's own clap struct.
//! Every option is both a `--kebab-case` flag and an environment variable (DESIGN.md §3.3).

use std::net::SocketAddr;

use clap::{Args, ValueEnum};

/// How log lines are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// One JSON object per line, for the cluster's log collector.
    #[default]
    Json,
    /// Human-readable lines, for a terminal.
    Plain,
}

#[derive(Clone, Debug, Args)]
#[command(next_help_heading = "Common options")]
pub struct CommonOptions {
    /// Address of the admin server (/livez, /readyz, /metrics).
    #[arg(long, env = "ADMIN_ADDR", default_value = "0.0.0.0:8080")]
    pub admin_addr: SocketAddr,

    /// Log line format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Json)]
    pub log_format: LogFormat,

    /// Log filter in `tracing` EnvFilter syntax, e.g. `info` or `info,kube=debug`.
    #[arg(long, env = "RUST_LOG", default_value = "info")]
    pub rust_log: String,

    /// Watch only this namespace instead of the whole cluster (tests, small installs).
    #[arg(long, env = "WATCH_NAMESPACE")]
    pub watch_namespace: Option<String>,

    /// This pod's name (downward API): the Lease holder identity and the Event reporter instance.
    #[arg(long, env = "POD_NAME", default_value_t = default_pod_name())]
    pub pod_name: String,

    /// The namespace this service runs in (downward API): where its own objects live.
    #[arg(long, env = "POD_NAMESPACE", default_value = "hearth-system")]
    pub pod_namespace: String,
}

/// Parses a duration option: `90s`, `5m`, `1h`, or plain seconds; `0` is zero.
pub fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let invalid = || format!("{text:?} is not a duration such as 500ms, 30s, 5m or 1h");
    let digits = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(digits);
    let number: u64 = number.parse().map_err(|_| invalid())?;
    let millis_per_unit = match unit {
        "ms" => 1,
        "" | "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => return Err(invalid()),
    };
    let millis = number.checked_mul(millis_per_unit).ok_or_else(invalid)?;
    Ok(std::time::Duration::from_millis(millis))
}

/// Outside a pod the host name stands in for the pod name, so two local runs still differ.
fn default_pod_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "hearth".to_owned())
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    use super::*;

    #[derive(Debug, Parser)]
    struct Probe {
        #[command(flatten)]
        common: CommonOptions,
    }

    #[test]
    fn cli_definition_is_consistent() {
        Probe::command().debug_assert();
    }

    #[test]
    fn defaults_follow_the_design() {
        let probe = Probe::try_parse_from(["probe"]).unwrap();
        assert_eq!(probe.common.admin_addr.to_string(), "0.0.0.0:8080");
        assert_eq!(probe.common.log_format, LogFormat::Json);
        assert_eq!(probe.common.pod_namespace, "hearth-system");
        assert!(!probe.common.pod_name.is_empty());
    }

    #[test]
    fn flags_are_kebab_case() {
        let probe = Probe::try_parse_from([
            "probe",
            "--admin-addr",
            "127.0.0.1:9000",
            "--log-format",
            "plain",
            "--rust-log",
            "debug",
            "--watch-namespace",
            "paperless",
            "--pod-name",
            "p-1",
        ])
        .unwrap();
        assert_eq!(probe.common.admin_addr.port(), 9000);
        assert_eq!(probe.common.log_format, LogFormat::Plain);
        assert_eq!(probe.common.watch_namespace.as_deref(), Some("paperless"));
        assert_eq!(probe.common.pod_name, "p-1");
    }

    #[test]
    fn durations() {
        use std::time::Duration;
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("2").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
        assert_eq!(parse_duration("800ms").unwrap(), Duration::from_millis(800));
        for bad in ["5 minutes", "", "m", "-1s", "99999999999999999999h"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_bad_address_is_refused_with_the_option_named() {
        let error = Probe::try_parse_from(["probe", "--admin-addr", "nowhere"]).unwrap_err();
        assert!(error.to_string().contains("--admin-addr"), "{error}");
    }
}
