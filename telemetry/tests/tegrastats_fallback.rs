#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The `tegrastats` fallback, run against fake `tegrastats` scripts in a fake root.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use common::FakeRoot;
use qosroute_telemetry::{
    HostTelemetry, TEGRASTATS_GPU_NAME, TegrastatsProvider, TelemetryError, TelemetryOptions,
    TelemetryProvider,
};

// Xavier NX, JetPack 5.1.2 (waggle-sensor/jetson-exporter), GR3D load changed to 42 %.
const LINE: &str = "07-09-2024 13:31:31 RAM 3168/6851MB (lfb 2x4MB) SWAP 161/3426MB (cached 0MB) CPU [23%@1397,17%@1192,16%@1190,13%@1190,23%@1190,10%@1190] EMC_FREQ 2%@204 GR3D_FREQ 42%@[114] VIC_FREQ 115 APE 150 AUX@45C CPU@46.5C thermal@45.6C AO@45C GPU@45.5C PMIC@50C VDD_IN 2763mW/2846mW VDD_CPU_GPU_CV 650mW/670mW VDD_SOC 650mW/711mW";

/// A Tegra root with no GPU load in sysfs and a fake `usr/bin/tegrastats` running `body`.
fn tegra_root_with_script(body: &str) -> FakeRoot {
    let fake = FakeRoot::new();
    fake.write("etc/nv_tegra_release", "# R35 (release), REVISION: 4.1\n");
    let script = fake.path("usr/bin/tegrastats");
    fake.write("usr/bin/tegrastats", format!("#!/bin/sh\n{body}\n"));
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    fake
}

fn options(fake: &FakeRoot) -> TelemetryOptions {
    TelemetryOptions {
        sysfs_root: fake.root().to_path_buf(),
        enable_nvml: false,
        enable_jetson: true,
        enable_rpi: false,
    }
}

/// Samples until `done` holds, for at most 5 s.
fn sample_until(
    provider: &mut dyn TelemetryProvider,
    mut done: impl FnMut(&Result<qosroute_telemetry::ProviderSample, TelemetryError>) -> bool,
) -> Result<qosroute_telemetry::ProviderSample, TelemetryError> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let result = provider.sample();
        if done(&result) || Instant::now() > deadline {
            return result;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn detect_falls_back_to_tegrastats_and_reports_its_gpu() {
    let fake = tegra_root_with_script(&format!("while true; do echo '{LINE}'; sleep 0.05; done"));
    let (mut telemetry, notes) = HostTelemetry::detect(&options(&fake));
    assert_eq!(telemetry.provider_names(), ["sysinfo", "tegrastats"]);
    assert_eq!(notes.len(), 1, "{notes:?}");
    assert_eq!(notes[0].provider, "tegrastats");

    let deadline = Instant::now() + Duration::from_secs(5);
    let sample = loop {
        let s = telemetry.sample();
        if s.gpu(TEGRASTATS_GPU_NAME).is_some() || Instant::now() > deadline {
            break s;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let gpu = sample.gpu(TEGRASTATS_GPU_NAME).expect("tegrastats GPU");
    assert_eq!(gpu.utilisation, Some(0.42));
    assert_eq!(gpu.frequency_mhz, Some(114.0));
    assert_eq!(gpu.temperature_c, Some(45.5));
    assert!(gpu.memory_used.is_some());
}

#[test]
fn provider_reports_no_data_then_the_latest_line() {
    let fake = tegra_root_with_script(&format!("sleep 0.3; echo '{LINE}'; exec sleep 30"));
    let program = TegrastatsProvider::default_program(fake.root());
    let mut p = TegrastatsProvider::spawn(&program, Duration::from_secs(1)).unwrap();
    assert!(matches!(p.sample(), Err(TelemetryError::NoDataYet)));
    let s = sample_until(&mut p, |r| r.is_ok()).unwrap();
    assert_eq!(s.gpus[0].utilisation, Some(0.42));
    // Dropping the provider kills the script (its `exec sleep 30` would otherwise linger).
    drop(p);
}

#[test]
fn a_silent_tegrastats_goes_stale() {
    let fake = tegra_root_with_script(&format!("echo '{LINE}'; exec sleep 30"));
    let program = TegrastatsProvider::default_program(fake.root());
    // Interval 100 ms: stale after max(3 intervals, 3 s) = 3 s.
    let mut p = TegrastatsProvider::spawn(&program, Duration::from_millis(100)).unwrap();
    assert!(sample_until(&mut p, |r| r.is_ok()).is_ok());
    std::thread::sleep(Duration::from_millis(3200));
    assert!(
        matches!(p.sample(), Err(TelemetryError::Stale { .. })),
        "{:?}",
        p.sample()
    );
}

#[test]
fn a_dying_tegrastats_is_an_error_not_a_panic() {
    let fake = tegra_root_with_script("echo 'this is not tegrastats'; exit 3");
    let program = TegrastatsProvider::default_program(fake.root());
    let mut p = TegrastatsProvider::spawn(&program, Duration::from_secs(1)).unwrap();
    let result = sample_until(&mut p, |r| matches!(r, Err(TelemetryError::Exited)));
    assert!(matches!(result, Err(TelemetryError::Exited)), "{result:?}");
}

#[test]
fn garbage_output_is_reported_as_a_parse_error() {
    let fake = tegra_root_with_script("while true; do echo 'garbage line'; sleep 0.05; done");
    let program = TegrastatsProvider::default_program(fake.root());
    let mut p = TegrastatsProvider::spawn(&program, Duration::from_secs(1)).unwrap();
    let result = sample_until(&mut p, |r| matches!(r, Err(TelemetryError::Tegrastats(_))));
    assert!(
        matches!(result, Err(TelemetryError::Tegrastats(_))),
        "{result:?}"
    );
}
