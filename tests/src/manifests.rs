//! The project's shipped manifests, read as the tests check them.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::HarnessError;

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
