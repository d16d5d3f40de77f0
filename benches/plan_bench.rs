//! Planner benchmark: module-level planning of synthetic UNets with up to 200k modules, REPS
//! times each (min / median / max). benches/plan.sh runs it beside accelerate's
//! `infer_auto_device_map` on the same module trees (benches/plan_accelerate.py).
//!   cargo bench --bench plan_bench          (PLAN_REPS, default 5; PLAN_SIZES, default "2000 20000 200000")

use std::time::Instant;

use runner::device::Device;
use runner::manifest::{Dtype, Offload, Overflow, Strategy};
use runner::plan::{modules, plan, BudgetSource, ComponentInput, DeviceBudget, Inventory, PlanInput};

/// `"PREFIX_min_ms": .., "PREFIX_median_ms": .., "PREFIX_max_ms": ..` of durations in ms.
fn stats(prefix: &str, mut ms: Vec<f64>) -> String {
    ms.sort_by(|a, b| a.total_cmp(b));
    format!("\"{prefix}_min_ms\": {:.2}, \"{prefix}_median_ms\": {:.2}, \"{prefix}_max_ms\": {:.2}", ms[0], ms[ms.len() / 2], ms[ms.len() - 1])
}

fn main() {
    let reps: usize = std::env::var("PLAN_REPS").ok().and_then(|r| r.parse().ok()).unwrap_or(5);
    let sizes: Vec<usize> = std::env::var("PLAN_SIZES").unwrap_or_else(|_| "2000 20000 200000".into()).split_whitespace().map(|s| s.parse().expect("PLAN_SIZES: numbers")).collect();
    for n in sizes {
        let (mut tree_ms, mut plan_ms, mut parts) = (vec![], vec![], 0);
        for _ in 0..reps {
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
            parts = p.components[0].split.as_ref().map_or(0, Vec::len);
            tree_ms.push(built.as_secs_f64() * 1e3);
            plan_ms.push(planned.as_secs_f64() * 1e3);
        }
        println!("{{\"impl\": \"runner\", \"modules\": {n}, \"reps\": {reps}, {}, {}, \"split_entries\": {parts}}}", stats("tree", tree_ms), stats("plan", plan_ms));
    }
}
