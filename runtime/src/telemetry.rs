//! Logging: `tracing` with an EnvFilter, plain lines for people and JSON lines in the cluster.

use tracing::Subscriber;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

use crate::Error;
use crate::options::LogFormat;

/// Installs the process-wide subscriber writing to standard error.
pub fn init(format: LogFormat, filter: &str) -> Result<(), Error> {
    let subscriber = subscriber(format, filter, std::io::stderr)?;
    tracing::subscriber::set_global_default(subscriber).map_err(|_| Error::TelemetryAlreadySet)
}

/// The subscriber `init` installs, writing to any writer (tests capture it).
pub fn subscriber<W>(
    format: LogFormat,
    filter: &str,
    writer: W,
) -> Result<Box<dyn Subscriber + Send + Sync>, Error>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let filter = EnvFilter::try_new(filter).map_err(|source| Error::LogFilter {
        filter: filter.to_owned(),
        reason: source.to_string(),
    })?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    Ok(match format {
        LogFormat::Json => Box::new(
            builder
                .json()
                .flatten_event(true)
                .with_current_span(false)
                .with_span_list(true)
                .finish(),
        ),
        LogFormat::Plain => Box::new(builder.with_ansi(false).finish()),
    })
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::Sensitive;

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn capture(format: LogFormat, emit: impl FnOnce()) -> String {
        let captured = Captured::default();
        let sink = captured.clone();
        let subscriber = subscriber(format, "info", move || sink.clone()).unwrap();
        tracing::subscriber::with_default(subscriber, emit);
        String::from_utf8(captured.0.lock().unwrap().clone()).unwrap()
    }

    #[test]
    fn json_lines_are_json_with_fields_at_the_top() {
        let output = capture(LogFormat::Json, || {
            tracing::info!(namespace = "paperless", "reconciled");
        });
        let line: serde_json::Value = serde_json::from_str(output.trim()).unwrap();
        assert_eq!(line["message"], "reconciled");
        assert_eq!(line["namespace"], "paperless");
        assert_eq!(line["level"], "INFO");
    }

    #[test]
    fn a_sensitive_value_never_reaches_a_log_line() {
        let password = Sensitive::new("hunter2-correct-horse".to_owned());
        for format in [LogFormat::Json, LogFormat::Plain] {
            let output = capture(format, || {
                tracing::info!(password = ?password, "connecting");
                tracing::info!(password = %password, "connecting");
                tracing::info!("connecting with {password:?} and {password}");
            });
            assert!(output.contains("connecting"), "{output}");
            assert!(!output.contains("hunter2"), "{output}");
        }
    }

    #[test]
    fn a_bad_filter_is_an_error_naming_it() {
        let error = subscriber(LogFormat::Plain, "info,[=", std::io::sink)
            .err()
            .unwrap();
        assert!(error.to_string().contains("info,[="), "{error}");
    }
}
