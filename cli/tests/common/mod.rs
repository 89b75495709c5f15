//! What the end-to-end tests of `qosroute` share: the repository, scratch folders, and the
//! real `qosrouted` built next to the `qosroute` under test.

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;

/// The repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// An empty scratch folder for test `test`, case `name`, under the system's temp folder.
pub fn scratch(test: &str, name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "qosroute-{test}-test-{}-{name}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Builds `qosrouted` next to the `qosroute` under test (another package's binary is not
/// built for this package's tests), where the demo, the bench and `validate` look for it.
pub fn build_daemon() {
    let qosroute = PathBuf::from(env!("CARGO_BIN_EXE_qosroute"));
    let dir = qosroute.parent().unwrap();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut build = Command::new(cargo);
    build
        .args(["build", "-p", "qosroute-daemon", "--bin", "qosrouted"])
        .current_dir(repo());
    if dir.file_name().is_some_and(|n| n == "release") {
        build.arg("--release");
    }
    assert!(build.status().unwrap().success(), "cannot build qosrouted");
    assert!(dir.join("qosrouted").exists());
}
