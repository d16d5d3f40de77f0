//! Devices and their budgets. Budgets come, in order of precedence, from `placement.max_memory`
//! (only the listed GPUs take part, as in diffusers), from `--devices` (the hardware, as stated),
//! or from detection: GPU totals via NVML or the CUDA driver (both loaded at run time; neither
//! needs to exist) and host RAM from /proc/meminfo, each minus a reserve. Totals, not free
//! memory: the same machine always gives the same plan.
//!
//! The host always takes part: it is where offloaded and overflowing weights live. Its budget is
//! `max_memory.cpu`, else `--devices`' `cpu=`, else the detected RAM minus the reserve.

use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;

use crate::device::Device;
use crate::units::ByteSize;

/// Where a device's budget came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BudgetSource {
    MaxMemory,
    DevicesFlag,
    Detected,
}

impl fmt::Display for BudgetSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BudgetSource::MaxMemory => "placement.max_memory",
            BudgetSource::DevicesFlag => "--devices",
            BudgetSource::Detected => "detected",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeviceBudget {
    pub device: Device,
    pub budget: u64,
    pub source: BudgetSource,
    /// Total memory before the reserve, when detected.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total: Option<u64>,
}

/// The devices a plan may use, GPUs in index order then the CPU.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct Inventory {
    pub devices: Vec<DeviceBudget>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InventoryError {
    #[error("--devices {spec:?}: {msg}")]
    Spec { spec: String, msg: String },
    #[error("`placement.max_memory` lists `{device}`, which --devices does not have (it has {have})")]
    NotInHardware { device: Device, have: String },
}

/// The reserve kept back from a detected GPU: 10% of its memory, at least 1 GiB (CUDA context,
/// cuDNN/cuBLAS workspaces, allocator fragmentation).
pub fn gpu_reserve(total: u64) -> u64 {
    (total / 10).max(1 << 30).min(total)
}

/// The reserve kept back from detected host RAM: 10%, at least 2 GiB (the OS, runner itself).
pub fn cpu_reserve(total: u64) -> u64 {
    (total / 10).max(2 << 30).min(total)
}

impl Inventory {
    fn sorted(mut devices: Vec<DeviceBudget>) -> Inventory {
        devices.sort_by_key(|d| d.device);
        Inventory { devices }
    }

    /// Parses `--devices "cuda:0=24GiB,cuda:1=24GiB,cpu=64GiB"`.
    pub fn parse_spec(spec: &str) -> Result<Inventory, InventoryError> {
        let err = |msg: String| InventoryError::Spec { spec: spec.to_string(), msg };
        let mut seen = BTreeMap::new();
        for item in spec.split(',').map(str::trim) {
            if item.is_empty() {
                return Err(err("empty entry: write DEVICE=SIZE pairs separated by commas, e.g. \"cuda:0=24GiB,cpu=64GiB\"".into()));
            }
            let (d, s) = item.split_once('=').ok_or_else(|| err(format!("`{item}` is not DEVICE=SIZE")))?;
            let device: Device = d.trim().parse().map_err(|e| err(format!("{e}")))?;
            let size: ByteSize = s.trim().parse().map_err(|e| err(format!("size of `{device}`: {e}")))?;
            if seen.insert(device, size.0).is_some() {
                return Err(err(format!("`{device}` is given twice")));
            }
        }
        Ok(Inventory::sorted(seen.into_iter().map(|(device, budget)| DeviceBudget { device, budget, source: BudgetSource::DevicesFlag, total: None }).collect()))
    }

    /// Budgets from `placement.max_memory` (already validated device names). With `hardware`
    /// (from --devices), each budget is capped by the device's stated size and every listed
    /// device must exist there. A host that `max_memory` does not list gets `hardware`'s `cpu`
    /// budget, else the detected one.
    pub fn from_max_memory(max_memory: &BTreeMap<Device, u64>, hardware: Option<&Inventory>) -> Result<Inventory, InventoryError> {
        let mut out = vec![];
        for (&device, &budget) in max_memory {
            let budget = match hardware {
                None => budget,
                Some(hw) => match hw.get(device) {
                    Some(h) => budget.min(h.budget),
                    // Every machine has a CPU: --devices may describe the GPUs only.
                    None if device == Device::Cpu => budget,
                    None => {
                        let have = hw.devices.iter().map(|d| format!("`{}`", d.device)).collect::<Vec<_>>().join(", ");
                        return Err(InventoryError::NotInHardware { device, have });
                    }
                },
            };
            out.push(DeviceBudget { device, budget, source: BudgetSource::MaxMemory, total: None });
        }
        let listed = Inventory::sorted(out);
        Ok(match hardware.and_then(|hw| hw.get(Device::Cpu)) {
            Some(host) => listed.with_host(Some(host.clone())),
            None => listed.with_host(detect_host()),
        })
    }

    /// Adds `host` as the `cpu` device when the inventory has none: the host always takes part.
    pub fn with_host(mut self, host: Option<DeviceBudget>) -> Inventory {
        if self.get(Device::Cpu).is_none() {
            self.devices.extend(host);
        }
        Inventory::sorted(self.devices)
    }

    /// The host as `cpu`: what is listed, else the detected RAM minus the reserve.
    pub fn with_detected_host(self) -> Inventory {
        if self.get(Device::Cpu).is_some() {
            return self;
        }
        self.with_host(detect_host())
    }

    /// What this machine has: GPUs (NVML, else the CUDA driver) and host RAM, minus reserves.
    pub fn detect() -> Inventory {
        let mut devices: Vec<DeviceBudget> = detect_gpus()
            .into_iter()
            .enumerate()
            .map(|(i, total)| DeviceBudget { device: Device::Cuda(i as u32), budget: total - gpu_reserve(total), source: BudgetSource::Detected, total: Some(total) })
            .collect();
        devices.extend(detect_host());
        Inventory::sorted(devices)
    }

    pub fn get(&self, device: Device) -> Option<&DeviceBudget> {
        self.devices.iter().find(|d| d.device == device)
    }

    pub fn gpus(&self) -> impl Iterator<Item = &DeviceBudget> {
        self.devices.iter().filter(|d| d.device != Device::Cpu)
    }
}

/// The host's budget from its detected RAM, minus the reserve.
pub fn detect_host() -> Option<DeviceBudget> {
    host_ram().map(|total| DeviceBudget { device: Device::Cpu, budget: total - cpu_reserve(total), source: BudgetSource::Detected, total: Some(total) })
}

/// Host RAM: `MemTotal` from /proc/meminfo, else physical pages x page size (other Unixes).
pub fn host_ram() -> Option<u64> {
    let meminfo = || {
        let text = std::fs::read_to_string("/proc/meminfo").ok()?;
        let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
        let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kb * 1024)
    };
    meminfo().or_else(|| {
        // SAFETY: sysconf has no preconditions.
        let (pages, size) = unsafe { (libc::sysconf(libc::_SC_PHYS_PAGES), libc::sysconf(libc::_SC_PAGESIZE)) };
        (pages > 0 && size > 0).then(|| pages as u64 * size as u64)
    })
}

/// Total memory of each visible GPU, from NVML or else the CUDA driver API, both opened with
/// dlopen so that the binary starts on machines without them. Honours CUDA_VISIBLE_DEVICES
/// through the driver; NVML sees all GPUs, so it is used only when that variable is unset.
pub fn detect_gpus() -> Vec<u64> {
    if std::env::var_os("CUDA_VISIBLE_DEVICES").is_none() {
        if let Some(v) = nvml_totals() {
            return v;
        }
    }
    cuda_driver_totals().unwrap_or_default()
}

unsafe fn sym<T>(lib: *mut libc::c_void, name: &std::ffi::CStr) -> Option<T> {
    let p = libc::dlsym(lib, name.as_ptr());
    if p.is_null() {
        None
    } else {
        Some(std::mem::transmute_copy::<*mut libc::c_void, T>(&p))
    }
}

fn nvml_totals() -> Option<Vec<u64>> {
    #[repr(C)]
    struct Memory {
        total: u64,
        free: u64,
        used: u64,
    }
    // SAFETY: symbols from NVML with their documented C signatures; the library stays loaded.
    unsafe {
        let lib = libc::dlopen(c"libnvidia-ml.so.1".as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL);
        if lib.is_null() {
            return None;
        }
        let init: unsafe extern "C" fn() -> i32 = sym(lib, c"nvmlInit_v2")?;
        let count: unsafe extern "C" fn(*mut u32) -> i32 = sym(lib, c"nvmlDeviceGetCount_v2")?;
        let handle: unsafe extern "C" fn(u32, *mut *mut libc::c_void) -> i32 = sym(lib, c"nvmlDeviceGetHandleByIndex_v2")?;
        let meminfo: unsafe extern "C" fn(*mut libc::c_void, *mut Memory) -> i32 = sym(lib, c"nvmlDeviceGetMemoryInfo")?;
        if init() != 0 {
            return None;
        }
        let mut n = 0u32;
        if count(&mut n) != 0 {
            return None;
        }
        let mut out = vec![];
        for i in 0..n {
            let mut h = std::ptr::null_mut();
            let mut m = Memory { total: 0, free: 0, used: 0 };
            if handle(i, &mut h) != 0 || meminfo(h, &mut m) != 0 {
                return None;
            }
            out.push(m.total);
        }
        tracing::debug!(gpus = out.len(), "NVML inventory");
        Some(out)
    }
}

fn cuda_driver_totals() -> Option<Vec<u64>> {
    // SAFETY: symbols from the CUDA driver API with their documented C signatures.
    unsafe {
        let lib = libc::dlopen(c"libcuda.so.1".as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL);
        if lib.is_null() {
            return None;
        }
        let init: unsafe extern "C" fn(u32) -> i32 = sym(lib, c"cuInit")?;
        let count: unsafe extern "C" fn(*mut i32) -> i32 = sym(lib, c"cuDeviceGetCount")?;
        let get: unsafe extern "C" fn(*mut i32, i32) -> i32 = sym(lib, c"cuDeviceGet")?;
        let total: unsafe extern "C" fn(*mut usize, i32) -> i32 = sym(lib, c"cuDeviceTotalMem_v2")?;
        if init(0) != 0 {
            return None;
        }
        let mut n = 0i32;
        if count(&mut n) != 0 {
            return None;
        }
        let mut out = vec![];
        for i in 0..n {
            let (mut dev, mut bytes) = (0i32, 0usize);
            if get(&mut dev, i) != 0 || total(&mut bytes, dev) != 0 {
                return None;
            }
            out.push(bytes as u64);
        }
        tracing::debug!(gpus = out.len(), "CUDA driver inventory");
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_spec() {
        let inv = Inventory::parse_spec("cpu=64GiB, cuda:1=24GiB,cuda:0=24GiB").unwrap();
        let names: Vec<String> = inv.devices.iter().map(|d| d.device.to_string()).collect();
        assert_eq!(names, ["cuda:0", "cuda:1", "cpu"]);
        assert_eq!(inv.get(Device::Cuda(1)).unwrap().budget, 24 << 30);
        for (bad, want) in [
            ("", "empty entry"),
            ("cuda:0", "is not DEVICE=SIZE"),
            ("tpu=1GB", "device `tpu` is not supported"),
            ("gpu0=1GB", "unknown device `gpu0`"),
            ("cuda:0=5XB", "size of `cuda:0`: unknown unit"),
            ("cuda:0=1GB,0=2GB", "`cuda:0` is given twice"),
            ("cuda:0=1GB,", "empty entry"),
        ] {
            let e = Inventory::parse_spec(bad).unwrap_err().to_string();
            assert!(e.contains(want), "{bad:?}: {e}");
        }
    }

    #[test]
    fn max_memory_capped_by_hardware() {
        let mm = BTreeMap::from([(Device::Cuda(0), 30u64 << 30), (Device::Cpu, 8 << 30)]);
        let hw = Inventory::parse_spec("cuda:0=24GiB,cpu=64GiB").unwrap();
        let inv = Inventory::from_max_memory(&mm, Some(&hw)).unwrap();
        assert_eq!(inv.get(Device::Cuda(0)).unwrap().budget, 24 << 30);
        assert_eq!(inv.get(Device::Cpu).unwrap().budget, 8 << 30);
        let gpus_only = Inventory::parse_spec("cuda:0=8GB").unwrap();
        assert_eq!(Inventory::from_max_memory(&mm, Some(&gpus_only)).unwrap().get(Device::Cpu).unwrap().budget, 8 << 30, "the CPU needs no --devices entry");
        // The host always takes part: from --devices' `cpu=` when max_memory does not list it, else detected.
        let gpu_budgets = BTreeMap::from([(Device::Cuda(0), 1_000_000_000u64), (Device::Cuda(1), 1_000_000_000)]);
        let two = Inventory::parse_spec("cuda:0=24GiB,cuda:1=24GiB,cpu=64GiB").unwrap();
        let inv = Inventory::from_max_memory(&gpu_budgets, Some(&two)).unwrap();
        assert_eq!(inv.get(Device::Cpu).map(|d| (d.budget, d.source)), Some((64 << 30, BudgetSource::DevicesFlag)));
        let inv = Inventory::from_max_memory(&gpu_budgets, None).unwrap();
        let host = inv.get(Device::Cpu).expect("a detected host");
        assert_eq!(host.source, BudgetSource::Detected);
        assert_eq!(host.budget, host.total.unwrap() - cpu_reserve(host.total.unwrap()));
        assert_eq!(inv.devices.last().unwrap().device, Device::Cpu, "GPUs first, then the host");
        let listed = Inventory::parse_spec("cuda:0=8GB,cpu=3GB").unwrap().with_detected_host();
        assert_eq!(listed.get(Device::Cpu).unwrap().budget, 3_000_000_000, "a listed host is kept");
        let mm = BTreeMap::from([(Device::Cuda(3), 1u64)]);
        assert!(Inventory::from_max_memory(&mm, Some(&hw)).unwrap_err().to_string().contains("`cuda:3`, which --devices does not have"));
    }

    #[test]
    fn reserves() {
        assert_eq!(gpu_reserve(80 << 30), 8 << 30);
        assert_eq!(gpu_reserve(4 << 30), 1 << 30);
        assert_eq!(cpu_reserve(16 << 30), 2 << 30);
        let inv = Inventory::detect(); // this machine: no GPU libraries, but /proc/meminfo
        assert!(inv.get(Device::Cpu).is_some());
    }
}
