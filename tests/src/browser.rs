//! A real headless browser (Debian `chromium`) loading a page, for tests of what people see.

use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;

use crate::{HarnessError, on_path};

/// Chromium's time to load and render one page before it is given up on.
const PAGE_TIMEOUT: Duration = Duration::from_secs(60);

/// Loads `url` in headless Chromium with a phone-sized window and returns the DOM as the
/// browser built it (after parsing, styles and any scripts).
pub async fn dump_dom(url: &str) -> Result<String, HarnessError> {
    let browser = ["chromium", "chromium-browser"]
        .into_iter()
        .find_map(on_path)
        .ok_or(HarnessError::MissingBinary {
            binary: "chromium",
            package: "chromium",
            looked: "on PATH".into(),
        })?;
    let profile = tempfile::Builder::new()
        .prefix("hearth-chromium-")
        .tempdir()?;
    let child = Command::new(browser)
        .args([
            "--headless",
            // Tests may run as root, where Chromium's sandbox cannot start.
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--window-size=390,844",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg("--dump-dom")
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let output = tokio::time::timeout(PAGE_TIMEOUT, child.wait_with_output())
        .await
        .map_err(|_| {
            HarnessError::Startup(format!(
                "chromium did not load {url} within {PAGE_TIMEOUT:?}"
            ))
        })??;
    let dom = String::from_utf8_lossy(&output.stdout).into_owned();
    if output.status.success() && dom.contains("<html") {
        Ok(dom)
    } else {
        Err(HarnessError::Startup(format!(
            "chromium could not load {url}: {}",
            String::from_utf8_lossy(&output.stderr)
        )))
    }
}
