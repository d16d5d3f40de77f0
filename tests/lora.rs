//! LoRA adapters (`[adapters.*]`, issue 27) end to end: parity with diffusers'
//! `load_lora_weights` + `set_adapters` + `fuse_lora` (tools/make_references_lora.py), the same
//! image under `group` offload and an `auto` split, `runner inspect` of a LoRA file, and bad input.

use std::path::{Path, PathBuf};

use crate::pipeline::manifest_for;
use crate::unet::{refs, refs_at, rel};
use crate::util::{root, run, runner};

fn loras() -> PathBuf {
    root().join("tests/fixtures/loras")
}

/// `[adapters.NAME]` lines for (name, file, scale).
fn adapter_lines(adapters: &[(&str, &str, f64)]) -> String {
    adapters.iter().map(|(n, f, s)| format!("[adapters.{n}]\nsource = \"{}\"\nscale = {s}\n", loras().join(f).display())).collect()
}

/// The reference case's base manifest in `dir` with the safety checker off and `extra` appended.
fn manifest(case: &str, dir: &Path, name: &str, extra: &str) -> PathBuf {
    let meta: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(crate::util::refs_path(&format!("{case}.json"))).unwrap()).unwrap();
    let p = manifest_for(meta["base"].as_str().unwrap(), dir);
    let safety = if case.contains("sd15") { "[components.safety_checker]\nenabled = false\n" } else { "" };
    let text = std::fs::read_to_string(&p).unwrap() + safety + extra;
    let out = dir.join(format!("{name}.toml"));
    std::fs::write(&out, text.replace("output = \"out.png\"", &format!("output = \"{name}.png\""))).unwrap();
    out
}

fn adapters_of(case: &str) -> Vec<(String, String, f64)> {
    let m: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(crate::util::refs_path(&format!("{case}.json"))).unwrap()).unwrap();
    m["adapters"].as_object().unwrap().iter().map(|(n, a)| (n.clone(), a["file"].as_str().unwrap().to_string(), a["scale"].as_f64().unwrap())).collect()
}

fn run_dump(manifest: &Path, args: &[&str]) -> runner::checkpoint::load::TensorStore {
    let dump = manifest.with_extension("dump");
    let (code, _, stderr) = run(runner().current_dir(manifest.parent().unwrap()).arg("run").arg(manifest).args(["--quiet", "--dump"]).arg(&dump).args(args));
    assert_eq!(code, 0, "{}: {stderr}", manifest.display());
    refs_at(&dump.join("dump.safetensors"))
}

fn meta_of(case: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(crate::util::refs_path(&format!("{case}.json"))).unwrap()).unwrap()
}

/// The case's `[adapters.*]` (with `fuse = false` for a live case).
fn lines_of(case: &str) -> String {
    let a = adapters_of(case);
    let live = meta_of(case)["fuse"] == false;
    a.iter().map(|(n, f, s)| adapter_lines(&[(n.as_str(), f.as_str(), *s)]) + if live { "fuse = false\n" } else { "" }).collect()
}

/// `--set run.adapter_scales={...}` for a case recorded with other set_adapters weights.
fn scale_args(case: &str) -> Vec<String> {
    match meta_of(case)["run_scales"].as_object() {
        Some(o) => vec!["--set".into(), format!("run.adapter_scales={{{}}}", o.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(","))],
        None => vec![],
    }
}

/// runner's image with the case's adapters against diffusers' (fused, in name order), within the
/// pipeline image bound; the adapters change the image far more than that.
fn check_parity(case: &str) {
    let dir = tempfile::tempdir().unwrap();
    let args = scale_args(case);
    let got = run_dump(&manifest(case, dir.path(), "lora", &lines_of(case)), &args.iter().map(String::as_str).collect::<Vec<_>>());
    let want = refs(case);
    let (a, b) = (got.get("image").unwrap(), want.get("image").unwrap());
    let d = (a - b).abs().max().double_value(&[]);
    eprintln!("{case}: image max diff {d:.3e}");
    // SD 1.5: what the VAE decodes is runner's final latents / scaling_factor (the other kinds
    // scale and shift, or unpack: their image alone is compared).
    if case.contains("sd15") {
        let v = want.get("vae.input").unwrap();
        let lat = rel(&(got.get("latents.final").unwrap() / 0.18215).reshape(v.size()), v);
        runner::parity::check(&format!("{case}: vae input"), lat, runner::parity::PIPELINE_TENSOR);
    }
    runner::parity::check(&format!("{case}: image"), d, runner::parity::IMAGE);
    let plain = run_dump(&manifest(case, dir.path(), "plain", ""), &[]);
    let change = (plain.get("image").unwrap() - b).abs().max().double_value(&[]);
    assert!(change > 100.0 * runner::parity::IMAGE.value, "{case}: the adapters must change the image more than runner may differ from diffusers ({change})");
}

#[test]
fn sd15_peft_lora_on_unet_and_text_encoder_equals_diffusers() {
    check_parity("lora-sd15-peft");
}

#[test]
fn sd15_two_adapters_peft_and_kohya_equal_diffusers() {
    check_parity("lora-sd15-two");
}

#[test]
fn sd15_two_live_adapters_equal_diffusers_unfused() {
    check_parity("lora-sd15-two-live");
}

#[test]
fn sd15_live_adapters_at_run_scales_equal_diffusers_set_adapters() {
    check_parity("lora-sd15-two-live-scales");
}

#[test]
fn flux_live_lora_equals_diffusers_unfused() {
    check_parity("lora-flux-peft-live");
}

#[test]
fn sdxl_peft_lora_on_unet_and_both_text_encoders_equals_diffusers() {
    check_parity("lora-sdxl-peft");
}

#[test]
fn sdxl_kohya_lora_in_original_block_names_equals_diffusers() {
    check_parity("lora-sdxl-kohya");
}

/// kohya's SDXL text-encoder pairs (`lora_te1_` CLIP-L, `lora_te2_` CLIP-G) beside its UNet file.
#[test]
fn sdxl_kohya_text_encoder_loras_equal_diffusers() {
    check_parity("lora-sdxl-kohya-te");
}

#[test]
fn sd35_peft_lora_on_transformer_and_clips_equals_diffusers() {
    check_parity("lora-sd35-peft");
}

#[test]
fn flux_peft_lora_on_transformer_and_clip_equals_diffusers() {
    check_parity("lora-flux-peft");
}

/// kohya sd-scripts' FLUX layout: alpha baked into A and B at the file's bf16, the fused `qkv` and
/// `linear1` split by B's rows among q/k/v(/proj_mlp), the final layer's modulation halves swapped,
/// CLIP's `lora_te1_` pairs.
#[test]
fn flux_kohya_lora_equals_diffusers() {
    check_parity("lora-flux-kohya");
}

#[test]
fn flux_kohya_live_lora_equals_diffusers_unfused() {
    check_parity("lora-flux-kohya-live");
}

/// ComfyUI's names for the same tensors (`diffusion_model.double_blocks.0.img_attn.qkv…`,
/// `text_encoders.clip_l.transformer.…`): diffusers renames them to sd-scripts' and gets the same
/// state dict, so the same reference holds.
#[test]
fn flux_kohya_lora_in_comfyui_names_equals_diffusers() {
    let case = "lora-flux-kohya";
    let dir = tempfile::tempdir().unwrap();
    let lines = lines_of(case).replace("flux-kohya.safetensors", "flux-kohya-comfy.safetensors");
    let got = run_dump(&manifest(case, dir.path(), "comfy", &lines), &[]);
    let d = (got.get("image").unwrap() - refs(case).get("image").unwrap()).abs().max().double_value(&[]);
    runner::parity::check(&format!("{case} (ComfyUI names): image"), d, runner::parity::IMAGE);
}

/// XLabs' FLUX layout: `qkv_lora1/2` split into q/k/v by rows, no alphas.
#[test]
fn flux_xlabs_lora_equals_diffusers() {
    check_parity("lora-flux-xlabs");
}

/// A kohya file of mixed ranks without alphas: diffusers 0.42 keeps every pair at scaling 1
/// (alpha = its own rank), not the most common rank over each pair's.
#[test]
fn sd15_kohya_mixed_ranks_without_alphas_equal_diffusers() {
    check_parity("lora-sd15-kohya-ranks");
}

/// Fused adapters under `group` offload and an `auto` split on simulated devices: the image of
/// the plain run with them, bit for bit.
#[test]
fn fused_adapters_give_the_same_image_offloaded_and_split() {
    offloaded_and_split("lora-sd15-two");
}

/// Live adapters' pairs are variables of their layers: streamed with them and split with them.
#[test]
fn live_adapters_give_the_same_image_offloaded_and_split() {
    offloaded_and_split("lora-sd15-two-live");
}

/// kohya FLUX pairs (split fused projections, baked alphas) fused and live: the same under group
/// offload and a split of the transformer.
#[test]
fn kohya_flux_adapters_give_the_same_image_offloaded_and_split() {
    offloaded_and_split("lora-flux-kohya");
    offloaded_and_split("lora-flux-kohya-live");
}

fn offloaded_and_split(case: &str) {
    let dir = tempfile::tempdir().unwrap();
    let m = manifest(case, dir.path(), "lora", &lines_of(case));
    let (base, text) = crate::util::decode_png(&{
        let (code, _, stderr) = run(runner().current_dir(dir.path()).arg("run").arg(&m).args(["--quiet", "--out"]).arg(dir.path().join("base.png")));
        assert_eq!(code, 0, "{stderr}");
        dir.path().join("base.png")
    });
    let flux = case.contains("flux");
    if !flux {
        provenance(&m, &text);
    }
    let sim = "cuda:0=1GB,cuda:1=1GB,cpu=2GiB";
    // The split: the text encoders and the VAE on the CPU, two devices each too small for the denoiser.
    let plan = |sets: &[String]| -> serde_json::Value {
        let args: Vec<String> = sets.iter().flat_map(|s| ["--set".to_string(), s.clone()]).collect();
        let (code, stdout, stderr) = run(runner().args(["plan", "--json", "--devices", sim]).arg(&m).args(&args));
        assert_eq!(code, 0, "{stderr}");
        serde_json::from_str(&stdout).unwrap()
    };
    let (denoiser, others): (&str, &[&str]) = if flux { ("transformer", &["text_encoder", "text_encoder_2", "vae"]) } else { ("unet", &["text_encoder", "vae"]) };
    let pins: Vec<String> = others.iter().map(|c| format!("components.{c}.device=cpu")).collect();
    let u = &plan(&pins)["components"][denoiser];
    let budget = u["working_bytes"].as_u64().unwrap() + u["bytes"].as_u64().unwrap() * 3 / 4;
    let mut split = vec!["placement.strategy=auto".to_string(), format!("placement.max_memory={{\"cuda:0\"={budget},\"cuda:1\"={budget},cpu=\"2GiB\"}}")];
    split.extend(pins);
    let parts = plan(&split)["components"][denoiser]["split"].clone();
    assert!(parts.as_object().is_some_and(|p| p.values().any(|d| d == "cuda:0") && p.values().any(|d| d == "cuda:1")), "the {denoiser} is split: {parts}");
    for (name, sets) in [("group", vec!["placement.offload=group".to_string()]), ("split", split)] {
        let out = dir.path().join(format!("{name}.png"));
        let args: Vec<String> = sets.iter().flat_map(|s| ["--set".to_string(), s.clone()]).collect();
        let (code, _, stderr) = run(runner().current_dir(dir.path()).arg("run").arg(&m).args(["--quiet", "--simulate", sim]).args(&args).arg("--out").arg(&out));
        assert_eq!(code, 0, "{case} {name}: {stderr}");
        assert!(crate::util::decode_png(&out).0 == base, "{case} {name}: the image differs");
    }
}

/// Provenance of the SD 1.5 pair of adapters: A1111's `Lora hashes`, each adapter's name, scale and
/// sha256 in runner's JSON, and the files in `runner lock`.
fn provenance(m: &Path, text: &[(String, String)]) {
    let get = |k: &str| text.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()).unwrap();
    let a1111 = |f: &str| {
        use sha2::Digest;
        let b = std::fs::read(loras().join(f)).unwrap();
        let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
        format!("{:x}", sha2::Sha256::digest(&b[8 + n..]))[..12].to_string()
    };
    let params = get("parameters");
    assert!(params.contains(&format!("Lora hashes: \"kohya: {}, style: {}\"", a1111("sd15-kohya.safetensors"), a1111("sd15-peft.safetensors"))), "{params}");
    let j: serde_json::Value = serde_json::from_str(&get("runner")).unwrap();
    assert_eq!(j["adapters"][1]["name"], "style");
    assert_eq!(j["adapters"][1]["scale"], 0.8);
    assert_eq!(j["adapters"][0]["sha256"].as_str().unwrap().len(), 64);
    // `runner lock` records the adapter files.
    let (code, _, stderr) = run(runner().arg("lock").arg(m));
    assert_eq!(code, 0, "{stderr}");
    let lock = std::fs::read_to_string(m.with_extension("toml.lock")).unwrap();
    assert!(lock.contains("sd15-kohya.safetensors") && lock.contains("sd15-peft.safetensors"), "{lock}");
}

#[test]
fn inspect_describes_a_lora_file() {
    let (code, stdout, stderr) = run(runner().arg("inspect").arg(loras().join("sd15-kohya.safetensors")).arg("--json"));
    assert_eq!(code, 0, "{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["format"], "kohya");
    assert_eq!(v["ranks"], serde_json::json!([4]));
    assert_eq!(v["alphas"], serde_json::json!([2.0]));
    assert!(v["targets"]["denoiser"].as_u64().unwrap() > 0 && v["targets"]["text_encoder"].as_u64().unwrap() > 0, "{v}");
    let (code, stdout, _) = run(runner().arg("inspect").arg(loras().join("sd15-peft.safetensors")));
    assert_eq!(code, 0);
    assert!(stdout.contains("LoRA, diffusers/PEFT format") && stdout.contains("rank 4"), "{stdout}");
    for (file, format, text_encoder) in [("flux-kohya.safetensors", "kohya-flux", true), ("flux-kohya-comfy.safetensors", "kohya-flux", true), ("flux-xlabs.safetensors", "xlabs", false)] {
        let (code, stdout, stderr) = run(runner().arg("inspect").arg(loras().join(file)).arg("--json"));
        assert_eq!(code, 0, "{file}: {stderr}");
        let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        assert_eq!(v["format"], format, "{file}");
        assert!(v["targets"]["denoiser"].as_u64().unwrap() > 0 && v["targets"].get("text_encoder").is_some() == text_encoder, "{file}: {v}");
    }
}

/// Bad adapters: exit 1 at `validate`, the adapter and file named, before any weight is loaded.
#[test]
fn bad_adapters_are_named_errors() {
    use runner::checkpoint::safetensors::{encode_header, Dtype, TensorInfo};
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, tensors: &[(&str, Vec<u64>)]| -> PathBuf {
        let mut infos = vec![];
        let mut data = vec![];
        for (n, shape) in tensors {
            let bytes = 4 * shape.iter().product::<u64>();
            infos.push(TensorInfo { name: n.to_string(), dtype: Dtype::F32, shape: shape.clone(), data_offsets: (data.len() as u64, data.len() as u64 + bytes) });
            data.extend(std::iter::repeat_n(0u8, bytes as usize));
        }
        let p = dir.path().join(name);
        std::fs::write(&p, [encode_header(&infos, &Default::default()), data].concat()).unwrap();
        p
    };
    let q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q";
    let rank = write("rank.safetensors", &[(&format!("{q}.lora_A.weight"), vec![4, 32]), (&format!("{q}.lora_B.weight"), vec![32, 2])]);
    let other = write("other.safetensors", &[("unet.input_blocks.4.1.proj_in.lora_A.weight", vec![4, 640]), ("unet.input_blocks.4.1.proj_in.lora_B.weight", vec![640, 4])]);
    let misfit = write("misfit.safetensors", &[(&format!("{q}.lora_A.weight"), vec![4, 1280]), (&format!("{q}.lora_B.weight"), vec![1280, 4])]);
    let dora = write("dora.safetensors", &[(&format!("{q}.lora_A.weight"), vec![4, 32]), (&format!("{q}.lora_B.weight"), vec![32, 4]), (&format!("{q}.lora_magnitude_vector"), vec![32])]);
    let not_lora = write("weights.safetensors", &[("conv.weight", vec![4, 4])]);
    let text = dir.path().join("text.safetensors");
    std::fs::write(&text, b"not a safetensors file").unwrap();
    let base = manifest("lora-sd15-peft", dir.path(), "m", "");
    let one = |p: &Path, extra: &str| format!("[adapters.x]\nsource = \"{}\"\n{extra}", p.display());
    for (extra, want) in [
        (one(&dir.path().join("missing.safetensors"), ""), vec!["adapter `x`", "missing.safetensors"]),
        (one(&text, ""), vec!["adapter `x`", "text.safetensors"]),
        (one(&rank, ""), vec!["rank.safetensors", "the ranks of A and B differ"]),
        (one(&other, ""), vec!["other.safetensors", "match no module", "another architecture"]),
        (one(&misfit, ""), vec!["misfit.safetensors", "does not fit", "another model"]),
        (one(&dora, ""), vec!["dora.safetensors", "DoRA"]),
        (one(&not_lora, ""), vec!["weights.safetensors", "not part of a LoRA pair"]),
        (one(&loras().join("sd15-peft.safetensors"), "scale = -1.0\n"), vec!["adapters.x.scale", "-1"]),
        (one(&loras().join("sd15-peft.safetensors"), "[run.adapter_scales]\nx = 0.5\n"), vec!["run.adapter_scales.x", "merged into the weights", "fuse = false"]),
        (one(&loras().join("sd15-peft.safetensors"), "fuse = false\n[run.adapter_scales]\ny = 0.5\n"), vec!["run.adapter_scales.y", "no adapter `y`"]),
        (one(&loras().join("sd15-peft.safetensors"), "fuse = false\n[run.adapter_scales]\nx = -2.0\n"), vec!["run.adapter_scales.x", "-2"]),
        (one(&loras().join("sd15-peft.safetensors"), "components = [\"transformer\"]\n"), vec!["adapters.x.components", "`transformer`"]),
    ] {
        std::fs::write(&base, std::fs::read_to_string(manifest("lora-sd15-peft", dir.path(), "m0", "")).unwrap() + &extra).unwrap();
        let (code, stdout, stderr) = run(runner().arg("validate").arg(&base));
        assert_eq!(code, 1, "{extra}: {stdout}{stderr}");
        assert!(want.iter().all(|w| stderr.contains(w)), "{extra}: want {want:?} in: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    // A FLUX LoRA on an SD 1.5 pipeline: said so.
    for f in ["flux-kohya.safetensors", "flux-xlabs.safetensors"] {
        std::fs::write(&base, std::fs::read_to_string(manifest("lora-sd15-peft", dir.path(), "m0", "")).unwrap() + &one(&loras().join(f), "")).unwrap();
        let (code, _, stderr) = run(runner().arg("validate").arg(&base));
        assert_eq!(code, 1, "{stderr}");
        assert!(stderr.contains("is a FLUX LoRA") && stderr.contains("UNet2DConditionModel") && stderr.contains(f), "{stderr}");
    }
    // kohya FLUX: a fused qkv whose B does not have the rows of q, k and v; T5 (`lora_te2_`) pairs,
    // which diffusers drops: left out with a warning.
    let flux = manifest("lora-flux-kohya", dir.path(), "f0", "");
    let qkv = |rows: u64| -> Vec<(String, Vec<u64>)> {
        vec![("lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight".into(), vec![4, 32]), ("lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight".into(), vec![rows, 4])]
    };
    let short = write("short.safetensors", &qkv(90).iter().map(|(n, s)| (n.as_str(), s.clone())).collect::<Vec<_>>());
    std::fs::write(&base, std::fs::read_to_string(&flux).unwrap() + &one(&short, "")).unwrap();
    let (code, _, stderr) = run(runner().arg("validate").arg(&base));
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("short.safetensors") && stderr.contains("add up to 96"), "{stderr}");
    let mut t5 = qkv(96);
    t5.extend([
        ("lora_te2_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight".to_string(), vec![4, 32]),
        ("lora_te2_encoder_block_0_layer_0_SelfAttention_q.lora_up.weight".to_string(), vec![32, 4]),
    ]);
    let t5 = write("t5.safetensors", &t5.iter().map(|(n, s)| (n.as_str(), s.clone())).collect::<Vec<_>>());
    std::fs::write(&base, std::fs::read_to_string(&flux).unwrap() + &one(&t5, "")).unwrap();
    let (code, _, stderr) = run(runner().arg("validate").arg(&base));
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("warning") && stderr.contains("1 pair left out") && stderr.contains("T5"), "{stderr}");
    // `strict = false`: the pairs that match run, the others are left out with a warning.
    let half = write(
        "half.safetensors",
        &[
            (&format!("{q}.lora_A.weight"), vec![4, 16]),
            (&format!("{q}.lora_B.weight"), vec![16, 4]),
            ("unet.input_blocks.4.1.proj_in.lora_A.weight", vec![4, 640]),
            ("unet.input_blocks.4.1.proj_in.lora_B.weight", vec![640, 4]),
        ],
    );
    std::fs::write(&base, std::fs::read_to_string(manifest("lora-sd15-peft", dir.path(), "m0", "")).unwrap() + &one(&half, "")).unwrap();
    let (code, _, stderr) = run(runner().arg("validate").arg(&base));
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("1 of 2 pairs match no module") && stderr.contains("strict = false"), "{stderr}");
    std::fs::write(&base, std::fs::read_to_string(manifest("lora-sd15-peft", dir.path(), "m0", "")).unwrap() + &one(&half, "strict = false\n")).unwrap();
    let (code, _, stderr) = run(runner().arg("validate").arg(&base));
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("warning") && stderr.contains("left out (`strict = false`)"), "{stderr}");
    // NaN in an adapter: found when it is read for merging, before the run (exit 1, no image).
    let mut bytes = std::fs::read(loras().join("sd15-peft.safetensors")).unwrap();
    let n = bytes.len();
    bytes[n - 4..].copy_from_slice(&f32::NAN.to_le_bytes());
    let nan = dir.path().join("nan.safetensors");
    std::fs::write(&nan, bytes).unwrap();
    std::fs::write(&base, std::fs::read_to_string(manifest("lora-sd15-peft", dir.path(), "m0", "")).unwrap() + &one(&nan, "")).unwrap();
    let (code, _, stderr) = run(runner().current_dir(dir.path()).arg("run").arg(&base).arg("--quiet"));
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("NaN or infinite") && stderr.contains("nan.safetensors"), "{stderr}");
    assert!(!dir.path().join("m.png").exists(), "no image written");
}

/// The plan counts a live adapter's pairs on its component (at the component's dtype); a fused
/// one adds nothing.
#[test]
fn the_plan_counts_live_pairs_not_fused_ones() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = |case: &str, name: &str| -> u64 {
        let m = manifest(case, dir.path(), name, &lines_of(case));
        let (code, stdout, stderr) = run(runner().args(["plan", "--json"]).arg(&m));
        assert_eq!(code, 0, "{stderr}");
        serde_json::from_str::<serde_json::Value>(&stdout).unwrap()["components"]["unet"]["bytes"].as_u64().unwrap()
    };
    let plain = {
        let m = manifest("lora-sd15-two", dir.path(), "plain", "");
        let (code, stdout, stderr) = run(runner().args(["plan", "--json"]).arg(&m));
        assert_eq!(code, 0, "{stderr}");
        serde_json::from_str::<serde_json::Value>(&stdout).unwrap()["components"]["unet"]["bytes"].as_u64().unwrap()
    };
    assert_eq!(bytes("lora-sd15-two", "fused"), plain);
    // The UNet's pairs of both files, fp32.
    let h = |f: &str| runner::checkpoint::safetensors::read_header(&loras().join(f)).unwrap();
    let unet_params: u64 = [h("sd15-peft.safetensors"), h("sd15-kohya.safetensors")]
        .iter()
        .flat_map(|h| h.tensors.iter())
        .filter(|t| (t.name.starts_with("unet.") || t.name.starts_with("lora_unet_")) && !t.name.ends_with(".alpha"))
        .map(|t| t.numel())
        .sum();
    assert_eq!(bytes("lora-sd15-two-live", "live"), plain + 4 * unet_params);
}

/// A PEFT file with pairs on FLUX's T5 (`text_encoder_2.encoder.block.N.layer.0.SelfAttention.q`…;
/// no diffusers loader targets T5, so no reference): fused and live give the same image, which
/// differs from the plain one.
#[test]
fn t5_pairs_run_fused_and_live() {
    use runner::checkpoint::safetensors::{encode_header, Dtype, TensorInfo};
    let dir = tempfile::tempdir().unwrap();
    let (mut infos, mut data, mut seed) = (vec![], vec![], 7u64);
    for b in 0..2 {
        for (m, fin, fout) in [("SelfAttention.q", 24, 32), ("SelfAttention.k", 24, 32), ("SelfAttention.v", 24, 32), ("SelfAttention.o", 32, 24)] {
            for (side, shape) in [("lora_A", vec![2u64, fin]), ("lora_B", vec![fout, 2])] {
                let n: u64 = shape.iter().product();
                let start = data.len() as u64;
                for _ in 0..n {
                    seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    data.extend_from_slice(&(((seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.8).to_le_bytes());
                }
                infos.push(TensorInfo { name: format!("text_encoder_2.encoder.block.{b}.layer.0.{m}.{side}.weight"), dtype: Dtype::F32, shape, data_offsets: (start, data.len() as u64) });
            }
        }
    }
    let file = dir.path().join("t5.safetensors");
    std::fs::write(&file, [encode_header(&infos, &Default::default()), data].concat()).unwrap();
    let lines = format!("[adapters.t5]\nsource = \"{}\"\n", file.display());
    let case = "lora-flux-peft";
    let image = |name: &str, extra: &str| {
        let m = manifest(case, dir.path(), name, extra);
        run_dump(&m, &[]).get("image").unwrap().copy()
    };
    let plain = image("plain", "");
    let fused = image("fused", &lines);
    let live = image("live", &format!("{lines}fuse = false\n"));
    let d = (&fused - &live).abs().max().double_value(&[]);
    runner::parity::check("T5 pairs fused vs live: image", d, runner::parity::IMAGE);
    let change = (&plain - &fused).abs().max().double_value(&[]);
    assert!(change > 100.0 * runner::parity::IMAGE.value, "the T5 pairs change the image ({change})");
}

/// On a GGUF-quantized transformer (and an fp8 `storage_dtype` one) an adapter runs live beside the
/// quantized layers; merging into them is refused, saying `fuse = false`.
#[test]
fn adapters_on_gguf_and_fp8_components_run_live_and_refuse_fusing() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = crate::gguf_run::write(dir.path(), "tiny-flux-dev", "q8_0", "original");
    let case = "lora-flux-peft-live";
    let lora = lines_of(case);
    for (name, base_lines) in [("gguf", format!("[components.transformer]\nsource = \"{}\"\n", gguf.display())), ("fp8", "[components.transformer]\nstorage_dtype = \"fp8-e4m3\"\n".to_string())] {
        let plain = manifest(case, dir.path(), &format!("{name}-plain"), &base_lines);
        let live = manifest(case, dir.path(), &format!("{name}-live"), &format!("{base_lines}{lora}"));
        let image = |m: &Path| {
            let out = dir.path().join(format!("{}.png", m.file_stem().unwrap().to_string_lossy()));
            let (code, _, stderr) = run(runner().arg("run").arg(m).args(["--quiet", "--out"]).arg(&out));
            assert_eq!(code, 0, "{name}: {stderr}");
            crate::util::decode_png(&out).0
        };
        assert!(image(&plain) != image(&live), "{name}: the live adapter changes the image");
        let fused = manifest(case, dir.path(), &format!("{name}-fused"), &format!("{base_lines}{}", lora.replace("fuse = false\n", "")));
        let (code, _, stderr) = run(runner().arg("validate").arg(&fused));
        assert_eq!(code, 1, "{name}: {stderr}");
        assert!(stderr.contains("cannot be merged") && stderr.contains("fuse = false"), "{name}: {stderr}");
    }
}
