//! Checkpoints: the committed fixtures read from headers, and every bad-input class a clear
//! error naming the file (and tensor), exit 1.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use runner::checkpoint::layout::{Checkpoint, PipelineFolder};
use runner::checkpoint::safetensors::{encode_header, Dtype, TensorInfo};

use crate::util::{root, run, runner};

/// Writes a safetensors file of F32 tensors `(name, numel)`.
pub fn write_st(path: &Path, tensors: &[(&str, u64)]) {
    let mut infos = vec![];
    let mut off = 0;
    for (name, n) in tensors {
        infos.push(TensorInfo { name: name.to_string(), dtype: Dtype::F32, shape: vec![*n], data_offsets: (off, off + 4 * n) });
        off += 4 * n;
    }
    let mut bytes = encode_header(&infos, &BTreeMap::new());
    bytes.extend(vec![0u8; off as usize]);
    std::fs::write(path, bytes).unwrap();
}

fn inspect_err(path: &Path) -> String {
    let (code, stdout, stderr) = run(runner().arg("inspect").arg(path));
    assert_eq!(code, 1, "{}: expected failure\n{stdout}{stderr}", path.display());
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

#[test]
fn fixtures_read_from_headers() {
    let p = PipelineFolder::open(&root().join("tests/fixtures/tiny-sdxl"), None).unwrap();
    let names: Vec<&str> = p.components.iter().filter(|c| c.checkpoint.is_some()).map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["text_encoder", "text_encoder_2", "unet", "vae"]);
    let unet = p.component("unet").unwrap().checkpoint.as_ref().unwrap();
    assert_eq!(unet.bytes_at(2) * 2, unet.bytes_at(4));
    assert_eq!(unet.stored_bytes(), unet.bytes_at(4));
    assert_eq!(p.index.config.get("force_zeros_for_empty_prompt"), Some(&serde_json::Value::Bool(true)));

    // The sharded UNet holds exactly the same tensors as the single file.
    let sharded = runner::checkpoint::layout::resolve_source(&root().join("tests/fixtures/tiny-sdxl-unet-sharded"), None, None, runner::checkpoint::layout::VariantPolicy::Require).unwrap();
    let sharded = Checkpoint::open(sharded).unwrap();
    assert!(sharded.files.len() > 1);
    let shapes = |c: &Checkpoint| c.tensors.iter().map(|(k, t)| (k.clone(), t.info.shape.clone(), t.info.dtype)).collect::<Vec<_>>();
    assert_eq!(shapes(&sharded), shapes(unet));
    // ... with the same values.
    let bytes = |c: &Checkpoint| {
        let maps: Vec<runner::checkpoint::safetensors::MappedFile> = c.files.iter().map(|(p, _)| runner::checkpoint::safetensors::MappedFile::open(p).unwrap()).collect();
        c.tensors.iter().map(|(k, t)| (k.clone(), maps[t.file].data(&t.info).to_vec())).collect::<Vec<_>>()
    };
    assert!(bytes(&sharded) == bytes(unet), "the sharded UNet holds the single file's values");
}

#[test]
fn variant_falls_back_per_component_and_says_so() {
    let (code, stdout, stderr) = run(runner().args(["inspect", "--json", "--variant", "fp16", "tests/fixtures/tiny-sdxl"]));
    assert_eq!(code, 0, "{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let comp = |n: &str| v["components"].as_array().unwrap().iter().find(|c| c["name"] == n).unwrap().clone();
    assert_eq!(comp("unet")["weights"]["variant"], "fp16");
    assert_eq!(comp("unet")["weights"]["bytes_by_dtype"]["F16"], comp("unet")["weights"]["bytes_at"]["fp16"]);
    assert_eq!(comp("text_encoder")["weights"]["variant"], serde_json::Value::Null);
    assert!(v["notes"][0].as_str().unwrap().contains("no `fp16` variant in `tests/fixtures/tiny-sdxl/text_encoder`"), "{v}");

    // No component at all with the variant: an error, as in diffusers.
    let (code, _, stderr) = run(runner().args(["inspect", "--variant", "bf16", "tests/fixtures/tiny-sdxl"]));
    assert_eq!(code, 1);
    assert!(stderr.contains("no component has `bf16` variant weights"), "{stderr}");
}

#[test]
fn inspect_table() {
    let (code, stdout, stderr) = run(runner().args(["inspect", "tests/fixtures/tiny-sd15"]));
    assert_eq!(code, 0, "{stderr}");
    insta::assert_snapshot!(stdout);
}

fn tmp() -> (tempfile::TempDir, PathBuf) {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().to_path_buf();
    (d, p)
}

#[test]
fn bad_files() {
    let (_d, dir) = tmp();
    let good = dir.join("good.safetensors");
    write_st(&good, &[("a", 4), ("b", 2)]);
    let bytes = std::fs::read(&good).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = String::from_utf8(bytes[8..8 + n].to_vec()).unwrap();
    let with_header = |h: &str, data: usize| {
        let h = format!("{h:<width$}", width = h.len().div_ceil(8) * 8);
        let mut b = (h.len() as u64).to_le_bytes().to_vec();
        b.extend(h.as_bytes());
        b.extend(vec![0u8; data]);
        b
    };
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("truncated.safetensors", bytes[..bytes.len() - 5].to_vec(), "truncated: tensors need 24 bytes of data but the file holds 19"),
        ("tiny.safetensors", vec![1, 2, 3], "truncated: 3 bytes"),
        (
            "long-header.safetensors",
            {
                let mut b = bytes.clone();
                b[..8].copy_from_slice(&((bytes.len() as u64) * 2).to_le_bytes());
                b
            },
            "runs past the end of the file",
        ),
        (
            "gigabytes.safetensors",
            {
                let mut b = bytes.clone();
                b[..8].copy_from_slice(&(5u64 << 30).to_le_bytes());
                b
            },
            "over the 100 MB safetensors limit",
        ),
        ("not-json.safetensors", with_header("this is not json", 0), "header is not valid safetensors JSON"),
        ("out-of-bounds.safetensors", with_header(&header.trim_end().replace("[16,24]", "[16,32]"), 24), "tensor `b`: shape [2] of F32 needs 8 bytes but data_offsets [16, 32] hold 16"),
        ("overlap.safetensors", with_header(&header.trim_end().replace("[16,24]", "[8,16]"), 24), "overlaps the previous tensor"),
        ("dtype.safetensors", with_header(&header.trim_end().replace("\"F32\"", "\"F31\""), 24), "unknown dtype `F31`"),
        ("shape.safetensors", with_header(&header.trim_end().replace("[4]", "[5]"), 24), "tensor `a`: shape [5] of F32 needs 20 bytes"),
    ];
    for (name, content, want) in cases {
        let p = dir.join(name);
        std::fs::write(&p, content).unwrap();
        let err = inspect_err(&p);
        assert!(err.contains(want) && err.contains(name), "{name}: want {want:?} in {err}");
    }
}

fn sharded(dir: &Path, index: &str, shards: &[(&str, &[(&str, u64)])]) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("config.json"), r#"{"_class_name": "UNet2DConditionModel"}"#).unwrap();
    for (name, tensors) in shards {
        write_st(&dir.join(name), tensors);
    }
    let p = dir.join("diffusion_pytorch_model.safetensors.index.json");
    std::fs::write(&p, index).unwrap();
    p
}

#[test]
fn bad_indexes() {
    let (_d, dir) = tmp();
    let s1 = "diffusion_pytorch_model-00001-of-00002.safetensors";
    let s2 = "diffusion_pytorch_model-00002-of-00002.safetensors";
    type Shards<'a> = Vec<(&'a str, &'a [(&'a str, u64)])>;
    let cases: Vec<(&str, String, Shards, &str)> = vec![
        (
            "missing-shard",
            format!(r#"{{"weight_map": {{"a": "{s1}", "b": "{s2}"}}}}"#),
            vec![(s1, &[("a", 1)])],
            "names shard `diffusion_pytorch_model-00002-of-00002.safetensors`, which does not exist",
        ),
        ("two-shards", format!(r#"{{"weight_map": {{"a": "{s1}", "b": "{s2}"}}}}"#), vec![(s1, &[("a", 1)]), (s2, &[("a", 1), ("b", 1)])], "tensor `a`: is in this shard but"),
        ("unlisted", format!(r#"{{"weight_map": {{"a": "{s1}"}}}}"#), vec![(s1, &[("a", 1), ("c", 1)])], "tensor `c`: is in this shard but"),
        ("absent-tensor", format!(r#"{{"weight_map": {{"a": "{s1}", "z": "{s1}"}}}}"#), vec![(s1, &[("a", 1)])], "tensor `z`: is missing"),
        ("traversal", r#"{"weight_map": {"a": "../evil.safetensors"}}"#.to_string(), vec![], "shard name \"../evil.safetensors\" is not a plain file name"),
        ("slash", r#"{"weight_map": {"a": "sub/x.safetensors"}}"#.to_string(), vec![], "is not a plain file name"),
        ("mapped-twice", format!(r#"{{"weight_map": {{"a": "{s1}", "a": "{s2}"}}}}"#), vec![], "tensor `a` is mapped twice"),
        ("not-json", "{".to_string(), vec![], "not a valid shard index"),
    ];
    for (name, index, shards, want) in cases {
        let folder = dir.join(name);
        let idx = sharded(&folder, &index, &shards);
        for target in [folder.clone(), idx] {
            let err = inspect_err(&target);
            assert!(err.contains(want), "{name}: want {want:?} in {err}");
            assert!(err.contains(name), "{name}: error should name the file: {err}");
        }
    }
}

#[test]
fn bad_folders() {
    let (_d, dir) = tmp();
    let empty = dir.join("empty");
    std::fs::create_dir(&empty).unwrap();
    assert!(inspect_err(&empty).contains("the folder is empty"));

    let pipe = dir.join("pipe");
    std::fs::create_dir(&pipe).unwrap();
    std::fs::write(pipe.join("model_index.json"), r#"{"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"], "safety_checker": [null, null]}"#).unwrap();
    let err = inspect_err(&pipe);
    assert!(err.contains("model_index.json") && err.contains("names component `unet`") && err.contains("does not exist"), "{err}");

    std::fs::create_dir(pipe.join("unet")).unwrap();
    std::fs::write(pipe.join("unet/config.json"), "{}").unwrap();
    std::fs::write(pipe.join("unet/diffusion_pytorch_model.bin"), "pickle").unwrap();
    let err = inspect_err(&pipe);
    assert!(err.contains("no safetensors weights") && err.contains("diffusion_pytorch_model.bin") && err.contains("does not load"), "{err}");

    std::fs::write(pipe.join("model_index.json"), "{not json").unwrap();
    assert!(inspect_err(&pipe).contains("model_index.json`: not valid JSON"));

    let other = dir.join("other");
    std::fs::create_dir(&other).unwrap();
    std::fs::write(other.join("notes.txt"), "x").unwrap();
    assert!(inspect_err(&other).contains("no `model_index.json`: not a diffusers pipeline folder"));
    assert!(inspect_err(&dir.join("nope")).contains("nope"));
}

/// A `config.json` cut short or not an object is a broken download: `inspect` of its component
/// folder, or of a pipeline folder holding it, fails naming the file and, for bad JSON, serde's
/// line and column; nothing on stdout. A config without `_class_name` is fine.
#[test]
fn bad_configs() {
    let (_d, dir) = tmp();
    let pipe = dir.join("pipe");
    let unet = pipe.join("unet");
    std::fs::create_dir_all(&unet).unwrap();
    std::fs::write(pipe.join("model_index.json"), r#"{"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}"#).unwrap();
    write_st(&unet.join("diffusion_pytorch_model.safetensors"), &[("a", 4)]);
    let config = unet.join("config.json");
    std::fs::write(&config, r#"{"in_channels": 4}"#).unwrap();
    let (code, stdout, stderr) = run(runner().args(["inspect", "--json"]).arg(&unet));
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(serde_json::from_str::<serde_json::Value>(&stdout).unwrap()["components"][0]["class"], serde_json::Value::Null, "{stdout}");
    assert_eq!(run(runner().arg("inspect").arg(&pipe)).0, 0);

    for (text, want) in [
        (r#"{"in_channels": "#, "not valid JSON: EOF while parsing a value at line 1 column 16"),
        ("{\n  \"in_channels\": 4,\n}", "not valid JSON: trailing comma at line 3 column 1"),
        ("[4, 4]", "expected a JSON object, got a list"),
        ("\"UNet2DConditionModel\"", "expected a JSON object, got a string"),
    ] {
        std::fs::write(&config, text).unwrap();
        for target in [&unet, &pipe] {
            let (code, stdout, stderr) = run(runner().arg("inspect").arg(target));
            assert_eq!(code, 1, "{text:?} in {}: expected failure\n{stdout}{stderr}", target.display());
            assert!(stdout.is_empty(), "{text:?}: {stdout}");
            assert!(stderr.contains(&format!("`{}`: {want}", config.display())), "{text:?} in {}: want {want:?} in {stderr}", target.display());
        }
    }
}

/// Real SD 1.5 / SDXL sizes from sparse full-size files: runner's exact bytes at each dtype
/// equal what accelerate's `compute_module_sizes` counts for the same configs.
#[test]
fn real_size_pipelines_from_headers() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["sdxl", "sd15"] {
        let root = crate::util::sparse_pipeline(name, dir.path(), Dtype::F32);
        let spec: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(crate::util::data(&format!("shapes/{name}.json"))).unwrap()).unwrap();
        let t = std::time::Instant::now();
        let (code, stdout, stderr) = run(runner().args(["inspect", "--json"]).arg(&root));
        assert_eq!(code, 0, "{stderr}");
        eprintln!("inspect of the full-size {name} folder: {:?}", t.elapsed());
        let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        for c in v["components"].as_array().unwrap().iter().filter(|c| !c["weights"].is_null()) {
            let name = c["name"].as_str().unwrap();
            let accelerate = spec["components"][name]["accelerate_module_size_fp32"].as_u64().unwrap();
            assert_eq!(c["weights"]["bytes_at"]["fp32"], accelerate, "{name}");
        }
    }
    // The numbers of ../shared/reference-configs/README.md, at fp16.
    let root = dir.path().join("sdxl");
    let p = PipelineFolder::open(&root, None).unwrap();
    let at16 = |n: &str| p.component(n).unwrap().checkpoint.as_ref().unwrap().bytes_at(2);
    assert_eq!(at16("unet"), 5_134_927_368);
    assert_eq!(at16("text_encoder_2"), 1_389_320_296);
    assert_eq!(at16("text_encoder"), 246_121_576);
    assert_eq!(at16("vae"), 167_307_726);
}

/// Issue 24 item 18: a component source named `*.safetensors` that is a FIFO hung `validate`,
/// `run`, `inspect`, `shard` (and `lock`) in `open()`; it is refused at once, naming the file.
#[test]
fn a_fifo_named_like_a_checkpoint_is_refused_not_waited_on() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("unet.safetensors");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let source = format!("components.unet.source=\"{}\"", fifo.display());
    let started = std::time::Instant::now();
    let out = dir.path().join("shards");
    for args in [
        vec!["validate", "manifests/tiny-sd15.toml", "--set", &source],
        vec!["run", "manifests/tiny-sd15.toml", "--quiet", "--set", &source],
        vec!["lock", "manifests/tiny-sd15.toml", "--set", &source],
        vec!["inspect", fifo.to_str().unwrap()],
        vec!["shard", fifo.to_str().unwrap(), "--out", out.to_str().unwrap(), "--max-shard-size", "1MB"],
    ] {
        let (code, _, stderr) = crate::util::run(crate::util::runner().args(&args).timeout(std::time::Duration::from_secs(60)));
        assert_eq!(code, 1, "{args:?}: {stderr}");
        assert!(stderr.contains(&fifo.display().to_string()) && stderr.contains("not a regular file"), "{args:?}: {stderr}");
    }
    assert!(started.elapsed().as_secs() < 30, "no command waited on the FIFO");
    assert!(!out.exists());
}
