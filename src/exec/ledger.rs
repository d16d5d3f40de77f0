//! The residency ledger: bytes of weights held on each (planned) device at each moment, and their
//! peak. Devices are the plan's, so a `--simulate` run, which holds everything in host memory,
//! still accounts cuda:0, cuda:1, ... as the real run would.

use std::collections::BTreeMap;

use serde::Serialize;
use tch::nn::VarStore;

use super::ExecError;
use crate::device::Device;
use crate::plan::Plan;
use crate::units::ByteSize;

/// One device's figures in `runner run --json`'s `devices`: the measured peak beside the plan's
/// figures for it (`runner plan --json`'s `devices`: budget, planned, resident, weight peak, free).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct DeviceUse {
    pub budget_bytes: u64,
    /// Where the budget came from (`placement.max_memory`, `--devices`/`--simulate`, detected).
    pub source: crate::plan::BudgetSource,
    /// The most weight bytes resident at once.
    pub peak_bytes: u64,
    /// The plan's prediction: weights held for the whole run (`runner plan`'s `resident_bytes`).
    pub planned_resident_bytes: u64,
    /// The plan's prediction of `peak_bytes` (`runner plan`'s `weight_peak_bytes`): resident
    /// weights plus what the largest offloaded visitor brings.
    pub planned_peak_bytes: u64,
    /// The plan's peak need on the device, working memory included (`runner plan`'s `planned`).
    pub planned_bytes: u64,
    /// The plan's room left on the device (`runner plan`'s `free`).
    pub free_bytes: u64,
    /// A CUDA device's caching-allocator counters at the end of the run (peaks since the process
    /// started), measured as diffusers measures (`torch.cuda.max_memory_reserved()`); null for
    /// the CPU and under `--simulate`.
    pub allocator: Option<super::allocator::AllocatorStats>,
}

#[derive(Debug, Default, Clone)]
pub struct Ledger {
    budgets: BTreeMap<Device, u64>,
    resident: BTreeMap<Device, u64>,
    peak: BTreeMap<Device, u64>,
}

impl Ledger {
    pub fn new(plan: &Plan) -> Ledger {
        Ledger { budgets: plan.devices.iter().map(|d| (d.device, d.budget_bytes)).collect(), ..Default::default() }
    }

    /// `component`'s weights arrive on the devices of `bytes`; over a budget is an error naming
    /// the component, the device and the bytes (the plan keeps this from happening, so it means
    /// the plan and the loaded weights disagree).
    pub fn add(&mut self, component: &str, bytes: &BTreeMap<Device, u64>) -> Result<(), ExecError> {
        for (&d, &b) in bytes {
            let now = self.resident.entry(d).or_default();
            *now += b;
            if let Some(&budget) = self.budgets.get(&d) {
                if *now > budget {
                    return Err(ExecError::Unsupported(format!(
                        "`{component}` brings {b} B of weights to {d}: {now} B resident there, over its budget of {budget} B ({})",
                        ByteSize(budget).display_decimal()
                    )));
                }
            }
            let p = self.peak.entry(d).or_default();
            *p = (*p).max(*now);
        }
        Ok(())
    }

    /// The bytes resident on `device` now.
    pub fn resident(&self, device: Device) -> u64 {
        self.resident.get(&device).copied().unwrap_or(0)
    }

    pub fn remove(&mut self, bytes: &BTreeMap<Device, u64>) {
        for (d, b) in bytes {
            if let Some(now) = self.resident.get_mut(d) {
                *now = now.saturating_sub(*b);
            }
        }
    }

    /// Per device (every device of the plan, `cuda:0` style names): budget, measured peak, the
    /// plan's prediction.
    pub fn report(&self, plan: &Plan) -> BTreeMap<String, DeviceUse> {
        plan.devices
            .iter()
            .map(|d| {
                let use_ = DeviceUse {
                    budget_bytes: d.budget_bytes,
                    peak_bytes: self.peak.get(&d.device).copied().unwrap_or(0),
                    planned_resident_bytes: d.resident_bytes,
                    planned_peak_bytes: d.weight_peak_bytes,
                    planned_bytes: d.planned_bytes,
                    free_bytes: d.free_bytes,
                    source: d.source,
                    allocator: None,
                };
                (d.device.to_string(), use_)
            })
            .collect()
    }
}

/// The bytes of `vs`'s variables per planned device: `device`, or for a split component the device
/// of the longest module prefix naming each variable.
pub fn weigh(vs: &VarStore, device: Device, split: Option<&[(String, Device)]>) -> BTreeMap<Device, u64> {
    let mut out = BTreeMap::new();
    for (name, var) in vs.variables() {
        let d = split.and_then(|s| device_of(s, &name)).unwrap_or(device);
        *out.entry(d).or_default() += tensor_bytes(&var);
    }
    out
}

pub fn tensor_bytes(t: &tch::Tensor) -> u64 {
    (t.numel() * t.kind().elt_size_in_bytes()) as u64
}

/// The device of the longest prefix of `split` that names `var` (a module path or the path itself).
pub fn device_of<D: Copy>(split: &[(String, D)], var: &str) -> Option<D> {
    split.iter().filter(|(m, _)| m.is_empty() || var == m || (var.starts_with(m.as_str()) && var.as_bytes().get(m.len()) == Some(&b'.'))).max_by_key(|(m, _)| m.len()).map(|(_, d)| *d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracks_peaks_and_refuses_weights_over_a_budget() {
        let mut l = Ledger { budgets: [(Device::Cuda(0), 100)].into(), ..Default::default() };
        let a: BTreeMap<Device, u64> = [(Device::Cuda(0), 60)].into();
        let b: BTreeMap<Device, u64> = [(Device::Cuda(0), 30), (Device::Cpu, 5)].into();
        l.add("unet", &a).unwrap();
        l.add("vae", &b).unwrap();
        l.remove(&b);
        l.add("vae", &b).unwrap();
        assert_eq!(l.peak[&Device::Cuda(0)], 90);
        assert_eq!(l.resident[&Device::Cuda(0)], 90);
        let err = l.add("text_encoder", &a).unwrap_err().to_string();
        assert!(err.contains("`text_encoder` brings 60 B of weights to cuda:0: 150 B resident there, over its budget of 100 B"), "{err}");
    }

    #[test]
    fn variables_go_to_the_longest_module_prefix() {
        let split = [("".to_string(), 0), ("down_blocks.1".to_string(), 1), ("down_blocks.1.attentions.0".to_string(), 2)];
        assert_eq!(device_of(&split, "conv_in.weight"), Some(0));
        assert_eq!(device_of(&split, "down_blocks.1.resnets.0.conv1.weight"), Some(1));
        assert_eq!(device_of(&split, "down_blocks.1.attentions.0.proj_in.weight"), Some(2));
        assert_eq!(device_of(&split, "down_blocks.10.x"), Some(0));
    }
}
