//! Layerwise casting (`components.X.storage_dtype`, diffusers' `enable_layerwise_casting`) end to
//! end: parity with diffusers' layerwise-cast pipelines (tools/make_references_cast.py), the same
//! image under `group` offload and a split, the plan's smaller weights, bad input, and fp8
//! checkpoints (`F8_E4M3` safetensors) loading and shown by `runner inspect`.

use std::path::{Path, PathBuf};

use tch::Kind;

use crate::pipeline::manifest_for;
use crate::unet::{refs, refs_at, rel};
use crate::util::{root, run, runner};

/// `storage_dtype` lines for `components`.
fn cast_lines(storage: &[(&str, &str)]) -> String {
    storage.iter().map(|(c, s)| format!("[components.{c}]\nstorage_dtype = \"{s}\"\n")).collect()
}

/// Runs `manifest` (with `args`) dumping its tensors; the dump.
fn run_dump(manifest: &Path, args: &[&str]) -> runner::checkpoint::load::TensorStore {
    let dump = manifest.with_extension("dump");
    let (code, _, stderr) = run(runner().current_dir(manifest.parent().unwrap()).arg("run").arg(manifest).args(["--quiet", "--dump"]).arg(&dump).args(args));
    assert_eq!(code, 0, "{}: {stderr}", manifest.display());
    refs_at(&dump.join("dump.safetensors"))
}

/// The reference case's manifest in `dir` with `extra` appended, as `name`.toml.
fn manifest_with(case: &str, dir: &Path, name: &str, extra: &str) -> PathBuf {
    let p = manifest_for(case, dir);
    let text = std::fs::read_to_string(&p).unwrap() + extra;
    let out = dir.join(format!("{name}.toml"));
    std::fs::write(&out, text.replace("output = \"out.png\"", &format!("output = \"{name}.png\""))).unwrap();
    out
}

fn storage_of(case: &str) -> Vec<(String, String)> {
    let m: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(crate::util::refs_path(&format!("{case}.json"))).unwrap()).unwrap();
    m["storage_dtype"].as_object().unwrap().iter().map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string())).collect()
}

fn check_parity(case: &str) {
    let dir = tempfile::tempdir().unwrap();
    let storage = storage_of(case);
    let lines = cast_lines(&storage.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect::<Vec<_>>());
    let got = run_dump(&manifest_with(case, dir.path(), "cast", &lines), &[]);
    let want = refs(case);
    let (a, b) = (got.get("image").unwrap(), want.get("image").unwrap());
    let d = (a - b).abs().max().double_value(&[]);
    let base = refs(case.strip_prefix("cast-").unwrap());
    let uncast = (base.get("image").unwrap() - b).abs().max().double_value(&[]);
    // SD: what the VAE decodes is runner's final latents / scaling_factor (FLUX's are unpacked
    // too: the image alone is compared there).
    let v = want.get("vae.input").unwrap();
    let lat = case.contains("sd15").then(|| rel(&(got.get("latents.final").unwrap() / 0.18215).reshape(v.size()), v));
    if let Some(l) = lat {
        runner::parity::check(&format!("{case}: vae input"), l, runner::parity::CAST_LATENTS);
    }
    runner::parity::check(&format!("{case}: image"), d, runner::parity::CAST_IMAGE);
    // Casting moves the image far more than the bound: the check would see a cast not applied.
    assert!(uncast > 100.0 * runner::parity::CAST_IMAGE.value, "{case}: casting must change the image more than runner may differ from diffusers ({uncast})");
}

#[test]
fn sd15_layerwise_cast_equals_diffusers() {
    check_parity("cast-sd15-euler");
}

#[test]
fn flux_layerwise_cast_equals_diffusers() {
    check_parity("cast-flux-dev");
}

/// The tiny SD 1.5 manifest (no safety checker), its UNet cast, with `placement` lines.
fn sd15(dir: &Path, name: &str, placement: &str, storage: bool) -> PathBuf {
    let p = dir.join(format!("{name}.toml"));
    let cast = if storage { cast_lines(&[("unet", "fp8-e4m3")]) } else { String::new() };
    std::fs::write(
        &p,
        format!(
            "schema_version = 1\nname = \"cast\"\n[pipeline]\nkind = \"stable-diffusion\"\nsource = \"{}\"\n[components.safety_checker]\nenabled = false\n{cast}[placement]\n{placement}\n[run]\nprompt = \"a photo of a cat\"\nnegative_prompt = \"blurry\"\nsteps = 3\nseed = 0\nwidth = 64\nheight = 64\nthreads = 1\noutput = \"{name}.png\"\n",
            root().join("tests/fixtures/tiny-sd15").display()
        ),
    )
    .unwrap();
    p
}

fn plan_json(m: &Path, args: &[&str]) -> serde_json::Value {
    let (code, stdout, stderr) = run(runner().args(["plan", "--json"]).arg(m).args(args));
    assert_eq!(code, 0, "{stderr}");
    serde_json::from_str(&stdout).unwrap()
}

#[test]
fn cast_with_group_offload_and_a_split_gives_the_same_image_and_the_plan_counts_storage_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let big = "strategy = \"auto\"\nmax_memory = { \"cuda:0\" = \"1GiB\", \"cuda:1\" = \"1GiB\", \"cuda:2\" = \"1GiB\" }";
    let plain = sd15(dir.path(), "plain", big, false);
    let whole = sd15(dir.path(), "whole", big, true);
    // The plan: the cast UNet's weights at about a quarter (fp8 layers, fp32 norms), plus the
    // compute copy of its largest layer in its working memory.
    let (p0, p1) = (plan_json(&plain, &[]), plan_json(&whole, &[]));
    let b = |p: &serde_json::Value, k: &str| p["components"]["unet"][k].as_u64().unwrap();
    let (full, cast) = (b(&p0, "bytes"), b(&p1, "bytes"));
    eprintln!("tiny-sd15 unet weights: {full} B fp32, {cast} B with fp8-e4m3 storage");
    assert!(cast < full / 3 && cast > full / 4, "{cast} vs {full}");
    assert!(b(&p1, "working_bytes") > b(&p0, "working_bytes"), "the compute copy counts as working memory");
    let sim = "cuda:0=1GB,cuda:1=1GB,cuda:2=1GB";
    let want = run_dump(&whole, &["--simulate", sim]).get("image").unwrap().copy();
    // `group` offload of the cast UNet.
    let group = run_dump(&whole, &["--simulate", sim, "--set", "components.unet.offload=group"]);
    assert!(group.get("image").unwrap().equal(&want), "group offload changes the cast image");
    let seq = run_dump(&whole, &["--simulate", sim, "--set", "components.unet.offload=sequential"]);
    assert!(seq.get("image").unwrap().equal(&want), "sequential offload changes the cast image");
    // A split: the UNet over two devices sized from the cast plan.
    let c = |n: &str, k: &str| p1["components"][n][k].as_u64().unwrap();
    let (te, work, vae) = (c("text_encoder", "peak_bytes"), c("unet", "working_bytes"), c("vae", "peak_bytes"));
    let split =
        sd15(dir.path(), "split", &format!("strategy = \"auto\"\nmax_memory = {{ \"cuda:0\" = {}, \"cuda:1\" = {}, \"cuda:2\" = {} }}", te + work + cast / 2, work + cast * 3 / 4, vae + 1000), true);
    let sp = plan_json(&split, &["--devices", sim]);
    assert!(sp["components"]["unet"]["split"].is_object(), "the cast UNet is split: {sp}");
    let got = run_dump(&split, &["--simulate", sim]);
    assert!(got.get("image").unwrap().equal(&want), "a split changes the cast image");
}

#[test]
fn storage_not_narrower_than_compute_or_on_a_text_encoder_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let m = sd15(dir.path(), "bad", "", false);
    for (sets, want) in [
        (vec!["pipeline.dtype=fp16", "components.unet.storage_dtype=fp16"], "`components.unet.storage_dtype = \"fp16\"` is not narrower than its compute dtype `fp16`: nothing to save"),
        (vec!["components.vae.dtype=bf16", "components.vae.storage_dtype=fp16"], "`components.vae.storage_dtype = \"fp16\"` is not narrower than its compute dtype `bf16`: nothing to save"),
        (vec!["components.text_encoder.storage_dtype=fp8-e4m3"], "`components.text_encoder.storage_dtype`: `text_encoder` is a `CLIPTextModel`, which has no layerwise casting"),
    ] {
        let sets: Vec<String> = sets.iter().flat_map(|s| ["--set".to_string(), s.to_string()]).collect();
        let (code, _, stderr) = run(runner().arg("run").arg(&m).arg("--quiet").args(&sets));
        assert_ne!(code, 0);
        assert!(stderr.contains(want), "{stderr}");
    }
    // fp16 storage under fp32 compute is fine.
    let (code, _, stderr) = run(runner().arg("plan").arg(&m).args(["--set", "components.unet.storage_dtype=bf16"]));
    assert_eq!(code, 0, "{stderr}");
}

/// The tiny SD 1.5 UNet saved with its cast layers in fp8 (e4m3), the rest fp32, as a
/// layerwise-cast model's `state_dict()` would be.
fn fp8_unet(dst: &Path) {
    use runner::checkpoint::safetensors::{encode_header, Dtype, TensorInfo};
    let src = root().join("tests/fixtures/tiny-sd15/unet/diffusion_pytorch_model.safetensors");
    let store = refs_at(&src);
    let mut names: Vec<String> = store.names().cloned().collect();
    names.sort();
    let modules = runner::models::cast::cast_modules("UNet2DConditionModel", names.iter().map(|n| (n.as_str(), store.get(n).unwrap().dim())));
    let (mut infos, mut data) = (vec![], vec![]);
    for n in &names {
        let t = store.get(n).unwrap();
        let (dtype, t) = if runner::models::cast::is_cast(&modules, n) { (Dtype::F8_E4M3, t.to_kind(Kind::Float8e4m3fn)) } else { (Dtype::F32, t.to_kind(Kind::Float)) };
        let t = t.contiguous();
        let bytes = t.numel() * t.kind().elt_size_in_bytes();
        let mut buf = vec![0u8; bytes];
        t.copy_data_u8(&mut buf, t.numel());
        infos.push(TensorInfo { name: n.clone(), dtype, shape: t.size().iter().map(|&d| d as u64).collect(), data_offsets: (data.len() as u64, (data.len() + bytes) as u64) });
        data.extend(buf);
    }
    let mut out = encode_header(&infos, &Default::default());
    out.extend(data);
    std::fs::write(dst, out).unwrap();
}

#[test]
fn fp8_checkpoints_load_as_stored_or_upcast_and_inspect_shows_them() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("unet-fp8.safetensors");
    fp8_unet(&file);
    let (code, stdout, stderr) = run(runner().arg("inspect").arg(&file));
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("F8_E4M3"), "{stdout}");
    // As stored, and upcast.
    let ck = runner::checkpoint::layout::Checkpoint::open(runner::checkpoint::layout::resolve_source(&file, None, None, runner::checkpoint::layout::VariantPolicy::Require).unwrap()).unwrap();
    let opts = |k| runner::checkpoint::load::LoadOptions { float_kind: k, device: tch::Device::Cpu, populate: false };
    let stored = runner::checkpoint::load::load(&ck, None, opts(None)).unwrap();
    let conv = "down_blocks.0.resnets.0.conv1.weight";
    assert_eq!(stored.get(conv).unwrap().kind(), Kind::Float8e4m3fn);
    let up = runner::checkpoint::load::load(&ck, None, opts(Some(Kind::Float))).unwrap();
    assert!(up.get(conv).unwrap().equal(&stored.get(conv).unwrap().to_kind(Kind::Float)));
    // A pipeline from it: upcast (no storage_dtype) and kept fp8 (storage_dtype) give the image of
    // the fp32 UNet cast at load.
    let big = "max_memory = { cpu = \"4GiB\" }";
    let cast = sd15(dir.path(), "cast", big, true);
    let want = run_dump(&cast, &[]).get("image").unwrap().copy();
    let source = format!("[components.unet]\nsource = \"{}\"\n", file.display());
    for (name, storage) in [("from-fp8", ""), ("from-fp8-cast", "storage_dtype = \"fp8-e4m3\"\n")] {
        let m = sd15(dir.path(), name, big, false);
        let text = std::fs::read_to_string(&m).unwrap().replace("[placement]", &format!("{source}{storage}[placement]"));
        std::fs::write(&m, text).unwrap();
        let got = run_dump(&m, &[]).get("image").unwrap().copy();
        let d = (&got - &want).abs().max().double_value(&[]);
        assert!(d < 1e-5, "{name}: {d}");
    }
}
