//! SD3Transformer2DModel against diffusers' own transformer outputs recorded along the SD3 and
//! SD 3.5 pipelines on tests/fixtures/tiny-sd3 and tiny-sd35 (tools/make_fixtures_sd3.py,
//! tools/make_references.py): f32, CPU, every recorded step.

use std::path::PathBuf;

use runner::checkpoint::layout::{resolve_folder, Checkpoint, Library, VariantPolicy};
use runner::models::sd3_transformer::{QkNorm, SD3Transformer2DConfig, SD3Transformer2DModel, Sd3Error};
use tch::{Device, Kind, Tensor};

use crate::unet::{refs, rel};
use crate::util::root;

fn dir(pipeline: &str) -> PathBuf {
    root().join(format!("tests/fixtures/{pipeline}/transformer"))
}

fn config_json(pipeline: &str) -> (serde_json::Value, PathBuf) {
    let path = dir(pipeline).join("config.json");
    (serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap(), path)
}

fn config(pipeline: &str) -> SD3Transformer2DConfig {
    let (v, path) = config_json(pipeline);
    SD3Transformer2DConfig::from_json(&v, &path).unwrap()
}

fn checkpoint(pipeline: &str) -> Checkpoint {
    Checkpoint::open(resolve_folder(&dir(pipeline), Some(Library::Diffusers), None, VariantPolicy::Require).unwrap()).unwrap()
}

fn model(pipeline: &str) -> SD3Transformer2DModel {
    SD3Transformer2DModel::load(&config(pipeline), &checkpoint(pipeline), Device::Cpu, Kind::Float).unwrap()
}

/// Every recorded step of `case`: the largest relative difference to diffusers' output.
fn worst_step(m: &SD3Transformer2DModel, case: &str) -> f64 {
    let r = refs(case);
    let info: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(crate::util::refs_path(&format!("{case}.json"))).unwrap()).unwrap();
    // Under CFG the pipeline batches cat([negative, positive]).
    let cond = |name: &str| {
        let pos = r.get(name).unwrap();
        if info["do_classifier_free_guidance"].as_bool().unwrap() {
            Tensor::cat(&[r.get(&format!("negative_{name}")).unwrap(), pos], 0)
        } else {
            pos.shallow_clone()
        }
    };
    let (context, pooled) = (cond("prompt_embeds"), cond("pooled_prompt_embeds"));
    let mut worst: f64 = 0.0;
    let mut steps = 0;
    while let Some(input) = r.get(&format!("step{steps}.transformer_input")) {
        let t = r.get(&format!("step{steps}.timestep")).unwrap();
        let out = tch::no_grad(|| m.forward(input, t, &context, &pooled)).unwrap();
        let want = r.get(&format!("step{steps}.transformer_output")).unwrap();
        assert_eq!(out.size(), want.size(), "{case} step {steps}");
        worst = worst.max(rel(&out, want));
        steps += 1;
    }
    assert_eq!(steps as u64, info["transformer_calls"].as_u64().unwrap(), "{case}: every call recorded");
    worst
}

#[test]
fn sd3_transformer_matches_diffusers() {
    crate::util::set_threads();
    let m = model("tiny-sd3");
    assert_eq!((m.config.qk_norm, m.config.dual_attention_layers.len()), (None, 0));
    for case in ["sd3-cfg", "sd3-negative-nonsquare"] {
        runner::parity::check(&format!("{case}: transformer steps"), worst_step(&m, case), runner::parity::MODEL);
    }
}

#[test]
fn sd35_transformer_with_qk_norm_and_dual_attention_matches_diffusers() {
    crate::util::set_threads();
    let ck = checkpoint("tiny-sd35");
    assert!(ck.files.len() >= 2, "the fixture's transformer is sharded with an index");
    let m = SD3Transformer2DModel::load(&config("tiny-sd35"), &ck, Device::Cpu, Kind::Float).unwrap();
    assert_eq!((m.config.qk_norm, m.config.dual_attention_layers.as_slice()), (Some(QkNorm::RmsNorm), &[0][..]));
    for case in ["sd35-cfg", "sd35-noguidance"] {
        runner::parity::check(&format!("{case}: transformer steps"), worst_step(&m, case), runner::parity::MODEL);
    }
}

fn config_err(edit: impl Fn(&mut serde_json::Value)) -> String {
    let (mut v, path) = config_json("tiny-sd35");
    edit(&mut v);
    let e = SD3Transformer2DConfig::from_json(&v, &path).unwrap_err().to_string();
    assert!(e.contains(&path.display().to_string()) && e.contains("SD3Transformer2DModel"), "{e}");
    e
}

#[test]
fn unsupported_config_values_are_errors_naming_the_key() {
    let e = config_err(|v| v["qk_norm"] = "layer_norm".into());
    assert!(e.contains("`qk_norm` = \"layer_norm\" is not supported"), "{e}");
    let e = config_err(|v| v["qk_norm"] = 1.into());
    assert!(e.contains("`qk_norm` must be a string"), "{e}");
    let e = config_err(|v| v["pos_embed_max_size"] = serde_json::Value::Null);
    assert!(e.contains("`pos_embed_max_size` = null"), "{e}");
    let e = config_err(|v| v["dual_attention_layers"] = serde_json::json!([0, "1"]));
    assert!(e.contains("`dual_attention_layers[1]` must be an integer"), "{e}");
    let e = config_err(|v| v["caption_projection_dim"] = 24.into());
    assert!(e.contains("`caption_projection_dim` 24 must equal"), "{e}");
    let e = config_err(|v| v["patch_size"] = 0.into());
    assert!(e.contains("`patch_size`"), "{e}");

    // Defaults and null as diffusers reads them.
    let (mut v, path) = config_json("tiny-sd3");
    v["out_channels"] = serde_json::Value::Null;
    v["in_channels"] = 8.into();
    v.as_object_mut().unwrap().remove("dual_attention_layers");
    v["qk_norm"] = serde_json::Value::Null;
    let c = SD3Transformer2DConfig::from_json(&v, &path).unwrap();
    assert_eq!((c.out_channels, c.dual_attention_layers.len(), c.qk_norm), (8, 0, None), "null out_channels is in_channels");
    v.as_object_mut().unwrap().remove("out_channels");
    assert_eq!(SD3Transformer2DConfig::from_json(&v, &path).unwrap().out_channels, 16, "absent out_channels is 16");
}

#[test]
fn a_checkpoint_without_the_position_table_lists_it_missing() {
    let ck = checkpoint("tiny-sd3");
    let ck = Checkpoint { tensors: ck.tensors.iter().filter(|(k, _)| k.as_str() != "pos_embed.pos_embed").map(|(k, v)| (k.clone(), v.clone())).collect(), ..ck.clone() };
    let e = SD3Transformer2DModel::load(&config("tiny-sd3"), &ck, Device::Cpu, Kind::Float).err().unwrap();
    assert!(matches!(e, Sd3Error::Weights(_)), "{e}");
    let e = e.to_string();
    let file = dir("tiny-sd3").join("diffusion_pytorch_model.safetensors");
    assert!(e.contains("error(s) in loading state_dict for SD3Transformer2DModel") && e.contains(&file.display().to_string()), "{e}");
    assert!(e.contains("missing key(s) in state_dict (1): \"pos_embed.pos_embed\"") && !e.contains("unexpected"), "{e}");

    // SD3's checkpoint under SD 3.5's config: the MMDiT-X and qk-norm weights are missing.
    let e = SD3Transformer2DModel::load(&config("tiny-sd35"), &checkpoint("tiny-sd3"), Device::Cpu, Kind::Float).err().unwrap().to_string();
    assert!(e.contains("\"transformer_blocks.0.attn2.to_q.weight\"") && e.contains("\"transformer_blocks.0.attn.norm_added_q.weight\""), "{e}");
}

#[test]
fn latent_sizes_the_transformer_cannot_take_are_errors() {
    crate::util::set_threads();
    let m = model("tiny-sd3");
    let c = &m.config;
    let run = |h: i64, w: i64| {
        let x = Tensor::zeros([1, c.in_channels, h, w], (Kind::Float, Device::Cpu));
        let t = Tensor::from_slice(&[500.0f32]);
        let ctx = Tensor::zeros([1, 5, c.joint_attention_dim], (Kind::Float, Device::Cpu));
        let pooled = Tensor::zeros([1, c.pooled_projection_dim], (Kind::Float, Device::Cpu));
        tch::no_grad(|| m.forward(&x, &t, &ctx, &pooled))
    };
    // The largest latent the position grid covers runs (24 patches of 2).
    assert_eq!(run(48, 4).unwrap().size(), [1, 16, 48, 4]);
    let e = run(50, 8).unwrap_err();
    assert!(matches!(e, Sd3Error::Input(_)), "{e}");
    assert!(e.to_string().contains("Height (25 patches) cannot be greater than `pos_embed_max_size`: 24"), "{e}");
    let e = run(8, 52).unwrap_err().to_string();
    assert!(e.contains("Width (26 patches) cannot be greater than `pos_embed_max_size`: 24"), "{e}");
    let e = run(8, 7).unwrap_err().to_string();
    assert!(e.contains("(8x7) must be multiples of `patch_size` 2"), "{e}");
    let e = run(9, 8).unwrap_err().to_string();
    assert!(e.contains("(9x8) must be multiples of `patch_size` 2"), "{e}");
}

/// Records the module paths announced to forward hooks.
struct Announced(std::cell::RefCell<Vec<String>>);

impl runner::models::hooks::ForwardHooks for Announced {
    fn pre(&self, path: &str) {
        self.0.borrow_mut().push(path.to_string());
    }
    fn post(&self, _: &str) {}
}

#[test]
fn every_module_with_weights_is_announced_before_it_runs() {
    crate::util::set_threads();
    let m = model("tiny-sd35");
    let r = refs("sd35-noguidance");
    let log = std::rc::Rc::new(Announced(Default::default()));
    runner::models::hooks::set(Some(log.clone()));
    let out = tch::no_grad(|| m.forward(r.get("step0.transformer_input").unwrap(), r.get("step0.timestep").unwrap(), r.get("prompt_embeds").unwrap(), r.get("pooled_prompt_embeds").unwrap()));
    runner::models::hooks::set(None);
    assert_eq!(out.unwrap().size(), [1, 16, 8, 6]);
    let seen = log.0.borrow();
    // Sequential offload brings a module's own tensors when its path is announced.
    for name in m.varstore().variables().keys() {
        let module = name.rsplit_once('.').unwrap().0;
        assert!(seen.iter().any(|p| p == module), "`{module}` (holding `{name}`) was not announced");
    }
    // Group offload and the planner's no-split unit: each JointTransformerBlock, in order.
    let blocks: Vec<&String> = seen.iter().filter(|p| p.starts_with("transformer_blocks.") && p.matches('.').count() == 1).collect();
    assert_eq!(blocks, ["transformer_blocks.0", "transformer_blocks.1", "transformer_blocks.2"]);
}

#[test]
fn fp16_runs_within_fp16_precision_of_f32() {
    crate::util::set_threads();
    let r = refs("sd35-noguidance");
    let run = |kind: Kind| {
        let m = SD3Transformer2DModel::load(&config("tiny-sd35"), &checkpoint("tiny-sd35"), Device::Cpu, kind).unwrap();
        // f32 inputs are taken to the model's dtype.
        tch::no_grad(|| m.forward(r.get("step1.transformer_input").unwrap(), r.get("step1.timestep").unwrap(), r.get("prompt_embeds").unwrap(), r.get("pooled_prompt_embeds").unwrap())).unwrap()
    };
    let half = run(Kind::Half);
    assert_eq!(half.kind(), Kind::Half);
    let d = rel(&half.to_kind(Kind::Float), &run(Kind::Float));
    assert!(d < 1e-2, "fp16 vs f32: {d}");
}
