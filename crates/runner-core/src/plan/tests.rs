use proptest::prelude::{prop_assert, prop_assert_eq, prop_assume, proptest};
use proptest::strategy::Strategy as PropStrategy;

use super::*;
use crate::plan::modules::Unit;

fn comp(name: &str, bytes: u64) -> ComponentInput {
    ComponentInput {
        name: name.into(),
        class: "CLIPTextModel".into(),
        dtype: Dtype::Fp16,
        bytes,
        tree: ModuleTree { units: vec![Unit { path: String::new(), bytes, class: None }], largest_leaf: bytes, groups: vec![(String::new(), bytes)], total: bytes, ..Default::default() },
        working: 0,
        working_half: 0,
        working_tiled: None,
        tree_half: None,
        pin: None,
        offload: Offload::None,
        offload_opts: Default::default(),
    }
}

/// A UNet-like component of `n` units of `unit` bytes, leaves of `unit / 4`, groups of 2 units.
fn unet(bytes_per_unit: u64, n: usize) -> ComponentInput {
    let units: Vec<Unit> = (0..n).map(|i| Unit { path: format!("blocks.{i}"), bytes: bytes_per_unit, class: Some("ResnetBlock2D") }).collect();
    let groups = (0..n.div_ceil(2)).map(|g| (format!("g{g}"), bytes_per_unit * 2)).collect();
    ComponentInput {
        name: "unet".into(),
        class: "UNet2DConditionModel".into(),
        dtype: Dtype::Fp16,
        bytes: bytes_per_unit * n as u64,
        tree: ModuleTree { units, largest_leaf: bytes_per_unit / 4, groups, total: bytes_per_unit * n as u64, ..Default::default() },
        working: 0,
        working_half: 0,
        working_tiled: None,
        tree_half: None,
        pin: None,
        offload: Offload::None,
        offload_opts: Default::default(),
    }
}

fn inv(spec: &[(Device, u64)]) -> Inventory {
    Inventory { devices: spec.iter().map(|&(device, budget)| DeviceBudget { device, budget, source: BudgetSource::DevicesFlag, total: None }).collect() }
}

fn input(components: Vec<ComponentInput>, devices: &[(Device, u64)], strategy: Strategy) -> PlanInput {
    PlanInput { components, inventory: inv(devices), strategy, overflow: Overflow::Stream, notes: vec![] }
}

fn with_overflow(mut p: PlanInput, overflow: Overflow) -> PlanInput {
    p.overflow = overflow;
    p
}

const G: u64 = 1 << 30;

/// diffusers' `_assign_components_to_devices` + the sort in `_get_final_device_map`, verbatim
/// (ties of equal sizes broken by name, as runner does; diffusers' own order is hash-random).
fn diffusers_balanced(sizes: &[(String, u64)], gpus: &[(u32, u64)]) -> BTreeMap<String, String> {
    let mut comps = sizes.to_vec();
    comps.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut mem = gpus.to_vec();
    mem.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let ids: Vec<u32> = mem.iter().map(|m| m.0).collect();
    let cycle: Vec<u32> = ids.iter().copied().chain(ids.iter().rev().copied()).collect();
    let mut left: BTreeMap<u32, u64> = mem.iter().copied().collect();
    let mut map = BTreeMap::new();
    let mut idx = 0;
    for (name, size) in comps {
        let d = cycle[idx % cycle.len()];
        if size > left[&d] {
            map.insert(name, "cpu".to_string());
        } else {
            map.insert(name, format!("cuda:{d}"));
            *left.get_mut(&d).unwrap() -= size;
            idx += 1;
        }
    }
    map
}

#[test]
fn seed_layout_sdxl_two_gpus() {
    // SDXL base fp16 (VAE fp32) over two 24 GiB GPUs: the seed's balanced example.
    let comps = vec![comp("text_encoder", 246_121_576), comp("text_encoder_2", 1_389_320_296), unet(5_134_927_368 / 100, 100), comp("vae", 334_615_452)];
    let p = plan(&input(comps, &[(Device::Cuda(0), 24 * G), (Device::Cuda(1), 24 * G), (Device::Cpu, 64 * G)], Strategy::Balanced)).unwrap();
    let m = p.device_map();
    assert_eq!(m["unet"], "cuda:0");
    assert_eq!(m["text_encoder_2"], "cuda:1");
    assert_eq!(m["vae"], "cuda:1");
    assert_eq!(m["text_encoder"], "cuda:0");
    assert_eq!(p.hf_device_map()["unet"], serde_json::json!(0));
    assert!(p.notes.is_empty());
}

#[test]
fn overflow_goes_to_another_gpu_and_is_explained() {
    // Slot 1 is cuda:0 (larger budget); the second component does not fit its slot (cuda:1)
    // but fits cuda:0's rest: diffusers would have put it on the CPU.
    let comps = vec![comp("a", 5 * G), comp("b", 3 * G)];
    let p = plan(&input(comps, &[(Device::Cuda(0), 10 * G), (Device::Cuda(1), 2 * G), (Device::Cpu, 64 * G)], Strategy::Balanced)).unwrap();
    assert_eq!(p.device_map()["a"], "cuda:0");
    assert_eq!(p.device_map()["b"], "cuda:0");
    assert!(p.notes[0].contains("did not fit its snake slot cuda:1") && p.notes[0].contains("diffusers would have put it on the CPU"), "{:?}", p.notes);
}

#[test]
fn nothing_fits_explains_options() {
    let devices = [(Device::Cuda(0), 4 * G), (Device::Cuda(1), 4 * G), (Device::Cpu, 64 * G)];
    let p = with_overflow(input(vec![comp("text_encoder", G / 4), unet(G / 10, 50)], &devices, Strategy::Balanced), Overflow::Error);
    let e = plan(&p).unwrap_err();
    assert_eq!(e.component.as_deref(), Some("unet"));
    assert!(e.message.contains("`unet` needs 5.37 GB at fp16") && e.message.contains("the largest GPU budget is `cuda:0` 4.29 GB"), "{}", e.message);
    assert!(e.message.contains("`placement.overflow = \"error\"` neither streams it through a GPU nor puts it on the CPU"), "{}", e.message);
    let opts = e.options.join("\n");
    assert!(opts.contains("components.unet.offload = \"group\""), "{opts}");
    assert!(opts.contains("components.unet.offload = \"sequential\""), "{opts}");
    assert!(opts.contains("placement.strategy = \"auto\" (splits it across devices): `unet` on cuda:0 + cuda:1"), "{opts}");
    assert!(!opts.contains("offload = \"model\""), "model offload still needs the whole UNet on one device: {opts}");
    assert!(opts.contains("placement.overflow = \"stream\": `unet` on cuda:0 with `group` offload"), "{opts}");
    assert!(opts.contains("placement.overflow = \"cpu\": `unet` on cpu"), "{opts}");
}

#[test]
fn overflow_policies() {
    // A UNet of 5 GiB-ish (units of 0.1 GiB, groups of 0.2 GiB) over two 4 GiB GPUs and the host.
    let devices = [(Device::Cuda(0), 4 * G), (Device::Cuda(1), 4 * G), (Device::Cpu, 64 * G)];
    let comps = vec![comp("text_encoder", G / 4), unet(G / 10, 50)];
    // stream: the lightest mode that fits a GPU (`model` needs the whole UNet: no; `group` yes).
    let p = plan(&input(comps.clone(), &devices, Strategy::Balanced)).unwrap();
    let u = &p.components[1];
    assert_eq!((u.device, u.offload, u.overflow), (Device::Cuda(0), Offload::Group, Some(Overflow::Stream)));
    assert!(p.notes.iter().any(|n| n.contains("`unet` (5.37 GB) fits no GPU whole: streamed through cuda:0 with `group` offload, peak 429.5 MB there")), "{:?}", p.notes);
    assert_eq!(p.devices[2].resident_bytes, u.bytes, "its weights are counted on the host");
    assert!(p.devices.iter().all(|d| d.planned_bytes <= d.budget_bytes));
    // cpu: diffusers' placement.
    let p = plan(&with_overflow(input(comps.clone(), &devices, Strategy::Balanced), Overflow::Cpu)).unwrap();
    assert_eq!((p.components[1].device, p.components[1].offload, p.components[1].overflow), (Device::Cpu, Offload::None, Some(Overflow::Cpu)));
    assert_eq!(p.device_map()["text_encoder"], "cuda:0", "the slot pointer did not advance past the UNet");
    // stream, with GPUs too small to stream through: the CPU, and the note says why.
    let tiny = [(Device::Cuda(0), G / 100), (Device::Cuda(1), G / 100), (Device::Cpu, 64 * G)];
    let p = plan(&input(comps.clone(), &tiny, Strategy::Balanced)).unwrap();
    assert_eq!(p.device_map()["unet"], "cpu");
    assert!(
        p.notes.iter().any(|n| n.contains("`unet` (5.37 GB) fits no GPU, not even streamed (`sequential` offload needs 26.84 MB on a GPU, the roomiest has 10.74 MB free): on the CPU")),
        "{:?}",
        p.notes
    );
    // The host too small for the offloaded weights: the error names both and what would do.
    let short = [(Device::Cuda(0), 4 * G), (Device::Cuda(1), 4 * G), (Device::Cpu, G)];
    let e = plan(&input(comps.clone(), &short, Strategy::Balanced)).unwrap_err();
    assert!(
        e.message.contains("`unet` needs 5.37 GB at fp16")
            && e.message.contains("nor streamed through one, and the CPU cannot take it: it needs 5.37 GB there; the host (`cpu`, budget from --devices) has 1.07 GB free of 1.07 GB"),
        "{}",
        e.message
    );
    assert!(e.message.contains("the largest GPU budget is `cuda:0` 4.29 GB"), "{}", e.message);
    assert!(e.options.iter().any(|o| o.starts_with("a host budget of 5.37GB (`placement.max_memory.cpu = \"5.37GB\"`")), "{:?}", e.options);
    // An explicit `model` offload whose weights the host cannot hold.
    let mut te = comp("text_encoder", 2 * G);
    te.offload = Offload::Model;
    let e = plan(&input(vec![te], &[(Device::Cuda(0), 4 * G), (Device::Cpu, G)], Strategy::Balanced)).unwrap_err();
    assert!(e.message.contains("its offloaded weights (2.15 GB) live in host memory, and the host (`cpu`, budget from --devices) has 1.07 GB free of 1.07 GB"), "{}", e.message);
}

#[test]
fn stream_keeps_a_heavier_mode_the_manifest_asked_for() {
    // `group` asked for, and not enough for a GPU: `stream` goes to `sequential`, never back to `model`.
    let devices = [(Device::Cuda(0), G / 4), (Device::Cpu, 64 * G)];
    let mut u = unet(G / 10, 50);
    u.offload = Offload::Group;
    let p = plan(&input(vec![u], &devices, Strategy::Auto)).unwrap();
    assert_eq!((p.components[0].device, p.components[0].offload), (Device::Cuda(0), Offload::Sequential));
    // A model without known blocks streams only with `model`.
    let mut s = comp("safety_checker", G);
    s.class = "StableDiffusionSafetyChecker".into();
    let p = plan(&input(vec![s.clone()], &[(Device::Cuda(0), 2 * G), (Device::Cuda(1), G / 2), (Device::Cpu, 64 * G)], Strategy::Sequential)).unwrap();
    assert_eq!((p.components[0].device, p.components[0].offload), (Device::Cuda(0), Offload::None));
    let p = plan(&input(vec![comp("big", 3 * G), s], &[(Device::Cuda(0), 3 * G), (Device::Cuda(1), G / 2), (Device::Cpu, 64 * G)], Strategy::Sequential)).unwrap();
    assert_eq!((p.components[1].device, p.components[1].offload), (Device::Cpu, Offload::None), "{:?}", p.notes);
}

#[test]
fn auto_splits_across_gpus_before_the_cpu() {
    // The layout: a 5.13 GB UNet, three 3 GB GPUs and a 64 GB host.
    let devices = [(Device::Cuda(0), 3_000_000_000), (Device::Cuda(1), 3_000_000_000), (Device::Cuda(2), 3_000_000_000), (Device::Cpu, 64 * G)];
    let p = plan(&input(vec![unet(5_134_927_368 / 100, 100)], &devices, Strategy::Auto)).unwrap();
    let split = p.components[0].split.as_ref().expect("split");
    assert!(split.iter().all(|(_, d)| *d != Device::Cpu), "{split:?}");
    // overflow = "cpu" in `auto`: accelerate's order, GPUs then the CPU, when the GPUs are short.
    let small = [(Device::Cuda(0), G), (Device::Cuda(1), G), (Device::Cpu, 64 * G)];
    let p = plan(&with_overflow(input(vec![unet(G / 10, 50)], &small, Strategy::Auto), Overflow::Cpu)).unwrap();
    let split = p.components[0].split.as_ref().expect("split");
    assert_eq!((split.first().unwrap().1, split.last().unwrap().1), (Device::Cuda(0), Device::Cpu));
    assert_eq!(p.components[0].overflow, Some(Overflow::Cpu));
    // ... and the default streams it through a GPU instead.
    let p = plan(&input(vec![unet(G / 10, 50)], &small, Strategy::Auto)).unwrap();
    assert_eq!((p.components[0].device, p.components[0].offload), (Device::Cuda(0), Offload::Group));
}

#[test]
fn sequential_keeps_filling_after_an_overflow() {
    // The UNet fits no GPU; the VAE after it still goes to the GPU with room.
    let devices = [(Device::Cuda(0), 2 * G), (Device::Cuda(1), 2 * G), (Device::Cpu, 64 * G)];
    let p = plan(&with_overflow(input(vec![comp("te", G), unet(G / 10, 50), comp("vae", G / 2)], &devices, Strategy::Sequential), Overflow::Cpu)).unwrap();
    let m = p.device_map();
    assert_eq!((m["te"].as_str(), m["unet"].as_str(), m["vae"].as_str()), ("cuda:0", "cpu", "cuda:0"));
}

#[test]
fn pins_are_honoured_or_errors() {
    let mut a = comp("a", G);
    a.pin = Some(Device::Cuda(1));
    let p = plan(&input(vec![a.clone(), comp("b", G)], &[(Device::Cuda(0), 4 * G), (Device::Cuda(1), 4 * G)], Strategy::Balanced)).unwrap();
    assert_eq!(p.device_map()["a"], "cuda:1");
    assert_eq!(p.components[0].reason, "pinned to cuda:1");
    a.bytes = 5 * G;
    a.tree.units[0].bytes = 5 * G;
    let e = plan(&input(vec![a.clone()], &[(Device::Cuda(0), 8 * G), (Device::Cuda(1), 4 * G)], Strategy::Balanced)).unwrap_err();
    assert!(e.message.contains("is pinned to `cuda:1`"), "{}", e.message);
    assert!(e.options.iter().any(|o| o.starts_with("remove the pin")), "{:?}", e.options);
    a.pin = Some(Device::Cuda(7));
    let e = plan(&input(vec![a], &[(Device::Cuda(0), 8 * G)], Strategy::Balanced)).unwrap_err();
    assert!(e.message.contains("pinned to `cuda:7`, which is not among the planned devices"), "{}", e.message);
}

#[test]
fn offload_modes_change_device_peaks() {
    let devices = [(Device::Cuda(0), 8 * G), (Device::Cpu, 64 * G)];
    let mut u = unet(G / 10, 50); // 5 GiB-ish, units 0.1 GiB, leaves 25 MiB, groups 0.2 GiB
    let mut te = comp("text_encoder", 2 * G);
    for (mode, unet_peak) in [(Offload::None, 50 * (G / 10)), (Offload::Model, 50 * (G / 10)), (Offload::Sequential, G / 40), (Offload::Group, 4 * (G / 10))] {
        u.offload = mode;
        te.offload = mode;
        let p = plan(&input(vec![te.clone(), u.clone()], &devices, Strategy::Balanced)).unwrap();
        let dev = &p.devices[0];
        let unet_plan = p.components.iter().find(|c| c.name == "unet").unwrap();
        assert_eq!(unet_plan.peak_bytes, unet_peak, "{mode:?}");
        match mode {
            Offload::None => assert_eq!(dev.planned_bytes, 2 * G + 50 * (G / 10)),
            // one model at a time: the larger of the two
            Offload::Model => assert_eq!(dev.planned_bytes, 50 * (G / 10)),
            Offload::Sequential => assert_eq!(dev.planned_bytes, 2 * G),
            Offload::Group => assert_eq!(dev.planned_bytes, 2 * G),
        }
        if mode != Offload::None {
            assert_eq!(p.host_offload_bytes, 2 * G + 50 * (G / 10));
            assert_eq!(p.devices[1].resident_bytes, 2 * G + 50 * (G / 10), "the host holds offloaded weights");
        }
    }
}

#[test]
fn auto_splits_in_order_and_sequential_fills_in_order() {
    let devices = [(Device::Cuda(0), 3 * G), (Device::Cuda(1), 3 * G)];
    let p = plan(&input(vec![comp("te", G), unet(G / 10, 40)], &devices, Strategy::Auto)).unwrap();
    let u = p.components.iter().find(|c| c.name == "unet").unwrap();
    let split = u.split.as_ref().expect("split");
    assert_eq!(split.first().unwrap().1, Device::Cuda(0));
    assert_eq!(split.last().unwrap().1, Device::Cuda(1));
    let sb = u.split_bytes.as_ref().unwrap();
    assert_eq!(sb["cuda:0"] + sb["cuda:1"], 40 * (G / 10));
    assert!(p.devices.iter().all(|d| d.planned_bytes <= d.budget_bytes));

    let p = plan(&input(vec![comp("a", 2 * G), comp("b", 2 * G), comp("c", G / 2)], &devices, Strategy::Sequential)).unwrap();
    let m = p.device_map();
    assert_eq!((m["a"].as_str(), m["b"].as_str(), m["c"].as_str()), ("cuda:0", "cuda:1", "cuda:1"), "never goes back to cuda:0");
}

#[test]
fn sizes_of_200k_modules_plan_fast() {
    let tensors: Vec<(String, u64)> = (0..200_000).map(|i| (format!("down_blocks.{}.resnets.{}.conv{}.weight", i / 1000, (i / 10) % 100, i % 10), 1000)).collect();
    let t = std::time::Instant::now();
    let tree = modules::build("UNet2DConditionModel", &[], &tensors);
    assert_eq!(tree.units.len(), 20_000);
    let mut c = comp("unet", tree.total);
    c.tree = tree;
    let p = plan(&input(vec![c], &[(Device::Cuda(0), 100_000_000), (Device::Cuda(1), 150_000_000)], Strategy::Auto)).unwrap();
    assert!(p.components[0].split.is_some());
    // Generous bound for a debug build on a loaded CI machine; BENCHMARKS.md has release timings.
    assert!(t.elapsed().as_secs() < 20, "{:?}", t.elapsed());
}

fn arb_case() -> impl PropStrategy<Value = (Vec<u64>, Vec<u64>, Option<u64>)> {
    (proptest::collection::vec(1u64..100, 1..6), proptest::collection::vec(1u64..200, 1..4), proptest::option::of(1u64..300))
}

/// Independent bookkeeping per device: (resident weights, largest transient need).
fn recompute(inp: &PlanInput, p: &Plan) -> BTreeMap<Device, (u64, u64)> {
    let mut out: BTreeMap<Device, (u64, u64)> = BTreeMap::new();
    for (c, cp) in inp.components.iter().zip(&p.components) {
        // `stream` may have raised the component's offload mode.
        let c = &ComponentInput { offload: cp.offload, ..c.clone() };
        match &cp.split_bytes {
            Some(sb) => {
                for (d, b) in sb {
                    let e = out.entry(d.parse().unwrap()).or_default();
                    e.0 += b;
                    e.1 = e.1.max(c.working);
                }
            }
            None => {
                let on_cpu = cp.device == Device::Cpu;
                let e = out.entry(cp.device).or_default();
                e.0 += if c.offload == Offload::None || on_cpu { c.bytes } else { 0 };
                e.1 = e.1.max(if on_cpu { c.working } else { c.transient() });
                if c.offload != Offload::None && !on_cpu && inp.inventory.get(Device::Cpu).is_some() {
                    out.entry(Device::Cpu).or_default().0 += c.bytes;
                }
            }
        }
    }
    out
}

fn recompute_peaks(inp: &PlanInput, p: &Plan) -> BTreeMap<Device, u64> {
    recompute(inp, p).into_iter().map(|(d, (r, t))| (d, r + t)).collect()
}

/// Whether `c`'s units fit the GPUs in order, each GPU taking a contiguous run of them plus the
/// component's working memory, given what each GPU already holds.
fn split_over_gpus_fits(c: &ComponentInput, gpus: &[(u64, u64, u64)]) -> bool {
    let mut units = c.tree.units.iter().map(|u| u.bytes).peekable();
    for &(budget, resident, transient) in gpus {
        let Some(room) = budget.checked_sub(resident + transient.max(c.working)) else { continue };
        let mut used = 0;
        while let Some(&u) = units.peek() {
            if used + u > room {
                break;
            }
            used += u;
            units.next();
        }
    }
    units.peek().is_none()
}

proptest! {
    /// Wherever diffusers places every component on a GPU, runner's balanced map is the same.
    #[test]
    fn balanced_equals_diffusers_without_overflow((sizes, budgets, _) in arb_case()) {
        let comps: Vec<ComponentInput> = sizes.iter().enumerate().map(|(i, &s)| comp(&format!("c{i}"), s)).collect();
        let gpus: Vec<(u32, u64)> = budgets.iter().enumerate().map(|(i, &b)| (i as u32, b)).collect();
        let reference = diffusers_balanced(&comps.iter().map(|c| (c.name.clone(), c.bytes)).collect::<Vec<_>>(), &gpus);
        prop_assume!(reference.values().all(|d| d != "cpu"));
        let devices: Vec<(Device, u64)> = gpus.iter().map(|&(i, b)| (Device::Cuda(i), b)).collect();
        let p = plan(&input(comps, &devices, Strategy::Balanced)).unwrap();
        prop_assert_eq!(p.device_map(), reference);
    }

    /// Every strategy: deterministic, never over a budget (checked by independent bookkeeping),
    /// pins respected, every component placed or a clear error.
    #[test]
    fn plans_respect_budgets_and_pins((sizes, budgets, cpu) in arb_case(), strategy in 0u8..3, pin in proptest::option::of((0usize..6, 0usize..4)), offload in 0u8..4, working in 0u64..20) {
        let strategy = [Strategy::Balanced, Strategy::Sequential, Strategy::Auto][strategy as usize];
        let mode = [Offload::None, Offload::Model, Offload::Sequential, Offload::Group][offload as usize];
        let mut comps: Vec<ComponentInput> = sizes.iter().enumerate().map(|(i, &s)| comp(&format!("c{i}"), s)).collect();
        comps.push(unet(7, 12));
        comps[0].offload = mode;
        comps[0].working = working;
        let mut devices: Vec<(Device, u64)> = budgets.iter().enumerate().map(|(i, &b)| (Device::Cuda(i as u32), b)).collect();
        if let Some(c) = cpu { devices.push((Device::Cpu, c)); }
        let mut pinned = None;
        if let Some((ci, di)) = pin {
            if ci < comps.len() && di < devices.len() {
                comps[ci].pin = Some(devices[di].0);
                pinned = Some((comps[ci].name.clone(), devices[di].0));
            }
        }
        let inp = input(comps, &devices, strategy);
        let a = plan(&inp);
        let b = plan(&inp);
        match (&a, &b) {
            (Ok(pa), Ok(pb)) => {
                prop_assert_eq!(pa.device_map(), pb.device_map());
                let peaks = recompute_peaks(&inp, pa);
                for d in &pa.devices {
                    prop_assert!(d.planned_bytes <= d.budget_bytes, "{:?} over budget", d.device);
                    prop_assert_eq!(peaks.get(&d.device).copied().unwrap_or(0), d.planned_bytes, "{:?}", d.device);
                }
                if let Some((name, dev)) = pinned {
                    prop_assert_eq!(pa.device_map()[&name].clone(), dev.to_string());
                }
                // auto never splits inside a unit and keeps execution order across devices
                for c in &pa.components {
                    if let Some(split) = &c.split {
                        let order: Vec<usize> = split.iter().map(|(_, d)| devices.iter().position(|x| x.0 == *d).unwrap()).collect();
                        prop_assert!(order.windows(2).all(|w| w[0] <= w[1]), "{:?}", split);
                    }
                }
            }
            (Err(ea), Err(eb)) => {
                prop_assert_eq!(ea, eb);
                prop_assert!(!ea.message.is_empty());
            }
            _ => prop_assert!(false, "not deterministic"),
        }
    }

    /// `overflow = "cpu"` gives diffusers' `balanced` map exactly (weights only, a host with room),
    /// overflows to the CPU included.
    #[test]
    fn balanced_with_overflow_cpu_is_diffusers_map((sizes, budgets, _) in arb_case()) {
        let comps: Vec<ComponentInput> = sizes.iter().enumerate().map(|(i, &s)| comp(&format!("c{i}"), s)).collect();
        let gpus: Vec<(u32, u64)> = budgets.iter().enumerate().map(|(i, &b)| (i as u32, b)).collect();
        let reference = diffusers_balanced(&comps.iter().map(|c| (c.name.clone(), c.bytes)).collect::<Vec<_>>(), &gpus);
        let mut devices: Vec<(Device, u64)> = gpus.iter().map(|&(i, b)| (Device::Cuda(i), b)).collect();
        devices.push((Device::Cpu, 1000));
        let p = plan(&with_overflow(input(comps, &devices, Strategy::Balanced), Overflow::Cpu)).unwrap();
        prop_assert_eq!(p.device_map(), reference);
    }

    /// `stream` (the default): no component goes to the CPU while a GPU could run it whole,
    /// streamed, or (under `auto`) split across the GPUs. Checked on the final plan: devices only
    /// fill up as planning goes on, so what fits at the end fitted when the component was placed.
    #[test]
    fn stream_sends_nothing_to_the_cpu_that_a_gpu_could_run((sizes, budgets, _) in arb_case(), strategy in 0u8..3, unit in 1u64..12, working in 0u64..10, clip in proptest::collection::vec(proptest::bool::ANY, 6)) {
        let strategy = [Strategy::Balanced, Strategy::Sequential, Strategy::Auto][strategy as usize];
        let mut comps: Vec<ComponentInput> = sizes.iter().enumerate().map(|(i, &s)| {
            let mut c = comp(&format!("c{i}"), s);
            // Some without known blocks: they can only stream with `model`.
            if !clip[i] { c.class = "StableDiffusionSafetyChecker".into(); }
            c.working = working;
            c
        }).collect();
        let mut u = unet(unit, 12);
        u.working = working;
        comps.push(u);
        let mut devices: Vec<(Device, u64)> = budgets.iter().enumerate().map(|(i, &b)| (Device::Cuda(i as u32), b)).collect();
        devices.push((Device::Cpu, 10_000));
        let inp = input(comps, &devices, strategy);
        let p = plan(&inp).unwrap();
        let used = recompute(&inp, &p);
        let gpus: Vec<(Device, u64, u64, u64)> = devices.iter().filter(|d| d.0 != Device::Cpu).map(|&(d, b)| {
            let (r, t) = used.get(&d).copied().unwrap_or_default();
            (d, b, r, t)
        }).collect();
        for (c, cp) in inp.components.iter().zip(&p.components) {
            prop_assert!(p.devices.iter().all(|d| d.planned_bytes <= d.budget_bytes));
            if cp.device != Device::Cpu || cp.split.is_some() { continue; }
            let floor = if streamable(&c.class) { memory::device_weight_bytes(Offload::Sequential, c.bytes, c.tree.largest_leaf, c.tree.largest_group()) } else { c.bytes };
            for &(d, budget, r, t) in &gpus {
                prop_assert!(r + c.bytes + t.max(c.working) > budget, "`{}` on the CPU fits {:?} whole: {:?}", c.name, d, p);
                prop_assert!(r + t.max(floor + c.working) > budget, "`{}` on the CPU could stream through {:?}: {:?}", c.name, d, p);
            }
            if strategy == Strategy::Auto && c.splittable() {
                let g: Vec<(u64, u64, u64)> = gpus.iter().map(|&(_, b, r, t)| (b, r, t)).collect();
                prop_assert!(!split_over_gpus_fits(c, &g), "`{}` on the CPU could be split over the GPUs: {:?}", c.name, p);
            }
        }
    }

    /// `auto` splits across the GPUs before it uses the CPU, whatever the overflow policy: with a
    /// UNet-like component and others, none is on the CPU (whole or in part) when a split over the
    /// GPUs fits.
    #[test]
    fn auto_uses_the_cpu_only_when_no_split_over_the_gpus_fits((sizes, budgets, _) in arb_case(), unit in 1u64..30, n in 2usize..20, working in 0u64..10, policy in 0u8..2) {
        let policy = [Overflow::Stream, Overflow::Cpu][policy as usize];
        let mut comps: Vec<ComponentInput> = sizes.iter().enumerate().map(|(i, &s)| comp(&format!("c{i}"), s)).collect();
        let mut u = unet(unit, n);
        u.working = working;
        comps.push(u);
        let mut devices: Vec<(Device, u64)> = budgets.iter().enumerate().map(|(i, &b)| (Device::Cuda(i as u32), b)).collect();
        devices.push((Device::Cpu, 10_000));
        let inp = with_overflow(input(comps, &devices, Strategy::Auto), policy);
        let p = plan(&inp).unwrap();
        let used = recompute(&inp, &p);
        let gpus: Vec<(u64, u64, u64)> = devices.iter().filter(|d| d.0 != Device::Cpu).map(|&(d, b)| {
            let (r, t) = used.get(&d).copied().unwrap_or_default();
            (b, r, t)
        }).collect();
        for (c, cp) in inp.components.iter().zip(&p.components) {
            let on_cpu = cp.device == Device::Cpu || cp.split.as_ref().is_some_and(|s| s.iter().any(|(_, d)| *d == Device::Cpu));
            if on_cpu && c.splittable() && cp.split.is_none() {
                prop_assert!(!split_over_gpus_fits(c, &gpus), "`{}` on the CPU could be split over the GPUs: {:?}", c.name, p);
            }
            if on_cpu && cp.split.is_some() {
                // a GPU+CPU split: its GPU part already took what the GPUs had; the rest must not fit them
                let gpu_bytes: u64 = cp.split_bytes.as_ref().unwrap().iter().filter(|(d, _)| d.as_str() != "cpu").map(|(_, b)| b).sum();
                prop_assert!(gpu_bytes < c.bytes);
            }
        }
    }

    /// If all components fit together on one device (no offload, no pins), auto and sequential
    /// succeed: a brute-force lower bound on completeness.
    #[test]
    fn fits_on_one_device_always_plans(sizes in proptest::collection::vec(1u64..50, 1..5), extra in 0u64..50, ndev in 1usize..4) {
        let total: u64 = sizes.iter().sum();
        let comps: Vec<ComponentInput> = sizes.iter().enumerate().map(|(i, &s)| comp(&format!("c{i}"), s)).collect();
        let devices: Vec<(Device, u64)> = (0..ndev).map(|i| (Device::Cuda(i as u32), if i == ndev - 1 { total + extra } else { extra })).collect();
        for s in [Strategy::Auto, Strategy::Sequential] {
            prop_assert!(plan(&input(comps.clone(), &devices, s)).is_ok());
        }
    }
}

#[test]
fn streaming_a_model_without_known_blocks_is_an_error_naming_the_supported_ones() {
    let mut c = comp("safety_checker", 10);
    c.class = "StableDiffusionSafetyChecker".into();
    c.offload = Offload::Group;
    let e = plan(&input(vec![c.clone()], &[(Device::Cuda(0), 100)], Strategy::Balanced)).unwrap_err().to_string();
    assert!(
        e.contains("`safety_checker` is a `StableDiffusionSafetyChecker`")
            && e.contains("offload = \"group\"")
            && e.contains("UNet2DConditionModel, CLIPTextModel, CLIPTextModelWithProjection, AutoencoderKL"),
        "{e}"
    );
    c.offload = Offload::Model;
    assert!(plan(&input(vec![c], &[(Device::Cuda(0), 100)], Strategy::Balanced)).is_ok());
}
