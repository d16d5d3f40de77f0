//! `runner plan` on real-size sparse headers: the seed's layout, explanations, bad specs.

use std::path::{Path, PathBuf};

use runner::checkpoint::safetensors::Dtype;

use crate::util::{run, runner, sparse_pipeline_variant};

/// A full-size SDXL base folder with fp16 variant files (headers + holes).
fn sdxl(dir: &Path) -> PathBuf {
    sparse_pipeline_variant("sdxl", dir, Dtype::F16, Some("fp16"))
}

fn plan(args: &[&str], sdxl: &Path) -> (i32, String, String) {
    let src = format!("pipeline.source={}", sdxl.display());
    let unet = format!("components.unet.source={}", sdxl.join("unet").display());
    run(runner().args(["plan", "manifests/sdxl.toml", "--set", &src, "--set", &unet]).args(args))
}

#[test]
fn seed_example_balanced_over_two_gpus() {
    let dir = tempfile::tempdir().unwrap();
    let root = sdxl(dir.path());
    let (code, stdout, stderr) = plan(&["--json", "--devices", "cuda:0=24GiB,cuda:1=24GiB,cpu=64GiB"], &root);
    assert_eq!(code, 0, "{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["device_map"], serde_json::json!({"unet": "cuda:0", "text_encoder_2": "cuda:1", "vae": "cuda:1", "text_encoder": "cuda:0"}));
    assert_eq!(v["hf_device_map"], serde_json::json!({"unet": 0, "text_encoder_2": 1, "vae": 1, "text_encoder": 0}));
    assert_eq!(v["components"]["unet"]["bytes"], 5_134_927_368u64);
    assert_eq!(v["components"]["vae"]["bytes"], 334_615_452u64, "the manifest keeps the VAE in fp32");
    assert_eq!(v["components"]["text_encoder_2"]["bytes"], 1_389_320_296u64);
    assert_eq!(v["devices"]["cuda:0"]["budget"], 24u64 << 30);
    let planned0 = v["devices"]["cuda:0"]["planned"].as_u64().unwrap();
    assert!(planned0 > 5_134_927_368 + 246_121_576, "working memory counted");

    // The weights-only view is diffusers' and gives the same map here.
    let (_, stdout, _) = plan(&["--json", "--weights-only", "--devices", "cuda:0=24GiB,cuda:1=24GiB,cpu=64GiB"], &root);
    let w: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(w["device_map"], v["device_map"]);
    assert_eq!(w["devices"]["cuda:0"]["planned"], 5_134_927_368u64 + 246_121_576);
}

#[test]
fn seed_example_over_two_8gb_gpus() {
    // The command: `runner plan manifests/sdxl.toml --devices cuda:0=8GB,cuda:1=8GB`.
    let dir = tempfile::tempdir().unwrap();
    let root = sdxl(dir.path());
    let (code, stdout, stderr) = plan(&["--json", "--devices", "cuda:0=8GB,cuda:1=8GB"], &root);
    assert_eq!(code, 0, "{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["device_map"], serde_json::json!({"unet": "cuda:0", "text_encoder_2": "cuda:1", "vae": "cuda:1", "text_encoder": "cuda:0"}));
    assert_eq!(v["devices"]["cuda:0"]["budget"], 8_000_000_000u64);
}

#[test]
fn seed_example_table() {
    let dir = tempfile::tempdir().unwrap();
    let root = sdxl(dir.path());
    let (code, stdout, stderr) = plan(&["--devices", "cuda:0=24GiB,cuda:1=24GiB,cpu=64GiB"], &root);
    assert_eq!(code, 0, "{stderr}");
    insta::assert_snapshot!(stdout);
}

#[test]
fn too_small_gpus_explain_what_would_work() {
    let dir = tempfile::tempdir().unwrap();
    let root = sdxl(dir.path());
    // The UNet fits no 4 GB GPU whole: by default it is streamed through one (the lightest mode
    // that fits), the fp32 VAE's 5.4 GB of activations fit no GPU even streamed: the CPU.
    let (code, stdout, stderr) = plan(&["--json", "--devices", "cuda:0=4GB,cuda:1=4GB,cpu=64GiB"], &root);
    assert_eq!(code, 0, "{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["overflow"], "stream");
    let unet = &v["components"]["unet"];
    assert_eq!((unet["device"].as_str(), unet["offload"].as_str(), unet["overflow"].as_str()), (Some("cuda:0"), Some("sequential"), Some("stream")), "{v}");
    assert_eq!(v["components"]["vae"]["device"], "cpu");
    assert_eq!(v["components"]["vae"]["overflow"], "cpu");
    let notes = v["notes"].to_string();
    assert!(notes.contains("`unet` (5.51 GB) fits no GPU whole: streamed through cuda:0 with `sequential` offload, peak 431.5 MB there, its weights in host memory"), "{notes}");
    assert!(notes.contains("`vae` (5.7 GB) fits no GPU, not even streamed (`sequential` offload needs 5.38 GB on a GPU, the roomiest has 4 GB free): on the CPU"), "{notes}");
    assert_eq!(v["devices"]["cpu"]["resident"], 5_134_927_368u64 + 334_615_452, "the host holds the streamed UNet's weights and the VAE");
    for d in v["devices"].as_object().unwrap().values() {
        assert!(d["planned"].as_u64() <= d["budget"].as_u64(), "{d}");
    }
    // diffusers' placement on request: the CPU, with the note.
    let (code, stdout, stderr) = plan(&["--json", "--devices", "cuda:0=4GB,cuda:1=4GB,cpu=64GiB", "--set", "placement.overflow=cpu"], &root);
    assert_eq!(code, 0, "{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["device_map"]["unet"], "cpu");
    assert!(v["notes"][0].as_str().unwrap().contains("`unet` (5.51 GB) fits no GPU: on the CPU, as diffusers places it"), "{v}");
    // With no room on the host for the streamed weights either: an error naming both, and the
    // host budget that would do.
    let (code, _, stderr) = plan(&["--devices", "cuda:0=4GB,cuda:1=4GB,cpu=2GB"], &root);
    assert_eq!(code, 1);
    assert!(stderr.contains("nor streamed through one, and the CPU cannot take it: it needs 5.51 GB there; the host (`cpu`, budget from placement.max_memory) has 2 GB free of 2 GB; the largest GPU budget is `cuda:0` 4 GB"), "{stderr}");
    assert!(stderr.contains("a host budget of 10.84GB (`placement.max_memory.cpu = \"10.84GB\"`, on a host with that much RAM): `unet` on cuda:0 with `sequential` offload"), "{stderr}");
    // ... which does plan.
    let (code, _, stderr) = plan(&["--devices", "cuda:0=4GB,cuda:1=4GB,cpu=10.84GB", "--set", "placement.max_memory.cpu=10.84GB"], &root);
    assert_eq!(code, 0, "{stderr}");
    // `overflow = "error"` (weights only, diffusers' view): the auto split is a way out.
    let (code, stdout, stderr) = plan(&["--weights-only", "--devices", "cuda:0=4GB,cuda:1=4GB,cpu=2GB", "--set", "placement.overflow=error"], &root);
    assert_eq!(code, 1, "{stdout}");
    assert!(stderr.contains("cannot place `manifests/sdxl.toml` within the budgets: `unet` needs"), "{stderr}");
    assert!(stderr.contains("`placement.overflow = \"error\"` neither streams it through a GPU nor puts it on the CPU"), "{stderr}");
    assert!(stderr.contains("the largest GPU budget is `cuda:0` 4 GB"), "{stderr}");
    assert!(stderr.contains("placement.strategy = \"auto\" (splits it across devices): `unet` on cuda:0 + cuda:1"), "{stderr}");
    assert!(!stderr.contains("panicked"));

    // ... and the suggested auto strategy does split it, at no-split boundaries.
    let (code, stdout, stderr) = plan(&["--json", "--weights-only", "--devices", "cuda:0=4GB,cuda:1=4GB,cpu=2GB", "--set", "placement.strategy=auto"], &root);
    assert_eq!(code, 0, "{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let split = v["components"]["unet"]["split"].as_object().unwrap();
    assert!(split.keys().all(|k| !k.contains("transformer_blocks.0.") && !k.contains("resnets.0.")), "never inside a no-split unit: {split:?}");
    assert!(split.values().any(|d| d == "cuda:1") && split.values().any(|d| d == "cuda:0"));
    for d in ["cuda:0", "cuda:1"] {
        assert!(v["devices"][d]["planned"].as_u64() <= v["devices"][d]["budget"].as_u64());
    }
}

#[test]
fn offload_and_pins_from_the_manifest() {
    let dir = tempfile::tempdir().unwrap();
    let root = sdxl(dir.path());
    let (code, stdout, stderr) =
        plan(&["--json", "--devices", "cuda:0=4GB,cuda:1=4GB,cpu=64GiB", "--set", "components.unet.offload=sequential", "--set", "components.text_encoder.device=cuda:1"], &root);
    assert_eq!(code, 0, "{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["components"]["text_encoder"]["device"], "cuda:1");
    assert_eq!(v["components"]["text_encoder"]["reason"], "pinned to cuda:1");
    // An fp32 SDXL VAE decoding 1024x1024 needs 5.4 GB of activations (measured 5.1 GB): the CPU.
    assert_eq!(v["components"]["vae"]["device"], "cpu");
    assert!(v["components"]["unet"]["peak_bytes"].as_u64().unwrap() < 1_000_000_000, "sequential offload streams leaves");
    assert_eq!(v["host_offload_bytes"], 5_134_927_368u64);

    let (code, _, stderr) = plan(&["--devices", "cuda:0=24GiB,cuda:1=24GiB,cpu=64GiB", "--set", "components.vae.device=cuda:1", "--set", "placement.max_memory.\"cuda:1\"=4GB"], &root);
    assert_eq!(code, 1);
    assert!(stderr.contains("`vae` needs 5.7 GB at fp32 (334.62 MB weights + 5.37 GB working memory) and is pinned to `cuda:1`"), "{stderr}");
    // fp16 would not help: SDXL's VAE decodes in fp32 anyway (force_upcast).
    assert!(!stderr.contains("components.vae.dtype"), "{stderr}");
}

#[test]
fn bad_device_specs_and_budgets() {
    let dir = tempfile::tempdir().unwrap();
    let root = sdxl(dir.path());
    for (spec, want) in [
        ("cuda:0=24GiB,cuda:0=1GB", "`cuda:0` is given twice"),
        ("cuda:0=lots", "size of `cuda:0`"),
        ("mps=8GB", "device `mps` is not supported"),
        ("cuda:0", "is not DEVICE=SIZE"),
        ("cuda:0=24GiB", "`placement.max_memory` lists `cuda:1`, which --devices does not have"),
    ] {
        let (code, _, stderr) = plan(&["--devices", spec], &root);
        assert_eq!(code, 1, "{spec}");
        assert!(stderr.contains(want), "{spec}: {stderr}");
    }
    // no GPU budget at all and a CPU too small
    let (code, _, stderr) = run(runner().args(["plan", "manifests/tiny-sd15.toml", "--set", "placement.max_memory.cpu=1MB"]));
    assert_eq!(code, 1);
    assert!(stderr.contains("no GPU takes part and the host has no room for it"), "{stderr}");
}

#[test]
fn tiny_manifests_plan() {
    for (m, denoiser) in [
        ("manifests/tiny-sd15.toml", "unet"),
        ("manifests/tiny-sdxl.toml", "unet"),
        ("manifests/tiny-sd3.toml", "transformer"),
        ("manifests/tiny-flux-dev.toml", "transformer"),
        ("manifests/tiny-flux-schnell.toml", "transformer"),
    ] {
        let (code, stdout, stderr) = run(runner().args(["plan", "--json", m]));
        assert_eq!(code, 0, "{m}: {stderr}");
        let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        assert!(v["device_map"][denoiser].is_string(), "{m}: {v}");
    }
}

/// A manifest over a pipeline folder at one dtype, with `placement` lines.
fn manifest(dir: &Path, name: &str, kind: &str, source: &Path, dtype: &str, placement: &str) -> PathBuf {
    let m = dir.join(format!("{name}.toml"));
    std::fs::write(&m, format!("schema_version = 1\nname = \"{name}\"\n[pipeline]\nkind = \"{kind}\"\nsource = \"{}\"\ndtype = \"{dtype}\"\n[placement]\n{placement}\n", source.display())).unwrap();
    m
}

#[test]
fn seed_sd15_on_two_1gb_gpus_with_each_overflow_policy() {
    // The seed's `max_memory={0:"1GB", 1:"1GB"}` on SD 1.5 fp16: the UNet (1.72 GB) fits neither GPU.
    let dir = tempfile::tempdir().unwrap();
    let root = crate::util::sparse_pipeline("sd15", dir.path(), Dtype::F16);
    let m = manifest(dir.path(), "seed", "stable-diffusion", &root, "fp16", "max_memory = { \"cuda:0\" = \"1GB\", \"cuda:1\" = \"1GB\" }");
    let plan = |args: &[&str]| {
        let (code, stdout, stderr) = run(runner().arg("plan").arg(&m).arg("--json").args(args));
        (code, serde_json::from_str::<serde_json::Value>(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}\n{stderr}")), stderr)
    };
    // diffusers' map, from diffusers' own function (tests/data/balanced_maps.json).
    let diffusers = serde_json::json!({"safety_checker": "cuda:0", "text_encoder": "cuda:1", "unet": "cpu", "vae": "cuda:1"});
    let (code, v, stderr) = plan(&["--weights-only", "--set", "placement.overflow=cpu"]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(v["device_map"], diffusers);
    assert_eq!(v["devices"]["cpu"]["source"], "detected", "the host takes part although max_memory lists only GPUs");
    assert!(v["notes"].to_string().contains("`unet` (1.72 GB) fits no GPU: on the CPU, as diffusers places it"), "{v}");
    // Counting working memory, the VAE goes there too: its 512x512 decode runs in fp32
    // (force_upcast) and holds 1.34 GB of activations, more than either GPU has.
    let (code, v, stderr) = plan(&["--set", "placement.overflow=cpu"]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(v["device_map"], serde_json::json!({"safety_checker": "cuda:0", "text_encoder": "cuda:1", "unet": "cpu", "vae": "cpu"}));
    // stream (the default): every component on a GPU, the UNet streamed, within every budget;
    // with working memory counted, all but the VAE.
    for (args, vae) in [(&["--weights-only"][..], "cuda:"), (&[], "cpu")] {
        let (code, v, stderr) = plan(args);
        assert_eq!(code, 0, "{stderr}");
        assert_eq!(v["overflow"], "stream");
        for (name, c) in v["components"].as_object().unwrap() {
            let want = if name == "vae" { vae } else { "cuda:" };
            assert!(c["device"].as_str().unwrap().starts_with(want), "{args:?} {name}: {c}");
        }
        let unet = &v["components"]["unet"];
        assert_eq!(unet["overflow"], "stream");
        assert!(["group", "sequential"].contains(&unet["offload"].as_str().unwrap()), "{unet}");
        for (d, u) in v["devices"].as_object().unwrap() {
            assert!(u["planned"].as_u64() <= u["budget"].as_u64(), "{d}: {u}");
        }
        let vae_bytes = if vae == "cpu" { v["components"]["vae"]["bytes"].as_u64().unwrap() } else { 0 };
        assert_eq!(v["devices"]["cpu"]["resident"].as_u64().unwrap(), unet["bytes"].as_u64().unwrap() + vae_bytes, "the host counts the streamed weights");
    }
    // error: today's strict behaviour, explained, as a JSON document too.
    let (code, v, stderr) = plan(&["--set", "placement.overflow=error"]);
    assert_eq!(code, 1);
    assert!(stderr.contains("error: cannot place") && stderr.contains("`unet` needs") && stderr.contains("neither streams it through a GPU nor puts it on the CPU"), "{stderr}");
    assert_eq!(v["error"]["kind"], "plan");
    assert!(v["error"]["message"].as_str().unwrap().contains("`unet` needs"), "{v}");
    let options = v["error"]["options"].to_string();
    assert!(options.contains("placement.overflow = \\\"stream\\\": `unet` on cuda:") && options.contains("placement.overflow = \\\"cpu\\\": `unet` on cpu"), "{options}");
    // A misspelt policy: did you mean.
    let (code, _, stderr) = run(runner().arg("plan").arg(&m).args(["--set", "placement.overflow=steam"]));
    assert_eq!(code, 1);
    assert!(stderr.contains("invalid value \"steam\" for `placement.overflow`") && stderr.contains("did you mean `stream`?"), "{stderr}");
}

#[test]
fn balanced_maps_against_diffusers_own() {
    // 880 GPU layouts (two to four GPUs of 500 MB to 8 GB) for SD 1.5 and SDXL at fp16 and fp32,
    // mapped by diffusers' own `_assign_components_to_devices` (tools/make_balanced_maps.py).
    // `overflow = "cpu"` must give diffusers' map; `stream` must keep every component within the
    // budgets, keep diffusers' map where diffusers puts everything on GPUs, and never put on the
    // CPU a component diffusers put on a GPU.
    use runner::device::Device;
    use runner::manifest::Overflow;
    use runner::plan::{build, BudgetSource, DeviceBudget, Inventory};
    let table: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(crate::util::data("balanced_maps.json")).unwrap()).unwrap();
    let cases = table["cases"].as_array().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (mut overflowing, mut diffusers_cpu, mut stream_cpu, mut streamed) = (0, 0, 0, 0);
    for (pipe, kind) in [("sd15", "stable-diffusion"), ("sdxl", "stable-diffusion-xl")] {
        let root = crate::util::sparse_pipeline(pipe, dir.path(), Dtype::F16);
        for dtype in ["fp16", "fp32"] {
            let m = manifest(dir.path(), &format!("{pipe}-{dtype}"), kind, &root, dtype, "");
            let loaded = runner::manifest::load(&m, &Default::default()).unwrap();
            let c = runner::preflight::check(&loaded).unwrap();
            let inputs: Vec<_> =
                [true, false].map(|weights_only| build::plan_input(&loaded, &c.folder, &c.configs, &c.run, Inventory::default(), &build::BuildOptions { devices: None, weights_only })).into();
            for case in cases.iter().filter(|c| c["pipeline"] == pipe && c["dtype"] == dtype) {
                let mut devices: Vec<DeviceBudget> = case["max_memory_bytes"]
                    .as_object()
                    .unwrap()
                    .iter()
                    .map(|(d, b)| DeviceBudget { device: d.parse().unwrap(), budget: b.as_u64().unwrap(), source: BudgetSource::MaxMemory, total: None })
                    .collect();
                devices.push(DeviceBudget { device: Device::Cpu, budget: 1 << 40, source: BudgetSource::MaxMemory, total: None });
                devices.sort_by_key(|d| d.device);
                let placed: std::collections::BTreeMap<String, String> = serde_json::from_value(case["placed"].clone()).unwrap();
                for (weights_only, base) in [true, false].iter().zip(&inputs) {
                    let mut input = base.clone();
                    input.inventory = Inventory { devices: devices.clone() };
                    for c in &input.components {
                        assert_eq!(case["sizes"][&c.name], c.bytes, "{pipe} {dtype} {}: runner's size is accelerate's", c.name);
                    }
                    let label = format!("{pipe} {dtype} {} weights_only={weights_only}", case["max_memory"]);
                    input.overflow = Overflow::Cpu;
                    let cpu = runner::plan::plan(&input).unwrap_or_else(|e| panic!("{label}: {e}"));
                    if *weights_only {
                        assert_eq!(cpu.device_map(), placed, "{label}: overflow = \"cpu\" is diffusers' map");
                    }
                    input.overflow = Overflow::Stream;
                    let stream = runner::plan::plan(&input).unwrap_or_else(|e| panic!("{label}: {e}"));
                    for d in &stream.devices {
                        assert!(d.planned_bytes <= d.budget_bytes, "{label}: {} over budget", d.device);
                    }
                    let map = stream.device_map();
                    if !weights_only {
                        continue;
                    }
                    if placed.values().all(|d| d != "cpu") {
                        assert_eq!(map, placed, "{label}: diffusers' map where it keeps everything on GPUs");
                        continue;
                    }
                    overflowing += 1;
                    for (name, d) in &map {
                        assert!(d != "cpu" || placed[name] == "cpu", "{label}: `{name}` on the CPU, diffusers put it on {}", placed[name]);
                    }
                    diffusers_cpu += placed.values().filter(|d| *d == "cpu").count();
                    stream_cpu += map.values().filter(|d| *d == "cpu").count();
                    streamed += stream.components.iter().filter(|c| c.overflow == Some(Overflow::Stream)).count();
                }
            }
        }
    }
    eprintln!("{overflowing} layouts where diffusers overflows: diffusers puts {diffusers_cpu} components on the CPU, `stream` {stream_cpu} ({streamed} streamed through a GPU)");
    assert!(overflowing > 400 && stream_cpu < diffusers_cpu / 4, "{overflowing} {diffusers_cpu} {stream_cpu}");
}

#[test]
fn json_failures_are_json_documents() {
    // Machines reading `plan --json` never get empty output: every failure is also a JSON document.
    let dir = tempfile::tempdir().unwrap();
    let doc = |args: &[&str]| {
        let (code, stdout, stderr) = run(runner().arg("plan").arg("--json").args(args));
        assert_eq!(code, 1, "{args:?}: {stdout}");
        assert!(stderr.contains("error"), "people still get the message: {stderr}");
        let v: serde_json::Value = serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{args:?}: {e}: {stdout:?}"));
        assert!(v["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
        assert!(v["error"]["options"].is_array(), "{v}");
        v["error"].clone()
    };
    let e = doc(&["tests/data/bad/enums.toml"]);
    assert_eq!(e["kind"], "manifest");
    assert!(e["diagnostics"].as_array().unwrap().iter().any(|d| d["key"] == "placement.overflow" && d["line"] == 16), "{e}");
    assert_eq!(doc(&["manifests/tiny-sd15.toml", "--devices", "cuda:0=lots"])["kind"], "devices");
    assert_eq!(doc(&["manifests/tiny-sd15.toml", "--set", "placement.max_memory.cpu=1MB"])["kind"], "plan");
    let missing = manifest(dir.path(), "missing", "stable-diffusion", &dir.path().join("nowhere"), "fp16", "");
    let e = doc(&[missing.to_str().unwrap()]);
    assert_eq!(e["kind"], "pipeline", "{e}");
    assert!(e["diagnostics"][0]["message"].as_str().unwrap().contains("nowhere"), "{e}");
    let unlocked = manifest(dir.path(), "unlocked", "stable-diffusion", &crate::util::root().join("tests/fixtures/tiny-sd15"), "fp32", "");
    assert_eq!(doc(&[unlocked.to_str().unwrap(), "--locked"])["kind"], "lock");
}

// ---- SD3-medium and SD3.5-large at full size (tests/data/shapes/sd3-medium.json, sd35-large.json) ----

/// The shapes file of a reference pipeline (tools/make_shapes.py), with accelerate's counts.
fn shapes(name: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(crate::util::data(&format!("shapes/{name}.json"))).unwrap()).unwrap()
}

/// `runner plan MANIFEST --json` over the pipeline folder `root`, with `args`.
fn plan_json(manifest: &str, root: &Path, args: &[&str]) -> serde_json::Value {
    let (code, stdout, stderr) = run(runner().args(["plan", manifest, "--json", "--set", &format!("pipeline.source={}", root.display())]).args(args));
    assert_eq!(code, 0, "{stderr}");
    serde_json::from_str(&stdout).unwrap()
}

fn plan_table(manifest: &str, root: &Path, args: &[&str]) -> String {
    let (code, stdout, stderr) = run(runner().args(["plan", manifest, "--set", &format!("pipeline.source={}", root.display())]).args(args));
    assert_eq!(code, 0, "{stderr}");
    stdout
}

fn within_budgets(v: &serde_json::Value) {
    for (d, u) in v["devices"].as_object().unwrap() {
        assert!(u["planned"].as_u64() <= u["budget"].as_u64(), "{d} over budget: {u}");
    }
}

#[test]
fn sd3_medium_fp16_on_one_24gib_gpu() {
    let dir = tempfile::tempdir().unwrap();
    let root = crate::util::sparse_pipeline("sd3-medium", dir.path(), Dtype::F16);
    // The folder as the repo ships it: T5 in two shards with an index; of the tokenizers only T5's
    // tokenizer.json, whose presence preflight checks (planning reads none).
    let t5 = root.join("text_encoder_3");
    for f in ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json"] {
        assert!(t5.join(f).is_file(), "{f}");
    }
    assert!(!t5.join("model.safetensors").exists());
    assert_eq!(std::fs::read_dir(root.join("tokenizer_2")).unwrap().count(), 0);

    insta::assert_snapshot!(plan_table("manifests/sd3.toml", &root, &[]));
    let v = plan_json("manifests/sd3.toml", &root, &[]);
    assert!(v["device_map"].as_object().unwrap().values().all(|d| d == "cuda:0"), "{v}");
    assert!(v["notes"].as_array().unwrap().is_empty(), "{v}");
    within_budgets(&v);

    // Weight bytes are accelerate's counts of the models transformers and diffusers build at fp16.
    let s = shapes("sd3-medium");
    let acc = |c: &str, key: &str| s["components"][c][key].as_u64().unwrap();
    let bytes = |c: &str| v["components"][c]["bytes"].as_u64().unwrap();
    assert_eq!(bytes("transformer"), acc("transformer", "accelerate_module_size_16bit"));
    assert_eq!(bytes("transformer"), 4_169_902_208);
    assert_eq!(bytes("vae"), acc("vae", "accelerate_module_size_16bit"));
    // transformers keeps T5's `wo` in fp32 in an fp16 model: accelerate's count with
    // `special_dtypes` for them, the tied embedding once.
    assert_eq!(bytes("text_encoder_3"), acc("text_encoder_3", "accelerate_module_size_fp16_keep_in_fp32"));
    assert_eq!(bytes("text_encoder_3"), 11_537_887_232);
    // accelerate also counts CLIP's int64 `position_ids` buffer (616 bytes), which SD3's checkpoints
    // (saved by transformers >= 4.31) do not hold.
    for c in ["text_encoder", "text_encoder_2"] {
        assert_eq!(bytes(c) + 77 * 8, acc(c, "accelerate_module_size_16bit"), "{c}");
    }
    // SD3 never upcasts its VAE, whatever its config's force_upcast (true here): fp16 activations.
    assert_eq!(s["components"]["vae"]["config"]["force_upcast"], true);
    assert_eq!(v["components"]["vae"]["working_bytes"], 10 * 1024 * 1024 * 128 * 2u64);

    // bf16 keeps nothing in fp32: T5 is its stored 16-bit size.
    let v = plan_json("manifests/sd3.toml", &root, &["--set", "pipeline.dtype=bf16"]);
    assert_eq!(v["components"]["text_encoder_3"]["bytes"], acc("text_encoder_3", "accelerate_module_size_16bit"));
    assert_eq!(v["components"]["text_encoder_3"]["bytes"], 9_524_621_312u64);
}

#[test]
fn sd3_medium_fp32_suggests_fp16_with_t5_wo_in_fp32() {
    // An fp32 T5-XXL (19.05 GB) fits neither of two 15 GB GPUs: the fp16 suggestion weighs its
    // `wo` at fp32 (11.54 GB), not half of its fp32 size (9.52 GB).
    let dir = tempfile::tempdir().unwrap();
    let root = crate::util::sparse_pipeline("sd3-medium", dir.path(), Dtype::F16);
    let src = format!("pipeline.source={}", root.display());
    let (code, _, stderr) = run(runner().args(["plan", "manifests/sd3.toml", "--weights-only", "--set", &src]).args([
        "--set",
        "pipeline.dtype=fp32",
        "--set",
        "placement.overflow=error",
        "--set",
        "placement.max_memory.\"cuda:0\"=15GB",
        "--set",
        "placement.max_memory.\"cuda:1\"=15GB",
    ]));
    assert_eq!(code, 1);
    assert!(stderr.contains("`text_encoder_3` needs 19.05 GB at fp32"), "{stderr}");
    assert!(stderr.contains("components.text_encoder_3.dtype = \"fp16\": `text_encoder_3` on cuda:0, peak 11.54 GB there"), "{stderr}");
    let v = plan_json("manifests/sd3.toml", &root, &["--set", "pipeline.dtype=fp32", "--set", "components.text_encoder_3.dtype=fp16"]);
    assert_eq!(v["components"]["text_encoder_3"]["bytes"], 11_537_887_232u64);
    assert_eq!(v["components"]["text_encoder_3"]["peak_bytes"], 11_537_887_232u64 + v["components"]["text_encoder_3"]["working_bytes"].as_u64().unwrap());
}

#[test]
fn sd35_large_on_two_16gib_gpus() {
    // SD3.5-large in bf16 on two 16 GiB cards, 15 GiB of each planned (manifests/sd35-large.toml):
    // the 16.29 GB transformer fits neither GPU. diffusers' `balanced` would load it on the CPU;
    // runner splits it at its JointTransformerBlocks across both (auto, the manifest's) or streams
    // it through a GPU (balanced, overflow = "stream").
    let dir = tempfile::tempdir().unwrap();
    let root = crate::util::sparse_pipeline("sd35-large", dir.path(), Dtype::BF16);
    let tr = root.join("transformer");
    for f in ["diffusion_pytorch_model-00001-of-00002.safetensors", "diffusion_pytorch_model-00002-of-00002.safetensors", "diffusion_pytorch_model.safetensors.index.json"] {
        assert!(tr.join(f).is_file(), "{f}");
    }
    let s = shapes("sd35-large");
    assert_eq!(s["components"]["transformer"]["accelerate_module_size_16bit"], 16_292_561_536u64);

    insta::assert_snapshot!("auto_splits_the_transformer", plan_table("manifests/sd35-large.toml", &root, &[]));
    let v = plan_json("manifests/sd35-large.toml", &root, &[]);
    within_budgets(&v);
    assert!(v["device_map"].as_object().unwrap().values().all(|d| d.as_str().unwrap().starts_with("cuda:")), "{v}");
    assert_eq!(v["host_offload_bytes"], 0);
    let t = &v["components"]["transformer"];
    assert_eq!(t["bytes"], 16_292_561_536u64);
    assert_eq!(t["offload"], "none");
    let split = t["split"].as_object().unwrap();
    let on = |d: &str| split.values().filter(|x| *x == d).count();
    assert!(on("cuda:0") > 0 && on("cuda:1") > 0, "{split:?}");
    // Never inside a JointTransformerBlock: blocks whole, in order, one device switch.
    for k in split.keys() {
        let segs: Vec<&str> = k.split('.').collect();
        assert!(segs.len() <= 2 && (segs[0] != "transformer_blocks" || segs.len() == 2), "{k}");
    }
    let devices: Vec<&str> = split.values().map(|d| d.as_str().unwrap()).collect();
    assert_eq!(devices.windows(2).filter(|w| w[0] != w[1]).count(), 1, "{devices:?}");
    let per_device = t["split_bytes"].as_object().unwrap();
    assert_eq!(per_device.values().map(|b| b.as_u64().unwrap()).sum::<u64>(), 16_292_561_536);
    assert!(v["notes"].to_string().contains("its weights alone (16.29 GB) exceed every GPU's budget, so diffusers' `balanced` map would load it on the CPU"), "{v}");

    insta::assert_snapshot!("balanced_streams_the_transformer", plan_table("manifests/sd35-large.toml", &root, &["--set", "placement.strategy=balanced"]));
    let v = plan_json("manifests/sd35-large.toml", &root, &["--set", "placement.strategy=balanced"]);
    within_budgets(&v);
    let t = &v["components"]["transformer"];
    assert_eq!((t["device"].as_str(), t["offload"].as_str(), t["overflow"].as_str()), (Some("cuda:0"), Some("group"), Some("stream")), "{t}");
    // Group offload holds two joint blocks (the largest, 426 MB each) and the working memory.
    let block = s["components"]["transformer"]["largest_no_split_unit_16bit"][1].as_u64().unwrap();
    assert_eq!(t["streamed_bytes"], 2 * block);
    assert_eq!(t["peak_bytes"].as_u64().unwrap(), 2 * block + t["working_bytes"].as_u64().unwrap());
    assert!(v["device_map"].as_object().unwrap().values().all(|d| d.as_str().unwrap().starts_with("cuda:")), "{v}");
    assert_eq!(v["host_offload_bytes"], 16_292_561_536u64);
    assert!(v["notes"].to_string().contains("`transformer` (16.91 GB) fits no GPU whole: streamed through cuda:0 with `group` offload"), "{v}");

    // diffusers' own placement on request: the CPU.
    let v = plan_json("manifests/sd35-large.toml", &root, &["--weights-only", "--set", "placement.strategy=balanced", "--set", "placement.overflow=cpu"]);
    assert_eq!(v["device_map"]["transformer"], "cpu");

    // With the cards' whole 16 GiB as budgets, the transformer would fit one of them with next to
    // nothing left for the CUDA context: why the manifest plans 15 GiB of each.
    let v = plan_json("manifests/sd35-large.toml", &root, &["--set", "placement.max_memory.\"cuda:0\"=16GiB", "--set", "placement.max_memory.\"cuda:1\"=16GiB"]);
    let t = &v["components"]["transformer"];
    assert!(t["split"].is_null() && t["offload"] == "none", "{t}");
    let d = t["device"].as_str().unwrap();
    assert!(v["devices"][d]["free"].as_u64().unwrap() < 300_000_000, "{v}");
}

#[test]
fn sd35_large_plans_in_milliseconds() {
    // The plan itself (sizes, trees, working memory, placement) from the opened folder: no weight
    // is read. Timed and logged, not asserted tightly (shared CI machines).
    let dir = tempfile::tempdir().unwrap();
    let root = crate::util::sparse_pipeline("sd35-large", dir.path(), Dtype::BF16);
    let opts = runner::manifest::Overrides { env: vec![], sets: vec![format!("pipeline.source={}", root.display())], ..Default::default() };
    let loaded = runner::manifest::load(&crate::util::root().join("manifests/sd35-large.toml"), &opts).unwrap();
    let (c, inventory) = preflight_and_plan_timed("sd35-large", &loaded, 5);

    // The module trees: accelerate's no-split units (counted at 16 bits by tools/make_shapes.py).
    let input = runner::plan::build::plan_input(&loaded, &c.folder, &c.configs, &c.run, inventory, &Default::default());
    let s = shapes("sd35-large");
    for (name, class, n) in [("transformer", "JointTransformerBlock", 38), ("text_encoder_3", "T5Block", 24)] {
        let c = input.components.iter().find(|c| c.name == name).unwrap();
        assert_eq!(c.tree.units.iter().filter(|u| u.class == Some(class)).count(), n, "{name}");
        assert_eq!(s["components"][name]["no_split_units"], n);
        let (path, bytes) = (&s["components"][name]["largest_no_split_unit_16bit"][0], &s["components"][name]["largest_no_split_unit_16bit"][1]);
        assert_eq!(c.tree.largest_unit(), bytes.as_u64().unwrap(), "{name}: {path}");
        assert!(c.splittable() && runner::plan::streamable(&c.class));
        assert_eq!(c.tree.largest_group(), c.tree.largest_unit(), "{name}: one block per offload group");
    }
}

// ---- FLUX.1 at full size (tests/data/shapes/flux-dev.json) ----

/// A full-size FLUX.1-schnell folder: FLUX.1-dev's without the guidance embedder, as the repo
/// ships it (its first transformer shard is 9,962,580,296 bytes, not 9,983,040,304).
fn flux_schnell(dir: &Path) -> PathBuf {
    let root = crate::util::sparse_pipeline("flux-dev", dir, Dtype::BF16);
    let schnell = dir.join("flux-schnell");
    std::fs::rename(&root, &schnell).unwrap();
    let tr = schnell.join("transformer");
    let cfg = tr.join("config.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    v["guidance_embeds"] = false.into();
    std::fs::write(&cfg, serde_json::to_string_pretty(&v).unwrap()).unwrap();
    // Rewrite the shards without `time_text_embed.guidance_embedder.*`.
    let index_path = tr.join("diffusion_pytorch_model.safetensors.index.json");
    let mut index: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&index_path).unwrap()).unwrap();
    let map = index["weight_map"].as_object_mut().unwrap();
    let dropped: Vec<String> = map.keys().filter(|k| k.starts_with("time_text_embed.guidance_embedder.")).cloned().collect();
    assert_eq!(dropped.len(), 4);
    let files: std::collections::BTreeSet<String> = dropped.iter().map(|k| map[k].as_str().unwrap().to_string()).collect();
    for k in &dropped {
        map.remove(k);
    }
    let mut total = 0;
    for f in std::fs::read_dir(&tr).unwrap().map(|e| e.unwrap().path()).filter(|p| p.extension().is_some_and(|e| e == "safetensors")) {
        let h = runner::checkpoint::safetensors::read_header(&f).unwrap();
        let name = f.file_name().unwrap().to_str().unwrap().to_string();
        let mut off = 0;
        let infos: Vec<_> = h
            .tensors
            .iter()
            .filter(|t| !t.name.starts_with("time_text_embed.guidance_embedder."))
            .map(|t| {
                let n = t.data_offsets.1 - t.data_offsets.0;
                let info = runner::checkpoint::safetensors::TensorInfo { data_offsets: (off, off + n), ..t.clone() };
                off += n;
                info
            })
            .collect();
        total += off;
        if files.contains(&name) {
            let header = runner::checkpoint::safetensors::encode_header(&infos, &Default::default());
            let file = std::fs::File::create(&f).unwrap();
            use std::io::Write;
            (&file).write_all(&header).unwrap();
            file.set_len(header.len() as u64 + off).unwrap();
        }
    }
    index["metadata"]["total_size"] = total.into();
    std::fs::write(&index_path, serde_json::to_string_pretty(&index).unwrap()).unwrap();
    schnell
}

#[test]
fn flux_dev_splits_the_transformer_over_two_16gib_gpus() {
    // FLUX.1-dev in bf16 on two 16 GiB cards, 15 GiB of each planned (manifests/flux-dev.toml):
    // 33.7 GB of weights over 32.2 GB of budgets. T5 is streamed (group offload), the 23.8 GB
    // transformer split at its blocks over both GPUs.
    let dir = tempfile::tempdir().unwrap();
    let root = crate::util::sparse_pipeline("flux-dev", dir.path(), Dtype::BF16);
    let tr = root.join("transformer");
    for i in 1..=3 {
        assert!(tr.join(format!("diffusion_pytorch_model-0000{i}-of-00003.safetensors")).is_file());
    }
    assert!(root.join("text_encoder_2/model.safetensors.index.json").is_file());
    assert!(root.join("tokenizer_2/tokenizer.json").is_file());
    let s = shapes("flux-dev");
    assert_eq!(s["components"]["transformer"]["accelerate_module_size_16bit"], 23_802_816_640u64);

    insta::assert_snapshot!("flux_dev_auto_splits_the_transformer", plan_table("manifests/flux-dev.toml", &root, &[]));
    let v = plan_json("manifests/flux-dev.toml", &root, &[]);
    within_budgets(&v);
    assert!(v["device_map"].as_object().unwrap().values().all(|d| d.as_str().unwrap().starts_with("cuda:")), "{v}");
    // Weight bytes are accelerate's counts of the models diffusers and transformers build at bf16.
    let acc = |c: &str| s["components"][c]["accelerate_module_size_16bit"].as_u64().unwrap();
    let bytes = |c: &str| v["components"][c]["bytes"].as_u64().unwrap();
    for c in ["transformer", "text_encoder_2", "vae"] {
        assert_eq!(bytes(c), acc(c), "{c}");
    }
    assert_eq!(bytes("text_encoder") + 77 * 8, acc("text_encoder"), "accelerate also counts CLIP's position_ids buffer");
    assert_eq!(bytes("text_encoder_2"), 9_524_621_312);
    assert_eq!(v["components"]["text_encoder_2"]["class"], "T5EncoderModel");
    // T5 streamed: two T5Blocks on the GPU, its weights in host memory.
    let t5 = &v["components"]["text_encoder_2"];
    assert_eq!(t5["offload"], "group");
    assert_eq!(t5["streamed_bytes"], 2 * s["components"]["text_encoder_2"]["largest_no_split_unit_16bit"][1].as_u64().unwrap());
    assert_eq!(v["host_offload_bytes"], 9_524_621_312u64);
    // The transformer: split over both GPUs, never inside a block, one device switch.
    let t = &v["components"]["transformer"];
    assert_eq!(t["offload"], "none");
    let split = t["split"].as_object().unwrap();
    for k in split.keys() {
        let segs: Vec<&str> = k.split('.').collect();
        assert!(!matches!(segs[0], "transformer_blocks" | "single_transformer_blocks") || segs.len() <= 2, "{k}");
    }
    let devices: Vec<&str> = split.values().map(|d| d.as_str().unwrap()).collect();
    assert_eq!(devices.first(), Some(&"cuda:0"));
    assert_eq!(devices.last(), Some(&"cuda:1"));
    assert_eq!(devices.windows(2).filter(|w| w[0] != w[1]).count(), 1, "{devices:?}");
    let per_device = t["split_bytes"].as_object().unwrap();
    assert_eq!(per_device.values().map(|b| b.as_u64().unwrap()).sum::<u64>(), 23_802_816_640);
    assert!(v["notes"].to_string().contains("exceed every GPU's budget, so diffusers' `balanced` map would load it on the CPU"), "{v}");
    // The working memory: 4096 image + 512 text tokens in bf16, batch 1.
    let w = t["working_bytes"].as_u64().unwrap();
    assert!((500_000_000..700_000_000).contains(&w), "{w}");

    // Without T5's offload it does not fit: T5 takes cuda:0 whole and the transformer is streamed.
    let v = plan_json("manifests/flux-dev.toml", &root, &["--set", "components.text_encoder_2.offload=none"]);
    assert!(v["components"]["transformer"]["split"].is_null(), "{v}");
    // True CFG is a second pass of batch 1: the transformer's working memory is unchanged.
    let cfg = plan_json("manifests/flux-dev.toml", &root, &["--set", "run.true_cfg_scale=4", "--set", "run.negative_prompt=blurry"]);
    assert_eq!(cfg["components"]["transformer"]["working_bytes"], w);
}

#[test]
fn flux_schnell_streams_the_transformer_within_12gib() {
    let dir = tempfile::tempdir().unwrap();
    let root = flux_schnell(dir.path());
    insta::assert_snapshot!("flux_schnell_12gb_group_offload", plan_table("manifests/flux-schnell-12gb.toml", &root, &[]));
    let v = plan_json("manifests/flux-schnell-12gb.toml", &root, &[]);
    within_budgets(&v);
    assert!(v["devices"]["cuda:0"]["planned"].as_u64().unwrap() <= 11 << 30);
    let s = shapes("flux-dev");
    let t = &v["components"]["transformer"];
    assert_eq!((t["device"].as_str(), t["offload"].as_str()), (Some("cuda:0"), Some("group")), "{t}");
    // schnell has no guidance embedder: 4 tensors fewer than dev.
    let guidance_embedder = 2 * (256 * 3072 + 3072 + 3072 * 3072 + 3072);
    assert_eq!(t["bytes"].as_u64().unwrap(), 23_802_816_640 - guidance_embedder);
    // Group offload: two of the largest blocks (a FluxTransformerBlock) and the working memory.
    let block = s["components"]["transformer"]["largest_no_split_unit_16bit"][1].as_u64().unwrap();
    assert_eq!(t["streamed_bytes"], 2 * block);
    assert_eq!(t["peak_bytes"].as_u64().unwrap(), 2 * block + t["working_bytes"].as_u64().unwrap());
    for c in ["text_encoder", "text_encoder_2", "vae"] {
        assert_eq!(v["components"][c]["offload"], "model", "{c}");
        assert_eq!(v["components"][c]["device"], "cuda:0", "{c}");
    }
    assert_eq!(v["host_offload_bytes"].as_u64().unwrap(), ["text_encoder", "text_encoder_2", "transformer", "vae"].iter().map(|c| v["components"][c]["bytes"].as_u64().unwrap()).sum::<u64>());
    // A guidance_scale on schnell is a warning, not an error.
    let (code, _, stderr) = run(runner().args(["plan", "manifests/flux-schnell-12gb.toml", "--set", &format!("pipeline.source={}", root.display()), "--set", "run.guidance_scale=3.5"]));
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("warning: `run.guidance_scale` is 3.5, but this FLUX transformer has no guidance embedding"), "{stderr}");
}

#[test]
fn flux_dev_plans_in_milliseconds() {
    // Timed and logged, not asserted tightly (shared CI machines): 1160 transformer tensors in 3
    // shards, T5 in 2.
    let dir = tempfile::tempdir().unwrap();
    let root = crate::util::sparse_pipeline("flux-dev", dir.path(), Dtype::BF16);
    let opts = runner::manifest::Overrides { env: vec![], sets: vec![format!("pipeline.source={}", root.display())], ..Default::default() };
    let loaded = runner::manifest::load(&crate::util::root().join("manifests/flux-dev.toml"), &opts).unwrap();
    let (c, inventory) = preflight_and_plan_timed("flux-dev", &loaded, 4);
    let configs = &c.configs;
    assert!(configs.text_encoder_2.is_none() && configs.t5.is_some() && configs.flux_transformer.is_some() && configs.transformer.is_none());

    // The module trees: accelerate's no-split units (counted at 16 bits by tools/make_shapes.py).
    let input = runner::plan::build::plan_input(&loaded, &c.folder, &c.configs, &c.run, inventory, &Default::default());
    let s = shapes("flux-dev");
    let tr = input.components.iter().find(|c| c.name == "transformer").unwrap();
    assert_eq!(tr.tree.units.iter().filter(|u| u.class == Some("FluxTransformerBlock")).count(), 19);
    assert_eq!(tr.tree.units.iter().filter(|u| u.class == Some("FluxSingleTransformerBlock")).count(), 38);
    assert_eq!(s["components"]["transformer"]["no_split_units"], 19 + 38);
    let t5 = input.components.iter().find(|c| c.name == "text_encoder_2").unwrap();
    assert_eq!(t5.tree.units.iter().filter(|u| u.class == Some("T5Block")).count(), 24);
    for (c, name) in [(tr, "transformer"), (t5, "text_encoder_2")] {
        assert_eq!(c.tree.largest_unit(), s["components"][name]["largest_no_split_unit_16bit"][1].as_u64().unwrap(), "{name}");
        assert!(c.splittable() && runner::plan::streamable(&c.class));
        assert_eq!(c.tree.largest_group(), c.tree.largest_unit(), "{name}: one block per offload group");
    }
}

// ---- The memory-floor table (BENCHMARKS.md "Memory floors") ----

/// The smallest single GPU (bytes, to 1/128 of the answer) each offload mode fits at 1024x1024,
/// with and without fp8 layerwise storage of the denoiser and VAE tiling, planned as `runner plan`
/// plans the full-size sparse folders: SDXL (fp16), SD3.5-large and FLUX.1-dev (bf16). The
/// snapshot is BENCHMARKS.md's table. The bisection calls the planner in-process with one plan
/// input per cell: a `runner plan` process per probe (about 900 of them) took minutes.
///   cargo test --test main memory_floor_table
#[test]
fn memory_floor_table() {
    let dir = tempfile::tempdir().unwrap();
    let mut table = String::from("| pipeline | offload | plain | fp8 storage | VAE tiling | fp8 + tiling |\n|---|---|---|---|---|---|\n");
    for (pipe, kind, dtype, float, denoiser) in [
        ("sdxl", "stable-diffusion-xl", "fp16", Dtype::F16, "unet"),
        ("sd35-large", "stable-diffusion-3", "bf16", Dtype::BF16, "transformer"),
        ("flux-dev", "flux", "bf16", Dtype::BF16, "transformer"),
    ] {
        let root = crate::util::sparse_pipeline(pipe, dir.path(), float);
        let placement = "strategy = \"sequential\"\noverflow = \"error\"\n[run]\nprompt = \"a cat\"\nwidth = 1024\nheight = 1024";
        let m = manifest(dir.path(), pipe, kind, &root, dtype, placement);
        for mode in ["none", "model", "group", "sequential"] {
            let mut row = format!("| {pipe} {dtype} | {mode} |");
            for (fp8, tiling) in [(false, false), (true, false), (false, true), (true, true)] {
                let mut sets = vec![format!("placement.offload={mode}")];
                if fp8 {
                    sets.push(format!("components.{denoiser}.storage_dtype=fp8-e4m3"));
                }
                if tiling {
                    sets.push("components.vae.tiling=true".into());
                }
                row.push_str(&floor_cell(&m, sets));
            }
            table.push_str(&row);
            table.push('\n');
        }
    }
    insta::assert_snapshot!(table);
}

/// The smallest single GPU `m` (with `sets`) fits, to 1/128 of it, as a table cell.
fn floor_cell(m: &Path, sets: Vec<String>) -> String {
    use runner::device::Device;
    use runner::plan::inventory::Inventory;
    let loaded = runner::manifest::load(m, &runner::manifest::Overrides { env: vec![], sets, ..Default::default() }).unwrap();
    let c = runner::preflight::check(&loaded).unwrap();
    let input = runner::plan::build::plan_input(&loaded, &c.folder, &c.configs, &c.run, Inventory::default(), &Default::default());
    // `runner plan --devices cuda:0=B,cpu=4TiB --set placement.max_memory={...the same}`:
    // a fit is everything on the GPU (`overflow = "error"` fails the plan otherwise).
    let fits = |bytes: u64| {
        let hardware = Inventory::parse_spec(&format!("cuda:0={bytes},cpu=4TiB")).unwrap();
        let max_memory = std::collections::BTreeMap::from([(Device::Cuda(0), bytes), (Device::Cpu, 4u64 << 40)]);
        let inventory = Inventory::from_max_memory(&max_memory, Some(&hardware)).unwrap();
        runner::plan::plan(&runner::plan::PlanInput { inventory, ..input.clone() }).is_ok_and(|p| p.device_map().values().all(|d| d == "cuda:0"))
    };
    let (mut lo, mut hi) = (1u64 << 24, 1u64 << 37);
    if !fits(hi) {
        return " - |".into();
    }
    while hi - lo > hi / 128 {
        let mid = lo + (hi - lo) / 2;
        if fits(mid) {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    format!(" {:.2} GB |", hi as f64 / 1e9)
}

/// A sparse .gguf of a real-size transformer (header and tensor infos of the real layout, no
/// data) at `want` with city96's rules (`runner quantize`'s), in diffusers' names.
fn sparse_gguf(transformer: &Path, out: &Path, want: runner::checkpoint::gguf::GgmlType) {
    use runner::checkpoint::gguf::{encode_header, WriteTensor, WriteValue};
    use runner::checkpoint::layout::{gguf_family, resolve_folder, Checkpoint, Library, VariantPolicy};
    let ck = Checkpoint::open(resolve_folder(transformer, Some(Library::Diffusers), None, VariantPolicy::Require).unwrap()).unwrap();
    let class = serde_json::from_str::<serde_json::Value>(&std::fs::read_to_string(transformer.join("config.json")).unwrap()).unwrap()["_class_name"].as_str().unwrap().to_string();
    let family = gguf_family(&class).unwrap();
    let infos: Vec<(String, Vec<u64>, runner::checkpoint::gguf::GgmlType)> =
        ck.tensors.iter().map(|(k, t)| (k.clone(), t.info.shape.clone(), runner::checkpoint::quantize::target(family, k, &t.info.shape, t.info.dtype, want))).collect();
    let tensors: Vec<WriteTensor> = infos.iter().map(|(name, shape, t)| WriteTensor { name, shape, ggml_type: *t, n_bytes: shape.iter().product::<u64>() / t.block_size() * t.type_size() }).collect();
    let (header, offsets) = encode_header(&[("general.architecture", WriteValue::Str(family.as_str().into()))], &tensors, 32).unwrap();
    let end = offsets.iter().zip(&tensors).map(|(o, t)| o + t.n_bytes).max().unwrap();
    let f = std::fs::File::create(out).unwrap();
    use std::io::Write;
    (&f).write_all(&header).unwrap();
    f.set_len(header.len() as u64 + end).unwrap();
}

/// BENCHMARKS.md "Memory floors", GGUF columns: the floors of FLUX.1-dev and SD3.5-large with the
/// transformer from a sparse .gguf at Q8_0, Q4_0 and Q4_K (K-quants only where rows are whole
/// 256-element blocks: SD3.5-large's 2432-wide rows keep bf16, as city96's rules do), snapshotted.
///   cargo test --test main memory_floor_gguf
#[test]
fn memory_floor_gguf() {
    use runner::checkpoint::gguf::GgmlType;
    let dir = tempfile::tempdir().unwrap();
    let mut table = String::from("| pipeline | offload | bf16 | Q8_0 | Q4_0 | Q4_K | Q8_0 GB | Q4_0 GB | Q4_K GB |\n|---|---|---|---|---|---|---|---|---|\n");
    for (pipe, kind, dtype, float, _) in FLOOR_PIPELINES.into_iter().filter(|p| p.4 == "transformer") {
        let m = floor_manifest(dir.path(), pipe, kind, dtype, float);
        let types = ["Q8_0", "Q4_0", "Q4_K"];
        let files: Vec<PathBuf> = types
            .iter()
            .map(|t| {
                let out = dir.path().join(format!("{pipe}-{t}.gguf"));
                sparse_gguf(&dir.path().join(pipe).join("transformer"), &out, GgmlType::from_name(t).unwrap());
                out
            })
            .collect();
        for mode in ["none", "model", "group", "sequential"] {
            let mut row = format!("| {pipe} {dtype} | {mode} |");
            row.push_str(&floor_cell(&m, vec![format!("placement.offload={mode}")]));
            for f in &files {
                row.push_str(&floor_cell(&m, vec![format!("placement.offload={mode}"), format!("components.transformer.source=\"{}\"", f.display())]));
            }
            for f in &files {
                row.push_str(&format!(" {:.2} |", std::fs::metadata(f).unwrap().len() as f64 / 1e9));
            }
            table.push_str(&row);
            table.push('\n');
        }
    }
    insta::assert_snapshot!(table);
}

/// The pipelines of the memory-floor table: each full-size sparse folder at 1024x1024, everything
/// on one GPU or the plan fails.
const FLOOR_PIPELINES: [(&str, &str, &str, Dtype, &str); 3] =
    [("sdxl", "stable-diffusion-xl", "fp16", Dtype::F16, "unet"), ("sd35-large", "stable-diffusion-3", "bf16", Dtype::BF16, "transformer"), ("flux-dev", "flux", "bf16", Dtype::BF16, "transformer")];

fn floor_manifest(dir: &Path, pipe: &str, kind: &str, dtype: &str, float: Dtype) -> PathBuf {
    let root = crate::util::sparse_pipeline(pipe, dir, float);
    let m = dir.join(format!("{pipe}.toml"));
    std::fs::write(
        &m,
        format!(
            "schema_version = 1\nname = \"{pipe}\"\n[pipeline]\nkind = \"{kind}\"\nsource = \"{}\"\ndtype = \"{dtype}\"\n[placement]\nstrategy = \"sequential\"\noverflow = \"error\"\n[run]\nprompt = \"a cat\"\nwidth = 1024\nheight = 1024\n",
            root.display()
        ),
    )
    .unwrap();
    m
}

/// What the floors of `memory_floor_table` are made of (BENCHMARKS.md "Memory floors"): per
/// pipeline under `group` offload, each component's weights, working memory, the bytes it keeps on
/// the GPU while streamed (its largest offload group) and its planned peak there, snapshotted
/// (the snapshot is the table BENCHMARKS.md quotes).
///   cargo test --test main memory_floor_components
#[test]
fn memory_floor_components() {
    let dir = tempfile::tempdir().unwrap();
    let mut table = String::from("| pipeline | component | weights GB | working GB | streamed GB | peak GB |\n|---|---|---|---|---|---|\n");
    let gb = |v: &serde_json::Value| v.as_u64().map_or("-".to_string(), |b| format!("{:.2}", b as f64 / 1e9));
    for (pipe, kind, dtype, float, _) in FLOOR_PIPELINES {
        let m = floor_manifest(dir.path(), pipe, kind, dtype, float);
        let v = plan_json(
            m.to_str().unwrap(),
            &dir.path().join(pipe),
            &["--devices", "cuda:0=1TiB,cpu=4TiB", "--set", "placement.max_memory={\"cuda:0\"=\"1TiB\",cpu=\"4TiB\"}", "--set", "placement.offload=group"],
        );
        let mut total = 0;
        for (name, c) in v["components"].as_object().unwrap() {
            total += c["bytes"].as_u64().unwrap();
            table.push_str(&format!("| {pipe} {dtype} | {name} | {} | {} | {} | {} |\n", gb(&c["bytes"]), gb(&c["working_bytes"]), gb(&c["streamed_bytes"]), gb(&c["peak_bytes"])));
        }
        table.push_str(&format!("| {pipe} {dtype} | all weights | {:.2} | | | |\n", total as f64 / 1e9));
    }
    insta::assert_snapshot!(table);
}

/// With `components.vae.tiling = true` the VAE's working memory is the tile's (the config's
/// `sample_size`), not the image's, where diffusers tiles: when the latent exceeds the tile.
#[test]
fn vae_working_memory_follows_the_tile() {
    let dir = tempfile::tempdir().unwrap();
    let working =
        |m: &str, root: &Path, args: &[&str]| plan_json(m, root, &[&["--devices", "cuda:0=80GiB,cuda:1=80GiB,cpu=64GiB"], args].concat())["components"]["vae"]["working_bytes"].as_u64().unwrap();
    let tiled = ["--set", "components.vae.tiling=true"];
    // SD 1.5 (sample_size 512, fp32 decode by force_upcast) at 1024x1024: 3x3 tiles of 512 px.
    let sd15 = crate::util::sparse_pipeline("sd15", &dir.path().join("sd15"), Dtype::F16);
    let m = manifest(dir.path(), "sd15", "stable-diffusion", &sd15, "fp16", "");
    let size = ["--set", "run.width=1024", "--set", "run.height=1024"];
    let (px, tile) = (1024 * 1024u64, 512 * 512u64);
    assert_eq!(working(m.to_str().unwrap(), &sd15, &size), 10 * px * 128 * 4);
    assert_eq!(working(m.to_str().unwrap(), &sd15, &[&size[..], &tiled[..]].concat()), 10 * tile * 128 * 4 + 9 * tile * 3 * 4 + px * 3 * 4);
    // Slicing alone: one image of the batch at a time, the decoded ones kept.
    let batch = [&size[..], &["--set", "run.batch=2", "--set", "components.vae.slicing=true"]].concat();
    assert_eq!(working(m.to_str().unwrap(), &sd15, &batch), 10 * px * 128 * 4 + 2 * px * 3 * 4);
    // SDXL's VAE tiles at 1024 px (sample_size 1024): at 1024x1024 diffusers decodes whole even
    // with tiling on, and so does the plan; at 2048x2048, 3x3 tiles.
    let root = sdxl(&dir.path().join("sdxl"));
    let src = root.join("unet").display().to_string();
    let unet = ["--set", &format!("components.unet.source={src}")];
    let sdxl_vae = |args: &[&str]| working("manifests/sdxl.toml", &root, &[&unet[..], args].concat());
    assert_eq!(sdxl_vae(&tiled), sdxl_vae(&[]));
    assert_eq!(sdxl_vae(&tiled), 10 * px * 128 * 4);
    let big = ["--set", "run.width=2048", "--set", "run.height=2048"];
    assert_eq!(sdxl_vae(&big), 10 * 4 * px * 128 * 4);
    assert_eq!(sdxl_vae(&[&big[..], &tiled[..]].concat()), 10 * px * 128 * 4 + 9 * px * 3 * 4 + 4 * px * 3 * 4);
}

/// When the VAE's activations are what does not fit, `runner plan` says that tiling would.
#[test]
fn plan_suggests_vae_tiling() {
    let dir = tempfile::tempdir().unwrap();
    let root = sdxl(dir.path());
    let big = ["--set", "run.width=2048", "--set", "run.height=2048", "--devices", "cuda:0=8GB,cuda:1=8GB,cpu=64GiB"];
    // By default (`overflow = "stream"`) the VAE goes to the CPU, with a note.
    let (code, stdout, stderr) = plan(&[&["--json"], &big[..]].concat(), &root);
    assert_eq!(code, 0, "{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["components"]["vae"]["device"], "cpu");
    let notes = v["notes"].to_string();
    assert!(notes.contains("`vae` fits no GPU whole with 21.47 GB of working memory (its activations at full resolution); with `components.vae.tiling = true` (diffusers' `enable_vae_tiling`) it needs 5.53 GB and would fit on cuda:"), "{notes}");
    // With `overflow = "error"`: an error whose options name tiling, which then plans on a GPU.
    let (code, _, stderr) = plan(&[&big[..], &["--set", "placement.overflow=error"]].concat(), &root);
    assert_eq!(code, 1);
    assert!(stderr.contains("components.vae.tiling = true (decodes in tiles: 5.53 GB working memory instead of 21.47 GB): `vae` on cuda:"), "{stderr}");
    let (code, stdout, stderr) = plan(&[&["--json"], &big[..], &["--set", "placement.overflow=error", "--set", "components.vae.tiling=true"]].concat(), &root);
    assert_eq!(code, 0, "{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert!(v["components"]["vae"]["device"].as_str().unwrap().starts_with("cuda:"), "{v}");
    // Where tiling would not change the decode (SDXL at 1024x1024, its tile), no such note.
    let (_, stdout, _) = plan(&["--json", "--devices", "cuda:0=4GB,cuda:1=4GB,cpu=64GiB"], &root);
    assert!(!stdout.contains("tiling"), "{stdout}");
}

/// Preflight of a full-size folder, then the best of 5 in-process plans (`components` of them),
/// logged and bounded loosely (< 2 s: the debug build on a shared VM); what the plan was made from.
fn preflight_and_plan_timed(label: &str, loaded: &runner::manifest::LoadedManifest, components: usize) -> (runner::preflight::Checked, runner::plan::inventory::Inventory) {
    let started = std::time::Instant::now();
    let c = runner::preflight::check(loaded).unwrap();
    let checked = started.elapsed();
    let inventory = runner::plan::build::inventory(loaded, &Default::default()).unwrap();
    let mut best = std::time::Duration::MAX;
    for _ in 0..5 {
        let t = std::time::Instant::now();
        let input = runner::plan::build::plan_input(loaded, &c.folder, &c.configs, &c.run, inventory.clone(), &Default::default());
        let plan = runner::plan::plan(&input).unwrap();
        best = best.min(t.elapsed());
        assert_eq!(plan.components.len(), components);
    }
    eprintln!("{label}: preflight (headers and indexes) {checked:?}, plan input + plan {best:?}");
    assert!(best < std::time::Duration::from_secs(2), "{best:?}");
    (c, inventory)
}
