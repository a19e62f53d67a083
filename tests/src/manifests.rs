//! The project's shipped manifests, read as the tests check them.

use std::path::{Path, PathBuf};

use serde_json::Value;

use std::path::Component;
use std::process::Command;

use crate::{HarnessError, on_path};

/// The repository's root directory.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

/// A file under `deploy/`.
pub fn deploy_file(relative: &str) -> PathBuf {
    repo_root().join("deploy").join(relative)
}

/// Every YAML document of a file (or string), as JSON values; empty documents are skipped.
pub fn yaml_documents(text: &str) -> Result<Vec<Value>, HarnessError> {
    let documents: Vec<Value> = serde_saphyr::from_multiple(text)
        .map_err(|e| HarnessError::Startup(format!("YAML: {e}")))?;
    Ok(documents.into_iter().filter(|d| !d.is_null()).collect())
}

/// The one YAML document of a file.
pub fn yaml_file(path: &Path) -> Result<Value, HarnessError> {
    let text = std::fs::read_to_string(path)?;
    let mut documents = yaml_documents(&text)?;
    match documents.len() {
        1 => Ok(documents.remove(0)),
        n => Err(HarnessError::Startup(format!(
            "{} has {n} YAML documents, not one",
            path.display()
        ))),
    }
}

/// Runs `kubectl kustomize` on a directory of the repository; the YAML it prints.
pub fn kustomize(relative: &str) -> Result<String, HarnessError> {
    kubectl_kustomize(&repo_root().join(relative))
}

fn kubectl_kustomize(dir: &Path) -> Result<String, HarnessError> {
    let kubectl = on_path("kubectl").ok_or(HarnessError::MissingBinary {
        binary: "kubectl",
        package: "kubectl",
        looked: "on PATH".into(),
    })?;
    let output = Command::new(kubectl).arg("kustomize").arg(dir).output()?;
    if !output.status.success() {
        return Err(HarnessError::Startup(format!(
            "kubectl kustomize {}: {}",
            dir.display(),
            String::from_utf8_lossy(&output.stderr)
        )));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The optional components of `deploy/`.
pub const COMPONENTS: [&str; 4] = ["monitoring", "eso", "sdk-server-alias", "ha"];

/// `deploy/` with the given components, as a user's overlay renders it: from a directory outside
/// the repository (kustomize refuses an overlay inside the base it builds on, and absolute
/// paths), naming it by a relative path.
pub fn kustomize_with_components(components: &[&str]) -> Result<String, HarnessError> {
    let overlay = tempfile::tempdir()?;
    let up = overlay
        .path()
        .components()
        .filter(|c| matches!(c, Component::Normal(_)))
        .map(|_| "..")
        .collect::<Vec<_>>()
        .join("/");
    let root = repo_root();
    let deploy = format!(
        "{up}/{}",
        root.join("deploy")
            .strip_prefix("/")
            .unwrap_or(&root)
            .display()
    );
    let listed: Vec<String> = components
        .iter()
        .map(|c| format!("  - {deploy}/components/{c}"))
        .collect();
    std::fs::write(
        overlay.path().join("kustomization.yaml"),
        format!(
            "resources:\n  - {deploy}\ncomponents:\n{}\n",
            listed.join("\n")
        ),
    )?;
    kubectl_kustomize(overlay.path())
}
