#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Property tests: the parsers never panic, and whatever they return respects the invariants
//! (fractions in 0..=1, finite plausible temperatures), on arbitrary input.

mod common;

use proptest::prelude::*;
use qosroute_telemetry::{
    JetsonProvider, TelemetryProvider, parse_devfreq_mhz, parse_gpu_load_permille,
    parse_meminfo_used, parse_millidegrees_c, parse_name, parse_tegrastats_line, parse_throttled,
};

fn fraction_or_none(x: Option<f64>) -> bool {
    x.is_none_or(|x| (0.0..=1.0).contains(&x))
}

fn temperature_ok(t: f64) -> bool {
    t.is_finite() && t > -255.0 && (-100.0..=250.0).contains(&t)
}

/// Token soup built from real tegrastats vocabulary, to reach the field parsers.
fn tegrastats_soup() -> impl Strategy<Value = String> {
    let token = prop_oneof![
        Just("RAM".to_owned()),
        Just("CPU".to_owned()),
        Just("cpu".to_owned()),
        Just("GR3D_FREQ".to_owned()),
        Just("GR3D".to_owned()),
        Just("SWAP".to_owned()),
        Just("off".to_owned()),
        "[0-9]{1,25}/[0-9]{1,25}MB",
        "\\[([0-9]{1,4}%(@[0-9]{1,6})?|off)(,([0-9]{1,4}%(@[0-9]{1,6})?|off)){0,12}\\](@[0-9]{1,5})?",
        "[0-9]{0,4}%?@\\[?[0-9,]{0,30}\\]?",
        "[A-Za-z0-9_-]{1,10}@-?[0-9]{1,6}(\\.[0-9]{1,4})?C(/-?[0-9]{1,4}(\\.[0-9]{1,3})?C)?",
        "[A-Z_]{2,12} [0-9]{1,6}(mW)?/[0-9]{1,6}(mW)?",
        "\\PC{0,12}",
    ];
    prop::collection::vec(token, 0..24).prop_map(|tokens| tokens.join(" "))
}

proptest! {
    #[test]
    fn tegrastats_parser_never_panics_on_any_text(line in "\\PC{0,300}") {
        let _ = parse_tegrastats_line(&line);
    }

    #[test]
    fn tegrastats_parser_never_panics_on_any_bytes(bytes in prop::collection::vec(any::<u8>(), 0..400)) {
        let _ = parse_tegrastats_line(&String::from_utf8_lossy(&bytes));
    }

    #[test]
    fn tegrastats_results_respect_the_invariants(line in tegrastats_soup()) {
        if let Ok(s) = parse_tegrastats_line(&line) {
            prop_assert!(s.cpu_loads.iter().all(|c| fraction_or_none(*c)));
            prop_assert!(fraction_or_none(s.cpu_utilisation()));
            prop_assert!(fraction_or_none(s.memory_used()));
            prop_assert!(fraction_or_none(s.gpu_utilisation));
            prop_assert!(s.gpu_frequency_mhz.is_none_or(|f| (0.0..=10_000.0).contains(&f)));
            prop_assert!(s.temperatures_c.iter().all(|&(_, t)| temperature_ok(t)));
            let p = s.to_provider_sample("g");
            prop_assert!(fraction_or_none(p.gpus[0].memory_used));
        }
    }

    #[test]
    fn sysfs_parsers_never_panic_and_stay_in_range(text in "\\PC{0,64}") {
        prop_assert!(fraction_or_none(parse_gpu_load_permille(&text)));
        prop_assert!(parse_devfreq_mhz(&text).is_none_or(|f| (0.0..=10_000.0).contains(&f)));
        prop_assert!(parse_millidegrees_c(&text).is_none_or(temperature_ok));
        prop_assert!(parse_name(&text).is_none_or(|n| !n.is_empty() && n.len() <= 64));
        prop_assert!(fraction_or_none(parse_meminfo_used(&text)));
    }

    #[test]
    fn numeric_sysfs_values_of_any_size_never_panic(n in any::<i128>()) {
        let text = format!("{n}\n");
        prop_assert!(fraction_or_none(parse_gpu_load_permille(&text)));
        prop_assert!(parse_devfreq_mhz(&text).is_none_or(|f| f >= 0.0));
        prop_assert!(parse_millidegrees_c(&text).is_none_or(temperature_ok));
    }

    #[test]
    fn meminfo_with_any_numbers_is_a_fraction_or_unknown(total in any::<u64>(), avail in any::<u64>()) {
        let text = format!("MemTotal: {total} kB\nMemAvailable: {avail} kB\n");
        prop_assert!(fraction_or_none(parse_meminfo_used(&text)));
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// The Jetson provider over a fake JetPack 6 tree whose attribute files hold arbitrary bytes.
    #[test]
    fn jetson_provider_never_panics_on_arbitrary_files(
        load in prop::collection::vec(any::<u8>(), 0..32),
        hz in prop::collection::vec(any::<u8>(), 0..32),
        temp in prop::collection::vec(any::<u8>(), 0..32),
        meminfo in prop::collection::vec(any::<u8>(), 0..256),
    ) {
        let fake = common::jetpack6_orin();
        let gpu = "sys/devices/platform/bus@0/17000000.gpu";
        fake.write(&format!("{gpu}/load"), &load);
        fake.write(&format!("{gpu}/devfreq/17000000.gpu/cur_freq"), &hz);
        fake.write("sys/devices/virtual/thermal/thermal_zone1/temp", &temp);
        fake.write("proc/meminfo", &meminfo);
        let mut p = JetsonProvider::detect(fake.root()).unwrap();
        let s = p.sample().unwrap();
        prop_assert_eq!(s.gpus.len(), 1);
        prop_assert!(fraction_or_none(s.gpus[0].utilisation));
        prop_assert!(fraction_or_none(s.memory_used));
        prop_assert!(s.gpus[0].temperature_c.is_none_or(temperature_ok));
        prop_assert!(s.temperatures_c.iter().all(|&(_, t)| temperature_ok(t)));
    }

    #[test]
    fn throttled_parser_never_panics_and_round_trips(text in "\\PC{0,40}", n in any::<u32>()) {
        let _ = parse_throttled(&text);
        prop_assert_eq!(parse_throttled(&format!("{n:x}\n")).map(|f| f.0), Some(n));
        prop_assert_eq!(parse_throttled(&format!("throttled=0x{n:x}\n")).map(|f| f.0), Some(n));
    }
}
