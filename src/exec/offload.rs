//! Offload at run time, per component, as diffusers' hooks do it:
//! - `model` ([`Visitor`]): the whole component visits its device right before it runs and goes
//!   back to host memory when another component runs there (diffusers chains its hooks the same
//!   way, in pipeline order), so a device holds one visitor at a time.
//! - `sequential` and `group` ([`Stream`]): the component's variables stay in host memory and the
//!   device holds empty placeholders (so that inputs still follow `weight.device()`); the model
//!   code announces each module it runs ([`crate::models::hooks`]) and the stream brings a leaf
//!   module (`sequential`) or a block group (`group`) in right before it runs and drops it after.
//!   `group` also brings the group that runs next while the current one runs: the order is the
//!   plan's execution order at first, then the order observed.
//!
//! Every move goes through the residency ledger, so peaks are measured, and a budget exceeded at
//! run time is an error naming the component and the bytes.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;

use tch::nn::VarStore;
use tch::Tensor;

use super::{ledger, tch_device, ExecError};
use crate::device::Device;
use crate::manifest::Offload;
use crate::models::hooks::{self, ForwardHooks};

pub(super) struct Residency<'a> {
    pub ledger: Rc<RefCell<ledger::Ledger>>,
    visitors: Vec<Visitor<'a>>,
    streams: Vec<Rc<Stream>>,
    /// The planned devices each component runs on (several for a split one).
    runs_on: HashMap<String, Vec<Device>>,
    simulate: bool,
}

pub(super) struct Visitor<'a> {
    pub name: String,
    pub vs: &'a VarStore,
    pub device: Device,
    pub split: Option<Vec<(String, Device)>>,
    pub present: bool,
    /// The host copy of every variable (pinned on CUDA machines): the weights never change, so
    /// leaving the device drops the device copy instead of copying back.
    pub host: Vec<(String, Tensor)>,
}

impl<'a> Visitor<'a> {
    pub fn new(name: &str, vs: &'a VarStore, device: Device, split: Option<Vec<(String, Device)>>) -> Visitor<'a> {
        let host = vs.variables().into_iter().map(|(n, v)| (n, v.detach().to_device(tch::Device::Cpu))).collect();
        Visitor { name: name.to_string(), vs, device, split, present: false, host }
    }
}

impl<'a> Residency<'a> {
    pub fn new(ledger: ledger::Ledger, visitors: Vec<Visitor<'a>>, runs_on: HashMap<String, Vec<Device>>, simulate: bool) -> Residency<'a> {
        Residency { ledger: Rc::new(RefCell::new(ledger)), visitors, streams: vec![], runs_on, simulate }
    }

    /// The ledger all streams of this residency share.
    pub fn shared_ledger(&self) -> Rc<RefCell<ledger::Ledger>> {
        self.ledger.clone()
    }

    pub fn add_stream(&mut self, s: Stream) {
        self.streams.push(Rc::new(s));
    }

    /// Component `name` is about to run: its `model` visit starts, or its stream becomes the
    /// forward hooks; other streams drop what they prefetched.
    pub fn enter(&mut self, name: &str) -> Result<(), ExecError> {
        self.check()?;
        for s in &self.streams {
            if s.component != name {
                s.settle();
            }
        }
        self.check()?;
        let active = self.streams.iter().find(|s| s.component == name).map(|s| s.clone() as Rc<dyn ForwardHooks>);
        hooks::set(active);
        // The plan counts an offloaded component's weights on its device only while it runs:
        // whatever visits the devices `name` runs on leaves first, whatever `name`'s own mode.
        let here = self.runs_on.get(name).cloned().unwrap_or_default();
        for j in 0..self.visitors.len() {
            if self.visitors[j].name != name && self.visitors[j].present && here.contains(&self.visitors[j].device) {
                self.leave(j);
            }
        }
        let Some(i) = self.visitors.iter().position(|v| v.name == name) else {
            return Ok(());
        };
        if self.visitors[i].present {
            return Ok(());
        }
        let device = self.visitors[i].device;
        let simulate = self.simulate;
        let v = &mut self.visitors[i];
        let to = |d: Device| {
            if simulate {
                tch::Device::Cpu
            } else {
                tch_device(d)
            }
        };
        let there = ledger::weigh(v.vs, v.device, v.split.as_deref());
        let mut vars = v.vs.variables();
        tch::no_grad(|| {
            for (name, host) in &v.host {
                let d = v.split.as_deref().and_then(|s| ledger::device_of(s, name)).unwrap_or(v.device);
                if let Some(var) = vars.get_mut(name) {
                    // Non-blocking from pinned memory: the copies queue on the stream the
                    // component's kernels run on, so no synchronisation is needed.
                    var.set_data(&host.to_device_(to(d), host.kind(), true, false));
                }
            }
        });
        v.present = true;
        tracing::debug!(component = name, device = %device, "offload: in");
        self.ledger.borrow_mut().add(name, &there)
    }

    /// The first error a stream met (a budget exceeded while streaming).
    pub fn check(&self) -> Result<(), ExecError> {
        for s in &self.streams {
            if let Some(e) = s.state.borrow_mut().error.take() {
                return Err(e);
            }
        }
        Ok(())
    }

    /// diffusers' `maybe_free_model_hooks`: every offloaded component ends in host memory, with
    /// its variables holding their weights again.
    pub fn leave_all(&mut self) -> Result<(), ExecError> {
        hooks::set(None);
        for s in &self.streams {
            s.restore();
        }
        for i in 0..self.visitors.len() {
            if self.visitors[i].present {
                self.leave(i);
            }
        }
        self.check()
    }

    fn leave(&mut self, i: usize) {
        let v = &mut self.visitors[i];
        let there = ledger::weigh(v.vs, v.device, v.split.as_deref());
        let mut vars = v.vs.variables();
        tch::no_grad(|| {
            for (name, host) in &v.host {
                if let Some(var) = vars.get_mut(name) {
                    var.set_data(host);
                }
            }
        });
        v.present = false;
        tracing::debug!(component = %v.name, "offload: out");
        self.ledger.borrow_mut().remove(&there);
    }
}

impl Drop for Residency<'_> {
    /// On an error path too (a cancelled job): no hooks stay installed, no variable keeps a
    /// placeholder, and `model`-offloaded weights go back to host memory, so that the next run
    /// on the session starts as the first did.
    fn drop(&mut self) {
        hooks::set(None);
        for s in &self.streams {
            s.restore();
        }
        for i in 0..self.visitors.len() {
            if self.visitors[i].present {
                self.leave(i);
            }
        }
    }
}

/// One variable of a streamed component.
struct Var {
    /// The model's variable (a handle on the same tensor the model code holds).
    var: Tensor,
    /// Its weights in host memory.
    host: Tensor,
    /// An empty tensor on the device it runs on, held while it is absent.
    absent: Tensor,
    device: tch::Device,
}

struct Unit {
    /// Its module path, or for several blocks (`group_blocks`) the first and last (`down_blocks.0-1`).
    path: String,
    /// `group`: the block group whose end (hook `post`) takes the unit off the device: its last.
    last: String,
    vars: Vec<Var>,
    bytes: BTreeMap<Device, u64>,
    /// On the device (or on its way there), and counted in the ledger.
    present: bool,
    /// Prefetched on the side stream: the destinations (one per var) and their copies' event.
    in_flight: Option<(Vec<Tensor>, super::cuda_stream::Pending)>,
}

struct StreamState {
    units: Vec<Unit>,
    /// The unit that runs after each, as observed (`group` prefetch).
    next: Vec<Option<usize>>,
    last: Option<usize>,
    restored: bool,
    error: Option<ExecError>,
}

/// `sequential` or `group` offload of one component.
pub(super) struct Stream {
    component: String,
    mode: Offload,
    index: HashMap<String, usize>,
    /// `group`: the unit of every leaf module, so that a leaf whose group was not announced
    /// (model code without that scope) still finds its weights on the device.
    leaf_units: HashMap<String, usize>,
    ledger: Rc<RefCell<ledger::Ledger>>,
    /// `group` prefetch's side stream on CUDA, when asked for and available.
    side: Option<super::cuda_stream::SideStream>,
    state: RefCell<StreamState>,
}

impl Stream {
    /// Takes `vs`'s weights off their variables (they stay in host memory, where they were
    /// loaded) and leaves empty placeholders on the run device.
    #[cfg(test)]
    pub fn new(component: &str, mode: Offload, vs: &VarStore, device: Device, run_device: tch::Device, ledger: Rc<RefCell<ledger::Ledger>>) -> Stream {
        Self::grouped(component, mode, vs, device, run_device, ledger, 1)
    }

    /// [`Stream::new`] with `group` offload's units `group_blocks` consecutive blocks each
    /// ([`crate::plan::modules::block_chunk`]): any of their blocks announced brings the unit,
    /// the end of its last block drops it.
    pub fn grouped(component: &str, mode: Offload, vs: &VarStore, device: Device, run_device: tch::Device, ledger: Rc<RefCell<ledger::Ledger>>, group_blocks: u32) -> Stream {
        let mut by_unit: BTreeMap<String, Vec<(String, Tensor)>> = BTreeMap::new();
        // A unit's block groups (several with `group_blocks`).
        let mut members: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let mut leaves: HashMap<String, String> = HashMap::new();
        for (name, var) in vs.variables() {
            // A leaf module: the variable's parent path.
            let leaf = name.rsplit_once('.').map_or(String::new(), |(m, _)| m.to_string());
            let unit = match mode {
                Offload::Sequential => leaf.clone(),
                _ => {
                    let group = crate::plan::modules::group_path(&name);
                    let unit = crate::plan::modules::block_chunk(&group, group_blocks);
                    let m = members.entry(unit.clone()).or_default();
                    if !m.contains(&group) {
                        m.push(group);
                    }
                    unit
                }
            };
            leaves.insert(leaf, unit.clone());
            by_unit.entry(unit).or_default().push((name, var));
        }
        let mut paths: Vec<String> = by_unit.keys().cloned().collect();
        crate::plan::modules::sort_in_execution_order(&mut paths);
        let units: Vec<Unit> = tch::no_grad(|| {
            paths
                .iter()
                .map(|p| {
                    let mut bytes = 0;
                    let vars = by_unit.remove(p).unwrap_or_default().into_iter().map(|(_, mut var)| {
                        let host = var.detach();
                        bytes += ledger::tensor_bytes(&host);
                        let absent = Tensor::empty([0], (host.kind(), run_device));
                        var.set_data(&absent);
                        Var { var, host, absent, device: run_device }
                    });
                    let vars: Vec<Var> = vars.collect();
                    let mut m = members.get(p).cloned().unwrap_or_else(|| vec![p.clone()]);
                    crate::plan::modules::sort_in_execution_order(&mut m);
                    let path = crate::plan::modules::chunk_label(&m.iter().map(String::as_str).collect::<Vec<_>>());
                    Unit { path, last: m.last().cloned().unwrap_or_default(), vars, bytes: [(device, bytes)].into(), present: false, in_flight: None }
                })
                .collect()
        });
        // Every block group announces its unit (the unit's own key too).
        let mut index: HashMap<String, usize> = HashMap::new();
        for (i, p) in paths.iter().enumerate() {
            index.insert(p.clone(), i);
            for g in members.get(p).into_iter().flatten() {
                index.insert(g.clone(), i);
            }
        }
        let leaf_units = match mode {
            Offload::Group => leaves.into_iter().filter_map(|(leaf, unit)| index.get(&unit).map(|&i| (leaf, i))).collect(),
            _ => HashMap::new(),
        };
        let n = units.len();
        let side = match (mode, run_device) {
            (Offload::Group, tch::Device::Cuda(i)) if super::cuda_stream::requested() => {
                let s = super::cuda_stream::SideStream::new(i);
                if s.is_none() {
                    tracing::warn!(component, "RUNNER_PREFETCH_STREAM: no side CUDA stream (driver API unavailable); prefetching on the compute stream");
                }
                s
            }
            _ => None,
        };
        tracing::debug!(component, mode = ?mode, units = n, side_stream = side.is_some(), "offload: streaming");
        Stream { component: component.to_string(), mode, index, leaf_units, ledger, side, state: RefCell::new(StreamState { units, next: vec![None; n], last: None, restored: false, error: None }) }
    }

    /// Starts unit `i`'s copies on the side stream (`group` prefetch); false when there is no
    /// side stream or the driver refused, and the caller copies on the compute stream instead.
    fn prefetch(&self, st: &mut StreamState, i: usize) -> bool {
        let Some(side) = &self.side else { return false };
        let u = &mut st.units[i];
        if u.present {
            return true;
        }
        if u.vars.iter().any(|v| !v.host.is_contiguous()) {
            return false;
        }
        let dsts: Vec<Tensor> = u.vars.iter().map(|v| Tensor::empty(v.host.size(), (v.host.kind(), v.device))).collect();
        let copies: Vec<(u64, *const std::ffi::c_void, usize)> =
            u.vars.iter().zip(&dsts).map(|(v, d)| (d.data_ptr() as u64, v.host.data_ptr() as *const std::ffi::c_void, ledger::tensor_bytes(&v.host) as usize)).collect();
        let Some(pending) = side.copy(&copies) else { return false };
        u.in_flight = Some((dsts, pending));
        u.present = true;
        self.count_in(st, i);
        true
    }

    fn bring(&self, st: &mut StreamState, i: usize) {
        let u = &mut st.units[i];
        if let Some((dsts, pending)) = u.in_flight.take() {
            // Prefetched: the compute stream waits for the copies, then the variables take them.
            let side = self.side.as_ref().expect("in flight on the side stream");
            if !side.wait(&pending) {
                // The wait could not be queued: finish the copies before anything else runs.
                side.synchronize();
            }
            tch::no_grad(|| {
                for (v, d) in u.vars.iter_mut().zip(&dsts) {
                    v.var.set_data(d);
                }
            });
            return;
        }
        if u.present {
            return;
        }
        tch::no_grad(|| {
            for v in &mut u.vars {
                // Non-blocking from pinned host memory; the copy is ordered before the kernels
                // that use it on the same stream.
                v.var.set_data(&v.host.to_device_(v.device, v.host.kind(), true, false));
            }
        });
        u.present = true;
        self.count_in(st, i);
    }

    /// Unit `i` arrived on the device: into the ledger (a budget exceeded is kept as the error).
    fn count_in(&self, st: &mut StreamState, i: usize) {
        let u = &st.units[i];
        if let Err(e) = self.ledger.borrow_mut().add(&format!("{} ({})", self.component, if u.path.is_empty() { "root" } else { &u.path }), &u.bytes) {
            st.error.get_or_insert(e);
        }
    }

    fn drop_unit(&self, st: &mut StreamState, i: usize) {
        let u = &mut st.units[i];
        if !u.present {
            return;
        }
        if let Some((dsts, pending)) = u.in_flight.take() {
            // Prefetched, never used: the compute stream must not reuse the destinations' memory
            // before the copies into them are done.
            let side = self.side.as_ref().expect("in flight on the side stream");
            if !side.wait(&pending) {
                side.synchronize();
            }
            drop(dsts);
        }
        tch::no_grad(|| {
            for v in &mut u.vars {
                v.var.set_data(&v.absent);
            }
        });
        u.present = false;
        self.ledger.borrow_mut().remove(&u.bytes);
    }

    /// Drops whatever is on the device (a prefetched group that did not run).
    fn settle(&self) {
        let mut st = self.state.borrow_mut();
        for i in 0..st.units.len() {
            self.drop_unit(&mut st, i);
        }
        st.last = None;
    }

    /// Gives the variables their host weights back (end of a run, or an error).
    fn restore(&self) {
        let mut st = self.state.borrow_mut();
        if st.restored {
            return;
        }
        for i in 0..st.units.len() {
            self.drop_unit(&mut st, i);
        }
        tch::no_grad(|| {
            for u in &mut st.units {
                for v in &mut u.vars {
                    v.var.set_data(&v.host);
                }
            }
        });
        st.restored = true;
    }
}

impl ForwardHooks for Stream {
    fn pre(&self, path: &str) {
        let mut st = self.state.borrow_mut();
        let i = match (self.index.get(path), self.leaf_units.get(path)) {
            (Some(&i), _) => i,
            // A leaf of a group that is not ready: its group was not announced; enter it now.
            (None, Some(&u)) if !st.units[u].present || st.units[u].in_flight.is_some() => u,
            _ => return,
        };
        if self.mode == Offload::Group && st.last == Some(i) && st.units[i].present && st.units[i].in_flight.is_none() {
            // The next block of the unit that is running (`group_blocks`): it is here.
            return;
        }
        if self.mode == Offload::Group {
            // At most this group and the next on the device: anything else leaves first.
            for j in 0..st.units.len() {
                if j != i {
                    self.drop_unit(&mut st, j);
                }
            }
            if let Some(l) = st.last {
                st.next[l] = Some(i);
            }
            st.last = Some(i);
        }
        self.bring(&mut st, i);
        if self.mode == Offload::Group {
            let guess = if i + 1 < st.units.len() { Some(i + 1) } else { None };
            if let Some(k) = st.next[i].or(guess).filter(|&k| k != i) {
                if !self.prefetch(&mut st, k) {
                    self.bring(&mut st, k);
                }
            }
        }
    }

    fn post(&self, path: &str) {
        let Some(&i) = self.index.get(path) else {
            return;
        };
        let mut st = self.state.borrow_mut();
        if self.mode == Offload::Group && st.units[i].last != path {
            // A unit of several blocks stays until its last block is done.
            return;
        }
        self.drop_unit(&mut st, i);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{DevicePlan, Plan};

    fn plan_with(budget: u64) -> Plan {
        let d = DevicePlan {
            device: Device::Cuda(0),
            budget_bytes: budget,
            source: crate::plan::inventory::BudgetSource::MaxMemory,
            resident_bytes: 0,
            planned_bytes: 0,
            weight_peak_bytes: 0,
            free_bytes: budget,
        };
        Plan {
            strategy: crate::manifest::Strategy::Balanced,
            overflow: crate::manifest::Overflow::Stream,
            components: vec![],
            devices: vec![d],
            host_offload_bytes: 0,
            disk_offload_bytes: 0,
            scratch_bytes: 0,
            notes: vec![],
        }
    }

    #[test]
    fn group_streams_bring_the_next_group_and_sequential_one_leaf() {
        let vs = VarStore::new(tch::Device::Cpu);
        let a = crate::models::hooks::Linear::new(&vs.root() / "down_blocks" / 0 / "proj", 4, 4, Default::default());
        let b = crate::models::hooks::Linear::new(&vs.root() / "down_blocks" / 1 / "proj", 4, 4, Default::default());
        let x = Tensor::ones([1, 4], (tch::Kind::Float, tch::Device::Cpu));
        let want = b.forward(&a.forward(&x));
        let run = |mode: Offload| {
            let res = Residency::new(ledger::Ledger::new(&plan_with(1 << 20)), vec![], HashMap::new(), true);
            let s = Rc::new(Stream::new("unet", mode, &vs, Device::Cuda(0), tch::Device::Cpu, res.shared_ledger()));
            assert_eq!(a.weight().numel(), 0, "placeholders while absent");
            hooks::set(Some(s.clone()));
            let y = hooks::scoped("down_blocks.0", || a.forward(&x));
            let y = hooks::scoped("down_blocks.1", || b.forward(&y));
            hooks::set(None);
            s.restore();
            assert_eq!(a.weight().numel(), 16, "weights back after the run");
            let peak = res.ledger.borrow().report(&plan_with(1 << 20))["cuda:0"].peak_bytes;
            (y, peak)
        };
        let (y, peak) = run(Offload::Group);
        assert!(y.equal(&want));
        assert_eq!(peak, 2 * 80, "group 0 and the prefetched group 1");
        let (y, peak) = run(Offload::Sequential);
        assert!(y.equal(&want));
        assert_eq!(peak, 80, "one leaf at a time");
    }

    #[test]
    fn group_blocks_stream_consecutive_blocks_together() {
        // Four blocks, two per group: the device holds the running pair and the prefetched next
        // pair, never two copies of a pair between its blocks.
        let vs = VarStore::new(tch::Device::Cpu);
        let blocks: Vec<crate::models::hooks::Linear> = (0..4).map(|i| crate::models::hooks::Linear::new(&vs.root() / "down_blocks" / i / "proj", 4, 4, Default::default())).collect();
        let x = Tensor::ones([1, 4], (tch::Kind::Float, tch::Device::Cpu));
        let want = blocks.iter().fold(x.shallow_clone(), |y, b| b.forward(&y));
        let res = Residency::new(ledger::Ledger::new(&plan_with(1 << 20)), vec![], HashMap::new(), true);
        let s = Rc::new(Stream::grouped("unet", Offload::Group, &vs, Device::Cuda(0), tch::Device::Cpu, res.shared_ledger(), 2));
        assert_eq!(s.state.borrow().units.iter().map(|u| u.path.clone()).collect::<Vec<_>>(), ["down_blocks.0-1", "down_blocks.2-3"]);
        hooks::set(Some(s.clone()));
        let mut y = x.shallow_clone();
        for (i, b) in blocks.iter().enumerate() {
            y = hooks::scoped(&format!("down_blocks.{i}"), || b.forward(&y));
            let present: Vec<bool> = s.state.borrow().units.iter().map(|u| u.present).collect();
            assert_eq!(present, [i == 0, i < 3], "after block {i}");
        }
        hooks::set(None);
        s.restore();
        assert!(y.equal(&want));
        assert_eq!(res.ledger.borrow().report(&plan_with(1 << 20))["cuda:0"].peak_bytes, 4 * 80, "two groups of two blocks");
    }

    #[test]
    fn a_budget_exceeded_while_streaming_is_an_error_naming_the_component_and_bytes() {
        let vs = VarStore::new(tch::Device::Cpu);
        let a = crate::models::hooks::Linear::new(&vs.root() / "conv_in", 4, 4, Default::default());
        let mut res = Residency::new(ledger::Ledger::new(&plan_with(50)), vec![], HashMap::new(), true);
        let s = Stream::new("unet", Offload::Sequential, &vs, Device::Cuda(0), tch::Device::Cpu, res.shared_ledger());
        res.add_stream(s);
        res.enter("unet").unwrap();
        let _ = a.forward(&Tensor::ones([1, 4], (tch::Kind::Float, tch::Device::Cpu)));
        let e = res.leave_all().unwrap_err().to_string();
        assert!(e.contains("`unet (conv_in)` brings 80 B of weights to cuda:0: 80 B resident there, over its budget of 50 B"), "{e}");
        assert_eq!(a.weight().numel(), 16);
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
        /// Any order of block calls (repeats, jumps back, as a model's forward or a changed
        /// order would make them): every output equals the output without hooks, the device never
        /// holds more than two groups (`group`) or one leaf (`sequential`), and after the run every
        /// variable holds its weights again.
        #[test]
        fn streams_keep_outputs_weights_and_bounds(sizes in proptest::collection::vec(1i64..6, 2..7), calls in proptest::collection::vec(0usize..6, 1..30), group in any::<bool>()) {
            let vs = VarStore::new(tch::Device::Cpu);
            let blocks: Vec<(crate::models::hooks::Linear, crate::models::hooks::Linear)> = sizes
                .iter()
                .enumerate()
                .map(|(i, &n)| {
                    let p = &vs.root() / "down_blocks" / i as i64;
                    (crate::models::hooks::Linear::new(&p / "a", 3, 3 * n, Default::default()), crate::models::hooks::Linear::new(&p / "b", 3 * n, 3, Default::default()))
                })
                .collect();
            let before: Vec<(String, Tensor)> = vs.variables().into_iter().map(|(k, v)| (k, v.copy())).collect();
            let x = Tensor::ones([1, 3], (tch::Kind::Float, tch::Device::Cpu));
            let forward = |i: usize| blocks[i].1.forward(&blocks[i].0.forward(&x));
            let calls: Vec<usize> = calls.into_iter().map(|c| c % sizes.len()).collect();
            let want: Vec<Tensor> = calls.iter().map(|&i| forward(i)).collect();
            let bytes = |n: i64| (4 * (3 * 3 * n + 3 * n + 3 * n * 3 + 3)) as u64;
            let plan = {
                let d = crate::plan::DevicePlan { device: Device::Cuda(0), budget_bytes: 1 << 30, source: crate::plan::inventory::BudgetSource::MaxMemory, resident_bytes: 0, planned_bytes: 0, weight_peak_bytes: 0, free_bytes: 1 << 30 };
                crate::plan::Plan { strategy: crate::manifest::Strategy::Balanced, overflow: crate::manifest::Overflow::Stream, components: vec![], devices: vec![d], host_offload_bytes: 0, disk_offload_bytes: 0, scratch_bytes: 0, notes: vec![] }
            };
            let res = Residency::new(ledger::Ledger::new(&plan), vec![], HashMap::new(), true);
            let mode = if group { Offload::Group } else { Offload::Sequential };
            let s = Rc::new(Stream::new("unet", mode, &vs, Device::Cuda(0), tch::Device::Cpu, res.shared_ledger()));
            hooks::set(Some(s.clone()));
            // Half the time the blocks do not announce themselves: their leaves still find them.
            let announce = calls.len() % 2 == 0;
            let got: Vec<Tensor> = calls.iter().map(|&i| if announce { hooks::scoped(&format!("down_blocks.{i}"), || forward(i)) } else { forward(i) }).collect();
            hooks::set(None);
            s.restore();
            for (g, w) in got.iter().zip(&want) {
                prop_assert!(g.equal(w));
            }
            let peak = res.ledger.borrow().report(&plan)["cuda:0"].peak_bytes;
            let largest = sizes.iter().map(|&n| bytes(n)).max().unwrap();
            if group {
                prop_assert!(peak <= 2 * largest && peak >= sizes.iter().map(|&n| bytes(n)).min().unwrap(), "peak {}, largest group {}", peak, largest);
            } else {
                let largest_leaf = sizes.iter().filter(|&&n| calls.iter().any(|&c| sizes[c] == n)).map(|&n| 4 * (3 * 3 * n + 3 * n) as u64).max().unwrap();
                prop_assert_eq!(peak, largest_leaf);
            }
            let after = vs.variables();
            for (k, v) in &before {
                prop_assert!(after[k].equal(v), "{k} holds its weights again");
            }
        }
    }
}
