//! `runner run` end to end on the tiny SD 1.5 fixture against diffusers' recorded runs
//! (tests/fixtures/refs, tools/make_references.py): token ids equal, every other tensor of the
//! reference within the bounds of src/parity.rs (measured across CPU kernel paths), for PNDM, Euler, Euler ancestral, DDIM, DPM++ 2M
//! (plain and Karras), and a batch-2 run without guidance; VAE tiling (a 96x80 image, 12x10
//! latents: not a multiple of the tile) and slicing.

use std::path::{Path, PathBuf};

use runner::parity::{check, IMAGE, PIPELINE_TENSOR};

use crate::unet::{refs, refs_at};
use crate::util::{max_diff, rel, root, run, runner};

fn case_meta(case: &str) -> serde_json::Value {
    // Lenient: DPM-Solver configs hold -Infinity.
    runner::schedulers::parse_config(&std::fs::read_to_string(crate::util::refs_path(&format!("{case}.json"))).unwrap()).unwrap()
}

/// A manifest in `dir` reproducing a reference case.
pub fn manifest_for(case: &str, dir: &Path) -> PathBuf {
    let m = case_meta(case);
    let scheduler = match m["scheduler"].as_str().unwrap() {
        "PNDMScheduler" => None,
        "EulerDiscreteScheduler" => Some("euler"),
        "EulerAncestralDiscreteScheduler" => Some("euler-ancestral"),
        "DDIMScheduler" => Some("ddim"),
        "DPMSolverMultistepScheduler" if m["scheduler_config"]["use_karras_sigmas"] == true => Some("dpmpp-2m-karras"),
        "DPMSolverMultistepScheduler" => Some("dpmpp-2m"),
        "FlowMatchEulerDiscreteScheduler" => None,
        other => panic!("{other}"),
    };
    let kind = match m["pipeline"].as_str().unwrap() {
        "tiny-sdxl" => "stable-diffusion-xl",
        "tiny-sd3" | "tiny-sd35" => "stable-diffusion-3",
        "tiny-flux-dev" | "tiny-flux-schnell" => "flux",
        _ => "stable-diffusion",
    };
    let mut text = format!(
        "schema_version = 1\nname = \"{case}\"\n[pipeline]\nkind = \"{kind}\"\nsource = \"{}\"\ndtype = \"fp32\"\n",
        root().join("tests/fixtures").join(m["pipeline"].as_str().unwrap()).display()
    );
    if let Some(s) = scheduler {
        text.push_str(&format!("scheduler = \"{s}\"\n"));
    }
    if m["text_encoder_3"] == false {
        text.push_str("[components.text_encoder_3]\nenabled = false\n");
    }
    // diffusers' `vae.enable_tiling()` / `enable_slicing()` (tools/make_references_vae.py).
    if m["vae_tiling"] == true || m["vae_slicing"] == true {
        text.push_str(&format!("[components.vae]\ntiling = {}\nslicing = {}\n", m["vae_tiling"] == true, m["vae_slicing"] == true));
    }
    text.push_str("[placement]\nmax_memory = { cpu = \"4GiB\" }\n[run]\n");
    text.push_str(&format!("prompt = {}\n", m["prompt"]));
    for key in ["negative_prompt", "prompt_2", "negative_prompt_2", "prompt_3", "negative_prompt_3"] {
        if let Some(n) = m[key].as_str() {
            text.push_str(&format!("{key} = {n:?}\n"));
        }
    }
    if let Some(n) = m["max_sequence_length"].as_u64() {
        text.push_str(&format!("max_sequence_length = {n}\n"));
    }
    if let Some(x) = m["true_cfg_scale"].as_f64().filter(|&x| x != 1.0) {
        text.push_str(&format!("true_cfg_scale = {x}\n"));
    }
    text.push_str(&format!(
        "guidance_scale = {}\nsteps = {}\nseed = {}\nbatch = {}\nwidth = {}\nheight = {}\noutput = \"out.png\"\nthreads = {}\n",
        m["guidance_scale"],
        m["steps"],
        m["seed"],
        m["batch"],
        m["width"],
        m["height"],
        crate::util::threads()
    ));
    let p = dir.join("m.toml");
    std::fs::write(&p, text).unwrap();
    p
}

fn check_case(case: &str) {
    check_case_with(case, &[]);
}

/// Reference tensors runner's `--dump` does not write, and why; every other tensor the
/// reference holds must be in the dump and is compared (a renamed dump key fails here).
const NOT_DUMPED: &[(&str, &str)] = &[
    // Each CLIP / T5 encoder's own outputs: the pipeline dumps what it makes of them
    // (`prompt_embeds`, `pooled_prompt_embeds`, `unet.encoder_hidden_states`: compared here); the
    // encoders alone are compared with these same tensors in tests/clip.rs and tests/t5.rs.
    ("text_encoder.", "per-encoder outputs: tests/clip.rs"),
    ("text_encoder_2.", "per-encoder outputs: tests/clip.rs"),
    ("text_encoder_3.", "T5 outputs: tests/t5.rs"),
];

/// Runs `case` with `--dump` and compares every tensor of diffusers' reference: token ids equal,
/// tensors within [`PIPELINE_TENSOR`], the image (the whole batch) within [`IMAGE`]; `must`
/// names tensors the case exists to check.
fn check_case_with(case: &str, must: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let manifest = manifest_for(case, dir.path());
    let dump = dir.path().join("dump");
    let (code, stdout, stderr) = run(runner().arg("run").arg(&manifest).arg("--dump").arg(&dump).arg("--quiet"));
    assert_eq!(code, 0, "{case}: {stderr}");
    assert!(stdout.contains("wrote"), "{stdout}");
    let got = refs_at(&dump.join("dump.safetensors"));
    let want = refs(case);
    let names: Vec<String> = want.names().cloned().collect();
    let missing: Vec<&String> = names.iter().filter(|n| got.get(n).is_none() && !NOT_DUMPED.iter().any(|(p, _)| n.starts_with(p))).collect();
    assert!(missing.is_empty(), "{case}: runner's dump lacks reference tensors {missing:?} (renamed? or add them to NOT_DUMPED with the reason)");
    assert!(names.iter().any(|n| n.starts_with("step")), "{case}: no steps compared: {names:?}");
    for n in must {
        assert!(names.iter().any(|x| x == n) && got.get(n).is_some(), "{case}: `{n}` not compared (runner's dump or the reference lacks it): {names:?}");
    }
    let mut compared = 0;
    for name in &names {
        let (Some(a), Some(b)) = (got.get(name), want.get(name)) else { continue };
        compared += 1;
        if name.starts_with("tokens.") {
            assert!(a.view([-1]).equal(&b.view([-1])), "{case}: {name}");
        } else if name == "image" {
            assert_eq!(a.size(), b.size(), "{case}: the image batch");
            check(&format!("{case}: image"), max_diff(a, b), IMAGE);
        } else {
            assert_eq!(a.numel(), b.numel(), "{case}: `{name}` sizes {:?} vs {:?}", a.size(), b.size());
            check(&format!("{case}: {name}"), rel(&a.reshape(b.size()), b), PIPELINE_TENSOR);
        }
    }
    eprintln!("{case}: {compared} tensors compared");
    let out = dir.path().join(if case_meta(case)["batch"].as_u64().unwrap_or(1) == 1 { "out.png" } else { "out-0.png" });
    assert!(out.is_file(), "{}", out.display());
}

#[test]
fn pndm() {
    check_case("sd15-pndm");
}
#[test]
fn euler() {
    check_case("sd15-euler");
}
#[test]
fn euler_ancestral() {
    check_case("sd15-euler-ancestral");
}
#[test]
fn ddim() {
    check_case("sd15-ddim");
}
#[test]
fn dpmpp_2m() {
    check_case("sd15-dpmpp-2m");
}
#[test]
fn dpmpp_2m_karras() {
    check_case("sd15-dpmpp-2m-karras");
}
#[test]
fn no_guidance_batch_of_two() {
    check_case("sd15-pndm-noguidance-batch2");
}
/// `components.vae.tiling = true` at 96x80: diffusers' `vae.enable_tiling()` image.
#[test]
fn vae_tiling_at_a_size_not_a_multiple_of_the_tile() {
    check_case("sd15-vae-tiling");
}
/// Tiling and slicing, a batch of 2.
#[test]
fn vae_tiling_and_slicing_batch_of_two() {
    check_case("sd15-vae-tiling-slicing-batch2");
}
#[test]
fn sdxl_with_negative_prompt() {
    check_case("sdxl-euler");
}
#[test]
fn sdxl_without_negative_prompt_uses_zeros() {
    check_case("sdxl-euler-noneg");
}

// ---- Stable Diffusion 3 / 3.5 (tiny-sd3, tiny-sd35: sharded T5, MMDiT and MMDiT-X) ----

#[test]
fn sd3_with_an_empty_negative_prompt() {
    check_case("sd3-cfg");
}

#[test]
fn sd3_non_square_with_a_negative_prompt_and_prompt_3() {
    check_case("sd3-negative-nonsquare");
}

#[test]
fn sd3_without_t5_uses_zeros() {
    check_case("sd3-no-t5");
}

#[test]
fn sd3_truncates_a_long_prompt_for_clip_and_t5() {
    check_case("sd3-long-prompt-msl16");
}

#[test]
fn sd35_mmdit_x_with_guidance() {
    check_case("sd35-cfg");
}

#[test]
fn sd35_without_guidance() {
    check_case("sd35-noguidance");
}

// ---- FLUX.1 (tiny-flux-dev, tiny-flux-schnell: the transformer in 2 shards, T5 in 2) ----

/// What every FLUX case must compare (the `--dump` contract).
const FLUX: [&str; 12] = [
    "prompt_embeds",
    "pooled_prompt_embeds",
    "text_ids",
    "latent_image_ids",
    "latents.init",
    "scheduler.timesteps",
    "scheduler.sigmas",
    "step0.transformer_output",
    "step0.noise_pred",
    "step0.latents",
    "latents.final",
    "image",
];

#[test]
fn flux_dev_with_embedded_guidance_and_dynamic_shift() {
    check_case_with("flux-dev", &FLUX);
}

#[test]
fn flux_schnell_non_square_with_prompt_2() {
    check_case_with("flux-schnell-nonsquare", &FLUX);
}

#[test]
fn flux_dev_with_true_cfg() {
    let mut must = FLUX.to_vec();
    must.extend(["negative_prompt_embeds", "negative_pooled_prompt_embeds", "step0.negative_transformer_output", "step2.negative_transformer_output"]);
    check_case_with("flux-dev-true-cfg", &must);
}

#[test]
fn flux_truncates_a_long_prompt_for_clip_and_t5() {
    check_case_with("flux-dev-long-prompt-msl16", &FLUX);
}

/// The bounds of src/parity.rs are far below what a real bug moves: the same prompt, seed and
/// weights through another scheduler (one wrong branch or sigma away) differs from the case by
/// more than 100x each bound, in the final latents and in the image.
#[test]
fn bounds_tell_schedulers_apart() {
    let cases = ["sd15-pndm", "sd15-euler", "sd15-euler-ancestral", "sd15-ddim", "sd15-dpmpp-2m", "sd15-dpmpp-2m-karras"];
    let stores: Vec<_> = cases.iter().map(|c| refs(c)).collect();
    for (i, a) in stores.iter().enumerate() {
        for (j, b) in stores.iter().enumerate().skip(i + 1) {
            let lat = rel(a.get("latents.final").unwrap(), b.get("latents.final").unwrap());
            let img = max_diff(a.get("image").unwrap(), b.get("image").unwrap());
            assert!(lat > 100.0 * PIPELINE_TENSOR.value, "{} vs {}: latents differ by only {lat:e}", cases[i], cases[j]);
            assert!(img > 100.0 * IMAGE.value, "{} vs {}: images differ by only {img:e}", cases[i], cases[j]);
        }
    }
}
