//! The Raspberry Pi provider: SoC temperature and the firmware's throttling flags, from sysfs
//! under a root directory, with `vcgencmd get_throttled` as the fallback for the flags.
//!
//! Files read (every path relative to the root):
//!
//! | what | file | format |
//! |---|---|---|
//! | board | `proc/device-tree/model` (or `sys/firmware/devicetree/base/model`) | `Raspberry Pi 5 Model B Rev 1.0` + NUL |
//! | SoC temperature | `sys/class/thermal/thermal_zone0/temp` (`type`: `cpu-thermal`) | millidegrees Celsius |
//! | throttling | `sys/devices/platform/soc/soc:firmware/get_throttled` (else any `sys/devices/platform/*/*:firmware/get_throttled`) | hex bitmask, e.g. `50005` |
//! | throttling, fallback | `usr/bin/vcgencmd get_throttled` | `throttled=0x50005` |
//!
//! The bitmask (Raspberry Pi documentation, `vcgencmd get_throttled`): bit 0 under-voltage
//! now, 1 ARM frequency capped now, 2 throttled now, 3 soft temperature limit active now;
//! bits 16–19 the same conditions "has occurred since boot". The sysfs file was added by
//! the Raspberry Pi kernel's "firmware/raspberrypi: Add a get_throttled sysfs file" and prints
//! the mask in hex without a prefix.
//!
//! # What a throttled Pi reports
//!
//! While any "now" condition holds (bits 0–3) the SoC runs below its normal speed: the sample
//! says `throttled = Some(true)` (`Some(false)` when the flags were read and none holds now),
//! and the daemon counts a local expert on a throttled host as slower (its latency model
//! slowed by `THROTTLED_SLOWDOWN`, daemon/src/ledger.rs), rather than as busy: it still
//! serves, more slowly. The provider says nothing about the CPU load; sysinfo measures it. When the flags cannot be read at all (no sysfs file, no
//! `vcgencmd`), detection notes it once and the flags stay unknown: the provider never
//! reports "not throttled" it did not read. A source that disappears after detection makes
//! the sample fail, which the merge logs once and treats as unknown.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::sysfs::{MAX_ATTR_BYTES, parse_millidegrees_c, parse_name, read_attr, read_text};
use crate::{ProviderSample, TelemetryError, TelemetryProvider};

/// The sysfs file of the firmware's throttling flags on Pi OS kernels.
const GET_THROTTLED: &str = "sys/devices/platform/soc/soc:firmware/get_throttled";
/// The device-tree model, in procfs and in sysfs.
const MODEL_FILES: [&str; 2] = [
    "proc/device-tree/model",
    "sys/firmware/devicetree/base/model",
];
/// The SoC thermal zone of every Pi kernel.
const SOC_ZONE: &str = "sys/class/thermal/thermal_zone0";
/// Longest a `vcgencmd` run may take before it is killed and the flags are unknown.
pub const VCGENCMD_TIMEOUT: Duration = Duration::from_secs(1);

/// The firmware's throttling flags (`get_throttled`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThrottleFlags(pub u32);

impl ThrottleFlags {
    /// Bits 0–3: a condition that holds now.
    const NOW: u32 = 0xF;
    /// Bits 16–19: a condition that has occurred since boot.
    const OCCURRED: u32 = 0xF << 16;

    /// Bit 0: the supply is below 4.63 V now.
    pub fn under_voltage_now(self) -> bool {
        self.0 & 1 != 0
    }
    /// Bit 1: the ARM frequency is capped now.
    pub fn arm_frequency_capped_now(self) -> bool {
        self.0 & (1 << 1) != 0
    }
    /// Bit 2: the SoC is throttled now.
    pub fn throttled_now(self) -> bool {
        self.0 & (1 << 2) != 0
    }
    /// Bit 3: the soft temperature limit is active now.
    pub fn soft_temperature_limit_now(self) -> bool {
        self.0 & (1 << 3) != 0
    }
    /// Any of bits 0–3: the SoC is degraded now.
    pub fn degraded_now(self) -> bool {
        self.0 & Self::NOW != 0
    }
    /// Any of bits 16–19: a degradation has occurred since boot.
    pub fn degraded_since_boot(self) -> bool {
        self.0 & Self::OCCURRED != 0
    }
}

/// Parses the throttling flags from the sysfs file (`50005`, hex without prefix) or from
/// `vcgencmd get_throttled` (`throttled=0x50005`). `None` for anything else.
pub fn parse_throttled(text: &str) -> Option<ThrottleFlags> {
    let text = text.trim_matches(|c: char| c.is_whitespace() || c == '\0');
    let hex = text.strip_prefix("throttled=").unwrap_or(text);
    let hex = hex
        .strip_prefix("0x")
        .or_else(|| hex.strip_prefix("0X"))
        .unwrap_or(hex);
    if hex.is_empty() || hex.len() > 8 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u32::from_str_radix(hex, 16).ok().map(ThrottleFlags)
}

/// The board model of `root` when it is a Raspberry Pi (`Raspberry Pi 5 Model B Rev 1.0`).
pub fn raspberry_pi_model(root: &Path) -> Option<String> {
    MODEL_FILES
        .iter()
        .find_map(|file| read_attr(&root.join(file), parse_name))
        .filter(|model| model.starts_with("Raspberry Pi"))
}

/// Where the throttling flags come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ThrottleSource {
    /// The firmware's sysfs file.
    Sysfs(PathBuf),
    /// `vcgencmd get_throttled`.
    Vcgencmd(PathBuf),
}

/// Raspberry Pi SoC temperature and throttling flags.
///
/// Detection finds the files once; each sample reads the temperature file and the flags
/// (one sysfs read, or one `vcgencmd` run of a few milliseconds, killed after
/// [`VCGENCMD_TIMEOUT`]).
#[derive(Debug, Clone)]
pub struct RpiProvider {
    model: String,
    zone_name: String,
    zone_temp: Option<PathBuf>,
    throttle: Option<ThrottleSource>,
    last_flags: Option<ThrottleFlags>,
}

impl RpiProvider {
    /// The provider for `root` (normally `/`) when it is a Raspberry Pi, else `None`.
    ///
    /// A board without a readable SoC temperature or throttling source is still detected:
    /// what is missing is reported by [`missing_sources`](Self::missing_sources) and stays
    /// unknown.
    pub fn detect(root: &Path) -> Option<Self> {
        let model = raspberry_pi_model(root)?;
        let zone = root.join(SOC_ZONE);
        let zone_temp = Some(zone.join("temp")).filter(|p| p.is_file());
        let zone_name =
            read_attr(&zone.join("type"), parse_name).unwrap_or_else(|| "cpu-thermal".to_owned());
        let throttle = find_get_throttled(root)
            .map(ThrottleSource::Sysfs)
            .or_else(|| {
                let program = Self::default_vcgencmd(root);
                program
                    .is_file()
                    .then_some(ThrottleSource::Vcgencmd(program))
            });
        Some(Self {
            model,
            zone_name,
            zone_temp,
            throttle,
            last_flags: None,
        })
    }

    /// The `vcgencmd` this provider would run under `root` (`usr/bin/vcgencmd`).
    pub fn default_vcgencmd(root: &Path) -> PathBuf {
        root.join("usr/bin/vcgencmd")
    }

    /// The board model read at detection.
    pub fn model(&self) -> &str {
        &self.model
    }

    /// Where the throttling flags are read from; `None`: nowhere, they are unknown.
    pub fn throttle_source(&self) -> Option<&ThrottleSource> {
        self.throttle.as_ref()
    }

    /// The flags of the last good sample (`None` before it, or when they cannot be read).
    pub fn last_flags(&self) -> Option<ThrottleFlags> {
        self.last_flags
    }

    /// Sources that detection did not find, for people (each reported once, at detection).
    pub fn missing_sources(&self) -> Vec<String> {
        let mut missing = Vec::new();
        if self.zone_temp.is_none() {
            missing.push(format!("no {SOC_ZONE}/temp; SoC temperature unknown"));
        }
        if self.throttle.is_none() {
            missing.push(format!(
                "no {GET_THROTTLED} and no usr/bin/vcgencmd; throttling unknown"
            ));
        }
        missing
    }

    fn read_flags(&self) -> Result<Option<ThrottleFlags>, TelemetryError> {
        let (path, text) = match &self.throttle {
            None => return Ok(None),
            Some(ThrottleSource::Sysfs(path)) => (path, read_text(path, MAX_ATTR_BYTES)?),
            Some(ThrottleSource::Vcgencmd(program)) => (program, run_vcgencmd(program)?),
        };
        parse_throttled(&text)
            .map(Some)
            .ok_or_else(|| TelemetryError::Unparsable {
                path: path.clone(),
                excerpt: text.chars().take(64).collect(),
            })
    }
}

impl TelemetryProvider for RpiProvider {
    fn name(&self) -> &str {
        "rpi"
    }

    fn sample(&mut self) -> Result<ProviderSample, TelemetryError> {
        let flags = match self.read_flags() {
            Ok(flags) => flags,
            Err(e) => {
                self.last_flags = None;
                return Err(e);
            }
        };
        self.last_flags = flags;
        let temperatures_c = self
            .zone_temp
            .as_deref()
            .and_then(|path| read_attr(path, parse_millidegrees_c))
            .map(|celsius| vec![(self.zone_name.clone(), celsius)])
            .unwrap_or_default();
        Ok(ProviderSample {
            // Degraded now (under-voltage, frequency capped, throttled, soft temperature limit):
            // the SoC runs below its full clock, so a local expert counts as slower (the
            // daemon's `THROTTLED_SLOWDOWN`). The CPU load is sysinfo's to report.
            throttled: flags.map(ThrottleFlags::degraded_now),
            cpu_utilisation: None,
            memory_used: None,
            temperatures_c,
            gpus: Vec::new(),
        })
    }
}

/// The firmware's `get_throttled`: the Pi OS path, else the first `*:firmware/get_throttled`
/// under any platform bus directory (the bus is named differently on some kernels).
fn find_get_throttled(root: &Path) -> Option<PathBuf> {
    let fixed = root.join(GET_THROTTLED);
    if fixed.is_file() {
        return Some(fixed);
    }
    let mut buses: Vec<PathBuf> = fs::read_dir(root.join("sys/devices/platform"))
        .map(|it| it.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    buses.sort();
    buses.into_iter().find_map(|bus| {
        let mut firmware: Vec<PathBuf> = fs::read_dir(&bus)
            .map(|it| it.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        firmware.sort();
        firmware
            .into_iter()
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.ends_with(":firmware"))
            })
            .map(|p| p.join("get_throttled"))
            .find(|p| p.is_file())
    })
}

/// Runs `program get_throttled` and returns its standard output, killing it after
/// [`VCGENCMD_TIMEOUT`].
fn run_vcgencmd(program: &Path) -> Result<String, TelemetryError> {
    let io = |source| TelemetryError::Io {
        path: program.to_path_buf(),
        source,
    };
    let mut child = Command::new(program)
        .arg("get_throttled")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|source| TelemetryError::Spawn {
            program: program.to_path_buf(),
            source,
        })?;
    let deadline = Instant::now() + VCGENCMD_TIMEOUT;
    let status = loop {
        match child.try_wait().map_err(io)? {
            Some(status) => break status,
            None if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(io(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "vcgencmd did not answer in time",
                )));
            }
            None => std::thread::sleep(Duration::from_millis(5)),
        }
    };
    let mut out = String::new();
    if let Some(stdout) = child.stdout.take() {
        stdout
            .take(MAX_ATTR_BYTES)
            .read_to_string(&mut out)
            .map_err(io)?;
    }
    if !status.success() {
        return Err(io(std::io::Error::other(format!(
            "vcgencmd get_throttled exited with {status}"
        ))));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sysfs_and_vcgencmd_forms() {
        assert_eq!(parse_throttled("50005\n"), Some(ThrottleFlags(0x50005)));
        assert_eq!(parse_throttled("0\n"), Some(ThrottleFlags(0)));
        assert_eq!(
            parse_throttled("throttled=0x50005\n"),
            Some(ThrottleFlags(0x50005))
        );
        assert_eq!(parse_throttled("throttled=0x0"), Some(ThrottleFlags(0)));
        for bad in [
            "",
            "throttled=",
            "0x",
            "zz",
            "-1",
            "123456789",
            "throttled=0x5 0",
        ] {
            assert_eq!(parse_throttled(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn flag_bits() {
        let f = ThrottleFlags(0x50005);
        assert!(f.under_voltage_now() && f.throttled_now());
        assert!(!f.arm_frequency_capped_now() && !f.soft_temperature_limit_now());
        assert!(f.degraded_now() && f.degraded_since_boot());
        // Occurred since boot, not now: not degraded now.
        let past = ThrottleFlags(0x50000);
        assert!(!past.degraded_now() && past.degraded_since_boot());
        assert!(ThrottleFlags(0x8).soft_temperature_limit_now());
        assert!(ThrottleFlags(0x2).arm_frequency_capped_now());
        assert!(!ThrottleFlags(0).degraded_now());
    }
}
