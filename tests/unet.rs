//! UNet2DConditionModel and the AutoencoderKL decoder (SD, SDXL and SD3's) against diffusers' own
//! outputs on the tiny fixtures (f32, CPU).

use runner::checkpoint::layout::{resolve_folder, Checkpoint, Library, VariantPolicy};
use runner::checkpoint::load::Mapped;
use runner::checkpoint::load::{load, LoadOptions, TensorStore};
use runner::models::unet_2d::{AddedCond, UNet2DConditionConfig, UNet2DConditionModel};
use runner::models::vae::{AutoencoderKLConfig, AutoencoderKLDecoder, AutoencoderKLEncoder, DecodeMode, Tile};
use runner::models::weights::build_from_checkpoint;
use tch::nn::VarStore;
use tch::{Device, Kind};

pub use crate::util::rel;
use crate::util::root;
use runner::parity::{check, MODEL};

pub fn refs(case: &str) -> TensorStore {
    refs_at(&crate::util::refs_path(&format!("{case}.safetensors")))
}

/// Every tensor of a safetensors file.
pub fn refs_at(p: &std::path::Path) -> TensorStore {
    let ck = Checkpoint::open(runner::checkpoint::layout::resolve_source(p, None, None, VariantPolicy::Require).unwrap()).unwrap();
    load(&ck, None, LoadOptions { float_kind: None, device: Device::Cpu, populate: false }).unwrap()
}

fn config(dir: &std::path::Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap()
}

fn weights(dir: &std::path::Path) -> Checkpoint {
    Checkpoint::open(resolve_folder(dir, Some(Library::Diffusers), None, VariantPolicy::Require).unwrap()).unwrap()
}

/// The UNet, and the mapped checkpoint its parameters view (keep it while the UNet is used).
fn unet(pipeline: &str) -> (UNet2DConditionModel, Mapped) {
    let dir = root().join(format!("tests/fixtures/{pipeline}/unet"));
    let vs = VarStore::new(Device::Cpu);
    let cfg = UNet2DConditionConfig::from_json(&config(&dir)).unwrap();
    build_from_checkpoint(&vs, &weights(&dir), "UNet2DConditionModel", Kind::Float, |root| UNet2DConditionModel::new(root, cfg.clone())).unwrap()
}

#[test]
fn unet_matches_diffusers() {
    crate::util::set_threads();
    for (case, pipeline) in [("sd15-pndm", "tiny-sd15"), ("sdxl-euler", "tiny-sdxl")] {
        let r = refs(case);
        let (m, _mapped) = unet(pipeline);
        let ctx = r.get("unet.encoder_hidden_states").unwrap();
        let mut i = 0;
        while let Some(input) = r.get(&format!("step{i}.unet_input")) {
            let t = r.get(&format!("step{i}.timestep")).unwrap().double_value(&[0]);
            let added = r.get("unet.added_cond.time_ids").map(|time_ids| AddedCond { text_embeds: r.get("unet.added_cond.text_embeds").unwrap(), time_ids });
            let out = tch::no_grad(|| m.forward(input, t, ctx, added));
            let want = r.get(&format!("step{i}.unet_output")).unwrap();
            check(&format!("{case}: unet step{i}"), rel(&out, want), MODEL);
            assert!(rel(&out, &(want * 1.001)) > MODEL.value, "the comparison discriminates");
            i += 1;
        }
        assert!(i >= 4);
    }
}

#[test]
fn vae_decoder_matches_diffusers() {
    crate::util::set_threads();
    for (case, pipeline) in [("sd15-pndm", "tiny-sd15"), ("sdxl-euler", "tiny-sdxl")] {
        let r = refs(case);
        let dir = root().join(format!("tests/fixtures/{pipeline}/vae"));
        let vs = VarStore::new(Device::Cpu);
        let cfg = AutoencoderKLConfig::from_json(&config(&dir)).unwrap();
        let ck = weights(&dir);
        // The decoder alone: the encoder's keys are not ours to load yet.
        let dec_only = Checkpoint { tensors: ck.tensors.iter().filter(|(k, _)| !k.starts_with("encoder.") && !k.starts_with("quant_conv.")).map(|(k, v)| (k.clone(), v.clone())).collect(), ..ck };
        let (vae, _mapped) = build_from_checkpoint(&vs, &dec_only, "AutoencoderKL", Kind::Float, |root| AutoencoderKLDecoder::new(root, cfg.clone())).unwrap();
        let img = tch::no_grad(|| vae.latents_to_image(r.get("latents.final").unwrap()));
        check(&format!("{case}: vae decode"), rel(&img, r.get("vae.image").unwrap()), MODEL);
        assert!(img.abs().sum(Kind::Float).double_value(&[]) > 1.0);
    }
}

/// A tiny VAE's decoder (`pipeline`'s), f32 on the CPU.
fn vae_decoder(pipeline: &str) -> (AutoencoderKLDecoder, Mapped) {
    let dir = root().join(format!("tests/fixtures/{pipeline}/vae"));
    let cfg = AutoencoderKLConfig::from_json(&config(&dir)).unwrap();
    let ck = weights(&dir);
    let dec_only = Checkpoint { tensors: ck.tensors.iter().filter(|(k, _)| !k.starts_with("encoder.") && !k.starts_with("quant_conv.")).map(|(k, v)| (k.clone(), v.clone())).collect(), ..ck };
    build_from_checkpoint(&VarStore::new(Device::Cpu), &dec_only, "AutoencoderKL", Kind::Float, |root| AutoencoderKLDecoder::new(root, cfg.clone())).unwrap()
}

/// diffusers' `enable_tiling` / `enable_slicing` (tools/make_references_vae.py): 12x10 latents,
/// not a multiple of the 8-latent tile nor of its stride 6, through tiny-sd15's VAE
/// (post_quant_conv per tile) and tiny-sd3's (16 channels, no quant convs); a batch of 2 sliced,
/// with and without tiling.
#[test]
fn vae_tiled_and_sliced_decode_match_diffusers() {
    crate::util::set_threads();
    let r = refs("vae-tiling");
    for (key, pipeline) in [("sd15", "tiny-sd15"), ("sd3", "tiny-sd3")] {
        let (mut vae, _mapped) = vae_decoder(pipeline);
        let tile = vae.config.tile(std::path::Path::new("vae/config.json")).unwrap();
        assert_eq!(tile, Tile { sample: 64, latent: 8 });
        assert_eq!((tile.overlap(), tile.blend(), tile.row_limit(), tile.count(12), tile.count(10)), (6, 16, 48, 2, 2));
        let z = r.get(&format!("{key}.z")).unwrap();
        let untiled = tch::no_grad(|| vae.decode(z));
        check(&format!("vae-tiling {key}: untiled"), rel(&untiled, r.get(&format!("{key}.untiled")).unwrap()), MODEL);
        vae.mode = DecodeMode { tiling: Some(tile), slicing: false };
        let tiled = tch::no_grad(|| vae.decode(z));
        let want = r.get(&format!("{key}.tiled")).unwrap();
        assert_eq!(tiled.size(), [1, 3, 96, 80]);
        check(&format!("vae-tiling {key}: tiled"), rel(&tiled, want), MODEL);
        assert!(rel(&untiled, want) > 1e-3, "{key}: tiling changes the image, so the check sees it");
        // A latent within the tile is decoded whole, as diffusers' `_decode` decides.
        let small = z.narrow(2, 0, 8).narrow(3, 0, 8);
        assert!(tch::no_grad(|| vae.decode(&small)).equal(&tch::no_grad(|| {
            vae.mode = DecodeMode::default();
            vae.decode(&small)
        })));
    }
    let (mut vae, _mapped) = vae_decoder("tiny-sd15");
    let z = r.get("sd15.batch.z").unwrap();
    let tile = vae.config.tile(std::path::Path::new("vae/config.json")).unwrap();
    for (name, mode) in [("sliced", DecodeMode { tiling: None, slicing: true }), ("sliced_tiled", DecodeMode { tiling: Some(tile), slicing: true })] {
        vae.mode = mode;
        let got = tch::no_grad(|| vae.decode(z));
        check(&format!("vae-tiling sd15 batch 2: {name}"), rel(&got, r.get(&format!("sd15.batch.{name}")).unwrap()), MODEL);
    }
    // Tiling needs an integer `sample_size`: an error naming the file and the key.
    let mut v = config(&root().join("tests/fixtures/tiny-sd15/vae"));
    for bad in [serde_json::Value::Null, serde_json::json!([64, 64])] {
        v["sample_size"] = bad;
        let e = AutoencoderKLConfig::from_json(&v).unwrap().tile(std::path::Path::new("x/vae/config.json")).unwrap_err().to_string();
        assert!(e.contains("x/vae/config.json") && e.contains("`sample_size`") && e.contains("tiling"), "{e}");
    }
    v["sample_size"] = 8.into();
    let e = AutoencoderKLConfig::from_json(&v).unwrap().tile(std::path::Path::new("vae/config.json")).unwrap_err().to_string();
    assert!(e.contains("`sample_size` 8 is too small to tile"), "{e}");
}

/// SD3 / SD3.5's VAE: 16 latent channels, no quant convs, latents scaled and shifted
/// (`latents / scaling_factor + shift_factor`) before decoding.
#[test]
fn sd3_vae_decoder_matches_diffusers() {
    crate::util::set_threads();
    for (case, pipeline) in [("sd3-cfg", "tiny-sd3"), ("sd3-negative-nonsquare", "tiny-sd3"), ("sd35-cfg", "tiny-sd35")] {
        let r = refs(case);
        let dir = root().join(format!("tests/fixtures/{pipeline}/vae"));
        let cfg = AutoencoderKLConfig::from_json(&config(&dir)).unwrap();
        assert_eq!((cfg.latent_channels, cfg.use_quant_conv, cfg.use_post_quant_conv), (16, false, false), "{pipeline}");
        assert_eq!(cfg.shift_factor, Some(0.0609));
        let ck = weights(&dir);
        assert!(!ck.tensors.keys().any(|k| k.contains("quant_conv")), "{pipeline}: no quant convs in the checkpoint");
        let dec_only = Checkpoint { tensors: ck.tensors.iter().filter(|(k, _)| !k.starts_with("encoder.")).map(|(k, v)| (k.clone(), v.clone())).collect(), ..ck };
        let vs = VarStore::new(Device::Cpu);
        let (vae, _mapped) = build_from_checkpoint(&vs, &dec_only, "AutoencoderKL", Kind::Float, |root| AutoencoderKLDecoder::new(root, cfg.clone())).unwrap();
        let latents = r.get("latents.final").unwrap();
        // The scale and shift, op for op: equal.
        let z = vae.unscale_latents(latents);
        assert!(z.equal(r.get("vae.input").unwrap()), "{case}: vae.decode's input differs by {:e}", rel(&z, r.get("vae.input").unwrap()));
        let img = tch::no_grad(|| vae.latents_to_image(latents));
        let want = r.get("image").unwrap();
        assert_eq!(img.size(), want.size(), "{case}");
        check(&format!("{case}: vae decode"), rel(&img, want), MODEL);
        // Without the shift the image is measurably different: the check sees it.
        let unshifted = tch::no_grad(|| vae.decode(&(latents / cfg.scaling_factor)));
        let unshifted = (unshifted / 2.0 + 0.5).clamp(0.0, 1.0).permute([0, 2, 3, 1]);
        assert!(rel(&unshifted, want) > 1e-3, "{case}: the shift is visible");
    }
    // A config that asks for post_quant_conv on a checkpoint without one: an error naming it.
    let dir = root().join("tests/fixtures/tiny-sd3/vae");
    let mut v = config(&dir);
    v["use_post_quant_conv"] = true.into();
    let cfg = AutoencoderKLConfig::from_json(&v).unwrap();
    let ck = weights(&dir);
    let dec_only = Checkpoint { tensors: ck.tensors.iter().filter(|(k, _)| !k.starts_with("encoder.")).map(|(k, v)| (k.clone(), v.clone())).collect(), ..ck };
    let e = build_from_checkpoint(&VarStore::new(Device::Cpu), &dec_only, "AutoencoderKL", Kind::Float, |root| AutoencoderKLDecoder::new(root, cfg.clone())).err().unwrap().to_string();
    assert!(e.contains("post_quant_conv"), "{e}");
}

#[test]
fn unsupported_configs_are_errors() {
    let dir = root().join("tests/fixtures/tiny-sd15/unet");
    let mut cfg = config(&dir);
    cfg["down_block_types"][0] = "AttnDownBlock2D".into();
    let e = UNet2DConditionConfig::from_json(&cfg).unwrap_err().to_string();
    assert!(e.contains("block type `AttnDownBlock2D` is not supported"), "{e}");
    let mut cfg = config(&dir);
    cfg["addition_embed_type"] = "image".into();
    let e = UNet2DConditionConfig::from_json(&cfg).unwrap_err().to_string();
    assert!(e.contains("`addition_embed_type` `image` is not supported"), "{e}");
}

#[test]
fn broken_configs_are_errors_naming_the_key_never_defaults() {
    // Wrong types and impossible values: an error naming the key, before any tensor exists.
    let unet = config(&root().join("tests/fixtures/tiny-sd15/unet"));
    for (key, value, want) in [
        ("layers_per_block", serde_json::json!(-3), "`layers_per_block` must be a positive integer, got -3"),
        ("layers_per_block", serde_json::json!("2"), "`layers_per_block` must be a positive integer, got \"2\""),
        ("in_channels", serde_json::json!(0), "`in_channels` must be between 1 and 1048576, got 0"),
        ("cross_attention_dim", serde_json::json!(u64::MAX), "`cross_attention_dim` must be between 1 and 1048576, got 18446744073709551615"),
        ("block_out_channels", serde_json::json!([32, "64"]), "`block_out_channels[1]` must be a positive integer"),
        ("block_out_channels", serde_json::json!([]), "`block_out_channels` must not be empty"),
        ("norm_num_groups", serde_json::json!(7), "is not a multiple of `norm_num_groups` 7"),
        ("attention_head_dim", serde_json::json!(0), "`attention_head_dim` must be between 1 and 1048576, got 0"),
        ("norm_eps", serde_json::json!("tiny"), "`norm_eps` must be a finite number"),
        ("use_linear_projection", serde_json::json!("yes"), "`use_linear_projection` must be true or false"),
        ("down_block_types", serde_json::json!("CrossAttnDownBlock2D"), "`down_block_types` must be a list of strings"),
    ] {
        let mut cfg = unet.clone();
        cfg[key] = value.clone();
        let e = UNet2DConditionConfig::from_json(&cfg).unwrap_err().to_string();
        assert!(e.contains(want) && e.contains("unet/config.json"), "{key} = {value}: {e}");
    }
    for bad in [serde_json::json!([1, 2]), serde_json::json!(null), serde_json::json!("unet")] {
        let e = UNet2DConditionConfig::from_json(&bad).unwrap_err().to_string();
        assert!(e.contains("expected a JSON object"), "{e}");
    }
    // A null key takes diffusers' default, as diffusers does.
    let mut cfg = unet.clone();
    cfg["num_attention_heads"] = serde_json::Value::Null;
    assert!(UNet2DConditionConfig::from_json(&cfg).is_ok());
    let vae = config(&root().join("tests/fixtures/tiny-sd15/vae"));
    for (key, value, want) in [
        ("latent_channels", serde_json::json!(-4), "`latent_channels` must be a positive integer, got -4"),
        ("scaling_factor", serde_json::json!(0.0), "`scaling_factor` must not be 0"),
        ("force_upcast", serde_json::json!(1), "`force_upcast` must be true or false"),
        ("norm_num_groups", serde_json::json!(5), "is not a multiple of `norm_num_groups` 5"),
        ("shift_factor", serde_json::json!("0.06"), "`shift_factor` must be a finite number"),
        ("use_quant_conv", serde_json::json!(0), "`use_quant_conv` must be true or false"),
        ("use_post_quant_conv", serde_json::json!("false"), "`use_post_quant_conv` must be true or false"),
    ] {
        let mut cfg = vae.clone();
        cfg[key] = value.clone();
        let e = AutoencoderKLConfig::from_json(&cfg).unwrap_err().to_string();
        assert!(e.contains(want) && e.contains("vae/config.json"), "{key} = {value}: {e}");
    }
    // Files: missing, truncated, not an object.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.json");
    let e = UNet2DConditionConfig::from_file(&path).unwrap_err().to_string();
    assert!(e.contains(&path.display().to_string()) && e.contains("the file is missing"), "{e}");
    std::fs::write(&path, &serde_json::to_string(&unet).unwrap()[..40]).unwrap();
    assert!(UNet2DConditionConfig::from_file(&path).unwrap_err().to_string().contains("not valid JSON (truncated?)"));
    std::fs::write(&path, "[1, 2]").unwrap();
    assert!(AutoencoderKLConfig::from_file(&path).unwrap_err().to_string().contains("expected a JSON object, got a list"));
}

#[test]
fn vae_encoder_matches_diffusers() {
    crate::util::set_threads();
    let r = refs("vae-encode");
    for pipeline in ["tiny-sd15", "tiny-sdxl"] {
        let dir = root().join(format!("tests/fixtures/{pipeline}/vae"));
        let cfg = config(&dir);
        let vs = VarStore::new(Device::Cpu);
        let vae_cfg = AutoencoderKLConfig::from_json(&cfg).unwrap();
        let ck = weights(&dir);
        let enc_only = Checkpoint { tensors: ck.tensors.iter().filter(|(k, _)| k.starts_with("encoder.") || k.starts_with("quant_conv.")).map(|(k, v)| (k.clone(), v.clone())).collect(), ..ck };
        let (enc, _mapped) = build_from_checkpoint(&vs, &enc_only, "AutoencoderKL", Kind::Float, |root| AutoencoderKLEncoder::new(root, vae_cfg.clone(), 3, vae_cfg.use_quant_conv)).unwrap();
        let (mean, logvar) = tch::no_grad(|| enc.encode(r.get(&format!("{pipeline}.input")).unwrap()));
        check(&format!("vae-encode {pipeline}: mean"), rel(&mean, r.get(&format!("{pipeline}.mean")).unwrap()), MODEL);
        check(&format!("vae-encode {pipeline}: logvar"), rel(&logvar, r.get(&format!("{pipeline}.logvar")).unwrap()), MODEL);
    }
}
