//! Checkpoint benchmark driver (run by benches/checkpoint.sh, which compares it with python
//! safetensors + torch on the same files in the same run). Prints one JSON line per run.
//!
//!   checkpoint_bench make PATH GB DTYPE    write a synthetic checkpoint (F32|F16)
//!   checkpoint_bench read PATH             plain sequential read (8 MiB buffer)
//!   checkpoint_bench load PATH KIND        runner load to ready CPU tensors (KIND: same|f32)
//!   checkpoint_bench load-touch PATH KIND  load, then read one byte per page (as python does)
//!   checkpoint_bench shard PATH OUT SIZE [no-fsync]   runner shard

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::Path;
use std::time::Instant;

use runner::checkpoint::layout::{resolve_source, Checkpoint, VariantPolicy};
use runner::checkpoint::load::{load, LoadOptions};
use runner::checkpoint::safetensors::{encode_header, Dtype, TensorInfo};

fn max_rss_bytes() -> u64 {
    // SAFETY: getrusage fills the struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    u.ru_maxrss as u64 * 1024
}

fn report(what: &str, bytes: u64, secs: f64, extra: &str) {
    println!("{{\"impl\": \"runner\", \"what\": \"{what}\", \"bytes\": {bytes}, \"seconds\": {secs:.4}, \"gbps\": {:.3}, \"max_rss\": {}{extra}}}", bytes as f64 / secs / 1e9, max_rss_bytes());
}

fn open(p: &Path) -> Checkpoint {
    Checkpoint::open(resolve_source(p, None, None, VariantPolicy::Require).expect("source")).expect("checkpoint")
}

fn main() {
    runner::runtime::configure_allocator();
    let args: Vec<String> = std::env::args().skip(1).collect();
    tch::set_num_threads(1);
    match args[0].as_str() {
        "make" => {
            let (path, gb, dtype) = (Path::new(&args[1]), args[2].parse::<f64>().unwrap(), Dtype::from_name(&args[3]).unwrap());
            let elem = dtype.bits() / 8;
            let total = (gb * 1e9) as u64;
            // SDXL-like mix: many mid-size matrices, a few large ones.
            let mut infos = vec![];
            let (mut off, mut i) = (0u64, 0);
            while off < total {
                let n: u64 = [1280 * 1280, 640 * 2560, 2048 * 1280, 320 * 320 * 9, 5120][i % 5];
                let bytes = n * elem;
                infos.push(TensorInfo { name: format!("blocks.{i}.weight"), dtype, shape: vec![n], data_offsets: (off, off + bytes) });
                off += bytes;
                i += 1;
            }
            infos.sort_by(|a, b| a.name.cmp(&b.name));
            let mut o = 0;
            for t in &mut infos {
                let n = t.nbytes();
                t.data_offsets = (o, o + n);
                o += n;
            }
            let mut f = std::io::BufWriter::with_capacity(8 << 20, std::fs::File::create(path).unwrap());
            f.write_all(&encode_header(&infos, &BTreeMap::from([("format".into(), "pt".into())]))).unwrap();
            // Deterministic non-trivial values (small floats), 1 MiB at a time.
            let chunk: Vec<u8> = match dtype {
                Dtype::F32 => (0..(1 << 18)).flat_map(|k: u32| ((k % 1000) as f32 * 1e-3 - 0.5).to_le_bytes()).collect(),
                _ => (0..(1 << 19)).flat_map(|k: u32| half::f16::from_f32((k % 1000) as f32 * 1e-3 - 0.5).to_le_bytes()).collect(),
            };
            let mut left = o;
            while left > 0 {
                let n = left.min(chunk.len() as u64) as usize;
                f.write_all(&chunk[..n]).unwrap();
                left -= n as u64;
            }
            f.flush().unwrap();
            println!("{{\"made\": \"{}\", \"tensors\": {}, \"bytes\": {o}}}", path.display(), infos.len());
        }
        "read" => {
            let t = Instant::now();
            let mut f = std::fs::File::open(&args[1]).unwrap();
            let mut buf = vec![0u8; 8 << 20];
            let (mut n, mut sum) = (0u64, 0u64);
            loop {
                let k = f.read(&mut buf).unwrap();
                if k == 0 {
                    break;
                }
                sum = sum.wrapping_add(buf[k - 1] as u64);
                n += k as u64;
            }
            std::hint::black_box(sum);
            report("read", n, t.elapsed().as_secs_f64(), "");
        }
        "load" | "load-touch" => {
            let t = Instant::now();
            let c = open(Path::new(&args[1]));
            let float_kind = match args.get(2).map(String::as_str) {
                Some("f32") => Some(tch::Kind::Float),
                _ => None,
            };
            let store = load(&c, None, LoadOptions { float_kind, device: tch::Device::Cpu, populate: true }).unwrap();
            let bytes: u64 = store
                .names()
                .map(|n| {
                    let t = store.get(n).unwrap();
                    t.numel() as u64 * t.kind().elt_size_in_bytes() as u64
                })
                .sum();
            let zc = store.zero_copy_count();
            if args[0] == "load-touch" {
                // Read one byte per page of every tensor, as the python side does.
                let mut sum = 0u64;
                for n in store.names() {
                    let t = store.get(n).unwrap();
                    let len = t.numel() * t.kind().elt_size_in_bytes();
                    // SAFETY: a contiguous CPU tensor of `len` bytes.
                    let bytes = unsafe { std::slice::from_raw_parts(t.data_ptr() as *const u8, len) };
                    sum += bytes.iter().step_by(4096).map(|&b| b as u64).sum::<u64>();
                }
                std::hint::black_box(sum);
            }
            std::hint::black_box(store.len());
            let what = format!("{}{}", args[0], if float_kind.is_some() { "-to-f32" } else { "" });
            report(&what, bytes, t.elapsed().as_secs_f64(), &format!(", \"zero_copy\": {zc}"));
        }
        "shard" => {
            let t = Instant::now();
            let size: runner::units::ByteSize = args[3].parse().unwrap();
            let fsync = args.get(4).map(String::as_str) != Some("no-fsync");
            let opts = runner::checkpoint::shard::ShardOptions { max_shard_size: size.0, dtype: None, variant: None, force: true, fsync };
            let r = runner::checkpoint::shard::shard(Path::new(&args[1]), Path::new(&args[2]), &opts, &|_, _| {}).unwrap();
            report(if fsync { "shard+fsync" } else { "shard" }, r.total_size, t.elapsed().as_secs_f64(), &format!(", \"files\": {}", r.files.len()));
        }
        other => panic!("unknown mode {other}"),
    }
}
