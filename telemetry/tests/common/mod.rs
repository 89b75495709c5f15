//! Fake sysfs trees of real Jetson layouts, built in a temporary directory.
//!
//! Layouts (see `src/jetson.rs` for the sources of each path):
//! - JetPack 4, Jetson Nano: GPU device `sys/devices/gpu.0`, devfreq node `57000000.gpu`,
//!   thermal zones `AO-therm`, `CPU-therm`, `GPU-therm`, `PLL-therm`, `PMIC-Die`,
//!   `thermal-fan-est` (L4T 32 names).
//! - JetPack 5, AGX Orin: GPU device `sys/devices/17000000.ga10b`, devfreq node `17000000.ga10b`.
//! - JetPack 6, Orin: GPU device `sys/devices/platform/bus@0/17000000.gpu`, devfreq node
//!   `17000000.gpu`, thermal zones `cpu-thermal`, `gpu-thermal`, `soc0-thermal`, `tj-thermal`
//!   (L4T 36 names, as printed on an Orin in JoeyGihoon/seame_brain `Brain/test.py`).
//!
//! Links are relative, as in the real sysfs, so they resolve inside the temporary tree.

#![allow(dead_code)]

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

/// A fake root directory (`sysfs_root`).
pub struct FakeRoot {
    pub dir: tempfile::TempDir,
}

impl FakeRoot {
    pub fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    pub fn path(&self, relative: &str) -> PathBuf {
        self.dir.path().join(relative)
    }

    /// Writes a file, creating its directories.
    pub fn write(&self, relative: &str, contents: impl AsRef<[u8]>) {
        let path = self.path(relative);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, contents).unwrap();
    }

    /// Creates a symbolic link `relative` → `target` (target relative to the link's directory).
    pub fn link(&self, relative: &str, target: &str) {
        let path = self.path(relative);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        symlink(target, path).unwrap();
    }

    /// A thermal zone `sys/class/thermal/thermal_zone<n>` linked to `sys/devices/virtual/thermal`.
    pub fn thermal_zone(&self, n: u32, kind: &str, millidegrees: &str) {
        let dir = format!("sys/devices/virtual/thermal/thermal_zone{n}");
        self.write(&format!("{dir}/type"), format!("{kind}\n"));
        self.write(&format!("{dir}/temp"), format!("{millidegrees}\n"));
        self.link(
            &format!("sys/class/thermal/thermal_zone{n}"),
            &format!("../../devices/virtual/thermal/thermal_zone{n}"),
        );
    }

    pub fn meminfo(&self, total_kib: u64, available_kib: u64) {
        self.write(
            "proc/meminfo",
            format!(
                "MemTotal:       {total_kib} kB\nMemFree:         1000 kB\n\
                 MemAvailable:   {available_kib} kB\nBuffers:           10 kB\n"
            ),
        );
    }

    /// A GPU device directory with `load`, `of_node/name` and one devfreq node under it, and
    /// optionally the `sys/class/devfreq/<node>` link.
    pub fn gpu(
        &self,
        device: &str,
        of_name: &str,
        node: &str,
        load: &str,
        hz: &str,
        class_link: bool,
    ) {
        self.write(&format!("{device}/load"), format!("{load}\n"));
        self.write(&format!("{device}/of_node/name"), format!("{of_name}\0"));
        let devfreq = format!("{device}/devfreq/{node}");
        self.write(&format!("{devfreq}/cur_freq"), format!("{hz}\n"));
        let device_name = Path::new(device).file_name().unwrap().to_str().unwrap();
        self.link(
            &format!("{devfreq}/device"),
            &format!("../../../{device_name}"),
        );
        if class_link {
            // sys/class/devfreq/<node> -> ../../<devfreq path without the leading "sys/">
            let target = format!("../../{}", devfreq.strip_prefix("sys/").unwrap());
            self.link(&format!("sys/class/devfreq/{node}"), &target);
        }
    }
}

/// JetPack 4 (L4T 32), Jetson Nano.
pub fn jetpack4_nano() -> FakeRoot {
    let f = FakeRoot::new();
    f.write(
        "etc/nv_tegra_release",
        "# R32 (release), REVISION: 7.1, GCID: 29818004, BOARD: t210ref, EABI: aarch64\n",
    );
    f.gpu(
        "sys/devices/gpu.0",
        "gpu",
        "57000000.gpu",
        "0",
        "76800000",
        true,
    );
    f.thermal_zone(0, "AO-therm", "31500");
    f.thermal_zone(1, "CPU-therm", "27500");
    f.thermal_zone(2, "GPU-therm", "26000");
    f.thermal_zone(3, "PLL-therm", "25500");
    f.thermal_zone(4, "PMIC-Die", "100000");
    f.thermal_zone(5, "thermal-fan-est", "27400");
    f.meminfo(4_059_712, 2_029_856);
    f
}

/// JetPack 5 (L4T 35), AGX Orin.
pub fn jetpack5_orin() -> FakeRoot {
    let f = FakeRoot::new();
    f.write(
        "etc/nv_tegra_release",
        "# R35 (release), REVISION: 4.1, GCID: 33958178, BOARD: t186ref, EABI: aarch64\n",
    );
    f.gpu(
        "sys/devices/17000000.ga10b",
        "ga10b",
        "17000000.ga10b",
        "250",
        "305000000",
        true,
    );
    f.thermal_zone(0, "CPU-therm", "41375");
    f.thermal_zone(1, "GPU-therm", "-256000");
    f.thermal_zone(2, "CV0-therm", "-256000");
    f.thermal_zone(3, "SOC0-therm", "38906");
    f.thermal_zone(4, "Tboard_tegra", "29000");
    f.meminfo(31_269_000, 28_000_000);
    f
}

/// JetPack 6 (L4T 36), Orin.
pub fn jetpack6_orin() -> FakeRoot {
    let f = FakeRoot::new();
    f.write(
        "etc/nv_tegra_release",
        "# R36 (release), REVISION: 4.4, GCID: 41062509, BOARD: generic, EABI: aarch64\n",
    );
    f.gpu(
        "sys/devices/platform/bus@0/17000000.gpu",
        "gpu",
        "17000000.gpu",
        "523",
        "918000000",
        true,
    );
    f.thermal_zone(0, "cpu-thermal", "43531");
    f.thermal_zone(1, "gpu-thermal", "42937");
    f.thermal_zone(2, "soc0-thermal", "41218");
    f.thermal_zone(10, "tj-thermal", "43531");
    f.meminfo(7_802_000, 3_901_000);
    f
}
