//! One FluxTransformer2DModel forward per iteration, timed (benches/flux_step.sh runs this beside
//! diffusers on the same weights): wall time, and the process's CPU time (user + system, all
//! threads), which a machine shared with other work disturbs less.
//!   flux_bench TRANSFORMER_DIR LATENT_SIZE TEXT_TOKENS ITERS [FILE.gguf]
//! With a .gguf file, the weights are its (quantized Linear weights dequantized per forward, as
//! diffusers' `GGUFLinear`) and TRANSFORMER_DIR gives the config (benches/gguf_step.sh).
//! LATENT_SIZE is the VAE latent grid's side (image / 8): the transformer sees (side / 2)² tokens.

use runner::checkpoint::layout::{resolve_folder, Checkpoint, Library, VariantPolicy};
use runner::models::flux_transformer::{FluxTransformer2DConfig, FluxTransformer2DModel};
use tch::{Device, Kind, Tensor};

#[path = "common/mod.rs"]
mod common;

fn main() {
    runner::runtime::configure_allocator();
    let a: Vec<String> = std::env::args().skip(1).collect();
    let dir = std::path::Path::new(&a[0]);
    let (size, tokens, iters): (i64, i64, usize) = (a[1].parse().unwrap(), a[2].parse().unwrap(), a[3].parse().unwrap());
    let threads: i32 = std::env::var("BENCH_THREADS").ok().and_then(|t| t.parse().ok()).unwrap_or(1);
    tch::set_num_threads(threads);
    let path = dir.join("config.json");
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let config = FluxTransformer2DConfig::from_json(&cfg, &path).unwrap();
    let started = std::time::Instant::now();
    let ck = match a.get(4) {
        Some(gguf) => Checkpoint::open(runner::checkpoint::layout::resolve_source(std::path::Path::new(gguf), None, None, VariantPolicy::Require).unwrap()).unwrap(),
        None => Checkpoint::open(resolve_folder(dir, Some(Library::Diffusers), None, VariantPolicy::Require).unwrap()).unwrap(),
    };
    // BENCH_LOAD_ONLY=1 (benches/gguf_load.sh): the load at bf16, diffusers' GGUF compute dtype, timed.
    if std::env::var_os("BENCH_LOAD_ONLY").is_some() {
        let model = FluxTransformer2DModel::load(&config, &ck, Device::Cpu, Kind::BFloat16).unwrap();
        let load_s = started.elapsed().as_secs_f64();
        let bytes: usize = model.varstore().variables().values().map(|v| v.numel() * v.kind().elt_size_in_bytes()).sum();
        println!("{{\"impl\": \"runner\", \"load_s\": {load_s:.3}, \"weight_bytes\": {bytes}}}");
        return;
    }
    // BENCH_LORA=FILE (benches/lora_step.sh): the file's pairs run live beside their layers, scale 1.
    let live = match std::env::var_os("BENCH_LORA") {
        Some(f) => {
            let items = runner::checkpoint::lora::fuse_plan(&[("bench".into(), f.into(), 1.0, None)], &[("transformer", "FluxTransformer2DModel", &ck)]).unwrap();
            runner::models::lora::set_scales([("bench".to_string(), 1.0)].into());
            runner::models::lora::pending(items.get("transformer").map(Vec::as_slice).unwrap_or(&[])).unwrap()
        }
        None => Default::default(),
    };
    let (model, left) = runner::models::lora::building(live, || FluxTransformer2DModel::load(&config, &ck, Device::Cpu, Kind::Float).unwrap());
    assert!(left.is_empty(), "pairs no layer took: {left:?}");
    tch::manual_seed(0);
    let opts = (Kind::Float, Device::Cpu);
    let side = size / 2;
    let x = Tensor::randn([1, side * side, config.in_channels], opts);
    let t = Tensor::full([1], 0.5, opts);
    let guidance = config.guidance_embeds.then(|| Tensor::full([1], 3.5, opts));
    let ctx = Tensor::randn([1, tokens, config.joint_attention_dim], opts);
    let pooled = Tensor::randn([1, config.pooled_projection_dim], opts);
    let txt_ids = Tensor::zeros([tokens, 3], opts);
    let rows = Tensor::arange(side, opts).view([side, 1]).expand([side, side], false);
    let cols = Tensor::arange(side, opts).view([1, side]).expand([side, side], false);
    let img_ids = Tensor::stack(&[Tensor::zeros([side, side], opts), rows, cols], -1).reshape([side * side, 3]);
    let run = || tch::no_grad(|| model.forward(&x, &ctx, &pooled, &t, guidance.as_ref(), &txt_ids, &img_ids)).unwrap();
    common::time_forwards(iters, threads, run);
}
