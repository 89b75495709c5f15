//! The `[telemetry]`-embeddable options of host telemetry.

use std::path::PathBuf;

use serde::Deserialize;

/// Which providers [`HostTelemetry::detect`](crate::HostTelemetry::detect) may use, and where
/// it looks for sysfs.
///
/// Every field has a default, so an empty TOML table is valid; unknown keys are rejected.
///
/// ```toml
/// sysfs_root = "/"      # tests point this at a fake tree
/// enable_nvml = true    # discrete NVIDIA GPUs through libnvidia-ml.so (loaded at run time)
/// enable_jetson = true  # Jetson iGPU through sysfs, `tegrastats` as the fallback
/// enable_rpi = true     # Raspberry Pi SoC temperature and throttling (sysfs, `vcgencmd`)
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryOptions {
    /// The file-system root under which `sys/…`, `proc/meminfo`, `etc/nv_tegra_release` and
    /// `usr/bin/tegrastats` are looked up (default `/`). The sysinfo provider always reads the
    /// real host: sysinfo has no root parameter.
    pub sysfs_root: PathBuf,
    /// Use NVML for discrete NVIDIA GPUs (default true). Its absence is only noted.
    pub enable_nvml: bool,
    /// Use the Jetson providers (sysfs, then `tegrastats`) (default true).
    pub enable_jetson: bool,
    /// Use the Raspberry Pi provider (SoC temperature and throttling flags from sysfs,
    /// `vcgencmd get_throttled` as the fallback) on a Pi (default true).
    pub enable_rpi: bool,
}

impl Default for TelemetryOptions {
    fn default() -> Self {
        Self {
            sysfs_root: PathBuf::from("/"),
            enable_nvml: true,
            enable_jetson: true,
            enable_rpi: true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_table_takes_every_default() {
        let options: TelemetryOptions = toml::from_str("").unwrap();
        assert_eq!(options, TelemetryOptions::default());
        assert_eq!(options.sysfs_root, PathBuf::from("/"));
        assert!(options.enable_nvml && options.enable_jetson && options.enable_rpi);
    }

    #[test]
    fn fields_can_be_set_one_by_one() {
        let options: TelemetryOptions =
            toml::from_str("sysfs_root = \"/tmp/fake\"\nenable_nvml = false").unwrap();
        assert_eq!(options.sysfs_root, PathBuf::from("/tmp/fake"));
        assert!(!options.enable_nvml);
        assert!(options.enable_jetson);
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let err = toml::from_str::<TelemetryOptions>("enable_nmvl = false").unwrap_err();
        assert!(err.to_string().contains("enable_nmvl"), "{err}");
    }

    #[test]
    fn wrong_types_are_rejected() {
        assert!(toml::from_str::<TelemetryOptions>("enable_jetson = \"yes\"").is_err());
    }
}
