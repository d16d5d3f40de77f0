//! Checkpoint tensors into libtorch: zero-copy views where possible, conversions like
//! `model.to(dtype)`, strict key checks.

use runner::checkpoint::layout::{resolve_source, Checkpoint, VariantPolicy};
use runner::checkpoint::load::{check_keys, load, Expected, LoadOptions};
use runner::checkpoint::safetensors::MappedFile;
use tch::{Device, Kind, Tensor};

use crate::util::root;

fn ck(rel: &str) -> Checkpoint {
    Checkpoint::open(resolve_source(&root().join(rel), None, None, VariantPolicy::Require).unwrap()).unwrap()
}

/// A tensor built by copying raw bytes (the reference).
fn reference(c: &Checkpoint, name: &str, kind: Kind) -> Tensor {
    let loc = &c.tensors[name];
    let map = MappedFile::open(&c.files[loc.file].0).unwrap();
    let shape: Vec<i64> = loc.info.shape.iter().map(|&d| d as i64).collect();
    Tensor::from_data_size(map.data(&loc.info), &shape, kind)
}

#[test]
fn same_dtype_is_zero_copy_and_exact() {
    crate::util::set_threads();
    let c = ck("tests/fixtures/tiny-sdxl-unet-sharded");
    let store = load(&c, None, LoadOptions { float_kind: None, device: Device::Cpu, populate: false }).unwrap();
    assert_eq!(store.len(), 838);
    assert_eq!(store.zero_copy_count(), 838, "safetensors data is 8-byte aligned: every f32 tensor is a view");
    for name in ["conv_in.weight", "add_embedding.linear_1.weight", "up_blocks.0.attentions.0.transformer_blocks.2.attn2.to_k.weight"] {
        let t = store.get(name).unwrap();
        assert_eq!(t.kind(), Kind::Float);
        assert!(t.equal(&reference(&c, name, Kind::Float)), "{name}");
    }
}

#[test]
fn writes_to_views_do_not_reach_the_file() {
    let c = ck("tests/fixtures/tiny-sd15/vae");
    let before = std::fs::read(&c.files[0].0).unwrap();
    let store = load(&c, Some(&["decoder.conv_out.bias"]), LoadOptions { float_kind: None, device: Device::Cpu, populate: true }).unwrap();
    let mut t = store.get("decoder.conv_out.bias").unwrap().shallow_clone();
    let _ = t.fill_(42.0);
    assert_eq!(std::fs::read(&c.files[0].0).unwrap(), before);
    let owned = store.into_owned();
    assert_eq!(owned["decoder.conv_out.bias"].double_value(&[0]), 42.0);
}

#[test]
fn conversions_match_torch_casts() {
    crate::util::set_threads();
    // fp16 file -> f32 tensors (diffusers' default upcast of variant weights)
    let c = ck("tests/fixtures/tiny-sdxl/unet/diffusion_pytorch_model.fp16.safetensors");
    let store = load(&c, None, LoadOptions { float_kind: Some(Kind::Float), device: Device::Cpu, populate: false }).unwrap();
    assert_eq!(store.zero_copy_count(), 0);
    let name = "mid_block.attentions.0.proj_in.weight";
    let t = store.get(name).unwrap();
    assert_eq!(t.kind(), Kind::Float);
    assert!(t.equal(&reference(&c, name, Kind::Half).to_kind(Kind::Float)));
    // f32 file -> bf16
    let c = ck("tests/fixtures/tiny-sdxl/vae");
    let store = load(&c, Some(&["encoder.conv_in.weight"]), LoadOptions { float_kind: Some(Kind::BFloat16), device: Device::Cpu, populate: false }).unwrap();
    let t = store.get("encoder.conv_in.weight").unwrap();
    assert!(t.equal(&reference(&c, "encoder.conv_in.weight", Kind::Float).to_kind(Kind::BFloat16)));
    // f32 file -> f16 (SIMD conversion) equals torch's cast on every tensor
    let store = load(&c, None, LoadOptions { float_kind: Some(Kind::Half), device: Device::Cpu, populate: false }).unwrap();
    for name in c.tensors.keys() {
        assert!(store.get(name).unwrap().equal(&reference(&c, name, Kind::Float).to_kind(Kind::Half)), "{name}");
    }
    // unknown names are errors naming the tensor
    let err = load(&c, Some(&["nope"]), LoadOptions { float_kind: None, device: Device::Cpu, populate: false }).err().unwrap();
    assert!(err.to_string().contains("tensor `nope`: not in this checkpoint"), "{err}");
}

#[test]
fn strict_keys_like_load_state_dict() {
    let c = ck("tests/fixtures/tiny-sd15/vae");
    let mut expected: Expected = c.tensors.iter().map(|(k, t)| (k.clone(), t.info.shape.clone())).collect();
    check_keys("AutoencoderKL", &c, &expected).unwrap();
    expected.remove("decoder.conv_out.bias");
    expected.insert("decoder.conv_out.extra".into(), vec![3]);
    expected.insert("encoder.conv_in.weight".into(), vec![8, 3, 3, 3, 1]);
    let err = check_keys("AutoencoderKL", &c, &expected).unwrap_err();
    assert_eq!(err.missing, ["decoder.conv_out.extra"]);
    assert_eq!(err.unexpected, ["decoder.conv_out.bias"]);
    let msg = err.to_string();
    assert!(msg.starts_with("error(s) in loading state_dict for AutoencoderKL from `"), "{msg}");
    assert!(msg.contains("missing key(s) in state_dict (1): \"decoder.conv_out.extra\""), "{msg}");
    assert!(msg.contains("unexpected key(s) in state_dict (1): \"decoder.conv_out.bias\""), "{msg}");
    assert!(msg.contains("size mismatch for encoder.conv_in.weight: copying a param with shape [8, 3, 3, 3] from checkpoint, the shape in current model is [8, 3, 3, 3, 1]"), "{msg}");
}

/// diffusers draws initial latents with `torch.randn` on a CPU generator seeded with the seed;
/// tch's `manual_seed` + `randn` is the same ATen generator: the committed references agree.
#[test]
fn reference_latents_are_tch_randn_draws() {
    crate::util::set_threads();
    for (case, seed, shape) in [("sd15-pndm", 0, vec![1i64, 4, 8, 8]), ("sd15-pndm-noguidance-batch2", 42, vec![2, 4, 8, 8]), ("sdxl-euler", 0, vec![1, 4, 8, 8])] {
        let refs = ck(&crate::util::refs_path(&format!("{case}.safetensors")).to_string_lossy());
        let store = load(&refs, Some(&["latents.init"]), LoadOptions { float_kind: None, device: Device::Cpu, populate: false }).unwrap();
        tch::manual_seed(seed);
        let drawn = Tensor::randn(&shape, (Kind::Float, Device::Cpu));
        // Bit-equal where libtorch takes the kernel path the recording machine took; the scalar
        // path (`ATEN_CPU_CAPABILITY=default`) differs in the last bits.
        runner::parity::check(&format!("{case}: initial draw"), crate::util::rel(&drawn, store.get("latents.init").unwrap()), runner::parity::NOISE);
    }
}

#[test]
fn a_checkpoint_truncated_while_mapped_is_an_error_naming_it() {
    // The child (this test again, in a process of its own): map a checkpoint, have it truncated
    // under the mapping, read it. Without the watch this dies of SIGBUS without a word.
    if let Ok(path) = std::env::var("RUNNER_TEST_SIGBUS_FILE") {
        let c = Checkpoint::open(resolve_source(std::path::Path::new(&path), None, None, VariantPolicy::Require).unwrap()).unwrap();
        let store = load(&c, None, LoadOptions { float_kind: None, device: Device::Cpu, populate: true }).unwrap();
        let header_end = c.files[0].1.data_start;
        std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(header_end).unwrap();
        let sum = store.get("w").unwrap().sum(Kind::Float).double_value(&[]);
        println!("read {sum} from a truncated file");
        std::process::exit(0);
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    let n = 1 << 18; // 1 MiB of f32: many pages
    let info = runner::checkpoint::safetensors::TensorInfo { name: "w".into(), dtype: runner::checkpoint::safetensors::Dtype::F32, shape: vec![n], data_offsets: (0, 4 * n) };
    let mut bytes = runner::checkpoint::safetensors::encode_header(&[info], &Default::default());
    bytes.extend(std::iter::repeat_n(0u8, 4 * n as usize));
    std::fs::write(&path, bytes).unwrap();
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "load::a_checkpoint_truncated_while_mapped_is_an_error_naming_it", "--nocapture", "--test-threads=1"])
        .env("RUNNER_TEST_SIGBUS_FILE", &path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "exit 1, not a signal: {:?}\n{stderr}", out.status);
    assert!(stderr.contains(&format!("error: `{}` changed while runner was reading it (truncated or rewritten in place", path.display())), "{stderr}");
}

#[test]
fn models_are_built_from_the_checkpoint_without_initialising_or_copying() {
    // Issue 13: no initialiser runs for a weight the checkpoint provides, and same-dtype CPU
    // weights are the mapped file's bytes (zero-copy), not a copy.
    use runner::models::weights::{build_from_checkpoint, initialised_params};
    crate::util::set_threads();
    let before = initialised_params();
    let unet_dir = root().join("tests/fixtures/tiny-sd15/unet");
    let cfg = runner::models::unet_2d::UNet2DConditionConfig::from_file(&unet_dir.join("config.json")).unwrap();
    let vs = tch::nn::VarStore::new(Device::Cpu);
    let (_unet, mapped) =
        build_from_checkpoint(&vs, &ck("tests/fixtures/tiny-sd15/unet"), "UNet2DConditionModel", Kind::Float, |root| runner::models::unet_2d::UNet2DConditionModel::new(root, cfg.clone())).unwrap();
    let vars = vs.variables();
    assert_eq!(vars.len(), 304, "every checkpoint tensor is a parameter");
    for (name, t) in &vars {
        assert!(mapped.contains(t.data_ptr() as *const u8), "`{name}` is a view of the mapped file");
    }
    let te_dir = root().join("tests/fixtures/tiny-sd15/text_encoder");
    let te_cfg = runner::models::clip::ClipTextConfig::from_file(&te_dir.join("config.json")).unwrap();
    let te = runner::models::clip::ClipTextModel::load(&te_cfg, &ck("tests/fixtures/tiny-sd15/text_encoder"), Device::Cpu, Kind::Float).unwrap();
    for (name, t) in te.varstore().variables() {
        assert!(te.mapped().contains(t.data_ptr() as *const u8), "`{name}`");
    }
    assert_eq!(initialised_params(), before, "no parameter was initialised");
    // Converted weights are written once into their own buffers (not views), still no initialiser.
    let vs16 = tch::nn::VarStore::new(Device::Cpu);
    let (_unet16, mapped16) =
        build_from_checkpoint(&vs16, &ck("tests/fixtures/tiny-sd15/unet"), "UNet2DConditionModel", Kind::Half, |root| runner::models::unet_2d::UNet2DConditionModel::new(root, cfg.clone())).unwrap();
    for (name, t) in vs16.variables() {
        assert_eq!(t.kind(), Kind::Half, "{name}");
        assert!(!mapped16.contains(t.data_ptr() as *const u8), "{name}");
    }
    assert_eq!(initialised_params(), before);
    // A model built without a checkpoint does initialise (the counter counts).
    let vs_random = tch::nn::VarStore::new(Device::Cpu);
    let _ = runner::models::hooks::Linear::new(vs_random.root() / "x", 4, 4, Default::default());
    assert_eq!(initialised_params(), before + 2);
}

#[test]
fn a_mismatched_checkpoint_is_refused_before_any_tensor_is_prepared() {
    // The dry pass learns what the model asks for; the key check runs before any byte is
    // converted or any tensor placed (progress counts placed bytes).
    use runner::models::weights::{build_from_checkpoint, with_progress, WeightsError};
    use std::cell::Cell;
    use std::rc::Rc;
    crate::util::set_threads();
    let placed = Rc::new(Cell::new(0u64));
    let sink = placed.clone();
    let vae_dir = root().join("tests/fixtures/tiny-sd15/vae");
    let cfg = runner::models::vae::AutoencoderKLConfig::from_file(&vae_dir.join("config.json")).unwrap();
    let vs = tch::nn::VarStore::new(Device::Cpu);
    let err = with_progress(Rc::new(move |b| sink.set(sink.get() + b)), || {
        build_from_checkpoint(&vs, &ck("tests/fixtures/tiny-sd15/unet"), "AutoencoderKL", Kind::Half, |root| runner::models::vae::AutoencoderKLDecoder::new(root, cfg.clone()))
    })
    .expect_err("a UNet checkpoint does not build a VAE");
    assert!(matches!(err, WeightsError::Keys(_)), "{err}");
    assert!(err.to_string().contains("missing key(s) in state_dict"), "{err}");
    assert_eq!(placed.get(), 0, "nothing was converted or placed");
    assert!(vs.variables().is_empty());

    // A good load reports every byte it placed, at the target dtype.
    let sink = placed.clone();
    let vs = tch::nn::VarStore::new(Device::Cpu);
    let unet_cfg = runner::models::unet_2d::UNet2DConditionConfig::from_file(&root().join("tests/fixtures/tiny-sd15/unet/config.json")).unwrap();
    with_progress(Rc::new(move |b| sink.set(sink.get() + b)), || {
        build_from_checkpoint(&vs, &ck("tests/fixtures/tiny-sd15/unet"), "UNet2DConditionModel", Kind::Half, |root| runner::models::unet_2d::UNet2DConditionModel::new(root, unet_cfg.clone()))
    })
    .unwrap();
    let want: u64 = vs.variables().values().map(|t| (t.numel() * 2) as u64).sum();
    assert_eq!(placed.get(), want);
}

/// A safetensors file whose header length leaves its f32 data at an odd offset.
fn unaligned_file(dir: &std::path::Path, values: &[f32]) -> std::path::PathBuf {
    let mut header = format!(r#"{{"lin.weight":{{"dtype":"F32","shape":[{},1],"data_offsets":[0,{}]}}}}"#, values.len(), values.len() * 4);
    while (8 + header.len()) % 4 != 1 {
        header.push(' ');
    }
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    for v in values {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    let path = dir.join("diffusion_pytorch_model.safetensors");
    std::fs::write(&path, bytes).unwrap();
    path
}

#[test]
fn an_unaligned_tensor_is_converted_not_refused() {
    use runner::models::weights::build_from_checkpoint;
    crate::util::set_threads();
    let dir = tempfile::tempdir().unwrap();
    let values = [1.5f32, -2.0, 3.25];
    unaligned_file(dir.path(), &values);
    let c = Checkpoint::open(resolve_source(dir.path(), None, None, VariantPolicy::Require).unwrap()).unwrap();
    for kind in [Kind::Float, Kind::Half] {
        let vs = tch::nn::VarStore::new(Device::Cpu);
        let (lin, mapped) =
            build_from_checkpoint(&vs, &c, "Linear", kind, |root| runner::models::hooks::Linear::new(root / "lin", 1, 3, tch::nn::LinearConfig { bias: false, ..Default::default() })).unwrap();
        assert_eq!(lin.ws.kind(), kind);
        assert_eq!(Vec::<f32>::try_from(lin.ws.to_kind(Kind::Float).flatten(0, -1)).unwrap(), values);
        assert!(!mapped.contains(lin.ws.data_ptr() as *const u8), "an unaligned tensor is a copy, not a misaligned view");
    }
}

#[test]
fn pages_of_a_copied_view_are_released_and_reread_from_the_file_if_touched() {
    // Pinning an offloaded weight copies it out of the mapping; the view's pages then go, so the
    // host holds one copy. A released range still reads the file's bytes.
    use runner::checkpoint::load::TensorStore;
    crate::util::set_threads();
    let c = ck("tests/fixtures/tiny-sdxl-unet-sharded");
    let store: TensorStore = load(&c, None, LoadOptions { float_kind: None, device: Device::Cpu, populate: true }).unwrap();
    let name = "conv_in.weight";
    let want = reference(&c, name, Kind::Float);
    let view = store.get(name).unwrap().shallow_clone();
    let converted = view.to_kind(Kind::Half);
    let (_, mapped) = store.into_parts();
    assert!(mapped.release_copied(&view), "a view of the mapping");
    assert!(!mapped.release_copied(&converted), "a tensor of its own is not the mapping's");
    assert!(view.equal(&want), "released pages are read again from the file");
}
