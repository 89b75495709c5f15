//! The Jetson (Tegra) provider: iGPU load and clock, thermal zones and unified memory, all read
//! from sysfs/procfs under a root directory. NVML does not exist on Jetson before JetPack 7.
//!
//! Where the GPU lives, by JetPack generation (every path relative to the root):
//!
//! | board / JetPack | GPU device (has `load`, 0..1000 per mille) | devfreq (`cur_freq`, Hz) |
//! |---|---|---|
//! | Nano, TX1 / JetPack 4 (L4T 32) | `sys/devices/gpu.0` | `sys/devices/gpu.0/devfreq/57000000.gpu` |
//! | Xavier / JetPack 4–5 | `sys/devices/17000000.gv11b` (`sys/devices/gpu.0` exists too) | `sys/devices/17000000.gv11b/devfreq/17000000.gv11b` |
//! | Orin / JetPack 5 (L4T 35) | `sys/devices/17000000.ga10b` | `sys/devices/17000000.ga10b/devfreq/17000000.ga10b` |
//! | Orin / JetPack 6 (L4T 36) | `sys/devices/platform/bus@0/17000000.gpu` | `…/17000000.gpu/devfreq/17000000.gpu` |
//!
//! Every generation also links the devfreq node as `sys/class/devfreq/<node>`, whose `device`
//! link leads to the GPU device, and whose `device/of_node/name` is the GPU's device-tree name
//! (`gp10b`, `gv11b`, `ga10b`, `gb10b` or `gpu`). Discovery therefore walks
//! `sys/class/devfreq/*` (the method of jtop and of htop); only when that finds nothing does it
//! try the fixed paths above, then `sys/devices/platform/*gpu*`, and keep the first with a
//! `load` (one iGPU, never counted twice).
//!
//! Sources:
//! - jtop, rbonghi/jetson_stats `jtop/core/gpu.py`: `/sys/class/devfreq/*/device/of_node/name`
//!   in {gv11b, gp10b, ga10b, gb10b, gpu}; `device/load` / 10 = percent; `cur_freq` in Hz.
//! - htop, htop-dev/htop `linux/NvidiaJetson.c`: Orin `/sys/class/devfreq/17000000.gpu/cur_freq`
//!   and `/sys/class/devfreq/17000000.gpu/device/load` (meter total 1000); the GPU thermal zone
//!   "goes off if no GPU load: user gets error on file open" (hence unreadable → unknown).
//! - rbonghi/jetson_stats `tests/nvpmodel` (recorded `nvpmodel` verbose output): Nano
//!   `/sys/devices/gpu.0/devfreq/57000000.gpu/…`, Xavier
//!   `/sys/devices/17000000.gv11b/devfreq/17000000.gv11b/…`; `jtop/core/gpu.py` (older
//!   revisions) Orin JetPack 5 `/sys/devices/17000000.ga10b/enable_3d_scaling`.
//! - emwjacobson/JetsonPowerTesting `README.md`: AGX Xavier
//!   `/sys/devices/17000000.gv11b/devfreq/17000000.gv11b/{available_frequencies,min_freq,max_freq}`.
//! - dav-ell/jtop_fast_gpu_utilization_only `gpu_monitor.py`: JetPack 6 Orin
//!   `/sys/class/devfreq/17000000.gpu/device/load`, "utilization value 0-1000".
//! - Thermal zones: `sys/class/thermal/thermal_zone*/{type,temp}`, millidegrees Celsius (Linux
//!   thermal sysfs ABI); jtop `jtop/core/temperature.py` skips `PMIC` zones (a constant, not a
//!   measurement) and treats -256 °C as "offline".

use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};

use crate::sysfs::{
    MAX_MEMINFO_BYTES, parse_devfreq_mhz, parse_gpu_load_permille, parse_meminfo_used,
    parse_millidegrees_c, parse_name, read_attr, read_text,
};
use crate::{GpuSample, ProviderSample, TelemetryError, TelemetryProvider};

/// Device-tree names of Tegra GPUs (Tegra X2 gp10b, Xavier gv11b, Orin ga10b, Thor gb10b, and
/// the generic `gpu` node name of Nano and JetPack 6).
const TEGRA_GPU_NAMES: [&str; 5] = ["gp10b", "gv11b", "ga10b", "gb10b", "gpu"];

/// GPU device directories of kernels without `sys/class/devfreq` links (see the module table).
const FIXED_GPU_DIRS: [&str; 5] = [
    "sys/devices/gpu.0",
    "sys/devices/17000000.gv11b",
    "sys/devices/17000000.ga10b",
    "sys/devices/platform/bus@0/17000000.gpu",
    "sys/devices/platform/17000000.gpu",
];

/// One Tegra GPU found at detection.
#[derive(Debug, Clone)]
struct TegraGpu {
    /// `tegra:<devfreq node or device directory name>`.
    name: String,
    /// The `load` attribute (per mille).
    load: PathBuf,
    /// The devfreq `cur_freq` attribute (Hz), when there is one.
    cur_freq: Option<PathBuf>,
}

/// One thermal zone found at detection.
#[derive(Debug, Clone)]
struct ThermalZone {
    /// Its `type`, e.g. `GPU-therm`, `cpu-thermal`.
    name: String,
    /// Its `temp` attribute (millidegrees Celsius).
    temp: PathBuf,
    /// This zone measures the GPU (its type starts with "gpu").
    gpu: bool,
}

/// Jetson iGPU load/clock, thermal zones and unified memory from sysfs/procfs.
///
/// Detection enumerates the GPUs and thermal zones once; each sample then reads only the few
/// attribute files found (two per GPU, one per zone, and `proc/meminfo`).
#[derive(Debug, Clone)]
pub struct JetsonProvider {
    gpus: Vec<TegraGpu>,
    zones: Vec<ThermalZone>,
    meminfo: PathBuf,
}

impl JetsonProvider {
    /// Looks for Tegra GPUs under `root` (normally `/`). `None` when there is none with a
    /// `load` attribute (not a Jetson, or a sysfs this provider does not understand).
    pub fn detect(root: &Path) -> Option<Self> {
        let gpus = find_gpus(root);
        if gpus.is_empty() {
            return None;
        }
        Some(Self {
            gpus,
            zones: find_thermal_zones(root),
            meminfo: root.join("proc/meminfo"),
        })
    }

    /// Names of the GPUs found (`tegra:…`).
    pub fn gpu_names(&self) -> impl Iterator<Item = &str> {
        self.gpus.iter().map(|g| g.name.as_str())
    }

    /// Types of the thermal zones read (PMIC zones excluded).
    pub fn thermal_zone_names(&self) -> impl Iterator<Item = &str> {
        self.zones.iter().map(|z| z.name.as_str())
    }
}

impl TelemetryProvider for JetsonProvider {
    fn name(&self) -> &str {
        "jetson"
    }

    fn sample(&mut self) -> Result<ProviderSample, TelemetryError> {
        let mut temperatures_c = Vec::with_capacity(self.zones.len());
        let mut gpu_temperature = None;
        for zone in &self.zones {
            if let Some(celsius) = read_attr(&zone.temp, parse_millidegrees_c) {
                if zone.gpu && gpu_temperature.is_none() {
                    gpu_temperature = Some(celsius);
                }
                temperatures_c.push((zone.name.clone(), celsius));
            }
        }
        // Unified memory: the GPU allocates from system RAM, so RAM in use is GPU memory in use.
        let memory_used = read_text(&self.meminfo, MAX_MEMINFO_BYTES)
            .ok()
            .and_then(|text| parse_meminfo_used(&text));
        let gpus = self
            .gpus
            .iter()
            .map(|gpu| GpuSample {
                name: gpu.name.clone(),
                utilisation: read_attr(&gpu.load, parse_gpu_load_permille),
                memory_used,
                temperature_c: gpu_temperature,
                frequency_mhz: gpu
                    .cur_freq
                    .as_deref()
                    .and_then(|path| read_attr(path, parse_devfreq_mhz)),
            })
            .collect();
        Ok(ProviderSample {
            throttled: None,
            cpu_utilisation: None,
            memory_used,
            temperatures_c,
            gpus,
        })
    }
}

/// True when `root` looks like an L4T (Jetson Linux) system, whether or not its GPU was found:
/// `etc/nv_tegra_release` exists or the device tree is `nvidia,tegra…` compatible
/// (the two files jtop reads, rbonghi/jetson_stats `jtop/core/jetson_variables.py`).
pub fn is_tegra(root: &Path) -> bool {
    root.join("etc/nv_tegra_release").is_file()
        || read_text(&root.join("proc/device-tree/compatible"), 4096)
            .is_ok_and(|text| text.contains("nvidia,tegra"))
}

/// Sorted entries of a directory (none when it cannot be read).
fn sorted_entries(dir: &Path) -> Vec<PathBuf> {
    let mut entries: Vec<PathBuf> = fs::read_dir(dir)
        .map(|it| it.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    entries.sort();
    entries
}

fn file_name(path: &Path) -> Option<&str> {
    path.file_name().and_then(|n| n.to_str())
}

/// Canonical path used to recognise the same device reached through different links.
fn identity(path: &Path) -> PathBuf {
    fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}

fn find_gpus(root: &Path) -> Vec<TegraGpu> {
    let mut gpus = Vec::new();
    let mut seen = HashSet::new();

    // 1. sys/class/devfreq/<node> whose device is a Tegra GPU.
    for node in sorted_entries(&root.join("sys/class/devfreq")) {
        let Some(node_name) = file_name(&node) else {
            continue;
        };
        let device = node.join("device");
        let of_name = read_attr(&device.join("of_node/name"), parse_name);
        let is_gpu = match &of_name {
            Some(name) => {
                let name = name.to_ascii_lowercase();
                TEGRA_GPU_NAMES.contains(&name.as_str()) || name.contains("gpu")
            }
            // No device-tree name: fall back on the node name (htop's rule).
            None => ["gpu", "gv11b", "ga10b", "gp10b", "gb10b"]
                .iter()
                .any(|n| node_name.contains(n)),
        };
        let load = device.join("load");
        if !is_gpu || !load.is_file() || !seen.insert(identity(&device)) {
            continue;
        }
        let cur_freq = node.join("cur_freq");
        gpus.push(TegraGpu {
            name: format!("tegra:{node_name}"),
            load,
            cur_freq: cur_freq.is_file().then_some(cur_freq),
        });
    }

    if !gpus.is_empty() {
        return gpus;
    }

    // 2. Kernels without the class links: the first fixed device directory, or platform device
    //    named like a GPU, that has a `load`. Only one: a Tegra has one iGPU, and some boards
    //    expose it under two directories (Xavier: `gpu.0` and `17000000.gv11b`).
    let platform_gpus = sorted_entries(&root.join("sys/devices/platform"))
        .into_iter()
        .filter(|p| file_name(p).is_some_and(|n| n.contains("gpu")));
    let fixed = FIXED_GPU_DIRS.iter().map(|d| root.join(d));
    for device in fixed.chain(platform_gpus) {
        let load = device.join("load");
        if !load.is_file() {
            continue;
        }
        let Some(dir_name) = file_name(&device) else {
            continue;
        };
        // The devfreq node sits under the device: <device>/devfreq/<node>/cur_freq.
        let cur_freq = sorted_entries(&device.join("devfreq"))
            .into_iter()
            .map(|node| node.join("cur_freq"))
            .find(|f| f.is_file());
        gpus.push(TegraGpu {
            name: format!("tegra:{dir_name}"),
            load,
            cur_freq,
        });
        break;
    }
    gpus
}

fn find_thermal_zones(root: &Path) -> Vec<ThermalZone> {
    let mut zones: Vec<(u64, ThermalZone)> = Vec::new();
    for dir in sorted_entries(&root.join("sys/class/thermal")) {
        let Some(number) = file_name(&dir)
            .and_then(|n| n.strip_prefix("thermal_zone"))
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        let Some(name) = read_attr(&dir.join("type"), parse_name) else {
            continue;
        };
        let temp = dir.join("temp");
        if name.to_ascii_uppercase().contains("PMIC") || !temp.is_file() {
            continue;
        }
        let gpu = name.to_ascii_lowercase().starts_with("gpu");
        zones.push((number, ThermalZone { name, temp, gpu }));
    }
    // thermal_zone10 after thermal_zone9.
    zones.sort_by_key(|(number, _)| *number);
    zones.into_iter().map(|(_, zone)| zone).collect()
}
