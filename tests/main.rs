//! One integration-test binary (as ripgrep and just do): CLI behaviour, diagnostics snapshots,
//! layering, the schema, and libtorch linkage.

mod batch;
mod cast;
mod checkpoint;
mod cli;
mod clip;
mod deploy;
mod diagnostics;
mod flux_transformer;
mod front;
mod gguf;
mod gguf_run;
mod hub;
mod img2img;
mod layering;
mod load;
mod lock;
mod lora;
mod pipeline;
mod plan;
mod preflight;
mod run;
mod safety;
mod schedulers;
mod schema;
mod sd3_transformer;
mod serve;
mod setup;
mod shard;
mod t5;
mod torch;
mod unet;

pub mod util {
    use std::path::{Path, PathBuf};

    use assert_cmd::Command;

    pub fn root() -> &'static Path {
        Path::new(env!("CARGO_MANIFEST_DIR"))
    }

    /// A PNG's RGB bytes and its text chunks (tEXt and iTXt), in file order.
    pub fn decode_png(path: &Path) -> (Vec<u8>, Vec<(String, String)>) {
        let dec = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
        let mut reader = dec.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size()];
        let info = reader.next_frame(&mut buf).unwrap();
        buf.truncate(info.buffer_size());
        let info = reader.info();
        let text = info.uncompressed_latin1_text.iter().map(|t| (t.keyword.clone(), t.text.clone())).chain(info.utf8_text.iter().map(|t| (t.keyword.clone(), t.get_text().unwrap()))).collect();
        (buf, text)
    }

    /// A reference recorded by diffusers: tests/fixtures/refs/NAME, or `RUNNER_REFS_DIR/NAME`
    /// (`make parity`).
    pub fn refs_path(name: &str) -> PathBuf {
        runner::parity::refs_dir().join(name)
    }

    /// libtorch threads for the parity tests: `RUNNER_TEST_THREADS` (scripts/parity-spread.sh
    /// measures 1 and 2), else 1.
    pub fn threads() -> i32 {
        std::env::var("RUNNER_TEST_THREADS").ok().and_then(|t| t.parse().ok()).filter(|&t| t > 0).unwrap_or(1)
    }

    /// Sets this process's libtorch threads to [`threads`].
    pub fn set_threads() {
        tch::set_num_threads(threads());
    }

    /// max |a - b| / max |b|: the difference relative to the reference's scale.
    pub fn rel(a: &tch::Tensor, b: &tch::Tensor) -> f64 {
        let scale = b.abs().max().double_value(&[]).max(1e-12);
        max_diff(a, b) / scale
    }

    /// max |a - b|.
    pub fn max_diff(a: &tch::Tensor, b: &tch::Tensor) -> f64 {
        assert_eq!(a.size(), b.size(), "shapes differ");
        (a.to_kind(tch::Kind::Double) - b.to_kind(tch::Kind::Double)).abs().max().double_value(&[])
    }

    pub fn data(rel: &str) -> PathBuf {
        root().join("tests/data").join(rel)
    }

    /// The `runner` binary, run from the repository root, with the caller's `RUNNER_*`
    /// variables removed (bat does this for `BAT_*`) and colour off.
    pub fn runner() -> Command {
        let mut cmd = Command::cargo_bin("runner").expect("runner binary");
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("RUNNER_") {
                cmd.env_remove(&k);
            }
        }
        cmd.current_dir(root()).env("NO_COLOR", "1").env("OMP_NUM_THREADS", threads().to_string()).env_remove("RUST_LOG");
        cmd
    }

    /// The `runner` front alone, as the light package and the `validate` image ship it: copied
    /// into a folder without `runner-torch`, run with an empty library path (so no libtorch can
    /// be found), from the repository root, `RUNNER_*` variables removed as in [`runner`].
    pub fn light_runner() -> Command {
        static BIN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
        let bin = BIN.get_or_init(|| {
            let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("light-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let bin = dir.join("runner");
            std::fs::copy(assert_cmd::cargo::cargo_bin("runner"), &bin).unwrap();
            bin
        });
        let mut cmd = Command::new(bin);
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("RUNNER_") {
                cmd.env_remove(&k);
            }
        }
        cmd.current_dir(root()).env("NO_COLOR", "1").env("LD_LIBRARY_PATH", "").env_remove("RUST_LOG");
        cmd
    }

    /// A full-size diffusers pipeline folder whose safetensors files have real headers and a
    /// sparse (hole) data region: real sizes at no disk cost. From tests/data/shapes/{name}.json
    /// (tools/make_shapes.py). Float tensors are stored as `float` (F32, F16 or BF16). Sharded
    /// components (the shapes file's `shards`) are written as the repos ship them: one file per
    /// shard and a `*.safetensors.index.json`. Tokenizer folders are empty (planning reads no
    /// tokenizer) except T5's `tokenizer_3/tokenizer.json`, whose presence preflight checks: the tiny
    /// SD3 fixture's.
    pub fn sparse_pipeline(name: &str, dir: &Path, float: runner::checkpoint::safetensors::Dtype) -> PathBuf {
        sparse_pipeline_variant(name, dir, float, None)
    }

    /// As [`sparse_pipeline`], naming weight files as `variant` (`model.fp16.safetensors`,
    /// `model.fp16-00001-of-00002.safetensors` + `model.safetensors.index.fp16.json`).
    pub fn sparse_pipeline_variant(name: &str, dir: &Path, float: runner::checkpoint::safetensors::Dtype, variant: Option<&str>) -> PathBuf {
        use runner::checkpoint::safetensors::{encode_header, Dtype, TensorInfo};
        let spec: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(data(&format!("shapes/{name}.json"))).unwrap()).unwrap();
        let root = dir.join(name);
        std::fs::create_dir_all(&root).unwrap();
        std::fs::write(root.join("model_index.json"), serde_json::to_string_pretty(&spec["model_index"]).unwrap()).unwrap();
        for (comp, entry) in spec["model_index"].as_object().unwrap() {
            if entry.is_array() && entry[0].is_string() {
                std::fs::create_dir_all(root.join(comp)).unwrap();
            }
        }
        // The scheduler config of the reference folder (SD3), else those of the real SD 1.5 and
        // SDXL base repositories.
        let scheduler = match (spec.get("scheduler"), spec["model_index"]["scheduler"][1].as_str().unwrap()) {
            (Some(s), _) => serde_json::to_string_pretty(s).unwrap(),
            (None, "PNDMScheduler") => {
                r#"{"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": false, "num_train_timesteps": 1000, "set_alpha_to_one": false, "skip_prk_steps": true, "steps_offset": 1, "trained_betas": null}"#.to_string()
            }
            (None, _) => {
                r#"{"_class_name": "EulerDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": false, "interpolation_type": "linear", "num_train_timesteps": 1000, "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": false, "skip_prk_steps": true, "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": null, "use_karras_sigmas": false}"#.to_string()
            }
        };
        std::fs::write(root.join("scheduler/scheduler_config.json"), scheduler).unwrap();
        // The T5 tokenizer's tokenizer.json, whose presence preflight checks: SD3's `tokenizer_3`,
        // FLUX's `tokenizer_2`.
        for t in ["tokenizer_2", "tokenizer_3"] {
            if spec["model_index"][t][1].as_str().is_some_and(|c| c.starts_with("T5")) {
                std::fs::copy(self::root().join("tests/fixtures/tiny-sd3/tokenizer_3/tokenizer.json"), root.join(t).join("tokenizer.json")).unwrap();
            }
        }
        for (comp, c) in spec["components"].as_object().unwrap() {
            let d = root.join(comp);
            std::fs::write(d.join("config.json"), serde_json::to_string_pretty(&c["config"]).unwrap()).unwrap();
            let stem = if c["library"] == "diffusers" { "diffusion_pytorch_model" } else { "model" };
            let weight_map = c["shards"]["weight_map"].as_object();
            // File of each tensor: the shard the repo puts it in (renamed for a variant), else the one file.
            let file_of = |tensor: &str| -> String {
                match (weight_map, variant) {
                    (Some(m), Some(v)) => m[tensor].as_str().unwrap().replacen(&format!("{stem}-"), &format!("{stem}.{v}-"), 1),
                    (Some(m), None) => m[tensor].as_str().unwrap().to_string(),
                    (None, Some(v)) => format!("{stem}.{v}.safetensors"),
                    (None, None) => format!("{stem}.safetensors"),
                }
            };
            let mut files: std::collections::BTreeMap<String, (Vec<TensorInfo>, u64)> = Default::default();
            for t in c["tensors"].as_array().unwrap() {
                let dtype = match t[1].as_str().unwrap() {
                    "I64" => Dtype::I64,
                    _ => float,
                };
                let name = t[0].as_str().unwrap();
                let shape: Vec<u64> = t[2].as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect();
                let n = shape.iter().product::<u64>() * dtype.bits() / 8;
                let (infos, off) = files.entry(file_of(name)).or_default();
                infos.push(TensorInfo { name: name.to_string(), dtype, shape, data_offsets: (*off, *off + n) });
                *off += n;
            }
            if let Some(m) = weight_map {
                assert_eq!(m.len(), c["tensors"].as_array().unwrap().len(), "{name} {comp}: the shard map names every tensor");
                let total: u64 = files.values().map(|f| f.1).sum();
                let index = serde_json::json!({
                    "metadata": {"total_size": total},
                    "weight_map": files.iter().flat_map(|(f, (infos, _))| infos.iter().map(move |t| (t.name.clone(), serde_json::Value::from(f.as_str())))).collect::<serde_json::Map<_, _>>(),
                });
                let index_name = match variant {
                    Some(v) => format!("{stem}.safetensors.index.{v}.json"),
                    None => format!("{stem}.safetensors.index.json"),
                };
                std::fs::write(d.join(index_name), serde_json::to_string_pretty(&index).unwrap()).unwrap();
            }
            for (file, (infos, len)) in &files {
                let header = encode_header(infos, &Default::default());
                let f = std::fs::File::create(d.join(file)).unwrap();
                use std::io::Write;
                (&f).write_all(&header).unwrap();
                f.set_len(header.len() as u64 + len).unwrap();
            }
        }
        root
    }

    /// Runs the command and returns (exit code, stdout, stderr).
    pub fn run(cmd: &mut Command) -> (i32, String, String) {
        let out = cmd.output().expect("runs");
        (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
    }
}
