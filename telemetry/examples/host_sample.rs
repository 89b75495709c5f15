//! Prints what host telemetry detects and three samples one second apart, with the time each
//! sample took: `cargo run -p qosroute-telemetry --example host_sample [SYSFS_ROOT]`.
//! Meant for checking a real board (Jetson, NVIDIA GPU host) by hand.

#![allow(clippy::print_stdout)]

use std::time::{Duration, Instant};

use qosroute_telemetry::{HostTelemetry, TelemetryOptions};

fn main() {
    let mut options = TelemetryOptions::default();
    if let Some(root) = std::env::args_os().nth(1) {
        options.sysfs_root = root.into();
    }
    let (mut telemetry, notes) = HostTelemetry::detect(&options);
    println!("providers: {:?}", telemetry.provider_names());
    for note in &notes {
        println!("note: {note}");
    }
    for _ in 0..3 {
        std::thread::sleep(Duration::from_secs(1));
        let start = Instant::now();
        let sample = telemetry.sample();
        let took = start.elapsed();
        println!("sample took {took:?}:\n{sample:#?}");
    }
}
