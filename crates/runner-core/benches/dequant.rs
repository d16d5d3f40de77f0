//! Dequantization throughput of `ggml::dequantize_as_diffusers` (diffusers' arithmetic), one
//! thread: `cargo bench -p runner-core --bench dequant -- DIR REPS` over the `<TYPE>.bin` block
//! files benches/gguf_dequant.sh writes; prints a JSON line per type (min / median / max ms and
//! GB/s of fp16/f32 output at the median). benches/gguf_dequant.sh runs diffusers beside it.
use std::time::Instant;

use runner_core::checkpoint::ggml;
use runner_core::checkpoint::gguf::GgmlType;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    let dir = std::path::PathBuf::from(args.first().expect("DIR"));
    let reps: usize = args.get(1).and_then(|r| r.parse().ok()).unwrap_or(5);
    let mut names: Vec<_> = std::fs::read_dir(&dir).expect("DIR").map(|e| e.unwrap().path()).filter(|p| p.extension().is_some_and(|e| e == "bin")).collect();
    names.sort();
    for path in names {
        let t = GgmlType::from_name(path.file_stem().unwrap().to_str().unwrap()).expect("a type name");
        let bytes = std::fs::read(&path).unwrap();
        let mut out = Vec::new();
        let mut ms = vec![];
        for _ in 0..reps {
            out.clear();
            let s = Instant::now();
            ggml::dequantize_as_diffusers(t, &bytes, &mut out).unwrap();
            ms.push(s.elapsed().as_secs_f64() * 1e3);
        }
        ms.sort_by(f64::total_cmp);
        let med = ms[ms.len() / 2];
        let out_bytes = out.len() as f64 * if ggml::diffusers_dtype_is_f16(t) { 2.0 } else { 4.0 };
        println!(
            "{{\"impl\": \"runner\", \"type\": \"{}\", \"elements\": {}, \"min_ms\": {:.3}, \"median_ms\": {med:.3}, \"max_ms\": {:.3}, \"gbps\": {:.3}}}",
            t.name(),
            out.len(),
            ms[0],
            ms[ms.len() - 1],
            out_bytes / med / 1e6
        );
    }
}
