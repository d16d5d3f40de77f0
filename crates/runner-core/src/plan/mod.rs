//! The resolver: manifest + device budgets + component sizes -> a concrete, explained device map.
//!
//! Pure and deterministic: no tch, no weights, no reading of free memory; the same inputs give
//! the same plan on any machine. The host (`cpu`) always takes part: offloaded weights live there
//! and it takes what fits no GPU. Each component, unless pinned, goes to the first of these that
//! fits: whole on a GPU; split across the GPUs (`auto`); streamed through a GPU (`placement.overflow
//! = "stream"`, the default: the lightest offload mode that fits, `model`, `group`, then
//! `sequential`); the CPU. `overflow = "cpu"` sends what fits no GPU whole straight to the CPU, as
//! diffusers does; `overflow = "error"` refuses it. Strategies, over the GPUs:
//! - `balanced`: diffusers' pipeline-level `device_map="balanced"`
//!   (`_assign_components_to_devices`): components largest first (ties by name, where diffusers'
//!   order is hash-random), GPUs ordered by budget (largest first, ties by index) and visited in
//!   snake order (0,1,1,0,0,1,...); the slot pointer does not advance past a component that does
//!   not fit its slot, as in diffusers. Where diffusers puts such a component on the CPU (and
//!   records only the last one), runner tries the other GPUs first, then the overflow policy,
//!   and notes every overflow; with `overflow = "cpu"` it gives diffusers' map exactly.
//! - `sequential`: components in execution order fill GPUs in order, never going back.
//! - `auto`: each component whole on the first GPU with room; a UNet, SD3 or FLUX transformer or
//!   T5 encoder that fits no single GPU is split at its no-split boundaries (`_no_split_modules`:
//!   UNet blocks, `JointTransformerBlock`s, `FluxTransformerBlock`s and
//!   `FluxSingleTransformerBlock`s, `T5Block`s) across the GPUs, in execution order (with
//!   `overflow = "cpu"`, across the GPUs and then the CPU, as accelerate's
//!   `infer_auto_device_map`).
//!
//! Pins are placed first and must fit. Offload modes change what a component needs on its device
//! (see [`memory`]); offloaded weights count against the host's budget.

pub mod build;
pub mod inventory;
pub mod memory;
pub mod modules;
pub mod render;

use std::collections::BTreeMap;

use serde::Serialize;

use crate::device::Device;
use crate::manifest::{Dtype, Offload, OffloadTarget, Overflow, Strategy};
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
    /// Working memory with `components.vae.tiling = true`, where that would lessen it (the VAE,
    /// tiling off, an image larger than the tile): for suggesting it.
    pub working_tiled: Option<u64>,
    /// Its module tree at fp16 when it is fp32 (for suggesting a dtype change; T5's `wo` stays
    /// fp32 there); `None`: half of every size.
    pub tree_half: Option<ModuleTree>,
    pub pin: Option<Device>,
    pub offload: Offload,
    /// Where its offloaded weights live, and `group` offload's blocks per group.
    pub offload_opts: OffloadOpts,
}

/// Where a component's offloaded weights live (`offload_target`) and how `group` offload groups
/// its blocks (`group_blocks`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OffloadOpts {
    pub target: OffloadTarget,
    /// `group` offload: consecutive blocks per group (diffusers' `num_blocks_per_group`); the
    /// component's `tree.groups` are already merged by it (0 and 1: one block per group).
    pub group_blocks: u32,
    /// Weight bytes whose dtype differs from the checkpoint's (converted at load): with
    /// `offload_target = "disk"` they go to a scratch file, the rest stay views of the checkpoint.
    pub converted_bytes: u64,
}

impl ComponentInput {
    /// Whether `auto` may split it (the [`modules::SPLITTABLE_CLASSES`] have no-split units).
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
    /// Host RAM its offloaded weights take while it runs on a GPU: all of them (pinned copies on
    /// CUDA machines) with `offload_target = "host"`, none with `"disk"` (the page cache serves
    /// the memory-mapped checkpoint; converted weights live in a scratch file).
    pub fn host_offload_bytes(&self) -> u64 {
        if !self.offloaded() || self.offload_opts.target == OffloadTarget::Disk {
            0
        } else {
            self.bytes
        }
    }
}

#[derive(Debug, Clone)]
pub struct PlanInput {
    /// In execution order (diffusers' `model_cpu_offload_seq`, then the safety checker).
    pub components: Vec<ComponentInput>,
    pub inventory: Inventory,
    pub strategy: Strategy,
    /// Where a component that fits no GPU whole goes.
    pub overflow: Overflow,
    /// Decisions made while building the input, repeated in the plan's notes.
    pub notes: Vec<String>,
}

/// The model classes whose blocks runner knows, so that `sequential` and `group` offload can
/// stream them (others are loaded whole: `none` or `model` offload). Streaming needs every
/// weight-holding module of the model to announce its path to the offload hooks.
pub const STREAMABLE_CLASSES: [&str; 7] =
    ["UNet2DConditionModel", "CLIPTextModel", "CLIPTextModelWithProjection", "AutoencoderKL", "SD3Transformer2DModel", "FluxTransformer2DModel", "T5EncoderModel"];

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
    /// Where its offloaded weights live (`host` unless offloaded to `disk`).
    pub offload_target: OffloadTarget,
    /// `group` offload: blocks per group (1 unless `group_blocks` says otherwise).
    pub group_blocks: u32,
    /// Host RAM its weights take for the whole run: all of them on the CPU or offloaded to the
    /// host, none offloaded to disk or resident on a GPU.
    pub host_bytes: u64,
    /// Offloaded to disk: the converted weights that go to a scratch file.
    pub scratch_bytes: u64,
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
    /// Set when it fit no GPU whole: `stream` (streamed through a GPU) or `cpu` (on the CPU).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub overflow: Option<Overflow>,
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
    pub overflow: Overflow,
    pub components: Vec<ComponentPlan>,
    pub devices: Vec<DevicePlan>,
    /// Host memory for offloaded weights (also counted in `cpu`'s plan when the CPU takes part).
    pub host_offload_bytes: u64,
    /// Offloaded weights served from disk instead (`offload_target = "disk"`): views of the
    /// memory-mapped checkpoint plus the scratch file's converted weights; no host RAM counted.
    pub disk_offload_bytes: u64,
    /// Of those, the converted weights written to scratch files.
    pub scratch_bytes: u64,
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

/// "options that would fit:" and one line per option (nothing when there is none).
pub fn options_text(options: &[String]) -> String {
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

/// Lighter on device memory from left to right: the order in which `stream` tries offload modes.
const STREAM_MODES: [Offload; 3] = [Offload::Model, Offload::Group, Offload::Sequential];

fn weight_rank(o: Offload) -> usize {
    match o {
        Offload::None => 0,
        Offload::Model => 1,
        Offload::Group => 2,
        Offload::Sequential => 3,
    }
}

struct State<'a> {
    input: &'a PlanInput,
    /// The components as planned: `stream` may raise a component's offload mode.
    comps: Vec<ComponentInput>,
    ledgers: Vec<Ledger>,
    placed: Vec<Option<Placed>>,
    /// How a component that fit no GPU whole was placed.
    overflowed: Vec<Option<Overflow>>,
    notes: Vec<String>,
    host_offload: u64,
    disk_offload: u64,
    scratch: u64,
}

impl<'a> State<'a> {
    fn new(input: &'a PlanInput) -> Self {
        let ledgers = input.inventory.devices.iter().map(|d| Ledger { device: d.device, budget: d.budget, source: d.source, resident: 0, transient: 0 }).collect();
        let n = input.components.len();
        State { input, comps: input.components.clone(), ledgers, placed: vec![None; n], overflowed: vec![None; n], notes: vec![], host_offload: 0, disk_offload: 0, scratch: 0 }
    }

    fn ledger(&self, d: Device) -> Option<usize> {
        self.ledgers.iter().position(|l| l.device == d)
    }

    fn cpu(&self) -> Option<usize> {
        self.ledger(Device::Cpu)
    }

    /// The GPUs' ledgers, in device order.
    fn gpus(&self) -> Vec<usize> {
        (0..self.ledgers.len()).filter(|&l| self.ledgers[l].device != Device::Cpu).collect()
    }

    /// Whether `c` fits whole on ledger `l`, host memory for its offloaded weights included.
    fn fits_as(&self, c: &ComponentInput, l: usize) -> bool {
        let on_cpu = self.ledgers[l].device == Device::Cpu;
        // On the CPU, offloading to the host means nothing: the weights are simply resident.
        let (resident, transient) = if on_cpu { (c.bytes, c.working) } else { (c.resident(), c.transient()) };
        if !self.ledgers[l].fits(resident, transient) {
            return false;
        }
        if c.offloaded() && !on_cpu {
            if let Some(h) = self.cpu() {
                return self.ledgers[h].fits(c.host_offload_bytes(), 0);
            }
        }
        true
    }

    fn fits(&self, i: usize, l: usize) -> bool {
        self.fits_as(&self.comps[i], l)
    }

    /// Of `candidates` where component `i` fits, the one with the most room left (ties: device order).
    fn roomiest(&self, c: &ComponentInput, candidates: &[usize]) -> Option<usize> {
        candidates.iter().copied().filter(|&l| self.fits_as(c, l)).max_by(|&a, &b| self.ledgers[a].free().cmp(&self.ledgers[b].free()).then(self.ledgers[b].device.cmp(&self.ledgers[a].device)))
    }

    fn place(&mut self, i: usize, l: usize, reason: String) {
        let c = &self.comps[i];
        let on_cpu = self.ledgers[l].device == Device::Cpu;
        if on_cpu {
            self.ledgers[l].add(c.bytes, c.working);
            if c.offloaded() {
                self.notes.push(format!("`{}` runs on the CPU, where `offload = \"{}\"` has no effect", c.name, offload_name(c.offload)));
            }
        } else {
            self.ledgers[l].add(c.resident(), c.transient());
            if c.offloaded() {
                let host = c.host_offload_bytes();
                self.host_offload += host;
                if host == 0 {
                    self.disk_offload += c.bytes;
                    self.scratch += c.offload_opts.converted_bytes;
                }
                if let Some(h) = self.cpu() {
                    self.ledgers[h].add(host, 0);
                }
            }
        }
        self.placed[i] = Some((Placement::Whole(self.ledgers[l].device), reason, None));
    }

    /// Splits component `i` over `over` (ledgers, in order) at its no-split units; false when
    /// that does not fit.
    fn try_split(&mut self, i: usize, over: &[usize]) -> bool {
        let c = &self.comps[i];
        if !c.splittable() || c.offloaded() || over.is_empty() {
            return false;
        }
        let mut ledgers = self.ledgers.clone();
        let mut assign: Vec<(String, Device)> = vec![];
        let mut per_device: BTreeMap<String, u64> = BTreeMap::new();
        let mut k = 0;
        let mut used_devices: Vec<usize> = vec![];
        for u in &c.tree.units {
            // A device that runs part of the split also holds that part's activations.
            while k < over.len() && !ledgers[over[k]].fits(u.bytes, if used_devices.contains(&over[k]) { 0 } else { c.working }) {
                k += 1;
            }
            if k == over.len() {
                return false;
            }
            let cur = over[k];
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
        let reason = format!("fits no single GPU ({} needed); split at no-split boundaries over {} in execution order", gb(c.need()), devices.join(" + "));
        self.placed[i] = Some((Placement::Split(modules::compress(&assign)), reason, Some(per_device)));
        // diffusers' pipeline-level `balanced` map places components whole: one whose weights
        // alone exceed every GPU's budget goes to the CPU there.
        let largest_gpu = over.iter().filter(|&&l| self.ledgers[l].device != Device::Cpu).map(|&l| self.ledgers[l].budget).max().unwrap_or(0);
        let diffusers =
            if c.bytes > largest_gpu { format!("; its weights alone ({}) exceed every GPU's budget, so diffusers' `balanced` map would load it on the CPU", gb(c.bytes)) } else { String::new() };
        self.notes.push(format!(
            "`{}` is split: each part runs where it is placed (nothing is streamed), so no reserve for the largest layer is kept (accelerate keeps one on the first GPU and the CPU because it runs offloaded layers there); every device of the split holds the component's working memory ({}){diffusers}",
            c.name,
            gb(c.working)
        ));
        true
    }

    /// Component `i` fits no GPU whole (nor, under `auto`, split across them): `placement.overflow`
    /// decides. `why` says what was tried, for the error.
    fn overflow(&mut self, i: usize, why: &str) -> Result<(), PlanError> {
        if self.gpus().is_empty() {
            // Only the host takes part: the CPU is where everything runs, not an overflow.
            return match self.cpu() {
                Some(h) if self.fits(i, h) => {
                    self.place(i, h, "no GPU takes part; on the CPU".into());
                    Ok(())
                }
                _ => Err(self.not_fit(i, "no GPU takes part and the host has no room for it")),
            };
        }
        self.tiling_hint(i);
        match self.input.overflow {
            Overflow::Error => Err(self.not_fit(i, &format!("{why}; `placement.overflow = \"error\"` neither streams it through a GPU nor puts it on the CPU"))),
            Overflow::Cpu => self.onto_cpu(i, why, Overflow::Cpu),
            Overflow::Stream => {
                if self.stream(i) {
                    Ok(())
                } else {
                    self.onto_cpu(i, why, Overflow::Stream)
                }
            }
        }
    }

    /// A note when tiling would let the VAE fit a GPU whole: its activations are what does not.
    fn tiling_hint(&mut self, i: usize) {
        let c = &self.comps[i];
        let Some(w) = c.working_tiled else { return };
        let v = ComponentInput { working: w, ..c.clone() };
        if let Some(l) = self.roomiest(&v, &self.gpus()) {
            self.notes.push(format!(
                "`{}` fits no GPU whole with {} of working memory (its activations at full resolution); with `components.{}.tiling = true` (diffusers' `enable_vae_tiling`) it needs {} and would fit on {}",
                c.name,
                gb(c.working),
                c.name,
                gb(w),
                self.ledgers[l].device
            ));
        }
    }

    /// `stream`: the lightest offload mode (heavier than the component's own) that fits a GPU,
    /// on the GPU with the most room for it; its weights live in host memory.
    fn stream(&mut self, i: usize) -> bool {
        let gpus = self.gpus();
        let c = self.comps[i].clone();
        for mode in STREAM_MODES {
            if weight_rank(mode) <= weight_rank(c.offload) || (mode != Offload::Model && !streamable(&c.class)) {
                continue;
            }
            let v = ComponentInput { offload: mode, ..c.clone() };
            let Some(l) = self.roomiest(&v, &gpus) else { continue };
            let d = self.ledgers[l].device;
            let peak = v.need();
            self.notes.push(format!(
                "`{}` ({}) fits no GPU whole: streamed through {d} with `{}` offload, peak {} there, its weights in host memory; set `placement.overflow = \"cpu\"` for diffusers' placement (on the CPU)",
                c.name,
                gb(c.need()),
                offload_name(mode),
                gb(peak)
            ));
            self.comps[i] = v;
            self.place(i, l, format!("fits no GPU whole; streamed through {d} with `{}` offload (placement.overflow = \"stream\")", offload_name(mode)));
            self.overflowed[i] = Some(Overflow::Stream);
            return true;
        }
        false
    }

    /// The component goes to the CPU, whose budget must hold it.
    fn onto_cpu(&mut self, i: usize, why: &str, policy: Overflow) -> Result<(), PlanError> {
        let c = &self.comps[i];
        let Some(h) = self.cpu().filter(|&h| self.fits(i, h)) else {
            let host =
                self.cpu().map(|h| format!("; the host (`cpu`, budget from {}) has {} free of {}", self.ledgers[h].source, gb(self.ledgers[h].free()), gb(self.ledgers[h].budget))).unwrap_or_default();
            let how = if policy == Overflow::Stream { " nor streamed through one" } else { "" };
            return Err(self.not_fit(i, &format!("{why}{how}, and the CPU cannot take it: it needs {} there{host}", gb(c.bytes + c.working))));
        };
        let (name, need) = (c.name.clone(), c.need());
        let note = match policy {
            Overflow::Stream => {
                let floor = self.stream_floor(i);
                format!("`{name}` ({}) fits no GPU, not even streamed ({floor}): on the CPU", gb(need))
            }
            _ => format!("`{name}` ({}) fits no GPU: on the CPU, as diffusers places it (`placement.overflow = \"cpu\"`)", gb(need)),
        };
        self.notes.push(note.clone());
        self.place(i, h, format!("fits no GPU; on the CPU (placement.overflow = \"{}\")", policy.as_str()));
        self.overflowed[i] = Some(Overflow::Cpu);
        Ok(())
    }

    /// What streaming component `i` would need at the least on a GPU, against the roomiest GPU.
    fn stream_floor(&self, i: usize) -> String {
        let c = &self.comps[i];
        let mode = if streamable(&c.class) { Offload::Sequential } else { Offload::Model };
        let mode = if weight_rank(c.offload) > weight_rank(mode) { c.offload } else { mode };
        let v = ComponentInput { offload: mode, ..c.clone() };
        let free = self.gpus().iter().map(|&l| self.ledgers[l].free()).max().unwrap_or(0);
        format!("`{}` offload needs {} on a GPU, the roomiest has {} free", offload_name(v.offload), gb(v.need()), gb(free))
    }

    fn not_fit(&self, i: usize, what: &str) -> PlanError {
        let c = &self.comps[i];
        let largest = self.ledgers.iter().filter(|l| l.device != Device::Cpu).max_by(|a, b| a.budget.cmp(&b.budget).then(b.device.cmp(&a.device)));
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
            message.push_str(&format!("; the largest GPU budget is `{}` {}", l.device, gb(l.budget)));
        }
        message.push_str(&format!(" ({})", frees.join(", ")));
        // Offloaded weights live on the host: say so when that is what is short.
        if let Some(h) = self.cpu() {
            let host = &self.ledgers[h];
            if c.offloaded() && !host.fits(c.host_offload_bytes(), 0) {
                message.push_str(&format!(
                    "\nits offloaded weights ({}) live in host memory, and the host (`cpu`, budget from {}) has {} free of {}",
                    gb(c.bytes),
                    host.source,
                    gb(host.free()),
                    gb(host.budget)
                ));
            }
        }
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
        for (i, c) in self.comps.iter().enumerate() {
            let (placement, reason, split_bytes) = self.placed[i].clone().expect("every component placed");
            let (device, split) = match placement {
                Placement::Whole(d) => (d, None),
                Placement::Split(map) => (map.first().map(|m| m.1).unwrap_or(Device::Cpu), Some(map)),
            };
            let peak_bytes = if device == Device::Cpu { c.bytes + c.working } else { c.need() };
            let streamed_bytes = if device == Device::Cpu { c.bytes } else { memory::device_weight_bytes(c.offload, c.bytes, c.tree.largest_leaf, c.tree.largest_group()) };
            let on_disk = device != Device::Cpu && c.offloaded() && c.offload_opts.target == OffloadTarget::Disk;
            let host_bytes = match (&split, device) {
                (Some(_), _) => split_bytes.as_ref().and_then(|b| b.get("cpu").copied()).unwrap_or(0),
                (None, Device::Cpu) => c.bytes,
                (None, _) => c.host_offload_bytes(),
            };
            components.push(ComponentPlan {
                name: c.name.clone(),
                class: c.class.clone(),
                dtype: c.dtype,
                bytes: c.bytes,
                working_bytes: c.working,
                offload: c.offload,
                offload_target: if on_disk { OffloadTarget::Disk } else { OffloadTarget::Host },
                group_blocks: c.offload_opts.group_blocks.max(1),
                host_bytes,
                scratch_bytes: if on_disk { c.offload_opts.converted_bytes } else { 0 },
                device,
                split,
                split_bytes,
                peak_bytes,
                streamed_bytes,
                overflow: self.overflowed[i],
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
        let mut notes = self.notes;
        for c in components.iter().filter(|c| c.offload_target == OffloadTarget::Disk) {
            let scratch = if c.scratch_bytes > 0 {
                format!("; its {} converted to {} go to a scratch file (`placement.scratch_dir`), removed on exit", gb(c.scratch_bytes), c.dtype.as_str())
            } else {
                String::new()
            };
            notes.push(format!("`{}` is offloaded to disk: its weights ({}) stay in the memory-mapped checkpoint, served by the page cache, and count no host RAM{scratch}", c.name, gb(c.bytes)));
        }
        Plan {
            strategy: self.input.strategy,
            overflow: self.input.overflow,
            components,
            devices,
            host_offload_bytes: self.host_offload,
            disk_offload_bytes: self.disk_offload,
            scratch_bytes: self.scratch,
            notes,
        }
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
                    "\nno single change (offload mode, auto split, fp16, unpinning, overflow policy, host budget) fits either: the weights alone total {} against {} of budgets; raise `placement.max_memory` or add devices",
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
    let mut try_with = |desc: &dyn Fn(&Plan) -> String, f: &dyn Fn(&mut PlanInput)| {
        let mut v = input.clone();
        f(&mut v);
        if let Ok(p) = plan_once(&v) {
            let cp = &p.components[idx];
            let at = match &cp.split {
                Some(s) => s.iter().map(|x| x.1.to_string()).collect::<std::collections::BTreeSet<_>>().into_iter().collect::<Vec<_>>().join(" + "),
                None => cp.device.to_string(),
            };
            let how = if cp.offload != v.components[idx].offload { format!(" with `{}` offload", offload_name(cp.offload)) } else { String::new() };
            out.push(format!("{}: `{name}` on {at}{how}, peak {} there", desc(&p), gb(cp.peak_bytes)));
        }
    };
    let fixed = |s: String| move |_: &Plan| s.clone();
    // The VAE's activations at full resolution: tiling bounds them by the tile.
    if let Some(w) = c.working_tiled {
        try_with(&fixed(format!("components.{name}.tiling = true (decodes in tiles: {} working memory instead of {})", gb(w), gb(c.working))), &|v| v.components[idx].working = w);
    }
    for mode in [Offload::Model, Offload::Group, Offload::Sequential] {
        if c.offload != mode && (mode == Offload::Model || streamable(&c.class)) {
            try_with(&fixed(format!("components.{name}.offload = \"{}\"", offload_name(mode))), &|v| v.components[idx].offload = mode);
        }
    }
    // Offloaded weights that the host cannot hold: keep them in the memory-mapped checkpoint.
    if c.offload_opts.target == OffloadTarget::Host {
        try_with(&fixed(format!("components.{name}.offload_target = \"disk\" (its offloaded weights stay in the memory-mapped checkpoint)")), &|v| {
            v.components[idx].offload_opts.target = OffloadTarget::Disk
        });
    }
    if input.components.iter().filter(|c| c.offload_opts.target == OffloadTarget::Host).count() > 1 {
        try_with(&fixed("placement.offload_target = \"disk\" (every offloaded component's weights stay in the memory-mapped checkpoint)".into()), &|v| {
            for c in &mut v.components {
                c.offload_opts.target = OffloadTarget::Disk;
            }
        });
    }
    if input.strategy != Strategy::Auto && c.splittable() {
        try_with(&fixed("placement.strategy = \"auto\" (splits it across devices)".into()), &|v| v.strategy = Strategy::Auto);
    }
    if c.dtype == Dtype::Fp32 {
        try_with(&fixed(format!("components.{name}.dtype = \"fp16\"")), &|v| {
            let c = &mut v.components[idx];
            c.dtype = Dtype::Fp16;
            c.working = c.working_half;
            match c.tree_half.take() {
                Some(t) => {
                    c.bytes = t.total;
                    c.tree = t;
                }
                None => {
                    c.bytes = c.bytes.div_ceil(2);
                    for u in &mut c.tree.units {
                        u.bytes /= 2;
                    }
                    c.tree.largest_leaf /= 2;
                    for g in &mut c.tree.groups {
                        g.1 /= 2;
                    }
                }
            }
        });
    }
    if c.pin.is_some() {
        try_with(&fixed(format!("remove the pin `components.{name}.device`")), &|v| v.components[idx].pin = None);
    }
    for policy in [Overflow::Stream, Overflow::Cpu] {
        if input.overflow != policy {
            try_with(&fixed(format!("placement.overflow = \"{}\"", policy.as_str())), &|v| v.overflow = policy);
        }
    }
    // A host too small for what goes there: the budget that would do.
    if let Some(host) = input.inventory.get(Device::Cpu) {
        let weights: u64 = input.components.iter().map(|c| c.bytes + c.working).sum();
        let desc = |p: &Plan| {
            let need = p.devices.iter().find(|d| d.device == Device::Cpu).map_or(0, |d| d.planned_bytes);
            let at_least = ByteSize(need.max(host.budget)).manifest_at_least();
            format!("a host budget of {at_least} (`placement.max_memory.cpu = \"{at_least}\"`, on a host with that much RAM)")
        };
        try_with(&desc, &|v| {
            if let Some(h) = v.inventory.devices.iter_mut().find(|d| d.device == Device::Cpu) {
                h.budget = h.budget.saturating_add(weights);
            }
        });
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
    // 2. The rest by strategy, GPUs only; what fits no GPU goes by `placement.overflow`.
    let rest: Vec<usize> = (0..input.components.len()).filter(|&i| st.placed[i].is_none()).collect();
    match input.strategy {
        Strategy::Balanced => balanced(&mut st, rest)?,
        Strategy::Sequential => {
            let gpus = st.gpus();
            let mut cur = 0;
            for i in rest {
                // Never goes back; a component that fits no GPU left leaves the pointer where it was.
                match (cur..gpus.len()).find(|&k| st.fits(i, gpus[k])) {
                    Some(k) => {
                        cur = k;
                        let d = st.ledgers[gpus[k]].device;
                        st.place(i, gpus[k], format!("next in execution order; first GPU in order with room ({d})"));
                    }
                    None => st.overflow(i, "does not fit whole in what is left of the GPUs after the components before it (sequential never goes back)")?,
                }
            }
        }
        Strategy::Auto => {
            let gpus = st.gpus();
            for i in rest {
                if let Some(&l) = gpus.iter().find(|&&l| st.fits(i, l)) {
                    let d = st.ledgers[l].device;
                    st.place(i, l, format!("fits whole; first GPU in order with room ({d})"));
                } else if st.try_split(i, &gpus) {
                } else if input.overflow == Overflow::Cpu
                    && !gpus.is_empty()
                    && st.cpu().is_some_and(|h| {
                        // accelerate's `infer_auto_device_map`: GPUs in order, then the CPU.
                        let over: Vec<usize> = gpus.iter().copied().chain([h]).collect();
                        st.try_split(i, &over)
                    })
                {
                    st.overflowed[i] = Some(Overflow::Cpu);
                    let name = st.comps[i].name.clone();
                    st.notes
                        .push(format!("`{name}` fits no GPU, nor split across them: split over the GPUs and the CPU, as accelerate's `infer_auto_device_map` does (`placement.overflow = \"cpu\"`)"));
                } else {
                    let why = if input.components[i].splittable() { "fits no GPU whole, nor split across the GPUs" } else { "fits no GPU whole (it is placed whole)" };
                    st.overflow(i, why)?;
                }
            }
        }
    }
    Ok(st.finish())
}

/// diffusers' `_assign_components_to_devices`, with overflow handled by `placement.overflow`.
fn balanced(st: &mut State, rest: Vec<usize>) -> Result<(), PlanError> {
    let mut order = rest;
    order.sort_by(|&a, &b| st.comps[b].bytes.cmp(&st.comps[a].bytes).then(st.comps[a].name.cmp(&st.comps[b].name)));
    // GPUs by budget (largest first, ties by index), then the snake cycle a,b,...,b,a.
    let mut gpus = st.gpus();
    gpus.sort_by(|&a, &b| st.ledgers[b].free().cmp(&st.ledgers[a].free()).then(st.ledgers[a].device.cmp(&st.ledgers[b].device)));
    let cycle: Vec<usize> = gpus.iter().copied().chain(gpus.iter().rev().copied()).collect();
    let mut slot = 0usize;
    for i in order {
        if cycle.is_empty() {
            st.overflow(i, "no GPU takes part")?;
            continue;
        }
        let l = cycle[slot % cycle.len()];
        let d = st.ledgers[l].device;
        if st.fits(i, l) {
            st.place(i, l, format!("largest first; snake slot {} -> {d}", slot + 1));
            slot += 1;
            continue;
        }
        // diffusers loads it on the CPU here (and remembers only the last such component); the
        // slot pointer does not advance.
        let (name, need, free) = (st.comps[i].name.clone(), st.comps[i].need(), st.ledgers[l].free());
        let why = format!("fits neither its snake slot {d} ({} free) nor any other GPU", gb(free));
        if st.input.overflow == Overflow::Cpu {
            st.onto_cpu(i, &format!("does not fit its snake slot {d} ({} free)", gb(free)), Overflow::Cpu)?;
            continue;
        }
        let others: Vec<usize> = gpus.iter().copied().filter(|&g| g != l).collect();
        match st.roomiest(&st.comps[i].clone(), &others) {
            Some(t) => {
                let td = st.ledgers[t].device;
                let note = format!("overflow: `{name}` ({}) did not fit its snake slot {d} ({} free); placed on {td} instead (diffusers would have put it on the CPU)", gb(need), gb(free));
                st.notes.push(note.clone());
                st.place(i, t, note.trim_start_matches("overflow: ").to_string());
            }
            None => st.overflow(i, &why)?,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
