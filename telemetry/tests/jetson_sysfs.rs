#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The Jetson provider against fake sysfs trees of three JetPack generations, plus odd files.

mod common;

use common::{FakeRoot, jetpack4_nano, jetpack5_orin, jetpack6_orin};
use qosroute_telemetry::{
    HostTelemetry, JetsonProvider, TelemetryOptions, TelemetryProvider, is_tegra,
};

fn close(a: Option<f64>, b: f64) -> bool {
    a.is_some_and(|a| (a - b).abs() < 1e-9)
}

#[test]
fn jetpack4_nano_layout() {
    let fake = jetpack4_nano();
    assert!(is_tegra(fake.root()));
    let mut p = JetsonProvider::detect(fake.root()).expect("Nano GPU found");
    assert_eq!(p.gpu_names().collect::<Vec<_>>(), ["tegra:57000000.gpu"]);
    // PMIC-Die is a constant, not a measurement: left out.
    assert_eq!(
        p.thermal_zone_names().collect::<Vec<_>>(),
        [
            "AO-therm",
            "CPU-therm",
            "GPU-therm",
            "PLL-therm",
            "thermal-fan-est"
        ]
    );
    let s = p.sample().unwrap();
    let gpu = &s.gpus[0];
    // 0 per mille is a real reading of an idle GPU, not "unknown".
    assert_eq!(gpu.utilisation, Some(0.0));
    assert_eq!(gpu.frequency_mhz, Some(76.8));
    assert_eq!(gpu.temperature_c, Some(26.0));
    assert!(close(s.memory_used, 0.5));
    assert_eq!(gpu.memory_used, s.memory_used, "unified memory");
    assert_eq!(s.cpu_utilisation, None);
    assert_eq!(s.temperatures_c.len(), 5);
    assert!(s.temperatures_c.iter().all(|(n, _)| n != "PMIC-Die"));
}

#[test]
fn jetpack5_orin_layout_with_the_gpu_sensor_off() {
    let fake = jetpack5_orin();
    let mut p = JetsonProvider::detect(fake.root()).expect("Orin GPU found");
    assert_eq!(p.gpu_names().collect::<Vec<_>>(), ["tegra:17000000.ga10b"]);
    let s = p.sample().unwrap();
    assert_eq!(s.gpus[0].utilisation, Some(0.25));
    assert_eq!(s.gpus[0].frequency_mhz, Some(305.0));
    // GPU-therm reads -256 °C while the GPU is power-gated: unknown, not -256 and not 0.
    assert_eq!(s.gpus[0].temperature_c, None);
    let names: Vec<&str> = s.temperatures_c.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["CPU-therm", "SOC0-therm", "Tboard_tegra"]);
}

#[test]
fn jetpack6_orin_layout() {
    let fake = jetpack6_orin();
    let mut p = JetsonProvider::detect(fake.root()).expect("Orin GPU found");
    assert_eq!(p.gpu_names().collect::<Vec<_>>(), ["tegra:17000000.gpu"]);
    // Numeric order: thermal_zone10 after thermal_zone2.
    assert_eq!(
        p.thermal_zone_names().collect::<Vec<_>>(),
        ["cpu-thermal", "gpu-thermal", "soc0-thermal", "tj-thermal"]
    );
    let s = p.sample().unwrap();
    assert_eq!(s.gpus.len(), 1, "class link and device dir are one GPU");
    assert_eq!(s.gpus[0].utilisation, Some(0.523));
    assert_eq!(s.gpus[0].frequency_mhz, Some(918.0));
    assert_eq!(s.gpus[0].temperature_c, Some(42.937));
    assert!(close(s.memory_used, 0.5));
}

#[test]
fn every_sample_reads_the_files_again() {
    let fake = jetpack6_orin();
    let mut p = JetsonProvider::detect(fake.root()).unwrap();
    assert_eq!(p.sample().unwrap().gpus[0].utilisation, Some(0.523));
    fake.write("sys/devices/platform/bus@0/17000000.gpu/load", "1000\n");
    fake.write(
        "sys/devices/platform/bus@0/17000000.gpu/devfreq/17000000.gpu/cur_freq",
        "1300500000\n",
    );
    fake.write("sys/devices/virtual/thermal/thermal_zone1/temp", "61000\n");
    let s = p.sample().unwrap();
    assert_eq!(s.gpus[0].utilisation, Some(1.0));
    assert_eq!(s.gpus[0].frequency_mhz, Some(1300.5));
    assert_eq!(s.gpus[0].temperature_c, Some(61.0));
}

#[test]
fn kernel_without_class_links_is_found_by_fixed_paths() {
    // Xavier (JetPack 4/5) GPU device with no sys/class/devfreq link.
    let fake = FakeRoot::new();
    fake.gpu(
        "sys/devices/17000000.gv11b",
        "gv11b",
        "17000000.gv11b",
        "999",
        "1377000000",
        false,
    );
    let mut p = JetsonProvider::detect(fake.root()).expect("fixed path found");
    assert_eq!(p.gpu_names().collect::<Vec<_>>(), ["tegra:17000000.gv11b"]);
    let s = p.sample().unwrap();
    assert_eq!(s.gpus[0].utilisation, Some(0.999));
    assert_eq!(s.gpus[0].frequency_mhz, Some(1377.0));
    // No meminfo, no thermal zone in this tree: unknown.
    assert_eq!(s.memory_used, None);
    assert_eq!(s.gpus[0].temperature_c, None);
    assert!(s.temperatures_c.is_empty());
}

#[test]
fn one_igpu_under_two_directories_is_counted_once() {
    // Xavier exposes the GPU as `17000000.gv11b` and as `gpu.0`: with the class link…
    let fake = FakeRoot::new();
    fake.gpu(
        "sys/devices/17000000.gv11b",
        "gv11b",
        "17000000.gv11b",
        "10",
        "114750000",
        true,
    );
    fake.write("sys/devices/gpu.0/load", "10\n");
    let p = JetsonProvider::detect(fake.root()).unwrap();
    assert_eq!(p.gpu_names().collect::<Vec<_>>(), ["tegra:17000000.gv11b"]);
    // …and without it (fixed paths: the first one wins).
    let fake = FakeRoot::new();
    fake.write("sys/devices/17000000.gv11b/load", "10\n");
    fake.write("sys/devices/gpu.0/load", "10\n");
    let p = JetsonProvider::detect(fake.root()).unwrap();
    assert_eq!(p.gpu_names().count(), 1);
}

#[test]
fn platform_gpu_glob_is_searched() {
    let fake = FakeRoot::new();
    fake.write("sys/devices/platform/gpu.0/load", "100\n");
    let mut p = JetsonProvider::detect(fake.root()).expect("platform glob found");
    assert_eq!(p.gpu_names().collect::<Vec<_>>(), ["tegra:gpu.0"]);
    let s = p.sample().unwrap();
    assert_eq!(s.gpus[0].utilisation, Some(0.1));
    assert_eq!(s.gpus[0].frequency_mhz, None);
}

#[test]
fn odd_files_give_unknown_values_never_a_panic_or_an_error() {
    let fake = jetpack6_orin();
    let mut p = JetsonProvider::detect(fake.root()).unwrap();
    let gpu_dir = "sys/devices/platform/bus@0/17000000.gpu";
    let freq = format!("{gpu_dir}/devfreq/17000000.gpu/cur_freq");
    let cases: [(&str, &[u8], &str); 7] = [
        ("", b"", "-256000"),
        ("garbage", b"fast", "hot"),
        ("1001", b"-1", "999999999999999999999"),
        (
            "99999999999999999999999",
            b"184467440737095516160",
            "400000",
        ),
        ("-5", b"1e9", "42.5"),
        ("\0\0\0", &[0xff, 0xfe, 0x80], "\u{fffd}"),
        ("12 13", b"1 2", ""),
    ];
    for (load, hz, temp) in cases {
        fake.write(&format!("{gpu_dir}/load"), load);
        fake.write(&freq, hz);
        fake.write("sys/devices/virtual/thermal/thermal_zone1/temp", temp);
        let s = p.sample().unwrap();
        let gpu = &s.gpus[0];
        assert_eq!(gpu.utilisation, None, "load {load:?}");
        assert_eq!(gpu.frequency_mhz, None, "cur_freq {hz:?}");
        assert_eq!(gpu.temperature_c, None, "temp {temp:?}");
        assert!(!s.temperatures_c.iter().any(|(n, _)| n == "gpu-thermal"));
    }
    // A huge file is read bounded and is garbage.
    fake.write(&format!("{gpu_dir}/load"), "5".repeat(1 << 20));
    assert_eq!(p.sample().unwrap().gpus[0].utilisation, None);
}

#[test]
fn files_vanishing_after_detection_give_unknown_values() {
    let fake = jetpack6_orin();
    let mut p = JetsonProvider::detect(fake.root()).unwrap();
    std::fs::remove_dir_all(fake.path("sys/devices")).unwrap();
    std::fs::remove_file(fake.path("proc/meminfo")).unwrap();
    let s = p.sample().unwrap();
    assert_eq!(s.gpus.len(), 1, "the GPU is still reported, as unknown");
    assert_eq!(s.gpus[0].utilisation, None);
    assert_eq!(s.gpus[0].frequency_mhz, None);
    assert_eq!(s.gpus[0].temperature_c, None);
    assert_eq!(s.gpus[0].memory_used, None);
    assert_eq!(s.memory_used, None);
    assert!(s.temperatures_c.is_empty());
}

#[test]
fn unreadable_gpu_thermal_zone_is_unknown() {
    // On Orin the GPU zone's temp fails to read while the GPU is off (htop NvidiaJetson.c):
    // here `temp` is a directory, so reading it fails.
    let fake = jetpack6_orin();
    let mut p = JetsonProvider::detect(fake.root()).unwrap();
    let temp = fake.path("sys/devices/virtual/thermal/thermal_zone1/temp");
    std::fs::remove_file(&temp).unwrap();
    std::fs::create_dir(&temp).unwrap();
    let s = p.sample().unwrap();
    assert_eq!(s.gpus[0].temperature_c, None);
    assert_eq!(s.gpus[0].utilisation, Some(0.523));
}

#[test]
fn a_host_without_tegra_gpu_is_not_a_jetson() {
    let fake = FakeRoot::new();
    assert!(JetsonProvider::detect(fake.root()).is_none());
    assert!(!is_tegra(fake.root()));
    // A non-Tegra devfreq device (a Mali GPU without `load`) is not taken for a Jetson GPU.
    fake.write(
        "sys/devices/platform/ff9a0000.gpu/devfreq/ff9a0000.gpu/cur_freq",
        "1",
    );
    fake.link(
        "sys/class/devfreq/ff9a0000.gpu",
        "../../devices/platform/ff9a0000.gpu/devfreq/ff9a0000.gpu",
    );
    assert!(JetsonProvider::detect(fake.root()).is_none());
    // Nor is a device-tree `compatible` of another vendor.
    fake.write("proc/device-tree/compatible", "rockchip,rk3588\0");
    assert!(!is_tegra(fake.root()));
    fake.write(
        "proc/device-tree/compatible",
        "nvidia,p3768-0000\0nvidia,tegra234\0",
    );
    assert!(is_tegra(fake.root()));
}

#[test]
fn host_detection_uses_the_fake_root() {
    let fake = jetpack6_orin();
    let options = TelemetryOptions {
        sysfs_root: fake.root().to_path_buf(),
        enable_nvml: false,
        enable_jetson: true,
        enable_rpi: false,
    };
    let (mut telemetry, notes) = HostTelemetry::detect(&options);
    assert_eq!(telemetry.provider_names(), ["sysinfo", "jetson"]);
    assert!(notes.is_empty(), "{notes:?}");
    let s = telemetry.sample();
    let gpu = s
        .gpu("tegra:17000000.gpu")
        .expect("Jetson GPU in the host sample");
    assert_eq!(gpu.utilisation, Some(0.523));
    // CPU and memory come from sysinfo first (this real host), then the Jetson provider.
    assert!(s.memory_used.is_some());
    assert!(
        s.temperatures_c
            .iter()
            .any(|(n, t)| n == "gpu-thermal" && *t == 42.937)
    );
}

#[test]
fn jetson_can_be_disabled() {
    let fake = jetpack6_orin();
    let options = TelemetryOptions {
        sysfs_root: fake.root().to_path_buf(),
        enable_nvml: false,
        enable_jetson: false,
        enable_rpi: false,
    };
    let (telemetry, notes) = HostTelemetry::detect(&options);
    assert_eq!(telemetry.provider_names(), ["sysinfo"]);
    assert!(notes.is_empty(), "{notes:?}");
}

#[test]
fn tegra_without_gpu_load_or_tegrastats_is_noted() {
    let fake = FakeRoot::new();
    fake.write("etc/nv_tegra_release", "# R36 (release), REVISION: 4.4\n");
    let options = TelemetryOptions {
        sysfs_root: fake.root().to_path_buf(),
        enable_nvml: false,
        enable_jetson: true,
        enable_rpi: false,
    };
    let (telemetry, notes) = HostTelemetry::detect(&options);
    assert_eq!(telemetry.provider_names(), ["sysinfo"]);
    assert_eq!(notes.len(), 1, "{notes:?}");
    assert_eq!(notes[0].provider, "jetson");
    assert!(notes[0].message.contains("tegrastats"), "{}", notes[0]);
}
