//! `tegrastats`: the pure parser of one output line, and the fallback provider that runs
//! `tegrastats --interval <ms>` and keeps its latest line.
//!
//! The field formats are documented by NVIDIA ("tegrastats Utility", Jetson Linux / L4T
//! developer guide, e.g. <https://docs.nvidia.com/jetson/archives/l4t-archived/l4t-325/> →
//! "AppendixTegraStats"). The variants handled here, and the real lines in the tests, come from:
//!
//! - Jetson Nano, JetPack 4.6.1: `GR3D_FREQ 0%@76`, `POM_5V_IN 1750/1628`, upper-case
//!   temperatures (`GPU@40C`) — waggle-sensor/jetson-exporter, `pkg/tegrastats/tegrastats_test.go`.
//! - Xavier NX, JetPack 4 (`GR3D_FREQ 0%@1109`) and JetPack 5.1.2 (`GR3D_FREQ 0%@[114]`,
//!   `VDD_IN 2763mW/2846mW`, date prefix) — same file.
//! - AGX Orin, JetPack 5 (`GR3D_FREQ 0%@[0,0]`, offline sensors `CV0@-256C`) — shape of
//!   rbonghi/jetson_stats `tests/tegrastats` (the jtop emulator; its load values are random there).
//! - AGX Orin, JetPack 7.2 (`GR3D_FREQ 12%@[1300,1300]`, `cpu@52.968C/52.968C`) — rbonghi/jetson_stats
//!   `jtop/tests/test_06_tegra_parse.py` ("real tegrastats line"); Thor prints `GR3D_FREQ @[…]`
//!   without a utilisation (same file).
//! - Jetson TX1, L4T 28 (`cpu [17%,13%,29%,5%]@408`, `GR3D 3%@76`) — hordiales/jetson-tx1-dev
//!   `SCRIPTS.md`.
//!
//! How jtop runs it (`tegrastats --interval <ms>`, one line per interval on stdout):
//! rbonghi/jetson_stats `jtop/core/tegrastats.py`.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::sysfs::{fraction, plausible_temperature};
use crate::{GpuSample, ProviderSample, TegrastatsError, TelemetryError, TelemetryProvider};

/// Longest line accepted (real lines are under 1 KiB).
pub const MAX_LINE_BYTES: usize = 16 * 1024;
/// Highest plausible GPU clock, MHz.
const MAX_PLAUSIBLE_MHZ: u64 = 10_000;
/// Name of the GPU reported from `tegrastats` (`GR3D` is the Tegra 3D/compute engine).
pub const TEGRASTATS_GPU_NAME: &str = "tegra:gr3d";

/// What one `tegrastats` line says. Fields absent from the line, or unparsable, are `None`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TegrastatsSample {
    /// RAM in use, MB (`RAM X/YMB`).
    pub ram_used_mb: Option<u64>,
    /// RAM available to applications, MB.
    pub ram_total_mb: Option<u64>,
    /// Load of each CPU core as a fraction; `None` for a core that is `off`.
    pub cpu_loads: Vec<Option<f64>>,
    /// GPU (GR3D) utilisation as a fraction.
    pub gpu_utilisation: Option<f64>,
    /// GPU clock, MHz (the highest GPC clock when one per GPC is printed).
    pub gpu_frequency_mhz: Option<f64>,
    /// Temperatures of the working sensors, °C, in line order (offline `-256C` ones dropped).
    pub temperatures_c: Vec<(String, f64)>,
}

impl TegrastatsSample {
    /// Mean load of the online cores; `None` when no core is online or the list was absent.
    pub fn cpu_utilisation(&self) -> Option<f64> {
        let online: Vec<f64> = self.cpu_loads.iter().flatten().copied().collect();
        if online.is_empty() {
            return None;
        }
        fraction(online.iter().sum::<f64>() / online.len() as f64)
    }

    /// Fraction of RAM in use. Jetson memory is unified: this is also the GPU's memory.
    pub fn memory_used(&self) -> Option<f64> {
        match (self.ram_used_mb, self.ram_total_mb) {
            (Some(used), Some(total)) if total > 0 => fraction(used as f64 / total as f64),
            _ => None,
        }
    }

    /// The GPU sensor (`GPU@…C` / `gpu@…C`), when it is online.
    pub fn gpu_temperature_c(&self) -> Option<f64> {
        self.temperatures_c
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case("gpu"))
            .map(|&(_, t)| t)
    }

    /// The same facts as a provider sample, with one GPU called `gpu_name`.
    pub fn to_provider_sample(&self, gpu_name: &str) -> ProviderSample {
        let memory_used = self.memory_used();
        ProviderSample {
            throttled: None,
            cpu_utilisation: self.cpu_utilisation(),
            memory_used,
            temperatures_c: self.temperatures_c.clone(),
            gpus: vec![GpuSample {
                name: gpu_name.to_owned(),
                utilisation: self.gpu_utilisation,
                memory_used,
                temperature_c: self.gpu_temperature_c(),
                frequency_mhz: self.gpu_frequency_mhz,
            }],
        }
    }
}

/// Parses one `tegrastats` line (Nano, TX1/TX2, Xavier, Orin, Thor formats).
///
/// Fields it does not know (EMC, APE, VIC, power rails…) are ignored; a line with none of
/// RAM, CPU, GR3D or a temperature is an error.
pub fn parse_tegrastats_line(line: &str) -> Result<TegrastatsSample, TegrastatsError> {
    if line.len() > MAX_LINE_BYTES {
        return Err(TegrastatsError::TooLong { len: line.len() });
    }
    if line.trim().is_empty() {
        return Err(TegrastatsError::Empty);
    }
    let mut sample = TegrastatsSample::default();
    let mut recognised = false;
    let mut tokens = line.split_ascii_whitespace().peekable();
    while let Some(token) = tokens.next() {
        match token {
            "RAM" => {
                if let Some((used, total)) = tokens.next().and_then(parse_used_total_mb) {
                    sample.ram_used_mb = Some(used);
                    sample.ram_total_mb = Some(total);
                    recognised = true;
                }
            }
            "CPU" | "cpu" if tokens.peek().is_some_and(|t| t.starts_with('[')) => {
                if let Some(loads) = tokens.next().and_then(parse_cpu_list) {
                    sample.cpu_loads = loads;
                    recognised = true;
                }
            }
            "GR3D_FREQ" | "GR3D" => {
                if let Some((load, mhz)) = tokens.next().map(parse_gr3d) {
                    recognised |= load.is_some() || mhz.is_some();
                    sample.gpu_utilisation = load;
                    sample.gpu_frequency_mhz = mhz;
                }
            }
            _ => {
                if let Some((name, celsius)) = parse_temperature(token) {
                    recognised = true;
                    if let Some(celsius) = celsius {
                        sample.temperatures_c.push((name.to_owned(), celsius));
                    }
                }
            }
        }
    }
    if recognised {
        Ok(sample)
    } else {
        Err(TegrastatsError::Unrecognised {
            excerpt: line.chars().take(64).collect(),
        })
    }
}

/// `4321/62801MB` → (4321, 62801), used ≤ total.
fn parse_used_total_mb(token: &str) -> Option<(u64, u64)> {
    let (used, total) = token.strip_suffix("MB")?.split_once('/')?;
    let (used, total) = (used.parse().ok()?, total.parse().ok()?);
    (used <= total).then_some((used, total))
}

/// `[23%@2201,off,4%@2201]` (newer) or `[17%,13%]@408` (L4T 28) → per-core loads.
fn parse_cpu_list(token: &str) -> Option<Vec<Option<f64>>> {
    let inner = token.strip_prefix('[')?.split(']').next()?;
    inner
        .split(',')
        .map(|core| {
            if core == "off" {
                return Some(None);
            }
            let percent = core.split('@').next()?.strip_suffix('%')?;
            parse_percent(percent).map(Some)
        })
        .collect()
}

/// `0`..`100` → fraction.
fn parse_percent(text: &str) -> Option<f64> {
    let percent: u32 = text.parse().ok()?;
    (percent <= 100).then(|| f64::from(percent) / 100.0)
}

/// `12%@[1300,1300]`, `0%@[305]`, `0%@1109`, `0%`, `@[1000,1000]` (Thor) → (load, MHz).
fn parse_gr3d(token: &str) -> (Option<f64>, Option<f64>) {
    let (load, clocks) = match token.split_once('@') {
        Some((load, clocks)) => (load, Some(clocks)),
        None => (token, None),
    };
    let load = load.strip_suffix('%').and_then(parse_percent);
    let mhz = clocks.and_then(|clocks| {
        let clocks = clocks.trim_start_matches('[').trim_end_matches(']');
        let mut max: Option<u64> = None;
        for clock in clocks.split(',') {
            let clock: u64 = clock.parse().ok()?;
            if clock > MAX_PLAUSIBLE_MHZ {
                return None;
            }
            max = Some(max.map_or(clock, |m| m.max(clock)));
        }
        max.map(|m| m as f64)
    });
    (load, mhz)
}

/// `GPU@40C`, `tj@44.343C`, `cpu@52.968C/52.968C` → (name, °C); `None` °C when offline
/// (`-256C`) or implausible. Not a temperature token at all → `None`.
fn parse_temperature(token: &str) -> Option<(&str, Option<f64>)> {
    let (name, reading) = token.split_once('@')?;
    let valid_name = !name.is_empty()
        && name.len() <= 32
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if !valid_name {
        return None;
    }
    let current = reading.split('/').next()?.strip_suffix('C')?;
    let celsius: f64 = current.parse().ok()?;
    Some((name, plausible_temperature(celsius)))
}

/// The latest state of a running `tegrastats`, shared with its reader thread.
#[derive(Debug, Default)]
struct Latest {
    /// The last line parsed, and when it arrived.
    sample: Option<(Instant, TegrastatsSample)>,
    /// The last line that did not parse.
    error: Option<TegrastatsError>,
    /// The process closed its output.
    exited: bool,
}

fn lock(latest: &Mutex<Latest>) -> MutexGuard<'_, Latest> {
    // A poisoned lock only means a reader thread panicked mid-update; the data stays usable.
    latest
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Fallback Jetson provider: runs `tegrastats --interval <ms>` and reports its latest line.
///
/// A line older than three intervals (at least 3 s) is stale: the sample fails, so every
/// value from this provider is unknown until `tegrastats` reports again. The process is
/// killed when the provider is dropped.
#[derive(Debug)]
pub struct TegrastatsProvider {
    child: Child,
    latest: Arc<Mutex<Latest>>,
    stale_after: Duration,
}

impl TegrastatsProvider {
    /// Starts `program --interval <interval in ms>` and a thread reading its output.
    pub fn spawn(program: &Path, interval: Duration) -> Result<Self, TelemetryError> {
        let spawn_error = |source| TelemetryError::Spawn {
            program: program.to_path_buf(),
            source,
        };
        let millis = interval.as_millis().clamp(10, 60_000);
        let mut child = Command::new(program)
            .arg("--interval")
            .arg(millis.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(spawn_error)?;
        let Some(stdout) = child.stdout.take() else {
            kill(&mut child);
            return Err(spawn_error(std::io::Error::other("no stdout pipe")));
        };
        let latest = Arc::new(Mutex::new(Latest::default()));
        let shared = Arc::clone(&latest);
        let reader = std::thread::Builder::new()
            .name("tegrastats-reader".into())
            .spawn(move || read_lines(stdout, &shared));
        if let Err(source) = reader {
            kill(&mut child);
            return Err(spawn_error(source));
        }
        let stale_after = (interval * 3).max(Duration::from_secs(3));
        Ok(Self {
            child,
            latest,
            stale_after,
        })
    }

    /// The program path this provider would run under `root` (`usr/bin/tegrastats`).
    pub fn default_program(root: &Path) -> PathBuf {
        root.join("usr/bin/tegrastats")
    }
}

fn kill(child: &mut Child) {
    // Killing an already-exited child fails harmlessly; wait() reaps it either way.
    let _ = child.kill();
    let _ = child.wait();
}

impl Drop for TegrastatsProvider {
    fn drop(&mut self) {
        kill(&mut self.child);
    }
}

/// Reads bounded lines until end of output, storing each parse result.
fn read_lines(output: impl Read, latest: &Mutex<Latest>) {
    let mut reader = BufReader::new(output);
    let mut line = Vec::with_capacity(1024);
    loop {
        line.clear();
        let read = reader
            .by_ref()
            .take(MAX_LINE_BYTES as u64 + 1)
            .read_until(b'\n', &mut line);
        match read {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let complete = line.ends_with(b"\n");
        if !complete && line.len() > MAX_LINE_BYTES {
            // Skip the rest of an over-long line.
            let len = line.len();
            if !skip_to_newline(&mut reader) {
                break;
            }
            lock(latest).error = Some(TegrastatsError::TooLong { len });
            continue;
        }
        let text = String::from_utf8_lossy(&line);
        let parsed = parse_tegrastats_line(&text);
        let mut state = lock(latest);
        match parsed {
            Ok(sample) => state.sample = Some((Instant::now(), sample)),
            Err(error) => state.error = Some(error),
        }
    }
    lock(latest).exited = true;
}

/// Discards input up to and including the next newline; false at end of output.
fn skip_to_newline(reader: &mut impl BufRead) -> bool {
    loop {
        let (found, used) = match reader.fill_buf() {
            Ok([]) | Err(_) => return false,
            Ok(buf) => match buf.iter().position(|&b| b == b'\n') {
                Some(i) => (true, i + 1),
                None => (false, buf.len()),
            },
        };
        reader.consume(used);
        if found {
            return true;
        }
    }
}

impl TelemetryProvider for TegrastatsProvider {
    fn name(&self) -> &str {
        "tegrastats"
    }

    fn sample(&mut self) -> Result<ProviderSample, TelemetryError> {
        let state = lock(&self.latest);
        let Some((at, sample)) = &state.sample else {
            return Err(if state.exited {
                TelemetryError::Exited
            } else if let Some(error) = &state.error {
                TelemetryError::Tegrastats(error.clone())
            } else {
                TelemetryError::NoDataYet
            });
        };
        let age = at.elapsed();
        if age > self.stale_after {
            return Err(if state.exited {
                TelemetryError::Exited
            } else {
                TelemetryError::Stale { age }
            });
        }
        Ok(sample.to_provider_sample(TEGRASTATS_GPU_NAME))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Jetson Nano, JetPack 4.6.1 (waggle-sensor/jetson-exporter, pkg/tegrastats/tegrastats_test.go).
    const NANO_JP461: &str = "RAM 1923/3964MB (lfb 2x2MB) SWAP 191/1982MB (cached 6MB) IRAM 0/252kB(lfb 252kB) CPU [5%@1224,4%@1224,3%@1224,6%@1224] EMC_FREQ 0%@1600 GR3D_FREQ 0%@76 APE 25 PLL@37C CPU@40C PMIC@50C GPU@40C AO@45C thermal@40C POM_5V_IN 1750/1628 POM_5V_GPU 0/0 POM_5V_CPU 366/406";
    // Xavier NX, JetPack 4 (same file).
    const XAVIER_NX_JP4: &str = "RAM 5246/7771MB (lfb 7x4MB) SWAP 983/20269MB (cached 280MB) CPU [47%@1420,23%@1420,32%@1420,22%@1420,31%@1420,96%@1420] EMC_FREQ 2%@1600 GR3D_FREQ 0%@1109 APE 150 MTS fg 1% bg 9% AO@29C GPU@31.5C PMIC@100C AUX@30C CPU@33.5C thermal@31.35C VDD_IN 6140/5510 VDD_CPU_GPU_CV 2706/2119 VDD_SOC 1074/1051";
    // Xavier NX, JetPack 5.1.2 (same file).
    const XAVIER_NX_JP512: &str = "07-09-2024 13:31:31 RAM 3168/6851MB (lfb 2x4MB) SWAP 161/3426MB (cached 0MB) CPU [23%@1397,17%@1192,16%@1190,13%@1190,23%@1190,10%@1190] EMC_FREQ 2%@204 GR3D_FREQ 0%@[114] VIC_FREQ 115 APE 150 AUX@45C CPU@46.5C thermal@45.6C AO@45C GPU@45.5C PMIC@50C VDD_IN 2763mW/2846mW VDD_CPU_GPU_CV 650mW/670mW VDD_SOC 650mW/711mW";
    // AGX Orin, JetPack 5 shape (rbonghi/jetson_stats tests/tegrastats, Orin; the emulator's
    // random loads replaced by fixed ones; one core `off` to cover that form).
    const ORIN_JP5: &str = "01-03-2023 16:10:22 RAM 2257/30536MB (lfb 5392x4MB) SWAP 0/15268MB (cached 0MB) CPU [10%@729,20%@729,30%@729,40%@729,off,off,off,off,0%@729,0%@729,0%@729,0%@729] EMC_FREQ 0% GR3D_FREQ 37% CV0@-256C CPU@41.375C Tboard@29C SOC2@39C Tdiode@30.75C SOC0@38.906C CV1@-256C GPU@-256C tj@41.468C SOC1@38.843C CV2@-256C";
    // AGX Orin, JetPack 7.2 (rbonghi/jetson_stats jtop/tests/test_06_tegra_parse.py).
    const ORIN_JP72: &str = "07-25-2026 09:08:28 RAM 20642/62817MB (lfb 1x2MB) CPU [23%@2201,10%@2201,4%@2201,14%@2201,30%@2201,18%@2201,10%@2201,10%@2201,33%@2201,7%@2201,5%@2201,27%@2201] EMC_FREQ 3%@3199 GR3D_FREQ 12%@[1300,1300] NVENC0 off NVDEC0 off NVJPG0 off NVJPG1 off VIC off OFA off NVDLA0 off NVDLA1 off PVA0_FREQ off APE 174 cpu@52.968C/52.968C soc2@48.406C/48.406C soc0@49.531C/49.531C gpu@47.625C/47.625C VDD_GPU_SOC 5139mW/5139mW/5139mW VDD_CPU_CV 3268mW/3268mW/3268mW VIN_SYS_5V0 5500mW/5500mW/5500mW";
    // Thor (same file): per-GPC clocks, no utilisation.
    const THOR: &str =
        "RAM 4722/7844MB (lfb 1x512kB) EMC_FREQ 2%@1866 GR3D_FREQ @[1000,1000,1000] APE 150";
    // Jetson TX1, L4T 28 (hordiales/jetson-tx1-dev, SCRIPTS.md).
    const TX1_L4T28: &str = "RAM 3607/3983MB (lfb 47x4MB) SWAP 873/8192MB (cached 281MB) cpu [17%,11%,65%,0%]@1734 EMC 1%@1600 APE 25 GR3D 39%@76";

    fn approx(a: Option<f64>, b: f64) -> bool {
        a.is_some_and(|a| (a - b).abs() < 1e-9)
    }

    #[test]
    fn nano_jetpack4() {
        let s = parse_tegrastats_line(NANO_JP461).unwrap();
        assert_eq!((s.ram_used_mb, s.ram_total_mb), (Some(1923), Some(3964)));
        assert_eq!(s.cpu_loads.len(), 4);
        assert!(approx(s.cpu_utilisation(), 0.045));
        assert_eq!(s.gpu_utilisation, Some(0.0));
        assert_eq!(s.gpu_frequency_mhz, Some(76.0));
        assert_eq!(s.gpu_temperature_c(), Some(40.0));
        let names: Vec<&str> = s.temperatures_c.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["PLL", "CPU", "PMIC", "GPU", "AO", "thermal"]);
    }

    #[test]
    fn xavier_jetpack4_and_5() {
        let s = parse_tegrastats_line(XAVIER_NX_JP4).unwrap();
        assert_eq!(s.cpu_loads.len(), 6);
        assert!(approx(s.cpu_utilisation(), 2.51 / 6.0));
        assert_eq!(s.gpu_utilisation, Some(0.0));
        assert_eq!(s.gpu_frequency_mhz, Some(1109.0));
        assert_eq!(s.gpu_temperature_c(), Some(31.5));
        assert!(s.temperatures_c.contains(&("thermal".into(), 31.35)));

        let s = parse_tegrastats_line(XAVIER_NX_JP512).unwrap();
        assert_eq!((s.ram_used_mb, s.ram_total_mb), (Some(3168), Some(6851)));
        assert_eq!(s.gpu_frequency_mhz, Some(114.0));
        assert_eq!(s.gpu_temperature_c(), Some(45.5));
        assert!(approx(s.memory_used(), 3168.0 / 6851.0));
    }

    #[test]
    fn orin_jetpack5_drops_offline_sensors_and_off_cores() {
        let s = parse_tegrastats_line(ORIN_JP5).unwrap();
        assert_eq!(s.cpu_loads.len(), 12);
        assert_eq!(s.cpu_loads.iter().filter(|c| c.is_none()).count(), 4);
        assert!(approx(s.cpu_utilisation(), 1.0 / 8.0));
        assert_eq!(s.gpu_utilisation, Some(0.37));
        assert_eq!(s.gpu_frequency_mhz, None);
        // GPU@-256C: the GPU sensor is off, so its temperature is unknown, not -256.
        assert_eq!(s.gpu_temperature_c(), None);
        assert!(s.temperatures_c.iter().all(|&(_, t)| t > -100.0));
        assert!(s.temperatures_c.contains(&("tj".into(), 41.468)));
        assert_eq!(s.temperatures_c.len(), 7);
    }

    #[test]
    fn orin_jetpack7_per_gpc_clocks_and_current_over_peak_temperatures() {
        let s = parse_tegrastats_line(ORIN_JP72).unwrap();
        assert_eq!(s.gpu_utilisation, Some(0.12));
        assert_eq!(s.gpu_frequency_mhz, Some(1300.0));
        assert_eq!(s.gpu_temperature_c(), Some(47.625));
        assert_eq!(s.temperatures_c.len(), 4);
        assert!(approx(s.memory_used(), 20642.0 / 62817.0));
    }

    #[test]
    fn thor_has_a_clock_but_no_utilisation() {
        let s = parse_tegrastats_line(THOR).unwrap();
        assert_eq!(s.gpu_utilisation, None);
        assert_eq!(s.gpu_frequency_mhz, Some(1000.0));
        assert!(s.cpu_loads.is_empty());
        assert_eq!(s.cpu_utilisation(), None);
    }

    #[test]
    fn tx1_old_format() {
        let s = parse_tegrastats_line(TX1_L4T28).unwrap();
        assert_eq!(s.cpu_loads.len(), 4);
        assert!(approx(s.cpu_utilisation(), 0.2325));
        assert_eq!(s.gpu_utilisation, Some(0.39));
        assert_eq!(s.gpu_frequency_mhz, Some(76.0));
    }

    #[test]
    fn provider_sample_uses_unified_memory_for_the_gpu() {
        let p = parse_tegrastats_line(XAVIER_NX_JP512)
            .unwrap()
            .to_provider_sample(TEGRASTATS_GPU_NAME);
        assert_eq!(p.gpus.len(), 1);
        assert_eq!(p.gpus[0].name, TEGRASTATS_GPU_NAME);
        assert_eq!(p.gpus[0].memory_used, p.memory_used);
        assert!(p.memory_used.is_some());
        assert_eq!(p.gpus[0].temperature_c, Some(45.5));
    }

    #[test]
    fn garbage_lines_are_errors() {
        assert_eq!(parse_tegrastats_line(""), Err(TegrastatsError::Empty));
        assert_eq!(parse_tegrastats_line(" \t\n"), Err(TegrastatsError::Empty));
        for line in [
            "hello world",
            "RAM",
            "RAM garbage",
            "RAM 5/3MB",
            "CPU [",
            "GR3D_FREQ",
            "GR3D_FREQ banana",
            "@@@ %%% [[[ ]]]",
            "x@yC",
            "tegrastats: command not found",
        ] {
            assert!(
                matches!(
                    parse_tegrastats_line(line),
                    Err(TegrastatsError::Unrecognised { .. })
                ),
                "{line:?}"
            );
        }
        let long = "RAM 1/2MB ".repeat(MAX_LINE_BYTES);
        assert!(matches!(
            parse_tegrastats_line(&long),
            Err(TegrastatsError::TooLong { .. })
        ));
    }

    #[test]
    fn out_of_range_fields_are_unknown_not_clamped() {
        let s = parse_tegrastats_line(
            "RAM 1/2MB CPU [150%@1000,5%@1000] GR3D_FREQ 101%@99999999 GPU@9999C",
        )
        .unwrap();
        assert!(s.cpu_loads.is_empty());
        assert_eq!(s.gpu_utilisation, None);
        assert_eq!(s.gpu_frequency_mhz, None);
        assert_eq!(s.gpu_temperature_c(), None);
        let s = parse_tegrastats_line("RAM 99999999999999999999999/1MB GPU@40C").unwrap();
        assert_eq!(s.ram_used_mb, None);
        assert_eq!(s.gpu_temperature_c(), Some(40.0));
    }

    #[test]
    fn bounded_reader_skips_over_long_lines() {
        let mut input = Vec::new();
        input.extend(std::iter::repeat_n(b'x', MAX_LINE_BYTES * 2));
        input.extend(b"\n");
        input.extend(NANO_JP461.as_bytes());
        input.extend(b"\n");
        let latest = Mutex::new(Latest::default());
        read_lines(&input[..], &latest);
        let state = lock(&latest);
        assert!(state.exited);
        assert!(matches!(state.error, Some(TegrastatsError::TooLong { .. })));
        let (_, sample) = state.sample.as_ref().unwrap();
        assert_eq!(sample.gpu_frequency_mhz, Some(76.0));
    }

    #[test]
    fn missing_program_is_a_spawn_error() {
        let err = TegrastatsProvider::spawn(
            Path::new("/nonexistent/qosroute/tegrastats"),
            Duration::from_secs(1),
        )
        .unwrap_err();
        assert!(matches!(err, TelemetryError::Spawn { .. }), "{err}");
    }
}
