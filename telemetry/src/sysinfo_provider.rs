//! The sysinfo provider (every host): CPU utilisation, RAM in use, component temperatures.

use std::time::Instant;

use sysinfo::{Component, Components, MINIMUM_CPU_UPDATE_INTERVAL, MemoryRefreshKind, System};

use crate::sysfs::{fraction, plausible_temperature};
use crate::{ProviderSample, TelemetryError, TelemetryProvider};

/// CPU, memory and temperatures through sysinfo.
///
/// Cheap to sample: each call refreshes only the CPU times (`/proc/stat` on Linux), the RAM
/// figures (`/proc/meminfo`) and the temperature input of each component found at creation
/// (hwmon, or thermal zones where there is no hwmon); the system is never re-enumerated.
///
/// CPU utilisation is a difference of two readings of the CPU times at least
/// [`MINIMUM_CPU_UPDATE_INTERVAL`] (200 ms on Linux) apart. Creation takes the first reading;
/// a sample taken before the interval has passed reports the CPU as unknown (`None`), never
/// as 0, and later samples closer together than the interval reuse the last difference.
#[derive(Debug)]
pub struct SysinfoProvider {
    system: System,
    components: Components,
    /// When the CPU times were last read.
    cpu_read_at: Instant,
    /// A difference of two readings exists.
    cpu_known: bool,
    /// Leave out components found through thermal zones (another provider reads them).
    skip_thermal_zones: bool,
}

impl SysinfoProvider {
    /// Creates the provider, enumerating the components once and taking the first CPU reading.
    pub fn new() -> Result<Self, TelemetryError> {
        if !sysinfo::IS_SUPPORTED_SYSTEM {
            return Err(TelemetryError::SysinfoUnsupported);
        }
        let components = Components::new_with_refreshed_list();
        let mut system = System::new();
        // The first reading of the CPU times, last, so that the interval starts now.
        system.refresh_cpu_usage();
        Ok(Self {
            system,
            components,
            cpu_read_at: Instant::now(),
            cpu_known: false,
            skip_thermal_zones: false,
        })
    }

    /// Names of the temperature sensors read: the label of each component found at creation,
    /// or its id (`thermal_zoneN`) when it has no label.
    pub fn component_labels(&self) -> impl Iterator<Item = &str> {
        self.components
            .iter()
            .filter(|c| !(self.skip_thermal_zones && is_thermal_zone(c)))
            .map(component_name)
    }

    /// Stops reading the components sysinfo found through thermal zones (id `thermal_zoneN`,
    /// its fallback where hwmon has no temperature), for when another provider reads them.
    pub fn drop_thermal_zones(&mut self) {
        self.skip_thermal_zones = true;
    }

    fn cpu_utilisation(&mut self) -> Option<f64> {
        let now = Instant::now();
        if now.duration_since(self.cpu_read_at) >= MINIMUM_CPU_UPDATE_INTERVAL {
            self.system.refresh_cpu_usage();
            self.cpu_read_at = now;
            self.cpu_known = true;
        }
        if !self.cpu_known || self.system.cpus().is_empty() {
            return None;
        }
        fraction(f64::from(self.system.global_cpu_usage()) / 100.0)
    }

    fn memory_used(&mut self) -> Option<f64> {
        self.system
            .refresh_memory_specifics(MemoryRefreshKind::nothing().with_ram());
        let total = self.system.total_memory();
        if total == 0 {
            return None;
        }
        fraction(self.system.used_memory() as f64 / total as f64)
    }

    fn temperatures_c(&mut self) -> Vec<(String, f64)> {
        let mut temperatures = Vec::with_capacity(self.components.len());
        for component in self.components.iter_mut() {
            if self.skip_thermal_zones && is_thermal_zone(component) {
                continue;
            }
            component.refresh();
            if let Some(celsius) = component
                .temperature()
                .and_then(|t| plausible_temperature(f64::from(t)))
            {
                temperatures.push((component_name(component).to_owned(), celsius));
            }
        }
        temperatures
    }
}

impl TelemetryProvider for SysinfoProvider {
    fn name(&self) -> &str {
        "sysinfo"
    }

    fn sample(&mut self) -> Result<ProviderSample, TelemetryError> {
        Ok(ProviderSample {
            throttled: None,
            cpu_utilisation: self.cpu_utilisation(),
            memory_used: self.memory_used(),
            temperatures_c: self.temperatures_c(),
            gpus: Vec::new(),
        })
    }
}

/// A component's label (hwmon: `<chip> <label>`, e.g. `coretemp Package id 0`), or its id
/// (`thermal_zone0`) where sysinfo found it through the thermal-zone fallback, which leaves
/// the label empty (Raspberry Pi).
fn component_name(component: &Component) -> &str {
    match (component.label(), component.id()) {
        ("", Some(id)) => id,
        ("", None) => "unnamed sensor",
        (label, _) => label,
    }
}

/// Found through sysinfo's thermal-zone fallback rather than hwmon.
fn is_thermal_zone(component: &Component) -> bool {
    component
        .id()
        .is_some_and(|id| id.starts_with("thermal_zone"))
}
