//! The resolver: manifest + device budgets + component sizes -> a concrete, explained device map.
//!
//! Pure and deterministic: no tch, no weights, no reading of free memory; the same inputs give
//! the same plan on any machine. Strategies:
//! - `balanced`: diffusers' pipeline-level `device_map="balanced"`
//!   (`_assign_components_to_devices`): components largest first (ties by name, where diffusers'
//!   order is hash-random), GPUs ordered by budget (largest first, ties by index) and visited in
//!   snake order (0,1,1,0,0,1,...). Where diffusers puts a component that does not fit its slot on
//!   the CPU (recording only the last such), runner tries the other GPUs, then the CPU, records
//!   every overflow and explains it; the slot pointer does not advance, as in diffusers.
//! - `sequential`: components in execution order fill devices in order, never going back.
//! - `auto`: each component whole on the first device with room; a UNet that fits no single
//!   device is split at diffusers' no-split boundaries across devices, in execution order.
//!
//! Pins are placed first and must fit. Offload modes change what a component needs on its device
//! (see [`memory`]); offloaded weights live on the host.

pub mod build;
pub mod inventory;
pub mod memory;
pub mod modules;
pub mod render;

use std::collections::BTreeMap;

use serde::Serialize;

use crate::device::Device;
use crate::manifest::{Dtype, Offload, Strategy};
use crate::units::ByteSize;
pub use inventory::{BudgetSource, DeviceBudget, Inventory};
pub use modules::ModuleTree;

/// One component to place.
#[derive(Debug, Clone)]
pub struct ComponentInput {
    pub name: String,
    pub class: String,
    pub dtype: Dtype,
    /// Weight bytes at `dtype`.
    pub bytes: u64,
    pub tree: ModuleTree,
    /// Working memory while it runs (0 for the weights-only view).
    pub working: u64,
    /// Working memory if it ran at fp16/bf16 (for suggesting a dtype change).
    pub working_half: u64,
    pub pin: Option<Device>,
    pub offload: Offload,
}

impl ComponentInput {
    /// Whether `auto` may split it (diffusers defines no-split units for the UNet).
    pub fn splittable(&self) -> bool {
        self.tree.units.len() > 1
    }
    fn offloaded(&self) -> bool {
        self.offload != Offload::None
    }
    /// Weights held on the device for the whole run.
    fn resident(&self) -> u64 {
        if self.offloaded() {
            0
        } else {
            self.bytes
        }
    }
    /// What the device needs on top of resident weights while this component runs.
    fn transient(&self) -> u64 {
        let w = if self.offloaded() { memory::device_weight_bytes(self.offload, self.bytes, self.tree.largest_leaf, self.tree.largest_group()) } else { 0 };
        w + self.working
    }
    /// The device's need for this component alone.
    pub fn need(&self) -> u64 {
        self.resident() + self.transient()
    }
}

#[derive(Debug, Clone)]
pub struct PlanInput {
    /// In execution order (diffusers' `model_cpu_offload_seq`, then the safety checker).
    pub components: Vec<ComponentInput>,
    pub inventory: Inventory,
    pub strategy: Strategy,
    /// Decisions made while building the input, repeated in the plan's notes.
    pub notes: Vec<String>,
}

/// The model classes whose blocks runner knows, so that `sequential` and `group` offload can
/// stream them (others are loaded whole: `none` or `model` offload).
pub const STREAMABLE_CLASSES: [&str; 4] = ["UNet2DConditionModel", "CLIPTextModel", "CLIPTextModelWithProjection", "AutoencoderKL"];

pub fn streamable(class: &str) -> bool {
    STREAMABLE_CLASSES.contains(&class)
}

/// Where a component went.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum Placement {
    Whole(Device),
    /// Module path -> device, in execution order (compressed to the shortest prefixes).
    Split(Vec<(String, Device)>),
}

#[derive(Debug, Clone, Serialize)]
pub struct ComponentPlan {
    pub name: String,
    pub class: String,
    pub dtype: Dtype,
    pub bytes: u64,
    pub working_bytes: u64,
    pub offload: Offload,
    /// The device it runs on (the first device of a split).
    pub device: Device,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub split: Option<Vec<(String, Device)>>,
    /// Weight bytes per device for a split component.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub split_bytes: Option<BTreeMap<String, u64>>,
    /// What this component needs on its device while it runs.
    pub peak_bytes: u64,
    /// Its weight bytes on the device while it runs: all of them, except under `sequential`
    /// (the largest leaf module) and `group` offload (the two largest block groups).
    pub streamed_bytes: u64,
    pub reason: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct DevicePlan {
    pub device: Device,
    pub budget_bytes: u64,
    pub source: BudgetSource,
    /// Weights held for the whole run.
    pub resident_bytes: u64,
    /// Resident weights plus the largest transient need of any component that runs there.
    pub planned_bytes: u64,
    /// Resident weights plus the most weight bytes an offloaded component brings while it runs:
    /// what the executor's residency ledger should measure as the peak.
    pub weight_peak_bytes: u64,
    pub free_bytes: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub strategy: Strategy,
    pub components: Vec<ComponentPlan>,
    pub devices: Vec<DevicePlan>,
    /// Host memory for offloaded weights (also counted in `cpu`'s plan when the CPU takes part).
    pub host_offload_bytes: u64,
    /// Overflows and other remarks.
    pub notes: Vec<String>,
}

impl Plan {
    /// `{"unet": "cuda:1", ...}`; a split component maps to the device it starts on.
    pub fn device_map(&self) -> BTreeMap<String, String> {
        self.components.iter().map(|c| (c.name.clone(), c.device.to_string())).collect()
    }

    /// diffusers' `hf_device_map` form: GPU indices as integers, `"cpu"`.
    pub fn hf_device_map(&self) -> BTreeMap<String, serde_json::Value> {
        self.components
            .iter()
            .map(|c| {
                let v = match c.device {
                    Device::Cuda(i) => serde_json::Value::from(i),
                    Device::Cpu => serde_json::Value::from("cpu"),
                };
                (c.name.clone(), v)
            })
            .collect()
    }
}

/// Nothing works: what is missing, and what would work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}{}", options_text(.options))]
pub struct PlanError {
    pub component: Option<String>,
    pub message: String,
    pub options: Vec<String>,
}

fn options_text(options: &[String]) -> String {
    if options.is_empty() {
        String::new()
    } else {
        format!("\noptions that would fit:\n{}", options.iter().map(|o| format!("  - {o}")).collect::<Vec<_>>().join("\n"))
    }
}

fn gb(b: u64) -> String {
    ByteSize(b).to_string()
}

#[derive(Debug, Clone)]
struct Ledger {
    device: Device,
    budget: u64,
    source: BudgetSource,
    resident: u64,
    transient: u64,
}

impl Ledger {
    fn peak(&self) -> u64 {
        self.resident + self.transient
    }
    fn peak_with(&self, resident: u64, transient: u64) -> u64 {
        self.resident + resident + self.transient.max(transient)
    }
    fn fits(&self, resident: u64, transient: u64) -> bool {
        self.peak_with(resident, transient) <= self.budget
    }
    fn add(&mut self, resident: u64, transient: u64) {
        self.resident += resident;
        self.transient = self.transient.max(transient);
    }
    fn free(&self) -> u64 {
        self.budget.saturating_sub(self.peak())
    }
}

/// A placement, its reason, and bytes per device for a split.
type Placed = (Placement, String, Option<BTreeMap<String, u64>>);

struct State<'a> {
    input: &'a PlanInput,
    ledgers: Vec<Ledger>,
    placed: Vec<Option<Placed>>,
    notes: Vec<String>,
    host_offload: u64,
}

impl<'a> State<'a> {
    fn new(input: &'a PlanInput) -> Self {
        let ledgers = input.inventory.devices.iter().map(|d| Ledger { device: d.device, budget: d.budget, source: d.source, resident: 0, transient: 0 }).collect();
        State { input, ledgers, placed: vec![None; input.components.len()], notes: vec![], host_offload: 0 }
    }

    fn ledger(&self, d: Device) -> Option<usize> {
        self.ledgers.iter().position(|l| l.device == d)
    }

    fn cpu(&self) -> Option<usize> {
        self.ledger(Device::Cpu)
    }

    /// Whether component `i` fits whole on ledger `l`, host memory for its offloaded weights included.
    fn fits(&self, i: usize, l: usize) -> bool {
        let c = &self.input.components[i];
        let on_cpu = self.ledgers[l].device == Device::Cpu;
        // On the CPU, offloading to the host means nothing: the weights are simply resident.
        let (resident, transient) = if on_cpu { (c.bytes, c.working) } else { (c.resident(), c.transient()) };
        if !self.ledgers[l].fits(resident, transient) {
            return false;
        }
        if c.offloaded() && !on_cpu {
            if let Some(h) = self.cpu() {
                return self.ledgers[h].fits(c.bytes, 0);
            }
        }
        true
    }

    fn place(&mut self, i: usize, l: usize, reason: String) {
        let c = &self.input.components[i];
        let on_cpu = self.ledgers[l].device == Device::Cpu;
        if on_cpu {
            self.ledgers[l].add(c.bytes, c.working);
            if c.offloaded() {
                self.notes.push(format!("`{}` runs on the CPU, where `offload = \"{}\"` has no effect", c.name, offload_name(c.offload)));
            }
        } else {
            self.ledgers[l].add(c.resident(), c.transient());
            if c.offloaded() {
                self.host_offload += c.bytes;
                if let Some(h) = self.cpu() {
                    self.ledgers[h].add(c.bytes, 0);
                }
            }
        }
        self.placed[i] = Some((Placement::Whole(self.ledgers[l].device), reason, None));
    }

    /// Splits component `i` across devices in order; `None` when even that does not fit.
    fn try_split(&mut self, i: usize) -> bool {
        let c = &self.input.components[i];
        if !c.splittable() || c.offloaded() {
            return false;
        }
        let mut ledgers = self.ledgers.clone();
        let mut assign: Vec<(String, Device)> = vec![];
        let mut per_device: BTreeMap<String, u64> = BTreeMap::new();
        let mut cur = 0;
        let mut used_devices: Vec<usize> = vec![];
        for u in &c.tree.units {
            // A device that runs part of the split also holds that part's activations.
            while cur < ledgers.len() && !ledgers[cur].fits(u.bytes, if used_devices.contains(&cur) { 0 } else { c.working }) {
                cur += 1;
            }
            if cur == ledgers.len() {
                return false;
            }
            if !used_devices.contains(&cur) {
                used_devices.push(cur);
                ledgers[cur].add(0, c.working);
            }
            ledgers[cur].add(u.bytes, 0);
            assign.push((u.path.clone(), ledgers[cur].device));
            *per_device.entry(ledgers[cur].device.to_string()).or_default() += u.bytes;
        }
        let devices: Vec<String> = used_devices.iter().map(|&l| ledgers[l].device.to_string()).collect();
        self.ledgers = ledgers;
        let reason = format!("fits no single device ({} needed); split at no-split boundaries over {} in execution order", gb(c.need()), devices.join(" + "));
        self.placed[i] = Some((Placement::Split(modules::compress(&assign)), reason, Some(per_device)));
        self.notes.push(format!(
            "`{}` is split: each part runs where it is placed (nothing is streamed), so no reserve for the largest layer is kept (accelerate keeps one on the first GPU and the CPU because it runs offloaded layers there); every device of the split holds the component's working memory ({})",
            c.name,
            gb(c.working)
        ));
        true
    }

    fn not_fit(&self, i: usize, what: &str) -> PlanError {
        let c = &self.input.components[i];
        let largest = self.ledgers.iter().max_by(|a, b| a.budget.cmp(&b.budget).then(b.device.cmp(&a.device)));
        let frees: Vec<String> = self.ledgers.iter().map(|l| format!("`{}` {} free of {}", l.device, gb(l.free()), gb(l.budget))).collect();
        let mut message = format!(
            "`{}` needs {} at {} ({} weights{}{}) and {what}",
            c.name,
            gb(c.need()),
            c.dtype.as_str(),
            gb(c.bytes),
            if c.working > 0 { format!(" + {} working memory", gb(c.working)) } else { String::new() },
            if c.offloaded() { format!(", offload \"{}\"", offload_name(c.offload)) } else { String::new() },
        );
        if let Some(l) = largest {
            message.push_str(&format!("; the largest budget is `{}` {}", l.device, gb(l.budget)));
        }
        message.push_str(&format!(" ({})", frees.join(", ")));
        // Streaming modes have a floor no budget below can meet: say what it is made of.
        match c.offload {
            Offload::Sequential => message.push_str(&format!(
                "\n`sequential` offload streams one leaf module at a time, so a device running `{}` needs at least its largest leaf (`{}`, {}) plus its working memory ({})",
                c.name,
                c.tree.largest_leaf_path,
                gb(c.tree.largest_leaf),
                gb(c.working)
            )),
            Offload::Group => {
                let (path, bytes) = c.tree.groups.iter().max_by(|a, b| a.1.cmp(&b.1).then(b.0.cmp(&a.0))).cloned().unwrap_or_default();
                message.push_str(&format!(
                    "\n`group` offload holds a block group and the next one (prefetched), so a device running `{}` needs up to twice its largest group (`{path}`, {}) plus its working memory ({})",
                    c.name,
                    gb(bytes),
                    gb(c.working)
                ));
            }
            _ => {}
        }
        PlanError { component: Some(c.name.clone()), message, options: vec![] }
    }

    fn finish(self) -> Plan {
        let mut components = vec![];
        for (i, c) in self.input.components.iter().enumerate() {
            let (placement, reason, split_bytes) = self.placed[i].clone().expect("every component placed");
            let (device, split) = match placement {
                Placement::Whole(d) => (d, None),
                Placement::Split(map) => (map.first().map(|m| m.1).unwrap_or(Device::Cpu), Some(map)),
            };
            let peak_bytes = if device == Device::Cpu { c.bytes + c.working } else { c.need() };
            let streamed_bytes = if device == Device::Cpu { c.bytes } else { memory::device_weight_bytes(c.offload, c.bytes, c.tree.largest_leaf, c.tree.largest_group()) };
            components.push(ComponentPlan {
                name: c.name.clone(),
                class: c.class.clone(),
                dtype: c.dtype,
                bytes: c.bytes,
                working_bytes: c.working,
                offload: c.offload,
                device,
                split,
                split_bytes,
                peak_bytes,
                streamed_bytes,
                reason,
            });
        }
        let devices = self
            .ledgers
            .iter()
            .map(|l| {
                let visiting =
                    components.iter().filter(|c| c.device == l.device && c.split.is_none() && c.offload != Offload::None && l.device != Device::Cpu).map(|c| c.streamed_bytes).max().unwrap_or(0);
                DevicePlan {
                    device: l.device,
                    budget_bytes: l.budget,
                    source: l.source,
                    resident_bytes: l.resident,
                    planned_bytes: l.peak(),
                    weight_peak_bytes: l.resident + visiting,
                    free_bytes: l.free(),
                }
            })
            .collect();
        Plan { strategy: self.input.strategy, components, devices, host_offload_bytes: self.host_offload, notes: self.notes }
    }
}

fn offload_name(o: Offload) -> &'static str {
    match o {
        Offload::None => "none",
        Offload::Model => "model",
        Offload::Sequential => "sequential",
        Offload::Group => "group",
    }
}

/// Plans, and when that fails, explains with the variations that would work.
pub fn plan(input: &PlanInput) -> Result<Plan, PlanError> {
    match plan_once(input) {
        Ok(p) => Ok(p),
        Err(mut e) => {
            e.options = options(input, e.component.as_deref());
            if e.options.is_empty() && e.component.is_some() {
                let weights: u64 = input.components.iter().map(|c| c.bytes).sum();
                let budgets: u64 = input.inventory.devices.iter().map(|d| d.budget).sum();
                e.message.push_str(&format!(
                    "\nno single change (offload mode, auto split, fp16, unpinning) fits either: the weights alone total {} against {} of budgets; raise `placement.max_memory` or add devices",
                    gb(weights),
                    gb(budgets)
                ));
            }
            Err(e)
        }
    }
}

/// Variations of the input that plan successfully, described for the manifest.
fn options(input: &PlanInput, failing: Option<&str>) -> Vec<String> {
    let Some(name) = failing else { return vec![] };
    let Some(idx) = input.components.iter().position(|c| c.name == name) else {
        return vec![];
    };
    let c = &input.components[idx];
    let mut out = vec![];
    let mut try_with = |desc: String, f: &dyn Fn(&mut PlanInput)| {
        let mut v = input.clone();
        f(&mut v);
        if let Ok(p) = plan_once(&v) {
            let cp = &p.components[idx];
            let at = match &cp.split {
                Some(s) => s.iter().map(|x| x.1.to_string()).collect::<std::collections::BTreeSet<_>>().into_iter().collect::<Vec<_>>().join(" + "),
                None => cp.device.to_string(),
            };
            out.push(format!("{desc}: `{name}` on {at}, peak {} there", gb(cp.peak_bytes)));
        }
    };
    for mode in [Offload::Model, Offload::Group, Offload::Sequential] {
        if c.offload != mode && (mode == Offload::Model || streamable(&c.class)) {
            try_with(format!("components.{name}.offload = \"{}\"", offload_name(mode)), &|v| v.components[idx].offload = mode);
        }
    }
    if input.strategy != Strategy::Auto && c.splittable() {
        try_with("placement.strategy = \"auto\" (splits it across devices)".into(), &|v| v.strategy = Strategy::Auto);
    }
    if c.dtype == Dtype::Fp32 {
        try_with(format!("components.{name}.dtype = \"fp16\""), &|v| {
            let c = &mut v.components[idx];
            c.dtype = Dtype::Fp16;
            c.bytes = c.bytes.div_ceil(2);
            c.working = c.working_half;
            for u in &mut c.tree.units {
                u.bytes /= 2;
            }
            c.tree.largest_leaf /= 2;
            for g in &mut c.tree.groups {
                g.1 /= 2;
            }
        });
    }
    if c.pin.is_some() {
        try_with(format!("remove the pin `components.{name}.device`"), &|v| v.components[idx].pin = None);
    }
    out
}

fn plan_once(input: &PlanInput) -> Result<Plan, PlanError> {
    for c in &input.components {
        if matches!(c.offload, Offload::Sequential | Offload::Group) && !streamable(&c.class) {
            return Err(PlanError {
                component: Some(c.name.clone()),
                message: format!(
                    "`{}` is a `{}`, whose blocks runner does not know, so `offload = \"{}\"` cannot stream it; `sequential` and `group` work for {} (use `model` or `none` for `{}`)",
                    c.name,
                    c.class,
                    offload_name(c.offload),
                    STREAMABLE_CLASSES.join(", "),
                    c.name
                ),
                options: vec![],
            });
        }
    }
    let mut st = State::new(input);
    st.notes.extend(input.notes.iter().cloned());
    if st.ledgers.is_empty() {
        return Err(PlanError { component: None, message: "no devices to plan on: `placement.max_memory` is empty and none were detected (pass --devices)".into(), options: vec![] });
    }
    // 1. Pins, in execution order: honoured or an error, never moved.
    for (i, c) in input.components.iter().enumerate() {
        let Some(pin) = c.pin else { continue };
        let Some(l) = st.ledger(pin) else {
            let have = st.ledgers.iter().map(|l| format!("`{}`", l.device)).collect::<Vec<_>>().join(", ");
            return Err(PlanError { component: Some(c.name.clone()), message: format!("`{}` is pinned to `{pin}`, which is not among the planned devices ({have})", c.name), options: vec![] });
        };
        if !st.fits(i, l) {
            return Err(st.not_fit(i, &format!("is pinned to `{pin}`, which has {} free", gb(st.ledgers[l].free()))));
        }
        st.place(i, l, format!("pinned to {pin}"));
    }
    let rest: Vec<usize> = (0..input.components.len()).filter(|&i| st.placed[i].is_none()).collect();
    match input.strategy {
        Strategy::Balanced => balanced(&mut st, rest)?,
        Strategy::Sequential => {
            let mut cur = 0;
            for i in rest {
                while cur < st.ledgers.len() && !st.fits(i, cur) {
                    cur += 1;
                }
                if cur == st.ledgers.len() {
                    return Err(st.not_fit(i, "does not fit in what is left of the devices after the ones before it (sequential never goes back)"));
                }
                let d = st.ledgers[cur].device;
                st.place(i, cur, format!("next in execution order; first device in order with room ({d})"));
            }
        }
        Strategy::Auto => {
            for i in rest {
                if let Some(l) = (0..st.ledgers.len()).find(|&l| st.fits(i, l)) {
                    let d = st.ledgers[l].device;
                    st.place(i, l, format!("fits whole; first device in order with room ({d})"));
                } else if !st.try_split(i) {
                    let why = if input.components[i].splittable() { "does not fit whole on any device, nor split across them" } else { "does not fit whole on any device (it is placed whole)" };
                    return Err(st.not_fit(i, why));
                }
            }
        }
    }
    Ok(st.finish())
}

/// diffusers' `_assign_components_to_devices`, with overflow handled on other devices.
fn balanced(st: &mut State, rest: Vec<usize>) -> Result<(), PlanError> {
    let input = st.input;
    let mut order = rest;
    order.sort_by(|&a, &b| input.components[b].bytes.cmp(&input.components[a].bytes).then(input.components[a].name.cmp(&input.components[b].name)));
    // GPUs by budget (largest first, ties by index), then the snake cycle a,b,...,b,a.
    let mut gpus: Vec<usize> = (0..st.ledgers.len()).filter(|&l| st.ledgers[l].device != Device::Cpu).collect();
    gpus.sort_by(|&a, &b| st.ledgers[b].free().cmp(&st.ledgers[a].free()).then(st.ledgers[a].device.cmp(&st.ledgers[b].device)));
    let cycle: Vec<usize> = gpus.iter().copied().chain(gpus.iter().rev().copied()).collect();
    let mut slot = 0usize;
    for i in order {
        let c = &input.components[i];
        if cycle.is_empty() {
            match st.cpu() {
                Some(h) if st.fits(i, h) => {
                    st.place(i, h, "no GPU takes part; on the CPU".into());
                    continue;
                }
                _ => return Err(st.not_fit(i, "no GPU takes part and the CPU has no room")),
            }
        }
        let l = cycle[slot % cycle.len()];
        let d = st.ledgers[l].device;
        if st.fits(i, l) {
            st.place(i, l, format!("largest first; snake slot {} -> {d}", slot + 1));
            slot += 1;
            continue;
        }
        // diffusers would load it on the CPU here (and remember only the last such component).
        let need = c.need();
        let free = st.ledgers[l].free();
        let other = gpus.iter().copied().filter(|&g| g != l && st.fits(i, g)).max_by(|&a, &b| st.ledgers[a].free().cmp(&st.ledgers[b].free()).then(st.ledgers[b].device.cmp(&st.ledgers[a].device)));
        let target = other.or_else(|| st.cpu().filter(|&h| st.fits(i, h)));
        match target {
            Some(t) => {
                let td = st.ledgers[t].device;
                let note = format!(
                    "overflow: `{}` ({}) did not fit its snake slot {d} ({} free); placed on {td} instead{}",
                    c.name,
                    gb(need),
                    gb(free),
                    if td == Device::Cpu { "" } else { " (diffusers would have put it on the CPU)" }
                );
                st.notes.push(note.clone());
                st.place(i, t, note.trim_start_matches("overflow: ").to_string());
            }
            None => return Err(st.not_fit(i, &format!("fits neither its snake slot {d} ({} free) nor any other device", gb(free)))),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
