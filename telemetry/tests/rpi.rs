#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The Raspberry Pi provider against recorded Pi file trees (`tests/fixtures/rpi*`), and fake
//! `vcgencmd` programs for the fallback.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use qosroute_telemetry::{
    HostTelemetry, RpiProvider, TelemetryError, TelemetryOptions, TelemetryProvider, ThrottleFlags,
    ThrottleSource, raspberry_pi_model,
};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn copy_tree(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for entry in fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// A writable copy of a fixture.
fn scratch(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    copy_tree(&fixture(name), dir.path());
    dir
}

/// Installs a fake `usr/bin/vcgencmd` running `body` under `root`.
fn fake_vcgencmd(root: &Path, body: &str) {
    let program = RpiProvider::default_vcgencmd(root);
    fs::create_dir_all(program.parent().unwrap()).unwrap();
    fs::write(&program, format!("#!/bin/sh\n{body}\n")).unwrap();
    fs::set_permissions(&program, fs::Permissions::from_mode(0o755)).unwrap();
}

fn options(root: &Path) -> TelemetryOptions {
    TelemetryOptions {
        sysfs_root: root.to_path_buf(),
        enable_nvml: false,
        enable_jetson: false,
        enable_rpi: true,
    }
}

#[test]
fn rpi5_idle_reads_temperature_and_says_nothing_about_the_cpu() {
    let root = fixture("rpi5-idle");
    assert_eq!(
        raspberry_pi_model(&root).as_deref(),
        Some("Raspberry Pi 5 Model B Rev 1.0")
    );
    let mut p = RpiProvider::detect(&root).expect("a Pi");
    assert_eq!(p.model(), "Raspberry Pi 5 Model B Rev 1.0");
    assert_eq!(
        p.throttle_source(),
        Some(&ThrottleSource::Sysfs(
            root.join("sys/devices/platform/soc/soc:firmware/get_throttled")
        ))
    );
    assert!(p.missing_sources().is_empty());
    let s = p.sample().unwrap();
    assert_eq!(p.last_flags(), Some(ThrottleFlags(0)));
    // Not throttled: the CPU load is sysinfo's to report, not 0 from here.
    assert_eq!(s.cpu_utilisation, None);
    assert_eq!(s.memory_used, None);
    assert_eq!(s.temperatures_c, [("cpu-thermal".to_owned(), 52.65)]);
    assert!(s.gpus.is_empty());
    // It can tell, and it is not throttled.
    assert_eq!(s.throttled, Some(false));
}

#[test]
fn rpi4_under_voltage_now_counts_as_throttled() {
    let mut p = RpiProvider::detect(&fixture("rpi4-undervolted")).expect("a Pi");
    assert_eq!(p.model(), "Raspberry Pi 4 Model B Rev 1.4");
    let s = p.sample().unwrap();
    let flags = p.last_flags().unwrap();
    assert_eq!(flags, ThrottleFlags(0x50005));
    assert!(flags.under_voltage_now() && flags.throttled_now());
    // Throttled, not busy: the CPU load is sysinfo's, the daemon counts the board slower.
    assert_eq!(s.throttled, Some(true));
    assert_eq!(s.cpu_utilisation, None);
    assert_eq!(s.temperatures_c, [("cpu-thermal".to_owned(), 81.226)]);
}

#[test]
fn a_throttled_pi_makes_the_host_sample_throttled() {
    let (mut t, notes) = HostTelemetry::detect(&options(&fixture("rpi4-undervolted")));
    assert_eq!(t.provider_names().first(), Some(&"rpi"));
    assert!(notes.iter().all(|n| n.provider != "rpi"), "{notes:?}");
    let s = t.sample();
    // The host sample says the board is throttled (the daemon slows its local experts down).
    assert_eq!(s.throttled, Some(true));
    assert!(
        s.temperatures_c
            .iter()
            .any(|(n, c)| n == "cpu-thermal" && (*c - 81.226).abs() < 1e-9)
    );
}

#[test]
fn vcgencmd_is_the_fallback_without_the_sysfs_file() {
    let root = scratch("rpi5-no-sysfs-flags");
    let output = fixture("vcgencmd_get_throttled.txt");
    fake_vcgencmd(
        root.path(),
        &format!(
            "[ \"$1\" = get_throttled ] || exit 2\ncat '{}'",
            output.display()
        ),
    );
    let mut p = RpiProvider::detect(root.path()).unwrap();
    assert_eq!(
        p.throttle_source(),
        Some(&ThrottleSource::Vcgencmd(RpiProvider::default_vcgencmd(
            root.path()
        )))
    );
    let s = p.sample().unwrap();
    assert_eq!(p.last_flags(), Some(ThrottleFlags(0x50005)));
    assert_eq!(s.throttled, Some(true));
    assert_eq!(s.temperatures_c, [("cpu-thermal".to_owned(), 47.2)]);
}

#[test]
fn no_flag_source_is_noted_once_and_stays_unknown() {
    let root = fixture("rpi5-no-sysfs-flags");
    let mut p = RpiProvider::detect(&root).unwrap();
    assert_eq!(p.throttle_source(), None);
    let missing = p.missing_sources();
    assert_eq!(missing.len(), 1, "{missing:?}");
    assert!(missing[0].contains("throttling unknown"), "{missing:?}");
    let s = p.sample().unwrap();
    assert_eq!(p.last_flags(), None, "unknown, not 'not throttled'");
    assert_eq!(s.cpu_utilisation, None);
    assert_eq!(s.throttled, None);

    let (mut t, notes) = HostTelemetry::detect(&options(&root));
    let rpi_notes: Vec<_> = notes.iter().filter(|n| n.provider == "rpi").collect();
    assert_eq!(rpi_notes.len(), 1, "{notes:?}");
    assert!(rpi_notes[0].message.contains("Raspberry Pi 5"));
    // Sampling does not repeat the note.
    t.sample();
    t.sample();
}

#[test]
fn a_missing_temperature_is_noted_and_left_out() {
    let root = scratch("rpi5-idle");
    fs::remove_dir_all(root.path().join("sys/class/thermal")).unwrap();
    let mut p = RpiProvider::detect(root.path()).unwrap();
    assert_eq!(p.missing_sources().len(), 1);
    assert!(p.missing_sources()[0].contains("temperature unknown"));
    let s = p.sample().unwrap();
    assert!(s.temperatures_c.is_empty());
    assert_eq!(p.last_flags(), Some(ThrottleFlags(0)));
}

#[test]
fn flags_that_vanish_or_turn_to_garbage_fail_the_sample() {
    let root = scratch("rpi4-undervolted");
    let flags = root
        .path()
        .join("sys/devices/platform/soc/soc:firmware/get_throttled");
    let mut p = RpiProvider::detect(root.path()).unwrap();
    assert!(p.sample().is_ok());

    fs::write(&flags, "not hex\n").unwrap();
    let err = p.sample().unwrap_err();
    assert!(matches!(err, TelemetryError::Unparsable { .. }), "{err}");
    assert_eq!(p.last_flags(), None);

    fs::remove_file(&flags).unwrap();
    assert!(matches!(p.sample(), Err(TelemetryError::Io { .. })));
    assert_eq!(p.last_flags(), None);

    fs::write(&flags, "0\n").unwrap();
    assert_eq!(p.sample().unwrap().cpu_utilisation, None);
    assert_eq!(p.last_flags(), Some(ThrottleFlags(0)));
}

#[test]
fn a_failing_or_hanging_vcgencmd_is_an_error_not_a_reading() {
    let root = scratch("rpi5-no-sysfs-flags");
    fake_vcgencmd(
        root.path(),
        "echo 'VCHI initialization failed' >&2\nexit 255",
    );
    let mut p = RpiProvider::detect(root.path()).unwrap();
    assert!(matches!(p.sample(), Err(TelemetryError::Io { .. })));

    fake_vcgencmd(root.path(), "exec sleep 10");
    let started = Instant::now();
    let err = p.sample().unwrap_err();
    let took = started.elapsed();
    assert!(matches!(err, TelemetryError::Io { .. }), "{err}");
    assert!(
        took < Duration::from_secs(5),
        "killed after the timeout, took {took:?}"
    );
    assert_eq!(p.last_flags(), None);

    fake_vcgencmd(
        root.path(),
        "echo 'error=1 error_msg=\"Command not registered\"'",
    );
    assert!(matches!(p.sample(), Err(TelemetryError::Unparsable { .. })));
}

#[test]
fn the_firmware_node_is_found_under_another_bus_name() {
    let root = scratch("rpi5-idle");
    let platform = root.path().join("sys/devices/platform");
    fs::rename(platform.join("soc"), platform.join("axi")).unwrap();
    fs::rename(
        platform.join("axi/soc:firmware"),
        platform.join("axi/axi:firmware"),
    )
    .unwrap();
    let p = RpiProvider::detect(root.path()).unwrap();
    assert_eq!(
        p.throttle_source(),
        Some(&ThrottleSource::Sysfs(
            platform.join("axi/axi:firmware/get_throttled")
        ))
    );
}

#[test]
fn other_boards_are_not_a_pi() {
    let root = tempfile::tempdir().unwrap();
    assert!(RpiProvider::detect(root.path()).is_none());
    let model = root.path().join("proc/device-tree/model");
    fs::create_dir_all(model.parent().unwrap()).unwrap();
    fs::write(&model, b"NVIDIA Jetson AGX Orin Developer Kit\0").unwrap();
    assert!(RpiProvider::detect(root.path()).is_none());
    let (t, notes) = HostTelemetry::detect(&options(root.path()));
    assert!(!t.provider_names().contains(&"rpi"));
    assert!(
        notes
            .iter()
            .any(|n| n.provider == "rpi" && n.message.contains("not a Pi"))
    );
}

#[test]
fn disabled_means_not_detected() {
    let (t, _) = HostTelemetry::detect(&TelemetryOptions {
        enable_rpi: false,
        ..options(&fixture("rpi4-undervolted"))
    });
    assert!(!t.provider_names().contains(&"rpi"));
}
