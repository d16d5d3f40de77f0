//! `runner run`: the PNG diffusers would write, its metadata, and every bad input the executor
//! can meet, each a clear error before anything is written.

use std::path::Path;

use runner::checkpoint::safetensors::{encode_header, parse_file_bytes};

use crate::lock::copy_dir;
use crate::pipeline::manifest_for;
use crate::util::{decode_png, root, run, runner};

#[test]
fn png_equals_diffusers_and_carries_provenance() {
    let dir = tempfile::tempdir().unwrap();
    let m = manifest_for("sd15-pndm", dir.path());
    let (code, stdout, stderr) = run(runner().arg("run").arg(&m).args(["--quiet", "--json"]));
    assert_eq!(code, 0, "{stderr}");
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["seed"], 0);
    assert_eq!(report["unet_calls"], 5, "PNDM: N + 1 UNet calls");
    assert_eq!(report["device_map"]["unet"], "cpu");
    assert!(report["timings"]["seconds_per_step"].as_f64().unwrap() > 0.0);
    let (ours, text) = decode_png(&dir.path().join("out.png"));
    let (theirs, _) = decode_png(&crate::util::refs_path("sd15-pndm.png"));
    // Diffusers' PIL output: the same pixels up to float32 roundings that flip a few 8-bit
    // values by one (src/parity.rs PNG_*; bit-equal against diffusers run here: `make parity`).
    let (off, step) = png_difference(&ours, &theirs);
    runner::parity::check("sd15-pndm: png max step", step, runner::parity::PNG_STEP);
    runner::parity::check("sd15-pndm: png values off by one", off, runner::parity::PNG_VALUES_OFF);
    let get = |k: &str| text.iter().find(|(kk, _)| kk == k).map(|(_, v)| v.clone()).unwrap_or_else(|| panic!("no {k} in {text:?}"));
    let meta: serde_json::Value = serde_json::from_str(&get("runner")).unwrap();
    assert_eq!(meta["prompt"], "a photo of a cat");
    assert_eq!(meta["negative_prompt"], "blurry");
    assert_eq!(meta["seed"], 0);
    assert_eq!(meta["steps"], 4);
    assert_eq!(meta["scheduler"], "PNDMScheduler");
    assert_eq!(meta["model"], "tiny-sd15");
    assert_eq!(meta["dtype"], "fp32");
    assert_eq!(meta["manifest_sha256"].as_str().unwrap().len(), 64);
    assert_eq!(
        get("parameters"),
        format!("a photo of a cat\nNegative prompt: blurry\nSteps: 4, Sampler: PLMS, CFG scale: 7.5, Seed: 0, Size: 64x64, Model: tiny-sd15, Version: runner {}", env!("CARGO_PKG_VERSION"))
    );
    assert!(text.iter().all(|(k, _)| k != "prompt"), "ComfyUI reads `prompt` as its JSON graph: {text:?}");
    // no temp files left beside the image
    assert!(std::fs::read_dir(dir.path()).unwrap().all(|e| !e.unwrap().file_name().to_string_lossy().contains(".tmp")));
}

#[test]
fn long_prompts_are_truncated_with_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let m = manifest_for("sd15-euler", dir.path());
    let long = format!("run.prompt={}", "a very long prompt about a cat ".repeat(20));
    let (code, _, stderr) = run(runner().arg("run").arg(&m).args(["--quiet", "--set", &long]));
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("The following part of your input was truncated because CLIP can only handle sequences up to 77 tokens"), "{stderr}");
}

#[test]
fn planned_device_missing_at_run_time() {
    let dir = tempfile::tempdir().unwrap();
    let m = manifest_for("sd15-euler", dir.path());
    let (code, _, stderr) = run(runner().arg("run").arg(&m).args(["--quiet", "--set", "placement.max_memory.\"cuda:0\"=24GiB"]));
    if tch::Cuda::device_count() > 0 {
        return; // a GPU machine runs it
    }
    assert_eq!(code, 1);
    assert!(stderr.contains("the plan puts") && stderr.contains("on `cuda:0`, but this machine has 0 CUDA device(s)"), "{stderr}");
    assert!(!dir.path().join("out.png").exists(), "nothing written");
}

#[test]
fn unwritable_dump_folder_fails_before_running() {
    let dir = tempfile::tempdir().unwrap();
    let m = manifest_for("sd15-euler", dir.path());
    let file = dir.path().join("a-file");
    std::fs::write(&file, "x").unwrap();
    let (code, _, stderr) = run(runner().arg("run").arg(&m).arg("--dump").arg(&file).arg("--quiet"));
    assert_eq!(code, 1);
    assert!(stderr.contains("cannot create the dump folder") && stderr.contains("a-file"), "{stderr}");
    assert!(!dir.path().join("out.png").exists());
}

fn rename_tensor(path: &Path, from: &str, to: &str) {
    let bytes = std::fs::read(path).unwrap();
    let h = parse_file_bytes(path, &bytes).unwrap();
    let mut tensors = h.tensors.clone();
    for t in &mut tensors {
        if t.name == from {
            t.name = to.to_string();
        }
    }
    let mut out = encode_header(&tensors, &h.metadata);
    out.extend_from_slice(&bytes[h.data_start as usize..]);
    std::fs::write(path, out).unwrap();
}

#[test]
fn checkpoint_not_matching_its_config_lists_the_keys() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&root().join("tests/fixtures/tiny-sd15"), &dir.path().join("pipe"));
    rename_tensor(&dir.path().join("pipe/unet/diffusion_pytorch_model.safetensors"), "conv_in.weight", "conv_in.weights");
    std::fs::write(
        dir.path().join("m.toml"),
        "schema_version = 1\nname = \"m\"\n[pipeline]\nkind = \"stable-diffusion\"\nsource = \"pipe\"\n[run]\nprompt = \"x\"\nsteps = 2\nwidth = 64\nheight = 64\n",
    )
    .unwrap();
    let (code, _, stderr) = run(runner().current_dir(dir.path()).args(["run", "m.toml", "--quiet"]));
    assert_eq!(code, 1);
    assert!(stderr.contains("error(s) in loading state_dict for UNet2DConditionModel"), "{stderr}");
    assert!(stderr.contains("missing key(s) in state_dict (1): \"conv_in.weight\"") && stderr.contains("unexpected key(s) in state_dict (1): \"conv_in.weights\""), "{stderr}");
}

#[test]
fn unsupported_scheduler_names_the_supported_ones() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&root().join("tests/fixtures/tiny-sd15"), &dir.path().join("pipe"));
    let cfg = dir.path().join("pipe/scheduler/scheduler_config.json");
    let text = std::fs::read_to_string(&cfg).unwrap().replace("PNDMScheduler", "HeunDiscreteScheduler");
    std::fs::write(&cfg, text).unwrap();
    std::fs::write(dir.path().join("m.toml"), "schema_version = 1\nname = \"m\"\n[pipeline]\nkind = \"stable-diffusion\"\nsource = \"pipe\"\n[components.safety_checker]\nenabled = false\n[run]\nprompt = \"x\"\nsteps = 2\nwidth = 64\nheight = 64\n").unwrap();
    let (code, _, stderr) = run(runner().current_dir(dir.path()).args(["run", "m.toml", "--quiet"]));
    assert_eq!(code, 1);
    assert!(stderr.contains("HeunDiscreteScheduler") && stderr.contains("EulerDiscreteScheduler") && stderr.contains("scheduler_config.json"), "{stderr}");
}

#[test]
fn latents_file_replaces_the_seed() {
    // The run's own initial draw, given as a file with another seed, gives the same image.
    let dir = tempfile::tempdir().unwrap();
    let m = manifest_for("sd15-ddim", dir.path());
    let dump = dir.path().join("d1");
    let (code, _, stderr) = run(runner().arg("run").arg(&m).arg("--dump").arg(&dump).arg("--quiet"));
    assert_eq!(code, 0, "{stderr}");
    let store = crate::unet::refs_at(&dump.join("dump.safetensors"));
    let latents = dir.path().join("latents.safetensors");
    runner::exec::png::write_dump(&latents, &[("latents".to_string(), store.get("latents.init").unwrap().copy())]).unwrap();
    let set = format!("run.latents=\"{}\"", latents.display());
    let (code, _, stderr) = run(runner().arg("run").arg(&m).args(["--quiet", "--out"]).arg(dir.path().join("from-file.png")).args(["--set", "run.seed=12345", "--set", &set]));
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(decode_png(&dir.path().join("from-file.png")).0, decode_png(&dir.path().join("out.png")).0);
    // A file of the wrong shape is an error naming it and the shape needed.
    runner::exec::png::write_dump(&latents, &[("latents".to_string(), tch::Tensor::zeros([1, 4, 4, 4], (tch::Kind::Float, tch::Device::Cpu)))]).unwrap();
    let (code, _, stderr) = run(runner().arg("run").arg(&m).args(["--quiet", "--set", &set]));
    assert_eq!(code, 1);
    assert!(stderr.contains("latents.safetensors") && stderr.contains("has shape [1, 4, 4, 4], the job needs [1, 4, 8, 8]"), "{stderr}");
}

#[test]
fn pipeline_kind_must_match_the_folder() {
    let dir = tempfile::tempdir().unwrap();
    let sd = root().join("tests/fixtures/tiny-sd15");
    let xl = root().join("tests/fixtures/tiny-sdxl");
    let m = |kind: &str, src: &Path| {
        let p = dir.path().join(format!("{kind}.toml"));
        std::fs::write(&p, format!("schema_version = 1\nname = \"m\"\n[pipeline]\nkind = \"{kind}\"\nsource = \"{}\"\n[placement]\nmax_memory = {{ cpu = \"4GiB\" }}\n[run]\nprompt = \"x\"\nsteps = 2\nwidth = 64\nheight = 64\n", src.display())).unwrap();
        p
    };
    let (code, _, stderr) = run(runner().arg("run").arg(m("stable-diffusion-xl", &sd)).arg("--quiet"));
    assert_eq!(code, 1);
    assert!(stderr.contains("`pipeline.kind` is `stable-diffusion-xl` but") && stderr.contains("without `text_encoder_2` `tokenizer_2`"), "{stderr}");
    let (code, _, stderr) = run(runner().arg("run").arg(m("stable-diffusion", &xl)).arg("--quiet"));
    assert_eq!(code, 1);
    assert!(stderr.contains("`pipeline.kind` is `stable-diffusion` but") && stderr.contains("StableDiffusionXLPipeline"), "{stderr}");

    // A refiner-like folder (no text_encoder) is refused clearly.
    let refiner = dir.path().join("refiner");
    copy_dir(&xl, &refiner);
    let mi = refiner.join("model_index.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&mi).unwrap()).unwrap();
    v["text_encoder"] = serde_json::json!([null, null]);
    v["tokenizer"] = serde_json::json!([null, null]);
    std::fs::write(&mi, v.to_string()).unwrap();
    let (code, _, stderr) = run(runner().arg("run").arg(m("stable-diffusion-xl", &refiner)).arg("--quiet"));
    assert_eq!(code, 1);
    assert!(stderr.contains("is an SDXL refiner (no `text_encoder`)"), "{stderr}");
}

#[test]
fn safety_checker_runs_and_blacks_out_flagged_images() {
    // A copy of the tiny pipeline whose safety checker flags everything (thresholds far below
    // any cosine distance): the image comes back black, with diffusers' warning.
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&root().join("tests/fixtures/tiny-sd15"), &dir.path().join("pipe"));
    let st = dir.path().join("pipe/safety_checker/model.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    let h = parse_file_bytes(&st, &bytes).unwrap();
    let mut data = bytes[h.data_start as usize..].to_vec();
    for t in h.tensors.iter().filter(|t| t.name.ends_with("concept_embeds_weights")) {
        let (s, e) = (t.data_offsets.0 as usize, t.data_offsets.1 as usize);
        for chunk in data[s..e].chunks_mut(4) {
            chunk.copy_from_slice(&(-10.0f32).to_le_bytes());
        }
    }
    let mut out = encode_header(&h.tensors, &h.metadata);
    out.extend(data);
    std::fs::write(&st, out).unwrap();
    std::fs::write(
        dir.path().join("m.toml"),
        "schema_version = 1\nname = \"m\"\n[pipeline]\nkind = \"stable-diffusion\"\nsource = \"pipe\"\n[run]\nprompt = \"x\"\nsteps = 2\nwidth = 64\nheight = 64\noutput = \"o.png\"\n",
    )
    .unwrap();
    let (code, _, stderr) = run(runner().current_dir(dir.path()).args(["run", "m.toml", "--quiet"]));
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("Potential NSFW content was detected"), "{stderr}");
    let (pixels, _) = decode_png(&dir.path().join("o.png"));
    assert!(pixels.iter().all(|&p| p == 0), "blacked out");
    // Turned off in the manifest, it does not run.
    std::fs::write(dir.path().join("m.toml"), "schema_version = 1\nname = \"m\"\n[pipeline]\nkind = \"stable-diffusion\"\nsource = \"pipe\"\n[components.safety_checker]\nenabled = false\n[run]\nprompt = \"x\"\nsteps = 2\nwidth = 64\nheight = 64\noutput = \"o.png\"\n").unwrap();
    let (code, _, stderr) = run(runner().current_dir(dir.path()).args(["run", "m.toml", "--quiet"]));
    assert_eq!(code, 0, "{stderr}");
    assert!(!stderr.contains("Potential NSFW"), "{stderr}");
    assert!(decode_png(&dir.path().join("o.png")).0.iter().any(|&p| p != 0));
}

#[test]
fn tiny_sdxl_twin_runs_on_simulated_devices() {
    // manifests/tiny-sdxl.toml: the seed's layout (UNet from a sharded folder, balanced over two
    // GPUs) on the tiny pipeline; simulated devices run it on the CPU.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("twin.png");
    let (code, stdout, stderr) = run(runner().args(["run", "manifests/tiny-sdxl.toml", "--quiet", "--json", "--simulate", "cuda:0=40MB,cuda:1=40MB,cpu=2GiB", "--out"]).arg(&out));
    assert_eq!(code, 0, "{stderr}");
    let r: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(r["simulated"], true);
    let map = r["device_map"].as_object().unwrap();
    assert!(map.values().any(|d| d == "cuda:0") && map.values().any(|d| d == "cuda:1"), "balanced over both: {map:?}");
    check_ledger(&r, &root().join("manifests/tiny-sdxl.toml"));
    // The same job on one device, from the pipeline's own (unsharded) UNet: the same image.
    let m = dir.path().join("one.toml");
    std::fs::write(
        &m,
        format!(
            "schema_version = 1\nname = \"one\"\n[pipeline]\nkind = \"stable-diffusion-xl\"\nsource = \"{}\"\nscheduler = \"euler\"\n[placement]\nmax_memory = {{ cpu = \"2GiB\" }}\n[run]\nprompt = \"a cute dog running on the grass\"\nnegative_prompt = \"\"\nsteps = 4\nguidance_scale = 5.0\nseed = 0\nwidth = 64\nheight = 64\noutput = \"one.png\"\n",
            root().join("tests/fixtures/tiny-sdxl").display()
        ),
    )
    .unwrap();
    let (code, _, stderr) = run(runner().arg("run").arg(&m).arg("--quiet"));
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(decode_png(&out).0, decode_png(&dir.path().join("one.png")).0);
    // A malformed --simulate spec, or budgets for devices it lacks: errors naming the flag.
    for (spec, want) in [
        ("cuda:0=", "--simulate \"cuda:0=\": size of `cuda:0`: empty size"),
        ("cuda0=4GB", "unknown device `cuda0`"),
        ("cuda:0=4GB,cuda:0=2GB", "`cuda:0` is given twice"),
        ("cuda:0", "`cuda:0` is not DEVICE=SIZE"),
    ] {
        let (code, _, stderr) = run(runner().args(["run", "manifests/tiny-sdxl.toml", "--quiet", "--simulate", spec]));
        assert_eq!(code, 1, "{stderr}");
        assert!(stderr.contains(want) && stderr.contains("--simulate") && !stderr.contains("--devices"), "{spec}: {stderr}");
    }
    let (code, _, stderr) = run(runner().args(["run", "manifests/tiny-sdxl.toml", "--quiet", "--simulate", "cuda:0=40MB,cpu=1GB"]));
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("lists `cuda:1`, which --simulate does not have"), "{stderr}");
    // --simulate and --devices do not mix.
    let (code, _, _) = run(runner().args(["run", "manifests/tiny-sdxl.toml", "--simulate", "cpu=1GB", "--devices", "cpu=1GB"]));
    assert_eq!(code, 2);
}

#[test]
fn unet_split_across_devices_gives_the_same_image() {
    // `auto` over (simulated) devices too small for the UNet: it is split at no-split units and
    // runs block by block; the image equals the single-device one.
    let dir = tempfile::tempdir().unwrap();
    let src = root().join("tests/fixtures/tiny-sd15");
    let manifest = |budgets: (u64, u64, u64), out: &str| {
        let p = dir.path().join(format!("{out}.toml"));
        std::fs::write(&p, format!(
            "schema_version = 1\nname = \"split\"\n[pipeline]\nkind = \"stable-diffusion\"\nsource = \"{}\"\n[components.safety_checker]\nenabled = false\n[placement]\nstrategy = \"auto\"\nmax_memory = {{ \"cuda:0\" = {}, \"cuda:1\" = {}, \"cuda:2\" = {} }}\n[run]\nprompt = \"a photo of a cat\"\nnegative_prompt = \"blurry\"\nsteps = 3\nseed = 0\nwidth = 64\nheight = 64\noutput = \"{out}.png\"\n",
            src.display(), budgets.0, budgets.1, budgets.2)).unwrap();
        p
    };
    let big = manifest((1 << 30, 1 << 30, 1 << 30), "whole");
    let (code, stdout, stderr) = run(runner().args(["plan", "--json"]).arg(&big));
    assert_eq!(code, 0, "{stderr}");
    let p: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let c = |n: &str, k: &str| p["components"][n][k].as_u64().unwrap();
    let (te, unet_bytes, unet_work, vae) = (c("text_encoder", "peak_bytes"), c("unet", "bytes"), c("unet", "working_bytes"), c("vae", "peak_bytes"));
    // cuda:0 takes the text encoder and half the UNet, cuda:1 the other half, cuda:2 the VAE.
    let split = manifest((te + unet_work + unet_bytes / 2, unet_work + unet_bytes * 3 / 4, vae + 1000), "split");
    let sim = "cuda:0=1GB,cuda:1=1GB,cuda:2=1GB";
    let (code, stdout, stderr) = run(runner().args(["plan", "--json", "--devices", sim]).arg(&split));
    assert_eq!(code, 0, "{stderr}");
    let sp: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let parts = sp["components"]["unet"]["split"].as_object().expect("the UNet is split");
    assert!(parts.values().any(|d| d == "cuda:0") && parts.values().any(|d| d == "cuda:1"), "{parts:?}");
    for m in [&big, &split] {
        let (code, stdout, stderr) = run(runner().current_dir(dir.path()).arg("run").arg(m).args(["--quiet", "--json", "--simulate", sim]));
        assert_eq!(code, 0, "{stderr}");
        check_ledger(&serde_json::from_str(&stdout).unwrap(), m);
    }
    assert_eq!(decode_png(&dir.path().join("split.png")).0, decode_png(&dir.path().join("whole.png")).0);
    // The split UNet beside streamed neighbours: the text encoder leaf by leaf, the VAE by groups
    // (budgets from their streamed peaks, so that the UNet still needs two devices).
    let sets = ["--set", "components.text_encoder.offload=sequential", "--set", "components.vae.offload=group"];
    let (code, stdout, stderr) = run(runner().args(["plan", "--json"]).arg(&big).args(sets));
    assert_eq!(code, 0, "{stderr}");
    let p: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let (te, vae) = (p["components"]["text_encoder"]["peak_bytes"].as_u64().unwrap(), p["components"]["vae"]["peak_bytes"].as_u64().unwrap());
    // Offloaded, the text encoder needs room only while it runs, which the UNet's working memory covers.
    assert!(te < unet_work);
    let mixed = manifest((unet_work + unet_bytes / 2, unet_work + unet_bytes * 3 / 4, vae + 1000), "mixed");
    let (code, stdout, stderr) = run(runner().args(["plan", "--json", "--devices", sim]).arg(&mixed).args(sets));
    assert_eq!(code, 0, "{stderr}");
    let mp: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert!(mp["components"]["unet"]["split"].is_object() && mp["components"]["vae"]["offload"] == "group", "{mp}");
    let (code, stdout, stderr) = run(runner().current_dir(dir.path()).arg("run").arg(&mixed).args(["--quiet", "--json", "--simulate", sim]).args(sets));
    assert_eq!(code, 0, "{stderr}");
    let r: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    for (d, u) in r["devices"].as_object().unwrap() {
        assert!(u["peak_bytes"].as_u64() <= u["planned_peak_bytes"].as_u64(), "{d}: {u}");
    }
    assert_eq!(decode_png(&dir.path().join("mixed.png")).0, decode_png(&dir.path().join("whole.png")).0);
}

/// The f32 bytes of the VAE encoder and quant_conv, which text-to-image never loads (the plan
/// counts the whole VAE, as diffusers loads it).
fn vae_bytes_never_loaded(manifest: &Path) -> u64 {
    let m = runner::manifest::load(manifest, &Default::default()).unwrap();
    let pipeline = runner::checkpoint::open_for_manifest(&m).unwrap();
    let vae = pipeline.component("vae").unwrap().checkpoint.as_ref().unwrap();
    let unread: u64 = vae.tensors.iter().filter(|(k, _)| k.starts_with("encoder.") || k.starts_with("quant_conv.")).map(|(_, t)| t.info.numel() * 4).sum();
    assert!(unread > 0);
    unread
}

/// The run's residency ledger (weights counted from the loaded tensors, per planned device, a
/// split UNet's variables by module) against the plan's prediction from headers: equal on every
/// device, less the VAE encoder that text-to-image never loads (the plan counts the whole VAE).
fn check_ledger(report: &serde_json::Value, manifest: &Path) {
    let unread = vae_bytes_never_loaded(manifest);
    let vae_device = report["device_map"]["vae"].as_str().unwrap();
    let devices = report["devices"].as_object().unwrap();
    let mut used = 0;
    for (d, u) in devices {
        let (peak, planned, budget) = (u["peak_bytes"].as_u64().unwrap(), u["planned_resident_bytes"].as_u64().unwrap(), u["budget_bytes"].as_u64().unwrap());
        assert!(peak <= budget, "{d}: {u}");
        assert_eq!(planned - peak, if d == vae_device { unread } else { 0 }, "{d}: {u}");
        used += (peak > 0) as usize;
    }
    let mapped: std::collections::BTreeSet<&str> = report["device_map"].as_object().unwrap().values().map(|v| v.as_str().unwrap()).collect();
    assert!(used >= mapped.len().min(2), "{devices:?}");
    // Simulated and CPU devices have no caching allocator; the host figures are the process's.
    assert!(devices.values().all(|u| u["allocator"].is_null()), "{devices:?}");
    let host = &report["host"];
    let at = |k: &str| host[k].as_u64().unwrap();
    assert!(at("rss_before_load_bytes") > 0 && at("load_peak_rss_bytes") >= at("rss_before_load_bytes") && at("peak_rss_bytes") >= at("load_peak_rss_bytes"), "{host}");
    // Simulated, every weight lives in host memory: what the load placed there is what the
    // ledger counts on all devices together.
    let weights: u64 = devices.values().map(|u| u["peak_bytes"].as_u64().unwrap()).sum();
    assert_eq!(at("loaded_bytes"), weights, "{host} {devices:?}");
}

#[test]
fn model_offload_visits_devices_one_component_at_a_time() {
    // `model` offload on the seed's two-GPU layout (simulated): weights live in host memory, each
    // component visits its device while it runs; same image as without offload, and each device's
    // peak is its largest component (the plan's figure from headers), never the sum.
    let dir = tempfile::tempdir().unwrap();
    for manifest in ["manifests/tiny-sdxl.toml", "manifests/tiny-sd15.toml"] {
        let sim = "cuda:0=40MB,cuda:1=40MB,cpu=2GiB";
        let budgets = "placement.max_memory={\"cuda:0\"=\"40MB\",\"cuda:1\"=\"40MB\",cpu=\"2GiB\"}";
        let go = |offload: &str| {
            let out = dir.path().join(format!("{offload}.png"));
            let set = format!("placement.offload={offload}");
            let (code, stdout, stderr) = run(runner().args(["run", manifest, "--quiet", "--json", "--simulate", sim, "--set", &set, "--set", budgets, "--out"]).arg(&out));
            assert_eq!(code, 0, "{stderr}");
            let (code, plan, stderr) = run(runner().args(["plan", manifest, "--json", "--devices", sim, "--set", &set, "--set", budgets]));
            assert_eq!(code, 0, "{stderr}");
            (decode_png(&out).0, serde_json::from_str::<serde_json::Value>(&stdout).unwrap(), serde_json::from_str::<serde_json::Value>(&plan).unwrap())
        };
        let (none, r0, _) = go("none");
        let (model, r, plan) = go("model");
        assert_eq!(none, model, "{manifest}");
        let unread = vae_bytes_never_loaded(&root().join(manifest));
        let comps = plan["components"].as_object().unwrap();
        let loaded = |n: &str| comps[n]["bytes"].as_u64().unwrap() - if n == "vae" { unread } else { 0 };
        let mut gpus = 0;
        for (d, u) in r["devices"].as_object().unwrap() {
            let peak = u["peak_bytes"].as_u64().unwrap();
            if d == "cpu" {
                // Everything lives in host memory (the safety checker runs there too when enabled).
                let all: u64 = comps.iter().filter(|(n, c)| *n != "safety_checker" && c["offload"] == "model").map(|(n, _)| loaded(n)).sum();
                assert!(peak >= all, "{manifest} {d}: {u}");
                continue;
            }
            let here: Vec<u64> = comps.iter().filter(|(_, c)| c["device"] == d.as_str()).map(|(n, _)| loaded(n)).collect();
            assert!(here.len() >= 2 || here.is_empty() || peak > 0, "{manifest} {d}");
            assert_eq!(peak, here.iter().copied().max().unwrap_or(0), "{manifest} {d}: {u}");
            assert_eq!(u["planned_resident_bytes"], 0, "{manifest} {d}: weights live in host memory");
            // Without offload the device holds all of its components (the transient safety checker
            // on top of the rest).
            let no_offload = r0["devices"][d]["peak_bytes"].as_u64().unwrap();
            assert_eq!(no_offload, here.iter().sum::<u64>(), "{manifest} {d}");
            gpus += (here.len() >= 2) as usize;
        }
        assert!(gpus >= 1, "{manifest}: some device holds two components, so offload shows: {r}");
    }
}

#[test]
fn the_summary_for_people_names_devices_and_peaks() {
    let dir = tempfile::tempdir().unwrap();
    let (code, stdout, stderr) =
        run(runner().args(["run", "manifests/tiny-sdxl.toml", "--quiet", "--simulate", "cuda:0=40MB,cuda:1=40MB,cpu=2GiB", "--set", "placement.offload=model", "--out"]).arg(dir.path().join("x.png")));
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("simulated devices (ran on the CPU): text_encoder -> cuda:1, text_encoder_2 -> cuda:0, unet -> cuda:1, vae -> cuda:0"), "{stdout}");
    // Under `model` offload each GPU holds its largest component; the host holds them all.
    assert!(
        stdout.contains("peak resident weights: cpu 4.38 MB of 2.15 GB (plan: 4.48 MB peak, 4.48 MB resident), cuda:0 1.59 MB of 40 MB (plan: 1.59 MB peak, 0 B resident), cuda:1 1.59 MB of 40 MB (plan: 1.59 MB peak, 0 B resident)"),
        "{stdout}"
    );
}

/// Per loaded component of `manifest` (the VAE without its encoder): the bytes of its largest
/// leaf module and of each offload group, from the headers (fp32).
fn leaves_and_groups(manifest: &Path) -> std::collections::BTreeMap<String, (u64, std::collections::BTreeMap<String, u64>)> {
    let m = runner::manifest::load(manifest, &Default::default()).unwrap();
    let pipeline = runner::checkpoint::open_for_manifest(&m).unwrap();
    let mut out = std::collections::BTreeMap::new();
    for name in ["text_encoder", "text_encoder_2", "unet", "vae"] {
        let Some(ck) = pipeline.component(name).and_then(|c| c.checkpoint.as_ref()) else {
            continue;
        };
        let mut leaves: std::collections::BTreeMap<String, u64> = Default::default();
        let mut groups: std::collections::BTreeMap<String, u64> = Default::default();
        for (k, t) in &ck.tensors {
            if name == "vae" && (k.starts_with("encoder.") || k.starts_with("quant_conv.")) {
                continue;
            }
            let b = t.info.numel() * 4;
            *leaves.entry(k.rsplit_once('.').unwrap().0.to_string()).or_default() += b;
            *groups.entry(runner::plan::modules::group_path(k)).or_default() += b;
        }
        out.insert(name.to_string(), (*leaves.values().max().unwrap(), groups));
    }
    out
}

#[test]
fn every_offload_mode_gives_the_same_image_with_the_planned_peaks() {
    // The seed's two-GPU layout, simulated, under each offload mode: the image is the one without
    // offload, bit for bit; each GPU's measured peak of resident weights is what the mode promises
    // (`model`: its largest component; `sequential`: its largest leaf module; `group`: more than its
    // largest block group, since the next one is prefetched, and at most two of them) and never
    // above the plan's `weight_peak_bytes`. With the text encoders on the CPU the UNet and the VAE
    // are what streams.
    let dir = tempfile::tempdir().unwrap();
    // (manifest, GPU budget, settings): the tiny SD 1.5 UNet's working memory needs the larger one.
    let cases: [(&str, &str, &[&str]); 3] = [
        ("manifests/tiny-sdxl.toml", "40MB", &[]),
        ("manifests/tiny-sdxl.toml", "40MB", &["components.text_encoder.device=cpu", "components.text_encoder_2.device=cpu"]),
        ("manifests/tiny-sd15.toml", "100MB", &["components.text_encoder.device=cpu", "components.safety_checker.enabled=false"]),
    ];
    for (case, (manifest, gpu, pins)) in cases.iter().enumerate() {
        let sim = format!("cuda:0={gpu},cuda:1={gpu},cpu=2GiB");
        let budgets = format!("placement.max_memory={{\"cuda:0\"=\"{gpu}\",\"cuda:1\"=\"{gpu}\",cpu=\"2GiB\"}}");
        let sizes = leaves_and_groups(&root().join(manifest));
        let go = |offload: &str| {
            let out = dir.path().join(format!("{case}-{offload}.png"));
            let mut sets = vec![format!("placement.offload={offload}"), budgets.clone()];
            sets.extend(pins.iter().map(|p| p.to_string()));
            let sets: Vec<String> = sets.into_iter().flat_map(|s| ["--set".to_string(), s]).collect();
            let (code, stdout, stderr) = run(runner().args(["run", manifest, "--quiet", "--json", "--simulate", &sim]).args(&sets).arg("--out").arg(&out));
            assert_eq!(code, 0, "{manifest} {offload}: {stderr}");
            let (code, plan, stderr) = run(runner().args(["plan", manifest, "--json", "--devices", &sim]).args(&sets));
            assert_eq!(code, 0, "{stderr}");
            (decode_png(&out).0, serde_json::from_str::<serde_json::Value>(&stdout).unwrap(), serde_json::from_str::<serde_json::Value>(&plan).unwrap())
        };
        let (none, _, _) = go("none");
        for mode in ["model", "sequential", "group"] {
            let (image, r, plan) = go(mode);
            assert!(image == none, "{manifest} {pins:?} {mode}: the image differs from no offload");
            let comps = plan["components"].as_object().unwrap();
            if !pins.is_empty() {
                let w = r["warnings"].to_string();
                assert!(w.contains(&format!("`text_encoder` runs on the CPU, where its weights already live: `offload = \\\"{mode}\\\"` does nothing for it")), "{w}");
            }
            let mut streamed = 0;
            for (d, u) in r["devices"].as_object().unwrap() {
                let (peak, planned, budget) = (u["peak_bytes"].as_u64().unwrap(), u["planned_peak_bytes"].as_u64().unwrap(), u["budget_bytes"].as_u64().unwrap());
                assert!(peak <= budget && peak <= planned, "{manifest} {mode} {d}: {u}");
                if d == "cpu" {
                    continue;
                }
                let here: Vec<&String> = comps.iter().filter(|(n, c)| c["device"] == d.as_str() && sizes.contains_key(*n)).map(|(n, _)| n).collect();
                if here.is_empty() {
                    assert_eq!(peak, 0, "{manifest} {mode} {d}");
                    continue;
                }
                streamed += 1;
                let (leaf, groups): (Vec<u64>, Vec<&std::collections::BTreeMap<String, u64>>) = here.iter().map(|n| (sizes[*n].0, &sizes[*n].1)).unzip();
                let whole = groups.iter().map(|g| g.values().sum::<u64>()).max().unwrap();
                let group = groups.iter().flat_map(|g| g.values()).copied().max().unwrap();
                match mode {
                    "model" => assert_eq!(peak, whole, "{manifest} {d}: {u}"),
                    "sequential" => assert_eq!(peak, leaf.iter().copied().max().unwrap(), "{manifest} {d}: {u}"),
                    _ => assert!(peak > group && peak <= 2 * group && peak < whole, "{manifest} {d}: largest group {group}, whole {whole}: {u}"),
                }
            }
            assert!(streamed >= 2, "{manifest} {mode}: two GPUs take part: {r}");
        }
    }
}

#[test]
fn mixed_offload_modes_share_a_device_within_the_plan() {
    // One GPU, a different mode per component: a `model` visitor leaves when the next component
    // runs there, whatever that one's mode, so the device never holds more than the plan's
    // `weight_peak_bytes`; the image is the one without offload.
    let dir = tempfile::tempdir().unwrap();
    let cases: [(&str, &[&str]); 2] = [
        ("manifests/tiny-sd15.toml", &["components.text_encoder.offload=model", "components.unet.offload=group", "components.vae.offload=sequential", "components.safety_checker.offload=model"]),
        ("manifests/tiny-sdxl.toml", &["components.text_encoder.offload=model", "components.text_encoder_2.offload=sequential", "components.unet.offload=group", "components.vae.offload=model"]),
    ];
    for (manifest, modes) in cases {
        let go = |sets: &[&str], name: &str| {
            let out = dir.path().join(name);
            // Every component pinned to cuda:0 (tiny-sdxl's budgets name a second GPU).
            let mut args: Vec<String> = vec!["--set".into(), "placement.max_memory={\"cuda:0\"=\"200MB\",\"cuda:1\"=\"200MB\",cpu=\"2GiB\"}".into()];
            let comps = if manifest.contains("sdxl") { ["text_encoder", "text_encoder_2", "unet", "vae"] } else { ["text_encoder", "unet", "vae", "safety_checker"] };
            let pins = comps.map(|c| format!("components.{c}.device=cuda:0"));
            for s in pins.iter().map(String::as_str).chain(sets.iter().copied()) {
                args.extend(["--set".to_string(), s.to_string()]);
            }
            let (code, stdout, stderr) = run(runner().args(["run", manifest, "--quiet", "--json", "--simulate", "cuda:0=200MB,cuda:1=200MB,cpu=2GiB"]).args(&args).arg("--out").arg(&out));
            assert_eq!(code, 0, "{manifest}: {stderr}");
            (decode_png(&out).0, serde_json::from_str::<serde_json::Value>(&stdout).unwrap())
        };
        let (none, _) = go(&[], "none.png");
        let (mixed, r) = go(modes, "mixed.png");
        assert!(none == mixed, "{manifest}: the image differs from no offload");
        assert!(r["device_map"].as_object().unwrap().values().all(|d| d == "cuda:0"), "{r}");
        let gpu = &r["devices"]["cuda:0"];
        let (peak, planned) = (gpu["peak_bytes"].as_u64().unwrap(), gpu["planned_peak_bytes"].as_u64().unwrap());
        assert!(peak > 0 && peak <= planned, "{manifest}: {gpu}");
    }
}

#[test]
fn streaming_needs_a_budget_above_its_floor() {
    // A UNet pinned to a GPU whose budget is below what `sequential` needs at least (its largest
    // leaf + working memory): the plan's error says what that floor is made of.
    let (code, _, stderr) = run(runner().args([
        "run",
        "manifests/tiny-sd15.toml",
        "--quiet",
        "--simulate",
        "cuda:0=20MB,cpu=2GiB",
        "--set",
        "placement.offload=sequential",
        "--set",
        "placement.max_memory={\"cuda:0\"=\"20MB\"}",
        "--set",
        "components.unet.device=cuda:0",
    ]));
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("`sequential` offload streams one leaf module at a time, so a device running `unet` needs at least its largest leaf (`"), "{stderr}");
    assert!(stderr.contains("plus its working memory"), "{stderr}");
    let (code, _, stderr) = run(runner().args([
        "plan",
        "manifests/tiny-sd15.toml",
        "--devices",
        "cuda:0=20MB,cpu=2GiB",
        "--set",
        "components.safety_checker.offload=group",
        "--set",
        "placement.max_memory={\"cuda:0\"=\"20MB\"}",
    ]));
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("`safety_checker` is a `StableDiffusionSafetyChecker`, whose blocks runner does not know"), "{stderr}");
    // Pipeline-wide, the checker falls back to `model` offload and the plan says so.
    let (code, stdout, stderr) = run(runner().args(["plan", "manifests/tiny-sd15.toml", "--devices", "cuda:0=20MB,cpu=2GiB", "--set", "placement.offload=group"]));
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("note: `safety_checker` (StableDiffusionSafetyChecker) cannot be streamed block by block: it uses `model` offload"), "{stdout}");
}

#[test]
fn components_that_do_not_fit_together_are_refused_before_loading() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&root().join("tests/fixtures/tiny-sd15"), &dir.path().join("pipe"));
    let cfg = dir.path().join("pipe/unet/config.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    v["cross_attention_dim"] = 768.into();
    std::fs::write(&cfg, v.to_string()).unwrap();
    std::fs::write(
        dir.path().join("m.toml"),
        "schema_version = 1\nname = \"m\"\n[pipeline]\nkind = \"stable-diffusion\"\nsource = \"pipe\"\n[run]\nprompt = \"x\"\nsteps = 2\nwidth = 64\nheight = 64\n",
    )
    .unwrap();
    let (code, _, stderr) = run(runner().current_dir(dir.path()).args(["run", "m.toml", "--quiet"]));
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("do not fit together: the text encoder's hidden size is 8 but the UNet's cross_attention_dim is 768"), "{stderr}");
    assert!(!stderr.contains("panicked"));
}

/// The planner's input for `m`, as `runner plan` builds it (after preflight).
fn preflighted_input(m: &runner::manifest::LoadedManifest, inv_opts: &runner::plan::build::BuildOptions, opts: &runner::plan::build::BuildOptions) -> runner::plan::PlanInput {
    let c = runner::preflight::check(m).unwrap();
    runner::plan::build::plan_input(m, &c.folder, &c.configs, &c.run, runner::plan::build::inventory(m, inv_opts).unwrap(), opts)
}

#[test]
fn a_loaded_pipeline_moves_to_a_new_plan_without_reading_files() {
    // diffusers' reset_device_map + a new placement: load under one plan, delete every weight
    // file, apply another plan (the UNet split over two devices), generate: same image.
    use runner::plan::build::BuildOptions;
    use runner::plan::inventory::Inventory;
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&root().join("tests/fixtures/tiny-sd15"), &dir.path().join("pipe"));
    let write = |name: &str, budgets: &str| {
        let p = dir.path().join(format!("{name}.toml"));
        std::fs::write(&p, format!("schema_version = 1\nname = \"{name}\"\n[pipeline]\nkind = \"stable-diffusion\"\nsource = \"pipe\"\n[components.safety_checker]\nenabled = false\n[placement]\nstrategy = \"auto\"\nmax_memory = {budgets}\n[run]\nprompt = \"a photo of a cat\"\nnegative_prompt = \"blurry\"\nsteps = 3\nseed = 0\nwidth = 64\nheight = 64\n")).unwrap();
        runner::manifest::load(&p, &Default::default()).unwrap()
    };
    let sim = Inventory::parse_spec("cuda:0=1GB,cuda:1=1GB,cuda:2=1GB").unwrap();
    let opts = |out: &str| runner::exec::RunOptions { out: Some(dir.path().join(out)), plan: BuildOptions { devices: Some(sim.clone()), weights_only: false }, simulate: true, ..Default::default() };
    let whole = write("whole", "{ \"cuda:0\" = \"1GB\", \"cuda:1\" = \"1GB\" }");
    // The second plan: cuda:0 keeps the text encoder and part of the UNet, cuda:1 the rest.
    let probe = runner::plan::plan(&preflighted_input(&whole, &BuildOptions::default(), &BuildOptions::default())).unwrap();
    let c = |n: &str| probe.components.iter().find(|c| c.name == n).unwrap().clone();
    let (te, unet, vae) = (c("text_encoder"), c("unet"), c("vae"));
    let split = write(
        "split",
        &format!("{{ \"cuda:0\" = {}, \"cuda:1\" = {}, \"cuda:2\" = {} }}", te.peak_bytes + unet.working_bytes + unet.bytes / 2, unet.working_bytes + unet.bytes * 3 / 4, vae.peak_bytes + 1000),
    );
    let plan_b = runner::plan::plan(&preflighted_input(&split, &opts("x").plan, &opts("x").plan)).unwrap();
    let plan_b2 = plan_b.clone();
    assert!(plan_b.components.iter().any(|c| c.split.is_some()), "plan B splits the UNet");
    let offloaded = write("offloaded", "{ \"cuda:0\" = \"1GB\", cpu = \"1GB\" }\noffload = \"model\"");
    let build = BuildOptions { devices: Some(Inventory::parse_spec("cuda:0=1GB,cpu=1GB").unwrap()), weights_only: false };
    let plan_c = runner::plan::plan(&preflighted_input(&offloaded, &build, &build)).unwrap();
    let streaming: Vec<(&str, runner::plan::Plan)> = ["group", "sequential"]
        .into_iter()
        .map(|mode| {
            let m = write(mode, &format!("{{ \"cuda:0\" = \"1GB\", cpu = \"1GB\" }}\noffload = \"{mode}\""));
            (mode, runner::plan::plan(&preflighted_input(&m, &build, &build)).unwrap())
        })
        .collect();

    let mut session = runner::exec::load(&whole, &opts("a.png")).unwrap();
    let a = session.generate(&opts("a.png")).unwrap();
    for entry in walk(&dir.path().join("pipe")) {
        if entry.extension().is_some_and(|e| e == "safetensors") {
            std::fs::remove_file(entry).unwrap();
        }
    }
    session.apply_plan(plan_b).unwrap();
    assert!(session.plan().components.iter().any(|c| c.split.is_some()));
    let b = session.generate(&opts("b.png")).unwrap();
    assert_eq!(b.device_map["unet"], "cuda:0");
    assert_eq!(decode_png(&a.images[0]).0, decode_png(&b.images[0]).0);
    // And on to `model` offload (diffusers: reset_device_map, then enable_model_cpu_offload).
    session.apply_plan(plan_c).unwrap();
    let c = session.generate(&opts("c.png")).unwrap();
    assert_eq!(decode_png(&a.images[0]).0, decode_png(&c.images[0]).0);
    let gpu = &c.devices["cuda:0"];
    assert_eq!(gpu.planned_resident_bytes, 0);
    assert!(gpu.peak_bytes > 0 && gpu.peak_bytes < b.devices.values().map(|d| d.peak_bytes).sum::<u64>(), "{:?}", c.devices);
    assert!(c.devices["cpu"].peak_bytes >= b.devices.values().map(|d| d.peak_bytes).sum::<u64>(), "{:?}", c.devices);
    // Then `group` and `sequential` offload, and back to the split without offload: the streams
    // hand every weight back when a run ends.
    for (mode, plan) in streaming {
        session.apply_plan(plan).unwrap();
        let r = session.generate(&opts(&format!("{mode}.png"))).unwrap();
        assert_eq!(decode_png(&a.images[0]).0, decode_png(&r.images[0]).0, "{mode}");
        assert!(r.devices["cuda:0"].peak_bytes < gpu.peak_bytes, "{mode} streams less than a whole component: {:?}", r.devices);
    }
    session.apply_plan(plan_b2).unwrap();
    let d = session.generate(&opts("d.png")).unwrap();
    assert_eq!(decode_png(&a.images[0]).0, decode_png(&d.images[0]).0);
}

/// Every file below `dir`.
pub fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = vec![];
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn simulated_gpus_without_a_host_entry_run_every_offload_mode() {
    // The offload issue's `--simulate "cuda:0=40MB,cuda:1=40MB"`, with `max_memory` listing only
    // those GPUs: the host takes part anyway (detected RAM), holding offloaded weights; every mode
    // runs and gives the image of no offload; `run --json`'s devices are `plan --json`'s.
    let dir = tempfile::tempdir().unwrap();
    let sim = "cuda:0=40MB,cuda:1=40MB";
    // manifests/tiny-sdxl.toml without its `cpu` budget.
    let text = std::fs::read_to_string(root().join("manifests/tiny-sdxl.toml")).unwrap().replace(", cpu = \"2GiB\"", "").replace("\"../", &format!("\"{}/", root().display()));
    assert!(!text.contains("cpu"), "{text}");
    let manifest = dir.path().join("gpus-only.toml");
    std::fs::write(&manifest, text).unwrap();
    let manifest = manifest.to_str().unwrap();
    let mut images = vec![];
    for offload in ["none", "model", "group", "sequential"] {
        let out = dir.path().join(format!("{offload}.png"));
        let set = format!("placement.offload={offload}");
        let (code, stdout, stderr) = run(runner().args(["run", manifest, "--quiet", "--json", "--simulate", sim, "--set", &set, "--out"]).arg(&out));
        assert_eq!(code, 0, "{offload}: {stderr}");
        let r: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        let (code, plan, stderr) = run(runner().args(["plan", manifest, "--json", "--devices", sim, "--set", &set]));
        assert_eq!(code, 0, "{stderr}");
        let plan: serde_json::Value = serde_json::from_str(&plan).unwrap();
        let host = &r["devices"]["cpu"];
        assert_eq!(host["source"], "detected", "{offload}: {r}");
        for (d, p) in plan["devices"].as_object().unwrap() {
            let u = &r["devices"][d];
            assert_eq!(
                (&u["budget_bytes"], &u["planned_bytes"], &u["planned_resident_bytes"], &u["free_bytes"], &u["source"]),
                (&p["budget"], &p["planned"], &p["resident"], &p["free"], &p["source"]),
                "{offload} {d}"
            );
            assert!(u["peak_bytes"].as_u64() <= u["budget_bytes"].as_u64(), "{offload} {d}: {u}");
        }
        if offload != "none" {
            assert!(host["peak_bytes"].as_u64().unwrap() > 0 && host["planned_resident_bytes"].as_u64().unwrap() > 0, "offloaded weights live on the host: {host}");
        }
        images.push(decode_png(&out).0);
    }
    assert!(images.windows(2).all(|w| w[0] == w[1]), "every offload mode gives the same image");
    // The offload issue's second example: one small GPU, `model` offload, no host entry.
    let (code, _, stderr) = run(runner()
        .args(["run", manifest, "--quiet", "--simulate", "cuda:0=8MB,cuda:1=8MB", "--set", "placement.max_memory={\"cuda:0\"=\"8MB\",\"cuda:1\"=\"8MB\"}", "--set", "placement.offload=model", "--out"])
        .arg(dir.path().join("8mb.png")));
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(decode_png(&dir.path().join("8mb.png")).0, images[0]);
}

#[test]
fn a_unet_that_fits_no_gpu_runs_with_each_overflow_policy() {
    // The tiny analogue of the seed's SD 1.5 on two 1 GB GPUs: each simulated GPU is below what
    // the UNet needs whole (73.28 MB with its working memory) but above its streaming floor.
    let dir = tempfile::tempdir().unwrap();
    let sim = "cuda:0=72.6MB,cuda:1=72.6MB";
    let budgets = "placement.max_memory={\"cuda:0\"=\"72.6MB\",\"cuda:1\"=\"72.6MB\"}";
    let go = |policy: &str| {
        let out = dir.path().join(format!("{policy}.png"));
        let set = format!("placement.overflow={policy}");
        let (code, stdout, stderr) = run(runner().args(["run", "manifests/tiny-sd15.toml", "--quiet", "--json", "--simulate", sim, "--set", budgets, "--set", &set, "--out"]).arg(&out));
        (code, serde_json::from_str::<serde_json::Value>(&stdout).unwrap_or_else(|e| panic!("{policy}: {e}: {stdout}\n{stderr}")), out, stderr)
    };
    let (code, r, stream_png, stderr) = go("stream");
    assert_eq!(code, 0, "{stderr}");
    assert!(r["device_map"]["unet"].as_str().unwrap().starts_with("cuda:"), "{r}");
    assert!(r["plan_notes"].to_string().contains("`unet` (73.28 MB) fits no GPU whole: streamed through"), "{r}");
    let (code, r, cpu_png, stderr) = go("cpu");
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(r["device_map"]["unet"], "cpu", "{r}");
    assert_eq!(decode_png(&stream_png).0, decode_png(&cpu_png).0);
    let (code, r, _, stderr) = go("error");
    assert_eq!(code, 1);
    assert!(stderr.contains("`placement.overflow = \"error\"` neither streams it through a GPU nor puts it on the CPU"), "{stderr}");
    assert_eq!(r["error"]["kind"], "plan", "{r}");
    assert!(r["error"]["options"].to_string().contains("placement.overflow = \\\"stream\\\""), "{r}");
    // The same job without simulated GPUs: the same image.
    let (code, _, stderr) = run(runner().args(["run", "manifests/tiny-sd15.toml", "--quiet", "--out"]).arg(dir.path().join("plain.png")));
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(decode_png(&stream_png).0, decode_png(&dir.path().join("plain.png")).0);
}

#[test]
fn run_json_failures_are_json_documents() {
    let doc = |args: &[&str]| {
        let (code, stdout, stderr) = run(runner().args(["run", "--json", "--quiet"]).args(args));
        assert_eq!(code, 1, "{args:?}: {stdout}");
        assert!(stderr.starts_with("error") || stderr.contains("\nerror"), "{stderr}");
        serde_json::from_str::<serde_json::Value>(&stdout).unwrap_or_else(|e| panic!("{args:?}: {e}: {stdout:?}"))["error"].clone()
    };
    let e = doc(&["manifests/tiny-sdxl.toml", "--simulate", "cuda:0="]);
    assert_eq!(e["kind"], "devices");
    assert!(e["message"].as_str().unwrap().contains("--simulate") && !e["message"].as_str().unwrap().contains("--devices"), "{e}");
    let e = doc(&["manifests/tiny-sdxl.toml", "--simulate", "cuda:0=40MB,cuda:1=40MB", "--set", "placement.max_memory.cpu=1MB", "--set", "placement.offload=model"]);
    assert_eq!(e["kind"], "plan", "{e}");
    assert!(!e["options"].as_array().unwrap().is_empty(), "{e}");
    assert_eq!(doc(&["tests/data/bad/enums.toml"])["kind"], "manifest");
    let e = doc(&["manifests/tiny-sd15.toml", "--set", "run.width=60"]);
    assert_eq!(e["diagnostics"][0]["message"], "`run.width` must be a multiple of 8, found 60", "{e}");
    let dir = tempfile::tempdir().unwrap();
    let m = manifest_for("sd15-euler", dir.path());
    let e = doc(&[m.to_str().unwrap(), "--set", &format!("pipeline.source={}", dir.path().join("nowhere").display())]);
    assert_eq!(e["kind"], "pipeline", "{e}");
}

#[test]
fn devices_and_fifos_are_written_in_place_never_replaced() {
    // `--out /dev/null` as root must not replace the device node: a FIFO stands in for it here.
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("image.png");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let reader = std::thread::spawn({
        let fifo = fifo.clone();
        move || std::fs::read(fifo).unwrap()
    });
    let (code, _, stderr) = run(runner().args(["run", "manifests/tiny-sd15.toml", "--quiet", "--set", "run.steps=1", "--out"]).arg(&fifo));
    assert_eq!(code, 0, "{stderr}");
    let bytes = reader.join().unwrap();
    assert_eq!(&bytes[1..4], b"PNG", "the image went through the FIFO");
    assert!(std::os::unix::fs::FileTypeExt::is_fifo(&std::fs::metadata(&fifo).unwrap().file_type()), "still a FIFO");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "no temp file beside it");
    // /dev/null is a character device: written in place (checked without writing to it).
    assert_eq!(runner::fsutil::check_destination(Path::new("/dev/null")), Ok(runner::fsutil::Destination::InPlace("/dev/null".into())));
}

#[test]
fn unwritable_outputs_fail_before_generating() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a-file");
    std::fs::write(&file, "x").unwrap();
    for (out, want) in [
        (dir.path().to_path_buf(), "is a folder, not a file"),
        (file.join("x.png"), "is not a folder"),
        (file.join("sub/x.png"), "is not a folder"),
        (dir.path().join("x.jpg"), "must be a `.png` file"),
    ] {
        let (code, _, stderr) = run(runner().args(["run", "manifests/tiny-sd15.toml", "--quiet", "--out"]).arg(&out));
        assert_eq!(code, 1, "{}: {stderr}", out.display());
        assert!(stderr.contains(want) && stderr.contains(&out.display().to_string()), "{}: {stderr}", out.display());
        assert!(!stderr.contains("os error 21"), "found before generating, not when writing: {stderr}");
    }
    assert_eq!(std::fs::read(&file).unwrap(), b"x");
}

#[test]
fn prompts_outside_latin1_are_stored_as_utf8() {
    // Text pasted from the web: a curly apostrophe, an em dash, CJK, an emoji.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("utf8.png");
    let prompt = "a cat’s portrait — 猫の肖像 🐱";
    let (code, _, stderr) = run(runner().args(["run", "manifests/tiny-sd15.toml", "--quiet", "--set", "run.steps=1", "--set"]).arg(format!("run.prompt={prompt}")).arg("--out").arg(&out));
    assert_eq!(code, 0, "{stderr}");
    let dec = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&out).unwrap()));
    let reader = dec.read_info().unwrap();
    let info = reader.info();
    let utf8: Vec<String> = info.utf8_text.iter().map(|t| t.get_text().unwrap()).collect();
    assert!(utf8.iter().any(|t| t.contains(prompt)), "{utf8:?}");
}

#[test]
fn png_metadata_makes_each_image_again() {
    let dir = tempfile::tempdir().unwrap();
    let meta = |path: &Path| -> (serde_json::Value, String) {
        let (_, text) = decode_png(path);
        let get = |k: &str| text.iter().find(|(kk, _)| kk == k).map(|(_, v)| v.clone()).unwrap_or_else(|| panic!("no {k} in {text:?}"));
        (serde_json::from_str(&get("runner")).unwrap(), get("parameters"))
    };
    // A batch: each image carries its place in it (one draw from one seed makes the batch).
    let out = dir.path().join("b.png");
    let (code, _, stderr) = run(runner().args(["run", "manifests/tiny-sd15.toml", "--quiet", "--set", "run.steps=1", "--set", "run.batch=2", "--set", "run.seed=7", "--locked", "--out"]).arg(&out));
    assert_eq!(code, 0, "{stderr}");
    let (m0, p0) = meta(&dir.path().join("b-0.png"));
    let (m1, p1) = meta(&dir.path().join("b-1.png"));
    assert_eq!((m0["seed"].as_u64(), m0["batch_index"].as_u64(), m1["batch_index"].as_u64(), m1["batch_size"].as_u64()), (Some(7), Some(0), Some(1), Some(2)));
    assert!(p1.ends_with(&format!("Seed: 7, Size: 64x64, Model: tiny-sd15, Batch size: 2, Batch pos: 1, Version: runner {}", env!("CARGO_PKG_VERSION"))), "{p1}");
    assert!(p0.contains("Batch pos: 0"), "{p0}");
    // Locked: the lock file's digest; the effective manifest's digest follows `--set`.
    let lock = runner::lock::sha256_file(&root().join("manifests/tiny-sd15.toml.lock")).unwrap().1;
    assert_eq!(m0["lock_sha256"], lock.as_str());
    let (code, _, stderr) = run(runner().args(["run", "manifests/tiny-sd15.toml", "--quiet", "--set", "run.steps=1", "--set", "run.seed=8", "--out"]).arg(dir.path().join("c.png")));
    assert_eq!(code, 0, "{stderr}");
    let (m2, _) = meta(&dir.path().join("c.png"));
    assert!(m2.get("lock_sha256").is_none());
    assert_ne!(m2["manifest_sha256"], m0["manifest_sha256"], "--set changes the effective manifest");
    // Latents instead of a seed: the file and its digest, no seed.
    let lat = dir.path().join("lat.safetensors");
    let t = tch::Tensor::zeros([1, 4, 8, 8], (tch::Kind::Float, tch::Device::Cpu));
    tch::Tensor::write_safetensors(&[("latents", &t)], &lat).unwrap();
    let (code, _, stderr) =
        run(runner().args(["run", "manifests/tiny-sd15.toml", "--quiet", "--set", "run.steps=1", "--set"]).arg(format!("run.latents={}", lat.display())).arg("--out").arg(dir.path().join("l.png")));
    assert_eq!(code, 0, "{stderr}");
    let (m3, p3) = meta(&dir.path().join("l.png"));
    assert!(m3["seed"].is_null() && m3["latents"][0] == "lat.safetensors" && m3["latents"][1].as_str().unwrap().len() == 64, "{m3}");
    assert!(p3.contains("Latents: lat.safetensors (sha256 ") && !p3.contains("Seed:"), "{p3}");
}

#[test]
fn huge_prompts_are_capped_in_logs_and_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let long = "a very long prompt about a cat ".repeat(3000); // 93 kB
    let m = dir.path().join("long.toml");
    let text = std::fs::read_to_string(root().join("manifests/tiny-sd15.toml"))
        .unwrap()
        .replace("\"../", &format!("\"{}/", root().display()))
        .replace("prompt = \"a photo of a cat\"", &format!("prompt = \"{long}\""));
    std::fs::write(&m, text).unwrap();
    let out = dir.path().join("long.png");
    let (code, _, stderr) = run(runner().arg("run").arg(&m).args(["--quiet", "--set", "run.steps=1", "--out"]).arg(&out));
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.len() < 2000, "the truncated part is not echoed whole: {} bytes", stderr.len());
    assert!(stderr.contains("more characters)"), "{stderr}");
    let (_, text) = decode_png(&out);
    let stored: usize = text.iter().map(|(_, v)| v.len()).sum();
    assert!(stored < 3 * runner::exec::png::MAX_STORED_CHARS + 2000, "{stored}");
    assert!(text.iter().any(|(k, v)| k == "parameters" && v.contains("characters in all; the text encoder saw only its first 77 tokens")));
}

#[test]
fn progress_without_a_terminal_is_one_log_line_per_step() {
    let dir = tempfile::tempdir().unwrap();
    let (code, _, stderr) = run(runner().args(["run", "manifests/tiny-sd15.toml", "--set", "run.steps=3", "--out"]).arg(dir.path().join("p.png")).env("RUST_LOG", "runner=info"));
    assert_eq!(code, 0, "{stderr}");
    for want in ["loaded text_encoder: ", "loaded unet: ", "step 1/4 (timestep", "step 4/4 (timestep", "decoding 1 image(s) of 64x64 with the VAE", "decoded in "] {
        assert!(stderr.contains(want), "{want}: {stderr}");
    }
    // Rates for people: "0.12 s/step" or "8.3 steps/s", never "10.3944/s".
    let step = stderr.lines().find(|l| l.contains("step 2/4")).unwrap();
    assert!(step.ends_with(" s/step") || step.ends_with(" steps/s"), "{step}");
    assert_eq!(runner::exec::human_rate(1.5), "1.50 s/step");
    assert_eq!(runner::exec::human_rate(0.1), "10.0 steps/s");
}

#[test]
fn sd3_runs_the_same_under_every_offload_mode_on_simulated_devices() {
    // The tiny SD3 pipeline (sharded T5, MMDiT) planned for two small simulated GPUs and run under
    // each offload mode: the same image as without offload, bit for bit; the ledger within the plan.
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("sd3.toml");
    std::fs::write(
        &m,
        format!(
            "schema_version = 1\nname = \"sd3\"\n[pipeline]\nkind = \"stable-diffusion-3\"\nsource = \"{}\"\ndtype = \"fp32\"\n[run]\nprompt = \"a cat\"\nsteps = 2\nwidth = 64\nheight = 48\nseed = 1\n",
            root().join("tests/fixtures/tiny-sd3").display()
        ),
    )
    .unwrap();
    let sim = "cuda:0=40MB,cuda:1=40MB,cpu=2GiB";
    let mut images = vec![];
    for mode in ["none", "model", "group", "sequential"] {
        let out = dir.path().join(format!("{mode}.png"));
        let (code, stdout, stderr) = run(runner().arg("run").arg(&m).args(["--quiet", "--json", "--simulate", sim, "--set", &format!("placement.offload={mode}"), "--out"]).arg(&out));
        assert_eq!(code, 0, "{mode}: {stderr}");
        let r: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        for (d, u) in r["devices"].as_object().unwrap() {
            assert!(u["peak_bytes"].as_u64() <= u["planned_peak_bytes"].as_u64(), "{mode} {d}: {u}");
        }
        images.push((mode, decode_png(&out).0));
    }
    for (mode, img) in &images[1..] {
        assert!(img == &images[0].1, "{mode} differs from no offload");
    }
}

#[test]
fn sd3_pngs_carry_the_t5_prompt_and_its_token_count() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("t5.png");
    let (code, _, stderr) = run(runner()
        .args(["run", "manifests/tiny-sd3.toml", "--quiet", "--simulate", "cuda:0=40MB,cpu=2GiB", "--set", "run.prompt_3=a cat, for T5", "--set", "run.max_sequence_length=32", "--out"])
        .arg(&out));
    assert_eq!(code, 0, "{stderr}");
    let (_, text) = decode_png(&out);
    let json: serde_json::Value = serde_json::from_str(&text.iter().find(|(k, _)| k == "runner").unwrap().1).unwrap();
    assert_eq!(json["prompt_3"], "a cat, for T5");
    assert_eq!(json["max_sequence_length"], 32);
}

/// A tiny FLUX manifest in `dir` (tiny-flux-dev: 2 double + 2 single blocks, T5 in 2 shards).
fn tiny_flux_manifest(dir: &Path, extra: &str) -> std::path::PathBuf {
    let m = dir.join("flux.toml");
    std::fs::write(
        &m,
        format!(
            "schema_version = 1\nname = \"flux\"\n[pipeline]\nkind = \"flux\"\nsource = \"{}\"\ndtype = \"fp32\"\n{extra}[run]\nprompt = \"a cat\"\nsteps = 2\nwidth = 64\nheight = 48\nseed = 1\nmax_sequence_length = 32\n",
            root().join("tests/fixtures/tiny-flux-dev").display()
        ),
    )
    .unwrap();
    m
}

#[test]
fn flux_runs_the_same_under_every_offload_mode_and_split_on_simulated_devices() {
    // The tiny FLUX.1-dev pipeline on two small simulated GPUs under each offload mode, and with
    // the transformer split across them by `auto`: the same image as without offload, bit for
    // bit; the ledger within the plan.
    let dir = tempfile::tempdir().unwrap();
    let m = tiny_flux_manifest(dir.path(), "");
    let sim = "cuda:0=40MB,cuda:1=40MB,cpu=2GiB";
    let go = |name: &str, sets: &[String]| {
        let out = dir.path().join(format!("{name}.png"));
        let sets: Vec<String> = sets.iter().flat_map(|s| ["--set".to_string(), s.clone()]).collect();
        let (code, stdout, stderr) = run(runner().arg("run").arg(&m).args(["--quiet", "--json", "--simulate", sim]).args(&sets).arg("--out").arg(&out));
        assert_eq!(code, 0, "{name}: {stderr}");
        let r: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        for (d, u) in r["devices"].as_object().unwrap() {
            assert!(u["peak_bytes"].as_u64() <= u["planned_peak_bytes"].as_u64(), "{name} {d}: {u}");
        }
        (decode_png(&out).0, r)
    };
    let (none, _) = go("none", &[]);
    for mode in ["model", "group", "sequential"] {
        let (img, r) = go(mode, &[format!("placement.offload={mode}")]);
        assert!(img == none, "{mode} differs from no offload");
        // Offloaded weights live in host memory: none stay resident on the GPUs.
        assert!(r["devices"].as_object().unwrap().iter().all(|(d, u)| d == "cpu" || u["planned_resident_bytes"] == 0), "{mode}: {r}");
    }
    // The transformer split: budgets from the plan so that neither GPU holds it whole.
    let (code, stdout, stderr) = run(runner().args(["plan", "--json", "--devices", sim]).arg(&m));
    assert_eq!(code, 0, "{stderr}");
    let p: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let c = |n: &str, k: &str| p["components"][n][k].as_u64().unwrap();
    let (tr, work) = (c("transformer", "bytes"), c("transformer", "working_bytes"));
    // cuda:0 takes the text encoders and half the transformer, cuda:1 the rest, cuda:2 the VAE.
    let encoders = c("text_encoder", "bytes") + c("text_encoder_2", "bytes") + c("text_encoder", "working_bytes").max(c("text_encoder_2", "working_bytes"));
    let budgets = format!("placement.max_memory={{\"cuda:0\"={},\"cuda:1\"={},\"cuda:2\"={},cpu=\"2GiB\"}}", encoders + work + tr / 2, work + tr * 3 / 4, c("vae", "peak_bytes") + 1000);
    let sim3 = "cuda:0=40MB,cuda:1=40MB,cuda:2=40MB,cpu=2GiB";
    let (code, stdout, stderr) = run(runner().args(["plan", "--json", "--devices", sim3, "--set", &budgets, "--set", "placement.strategy=auto", "--set", "components.vae.device=cuda:2"]).arg(&m));
    assert_eq!(code, 0, "{stderr}");
    let sp: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let parts = sp["components"]["transformer"]["split"].as_object().unwrap_or_else(|| panic!("the transformer is split: {sp}"));
    assert!(parts.values().any(|d| d == "cuda:0") && parts.values().any(|d| d == "cuda:1"), "{parts:?}");
    let out = dir.path().join("split.png");
    let (code, stdout, stderr) = run(runner()
        .arg("run")
        .arg(&m)
        .args(["--quiet", "--json", "--simulate", sim3, "--set", &budgets, "--set", "placement.strategy=auto", "--set", "components.vae.device=cuda:2", "--out"])
        .arg(&out));
    assert_eq!(code, 0, "{stderr}");
    let r: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    for (d, u) in r["devices"].as_object().unwrap() {
        assert!(u["peak_bytes"].as_u64() <= u["planned_peak_bytes"].as_u64(), "split {d}: {u}");
    }
    assert!(decode_png(&out).0 == none, "the split transformer's image differs");
}

#[test]
fn flux_pngs_carry_prompt_2_true_cfg_and_the_t5_token_count() {
    let dir = tempfile::tempdir().unwrap();
    let m = tiny_flux_manifest(dir.path(), "");
    let out = dir.path().join("t.png");
    let (code, stdout, stderr) = run(runner()
        .arg("run")
        .arg(&m)
        .args(["--quiet", "--json", "--set", "run.prompt_2=a cat, for T5", "--set", "run.negative_prompt=blurry", "--set", "run.true_cfg_scale=2.0", "--out"])
        .arg(&out));
    assert_eq!(code, 0, "{stderr}");
    let r: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    // True CFG: two transformer passes per step.
    assert_eq!(r["unet_calls"], 4, "{r}");
    let (_, text) = decode_png(&out);
    let json: serde_json::Value = serde_json::from_str(&text.iter().find(|(k, _)| k == "runner").unwrap().1).unwrap();
    assert_eq!((json["prompt_2"].as_str(), json["true_cfg_scale"].as_f64(), json["max_sequence_length"].as_u64()), (Some("a cat, for T5"), Some(2.0), Some(32)));
}

#[test]
fn flux_schnell_warns_that_guidance_scale_is_ignored_and_runs() {
    // FLUX.1-schnell has no guidance embedding: `guidance_scale` is ignored with a warning (as
    // diffusers ignores it), and true CFG without a negative prompt is one pass (warned).
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("s.png");
    let (code, stdout, stderr) = run(runner()
        .args([
            "run",
            "manifests/tiny-flux-schnell.toml",
            "--quiet",
            "--json",
            "--simulate",
            "cuda:0=40MB,cpu=2GiB",
            "--set",
            "run.guidance_scale=5.0",
            "--set",
            "run.true_cfg_scale=3.0",
            "--set",
            "run.steps=2",
            "--out",
        ])
        .arg(&out));
    assert_eq!(code, 0, "{stderr}");
    let r: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let w = r["warnings"].to_string() + &stderr;
    assert!(w.contains("has no guidance embedding") && w.contains("it is ignored"), "{w}");
    assert!(w.contains("there is no `run.negative_prompt`: true CFG is off"), "{w}");
    assert_eq!(r["unet_calls"], 2, "one pass per step: {r}");
}

#[test]
fn a_loaded_flux_pipeline_moves_to_a_new_plan() {
    // Session::apply_plan for FLUX: loaded whole on a simulated GPU, then re-planned with the
    // transformer and T5 streamed by `group` offload: the same image, a lower GPU peak.
    use runner::plan::build::BuildOptions;
    use runner::plan::inventory::Inventory;
    let dir = tempfile::tempdir().unwrap();
    let (d1, d2) = (dir.path().join("whole"), dir.path().join("group"));
    std::fs::create_dir_all(&d1).unwrap();
    std::fs::create_dir_all(&d2).unwrap();
    let budgets = "[placement]\nmax_memory = { \"cuda:0\" = \"40MB\", cpu = \"2GiB\" }\n";
    let whole = runner::manifest::load(&tiny_flux_manifest(&d1, budgets), &Default::default()).unwrap();
    let group = runner::manifest::load(&tiny_flux_manifest(&d2, &format!("{budgets}offload = \"group\"\n")), &Default::default()).unwrap();
    let build = || BuildOptions { devices: Some(Inventory::parse_spec("cuda:0=40MB,cpu=2GiB").unwrap()), weights_only: false };
    let opts = |out: &str| runner::exec::RunOptions { out: Some(dir.path().join(out)), plan: build(), simulate: true, ..Default::default() };
    let plan_group = runner::plan::plan(&preflighted_input(&group, &build(), &build())).unwrap();
    assert!(plan_group.components.iter().any(|c| c.name == "transformer" && c.offload == runner::manifest::Offload::Group));
    let mut session = runner::exec::load(&whole, &opts("a.png")).unwrap();
    let a = session.generate(&opts("a.png")).unwrap();
    session.apply_plan(plan_group).unwrap();
    let b = session.generate(&opts("b.png")).unwrap();
    assert_eq!(decode_png(&a.images[0]).0, decode_png(&b.images[0]).0);
    assert!(b.devices["cuda:0"].peak_bytes < a.devices["cuda:0"].peak_bytes, "{:?} vs {:?}", b.devices, a.devices);
}

/// `runner run --json` and `runner plan --json` of tiny-sdxl on two simulated 40 MB GPUs with
/// `sets`; the image's pixels.
fn run_and_plan(dir: &Path, tag: &str, sim: &str, sets: &[String]) -> (Vec<u8>, serde_json::Value, serde_json::Value) {
    let manifest = "manifests/tiny-sdxl.toml";
    let out = dir.join(format!("{tag}.png"));
    let sets: Vec<String> = sets.iter().flat_map(|s| ["--set".to_string(), s.clone()]).collect();
    let (code, stdout, stderr) = run(runner().args(["run", manifest, "--quiet", "--json", "--simulate", sim]).args(&sets).arg("--out").arg(&out));
    assert_eq!(code, 0, "{tag}: {stderr}");
    let (code, plan, stderr) = run(runner().args(["plan", manifest, "--json", "--devices", sim]).args(&sets));
    assert_eq!(code, 0, "{tag}: {stderr}");
    (decode_png(&out).0, serde_json::from_str(&stdout).unwrap(), serde_json::from_str(&plan).unwrap())
}

#[test]
fn disk_offload_gives_the_same_image_with_host_residency_within_the_plan() {
    // Each offload mode with `offload_target = "disk"` against `"host"`: the same image, and the
    // host holds no copy of the offloaded weights (the ledger's `cpu` peak is 0, as planned); the
    // bf16 VAE, converted from the fp32 checkpoint, goes to a scratch file that is gone at exit.
    let dir = tempfile::tempdir().unwrap();
    let scratch = dir.path().join("scratch");
    let sim = "cuda:0=40MB,cuda:1=40MB,cpu=2GiB";
    for mode in ["model", "sequential", "group"] {
        let go = |target: &str| {
            let sets = [
                format!("placement.offload={mode}"),
                format!("placement.offload_target={target}"),
                "components.vae.dtype=bf16".to_string(),
                format!("placement.scratch_dir=\"{}\"", scratch.display()),
            ];
            run_and_plan(dir.path(), &format!("{mode}-{target}"), sim, &sets)
        };
        let (host_image, host_r, host_plan) = go("host");
        let (disk_image, r, plan) = go("disk");
        assert!(disk_image == host_image, "{mode}: disk offload changes the image");
        // Host residency: measured within the plan, every offloaded weight counted with `host`.
        for (rep, p) in [(&host_r, &host_plan), (&r, &plan)] {
            let cpu = &rep["devices"]["cpu"];
            assert!(cpu["peak_bytes"].as_u64().unwrap() <= cpu["planned_resident_bytes"].as_u64().unwrap(), "{mode}: {cpu}");
            assert_eq!(cpu["planned_resident_bytes"], p["devices"]["cpu"]["resident"], "{mode}");
            for (d, u) in rep["devices"].as_object().unwrap() {
                assert!(u["peak_bytes"].as_u64().unwrap() <= u["planned_peak_bytes"].as_u64().unwrap(), "{mode} {d}: {u}");
            }
        }
        assert!(host_r["devices"]["cpu"]["peak_bytes"].as_u64().unwrap() > 1_000_000, "{mode}: host offload keeps host copies");
        assert_eq!(r["devices"]["cpu"]["peak_bytes"], 0, "{mode}: no host copy with disk offload: {}", r["devices"]);
        assert_eq!(plan["devices"]["cpu"]["resident"], 0, "{mode}");
        assert_eq!(plan["host_offload_bytes"], 0, "{mode}");
        let weights: u64 = plan["components"].as_object().unwrap().values().map(|c| c["bytes"].as_u64().unwrap()).sum();
        assert_eq!(plan["disk_offload_bytes"], weights, "{mode}");
        assert_eq!(host_plan["host_offload_bytes"], weights, "{mode}");
        for (name, c) in plan["components"].as_object().unwrap() {
            assert_eq!(c["offload_target"], "disk", "{mode} {name}");
            assert_eq!(c["host_bytes"], 0, "{mode} {name}");
        }
        assert!(plan["components"]["vae"]["scratch_bytes"].as_u64().unwrap() > 0, "{mode}: the bf16 VAE is converted");
        assert!(plan["notes"].to_string().contains("`unet` is offloaded to disk: its weights"), "{}", plan["notes"]);
        let h = &r["host"];
        assert_eq!(h["loaded_bytes"], 0, "{mode}: {h}");
        assert!(h["disk_backed_bytes"].as_u64().unwrap() > 0 && h["scratch_bytes"].as_u64().unwrap() > 0, "{mode}: {h}");
        assert_eq!(host_r["host"]["scratch_bytes"], 0, "{mode}");
        assert_eq!(std::fs::read_dir(&scratch).unwrap().count(), 0, "{mode}: the scratch file is removed at exit");
    }
}

#[test]
fn the_host_budget_is_enforced_under_simulate_with_the_options_that_fit() {
    let dir = tempfile::tempdir().unwrap();
    let budgets = "placement.max_memory={\"cuda:0\"=\"40MB\",\"cuda:1\"=\"40MB\",cpu=\"2MB\"}";
    let sim = "cuda:0=40MB,cuda:1=40MB,cpu=2MB";
    let out = dir.path().join("out.png");
    let (code, _, stderr) = run(runner().args(["run", "manifests/tiny-sdxl.toml", "--quiet", "--simulate", sim, "--set", "placement.offload=model", "--set", budgets]).arg("--out").arg(&out));
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("its offloaded weights") && stderr.contains("live in host memory"), "{stderr}");
    assert!(stderr.contains("options that would fit:") && stderr.contains("placement.offload_target = \"disk\""), "{stderr}");
    assert!(!out.exists(), "nothing loaded or written");
    // The option that fits runs, with no host copy.
    let sets = ["placement.offload=model".to_string(), budgets.to_string(), "placement.offload_target=disk".to_string()];
    let (_, r, _) = run_and_plan(dir.path(), "disk", sim, &sets);
    assert_eq!(r["devices"]["cpu"]["peak_bytes"], 0, "{}", r["devices"]);
}

#[test]
fn an_unwritable_scratch_folder_fails_before_loading() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a-file");
    std::fs::write(&file, "x").unwrap();
    let out = dir.path().join("out.png");
    let scratch = format!("placement.scratch_dir=\"{}\"", file.join("scratch").display());
    let (code, _, stderr) = run(runner()
        .args(["run", "manifests/tiny-sdxl.toml", "--simulate", "cuda:0=40MB,cuda:1=40MB,cpu=2GiB", "--set", "placement.offload=group", "--set", "placement.offload_target=disk", "--set", &scratch])
        .arg("--out")
        .arg(&out));
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("cannot write into the scratch folder") && stderr.contains("a-file"), "{stderr}");
    assert!(!stderr.contains("loaded "), "nothing loaded: {stderr}");
    assert!(!out.exists());
}

#[test]
fn group_blocks_two_gives_the_same_image_with_the_planned_peaks() {
    // `group_blocks = 2`: units of two consecutive blocks (diffusers' `num_blocks_per_group`);
    // the plan streams twice the largest such unit and the measured peak stays within it, above
    // what one block per group measures.
    let dir = tempfile::tempdir().unwrap();
    let sim = "cuda:0=40MB,cuda:1=40MB,cpu=2GiB";
    let sizes = leaves_and_groups(&root().join("manifests/tiny-sdxl.toml"));
    let go = |n: u32| run_and_plan(dir.path(), &format!("group-{n}"), sim, &["placement.offload=group".to_string(), format!("placement.group_blocks={n}")]);
    let (one_image, one, one_plan) = go(1);
    let (image, r, plan) = go(2);
    assert!(image == one_image, "group_blocks changes the image");
    let unet = &plan["components"]["unet"];
    assert_eq!(unet["group_blocks"], 2);
    let mut merged: std::collections::BTreeMap<String, u64> = Default::default();
    for (g, b) in &sizes["unet"].1 {
        *merged.entry(runner::plan::modules::block_chunk(g, 2)).or_default() += b;
    }
    let largest = *merged.values().max().unwrap();
    assert_eq!(unet["streamed_bytes"].as_u64().unwrap(), (2 * largest).min(unet["bytes"].as_u64().unwrap()));
    assert!(unet["streamed_bytes"].as_u64().unwrap() > one_plan["components"]["unet"]["streamed_bytes"].as_u64().unwrap());
    let d = unet["device"].as_str().unwrap();
    let (peak, planned) = (r["devices"][d]["peak_bytes"].as_u64().unwrap(), r["devices"][d]["planned_peak_bytes"].as_u64().unwrap());
    assert!(peak <= planned && peak > largest, "{d}: largest unit {largest}: {}", r["devices"][d]);
    assert!(peak > one["devices"][d]["peak_bytes"].as_u64().unwrap(), "two blocks per group hold more than one");
    let (code, table, stderr) =
        run(runner().args(["plan", "manifests/tiny-sdxl.toml", "--devices", sim, "--set", "placement.offload=group", "--set", "placement.group_blocks=2", "--set", "placement.offload_target=disk"]));
    assert_eq!(code, 0, "{stderr}");
    assert!(table.contains("group x2, disk") && table.contains("offloaded weights served from disk:"), "{table}");
}

/// Cancels before step `at`, counting the steps it is told of.
struct CancelAt {
    at: usize,
    seen: std::sync::Mutex<Vec<(usize, usize)>>,
}

impl runner::exec::StepWatch for CancelAt {
    fn cancelled(&self, i: usize, _n: usize) -> Option<String> {
        (i == self.at).then(|| "test".to_string())
    }
    fn stepped(&self, i: usize, n: usize, seconds: f64) {
        assert!(seconds >= 0.0);
        self.seen.lock().unwrap().push((i, n));
    }
}

#[test]
fn a_cancelled_run_leaves_the_session_as_a_finished_one_does() {
    // `runner serve` cancels jobs between steps: with `model` offload the UNet is on its GPU
    // when the cancel comes; the next run must start from host memory again (the ledger's peak
    // equal to an uncancelled run's) and give the same image, and nothing is written.
    use runner::plan::build::BuildOptions;
    use runner::plan::inventory::Inventory;
    let dir = tempfile::tempdir().unwrap();
    let budgets = "[placement]\nmax_memory = { \"cuda:0\" = \"40MB\", cpu = \"2GiB\" }\noffload = \"model\"\n";
    let m = runner::manifest::load(&tiny_flux_manifest(dir.path(), budgets), &Default::default()).unwrap();
    let build = || BuildOptions { devices: Some(Inventory::parse_spec("cuda:0=40MB,cpu=2GiB").unwrap()), weights_only: false };
    let opts = |out: &str| runner::exec::RunOptions { out: Some(dir.path().join(out)), plan: build(), simulate: true, ..Default::default() };
    let mut session = runner::exec::load(&m, &opts("a.png")).unwrap();
    let a = session.generate(&opts("a.png")).unwrap();
    for at in [1, 2] {
        let watch = std::sync::Arc::new(CancelAt { at, seen: Default::default() });
        let cancelled = runner::exec::RunOptions { watch: Some(runner::exec::Watch(watch.clone())), ..opts("c.png") };
        match session.generate(&cancelled) {
            Err(runner::exec::ExecError::Cancelled { done, steps, reason }) => assert_eq!((done, steps, reason.as_str()), (at, 2, "test")),
            other => panic!("not cancelled: {other:?}"),
        }
        assert_eq!(*watch.seen.lock().unwrap(), (0..at).map(|i| (i, 2)).collect::<Vec<_>>());
        assert!(!dir.path().join("c.png").exists(), "a cancelled run writes nothing");
    }
    let b = session.generate(&opts("b.png")).unwrap();
    assert_eq!(decode_png(&a.images[0]).0, decode_png(&b.images[0]).0);
    assert_eq!(a.devices["cuda:0"].peak_bytes, b.devices["cuda:0"].peak_bytes, "{:?} vs {:?}", a.devices, b.devices);
}

/// Two images' 8-bit values: how many differ, and by at most how much.
fn png_difference(a: &[u8], b: &[u8]) -> (f64, f64) {
    assert_eq!(a.len(), b.len(), "image sizes differ");
    a.iter().zip(b).fold((0.0, 0.0), |(n, m), (x, y)| if x == y { (n, m) } else { (n + 1.0, f64::max(m, x.abs_diff(*y) as f64)) })
}

/// `runner run` of tiny-sdxl with every component offloaded to disk and the VAE converted to bf16
/// (so it gets a scratch file) in `scratch`; (exit code, stderr).
fn disk_offload_run(dir: &Path, scratch: &Path) -> (i32, String) {
    let out = dir.join("out.png");
    let sets =
        ["placement.offload=model".to_string(), "placement.offload_target=disk".to_string(), "components.vae.dtype=bf16".to_string(), format!("placement.scratch_dir=\"{}\"", scratch.display())];
    let sets: Vec<String> = sets.iter().flat_map(|s| ["--set".to_string(), s.clone()]).collect();
    let (code, _, stderr) = run(runner().args(["run", "manifests/tiny-sdxl.toml", "--quiet", "--simulate", "cuda:0=40MB,cuda:1=40MB,cpu=2GiB"]).args(&sets).arg("--out").arg(&out));
    (code, stderr)
}

/// Issue 24 item 3: a scratch file system without room is an error naming the folder and the
/// bytes, not a SIGBUS (a 16 KiB tmpfs; needs root to mount it, skipped otherwise).
#[test]
fn a_full_scratch_file_system_is_an_error_not_a_sigbus() {
    let dir = tempfile::tempdir().unwrap();
    let scratch = dir.path().join("small");
    std::fs::create_dir(&scratch).unwrap();
    let mounted = unsafe { libc::geteuid() } == 0 && std::process::Command::new("mount").args(["-t", "tmpfs", "-o", "size=16k", "tmpfs"]).arg(&scratch).status().is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("skipped: mounting a small tmpfs needs root");
        return;
    }
    let (code, stderr) = disk_offload_run(dir.path(), &scratch);
    let listing: Vec<_> = std::fs::read_dir(&scratch).unwrap().map(|e| e.unwrap().file_name()).collect();
    let _ = std::process::Command::new("umount").arg(&scratch).status();
    assert_eq!(code, 1, "exit 1, not a signal: {stderr}");
    assert!(stderr.contains("no room in the scratch folder") && stderr.contains(&scratch.display().to_string()) && stderr.contains("bytes needed"), "{stderr}");
    assert!(listing.is_empty(), "no scratch file left: {listing:?}");
    assert!(!dir.path().join("out.png").exists());
}

/// Issue 24 items 8 and 9: the scratch files of killed runs go at the next run's check (a dead
/// PID's, whatever its token), a live process's stay; the probe cannot be redirected through a
/// symlink planted in the shared folder.
#[test]
fn scratch_files_of_killed_runs_are_removed_and_probes_follow_no_symlink() {
    let dir = tempfile::tempdir().unwrap();
    let scratch = dir.path().join("scratch");
    std::fs::create_dir(&scratch).unwrap();
    let dead = scratch.join("runner-scratch-4000000-00000000deadbeef-vae.bin");
    let live = scratch.join("runner-scratch-1-00000000cafef00d-vae.bin"); // PID 1 is alive
    let other = scratch.join("notes.txt");
    for f in [&dead, &live, &other] {
        std::fs::write(f, b"x").unwrap();
    }
    let (code, stderr) = disk_offload_run(dir.path(), &scratch);
    assert_eq!(code, 0, "{stderr}");
    assert!(!dead.exists(), "a dead run's scratch file is removed");
    assert!(live.exists() && other.exists(), "a live process's and other files stay");
}

/// Issue 24 item 9: `--dump`'s writability probe used a fixed name and followed symlinks: one
/// planted there truncated its target. Now nothing outside the folder is touched.
#[test]
fn the_dump_folder_probe_follows_no_symlink() {
    let dir = tempfile::tempdir().unwrap();
    let m = manifest_for("sd15-euler", dir.path());
    let victim = dir.path().join("victim.txt");
    std::fs::write(&victim, b"precious").unwrap();
    let dump = dir.path().join("dump");
    std::fs::create_dir(&dump).unwrap();
    std::os::unix::fs::symlink(&victim, dump.join(".runner-write-test")).unwrap();
    let (code, _, stderr) = run(runner().arg("run").arg(&m).args(["--quiet", "--set", "run.steps=1", "--dump"]).arg(&dump));
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious", "the symlink's target is untouched");
}

/// Issue 24 item 12: a prompt with U+0000 went raw into the tEXt `parameters` chunk (the PNG
/// specification forbids NUL there; readers lose what follows). It is written as `\0`; the JSON
/// chunk keeps the exact prompt.
#[test]
fn a_nul_in_the_prompt_never_reaches_a_text_chunk_raw() {
    let dir = tempfile::tempdir().unwrap();
    let m = manifest_for("sd15-euler", dir.path());
    let (code, _, stderr) = run(runner().arg("run").arg(&m).args(["--quiet", "--set", "run.steps=1", "--set", r#"run.prompt="a\u0000cat""#]));
    assert_eq!(code, 0, "{stderr}");
    let bytes = std::fs::read(dir.path().join("out.png")).unwrap();
    let (_, text) = decode_png(&dir.path().join("out.png"));
    let get = |k: &str| text.iter().find(|(kk, _)| kk == k).map(|(_, v)| v.clone()).unwrap();
    assert!(get("parameters").starts_with("a\\0cat\n"), "{:?}", get("parameters"));
    let meta: serde_json::Value = serde_json::from_str(&get("runner")).unwrap();
    assert_eq!(meta["prompt"], "a\u{0}cat");
    // No chunk's text holds a NUL byte: the keyword's terminator is the only one in tEXt.
    let mut at = 8;
    while at + 8 <= bytes.len() {
        let len = u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        let (kind, data) = (&bytes[at + 4..at + 8], &bytes[at + 8..at + 8 + len]);
        if kind == b"tEXt" {
            assert_eq!(data.iter().filter(|&&b| b == 0).count(), 1, "{}", String::from_utf8_lossy(data));
        }
        at += 12 + len;
    }
}

/// Issue 24 item 7: `--out` through a symlink (or a hard link) to the pipeline's own weights
/// replaced the weights with the PNG, exit 0. Outputs never replace a file the run reads.
#[test]
fn an_output_never_replaces_an_input_whatever_path_leads_there() {
    let dir = tempfile::tempdir().unwrap();
    let pipe = dir.path().join("tiny-sd15");
    crate::lock::copy_dir(&root().join("tests/fixtures/tiny-sd15"), &pipe);
    let m = dir.path().join("m.toml");
    let text = std::fs::read_to_string(root().join("manifests/tiny-sd15.toml")).unwrap();
    std::fs::write(&m, text.replace("../tests/fixtures/tiny-sd15", pipe.to_str().unwrap())).unwrap();
    let weights = pipe.join("unet/diffusion_pytorch_model.safetensors");
    let before = std::fs::read(&weights).unwrap();
    let link = dir.path().join("out.png");
    std::os::unix::fs::symlink(&weights, &link).unwrap();
    let hard = dir.path().join("hard.png");
    std::fs::hard_link(pipe.join("vae/diffusion_pytorch_model.safetensors"), &hard).unwrap();
    for (out, what) in [(&link, "unet/diffusion_pytorch_model.safetensors"), (&hard, "vae/diffusion_pytorch_model.safetensors"), (&m, "m.toml")] {
        let (code, _, stderr) = run(runner().arg("run").arg(&m).args(["--quiet", "--set", "run.steps=1"]).arg("--out").arg(out));
        assert_eq!(code, 1, "{}: {stderr}", out.display());
        assert!(stderr.contains("a file this run reads") && stderr.contains(what), "{stderr}");
    }
    assert_eq!(std::fs::read(&weights).unwrap(), before, "the weights are untouched");
    assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
}

/// Issue 24 item 16: `plan --json`'s `scratch_bytes` disagreed with what the run writes under
/// `storage_dtype` + disk offload (plan 0 vs run 278,720): they are now the same bytes, cast
/// layers at their storage dtype, every tensor 64-byte aligned as the scratch file lays it out.
#[test]
fn the_plan_counts_the_scratch_bytes_the_run_writes() {
    let dir = tempfile::tempdir().unwrap();
    let scratch = dir.path().join("scratch");
    let sim = "cuda:0=40MB,cuda:1=40MB,cpu=2GiB";
    for (tag, extra) in
        [("fp8-unet", vec!["components.unet.storage_dtype=fp8-e4m3"]), ("fp8-bf16", vec!["components.unet.storage_dtype=fp8-e4m3", "components.unet.dtype=bf16", "components.vae.dtype=bf16"])]
    {
        let mut sets = vec!["placement.offload=model".to_string(), "placement.offload_target=disk".to_string(), format!("placement.scratch_dir=\"{}\"", scratch.display())];
        sets.extend(extra.iter().map(|s| s.to_string()));
        let (_, r, plan) = run_and_plan(dir.path(), tag, sim, &sets);
        let ran = r["host"]["scratch_bytes"].as_u64().unwrap();
        assert!(ran > 0, "{tag}: converted weights go to scratch");
        assert_eq!(plan["scratch_bytes"].as_u64().unwrap(), ran, "{tag}: plan vs run");
    }
}
