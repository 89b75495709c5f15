#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! sysinfo and detection on this real host (no NVIDIA driver, not a Jetson).

use std::time::{Duration, Instant};

use qosroute_telemetry::{HostTelemetry, SysinfoProvider, TelemetryOptions, TelemetryProvider};
use sysinfo::MINIMUM_CPU_UPDATE_INTERVAL as MINIMUM;

fn in_unit_interval(x: Option<f64>) -> bool {
    x.is_some_and(|x| (0.0..=1.0).contains(&x))
}

#[test]
fn sysinfo_cpu_and_memory_are_fractions_after_two_samples() {
    let start = Instant::now();
    let mut p = SysinfoProvider::new().unwrap();
    let first = p.sample().unwrap();
    if start.elapsed() < MINIMUM {
        // Too soon after the first CPU reading: unknown, never 0.
        assert_eq!(first.cpu_utilisation, None);
    }
    assert!(in_unit_interval(first.memory_used), "{first:?}");

    std::thread::sleep(MINIMUM + Duration::from_millis(50));
    let second = p.sample().unwrap();
    assert!(in_unit_interval(second.cpu_utilisation), "{second:?}");
    assert!(in_unit_interval(second.memory_used), "{second:?}");
    assert!(second.gpus.is_empty());
    assert!(
        second
            .temperatures_c
            .iter()
            .all(|(_, t)| t.is_finite() && (-100.0..=250.0).contains(t))
    );

    // Samples closer together than the interval keep the last known value.
    let third = p.sample().unwrap();
    assert!(in_unit_interval(third.cpu_utilisation), "{third:?}");
}

#[test]
fn detect_without_nvidia_driver_notes_it_once_and_samples() {
    let (mut telemetry, notes) = HostTelemetry::detect(&TelemetryOptions::default());
    let names = telemetry.provider_names();
    assert!(names.contains(&"sysinfo"), "{names:?}");
    let nvml_notes: Vec<_> = notes.iter().filter(|n| n.provider == "nvml").collect();
    if names.contains(&"nvml") {
        // A host with a working NVIDIA driver: nothing to note about NVML.
        assert!(nvml_notes.is_empty(), "{nvml_notes:?}");
    } else {
        // This development machine: libnvidia-ml.so is absent.
        assert_eq!(nvml_notes.len(), 1, "{notes:?}");
        assert!(
            nvml_notes[0].message.contains("not available"),
            "{}",
            nvml_notes[0]
        );
    }
    eprintln!("providers: {names:?}; notes: {notes:?}");

    let first = telemetry.sample();
    std::thread::sleep(MINIMUM + Duration::from_millis(50));
    let second = telemetry.sample();
    assert!(second.at > first.at);
    assert!(in_unit_interval(second.cpu_utilisation), "{second:?}");
    assert!(in_unit_interval(second.memory_used), "{second:?}");
    assert!(!second.is_stale(Instant::now(), Duration::from_secs(3)));
    assert!(second.is_stale(second.at + Duration::from_secs(4), Duration::from_secs(3)));
}

#[test]
fn nvml_disabled_means_no_nvml_note() {
    let options = TelemetryOptions {
        enable_nvml: false,
        ..TelemetryOptions::default()
    };
    let (telemetry, notes) = HostTelemetry::detect(&options);
    assert!(!telemetry.provider_names().contains(&"nvml"));
    assert!(notes.iter().all(|n| n.provider != "nvml"), "{notes:?}");
}
