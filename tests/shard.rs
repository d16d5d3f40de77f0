//! `runner shard`: output that reloads with the same tensors, hub naming, atomic replacement.
//! (That diffusers itself loads the output is checked with tools/check_shards.py; see README.)

use std::path::Path;

use runner::checkpoint::layout::{resolve_source, Checkpoint, VariantPolicy};
use runner::checkpoint::safetensors::MappedFile;

use crate::util::{root, run, runner};

fn open(p: &Path) -> Checkpoint {
    Checkpoint::open(resolve_source(p, None, None, VariantPolicy::Require).unwrap()).unwrap()
}

/// Every tensor's bytes, by name.
fn tensors(c: &Checkpoint) -> Vec<(String, Vec<u64>, Vec<u8>)> {
    let maps: Vec<MappedFile> = c.files.iter().map(|(p, _)| MappedFile::open(p).unwrap()).collect();
    c.tensors.iter().map(|(k, t)| (k.clone(), t.info.shape.clone(), maps[t.file].data(&t.info).to_vec())).collect()
}

#[test]
fn reshards_losslessly_with_hub_names() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("unet");
    let src = root().join("tests/fixtures/tiny-sdxl/unet");
    let (code, stdout, stderr) = run(runner().arg("shard").arg(&src).arg("--out").arg(&out).args(["--max-shard-size", "300KB"]));
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("838 tensors"), "{stdout}");
    let mut names: Vec<String> = std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    assert_eq!(names.last().unwrap(), "diffusion_pytorch_model.safetensors.index.json");
    assert!(names.contains(&"config.json".to_string()));
    assert!(names.contains(&"diffusion_pytorch_model-00001-of-00004.safetensors".to_string()), "{names:?}");
    let resharded = open(&out);
    assert_eq!(tensors(&resharded), tensors(&open(&src)));
    for (_, h) in &resharded.files {
        assert!(h.total_bytes() <= 300_000, "every shard within the limit (no tensor here is larger)");
        assert_eq!(h.metadata.get("format").map(String::as_str), Some("pt"));
    }
    // the index is sorted, indented by 2, newline-terminated, with total_size = tensor bytes
    let index = std::fs::read_to_string(out.join("diffusion_pytorch_model.safetensors.index.json")).unwrap();
    assert!(index.starts_with("{\n  \"metadata\": {\n    \"total_size\": 1029968\n  },\n  \"weight_map\": {\n"), "{index}");
    assert!(index.ends_with("}\n"));
    // no temp folders left beside the output
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}

#[test]
fn one_shard_has_no_index_and_variant_names() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("te");
    let (code, _, stderr) = run(runner().args(["shard", "tests/fixtures/tiny-sdxl-unet-sharded/diffusion_pytorch_model.safetensors.index.json", "--out"]).arg(&out).args([
        "--max-shard-size",
        "10GB",
        "--dtype",
        "fp16",
        "--variant",
        "fp16",
        "--json",
    ]));
    assert_eq!(code, 0, "{stderr}");
    let mut names: Vec<String> = std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    assert_eq!(names, ["config.json", "diffusion_pytorch_model.fp16.safetensors"]);
    let c = open(&out.join("diffusion_pytorch_model.fp16.safetensors"));
    assert_eq!(c.bytes_by_dtype().keys().collect::<Vec<_>>(), ["F16"]);

    // transformers components keep their `model` stem
    let out2 = dir.path().join("te2");
    let (code, _, _) = run(runner().args(["shard", "tests/fixtures/tiny-sdxl/text_encoder_2", "--out"]).arg(&out2).args(["--max-shard-size", "500KB"]));
    assert_eq!(code, 0);
    assert!(out2.join("model.safetensors.index.json").is_file());
    let shard1 = std::fs::read_dir(&out2).unwrap().filter_map(|e| e.ok()?.file_name().into_string().ok()).find(|n| n.starts_with("model-00001-of-"));
    assert!(shard1.is_some_and(|n| n.ends_with(".safetensors")));
}

#[test]
fn refuses_to_clobber_and_bad_arguments() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "x").unwrap();
    let shard = |extra: &[&str]| run(runner().args(["shard", "tests/fixtures/tiny-sd15/vae", "--out"]).arg(&out).args(extra));
    let (code, _, stderr) = shard(&[]);
    assert_eq!(code, 1);
    assert!(stderr.contains("exists and is not empty: pass --force"), "{stderr}");
    assert!(out.join("keep.txt").exists());
    let (code, _, stderr) = shard(&["--force"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(!out.join("keep.txt").exists() && out.join("diffusion_pytorch_model.safetensors").is_file());

    let (code, _, stderr) = shard(&["--force", "--max-shard-size", "5Gb"]);
    assert_eq!(code, 2, "clap usage error");
    assert!(stderr.contains("ambiguous unit `Gb`"), "{stderr}");
    let (code, _, stderr) = shard(&["--force", "--max-shard-size", "0"]);
    assert_eq!(code, 1);
    assert!(stderr.contains("must be more than 0 bytes"), "{stderr}");
    let (code, _, stderr) = shard(&["--force", "--variant", "../x"]);
    assert_eq!(code, 1);
    assert!(stderr.contains("must be letters, digits"), "{stderr}");
    let (code, _, stderr) = run(runner().args(["shard", "tests/fixtures/tiny-sd15/vae", "--out", "tests/fixtures/tiny-sd15/vae", "--force"]));
    assert_eq!(code, 1);
    assert!(stderr.contains("is the source folder"), "{stderr}");
    let (code, _, stderr) = run(runner().args(["shard", "tests/fixtures/nope", "--out"]).arg(dir.path().join("x")));
    assert_eq!(code, 1);
    assert!(stderr.contains("tests/fixtures/nope"), "{stderr}");
}
