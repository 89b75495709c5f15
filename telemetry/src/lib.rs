//! Host telemetry for the `qosrouted` gateway: CPU, memory and temperatures of the host, and
//! the load of its GPUs, for experts that run on the same host as the daemon.
//!
//! [`HostTelemetry::detect`] finds the providers that work on this host and
//! [`HostTelemetry::sample`] merges their readings into one [`HostSample`], meant to be taken
//! about once a second:
//!
//! - [`SysinfoProvider`] (every host): CPU utilisation, RAM in use, component temperatures.
//! - [`NvmlProvider`] (discrete NVIDIA GPUs): utilisation, memory, temperature, SM clock.
//!   `libnvidia-ml.so` is loaded at run time; without it the provider is left out and the
//!   absence is noted once.
//! - [`JetsonProvider`] (Jetson, where NVML does not exist): iGPU load and clock, thermal zones,
//!   unified memory, from sysfs under [`TelemetryOptions::sysfs_root`]; [`TegrastatsProvider`]
//!   is the fallback when sysfs has no readable GPU load ([`parse_tegrastats_line`] is the
//!   pure parser of its lines).
//! - [`RpiProvider`] (Raspberry Pi): SoC temperature and the firmware's throttling flags from
//!   sysfs, `vcgencmd get_throttled` as the fallback; a Pi throttled *now* makes the host
//!   sample [`HostSample::throttled`] (see the `rpi` module).
//!
//! # Unknown or stale is never idle
//!
//! A value that could not be read is `None`, never 0, and a sample older than the daemon's
//! staleness bound ([`HostSample::is_stale`]) says nothing. The daemon must treat an unknown
//! or stale value — and a GPU it expected but does not find in the sample — as *saturated*:
//! an expert whose host cannot be observed is not offered new work on the belief that it is
//! idle.

mod error;
mod jetson;
mod nvml_provider;
mod options;
mod rpi;
mod sysfs;
mod sysinfo_provider;
mod tegrastats;

use std::fmt;
use std::path::Path;
use std::time::{Duration, Instant};

pub use error::{TegrastatsError, TelemetryError};
pub use jetson::{JetsonProvider, is_tegra};
pub use nvml_provider::NvmlProvider;
pub use options::TelemetryOptions;
pub use rpi::{
    RpiProvider, ThrottleFlags, ThrottleSource, VCGENCMD_TIMEOUT, parse_throttled,
    raspberry_pi_model,
};
pub use sysfs::{
    parse_devfreq_mhz, parse_gpu_load_permille, parse_meminfo_used, parse_millidegrees_c,
    parse_name,
};
pub use sysinfo_provider::SysinfoProvider;
pub use tegrastats::{
    MAX_LINE_BYTES, TEGRASTATS_GPU_NAME, TegrastatsProvider, TegrastatsSample,
    parse_tegrastats_line,
};

use sysfs::fraction;

/// How often the `tegrastats` fallback is asked to report.
pub const TEGRASTATS_INTERVAL: Duration = Duration::from_secs(1);

/// A source of host telemetry (sysinfo, NVML, Jetson sysfs, `tegrastats`).
///
/// `sample` is called about once a second: it must only read what it reports, never
/// re-enumerate the system, and must not block for long.
pub trait TelemetryProvider: Send + fmt::Debug {
    /// Short stable name, for logs and notes (`sysinfo`, `nvml`, `jetson`, `tegrastats`,
    /// `rpi`).
    fn name(&self) -> &str;

    /// Reads the current values. Values the provider could not read are `None`; an error
    /// means nothing this provider would report can be trusted this round.
    fn sample(&mut self) -> Result<ProviderSample, TelemetryError>;
}

/// What one provider read in one round. Fractions are in `0..=1`; unknown is `None`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ProviderSample {
    /// Busy fraction of all CPUs.
    pub cpu_utilisation: Option<f64>,
    /// Fraction of RAM in use.
    pub memory_used: Option<f64>,
    /// Temperatures of working sensors, °C (sensors that could not be read are left out).
    pub temperatures_c: Vec<(String, f64)>,
    /// Every GPU the provider knows, readable or not.
    pub gpus: Vec<GpuSample>,
    /// Whether the board runs below its full clock now (thermal or power throttling), if the
    /// provider can tell (the Raspberry Pi provider, from the firmware's flags).
    pub throttled: Option<bool>,
}

/// One GPU in a sample. Fractions are in `0..=1`; unknown is `None`.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuSample {
    /// Stable name: `nvml<index>:<model>`, `tegra:<devfreq node>` or `tegra:gr3d`.
    pub name: String,
    /// Busy fraction.
    pub utilisation: Option<f64>,
    /// Fraction of its memory in use (on Jetson, unified memory: the fraction of RAM in use).
    pub memory_used: Option<f64>,
    /// Die temperature, °C.
    pub temperature_c: Option<f64>,
    /// Current clock (NVML: SM clock; Jetson: GPU devfreq clock), MHz.
    pub frequency_mhz: Option<f64>,
}

impl GpuSample {
    /// A GPU of which nothing is known.
    pub fn unknown(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            utilisation: None,
            memory_used: None,
            temperature_c: None,
            frequency_mhz: None,
        }
    }
}

/// Everything the host telemetry knows at one instant, merged over all providers.
///
/// Fractions are in `0..=1`; unknown is `None`, never 0 (see the crate documentation: unknown
/// or stale is never idle).
#[derive(Debug, Clone, PartialEq)]
pub struct HostSample {
    /// When the reading started.
    pub at: Instant,
    /// Busy fraction of all CPUs.
    pub cpu_utilisation: Option<f64>,
    /// Fraction of RAM in use.
    pub memory_used: Option<f64>,
    /// Temperatures of working sensors, °C, by sensor name (each name once).
    pub temperatures_c: Vec<(String, f64)>,
    /// Every GPU found at detection; one whose provider failed this round has all fields `None`.
    pub gpus: Vec<GpuSample>,
    /// Whether the board runs below its full clock now (thermal or power throttling): `true`
    /// when any provider says so, `false` when one can tell and none says so, `None` when none
    /// can tell (only the Raspberry Pi provider reads such flags).
    pub throttled: Option<bool>,
}

impl HostSample {
    /// A sample at `at` of which nothing is known.
    pub fn unknown(at: Instant) -> Self {
        Self {
            at,
            cpu_utilisation: None,
            memory_used: None,
            temperatures_c: Vec::new(),
            gpus: Vec::new(),
            throttled: None,
        }
    }

    /// True when this sample is older than `max_age` at `now`.
    ///
    /// The rule: a stale sample is treated like an unknown one, i.e. as *saturated*, never as
    /// idle. A sample from the future (a clock mix-up) counts as fresh.
    pub fn is_stale(&self, now: Instant, max_age: Duration) -> bool {
        now.saturating_duration_since(self.at) > max_age
    }

    /// The GPU of that name, if the sample has it.
    pub fn gpu(&self, name: &str) -> Option<&GpuSample> {
        self.gpus.iter().find(|g| g.name == name)
    }
}

/// Something detection found worth telling the operator, e.g. "NVML not available".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DetectionNote {
    /// The provider concerned (`sysinfo`, `nvml`, `jetson`, `tegrastats`).
    pub provider: String,
    /// What happened, for people.
    pub message: String,
}

impl fmt::Display for DetectionNote {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.provider, self.message)
    }
}

/// One provider and what the merge remembers of it.
#[derive(Debug)]
struct Slot {
    provider: Box<dyn TelemetryProvider>,
    /// GPU names of its last good sample, reported as unknown when it fails.
    known_gpus: Vec<String>,
    /// The kind of error of its last sample, if it failed (logged once per kind, so that a
    /// `Stale { age }` growing every second is not logged every second).
    failing: Option<std::mem::Discriminant<TelemetryError>>,
}

/// The providers found on this host, merged into one [`HostSample`] per call.
#[derive(Debug)]
pub struct HostTelemetry {
    slots: Vec<Slot>,
}

impl HostTelemetry {
    /// Finds the providers that work on this host. Never fails: a provider that does not work
    /// here is left out and reported once in the returned notes (and by `tracing::info!`).
    ///
    /// Order, which is also the merge priority for CPU and memory: the Raspberry Pi provider
    /// (throttling flags and the SoC temperature, no CPU load), sysinfo, NVML,
    /// Jetson sysfs (or, on a Tegra system without a readable GPU load, `tegrastats`).
    pub fn detect(options: &TelemetryOptions) -> (Self, Vec<DetectionNote>) {
        let mut providers: Vec<Box<dyn TelemetryProvider>> = Vec::new();
        let mut notes = Vec::new();
        let mut note = |provider: &str, message: String| {
            tracing::info!(provider, "{message}");
            notes.push(DetectionNote {
                provider: provider.to_owned(),
                message,
            });
        };

        let mut sysinfo = match SysinfoProvider::new() {
            Ok(p) => Some(p),
            Err(e) => {
                note(
                    "sysinfo",
                    format!("unavailable ({e}); CPU and memory unknown"),
                );
                None
            }
        };

        if options.enable_nvml {
            match NvmlProvider::init() {
                Ok(p) if p.gpu_names().next().is_some() => providers.push(Box::new(p)),
                Ok(_) => note("nvml", "NVML loaded but it sees no GPU".to_owned()),
                Err(e) => note(
                    "nvml",
                    format!("not available ({e}); no discrete NVIDIA GPU telemetry"),
                ),
            }
        }

        if options.enable_jetson {
            let jetson = detect_jetson(&options.sysfs_root, &mut note);
            if let (Some(sysinfo), Some(JetsonKind::Sysfs)) =
                (&mut sysinfo, jetson.as_ref().map(|j| j.0))
            {
                // The Jetson provider reads the thermal zones under their type names; sysinfo
                // would repeat them as `thermal_zoneN`.
                sysinfo.drop_thermal_zones();
            }
            providers.extend(jetson.map(|j| j.1));
        }
        if let Some(sysinfo) = sysinfo {
            providers.insert(0, Box::new(sysinfo));
        }
        if options.enable_rpi {
            match RpiProvider::detect(&options.sysfs_root) {
                Some(p) => {
                    for missing in p.missing_sources() {
                        note("rpi", format!("{}: {missing}", p.model()));
                    }
                    providers.insert(0, Box::new(p));
                }
                None => note(
                    "rpi",
                    format!(
                        "no Raspberry Pi model under {} (not a Pi)",
                        options.sysfs_root.display()
                    ),
                ),
            }
        }

        (Self::from_providers(providers), notes)
    }

    /// Telemetry over the given providers (tests, or a daemon choosing its own).
    pub fn from_providers(providers: Vec<Box<dyn TelemetryProvider>>) -> Self {
        let slots = providers
            .into_iter()
            .map(|provider| Slot {
                provider,
                known_gpus: Vec::new(),
                failing: None,
            })
            .collect();
        Self { slots }
    }

    /// Names of the providers in use, in merge order.
    pub fn provider_names(&self) -> Vec<&str> {
        self.slots.iter().map(|s| s.provider.name()).collect()
    }

    /// Reads every provider and merges the results.
    ///
    /// CPU and memory come from the first provider that knows them; temperatures are joined
    /// (a name already present is not repeated); GPUs are joined. A provider that fails makes
    /// its values unknown: its GPUs of the last good sample appear with every field `None`.
    /// Failures are logged with `tracing::warn!` once per kind of error (then `debug!`), and
    /// recoveries with `tracing::info!`.
    pub fn sample(&mut self) -> HostSample {
        let mut merged = HostSample::unknown(Instant::now());
        for slot in &mut self.slots {
            match slot.provider.sample() {
                Ok(sample) => {
                    if slot.failing.take().is_some() {
                        tracing::info!(provider = slot.provider.name(), "telemetry recovered");
                    }
                    slot.known_gpus = sample.gpus.iter().map(|g| g.name.clone()).collect();
                    merge(&mut merged, sample);
                }
                Err(error) => {
                    let kind = std::mem::discriminant(&error);
                    if slot.failing == Some(kind) {
                        tracing::debug!(provider = slot.provider.name(), %error, "still failing");
                    } else {
                        tracing::warn!(
                            provider = slot.provider.name(),
                            %error,
                            "telemetry provider failed; its values are unknown"
                        );
                    }
                    slot.failing = Some(kind);
                    merged
                        .gpus
                        .extend(slot.known_gpus.iter().map(|name| GpuSample::unknown(name)));
                }
            }
        }
        merged
    }
}

/// Which Jetson provider detection chose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum JetsonKind {
    Sysfs,
    Tegrastats,
}

/// The Jetson provider for `root`: sysfs, else `tegrastats` on a Tegra system, else none.
fn detect_jetson(
    root: &Path,
    note: &mut impl FnMut(&str, String),
) -> Option<(JetsonKind, Box<dyn TelemetryProvider>)> {
    if let Some(p) = JetsonProvider::detect(root) {
        return Some((JetsonKind::Sysfs, Box::new(p)));
    }
    if !is_tegra(root) {
        note(
            "jetson",
            format!("no Tegra GPU under {} (not a Jetson)", root.display()),
        );
        return None;
    }
    let program = TegrastatsProvider::default_program(root);
    if !program.is_file() {
        note(
            "jetson",
            format!(
                "Tegra system but no readable GPU load in sysfs and no {}; GPU unknown",
                program.display()
            ),
        );
        return None;
    }
    match TegrastatsProvider::spawn(&program, TEGRASTATS_INTERVAL) {
        Ok(p) => {
            note(
                "tegrastats",
                format!(
                    "no readable GPU load in sysfs; using {} as the fallback",
                    program.display()
                ),
            );
            Some((JetsonKind::Tegrastats, Box::new(p)))
        }
        Err(e) => {
            note("tegrastats", format!("{e}; GPU unknown"));
            None
        }
    }
}

/// Adds one provider's sample to the merged one, upholding the invariants (fractions in
/// `0..=1`, finite temperatures, each temperature name once).
fn merge(merged: &mut HostSample, sample: ProviderSample) {
    merged.throttled = match (merged.throttled, sample.throttled) {
        (Some(true), _) | (_, Some(true)) => Some(true),
        (Some(false), _) | (_, Some(false)) => Some(false),
        (None, None) => None,
    };
    if merged.cpu_utilisation.is_none() {
        merged.cpu_utilisation = sample.cpu_utilisation.and_then(fraction);
    }
    if merged.memory_used.is_none() {
        merged.memory_used = sample.memory_used.and_then(fraction);
    }
    for (name, celsius) in sample.temperatures_c {
        if celsius.is_finite() && !merged.temperatures_c.iter().any(|(n, _)| *n == name) {
            merged.temperatures_c.push((name, celsius));
        }
    }
    merged
        .gpus
        .extend(sample.gpus.into_iter().map(|gpu| GpuSample {
            utilisation: gpu.utilisation.and_then(fraction),
            memory_used: gpu.memory_used.and_then(fraction),
            temperature_c: gpu.temperature_c.filter(|t| t.is_finite()),
            frequency_mhz: gpu.frequency_mhz.filter(|f| f.is_finite() && *f >= 0.0),
            name: gpu.name,
        }));
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    /// A provider replaying scripted results.
    #[derive(Debug)]
    struct Scripted {
        name: &'static str,
        results: VecDeque<Result<ProviderSample, TelemetryError>>,
    }

    impl TelemetryProvider for Scripted {
        fn name(&self) -> &str {
            self.name
        }
        fn sample(&mut self) -> Result<ProviderSample, TelemetryError> {
            self.results
                .pop_front()
                .unwrap_or(Err(TelemetryError::Exited))
        }
    }

    fn scripted(
        name: &'static str,
        results: Vec<Result<ProviderSample, TelemetryError>>,
    ) -> Box<dyn TelemetryProvider> {
        Box::new(Scripted {
            name,
            results: results.into(),
        })
    }

    fn gpu(name: &str, utilisation: f64) -> GpuSample {
        GpuSample {
            utilisation: Some(utilisation),
            ..GpuSample::unknown(name)
        }
    }

    #[test]
    fn first_provider_that_knows_wins_and_gpus_are_joined() {
        let a = ProviderSample {
            throttled: None,
            cpu_utilisation: None,
            memory_used: Some(0.25),
            temperatures_c: vec![("cpu-thermal".into(), 40.0)],
            gpus: vec![gpu("nvml0:A", 0.5)],
        };
        let b = ProviderSample {
            throttled: None,
            cpu_utilisation: Some(0.75),
            memory_used: Some(0.9),
            temperatures_c: vec![("cpu-thermal".into(), 41.0), ("GPU-therm".into(), 50.0)],
            gpus: vec![gpu("tegra:gpu", 0.1)],
        };
        let mut t = HostTelemetry::from_providers(vec![
            scripted("a", vec![Ok(a)]),
            scripted("b", vec![Ok(b)]),
        ]);
        assert_eq!(t.provider_names(), ["a", "b"]);
        let s = t.sample();
        assert_eq!(s.cpu_utilisation, Some(0.75));
        assert_eq!(s.memory_used, Some(0.25));
        assert_eq!(
            s.temperatures_c,
            [
                ("cpu-thermal".to_owned(), 40.0),
                ("GPU-therm".to_owned(), 50.0)
            ]
        );
        assert_eq!(s.gpus.len(), 2);
        assert_eq!(s.gpu("tegra:gpu").and_then(|g| g.utilisation), Some(0.1));
    }

    #[test]
    fn a_failing_provider_leaves_its_gpus_unknown_not_missing() {
        let ok = ProviderSample {
            throttled: None,
            gpus: vec![gpu("nvml0:A", 0.3)],
            ..ProviderSample::default()
        };
        let mut t = HostTelemetry::from_providers(vec![scripted(
            "nvml",
            vec![Ok(ok.clone()), Err(TelemetryError::NoDataYet), Ok(ok)],
        )]);
        assert_eq!(t.sample().gpus[0].utilisation, Some(0.3));
        let failed = t.sample();
        assert_eq!(failed.gpus, [GpuSample::unknown("nvml0:A")]);
        assert_eq!(t.sample().gpus[0].utilisation, Some(0.3));
    }

    /// Collects formatted log lines.
    #[derive(Clone, Default)]
    struct Logs(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Logs {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_failure_is_warned_once_per_kind_and_the_recovery_once() {
        let stale = |s| {
            Err(TelemetryError::Stale {
                age: Duration::from_secs(s),
            })
        };
        let mut t = HostTelemetry::from_providers(vec![scripted(
            "tegrastats",
            vec![
                stale(4),
                stale(5),
                stale(6),
                Err(TelemetryError::Exited),
                Ok(ProviderSample::default()),
                Ok(ProviderSample::default()),
            ],
        )]);
        let logs = Logs::default();
        let writer = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::INFO)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            for _ in 0..6 {
                t.sample();
            }
        });
        let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
        assert_eq!(text.matches("WARN").count(), 2, "{text}");
        assert_eq!(text.matches("telemetry recovered").count(), 1, "{text}");
    }

    #[test]
    fn out_of_range_values_from_a_provider_become_unknown() {
        let bad = ProviderSample {
            throttled: None,
            cpu_utilisation: Some(1.5),
            memory_used: Some(f64::NAN),
            temperatures_c: vec![("x".into(), f64::INFINITY)],
            gpus: vec![GpuSample {
                frequency_mhz: Some(-1.0),
                temperature_c: Some(f64::NAN),
                ..gpu("g", -0.5)
            }],
        };
        let mut t = HostTelemetry::from_providers(vec![scripted("bad", vec![Ok(bad)])]);
        let s = t.sample();
        assert_eq!(s.cpu_utilisation, None);
        assert_eq!(s.memory_used, None);
        assert!(s.temperatures_c.is_empty());
        assert_eq!(s.gpus, [GpuSample::unknown("g")]);
    }

    #[test]
    fn no_provider_means_everything_unknown() {
        let mut t = HostTelemetry::from_providers(Vec::new());
        let s = t.sample();
        assert_eq!(s.cpu_utilisation, None);
        assert_eq!(s.memory_used, None);
        assert!(s.gpus.is_empty() && s.temperatures_c.is_empty());
    }

    #[test]
    fn staleness_rule() {
        let at = Instant::now();
        let s = HostSample::unknown(at);
        let max_age = Duration::from_secs(3);
        assert!(!s.is_stale(at, max_age));
        assert!(!s.is_stale(at + max_age, max_age));
        assert!(s.is_stale(at + max_age + Duration::from_millis(1), max_age));
        // A reference instant before the sample (clock mix-up) is not stale.
        let later = HostSample::unknown(at + Duration::from_secs(10));
        assert!(!later.is_stale(at, max_age));
    }

    #[test]
    fn host_telemetry_can_move_to_a_blocking_task() {
        fn assert_send<T: Send + 'static>() {}
        assert_send::<HostTelemetry>();
        assert_send::<HostSample>();
    }

    #[test]
    fn detection_note_displays_provider_and_message() {
        let n = DetectionNote {
            provider: "nvml".into(),
            message: "absent".into(),
        };
        assert_eq!(n.to_string(), "nvml: absent");
    }
}
