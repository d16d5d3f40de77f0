//! Image-to-image (`run.image`, `run.strength`; issue 28): parity with diffusers'
//! `StableDiffusionImg2ImgPipeline` (tools/make_references_img2img.py), the same image under group
//! offload and an `auto` split, provenance, prompt-file paths, and bad input.

use std::path::{Path, PathBuf};

use crate::pipeline::manifest_for;
use crate::unet::{refs, refs_at, rel};
use crate::util::{root, run, runner};

fn images() -> PathBuf {
    root().join("tests/fixtures/images")
}

fn meta_of(case: &str) -> serde_json::Value {
    // Lenient: DPM-Solver configs hold -Infinity.
    runner::schedulers::parse_config(&std::fs::read_to_string(crate::util::refs_path(&format!("{case}.json"))).unwrap()).unwrap()
}

/// The case's base manifest in `dir`, safety checker off, with its image and strength and `extra`.
fn manifest(case: &str, dir: &Path, name: &str, extra: &str) -> PathBuf {
    let meta = meta_of(case);
    let p = manifest_for(meta["base"].as_str().unwrap(), dir);
    let mut text = std::fs::read_to_string(&p).unwrap().replace("output = \"out.png\"", &format!("output = \"{name}.png\""));
    let strength = meta["strength"].as_f64().map(|s| format!("strength = {s}\n")).unwrap_or_default();
    let image = format!("image = \"{}\"\n{strength}", images().join(meta["image"].as_str().unwrap()).display());
    // `[run]` is the base manifest's last table: the keys go there.
    text.push_str(&image);
    if let Some(mask) = meta["mask"].as_str() {
        text.push_str(&format!("mask_image = \"{}\"\n", images().join(mask).display()));
    }
    if let Some(unet) = meta["unet"].as_str() {
        text.push_str(&format!("[components.unet]\nsource = \"{}\"\n", root().join("tests/fixtures").join(unet).display()));
    }
    if meta["pipeline"] == "tiny-sd15" {
        text.push_str("[components.safety_checker]\nenabled = false\n");
    }
    text.push_str(extra);
    let out = dir.join(format!("{name}.toml"));
    std::fs::write(&out, text).unwrap();
    out
}

fn run_dump(manifest: &Path, args: &[&str]) -> runner::checkpoint::load::TensorStore {
    let dump = manifest.with_extension("dump");
    let (code, _, stderr) = run(runner().current_dir(manifest.parent().unwrap()).arg("run").arg(manifest).args(["--quiet", "--dump"]).arg(&dump).args(args));
    assert_eq!(code, 0, "{}: {stderr}", manifest.display());
    refs_at(&dump.join("dump.safetensors"))
}

fn check_parity(case: &str) {
    let dir = tempfile::tempdir().unwrap();
    let got = run_dump(&manifest(case, dir.path(), "i2i", ""), &[]);
    let want = refs(case);
    let (a, b) = (got.get("image").unwrap(), want.get("image").unwrap());
    assert_eq!(a.size(), b.size(), "{case}: the image's size");
    let d = (a - b).abs().max().double_value(&[]);
    eprintln!("{case}: image max diff {d:.3e}");
    // FLUX's final latents are packed tokens and SD3's decode adds a shift: their image alone is
    // compared.
    if case.starts_with("flux") || case.starts_with("sd35") {
        runner::parity::check(&format!("{case}: image"), d, runner::parity::IMAGE);
        return;
    }
    let v = want.get("vae.input").unwrap();
    let vae: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root().join("tests/fixtures").join(meta_of(case)["pipeline"].as_str().unwrap()).join("vae/config.json")).unwrap()).unwrap();
    let lat = rel(&(got.get("latents.final").unwrap() / vae["scaling_factor"].as_f64().unwrap()).reshape(v.size()), v);
    runner::parity::check(&format!("{case}: vae input"), lat, runner::parity::PIPELINE_TENSOR);
    runner::parity::check(&format!("{case}: image"), d, runner::parity::IMAGE);
}

/// Euler, strength 0.6 (2 of 4 steps); a 70x52 RGB input, which SD img2img floors to 64x48.
#[test]
fn sd15_img2img_equals_diffusers() {
    check_parity("sd15-img2img");
}

/// PNDM at the default strength (0.8: 3 of 4 steps); an RGBA input, its alpha dropped.
#[test]
fn sd15_img2img_rgba_at_the_default_strength_equals_diffusers() {
    check_parity("sd15-img2img-rgba");
}

/// DDIM at strength 1.0 (the whole schedule from the noised image); a grayscale input.
#[test]
fn sd15_img2img_gray_at_strength_one_equals_diffusers() {
    check_parity("sd15-img2img-gray");
}

/// DPM++ 2M at strength 0.3: int(4 x 0.3) = 1 step.
#[test]
fn sd15_img2img_one_step_equals_diffusers() {
    check_parity("sd15-img2img-one-step");
}

/// Euler ancestral: its step noise continues the generator after the posterior sample and the
/// initial noise.
#[test]
fn sd15_img2img_ancestral_equals_diffusers() {
    check_parity("sd15-img2img-ancestral");
}

/// `components.vae.tiling = true`: the 96x80 input encoded in overlapping 64-pixel tiles, blended
/// (diffusers' `_tiled_encode`), then decoded in tiles.
#[test]
fn sd15_img2img_with_a_tiled_encode_equals_diffusers() {
    check_parity("sd15-img2img-tiled");
}

/// SDXL at strength 0.6 (2 of 4 steps): the 70x52 input floored to 64x48, the micro-conditioning
/// sizes from it.
#[test]
fn sdxl_img2img_equals_diffusers() {
    check_parity("sdxl-img2img");
}

/// SDXL at its default strength 0.3 (1 of 4 steps); an RGBA input.
#[test]
fn sdxl_img2img_at_the_default_strength_equals_diffusers() {
    check_parity("sdxl-img2img-default");
}

/// FLUX.1-dev at the default strength 0.6 (`int(4 - 2.4)` = 1 step skipped: 3 run), the 70x52
/// input resized to the requested 64x64, `(x - shift) * scale`, `scale_noise`, packed.
#[test]
fn flux_img2img_equals_diffusers() {
    check_parity("flux-img2img");
}

/// FLUX at strength 0.9 (`int(4 - 3.6)` = 0 skipped: all 4 run, from the noised image).
#[test]
fn flux_img2img_gray_at_strength_09_equals_diffusers() {
    check_parity("flux-img2img-gray");
}

/// FLUX inpainting at the default strength 0.6: the image's latents at the next sigma put back
/// where the mask is black, in packed tokens.
#[test]
fn flux_inpaint_equals_diffusers() {
    check_parity("flux-inpaint");
}

/// FLUX inpainting at strength 1.0 (the whole schedule); an RGBA image.
#[test]
fn flux_inpaint_at_strength_one_equals_diffusers() {
    check_parity("flux-inpaint-full");
}

/// SD3.5 at the default strength 0.6 (1 of 4 steps skipped), the CLIPs and T5, guidance.
#[test]
fn sd35_img2img_equals_diffusers() {
    check_parity("sd35-img2img");
}

/// SD3.5 inpainting with its 16-channel transformer at strength 0.8 (the kept part at the next
/// sigma after each step, guidance on); an RGBA image.
#[test]
fn sd35_inpaint_equals_diffusers() {
    check_parity("sd35-inpaint");
}

/// SDXL inpainting at its default strength 0.9999 with the 4-channel UNet (SDXL's conditioning at
/// the requested size).
#[test]
fn sdxl_inpaint_equals_diffusers() {
    check_parity("sdxl-inpaint");
}

/// SDXL inpainting with a 9-channel UNet at strength 1.0; a grayscale image.
#[test]
fn sdxl_inpaint_with_a_9_channel_unet_equals_diffusers() {
    check_parity("sdxl-inpaint9");
}

/// Inpainting with the ordinary 4-channel UNet (the unmasked part put back after each step), at
/// the default strength 1.0; the image (70x52) and the mask (50x40) resized to the requested 64x64.
#[test]
fn sd15_inpaint_with_a_4_channel_unet_equals_diffusers() {
    check_parity("sd15-inpaint");
}

/// The 4-channel blend below strength 1 (DDIM: `add_noise` by `alphas_cumprod`); an RGBA image.
#[test]
fn sd15_inpaint_at_strength_075_equals_diffusers() {
    check_parity("sd15-inpaint-strength");
}

/// A 9-channel inpainting UNet (`[latents, mask, masked image latents]`), PNDM, strength 1.0.
#[test]
fn sd15_inpaint_with_a_9_channel_unet_equals_diffusers() {
    check_parity("sd15-inpaint9");
}

/// The 9-channel UNet at strength 0.6 with Euler a: the image's posterior, the noise, the masked
/// image's posterior, then the steps' noise, in diffusers' order; a grayscale image.
#[test]
fn sd15_inpaint9_ancestral_at_strength_06_equals_diffusers() {
    check_parity("sd15-inpaint9-ancestral");
}

/// Group offload and an `auto` split on simulated devices give the plain run's image, bit for
/// bit, for each kind and task; the PNG records the input's sha256 and the strength.
#[test]
fn img2img_and_inpainting_give_the_same_image_offloaded_and_split() {
    for case in ["sd15-img2img", "sd15-inpaint9", "sdxl-inpaint", "sd35-inpaint", "flux-inpaint"] {
        offloaded_and_split(case);
    }
}

fn offloaded_and_split(case: &str) {
    let dir = tempfile::tempdir().unwrap();
    let m = manifest(case, dir.path(), "i2i", "");
    let sim = "cuda:0=1GB,cuda:1=1GB,cpu=2GiB";
    let out = |name: &str, sets: &[String], simulate: bool| {
        let png = dir.path().join(format!("{name}.png"));
        let mut cmd = runner();
        cmd.current_dir(dir.path()).arg("run").arg(&m).args(["--quiet", "--out"]).arg(&png);
        if simulate {
            cmd.args(["--simulate", sim]);
        }
        for s in sets {
            cmd.args(["--set", s]);
        }
        let (code, _, stderr) = run(&mut cmd);
        assert_eq!(code, 0, "{case} {name}: {stderr}");
        crate::util::decode_png(&png)
    };
    let (base, text) = out("base", &[], false);
    if case == "sd15-img2img" {
        let get = |k: &str| text.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()).unwrap();
        let sha = {
            use sha2::Digest;
            format!("{:x}", sha2::Sha256::digest(std::fs::read(images().join("init-rgb-70x52.png")).unwrap()))
        };
        let params = get("parameters");
        assert!(params.contains("Denoising strength: 0.6") && params.contains(&format!("Init image hash: {}", &sha[..12])) && params.contains("Size: 64x48"), "{params}");
        let j: serde_json::Value = serde_json::from_str(&get("runner")).unwrap();
        assert_eq!(j["init"]["image_sha256"], sha.as_str());
        assert_eq!(j["init"]["image_size"], serde_json::json!([70, 52]));
    }
    let (group, _) = out("group", &["placement.offload=group".to_string()], true);
    assert!(group == base, "{case}: group offload: the image differs");
    // The split: every other component on the CPU, two devices each too small for the denoiser.
    let plan = |sets: &[String]| -> serde_json::Value {
        let args: Vec<String> = sets.iter().flat_map(|s| ["--set".to_string(), s.clone()]).collect();
        let (code, stdout, stderr) = run(runner().args(["plan", "--json", "--devices", sim]).arg(&m).args(&args));
        assert_eq!(code, 0, "{stderr}");
        serde_json::from_str(&stdout).unwrap()
    };
    let (denoiser, others): (&str, &[&str]) = match case.split('-').next().unwrap() {
        "sd15" => ("unet", &["text_encoder", "vae"]),
        "sdxl" => ("unet", &["text_encoder", "text_encoder_2", "vae"]),
        "sd35" => ("transformer", &["text_encoder", "text_encoder_2", "text_encoder_3", "vae"]),
        _ => ("transformer", &["text_encoder", "text_encoder_2", "vae"]),
    };
    let pins: Vec<String> = others.iter().map(|c| format!("components.{c}.device=cpu")).collect();
    let u = &plan(&pins)["components"][denoiser];
    let budget = u["working_bytes"].as_u64().unwrap() + u["bytes"].as_u64().unwrap() * 3 / 4;
    let mut split = vec!["placement.strategy=auto".to_string(), format!("placement.max_memory={{\"cuda:0\"={budget},\"cuda:1\"={budget},cpu=\"2GiB\"}}")];
    split.extend(pins);
    let parts = plan(&split)["components"][denoiser]["split"].clone();
    assert!(parts.as_object().is_some_and(|p| p.values().any(|d| d == "cuda:0") && p.values().any(|d| d == "cuda:1")), "{case}: the {denoiser} is split: {parts}");
    let (split, _) = out("split", &split, true);
    assert!(split == base, "{case}: split: the image differs");
}

/// A prompts file's image paths are relative to it; each line can change the image and strength.
#[test]
fn prompt_lines_take_images_relative_to_the_file() {
    let case = "sd15-img2img";
    let dir = tempfile::tempdir().unwrap();
    let m = manifest(case, dir.path(), "i2i", "");
    let sub = dir.path().join("lines");
    std::fs::create_dir(&sub).unwrap();
    std::fs::copy(images().join("init-rgb-70x52.png"), sub.join("in.png")).unwrap();
    std::fs::write(sub.join("p.jsonl"), "{\"image\": \"in.png\", \"strength\": 0.6}\n{\"image\": \"in.png\", \"strength\": 1.0}\n").unwrap();
    let (code, _, stderr) = run(runner().current_dir(dir.path()).arg("run").arg(&m).arg("--prompts").arg(sub.join("p.jsonl")).args(["--quiet", "--out"]).arg(dir.path().join("out-{index}.png")));
    assert_eq!(code, 0, "{stderr}");
    let (a, _) = crate::util::decode_png(&dir.path().join("out-0.png"));
    let (b, _) = crate::util::decode_png(&dir.path().join("out-1.png"));
    assert!(a != b, "strength 1.0 gives another image");
    let (plain, _) = {
        let (code, _, stderr) = run(runner().current_dir(dir.path()).arg("run").arg(&m).args(["--quiet", "--out"]).arg(dir.path().join("plain.png")));
        assert_eq!(code, 0, "{stderr}");
        crate::util::decode_png(&dir.path().join("plain.png"))
    };
    assert!(a == plain, "the line's image and strength are the manifest's: the same image");
}

/// Bad input: exit 1 at `validate`, the key and file named, nothing written.
#[test]
fn bad_images_and_strengths_are_named_errors() {
    let dir = tempfile::tempdir().unwrap();
    let base = std::fs::read_to_string(manifest("sd15-img2img", dir.path(), "m0", "")).unwrap();
    let text = dir.path().join("text.png");
    std::fs::write(&text, b"not an image at all").unwrap();
    let cut = dir.path().join("cut.png");
    let full = std::fs::read(images().join("init-rgb-70x52.png")).unwrap();
    std::fs::write(&cut, &full[..full.len() / 2]).unwrap();
    let bomb = dir.path().join("bomb.png");
    {
        let mut b = full[..33].to_vec();
        b[16..20].copy_from_slice(&100_000u32.to_be_bytes());
        b[20..24].copy_from_slice(&100_000u32.to_be_bytes());
        std::fs::write(&bomb, b).unwrap();
    }
    let with_image = |p: &Path| base.replace(&images().join("init-rgb-70x52.png").display().to_string(), &p.display().to_string());
    let m = dir.path().join("m.toml");
    for (text, want, run_it) in [
        (with_image(&dir.path().join("missing.png")), vec!["run.image", "missing.png"], false),
        (with_image(&text), vec!["run.image", "text.png", "PNG, JPEG or WebP"], false),
        (with_image(&bomb), vec!["run.image", "bomb.png", "100000x100000", "decompression bomb"], false),
        (base.replace("strength = 0.6", "strength = 0.0"), vec!["run.strength", "(0, 1]"], false),
        (base.replace("strength = 0.6", "strength = 1.5"), vec!["run.strength", "1.5"], false),
        (base.replace("strength = 0.6", "strength = 0.1"), vec!["run.strength", "leaves no step"], false),
        (base.replace("strength = 0.6", "strength = 0.6\nlatents = \"x.safetensors\""), vec!["run.latents", "image-to-image"], false),
        (base.replace("image = ", "mask_image = "), vec!["run.mask_image", "without `run.image`"], false),
        (with_image(&cut), vec!["run.image", "cut.png", "truncated"], true),
    ] {
        std::fs::write(&m, &text).unwrap();
        let (code, stdout, stderr) = run(runner().current_dir(dir.path()).arg(if run_it { "run" } else { "validate" }).arg(&m));
        assert_eq!(code, 1, "{want:?}: {stdout}{stderr}");
        assert!(want.iter().all(|w| stderr.contains(w)), "want {want:?} in: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(!dir.path().join("m0.png").exists(), "nothing written");
    }
    // SD image-to-image takes the image's size: the manifest's width and height are said to be ignored.
    std::fs::write(&m, &base).unwrap();
    let (code, _, stderr) = run(runner().arg("validate").arg(&m));
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("`run.width` is ignored") && stderr.contains("`run.height` is ignored"), "{stderr}");
    // A 9-channel inpainting UNet without a mask.
    std::fs::write(&m, base.clone() + &format!("[components.unet]\nsource = \"{}\"\n", root().join("tests/fixtures/tiny-sd15-inpaint-unet").display())).unwrap();
    let (code, _, stderr) = run(runner().arg("validate").arg(&m));
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("9 input channels") && stderr.contains("run.mask_image"), "{stderr}");
}
