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
    assert!(stderr.contains("is the source (`tests/fixtures/tiny-sd15/vae`): replacing it would delete what is being sharded"), "{stderr}");
    let (code, _, stderr) = run(runner().args(["shard", "tests/fixtures/nope", "--out"]).arg(dir.path().join("x")));
    assert_eq!(code, 1);
    assert!(stderr.contains("tests/fixtures/nope"), "{stderr}");
}

/// A copy of the tiny SD 1.5 pipeline in `dir` (files the test may damage).
fn pipeline_copy(dir: &Path) -> std::path::PathBuf {
    let p = dir.join("pipe");
    crate::lock::copy_dir(&root().join("tests/fixtures/tiny-sd15"), &p);
    p
}

fn listing(dir: &Path) -> Vec<String> {
    let mut out: Vec<String> = crate::run::walk(dir).into_iter().map(|p| p.strip_prefix(dir).unwrap().display().to_string()).collect();
    out.sort();
    out
}

#[test]
fn never_replaces_the_source_or_what_holds_it() {
    // `--out` the pipeline holding SRC, SRC itself, or either through a symlink or `..`: refused
    // before anything is touched, even with --force.
    let dir = tempfile::tempdir().unwrap();
    let pipe = pipeline_copy(dir.path());
    std::os::unix::fs::symlink(&pipe, dir.path().join("link")).unwrap();
    let before = listing(&pipe);
    let unet = pipe.join("unet");
    for out in [pipe.clone(), unet.clone(), dir.path().join("link"), pipe.join("unet/.."), dir.path().to_path_buf(), dir.path().join("link/unet")] {
        let (code, _, stderr) = run(runner().arg("shard").arg(&unet).arg("--out").arg(&out).args(["--force", "--max-shard-size", "300KB"]));
        assert_eq!(code, 1, "{}: {stderr}", out.display());
        assert!(stderr.contains("replacing it would delete what is being sharded"), "{}: {stderr}", out.display());
    }
    // A single file as SRC: its folder is protected too.
    let file = unet.join("diffusion_pytorch_model.safetensors");
    let (code, _, stderr) = run(runner().arg("shard").arg(&file).arg("--out").arg(&unet).args(["--force"]));
    assert_eq!(code, 1, "{stderr}");
    assert_eq!(listing(&pipe), before, "nothing touched");
    assert!(!std::fs::read_dir(dir.path()).unwrap().any(|e| e.unwrap().file_name().to_string_lossy().contains("runner-")), "no temp left");
}

#[test]
fn leftovers_of_killed_runs_go_and_temp_names_fit() {
    let dir = tempfile::tempdir().unwrap();
    // A 250-byte output name: legal, and its temp name must fit in 255 bytes too.
    let out = dir.path().join("u".repeat(250));
    // What a `kill -9` left: a temp folder of a process that no longer runs (PID 4000000 > pid_max
    // on Linux), and a stale `old` folder; a live process's temp is kept.
    // (Names are shortened to fit 255 bytes: derive them as runner does.)
    let dead = runner::fsutil::temp_sibling(&out, "runner-tmp").to_string_lossy().replace(&format!("-{}", std::process::id()), "-4000000");
    std::fs::create_dir(&dead).unwrap();
    std::fs::write(Path::new(&dead).join("diffusion_pytorch_model-00001-of-00002.safetensors"), b"half").unwrap();
    let live = runner::fsutil::temp_sibling(&out, "runner-tmp");
    std::fs::write(&live, b"").unwrap();
    let (code, _, stderr) = run(runner().arg("shard").arg(root().join("tests/fixtures/tiny-sd15/unet")).arg("--out").arg(&out).args(["--max-shard-size", "300KB"]));
    assert_eq!(code, 0, "{stderr}");
    assert!(out.join("diffusion_pytorch_model.safetensors.index.json").is_file());
    assert!(!Path::new(&dead).exists(), "the dead run's temp folder is gone");
    assert!(live.exists(), "a running process's temp stays");
    // PNGs: the same, beside the image.
    let png = dir.path().join("x".repeat(250) + ".png");
    let dead_png = runner::fsutil::temp_sibling(&png, "runner-tmp").to_string_lossy().replace(&format!("-{}", std::process::id()), "-4000001");
    std::fs::write(&dead_png, b"").unwrap();
    let (code, _, stderr) = run(runner().args(["run", "manifests/tiny-sd15.toml", "--quiet", "--set", "run.steps=1", "--out"]).arg(&png));
    assert_eq!(code, 0, "{stderr}");
    assert!(png.is_file() && !Path::new(&dead_png).exists());
}

#[test]
fn a_second_concurrent_writer_is_told_to_pass_force() {
    // Two writers, the second finishing after the first created `out`: the final rename checks
    // again and does not replace. Simulated in process: `out` appears while the shards are written.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let src = root().join("tests/fixtures/tiny-sd15/unet");
    let opts = runner::checkpoint::shard::ShardOptions { max_shard_size: 300_000, dtype: None, variant: None, force: false, fsync: false };
    let first = std::cell::Cell::new(true);
    let e = runner::checkpoint::shard::shard(&src, &out, &opts, &|_, _| {
        if first.replace(false) {
            std::fs::create_dir(&out).unwrap();
            std::fs::write(out.join("theirs"), b"the other writer's shard").unwrap();
        }
    })
    .unwrap_err()
    .to_string();
    assert!(e.contains("was written by someone else while sharding: pass --force to replace it"), "{e}");
    assert_eq!(std::fs::read(out.join("theirs")).unwrap(), b"the other writer's shard", "theirs kept");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "our temp folder is gone");
}

#[test]
fn a_source_truncated_while_converting_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let pipe = pipeline_copy(dir.path());
    let file = pipe.join("unet/diffusion_pytorch_model.safetensors");
    let opts = runner::checkpoint::shard::ShardOptions { max_shard_size: 300_000, dtype: Some(runner::manifest::Dtype::Fp16), variant: None, force: false, fsync: false };
    let header_end = runner::checkpoint::safetensors::read_header(&file).unwrap().data_start;
    let e = runner::checkpoint::shard::shard(&pipe.join("unet"), &dir.path().join("out"), &opts, &|_, _| {
        // Another process truncates the source after the first tensor.
        std::fs::OpenOptions::new().write(true).open(&file).unwrap().set_len(header_end).unwrap();
    })
    .unwrap_err()
    .to_string();
    assert!(e.contains(&file.display().to_string()) && e.contains("truncated or replaced while runner read it"), "{e}");
    assert!(!dir.path().join("out").exists());
}
