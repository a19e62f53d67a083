//! The container image, built by `scripts/image` with buildah (these machines can build an
//! image and run a binary inside it with `buildah run --isolation chroot`, but cannot run it as
//! a container): every binary runs in it and lists, in `--help`, every variable its Deployment
//! sets; the image runs as a numeric non-root user, has no shell, and its size is reported.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

use hearth_tests::manifests::{COMPONENTS, kustomize_with_components, repo_root, yaml_documents};

use serde_json::Value;

const STORAGE: &str = "--storage-driver=vfs";

fn buildah(args: &[&str]) -> (bool, String) {
    let output = Command::new("buildah")
        .arg(STORAGE)
        .args(args)
        .output()
        .expect("buildah is installed (scripts/test installs it)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

/// A working container of the image, removed when dropped.
struct Working(String);

impl Working {
    fn run(&self, command: &[&str]) -> (bool, String) {
        let mut args = vec!["run", "--isolation", "chroot", self.0.as_str(), "--"];
        args.extend_from_slice(command);
        buildah(&args)
    }
}

impl Drop for Working {
    fn drop(&mut self) {
        let _ = buildah(&["rm", &self.0]);
    }
}

#[test]
fn the_image_holds_four_working_binaries_as_a_non_root_user_and_no_shell() {
    let built = Command::new(repo_root().join("scripts/image"))
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&built.stdout).into_owned();
    assert!(
        built.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&built.stderr)
    );
    let image = said
        .lines()
        .find_map(|line| line.strip_prefix("image:"))
        .unwrap()
        .trim()
        .to_owned();
    let archive = said
        .lines()
        .find_map(|line| line.strip_prefix("archive:"))
        .unwrap()
        .trim()
        .to_owned();
    println!("built {image}: {archive}");

    let (ok, inspected) = buildah(&["inspect", "--type", "image", &image]);
    assert!(ok, "{inspected}");
    let inspected: Value = serde_json::from_str(&inspected).unwrap();
    let config = &inspected["OCIv1"]["config"];
    assert_eq!(config["User"], "65532:65532", "a numeric user, not root");
    let labels = &config["Labels"];
    assert_eq!(
        labels["org.opencontainers.image.version"],
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(labels["org.opencontainers.image.licenses"], "Apache-2.0");
    assert!(labels["org.opencontainers.image.source"].is_string());
    let archive_size = std::fs::metadata(archive.split(' ').next().unwrap())
        .unwrap()
        .len();
    println!(
        "image archive: {:.1} MiB",
        archive_size as f64 / 1024.0 / 1024.0
    );
    assert!(archive_size < 64 << 20, "{archive_size} bytes");

    let (ok, name) = buildah(&["from", "--quiet", &image]);
    assert!(ok, "{name}");
    let working = Working(name.trim().to_owned());
    let (shell, said) = working.run(&["/bin/sh", "-c", "true"]);
    assert!(!shell, "the image has a shell: {said}");

    // The CA certificates the services trust are where rustls looks for them.
    let (ok, mounted) = buildah(&["mount", &working.0]);
    assert!(ok, "{mounted}");
    let bundle = std::path::Path::new(mounted.trim()).join("etc/ssl/certs/ca-certificates.crt");
    let certificates = std::fs::read_to_string(&bundle).unwrap();
    assert!(
        certificates.matches("BEGIN CERTIFICATE").count() > 50,
        "{}",
        bundle.display()
    );
    let _ = buildah(&["umount", &working.0]);

    // Every variable any Deployment sets, with every component.
    let deployments: Vec<Value> = yaml_documents(&kustomize_with_components(&COMPONENTS).unwrap())
        .unwrap()
        .into_iter()
        .filter(|o| o["kind"] == "Deployment")
        .collect();
    assert_eq!(deployments.len(), 4);
    for deployment in deployments {
        let container = &deployment["spec"]["template"]["spec"]["containers"][0];
        let binary = container["command"][0].as_str().unwrap();
        let name = deployment["metadata"]["name"].as_str().unwrap();
        // Run as the image's user, 65532: the binaries need nothing root has.
        let (ok, version) = working.run(&[binary, "--version"]);
        assert!(ok, "{binary}: {version}");
        assert_eq!(
            version.trim(),
            format!("{name} {}", env!("CARGO_PKG_VERSION"))
        );
        let (ok, help) = working.run(&[binary, "--help"]);
        assert!(ok, "{binary}: {help}");
        for variable in container["env"].as_array().unwrap() {
            let variable = variable["name"].as_str().unwrap();
            assert!(
                help.contains(&format!("[env: {variable}")),
                "{binary} --help does not list {variable}"
            );
        }
    }
}
