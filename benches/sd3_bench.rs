//! One SD3Transformer2DModel forward per iteration, timed (benches/sd3_step.sh runs this beside
//! diffusers on the same weights): wall time, and the process's CPU time (user + system, all
//! threads), which a machine shared with other work disturbs less.
//!   sd3_bench TRANSFORMER_DIR LATENT_SIZE BATCH TEXT_TOKENS ITERS

use runner::checkpoint::layout::{resolve_folder, Checkpoint, Library, VariantPolicy};
use runner::models::sd3_transformer::{SD3Transformer2DConfig, SD3Transformer2DModel};
use tch::{Device, Kind, Tensor};

#[path = "common/mod.rs"]
mod common;

fn main() {
    runner::runtime::configure_allocator();
    let a: Vec<String> = std::env::args().skip(1).collect();
    let dir = std::path::Path::new(&a[0]);
    let (size, batch, tokens, iters): (i64, i64, i64, usize) = (a[1].parse().unwrap(), a[2].parse().unwrap(), a[3].parse().unwrap(), a[4].parse().unwrap());
    let threads: i32 = std::env::var("BENCH_THREADS").ok().and_then(|t| t.parse().ok()).unwrap_or(1);
    tch::set_num_threads(threads);
    let path = dir.join("config.json");
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let config = SD3Transformer2DConfig::from_json(&cfg, &path).unwrap();
    let ck = Checkpoint::open(resolve_folder(dir, Some(Library::Diffusers), None, VariantPolicy::Require).unwrap()).unwrap();
    // BENCH_STORAGE=fp8-e4m3|fp8-e5m2|fp16|bf16: layerwise casting (`storage_dtype`) over fp32.
    let cast = std::env::var("BENCH_STORAGE").ok().filter(|s| !s.is_empty()).map(|s| runner::models::cast::Cast {
        storage: runner::exec::storage_kind(serde_json::from_value(serde_json::Value::String(s)).expect("BENCH_STORAGE: fp8-e4m3, fp8-e5m2, fp16 or bf16")),
        compute: Kind::Float,
    });
    let model = runner::models::cast::building("SD3Transformer2DModel", cast, || SD3Transformer2DModel::load(&config, &ck, Device::Cpu, Kind::Float)).unwrap();
    tch::manual_seed(0);
    let opts = (Kind::Float, Device::Cpu);
    let x = Tensor::randn([batch, config.in_channels, size, size], opts);
    let t = Tensor::full([batch], 500.0, opts);
    let ctx = Tensor::randn([batch, tokens, config.joint_attention_dim], opts);
    let pooled = Tensor::randn([batch, config.pooled_projection_dim], opts);
    let run = || tch::no_grad(|| model.forward(&x, &t, &ctx, &pooled)).unwrap();
    common::time_forwards(iters, threads, run);
}
