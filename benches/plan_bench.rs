//! Planner benchmark: module-level planning of synthetic UNets with up to 200k modules
//! (accelerate's `infer_auto_device_map` is quadratic: about 60 s at 173k modules).
//!   cargo bench --bench plan_bench

use std::time::Instant;

use runner::device::Device;
use runner::manifest::{Dtype, Offload, Overflow, Strategy};
use runner::plan::{modules, plan, BudgetSource, ComponentInput, DeviceBudget, Inventory, PlanInput};

fn main() {
    for n in [2_000usize, 20_000, 200_000] {
        let tensors: Vec<(String, u64)> = (0..n).map(|i| (format!("down_blocks.{}.resnets.{}.conv{}.weight", i / 1000, (i / 10) % 100, i % 10), 1000)).collect();
        let t = Instant::now();
        let tree = modules::build("UNet2DConditionModel", &[], &tensors);
        let built = t.elapsed();
        let total = tree.total;
        let c = ComponentInput {
            name: "unet".into(),
            class: "UNet2DConditionModel".into(),
            dtype: Dtype::Fp16,
            bytes: total,
            tree,
            working: 0,
            working_half: 0,
            working_tiled: None,
            tree_half: None,
            pin: None,
            offload: Offload::None,
            offload_opts: Default::default(),
        };
        let devices = [(Device::Cuda(0), total / 3), (Device::Cuda(1), total / 3), (Device::Cuda(2), total / 2)]
            .iter()
            .map(|&(device, budget)| DeviceBudget { device, budget, source: BudgetSource::DevicesFlag, total: None })
            .collect();
        let input = PlanInput { components: vec![c], inventory: Inventory { devices }, strategy: Strategy::Auto, overflow: Overflow::Stream, notes: vec![] };
        let t = Instant::now();
        let p = plan(&input).expect("plans");
        let planned = t.elapsed();
        let parts = p.components[0].split.as_ref().map_or(0, Vec::len);
        println!("{{\"modules\": {n}, \"tree_ms\": {:.1}, \"plan_ms\": {:.1}, \"split_entries\": {parts}}}", built.as_secs_f64() * 1e3, planned.as_secs_f64() * 1e3);
    }
}
