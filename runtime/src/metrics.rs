//! The process's one metrics registry, built at start and passed down.

use prometheus::{IntGaugeVec, Opts, Registry};

use crate::Error;

/// A registry holding `hearth_build_info{service,version}` and the standard `process_*` metrics
/// (resident memory among them: a homelab watches it).
pub fn registry(service: &str, version: &str) -> Result<Registry, Error> {
    let registry = Registry::new();
    let build_info = IntGaugeVec::new(
        Opts::new(
            "hearth_build_info",
            "Always 1; labels name the service and its version.",
        ),
        &["service", "version"],
    )?;
    build_info.with_label_values(&[service, version]).set(1);
    registry.register(Box::new(build_info))?;
    registry.register(Box::new(
        prometheus::process_collector::ProcessCollector::for_self(),
    ))?;
    Ok(registry)
}

#[cfg(test)]
mod tests {
    use prometheus::{Encoder, TextEncoder};

    use super::*;

    #[test]
    fn build_info_and_process_memory_are_exposed() {
        let registry = registry("db-provisioner", "1.2.3").unwrap();
        let mut text = Vec::new();
        TextEncoder::new()
            .encode(&registry.gather(), &mut text)
            .unwrap();
        let text = String::from_utf8(text).unwrap();
        assert!(
            text.contains(r#"hearth_build_info{service="db-provisioner",version="1.2.3"} 1"#),
            "{text}"
        );
        assert!(text.contains("process_resident_memory_bytes"), "{text}");
    }
}
