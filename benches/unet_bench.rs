//! One UNet2DConditionModel forward per iteration, timed (benches/unet_step.sh and benches/casting.sh
//! run this beside diffusers on the same weights): wall time and the process's CPU time.
//!   unet_bench UNET_DIR LATENT_SIZE BATCH ITERS   (BENCH_LORA=FILE: a LoRA's pairs run live, scale 1)

use runner::checkpoint::layout::{resolve_folder, Checkpoint, Library, VariantPolicy};
use runner::models::unet_2d::{AddedCond, UNet2DConditionConfig, UNet2DConditionModel};
use runner::models::weights::build_from_checkpoint;
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

#[path = "common/mod.rs"]
mod common;

fn main() {
    runner::runtime::configure_allocator();
    let a: Vec<String> = std::env::args().skip(1).collect();
    let dir = std::path::Path::new(&a[0]);
    let (size, batch, iters): (i64, i64, usize) = (a[1].parse().unwrap(), a[2].parse().unwrap(), a[3].parse().unwrap());
    let threads: i32 = std::env::var("BENCH_THREADS").ok().and_then(|t| t.parse().ok()).unwrap_or(1);
    tch::set_num_threads(threads);
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let config = UNet2DConditionConfig::from_json(&cfg).unwrap();
    let vs = VarStore::new(Device::Cpu);
    let ck = Checkpoint::open(resolve_folder(dir, Some(Library::Diffusers), None, VariantPolicy::Require).unwrap()).unwrap();
    // `_mapped` keeps the file the parameters view mapped while the UNet runs.
    // BENCH_STORAGE=fp8-e4m3|fp8-e5m2|fp16|bf16: layerwise casting (`storage_dtype`) over fp32.
    let cast = std::env::var("BENCH_STORAGE").ok().filter(|s| !s.is_empty()).map(|s| runner::models::cast::Cast {
        storage: runner::exec::storage_kind(serde_json::from_value(serde_json::Value::String(s)).expect("BENCH_STORAGE: fp8-e4m3, fp8-e5m2, fp16 or bf16")),
        compute: Kind::Float,
    });
    // BENCH_LORA=FILE (benches/lora_step.sh): the file's pairs run live beside their layers, scale 1.
    let live = match std::env::var_os("BENCH_LORA") {
        Some(f) => {
            let items = runner::checkpoint::lora::fuse_plan(&[("bench".into(), f.into(), 1.0, None)], &[("unet", "UNet2DConditionModel", &ck)]).unwrap();
            runner::models::lora::set_scales([("bench".to_string(), 1.0)].into());
            runner::models::lora::pending(items.get("unet").map(Vec::as_slice).unwrap_or(&[])).unwrap()
        }
        None => Default::default(),
    };
    let ((unet, _mapped), left) = runner::models::lora::building(live, || {
        runner::models::cast::building("UNet2DConditionModel", cast, || build_from_checkpoint(&vs, &ck, "UNet2DConditionModel", Kind::Float, |root| UNet2DConditionModel::new(root, config.clone())))
            .unwrap()
    });
    assert!(left.is_empty(), "pairs no layer took: {left:?}");
    tch::manual_seed(0);
    let x = Tensor::randn([batch, config.in_channels, size, size], (Kind::Float, Device::Cpu));
    let ctx = Tensor::randn([batch, 77, config.cross_attention_dim], (Kind::Float, Device::Cpu));
    let added = config.addition_text_time.map(|(dim, input)| {
        let pooled = input - 6 * dim;
        (
            Tensor::randn([batch, pooled], (Kind::Float, Device::Cpu)),
            Tensor::from_slice(&[size as f32 * 8.0, size as f32 * 8.0, 0.0, 0.0, size as f32 * 8.0, size as f32 * 8.0]).unsqueeze(0).repeat([batch, 1]),
        )
    });
    let run = || {
        let add = added.as_ref().map(|(t, i)| AddedCond { text_embeds: t, time_ids: i });
        tch::no_grad(|| unet.forward(&x, 500.0, &ctx, add))
    };
    common::time_forwards(iters, threads, run);
}
