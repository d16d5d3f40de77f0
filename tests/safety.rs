//! SD 1.5 safety checking against diffusers 0.42.1 (`run_safety_checker`) on the tiny fixture:
//! the feature extractor (transformers' `CLIPImageProcessorPil`, Pillow's bicubic resize) and
//! `StableDiffusionSafetyChecker`, from tests/fixtures/refs/safety.{safetensors,json}
//! (tools/make_safety_refs.py).

use std::path::{Path, PathBuf};

use runner::checkpoint::layout::{resolve_folder, resolve_source, Checkpoint, Library, VariantPolicy};
use runner::checkpoint::load::{load, LoadOptions, TensorStore};
use runner::checkpoint::safetensors::{encode_header, read_header, Dtype, TensorInfo};
use runner::models::image_processor::{numpy_to_pil, pil_resize, ImageProcessor, Resample, RgbImage};
use runner::models::safety_checker::SafetyChecker;
use serde_json::Value;
use tch::{Device, Kind, Tensor};

use crate::util::root;

fn fixture(rel: &str) -> PathBuf {
    root().join("tests/fixtures").join(rel)
}

fn store(path: &Path) -> TensorStore {
    let ck = Checkpoint::open(resolve_source(path, None, None, VariantPolicy::Require).unwrap()).unwrap();
    load(&ck, None, LoadOptions { float_kind: None, device: Device::Cpu, populate: false }).unwrap()
}

struct Refs {
    tensors: TensorStore,
    meta: Value,
}

impl Refs {
    fn open() -> Refs {
        let meta = serde_json::from_str(&std::fs::read_to_string(crate::util::refs_path("safety.json")).unwrap()).unwrap();
        Refs { tensors: store(&crate::util::refs_path("safety.safetensors")), meta }
    }
    fn get(&self, name: &str) -> &Tensor {
        self.tensors.get(name).unwrap_or_else(|| panic!("refs tensor `{name}`"))
    }
    fn cases(&self) -> &Vec<Value> {
        self.meta["cases"].as_array().unwrap()
    }
}

/// tools/make_safety_refs.py `hash_u64`: index + (seed << 32), a splitmix-style mix.
fn hash_u64(i: u64, seed: u64) -> u64 {
    let mut h = i.wrapping_add(seed << 32).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    h ^= h >> 29;
    h = h.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    h ^ (h >> 32)
}

/// One [H, W, 3] float image as the script makes it (`noise_image`, `pattern_image`, or a
/// reference's decoded `image`).
fn make_image(h: usize, w: usize, source: &Value) -> Vec<f32> {
    if let Some(seed) = source["noise"].as_u64() {
        return (0..(h * w * 3) as u64).map(|i| (hash_u64(i, seed) >> 40) as f32 / (1u32 << 24) as f32).collect();
    }
    if let Some(p) = source["pattern"].as_str() {
        let mut v = vec![0f32; h * w * 3];
        for y in 0..h {
            for x in 0..w {
                let px: [f32; 3] = match p {
                    "gradient" => [x as f32 / (w - 1) as f32, y as f32 / (h - 1) as f32, (x + y) as f32 / (w + h - 2) as f32],
                    "square" if (h / 4..h * 5 / 8).contains(&y) && (w / 3..w * 4 / 5).contains(&x) => [1.0, 0.1, 0.2],
                    "square" => [0.5; 3],
                    _ => panic!("pattern {p}"),
                };
                v[(y * w + x) * 3..(y * w + x) * 3 + 3].copy_from_slice(&px);
            }
        }
        return v;
    }
    let name = source["refs"].as_str().unwrap();
    // (The store owns the mapping its tensors view: keep it while reading.)
    let refs = store(&crate::util::refs_path(&format!("{name}.safetensors")));
    let t = refs.get("image").unwrap();
    assert_eq!(t.size(), [1, h as i64, w as i64, 3]);
    f32s(t)
}

/// A case's input batch [B, H, W, 3].
fn case_images(case: &Value) -> Tensor {
    let (h, w) = (case["height"].as_u64().unwrap() as usize, case["width"].as_u64().unwrap() as usize);
    let sources = case["images"].as_array().unwrap();
    let data: Vec<f32> = sources.iter().flat_map(|s| make_image(h, w, s)).collect();
    Tensor::from_slice(&data).view([sources.len() as i64, h as i64, w as i64, 3])
}

fn u8s(t: &Tensor) -> Vec<u8> {
    Vec::<u8>::try_from(&t.flatten(0, -1)).unwrap()
}

fn f32s(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(&t.to_kind(Kind::Float).flatten(0, -1)).unwrap()
}

use crate::util::{max_diff as max_abs, rel as rel_diff};
use runner::parity::{check, MODEL, PREPROCESS};

fn tiny_processor() -> ImageProcessor {
    ImageProcessor::from_folder(&fixture("tiny-sd15/feature_extractor")).unwrap()
}

fn checkpoint(dir: &Path) -> Checkpoint {
    Checkpoint::open(resolve_folder(dir, Some(Library::Transformers), None, VariantPolicy::FallBack).unwrap()).unwrap()
}

fn load_checker(dir: &Path) -> SafetyChecker {
    SafetyChecker::load(dir, &checkpoint(dir), Device::Cpu, Kind::Float).unwrap()
}

/// Copies a transformers component folder with its tensors edited (offsets re-laid).
fn edited_copy(src: &Path, dst: &Path, edit: impl FnOnce(&mut Vec<(TensorInfo, Vec<u8>)>)) {
    std::fs::create_dir_all(dst).unwrap();
    std::fs::copy(src.join("config.json"), dst.join("config.json")).unwrap();
    let file = src.join("model.safetensors");
    let header = read_header(&file).unwrap();
    let bytes = std::fs::read(&file).unwrap();
    let data = &bytes[header.data_start as usize..];
    let mut tensors: Vec<(TensorInfo, Vec<u8>)> = header.tensors.iter().map(|t| (t.clone(), data[t.data_offsets.0 as usize..t.data_offsets.1 as usize].to_vec())).collect();
    edit(&mut tensors);
    let mut off = 0;
    let mut body = vec![];
    let infos: Vec<TensorInfo> = tensors
        .into_iter()
        .map(|(mut t, b)| {
            t.data_offsets = (off, off + b.len() as u64);
            off += b.len() as u64;
            body.extend(b);
            t
        })
        .collect();
    let mut out = encode_header(&infos, &header.metadata);
    out.extend(body);
    std::fs::write(dst.join("model.safetensors"), out).unwrap();
}

/// A copy of the tiny checker with some f32 parameters replaced (the `flagged` cases' edits).
fn edited_checker(dst: &Path, params: &[(String, Tensor)]) -> PathBuf {
    edited_copy(&fixture("tiny-sd15/safety_checker"), dst, |ts| {
        for (name, value) in params {
            let (info, bytes) = ts.iter_mut().find(|(t, _)| &t.name == name).unwrap_or_else(|| panic!("{name}"));
            assert_eq!(info.dtype, Dtype::F32);
            assert_eq!(info.shape.iter().map(|&d| d as i64).collect::<Vec<_>>(), value.size(), "{name}");
            *bytes = f32s(value).iter().flat_map(|v| v.to_le_bytes()).collect();
        }
    });
    dst.to_path_buf()
}

/// The folder of the checker each case ran with: the fixture's, or a copy (under `dir`) with
/// the case's recorded edits.
fn checker_dir_for(refs: &Refs, case: &str, dir: &Path) -> PathBuf {
    let names = ["concept_embeds", "special_care_embeds", "concept_embeds_weights", "special_care_embeds_weights"];
    let mut params = names.map(|n| (n.to_string(), refs.get(&format!("flagged.{n}")).shallow_clone()));
    match case {
        "flagged" => edited_checker(&dir.join(case), &params),
        "all-flagged" => {
            params[2].1 = refs.get("all-flagged.concept_embeds_weights").shallow_clone();
            edited_checker(&dir.join(case), &params)
        }
        _ => fixture("tiny-sd15/safety_checker"),
    }
}

fn checker_for(refs: &Refs, case: &str, dir: &Path) -> SafetyChecker {
    load_checker(&checker_dir_for(refs, case, dir))
}

#[test]
fn safety_resize_is_bit_exact_with_pillow() {
    let refs = Refs::open();
    let fe = tiny_processor();
    let mut report = vec![];
    for case in refs.cases() {
        let name = case["name"].as_str().unwrap();
        let images = numpy_to_pil(&case_images(case)).unwrap();
        let want = refs.get(&format!("{name}.resized"));
        let s = want.size();
        let got: Vec<u8> = images.iter().flat_map(|img| fe.resize(img).unwrap().data).collect();
        let want = u8s(want);
        let differ = got.iter().zip(&want).filter(|(a, b)| a != b).count();
        assert_eq!((got.len(), differ), (want.len(), 0), "{name}: resized {:?} differs from PIL in {differ} bytes", s);
        report.push(format!("{name} {}x{}->{}x{}", images[0].height, images[0].width, s[1], s[2]));
    }
    eprintln!("PIL bicubic resize bit-exact: {}", report.join(", "));
}

#[test]
fn safety_pixel_values_match_transformers() {
    let refs = Refs::open();
    let fe = tiny_processor();
    let mut worst = 0f64;
    let mut compared = 0;
    for case in refs.cases() {
        let name = case["name"].as_str().unwrap();
        let Some(want) = refs.tensors.get(&format!("{name}.pixel_values")) else { continue };
        let got = fe.preprocess(&case_images(case)).unwrap();
        assert_eq!(got.kind(), Kind::Float);
        // The refs keep the first image's (file size); the tower outputs check every image's.
        let d = max_abs(&got.narrow(0, 0, want.size()[0]), want);
        check(&format!("safety {name}: pixel_values"), d, PREPROCESS);
        worst = worst.max(d);
        compared += 1;
    }
    assert!(compared >= 8, "{compared}");
    eprintln!("pixel_values: {compared} cases, max |diff| {worst:e}");
}

#[test]
fn safety_checker_matches_diffusers() {
    crate::util::set_threads();
    let refs = Refs::open();
    let fe = tiny_processor();
    let dir = tempfile::tempdir().unwrap();
    let mut report = vec![];
    let (mut flagged, mut scores, mut scores_equal) = (0, 0, 0);
    for case in refs.cases() {
        let name = case["name"].as_str().unwrap();
        let checker = checker_for(&refs, name, dir.path());
        let images = case_images(case);
        let pixel_values = fe.preprocess(&images).unwrap();
        let out = checker.forward(&pixel_values).unwrap();
        let r = |k: &str| refs.get(&format!("{name}.{k}"));
        let (dp, de) = (rel_diff(&out.pooled, r("pooled")), rel_diff(&out.image_embeds, r("image_embeds")));
        check(&format!("safety {name}: pooled"), dp, MODEL);
        check(&format!("safety {name}: image_embeds"), de, MODEL);
        // Cosine distances lie in [-1, 1]: their absolute difference is relative to 1.
        let dc = max_abs(&out.special_cos_dist, r("special_cos_dist")).max(max_abs(&out.cos_dist, r("cos_dist")));
        check(&format!("safety {name}: cos_dist"), dc, MODEL);
        // Rounded scores: equal but for a float32 rounding tie flipping (one step of 0.001).
        for (got, key) in [(&out.special_scores, "special_scores"), (&out.concept_scores, "concept_scores")] {
            let want = f32s(r(key));
            let got: Vec<f32> = got.iter().flatten().copied().collect();
            assert_eq!(got.len(), want.len());
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() <= 1.01e-3, "{name} {key}: {g} vs {w}");
                scores += 1;
                scores_equal += (g == w) as usize;
            }
        }
        let want_flags: Vec<bool> = case["has_nsfw"].as_array().unwrap().iter().map(|v| v.as_bool().unwrap()).collect();
        assert_eq!(out.has_nsfw_concepts, want_flags, "{name}");
        assert_eq!(u8s(r("has_nsfw")), want_flags.iter().map(|&f| f as u8).collect::<Vec<_>>());

        // The full check: flagged images black, the others untouched.
        let (flags, checked) = checker.check(&fe, &images).unwrap();
        assert_eq!(flags, want_flags, "{name}");
        assert_eq!(checked.size(), images.size());
        for (i, &f) in flags.iter().enumerate() {
            let (c, o) = (checked.get(i as i64), images.get(i as i64));
            if f {
                assert_eq!(c.abs().max().double_value(&[]), 0.0, "{name}: image {i} not black");
                assert!(o.abs().max().double_value(&[]) > 0.0, "{name}: input {i} was changed");
                flagged += 1;
            } else {
                assert!(c.equal(&o), "{name}: image {i} changed");
            }
        }
        report.push(format!("{name}: pooled {dp:.1e}, embeds {de:.1e}, cos {dc:.1e}, flags {flags:?}"));
    }
    assert!(flagged >= 4, "{flagged}");
    eprintln!("safety checker vs diffusers ({scores_equal} of {scores} rounded scores equal):\n  {}", report.join("\n  "));
}

#[test]
fn safety_special_care_adjustment_and_rounding() {
    // The `flagged` case was built so that image 1 is flagged only through the 0.01 adjustment
    // after its special-care hit, and image 3's +0.0003 rounds to 0.0 (not flagged).
    crate::util::set_threads();
    let refs = Refs::open();
    let case = refs.cases().iter().find(|c| c["name"] == "flagged").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let checker = checker_for(&refs, "flagged", dir.path());
    let out = checker.forward(&tiny_processor().preprocess(&case_images(case)).unwrap()).unwrap();
    assert_eq!(out.has_nsfw_concepts, [true, true, false, false]);
    assert!(out.special_scores[1][1] > 0.0);
    assert_eq!((out.special_scores[1][2], out.concept_scores[1][9]), (0.006, 0.005));
    assert_eq!(out.concept_scores[3][12], 0.0);
    assert!(out.special_scores[0].iter().chain(&out.special_scores[3]).all(|&s| s <= 0.0));
}

#[test]
fn safety_sd15_processor_config_at_full_size() {
    let refs = Refs::open();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("preprocessor_config.json"), serde_json::to_string(&refs.meta["sd15_preprocessor"]).unwrap()).unwrap();
    let fe = ImageProcessor::from_folder(dir.path()).unwrap();
    assert_eq!(fe.crop_size, (224, 224));
    for case in refs.meta["sd15_cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let (h, w, seed) = (case["height"].as_u64().unwrap() as usize, case["width"].as_u64().unwrap() as usize, case["seed"].as_u64().unwrap());
        let u8s_in: Vec<u8> = (0..(h * w * 3) as u64).map(|i| (hash_u64(i, seed) >> 56) as u8).collect();
        // The float image whose numpy_to_pil gives the bytes back.
        let f: Vec<f32> = u8s_in.iter().map(|&v| v as f32 / 255.0f32).collect();
        let images = Tensor::from_slice(&f).view([1, h as i64, w as i64, 3]);
        let pil = numpy_to_pil(&images).unwrap();
        assert_eq!(pil[0].data, u8s_in);
        let resized = fe.resize(&pil[0]).unwrap();
        let shape: Vec<usize> = case["resized_shape"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
        assert_eq!(vec![resized.height, resized.width, 3], shape, "{name}");
        let checksum: i64 = resized.data.iter().enumerate().map(|(i, &v)| v as i64 * ((i as i64 * 2654435761) % 4093 + 1)).sum();
        assert_eq!(checksum, case["resized_checksum"].as_i64().unwrap(), "{name}: resized checksum");
        let rows: Vec<u8> = case["resized_rows"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|r| {
                let r = r.as_u64().unwrap() as usize;
                resized.data[r * resized.width * 3..(r + 1) * resized.width * 3].to_vec()
            })
            .collect();
        assert_eq!(rows, u8s(refs.get(&format!("{name}.resized_rows"))), "{name}: rows");
        let pv = fe.preprocess(&images).unwrap();
        assert_eq!(pv.size(), [1, 3, 224, 224]);
        let pv_rows = pv.get(0).index_select(1, &Tensor::from_slice(&[0i64, 111, 223]));
        assert_eq!(max_abs(&pv_rows, refs.get(&format!("{name}.pixel_values_rows"))), 0.0, "{name}: pixel_values rows");
        let pv64 = pv.to_kind(Kind::Double);
        let (sum, sq) = (pv64.sum(Kind::Double).double_value(&[]), pv64.square().sum(Kind::Double).double_value(&[]));
        let (want_sum, want_sq) = (case["pixel_values_sum"].as_f64().unwrap(), case["pixel_values_sq_sum"].as_f64().unwrap());
        assert!((sum - want_sum).abs() <= 1e-6 * want_sq && (sq - want_sq).abs() <= 1e-9 * want_sq, "{name}: sums {sum} {sq} vs {want_sum} {want_sq}");
    }
}

#[test]
fn safety_checker_loads_legacy_nested_keys() {
    // transformers 4 / original SD 1.5 layout: `vision_model.vision_model.*` plus `position_ids`.
    crate::util::set_threads();
    let refs = Refs::open();
    let case = &refs.cases()[0];
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("legacy");
    edited_copy(&fixture("tiny-sd15/safety_checker"), &d, |ts| {
        for (t, _) in ts.iter_mut() {
            if let Some(rest) = t.name.strip_prefix("vision_model.") {
                t.name = format!("vision_model.vision_model.{rest}");
            }
        }
        let ids: Vec<u8> = (0..17i64).flat_map(|i| i.to_le_bytes()).collect();
        ts.push((TensorInfo { name: "vision_model.vision_model.embeddings.position_ids".into(), dtype: Dtype::I64, shape: vec![1, 17], data_offsets: (0, 0) }, ids));
    });
    let legacy = load_checker(&d);
    let pv = tiny_processor().preprocess(&case_images(case)).unwrap();
    let a = legacy.forward(&pv).unwrap();
    check("safety decoded: legacy keys pooled", rel_diff(&a.pooled, refs.get("decoded.pooled")), MODEL);
}

#[test]
fn safety_checker_errors_name_the_problem() {
    crate::util::set_threads();
    let src = fixture("tiny-sd15/safety_checker");
    let dir = tempfile::tempdir().unwrap();
    // A missing weight names the model and the key.
    let d = dir.path().join("missing");
    edited_copy(&src, &d, |ts| ts.retain(|(t, _)| t.name != "special_care_embeds_weights"));
    let e = SafetyChecker::load(&d, &checkpoint(&d), Device::Cpu, Kind::Float).unwrap_err().to_string();
    assert!(e.contains("StableDiffusionSafetyChecker") && e.contains("special_care_embeds_weights"), "{e}");
    // A config that does not fit the weights: a shape mismatch.
    let d = dir.path().join("shape");
    edited_copy(&src, &d, |_| {});
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(d.join("config.json")).unwrap()).unwrap();
    cfg["projection_dim"] = 8.into();
    std::fs::write(d.join("config.json"), cfg.to_string()).unwrap();
    let e = SafetyChecker::load(&d, &checkpoint(&d), Device::Cpu, Kind::Float).unwrap_err().to_string();
    assert!(e.contains("visual_projection.weight"), "{e}");
    // Bad config values name the file and key.
    cfg["vision_config"]["hidden_act"] = "nope".into();
    std::fs::write(d.join("config.json"), cfg.to_string()).unwrap();
    let e = SafetyChecker::load(&d, &checkpoint(&d), Device::Cpu, Kind::Float).unwrap_err().to_string();
    assert!(e.contains(&d.join("config.json").display().to_string()) && e.contains("hidden_act"), "{e}");

    let checker = load_checker(&src);
    let fe = tiny_processor();
    // Images of the wrong layout or kind.
    for bad in [
        Tensor::zeros([1, 3, 32, 32], (Kind::Float, Device::Cpu)),
        Tensor::zeros([32, 32, 3], (Kind::Float, Device::Cpu)),
        Tensor::zeros([1, 8, 8, 3], (Kind::Uint8, Device::Cpu)),
        Tensor::zeros([0, 8, 8, 3], (Kind::Float, Device::Cpu)),
    ] {
        let e = checker.check(&fe, &bad).unwrap_err().to_string();
        assert!(e.contains("images must be"), "{e}");
    }
    // A crop size the vision tower was not built for.
    let p = dir.path().join("fe");
    std::fs::create_dir_all(&p).unwrap();
    std::fs::write(p.join("preprocessor_config.json"), r#"{"size": 40, "crop_size": 40}"#).unwrap();
    let e = checker.check(&ImageProcessor::from_folder(&p).unwrap(), &Tensor::zeros([1, 48, 48, 3], (Kind::Float, Device::Cpu))).unwrap_err().to_string();
    assert!(e.contains("image_size") && e.contains("40"), "{e}");
    std::fs::write(p.join("preprocessor_config.json"), r#"{"size": "big"}"#).unwrap();
    let e = ImageProcessor::from_folder(&p).unwrap_err().to_string();
    assert!(e.contains(&p.join("preprocessor_config.json").display().to_string()) && e.contains("`size`"), "{e}");
    let e = ImageProcessor::from_folder(&dir.path().join("nowhere")).unwrap_err().to_string();
    assert!(e.contains("preprocessor_config.json"), "{e}");
}

#[test]
fn safety_pil_resize_filters_are_bit_exact() {
    // PIL.Image.resize with each filter ImagingResample implements, down and up, one axis only.
    let refs = Refs::open();
    let spec = &refs.meta["pil_resize"];
    let (h, w, seed) = (spec["height"].as_u64().unwrap() as usize, spec["width"].as_u64().unwrap() as usize, spec["seed"].as_u64().unwrap());
    let src = RgbImage::new(h, w, (0..(h * w * 3) as u64).map(|i| (hash_u64(i, seed) >> 56) as u8).collect()).unwrap();
    let mut compared = 0;
    for (name, n) in spec["filters"].as_object().unwrap() {
        let filter = Resample::from_pil(n.as_i64().unwrap()).unwrap();
        for size in spec["sizes"].as_array().unwrap() {
            let (oh, ow) = (size[0].as_u64().unwrap() as usize, size[1].as_u64().unwrap() as usize);
            let got = pil_resize(&src, oh, ow, filter).unwrap();
            assert_eq!((got.height, got.width), (oh, ow));
            assert_eq!(got.data, u8s(refs.get(&format!("pil_resize.{name}.{oh}x{ow}"))), "{name} {oh}x{ow}");
            compared += 1;
        }
    }
    assert_eq!(compared, 20);
    // Every filter preserves a constant image; an empty target is an error, not a panic.
    let flat = RgbImage::new(9, 13, [3u8, 128, 251].repeat(9 * 13)).unwrap();
    for f in [Resample::Bicubic, Resample::Bilinear, Resample::Lanczos, Resample::Box, Resample::Hamming] {
        assert_eq!(pil_resize(&flat, 4, 29, f).unwrap().data, [3u8, 128, 251].repeat(4 * 29), "{f:?}");
    }
    let e = pil_resize(&flat, 4, 0, Resample::Bicubic).unwrap_err().to_string();
    assert!(e.contains("> 0"), "{e}");
}

#[test]
fn safety_checker_runs_at_reduced_precision() {
    // The pipeline runs the checker at its dtype (`clip_input.to(dtype)`, thresholds read from
    // the cast parameters): same flags where the margins are wide, embeddings close.
    crate::util::set_threads();
    let refs = Refs::open();
    let fe = tiny_processor();
    let dir = tempfile::tempdir().unwrap();
    for kind in [Kind::Half, Kind::BFloat16] {
        for name in ["decoded", "all-flagged"] {
            let case = refs.cases().iter().find(|c| c["name"] == name).unwrap();
            let src = checker_dir_for(&refs, name, &dir.path().join(format!("{kind:?}")));
            let checker = SafetyChecker::load(&src, &checkpoint(&src), Device::Cpu, kind).unwrap();
            let images = case_images(case);
            let out = checker.forward(&fe.preprocess(&images).unwrap()).unwrap();
            assert_eq!(out.image_embeds.kind(), kind);
            let d = rel_diff(&out.image_embeds, refs.get(&format!("{name}.image_embeds")));
            assert!(d <= 3e-2, "{name} {kind:?}: image_embeds {d:e}");
            let want: Vec<bool> = case["has_nsfw"].as_array().unwrap().iter().map(|v| v.as_bool().unwrap()).collect();
            let (flags, checked) = checker.check(&fe, &images).unwrap();
            assert_eq!((&out.has_nsfw_concepts, &flags), (&want, &want), "{name} {kind:?}");
            assert_eq!(checked.kind(), Kind::Float);
        }
    }
}

#[test]
fn safety_checker_loads_real_sd15_shapes() {
    // SD 1.5's safety checker (ViT-L/14 tower, projection 768) from a sparse real-size folder:
    // the config and every key/shape fit.
    let dir = tempfile::tempdir().unwrap();
    let root = crate::util::sparse_pipeline("sd15", dir.path(), Dtype::F16);
    let sc = root.join("safety_checker");
    let checker = SafetyChecker::load(&sc, &checkpoint(&sc), Device::Cpu, Kind::Half).unwrap();
    let c = checker.config();
    assert_eq!((c.projection_dim, c.vision.hidden_size, c.vision.num_hidden_layers, c.vision.image_size, c.vision.patch_size), (768, 1024, 24, 224, 14));
}
