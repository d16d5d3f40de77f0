//! FluxTransformer2DModel against diffusers' own outputs on tests/fixtures/tiny-flux-dev and
//! tiny-flux-schnell (tools/make_references_flux.py, `transformer_refs`): f32, CPU, batch 2, a
//! 3x4 image grid and 7 text tokens with non-zero ids.

use std::path::PathBuf;

use runner::checkpoint::layout::{resolve_folder, Checkpoint, Library, VariantPolicy};
use runner::models::flux_transformer::{FluxError, FluxTransformer2DConfig, FluxTransformer2DModel};
use tch::{Device, Kind, Tensor};

use crate::unet::{refs, rel};
use crate::util::root;

fn dir(pipeline: &str) -> PathBuf {
    root().join(format!("tests/fixtures/{pipeline}/transformer"))
}

fn config(pipeline: &str) -> FluxTransformer2DConfig {
    let path = dir(pipeline).join("config.json");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    FluxTransformer2DConfig::from_json(&v, &path).unwrap()
}

fn checkpoint(pipeline: &str) -> Checkpoint {
    Checkpoint::open(resolve_folder(&dir(pipeline), Some(Library::Diffusers), None, VariantPolicy::Require).unwrap()).unwrap()
}

fn model(pipeline: &str) -> FluxTransformer2DModel {
    FluxTransformer2DModel::load(&config(pipeline), &checkpoint(pipeline), Device::Cpu, Kind::Float).unwrap()
}

/// The reference inputs of `prefix` (`flux-dev`, `flux-schnell`).
struct Inputs {
    hidden: Tensor,
    context: Tensor,
    pooled: Tensor,
    timestep: Tensor,
    guidance: Option<Tensor>,
    txt_ids: Tensor,
    img_ids: Tensor,
    output: Tensor,
}

fn inputs(prefix: &str) -> Inputs {
    let r = refs("flux-transformer");
    // Copies: the store's tensors view its mapped file, which goes with it.
    let get = |name: &str| r.get(&format!("{prefix}.{name}")).map(Tensor::copy);
    Inputs {
        hidden: get("hidden_states").unwrap(),
        context: get("encoder_hidden_states").unwrap(),
        pooled: get("pooled_projections").unwrap(),
        timestep: get("timestep").unwrap(),
        guidance: get("guidance"),
        txt_ids: get("txt_ids").unwrap(),
        img_ids: get("img_ids").unwrap(),
        output: get("output").unwrap(),
    }
}

fn run(m: &FluxTransformer2DModel, i: &Inputs) -> Result<Tensor, FluxError> {
    tch::no_grad(|| m.forward(&i.hidden, &i.context, &i.pooled, &i.timestep, i.guidance.as_ref(), &i.txt_ids, &i.img_ids))
}

#[test]
fn flux_dev_and_schnell_transformers_match_diffusers() {
    crate::util::set_threads();
    for (pipeline, prefix) in [("tiny-flux-dev", "flux-dev"), ("tiny-flux-schnell", "flux-schnell")] {
        let ck = checkpoint(pipeline);
        assert!(ck.files.len() >= 2, "{pipeline}: the fixture's transformer is sharded with an index");
        let m = FluxTransformer2DModel::load(&config(pipeline), &ck, Device::Cpu, Kind::Float).unwrap();
        let i = inputs(prefix);
        assert_eq!(i.guidance.is_some(), m.config.guidance_embeds, "{prefix}");
        let out = run(&m, &i).unwrap();
        assert_eq!((out.size(), out.kind()), (i.output.size(), Kind::Float), "{prefix}");
        runner::parity::check(&format!("flux-transformer {prefix}: output"), rel(&out, &i.output), runner::parity::MODEL);

        // diffusers' deprecated batched ids ([1, N, 3]: the first entry is used) give the same.
        let batched = Inputs { txt_ids: i.txt_ids.unsqueeze(0), img_ids: i.img_ids.unsqueeze(0).repeat([2, 1, 1]), ..i };
        assert_eq!(rel(&run(&m, &batched).unwrap(), &out), 0.0, "{prefix}: 3-D ids");
    }
}

#[test]
fn checkpoint_mismatches_name_the_tensor() {
    let ck = checkpoint("tiny-flux-dev");
    let cfg = config("tiny-flux-dev");
    let load_err = |ck: &Checkpoint| {
        let e = FluxTransformer2DModel::load(&cfg, ck, Device::Cpu, Kind::Float).err().unwrap();
        assert!(matches!(e, FluxError::Weights(_)), "{e}");
        let e = e.to_string();
        assert!(e.contains("error(s) in loading state_dict for FluxTransformer2DModel"), "{e}");
        e
    };
    let edited = |edit: &dyn Fn(&mut Checkpoint)| {
        let mut c = ck.clone();
        edit(&mut c);
        c
    };

    // Missing.
    let e = load_err(&edited(&|c| {
        c.tensors.remove("single_transformer_blocks.1.attn.norm_k.weight");
    }));
    assert!(e.contains("missing key(s) in state_dict (1): \"single_transformer_blocks.1.attn.norm_k.weight\"") && !e.contains("unexpected"), "{e}");

    // Unexpected: the single blocks have no output projection in their attention.
    let e = load_err(&edited(&|c| {
        let t = c.tensors["single_transformer_blocks.0.proj_out.bias"].clone();
        c.tensors.insert("single_transformer_blocks.0.attn.to_out.0.bias".into(), t);
    }));
    assert!(e.contains("unexpected key(s) in state_dict (1): \"single_transformer_blocks.0.attn.to_out.0.bias\"") && !e.contains("missing"), "{e}");

    // Mis-shaped.
    let e = load_err(&edited(&|c| {
        c.tensors.get_mut("x_embedder.weight").unwrap().info.shape = vec![32, 32];
    }));
    assert!(e.contains("size mismatch for x_embedder.weight: copying a param with shape [32, 32] from checkpoint, the shape in current model is [32, 64]"), "{e}");

    // schnell's checkpoint under dev's config: the guidance embedder is missing.
    let e = load_err(&checkpoint("tiny-flux-schnell"));
    assert!(e.contains("\"time_text_embed.guidance_embedder.linear_1.weight\""), "{e}");
}

#[test]
fn guidance_must_match_the_config() {
    crate::util::set_threads();
    let dev = model("tiny-flux-dev");
    let i = inputs("flux-dev");
    let e = tch::no_grad(|| dev.forward(&i.hidden, &i.context, &i.pooled, &i.timestep, None, &i.txt_ids, &i.img_ids)).unwrap_err();
    assert!(matches!(e, FluxError::Input(_)), "{e}");
    assert!(e.to_string().contains("guidance is required") && e.to_string().contains("`guidance_embeds`"), "{e}");

    let schnell = model("tiny-flux-schnell");
    let i = inputs("flux-schnell");
    let g = Tensor::from_slice(&[3.5f32, 3.5]);
    let e = tch::no_grad(|| schnell.forward(&i.hidden, &i.context, &i.pooled, &i.timestep, Some(&g), &i.txt_ids, &i.img_ids)).unwrap_err();
    assert!(e.to_string().contains("guidance was given, but the config has no `guidance_embeds`"), "{e}");
}

#[test]
fn inputs_of_the_wrong_shape_are_errors_naming_the_argument() {
    crate::util::set_threads();
    let m = model("tiny-flux-dev");
    let i = || inputs("flux-dev");
    let err = |x: Inputs| {
        let e = run(&m, &x).unwrap_err();
        assert!(matches!(e, FluxError::Input(_)), "{e}");
        e.to_string()
    };
    let e = err(Inputs { hidden: i().hidden.narrow(2, 0, 16), ..i() });
    assert!(e.contains("hidden_states must be [B, S, 64] (`in_channels`), got [2, 12, 16]"), "{e}");
    let e = err(Inputs { hidden: i().hidden.reshape([2, 12, 8, 8]), ..i() });
    assert!(e.contains("hidden_states must be [B, S, 64]"), "{e}");
    let e = err(Inputs { context: i().context.narrow(0, 0, 1), ..i() });
    assert!(e.contains("encoder_hidden_states must be [2, T, 24] (`joint_attention_dim`), got [1, 7, 24]"), "{e}");
    let e = err(Inputs { pooled: i().pooled.narrow(1, 0, 4), ..i() });
    assert!(e.contains("pooled_projections must be [2, 8] (`pooled_projection_dim`), got [2, 4]"), "{e}");
    let e = err(Inputs { timestep: Tensor::from_slice(&[0.1f32, 0.2, 0.3]), ..i() });
    assert!(e.contains("timestep must be [2] (one per sample), got [3]"), "{e}");
    let e = err(Inputs { guidance: Some(Tensor::from_slice(&[3.5f32, 1.0]).reshape([2, 1])), ..i() });
    assert!(e.contains("guidance must be [2] (one per sample), got [2, 1]"), "{e}");
    let e = err(Inputs { txt_ids: i().txt_ids.narrow(0, 0, 6), ..i() });
    assert!(e.contains("txt_ids must be [7, 3] (one id triple per text token), got [6, 3]"), "{e}");
    let e = err(Inputs { img_ids: i().img_ids.narrow(1, 0, 2), ..i() });
    assert!(e.contains("img_ids must be [12, 3] (one id triple per image token), got [12, 2]"), "{e}");

    // A single timestep and guidance value are broadcast over the batch, as in diffusers.
    let x = i();
    let one = Inputs { timestep: x.timestep.narrow(0, 0, 1), guidance: x.guidance.as_ref().map(|g| g.narrow(0, 0, 1)), ..i() };
    let both = Inputs { timestep: x.timestep.narrow(0, 0, 1).repeat([2]), guidance: x.guidance.as_ref().map(|g| g.narrow(0, 0, 1).repeat([2])), ..i() };
    let d = rel(&run(&m, &one).unwrap(), &run(&m, &both).unwrap());
    assert!(d < 1e-6, "broadcast vs repeated: {d}");
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
    let m = model("tiny-flux-dev");
    let log = std::rc::Rc::new(Announced(Default::default()));
    runner::models::hooks::set(Some(log.clone()));
    let out = run(&m, &inputs("flux-dev"));
    runner::models::hooks::set(None);
    assert_eq!(out.unwrap().size(), [2, 12, 64]);
    let seen = log.0.borrow();
    for name in m.varstore().variables().keys() {
        let module = name.rsplit_once('.').unwrap().0;
        assert!(seen.iter().any(|p| p == module), "`{module}` (holding `{name}`) was not announced");
    }
    // The no-split units (diffusers' `_no_split_modules`), in order.
    let blocks: Vec<&String> = seen.iter().filter(|p| p.contains("transformer_blocks.") && p.matches('.').count() == 1).collect();
    assert_eq!(blocks, ["transformer_blocks.0", "transformer_blocks.1", "single_transformer_blocks.0", "single_transformer_blocks.1"]);
}

#[test]
fn fp16_runs_within_fp16_precision_of_f32() {
    crate::util::set_threads();
    let i = inputs("flux-dev");
    let half = FluxTransformer2DModel::load(&config("tiny-flux-dev"), &checkpoint("tiny-flux-dev"), Device::Cpu, Kind::Half).unwrap();
    // f32 inputs are taken to the model's dtype.
    let out = run(&half, &i).unwrap();
    assert_eq!(out.kind(), Kind::Half);
    let d = rel(&out.to_kind(Kind::Float), &i.output);
    eprintln!("fp16 vs diffusers' f32: {d:.3e}");
    assert!(d < 1e-2, "fp16 vs f32: {d}");
}
