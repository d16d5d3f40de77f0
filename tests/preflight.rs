//! Everything knowable without loading a weight is refused by `validate`, `plan` and `run` alike,
//! with the file and key named: no "ok" for a manifest that cannot run, no libtorch trace later.

use std::path::{Path, PathBuf};

use crate::lock::copy_dir;
use crate::util::{root, run, runner};

/// A copy of the tiny SD 1.5 pipeline, damaged by `f`, and a manifest for it.
fn broken(dir: &Path, f: impl FnOnce(&Path)) -> PathBuf {
    let pipe = dir.join("pipe");
    copy_dir(&root().join("tests/fixtures/tiny-sd15"), &pipe);
    f(&pipe);
    let m = dir.join("m.toml");
    std::fs::write(
        &m,
        "schema_version = 1\nname = \"broken\"\n[pipeline]\nkind = \"stable-diffusion\"\nsource = \"pipe\"\n[run]\nprompt = \"a cat\"\nsteps = 1\nwidth = 64\nheight = 64\noutput = \"out.png\"\n",
    )
    .unwrap();
    m
}

fn edit_json(path: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

/// `validate`, `plan` and `run` all fail with `want` (exit 1, no panic, no libtorch trace), and
/// nothing is written.
fn refused(m: &Path, extra: &[&str], want: &str) {
    for cmd in ["validate", "plan", "run"] {
        let quiet: &[&str] = if cmd == "run" { &["--quiet"] } else { &[] };
        let (code, stdout, stderr) = run(runner().arg(cmd).arg(m).args(extra).args(quiet).env("RUST_BACKTRACE", "0"));
        let stderr = if cmd == "run" || cmd == "plan" { stderr } else { stderr + &stdout };
        assert_eq!(code, 1, "{cmd} {}: {stderr}", m.display());
        assert!(stderr.contains(want), "{cmd}: want {want:?} in:\n{stderr}");
        assert!(!stderr.contains("panicked") && !stderr.contains("Exception raised from") && !stderr.contains("libtorch failed"), "{cmd}: {stderr}");
    }
    assert!(!m.with_file_name("out.png").exists());
}

#[test]
fn the_folder_and_its_index() {
    let dir = tempfile::tempdir().unwrap();
    let m = broken(dir.path(), |p| std::fs::remove_file(p.join("model_index.json")).unwrap());
    refused(&m, &[], "has no `model_index.json`: it is not a diffusers pipeline folder");
    let dir = tempfile::tempdir().unwrap();
    let m = broken(dir.path(), |p| std::fs::remove_dir_all(p).unwrap());
    refused(&m, &[], "does not exist: the manifest cannot run");
    // The kind must be the folder's.
    let dir = tempfile::tempdir().unwrap();
    let m = broken(dir.path(), |_| {});
    refused(&m, &["--set", "pipeline.kind=stable-diffusion-xl"], "`pipeline.kind` is `stable-diffusion-xl` but");
}

#[test]
fn classes_runner_does_not_implement_are_named() {
    for (component, entry, want) in [
        ("unet", serde_json::json!(["diffusers", "UNet3DConditionModel"]), "`unet` is a `diffusers.UNet3DConditionModel`, which runner does not implement"),
        ("text_encoder", serde_json::json!(["evil", "MyEncoder"]), "`text_encoder` is a `evil.MyEncoder`, which runner does not implement"),
        ("scheduler", serde_json::json!(["diffusers", "UniPCMultistepScheduler"]), "supported for `scheduler`: `PNDMScheduler`"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let m = broken(dir.path(), |p| edit_json(&p.join("model_index.json"), |v| v[component] = entry.clone()));
        refused(&m, &[], want);
        let (_, _, stderr) = run(runner().arg("validate").arg(&m));
        assert!(stderr.contains(&format!("supported for `{component}`")), "{stderr}");
    }
}

#[test]
fn configs_missing_truncated_or_wrong() {
    type Damage = Box<dyn Fn(&Path)>;
    let cases: Vec<(&str, Damage, &str)> = vec![
        ("missing", Box::new(|p: &Path| std::fs::remove_file(p.join("unet/config.json")).unwrap()), "unet/config.json`: UNet2DConditionModel config: the file is missing"),
        ("truncated", Box::new(|p: &Path| std::fs::write(p.join("vae/config.json"), "{\"block_out_channels\": [32,").unwrap()), "vae/config.json`: AutoencoderKL config: not valid JSON (truncated?)"),
        ("a list", Box::new(|p: &Path| std::fs::write(p.join("unet/config.json"), "[]").unwrap()), "expected a JSON object, got a list"),
        ("negative", Box::new(|p: &Path| edit_json(&p.join("unet/config.json"), |v| v["layers_per_block"] = (-3).into())), "`layers_per_block` must be a positive integer, got -3"),
        ("groups", Box::new(|p: &Path| edit_json(&p.join("vae/config.json"), |v| v["norm_num_groups"] = 3.into())), "is not a multiple of `norm_num_groups` 3"),
        ("text", Box::new(|p: &Path| edit_json(&p.join("text_encoder/config.json"), |v| v["hidden_size"] = "32".into())), "`hidden_size` must be an integer"),
        ("mismatch", Box::new(|p: &Path| edit_json(&p.join("vae/config.json"), |v| v["latent_channels"] = 8.into())), "the VAE has 8 latent channels but the UNet takes 4"),
        ("scheduler", Box::new(|p: &Path| edit_json(&p.join("scheduler/scheduler_config.json"), |v| v["beta_schedule"] = "cubic".into())), "scheduler_config.json"),
    ];
    for (what, damage, want) in cases {
        let dir = tempfile::tempdir().unwrap();
        let m = broken(dir.path(), |p| damage(p));
        eprintln!("{what}");
        refused(&m, &[], want);
    }
}

/// A UNet pipeline refuses a flow-matching scheduler: the folder's own (SD3's config put in) or
/// the manifest's `flow-match-euler` over the folder's noise-prediction config.
/// `components.vae.tiling = true` takes its tile from the VAE config's `sample_size`: without
/// one, an error naming the file and the key.
#[test]
fn vae_tiling_needs_sample_size() {
    let dir = tempfile::tempdir().unwrap();
    let m = broken(dir.path(), |p| edit_json(&p.join("vae/config.json"), |v| v.as_object_mut().unwrap().retain(|k, _| k != "sample_size")));
    let text = std::fs::read_to_string(&m).unwrap().replace("[run]", "[components.vae]\ntiling = true\n[run]");
    std::fs::write(&m, text).unwrap();
    refused(&m, &[], "needs an integer `sample_size`");
    let (_, _, stderr) = run(runner().arg("plan").arg(&m));
    assert!(stderr.contains("pipe/vae/config.json") && stderr.contains("components.vae.tiling"), "{stderr}");
    // Without tiling the key is not needed.
    let text = std::fs::read_to_string(&m).unwrap().replace("tiling = true", "slicing = true");
    std::fs::write(&m, text).unwrap();
    let (code, _, stderr) = run(runner().arg("plan").arg(&m));
    assert_eq!(code, 0, "{stderr}");
}

#[test]
fn unet_pipelines_refuse_flow_matching_schedulers() {
    let dir = tempfile::tempdir().unwrap();
    let m = broken(dir.path(), |p| {
        std::fs::copy(root().join("tests/fixtures/tiny-sd3/scheduler/scheduler_config.json"), p.join("scheduler/scheduler_config.json")).unwrap();
        edit_json(&p.join("model_index.json"), |v| v["scheduler"] = serde_json::json!(["diffusers", "FlowMatchEulerDiscreteScheduler"]));
    });
    refused(&m, &[], "`FlowMatchEulerDiscreteScheduler` is a flow-matching scheduler, but a `stable-diffusion` pipeline needs a noise-prediction one");
    let dir = tempfile::tempdir().unwrap();
    let m = broken(dir.path(), |_| {});
    refused(&m, &["--set", "pipeline.scheduler=flow-match-euler"], "`FlowMatchEulerDiscreteScheduler` cannot run from a `PNDMScheduler` config");
}

#[test]
fn keys_that_depend_on_the_folder() {
    let dir = tempfile::tempdir().unwrap();
    let m = broken(dir.path(), |_| {});
    let layers = serde_json::from_str::<serde_json::Value>(&std::fs::read_to_string(dir.path().join("pipe/text_encoder/config.json")).unwrap()).unwrap()["num_hidden_layers"].as_u64().unwrap();
    refused(&m, &["--set", &format!("run.clip_skip={}", layers + 1)], &format!("`run.clip_skip` is {}, but the text encoder allow at most {layers}", layers + 1));
    let (code, _, stderr) = run(runner().arg("validate").arg(&m).args(["--set", &format!("run.clip_skip={layers}")]));
    assert_eq!(code, 0, "{stderr}");
    // run.latents: not a tensor file, or the wrong shape.
    std::fs::write(dir.path().join("latents.safetensors"), "not safetensors").unwrap();
    refused(&m, &["--set", "run.latents=latents.safetensors"], "`run.latents`");
    // A component source that is not a tensor file.
    std::fs::write(dir.path().join("unet.safetensors"), b"\x00\x00").unwrap();
    refused(&m, &["--set", "components.unet.source=unet.safetensors"], "unet.safetensors");
}

/// A copy of the tiny SD3 pipeline, damaged by `f`, and a manifest for it.
fn broken_sd3(dir: &Path, f: impl FnOnce(&Path)) -> PathBuf {
    let pipe = dir.join("pipe");
    copy_dir(&root().join("tests/fixtures/tiny-sd3"), &pipe);
    f(&pipe);
    let m = dir.join("m.toml");
    std::fs::write(
        &m,
        "schema_version = 1\nname = \"broken\"\n[pipeline]\nkind = \"stable-diffusion-3\"\nsource = \"pipe\"\n[run]\nprompt = \"a cat\"\nsteps = 1\nwidth = 64\nheight = 64\noutput = \"out.png\"\n",
    )
    .unwrap();
    m
}

#[test]
fn sd3_bad_input_is_refused_before_loading() {
    // The kind against the folder, both ways.
    let dir = tempfile::tempdir().unwrap();
    let m = broken_sd3(dir.path(), |_| {});
    refused(&m, &["--set", "pipeline.kind=stable-diffusion"], "holds a `StableDiffusion3Pipeline` (a transformer, not a UNet): set `kind = \"stable-diffusion-3\"`");
    let dir = tempfile::tempdir().unwrap();
    let m = broken(dir.path(), |_| {});
    refused(&m, &["--set", "pipeline.kind=stable-diffusion-3"], "without a `transformer`: set `kind = \"stable-diffusion\"`");
    // T5 missing while enabled: how to run without it.
    let dir = tempfile::tempdir().unwrap();
    let m = broken_sd3(dir.path(), |p| edit_json(&p.join("model_index.json"), |v| v["text_encoder_3"] = serde_json::json!([null, null])));
    refused(&m, &[], "set `components.text_encoder_3.enabled = false`");
    // A T5 shard missing; a tensor in two shards.
    let dir = tempfile::tempdir().unwrap();
    let m = broken_sd3(dir.path(), |p| std::fs::remove_file(p.join("text_encoder_3/model-00002-of-00002.safetensors")).unwrap());
    refused(&m, &[], "model-00002-of-00002.safetensors");
    let dir = tempfile::tempdir().unwrap();
    let m = broken_sd3(dir.path(), |p| {
        edit_json(&p.join("text_encoder_3/model.safetensors.index.json"), |v| {
            let map = v["weight_map"].as_object_mut().unwrap();
            let (name, _) = map.iter().find(|(_, f)| f.as_str() == Some("model-00001-of-00002.safetensors")).map(|(k, f)| (k.clone(), f.clone())).unwrap();
            map.insert(name, "model-00002-of-00002.safetensors".into());
        })
    });
    refused(&m, &[], "maps it to this shard");
    let dir = tempfile::tempdir().unwrap();
    let m = broken_sd3(dir.path(), |p| {
        // Shard 2 rewritten to also hold a tensor of shard 1.
        let t5 = p.join("text_encoder_3");
        let s1 = std::fs::read(t5.join("model-00001-of-00002.safetensors")).unwrap();
        let s2 = std::fs::read(t5.join("model-00002-of-00002.safetensors")).unwrap();
        let header = |b: &[u8]| -> (serde_json::Map<String, serde_json::Value>, Vec<u8>) {
            let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
            (serde_json::from_slice(&b[8..8 + n]).unwrap(), b[8 + n..].to_vec())
        };
        let (h1, d1) = header(&s1);
        let (mut h2, mut d2) = header(&s2);
        let (name, info) = h1.iter().find(|(k, _)| *k != "__metadata__").map(|(k, v)| (k.clone(), v.clone())).unwrap();
        let (a, b) = (info["data_offsets"][0].as_u64().unwrap() as usize, info["data_offsets"][1].as_u64().unwrap() as usize);
        let start = d2.len();
        d2.extend_from_slice(&d1[a..b]);
        let mut info = info.clone();
        info["data_offsets"] = serde_json::json!([start, start + (b - a)]);
        h2.insert(name, info);
        let mut h = serde_json::to_vec(&h2).unwrap();
        while h.len() % 8 != 0 {
            h.push(b' ');
        }
        let mut out = (h.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(&h);
        out.extend_from_slice(&d2);
        std::fs::write(t5.join("model-00002-of-00002.safetensors"), out).unwrap();
    });
    refused(&m, &[], "is in this shard but");
    // A tokenizer_3 folder without tokenizer.json.
    let dir = tempfile::tempdir().unwrap();
    let m = broken_sd3(dir.path(), |p| std::fs::remove_file(p.join("tokenizer_3/tokenizer.json")).unwrap());
    refused(&m, &[], "has `spiece.model` but no `tokenizer.json`");
    let dir = tempfile::tempdir().unwrap();
    let m = broken_sd3(dir.path(), |p| {
        std::fs::remove_file(p.join("tokenizer_3/tokenizer.json")).unwrap();
        std::fs::remove_file(p.join("tokenizer_3/spiece.model")).unwrap();
    });
    refused(&m, &[], "has neither `tokenizer.json` nor `spiece.model`");
    // A transformer config value runner does not implement, named.
    let dir = tempfile::tempdir().unwrap();
    let m = broken_sd3(dir.path(), |p| edit_json(&p.join("transformer/config.json"), |v| v["qk_norm"] = "layer_norm".into()));
    refused(&m, &[], "qk_norm");
    // Sizes: multiples of vae_scale_factor * patch_size (16 here).
    let dir = tempfile::tempdir().unwrap();
    let m = broken_sd3(dir.path(), |_| {});
    refused(&m, &["--set", "run.width=72"], "`run.width` is 72, but this pipeline needs a multiple of 16");
    // max_sequence_length: 1..=512, by the schema.
    for bad in ["0", "513"] {
        let dir = tempfile::tempdir().unwrap();
        let m = broken_sd3(dir.path(), |_| {});
        refused(&m, &["--set", &format!("run.max_sequence_length={bad}")], "max_sequence_length");
    }
}

#[test]
fn sd3_runs_without_t5_when_disabled() {
    let dir = tempfile::tempdir().unwrap();
    let m = broken_sd3(dir.path(), |p| edit_json(&p.join("model_index.json"), |v| v["text_encoder_3"] = serde_json::json!([null, null])));
    let (code, stdout, stderr) = run(runner().arg("run").arg(&m).args(["--quiet", "--json", "--set", "components.text_encoder_3.enabled=false"]));
    assert_eq!(code, 0, "{stderr}");
    let r: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert!(r["device_map"].get("text_encoder_3").is_none(), "{r}");
    assert!(m.with_file_name("out.png").is_file());
}

#[test]
fn sd3_clip_skip_counts_from_the_penultimate_layer() {
    // tiny-sd3's CLIPs have 3 layers: diffusers takes hidden_states[-(k + 2)] of 4, so k <= 2.
    let dir = tempfile::tempdir().unwrap();
    let m = broken_sd3(dir.path(), |_| {});
    refused(&m, &["--set", "run.clip_skip=3"], "`run.clip_skip` is 3, but the text encoders allow at most 2");
    let (code, _, stderr) = run(runner().arg("validate").arg(&m).args(["--set", "run.clip_skip=2"]));
    assert_eq!(code, 0, "{stderr}");
}

/// A copy of a tiny FLUX pipeline (`tiny-flux-dev` or `tiny-flux-schnell`), damaged by `f`, and a
/// manifest for it.
fn broken_flux(dir: &Path, fixture: &str, f: impl FnOnce(&Path)) -> PathBuf {
    let pipe = dir.join("pipe");
    copy_dir(&root().join("tests/fixtures").join(fixture), &pipe);
    f(&pipe);
    let m = dir.join("m.toml");
    std::fs::write(
        &m,
        "schema_version = 1\nname = \"broken\"\n[pipeline]\nkind = \"flux\"\nsource = \"pipe\"\n[run]\nprompt = \"a cat\"\nsteps = 1\nwidth = 64\nheight = 64\nmax_sequence_length = 16\noutput = \"out.png\"\n",
    )
    .unwrap();
    m
}

/// `validate` passes with `want` among its warnings.
fn warned(m: &Path, extra: &[&str], want: &str) {
    let (code, stdout, stderr) = run(runner().arg("validate").arg(m).args(extra));
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("warning"), "{stdout}");
    assert!(stderr.contains(&format!("warning: {want}")), "want {want:?} in:\n{stderr}");
}

#[test]
fn flux_kind_against_the_folder_both_ways() {
    // A `flux` manifest on SD3 and SDXL folders: the kind they need.
    let dir = tempfile::tempdir().unwrap();
    let m = broken_flux(dir.path(), "tiny-flux-dev", |_| {});
    let sd3 = root().join("tests/fixtures/tiny-sd3");
    refused(
        &m,
        &["--set", &format!("pipeline.source={}", sd3.display())],
        "holds a `StableDiffusion3Pipeline`, not a FLUX pipeline (no `FluxTransformer2DModel`): set `kind = \"stable-diffusion-3\"`",
    );
    let sdxl = root().join("tests/fixtures/tiny-sdxl");
    refused(
        &m,
        &["--set", &format!("pipeline.source={}", sdxl.display())],
        "holds a `StableDiffusionXLPipeline`, not a FLUX pipeline (no `FluxTransformer2DModel`): set `kind = \"stable-diffusion-xl\"`",
    );
    // SD3, SDXL and SD manifests on a FLUX folder: `flux`.
    for kind in ["stable-diffusion-3", "stable-diffusion-xl", "stable-diffusion"] {
        refused(&m, &["--set", &format!("pipeline.kind={kind}")], &format!("`pipeline.kind` is `{kind}` but"));
        refused(&m, &["--set", &format!("pipeline.kind={kind}")], "holds a `FluxPipeline` (FLUX.1: a `FluxTransformer2DModel` with CLIP-L and T5): set `kind = \"flux\"`");
    }
    // Recognised by the transformer's class too, whatever the pipeline class says.
    let dir = tempfile::tempdir().unwrap();
    let m = broken_flux(dir.path(), "tiny-flux-dev", |p| edit_json(&p.join("model_index.json"), |v| v["_class_name"] = "MyPipeline".into()));
    refused(&m, &["--set", "pipeline.kind=stable-diffusion-3"], "set `kind = \"flux\"`");
    let (code, _, stderr) = run(runner().arg("validate").arg(&m));
    assert_eq!(code, 0, "{stderr}");
}

#[test]
fn flux_bad_input_is_refused_before_loading() {
    // Sizes: multiples of 16 (the VAE's 8 x FLUX's 2x2 packing).
    let dir = tempfile::tempdir().unwrap();
    let m = broken_flux(dir.path(), "tiny-flux-dev", |_| {});
    refused(&m, &["--set", "run.width=72"], "`run.width` is 72, but this pipeline needs a multiple of 16 (the VAE's scale factor times 2: FLUX packs 2x2 latent patches)");
    refused(&m, &["--set", "run.height=56"], "`run.height` is 56, but this pipeline needs a multiple of 16");
    // max_sequence_length: 1..=512, by the schema.
    for bad in ["0", "513"] {
        refused(&m, &["--set", &format!("run.max_sequence_length={bad}")], "max_sequence_length");
    }
    // Noise-prediction schedulers do not fit: flow-match-euler does.
    refused(&m, &["--set", "pipeline.scheduler=euler"], "a flow-matching model (SD3, FLUX) needs a flow-matching scheduler");
    let (code, _, stderr) = run(runner().arg("validate").arg(&m).args(["--set", "pipeline.scheduler=flow-match-euler"]));
    assert_eq!(code, 0, "{stderr}");
    // A transformer shard missing.
    let dir = tempfile::tempdir().unwrap();
    let m = broken_flux(dir.path(), "tiny-flux-dev", |p| std::fs::remove_file(p.join("transformer/diffusion_pytorch_model-00002-of-00002.safetensors")).unwrap());
    refused(&m, &[], "diffusion_pytorch_model-00002-of-00002.safetensors");
    // No text_encoder_2 (T5): FLUX cannot run without it.
    let dir = tempfile::tempdir().unwrap();
    let m = broken_flux(dir.path(), "tiny-flux-dev", |p| edit_json(&p.join("model_index.json"), |v| v["text_encoder_2"] = serde_json::json!([null, null])));
    refused(&m, &[], "the pipeline has no `text_encoder_2`");
    refused(&m, &[], "a `flux` pipeline needs its T5 encoder (`T5EncoderModel`)");
    let dir = tempfile::tempdir().unwrap();
    let m = broken_flux(dir.path(), "tiny-flux-dev", |p| std::fs::remove_dir_all(p.join("text_encoder_2")).unwrap());
    refused(&m, &[], "text_encoder_2");
    // ... nor disabled.
    let dir = tempfile::tempdir().unwrap();
    let m = broken_flux(dir.path(), "tiny-flux-dev", |_| {});
    refused(&m, &["--set", "components.text_encoder_2.enabled=false"], "component `text_encoder_2` cannot be disabled: a `flux` pipeline needs it");
    // SD3's T5 name is not a FLUX component.
    refused(&m, &["--set", "components.text_encoder_3.offload=model"], "unknown component `text_encoder_3` for a `flux` pipeline");
    // Classes: FLUX's text_encoder_2 is T5, its text_encoder a CLIP without projection.
    let dir = tempfile::tempdir().unwrap();
    let m = broken_flux(dir.path(), "tiny-flux-dev", |p| edit_json(&p.join("model_index.json"), |v| v["text_encoder_2"] = serde_json::json!(["transformers", "CLIPTextModelWithProjection"])));
    refused(&m, &[], "`text_encoder_2` is a `transformers.CLIPTextModelWithProjection`, which runner does not implement");
    refused(&m, &[], "supported for `text_encoder_2`: `T5EncoderModel`");
    // The T5 tokenizer folder needs tokenizer.json.
    let dir = tempfile::tempdir().unwrap();
    let m = broken_flux(dir.path(), "tiny-flux-dev", |p| std::fs::remove_file(p.join("tokenizer_2/tokenizer.json")).unwrap());
    refused(&m, &[], "tokenizer_2` has `spiece.model` but no `tokenizer.json`");
    // Components that do not fit together.
    for (file, key, value, want) in [
        ("transformer/config.json", "pooled_projection_dim", 16, "text_encoder's hidden_size is 8 but the transformer's pooled_projection_dim is 16"),
        ("transformer/config.json", "joint_attention_dim", 16, "text_encoder_2's d_model is 24 but the transformer's joint_attention_dim is 16"),
        ("vae/config.json", "latent_channels", 8, "the VAE has 8 latent channels, so 2x2 packed patches have 32, but the transformer takes 64"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let m = broken_flux(dir.path(), "tiny-flux-dev", |p| {
            let path = p.join(file);
            std::fs::remove_file(&path).unwrap(); // a copy, not the fixture's link target
            std::fs::copy(root().join("tests/fixtures/tiny-flux-dev").join(file), &path).unwrap();
            edit_json(&path, |v| v[key] = value.into());
        });
        refused(&m, &[], want);
    }
    // A transformer config value runner does not implement, named.
    let dir = tempfile::tempdir().unwrap();
    let m = broken_flux(dir.path(), "tiny-flux-dev", |p| edit_json(&p.join("transformer/config.json"), |v| v["patch_size"] = 2.into()));
    refused(&m, &[], "`patch_size` = 2 is not supported");
}

#[test]
fn flux_keys_with_no_effect_are_warnings() {
    // schnell has no guidance embedding: a guidance_scale is ignored.
    let dir = tempfile::tempdir().unwrap();
    let m = broken_flux(dir.path(), "tiny-flux-schnell", |_| {});
    warned(&m, &["--set", "run.guidance_scale=3.5"], "`run.guidance_scale` is 3.5, but this FLUX transformer has no guidance embedding (`guidance_embeds = false`, as FLUX.1-schnell): it is ignored");
    let (_, stdout, stderr) = run(runner().arg("validate").arg(&m));
    assert!(!stderr.contains("warning") && stdout.contains("ok:"), "{stderr}");
    // ... dev has one: no warning.
    let dir = tempfile::tempdir().unwrap();
    let m = broken_flux(dir.path(), "tiny-flux-dev", |_| {});
    let (code, _, stderr) = run(runner().arg("validate").arg(&m).args(["--set", "run.guidance_scale=3.5"]));
    assert!(code == 0 && !stderr.contains("warning"), "{stderr}");
    // True CFG without a negative prompt: one pass, as diffusers.
    warned(&m, &["--set", "run.true_cfg_scale=4"], "`run.true_cfg_scale` is 4, but there is no `run.negative_prompt`: true CFG is off");
    warned(&m, &["--set", "run.true_cfg_scale=4", "--set", "run.negative_prompt_2=blurry"], "`run.true_cfg_scale` is 4");
    let (_, _, stderr) = run(runner().arg("validate").arg(&m).args(["--set", "run.true_cfg_scale=4", "--set", "run.negative_prompt_2=blurry"]));
    assert!(stderr.contains("`negative_prompt_2` alone does not"), "{stderr}");
    let (code, _, stderr) = run(runner().arg("validate").arg(&m).args(["--set", "run.true_cfg_scale=4", "--set", "run.negative_prompt="]));
    assert!(code == 0 && !stderr.contains("warning"), "an empty negative prompt counts: {stderr}");
    // Keys FluxPipeline does not take.
    warned(&m, &["--set", "run.clip_skip=1"], "`run.clip_skip` only applies to `stable-diffusion`, `stable-diffusion-xl` and `stable-diffusion-3` pipelines and is ignored here");
    warned(&m, &["--set", "run.prompt_3=x"], "`run.prompt_3` only applies to `stable-diffusion-3` pipelines and is ignored here");
    // ... and FLUX's own key elsewhere.
    let (code, _, stderr) = run(runner().args(["validate", "manifests/tiny-sd3.toml", "--set", "run.true_cfg_scale=2"]));
    assert_eq!(code, 0);
    assert!(stderr.contains("`run.true_cfg_scale` only applies to `flux` pipelines and is ignored here"), "{stderr}");
    // `runner config` names the new key's origin.
    let (code, stdout, stderr) = run(runner().args(["config", "--json", "manifests/tiny-flux-dev.toml", "--set", "run.true_cfg_scale=2", "--set", "run.negative_prompt=blurry"]));
    assert_eq!(code, 0, "{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["manifest"]["pipeline"]["kind"], "flux");
    assert_eq!(v["manifest"]["run"]["true_cfg_scale"], 2.0);
    assert_eq!(v["origins"]["run.true_cfg_scale"], "command line `--set run.true_cfg_scale=2`", "{v}");
    // The plan shows the warnings too.
    let dir = tempfile::tempdir().unwrap();
    let m = broken_flux(dir.path(), "tiny-flux-schnell", |_| {});
    let (code, _, stderr) = run(runner().arg("plan").arg(&m).args(["--set", "run.guidance_scale=2"]));
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("warning: `run.guidance_scale` is 2"), "{stderr}");
}

#[test]
fn offload_target_and_group_blocks_without_their_offload_are_warnings() {
    let m = root().join("manifests/tiny-sdxl.toml");
    warned(&m, &["--set", "components.unet.offload_target=disk"], "`unet` does not offload (`offload = \"none\"`): `offload_target` does nothing for it");
    warned(&m, &["--set", "components.unet.offload=model", "--set", "components.unet.group_blocks=2"], "`unet` uses `offload = \"model\"`, not `group`: `group_blocks` does nothing for it");
    let (code, _, stderr) = run(runner().arg("validate").arg(&m).args(["--set", "placement.offload=group", "--set", "components.unet.group_blocks=2", "--set", "components.unet.offload_target=disk"]));
    assert!(code == 0 && !stderr.contains("warning"), "{stderr}");
}
