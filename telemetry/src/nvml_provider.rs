//! The NVML provider: discrete NVIDIA GPUs through `libnvidia-ml.so`, loaded at run time by
//! `nvml-wrapper` (no link-time dependency: a host without the driver just fails `init`).

use nvml_wrapper::Nvml;
use nvml_wrapper::enum_wrappers::device::{Clock, TemperatureSensor};

use crate::sysfs::{fraction, plausible_temperature};
use crate::{GpuSample, ProviderSample, TelemetryError, TelemetryProvider};

/// One GPU found at initialisation.
#[derive(Debug, Clone)]
struct NvmlGpu {
    index: u32,
    /// `nvml<index>:<model>`, e.g. `nvml0:NVIDIA GeForce RTX 4090`.
    name: String,
}

/// Utilisation, memory, temperature and SM clock of every NVIDIA GPU NVML sees.
///
/// The device list is read once at initialisation; a GPU that cannot be queried later (fallen
/// off the bus, driver reset) still appears in every sample, with unknown (`None`) values.
#[derive(Debug)]
pub struct NvmlProvider {
    nvml: Nvml,
    gpus: Vec<NvmlGpu>,
}

impl NvmlProvider {
    /// Loads NVML and lists the GPUs. Fails when `libnvidia-ml.so` is absent or the driver is
    /// not loaded; succeeds with no GPU when NVML works but sees none.
    pub fn init() -> Result<Self, TelemetryError> {
        let nvml = Nvml::init()?;
        let count = nvml.device_count()?;
        let gpus = (0..count)
            .map(|index| {
                let model = nvml
                    .device_by_index(index)
                    .and_then(|device| device.name())
                    .unwrap_or_else(|_| "unknown".to_owned());
                NvmlGpu {
                    index,
                    name: format!("nvml{index}:{model}"),
                }
            })
            .collect();
        Ok(Self { nvml, gpus })
    }

    /// Names of the GPUs found.
    pub fn gpu_names(&self) -> impl Iterator<Item = &str> {
        self.gpus.iter().map(|g| g.name.as_str())
    }

    fn sample_gpu(&self, gpu: &NvmlGpu) -> GpuSample {
        let Ok(device) = self.nvml.device_by_index(gpu.index) else {
            return GpuSample::unknown(&gpu.name);
        };
        GpuSample {
            name: gpu.name.clone(),
            utilisation: device
                .utilization_rates()
                .ok()
                .and_then(|u| fraction(f64::from(u.gpu) / 100.0)),
            memory_used: device.memory_info().ok().and_then(|m| {
                (m.total > 0)
                    .then(|| m.used as f64 / m.total as f64)
                    .and_then(fraction)
            }),
            temperature_c: device
                .temperature(TemperatureSensor::Gpu)
                .ok()
                .and_then(|t| plausible_temperature(f64::from(t))),
            frequency_mhz: device.clock_info(Clock::SM).ok().map(f64::from),
        }
    }
}

impl TelemetryProvider for NvmlProvider {
    fn name(&self) -> &str {
        "nvml"
    }

    fn sample(&mut self) -> Result<ProviderSample, TelemetryError> {
        Ok(ProviderSample {
            throttled: None,
            gpus: self.gpus.iter().map(|gpu| self.sample_gpu(gpu)).collect(),
            ..ProviderSample::default()
        })
    }
}
