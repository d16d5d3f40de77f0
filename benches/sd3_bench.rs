//! One SD3Transformer2DModel forward per iteration, timed (benches/sd3_step.sh runs this beside
//! diffusers on the same weights): wall time, and the process's CPU time (user + system, all
//! threads), which a machine shared with other work disturbs less.
//!   sd3_bench TRANSFORMER_DIR LATENT_SIZE BATCH TEXT_TOKENS ITERS

use std::time::Instant;

use runner::checkpoint::layout::{resolve_folder, Checkpoint, Library, VariantPolicy};
use runner::models::sd3_transformer::{SD3Transformer2DConfig, SD3Transformer2DModel};
use tch::{Device, Kind, Tensor};

/// CPU time of the whole process, in seconds (`time.process_time()` on the Python side).
fn process_cpu_s() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// `{"median_s", "min_s", "times_s"}` fields, the times in run order.
fn stats(prefix: &str, mut times: Vec<f64>) -> String {
    let all = times.iter().map(|t| format!("{t:.4}")).collect::<Vec<_>>().join(", ");
    times.sort_by(|a, b| a.total_cmp(b));
    format!("\"{prefix}median_s\": {:.4}, \"{prefix}min_s\": {:.4}, \"{prefix}times_s\": [{all}]", times[times.len() / 2], times[0])
}

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
        storage: runner::models::cast::storage_kind(serde_json::from_value(serde_json::Value::String(s)).expect("BENCH_STORAGE: fp8-e4m3, fp8-e5m2, fp16 or bf16")),
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
    let _ = run(); // warm-up
    let (mut wall, mut cpu) = (vec![], vec![]);
    for _ in 0..iters {
        let (s, c) = (Instant::now(), process_cpu_s());
        let _ = run();
        wall.push(s.elapsed().as_secs_f64());
        cpu.push(process_cpu_s() - c);
    }
    println!("{{\"impl\": \"runner\", {}, {}, \"threads\": {threads}}}", stats("", wall), stats("cpu_", cpu));
}
