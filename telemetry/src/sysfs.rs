//! Reading sysfs/procfs attribute files, and the pure parsers of their contents.
//!
//! Every parser takes the text of one file and returns `None` for anything it does not
//! understand (empty, garbage, out-of-range or huge numbers): unknown is never 0.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use crate::TelemetryError;

/// Largest sysfs attribute read (sysfs attributes are at most one page).
pub(crate) const MAX_ATTR_BYTES: u64 = 4096;
/// Largest `/proc/meminfo` read (about 1.5 KiB on current kernels).
pub(crate) const MAX_MEMINFO_BYTES: u64 = 16 * 1024;

/// Highest plausible clock of a GPU, MHz (anything above is garbage).
const MAX_PLAUSIBLE_MHZ: f64 = 10_000.0;
/// Plausible temperature range of a working sensor, °C.
const PLAUSIBLE_TEMPERATURE_C: std::ops::RangeInclusive<f64> = -100.0..=250.0;
/// Temperatures at or below this are "sensor offline" sentinels: Tegra reports -256 °C
/// (`-256000` in sysfs, `CV0@-256C` in tegrastats) for a powered-down sensor.
const OFFLINE_SENTINEL_C: f64 = -255.0;

/// Reads at most `max` bytes of a file as (lossy) UTF-8 text.
pub(crate) fn read_text(path: &Path, max: u64) -> Result<String, TelemetryError> {
    let io = |source| TelemetryError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(io)?;
    let mut bytes = Vec::new();
    file.take(max).read_to_end(&mut bytes).map_err(io)?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// Reads one sysfs attribute and parses it; `None` when missing, unreadable or unparsable.
pub(crate) fn read_attr<T>(path: &Path, parse: impl FnOnce(&str) -> Option<T>) -> Option<T> {
    read_text(path, MAX_ATTR_BYTES)
        .ok()
        .and_then(|text| parse(&text))
}

/// The text of a one-value attribute: surrounding whitespace and NULs removed.
fn value(text: &str) -> &str {
    text.trim_matches(|c: char| c.is_whitespace() || c == '\0')
}

/// Clamps nothing: returns `Some(x)` only when `x` is a finite fraction in `0..=1`.
pub(crate) fn fraction(x: f64) -> Option<f64> {
    (x.is_finite() && (0.0..=1.0).contains(&x)).then_some(x)
}

/// Parses a Tegra GPU `load` attribute (nvgpu: busy time per mille, `0..=1000`) into a fraction.
///
/// Values above 1000, negative or non-numeric text are garbage: `None`.
pub fn parse_gpu_load_permille(text: &str) -> Option<f64> {
    let permille: u32 = value(text).parse().ok()?;
    (permille <= 1000).then(|| f64::from(permille) / 1000.0)
}

/// Parses a devfreq `cur_freq` attribute (Hz) into MHz.
///
/// Zero is kept (a rail-gated GPU reports 0 Hz); implausible clocks (> 10 GHz) are `None`.
pub fn parse_devfreq_mhz(text: &str) -> Option<f64> {
    let hz: u64 = value(text).parse().ok()?;
    let mhz = hz as f64 / 1e6;
    (mhz <= MAX_PLAUSIBLE_MHZ).then_some(mhz)
}

/// Parses a thermal-zone `temp` attribute (millidegrees Celsius) into °C.
///
/// The Tegra "sensor offline" value (-256 °C) and implausible readings are `None`.
pub fn parse_millidegrees_c(text: &str) -> Option<f64> {
    let milli: i64 = value(text).parse().ok()?;
    plausible_temperature(milli as f64 / 1000.0)
}

/// `Some(celsius)` for a reading of a working sensor, `None` for the offline sentinel or junk.
pub(crate) fn plausible_temperature(celsius: f64) -> Option<f64> {
    (celsius.is_finite()
        && celsius > OFFLINE_SENTINEL_C
        && PLAUSIBLE_TEMPERATURE_C.contains(&celsius))
    .then_some(celsius)
}

/// Parses a name attribute (thermal zone `type`, device-tree `of_node/name`, which ends in a
/// NUL): one printable token of at most 64 characters.
pub fn parse_name(text: &str) -> Option<String> {
    let name = value(text);
    let printable = name.chars().all(|c| c.is_ascii_graphic() || c == ' ');
    (!name.is_empty() && name.len() <= 64 && printable).then(|| name.to_owned())
}

/// Parses `/proc/meminfo` into the fraction of RAM in use: `1 - MemAvailable / MemTotal`
/// (`MemFree + Buffers + Cached` stands in for `MemAvailable` on kernels before 3.14).
pub fn parse_meminfo_used(text: &str) -> Option<f64> {
    let mut total = None;
    let mut available = None;
    let (mut free, mut buffers, mut cached) = (None, None, None);
    for line in text.lines() {
        let Some((key, rest)) = line.split_once(':') else {
            continue;
        };
        let kib = rest
            .split_whitespace()
            .next()
            .and_then(|n| n.parse::<u64>().ok());
        match key.trim() {
            "MemTotal" => total = kib,
            "MemAvailable" => available = kib,
            "MemFree" => free = kib,
            "Buffers" => buffers = kib,
            "Cached" => cached = kib,
            _ => {}
        }
    }
    let total = total.filter(|&t| t > 0)? as f64;
    let available = match available {
        Some(a) => a as f64,
        None => free? as f64 + buffers? as f64 + cached? as f64,
    };
    fraction(1.0 - available / total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpu_load_is_per_mille() {
        assert_eq!(parse_gpu_load_permille("0\n"), Some(0.0));
        assert_eq!(parse_gpu_load_permille("500\n"), Some(0.5));
        assert_eq!(parse_gpu_load_permille("1000"), Some(1.0));
        assert_eq!(parse_gpu_load_permille("  37 \n"), Some(0.037));
    }

    #[test]
    fn gpu_load_garbage_is_unknown() {
        for text in [
            "",
            "\n",
            "garbage",
            "1001",
            "-1",
            "12.5",
            "99999999999999999999999999",
            "5 5",
        ] {
            assert_eq!(parse_gpu_load_permille(text), None, "{text:?}");
        }
    }

    #[test]
    fn devfreq_is_hz() {
        assert_eq!(parse_devfreq_mhz("918000000\n"), Some(918.0));
        assert_eq!(parse_devfreq_mhz("76800000"), Some(76.8));
        assert_eq!(parse_devfreq_mhz("0"), Some(0.0));
    }

    #[test]
    fn devfreq_garbage_is_unknown() {
        for text in [
            "",
            "fast",
            "-1",
            "18446744073709551615",
            "184467440737095516150",
            "1.3e9",
        ] {
            assert_eq!(parse_devfreq_mhz(text), None, "{text:?}");
        }
    }

    #[test]
    fn thermal_zone_temp_is_millidegrees() {
        assert_eq!(parse_millidegrees_c("45500\n"), Some(45.5));
        assert_eq!(parse_millidegrees_c("-5000"), Some(-5.0));
        assert_eq!(parse_millidegrees_c("0"), Some(0.0));
    }

    #[test]
    fn offline_and_implausible_temperatures_are_unknown() {
        for text in [
            "-256000",
            "-255500",
            "",
            "hot",
            "9223372036854775807",
            "400000",
            "45.5",
        ] {
            assert_eq!(parse_millidegrees_c(text), None, "{text:?}");
        }
    }

    #[test]
    fn names_are_trimmed_including_the_device_tree_nul() {
        assert_eq!(parse_name("GPU-therm\n").as_deref(), Some("GPU-therm"));
        assert_eq!(parse_name("gpu\0").as_deref(), Some("gpu"));
        assert_eq!(parse_name("ga10b\0\n").as_deref(), Some("ga10b"));
        assert_eq!(parse_name(""), None);
        assert_eq!(parse_name("\0"), None);
        assert_eq!(parse_name("bad\u{7}bell"), None);
        assert_eq!(parse_name(&"x".repeat(65)), None);
    }

    #[test]
    fn meminfo_uses_mem_available() {
        let text = "MemTotal:        8000000 kB\nMemFree:          500000 kB\n\
                    MemAvailable:    2000000 kB\nBuffers:           10000 kB\n";
        assert_eq!(parse_meminfo_used(text), Some(0.75));
    }

    #[test]
    fn meminfo_falls_back_to_free_buffers_cached() {
        let text = "MemTotal: 1000 kB\nMemFree: 100 kB\nBuffers: 100 kB\nCached: 300 kB\n";
        assert_eq!(parse_meminfo_used(text), Some(0.5));
    }

    #[test]
    fn meminfo_garbage_is_unknown() {
        for text in [
            "",
            "garbage",
            "MemTotal: 0 kB\nMemAvailable: 0 kB",
            "MemTotal: 100 kB",
            "MemTotal: 100 kB\nMemAvailable: 200 kB",
            "MemTotal: x kB\nMemAvailable: 1 kB",
            "MemTotal: 99999999999999999999999 kB\nMemAvailable: 1 kB",
        ] {
            assert_eq!(parse_meminfo_used(text), None, "{text:?}");
        }
    }

    #[test]
    fn fraction_rejects_out_of_range_and_nan() {
        assert_eq!(fraction(0.5), Some(0.5));
        assert_eq!(fraction(-0.1), None);
        assert_eq!(fraction(1.1), None);
        assert_eq!(fraction(f64::NAN), None);
        assert_eq!(fraction(f64::INFINITY), None);
    }

    #[test]
    fn missing_files_read_as_unknown() {
        assert_eq!(
            read_attr(
                Path::new("/nonexistent/qosroute/load"),
                parse_gpu_load_permille
            ),
            None
        );
        assert!(matches!(
            read_text(Path::new("/nonexistent/qosroute/load"), 10),
            Err(TelemetryError::Io { .. })
        ));
    }

    #[test]
    fn huge_and_binary_files_are_read_bounded_and_unknown() {
        let dir = tempfile::tempdir().unwrap();
        let huge = dir.path().join("huge");
        std::fs::write(&huge, "9".repeat(1 << 20)).unwrap();
        assert_eq!(read_text(&huge, MAX_ATTR_BYTES).unwrap().len(), 4096);
        assert_eq!(read_attr(&huge, parse_gpu_load_permille), None);
        let binary = dir.path().join("binary");
        std::fs::write(&binary, [0xff, 0xfe, 0x00, 0x35]).unwrap();
        assert_eq!(read_attr(&binary, parse_gpu_load_permille), None);
        assert_eq!(read_attr(&binary, parse_name), None);
    }
}
