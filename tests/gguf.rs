//! GGUF files: runner's reader against what the Python `gguf` package (0.19.0, diffusers' reader)
//! wrote and read back (tests/fixtures/gguf, tools/make_gguf_fixtures.py), and `runner inspect`.

use runner::checkpoint::gguf::{self, GgmlType, Value};
use serde_json::Value as J;

use crate::util::{root, run, runner};

fn fixture() -> (gguf::GgufFile, J) {
    let f = gguf::read(&root().join("tests/fixtures/gguf/types.gguf")).unwrap();
    let want: J = serde_json::from_str(&std::fs::read_to_string(root().join("tests/fixtures/gguf/types.json")).unwrap()).unwrap();
    (f, want)
}

#[test]
fn reads_what_gguf_py_wrote() {
    let (f, want) = fixture();
    assert_eq!(f.alignment, want["alignment"].as_u64().unwrap());
    assert_eq!(f.data_start, want["data_offset"].as_u64().unwrap());
    let tensors = want["tensors"].as_array().unwrap();
    assert_eq!(f.tensors.len(), tensors.len());
    for (got, w) in f.tensors.iter().zip(tensors) {
        assert_eq!(got.name, w["name"].as_str().unwrap());
        assert_eq!(got.ggml_type.name(), w["type"].as_str().unwrap(), "{}", got.name);
        assert_eq!(got.shape, w["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap()).collect::<Vec<_>>(), "{}", got.name);
        assert_eq!((got.start, got.n_bytes), (w["data_offset"].as_u64().unwrap(), w["n_bytes"].as_u64().unwrap()), "{}", got.name);
        assert!(got.ggml_type.supported(), "{}", got.name);
    }
    // Every type diffusers dequantizes is in the fixture.
    let mut types: Vec<&str> = f.tensors.iter().map(|t| t.ggml_type.name()).collect();
    types.sort();
    types.dedup();
    let mut supported = GgmlType::supported_names();
    supported.sort();
    assert_eq!(types, supported);
    // Metadata, decoded as gguf-py decodes it (arrays longer than runner keeps: their length).
    let meta = want["metadata"].as_object().unwrap();
    assert_eq!(f.metadata.len(), meta.len());
    for (k, v) in meta {
        let got = &f.metadata[k];
        match (got, v) {
            (Value::Array { len, values: None, .. }, J::Array(a)) => assert_eq!(*len as usize, a.len(), "{k}"),
            _ => assert_eq!(serde_json::to_value(got).unwrap(), *v, "{k}"),
        }
    }
    assert_eq!(f.architecture(), Some("flux"));
}

#[test]
fn inspect_shows_types_and_bytes() {
    let (code, stdout, stderr) = run(runner().args(["inspect", "tests/fixtures/gguf/types.gguf"]));
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("GGUF v3, alignment 32") && stdout.contains("17 tensors") && stdout.contains("architecture: flux (general.architecture;"), "{stdout}");
    for t in ["Q4_K", "IQ4_XS", "BF16", "Q8_0"] {
        assert!(stdout.lines().any(|l| l.starts_with(t)), "{t}: {stdout}");
    }
    let (code, stdout, _) = run(runner().args(["inspect", "--json", "tests/fixtures/gguf/types.gguf"]));
    assert_eq!(code, 0);
    let v: J = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["format"], "gguf");
    assert_eq!(v["tensors"], 17);
    let q8 = v["types"].as_array().unwrap().iter().find(|t| t["type"] == "Q8_0").unwrap();
    assert_eq!((q8["tensors"].as_u64(), q8["bytes"].as_u64(), q8["parameters"].as_u64()), (Some(1), Some(816), Some(768)));
    assert_eq!(v["unsupported"], J::Array(vec![]));
    assert_eq!(v["metadata"]["general.architecture"], "flux");
}

#[test]
fn bad_gguf_files_are_named_errors() {
    let dir = tempfile::tempdir().unwrap();
    let good = std::fs::read(root().join("tests/fixtures/gguf/types.gguf")).unwrap();
    for (name, bytes, want) in [
        ("truncated.gguf", good[..good.len() - 100].to_vec(), "tensor `conv`: data (offset"),
        ("header.gguf", good[..20].to_vec(), "truncated"),
        ("magic.gguf", [b"GGML".as_slice(), &good[4..]].concat(), "not a GGUF file"),
        ("empty.gguf", vec![], "truncated"),
    ] {
        let p = dir.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        let (code, stdout, stderr) = run(runner().arg("inspect").arg(&p));
        assert_eq!(code, 1, "{name}: {stdout}{stderr}");
        assert!(stderr.starts_with("error: ") && stderr.contains(name) && stderr.contains(want), "{name}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    let (code, _, stderr) = run(runner().args(["inspect", "--variant", "fp16", "tests/fixtures/gguf/types.gguf"]));
    assert_eq!(code, 1);
    assert!(stderr.contains("--variant") && stderr.contains(".gguf"), "{stderr}");
}

/// runner's dequantization equals `gguf.quants.dequantize`'s for every type, value for value
/// (the sha256 of all values as float32), and its quantization writes the bytes
/// `gguf.quants.quantize` wrote for the same matrix (the fixture's F32 tensor).
#[test]
fn dequantize_and_quantize_equal_gguf_py() {
    use runner::checkpoint::ggml;
    use sha2::{Digest, Sha256};
    let (f, want) = fixture();
    let bytes = std::fs::read(root().join("tests/fixtures/gguf/types.gguf")).unwrap();
    let data = |t: &gguf::TensorInfo| &bytes[t.start as usize..(t.start + t.n_bytes) as usize];
    for (t, w) in f.tensors.iter().zip(want["tensors"].as_array().unwrap()) {
        let mut v = vec![];
        ggml::dequantize(t.ggml_type, data(t), &mut v).unwrap();
        assert_eq!(v.len() as u64, t.numel(), "{}", t.name);
        // (serde_json's float parsing can miss the last bit of a decimal double: compared as f32.)
        let first: Vec<f32> = w["first"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
        assert_eq!(v[..first.len()], first, "{}", t.name);
        let le: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        assert_eq!(format!("{:x}", Sha256::digest(&le)), w["sha256"].as_str().unwrap(), "{}: values differ from gguf.quants.dequantize", t.name);
    }
    let mut w = vec![];
    ggml::dequantize(GgmlType::F32, data(f.tensor("w.F32").unwrap()), &mut w).unwrap();
    for t in ggml::QUANTIZE_TYPES {
        let mut q = vec![];
        ggml::quantize(t, &w, &mut q).unwrap();
        assert!(q == data(f.tensor(&format!("w.{}", t.name())).unwrap()), "{t}: bytes differ from gguf.quants.quantize");
    }
}

/// `runner quantize` of the tiny FLUX and SD3.5 transformers: every type, city96's rules, the
/// values of each quantized tensor those of `ggml::quantize` of the source (whose bytes equal
/// gguf-py's: `dequantize_and_quantize_equal_gguf_py`), the file read back by runner's reader.
#[test]
fn quantize_writes_what_diffusers_loads() {
    use runner::checkpoint::ggml;
    use runner::checkpoint::layout::{resolve_source, Checkpoint, VariantPolicy};
    let dir = tempfile::tempdir().unwrap();
    for (fixture, family) in [("tiny-flux-dev", "flux"), ("tiny-sd35", "sd3")] {
        let src = root().join("tests/fixtures").join(fixture).join("transformer");
        let ck = Checkpoint::open(resolve_source(&src, None, None, VariantPolicy::Require).unwrap()).unwrap();
        for ty in ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "bf16", "f16"] {
            let out = dir.path().join(format!("{fixture}-{ty}.gguf"));
            let (code, stdout, stderr) = run(runner().arg("quantize").arg(&src).args(["--type", ty, "--json", "--out"]).arg(&out));
            assert_eq!(code, 0, "{fixture} {ty}: {stderr}");
            let report: J = serde_json::from_str(&stdout).unwrap();
            assert_eq!(report["family"], family);
            let f = gguf::read(&out).unwrap();
            f.check_supported().unwrap();
            assert_eq!(f.architecture(), Some(family));
            assert_eq!(f.tensors.len(), ck.tensors.len());
            let want = GgmlType::from_name(ty).unwrap();
            let bytes = std::fs::read(&out).unwrap();
            let mut quantized = 0;
            for t in &f.tensors {
                let info = &ck.tensors[&t.name].info;
                assert_eq!(t.shape, info.shape, "{}", t.name);
                let small = info.shape.len() <= 1 || info.numel() <= 1024;
                let kept = ["x_embedder.", "context_embedder.", "time_text_embed.", "norm_out.", "proj_out.", "pos_embed"].iter().any(|p| t.name.starts_with(p));
                let expected = if small {
                    GgmlType::F32
                } else if kept || info.shape.last().unwrap() % want.block_size() != 0 {
                    // The fixtures are f32: the base type is F16.
                    if want.quantized() {
                        GgmlType::F16
                    } else {
                        want
                    }
                } else {
                    want
                };
                // No BF16 convolution (diffusers could not run it).
                let expected = if expected == GgmlType::BF16 && info.shape.len() > 2 { GgmlType::F32 } else { expected };
                assert_eq!(t.ggml_type, expected, "{fixture} {ty}: {}", t.name);
                quantized += (t.ggml_type == want && want.quantized()) as usize;
                // The bytes: the source's values quantized.
                let (path, h) = &ck.files[ck.tensors[&t.name].file];
                let raw = std::fs::read(path).unwrap();
                let start = (h.data_start + info.data_offsets.0) as usize;
                let src_vals: Vec<f32> = raw[start..start + info.nbytes() as usize].chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
                let mut q = vec![];
                ggml::quantize(t.ggml_type, &src_vals, &mut q).unwrap();
                assert!(q == bytes[t.start as usize..(t.start + t.n_bytes) as usize], "{fixture} {ty}: {}", t.name);
            }
            assert!(!want.quantized() || quantized >= 10, "{fixture} {ty}: {quantized} quantized tensors");
        }
    }
    // Nothing left behind but the outputs.
    assert!(std::fs::read_dir(dir.path()).unwrap().all(|e| e.unwrap().file_name().to_string_lossy().ends_with(".gguf")));
}

#[test]
fn quantize_refuses_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.gguf");
    let q = |src: &str, extra: &[&str]| run(runner().args(["quantize", src, "--type", "q8_0", "--out"]).arg(&out).args(extra));
    // Not a transformer runner quantizes.
    let (code, _, stderr) = q("tests/fixtures/tiny-sd15/unet", &[]);
    assert_eq!(code, 1);
    assert!(stderr.contains("tiny-sd15/unet") && stderr.contains("not a FLUX.1 or SD3/SD3.5 transformer"), "{stderr}");
    assert!(!out.exists());
    let (code, _, stderr) = q("tests/fixtures/nope", &[]);
    assert_eq!(code, 1);
    assert!(stderr.contains("tests/fixtures/nope"), "{stderr}");
    // An existing output: only with --force.
    std::fs::write(&out, "keep").unwrap();
    let (code, _, stderr) = q("tests/fixtures/tiny-flux-dev/transformer", &[]);
    assert_eq!(code, 1);
    assert!(stderr.contains("x.gguf") && stderr.contains("exists: pass --force"), "{stderr}");
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "keep");
    let (code, _, stderr) = q("tests/fixtures/tiny-flux-dev/transformer", &["--force"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(gguf::read(&out).is_ok());
    // The output must be a .gguf file; the type one runner writes.
    let (code, _, stderr) = run(runner().args(["quantize", "tests/fixtures/tiny-flux-dev/transformer", "--type", "q8_0", "--out"]).arg(dir.path().join("x.safetensors")));
    assert_eq!(code, 1);
    assert!(stderr.contains("must be a .gguf file"), "{stderr}");
    let (code, _, stderr) = run(runner().args(["quantize", "tests/fixtures/tiny-flux-dev/transformer", "--type", "q4_k", "--out"]).arg(&out));
    assert_eq!(code, 2);
    assert!(stderr.contains("q4_k") && stderr.contains("q8_0"), "{stderr}");
    assert!(std::fs::read_dir(dir.path()).unwrap().all(|e| e.unwrap().file_name().to_string_lossy().ends_with(".gguf")), "no temp files left");
}

/// A `.gguf` component source that cannot work is an error at `validate` (exit 1) naming the
/// file and what is wrong, before any weight is read: not a transformer runner loads from GGUF, a
/// family other than the component's, a component class without GGUF support, shapes that do not
/// fit the pipeline's config.json, a type diffusers cannot dequantize, `storage_dtype`, a variant.
#[test]
fn bad_gguf_sources_are_named_errors() {
    use runner::checkpoint::gguf::{encode_header, GgmlType, WriteTensor, WriteValue};
    let dir = tempfile::tempdir().unwrap();
    let flux = crate::gguf_run::write(dir.path(), "tiny-flux-dev", "q8_0", "original");
    let sd35 = crate::gguf_run::write(dir.path(), "tiny-sd35", "q4_0", "diffusers");
    // A FLUX-named file with a tensor of a type diffusers does not dequantize (Q8_1).
    let q81 = dir.path().join("q8_1.gguf");
    let t = GgmlType::from_name("Q8_1").unwrap();
    let shape = [4u64, 32];
    let n_bytes = 4 * t.type_size();
    let (mut bytes, _) =
        encode_header(&[("general.architecture", WriteValue::Str("flux".into()))], &[WriteTensor { name: "double_blocks.0.img_attn.norm.key_norm.scale", shape: &shape, ggml_type: t, n_bytes }], 32)
            .unwrap();
    bytes.extend(vec![0u8; n_bytes as usize]);
    std::fs::write(&q81, bytes).unwrap();
    let sd35_folder = format!("pipeline.source=\"{}\"", root().join("tests/fixtures/tiny-sd35").display());
    let src = |p: &std::path::Path, comp: &str| format!("components.{comp}.source=\"{}\"", p.display());
    let cases: Vec<(&str, Vec<String>, Vec<&str>)> = vec![
        ("manifests/tiny-flux-dev.toml", vec![src(&root().join("tests/fixtures/gguf/types.gguf"), "transformer")], vec!["types.gguf"]),
        ("manifests/tiny-flux-dev.toml", vec![src(&sd35, "transformer")], vec!["tiny-sd35-q4_0-diffusers.gguf", "holds a sd3 transformer", "FluxTransformer2DModel"]),
        ("manifests/tiny-sd3.toml", vec![sd35_folder.clone(), src(&flux, "transformer")], vec!["tiny-flux-dev-q8_0-original.gguf", "holds a flux transformer", "SD3Transformer2DModel"]),
        ("manifests/tiny-sd15.toml", vec![src(&flux, "unet")], vec!["`unet` is a UNet2DConditionModel", "FluxTransformer2DModel and SD3Transformer2DModel only"]),
        ("manifests/tiny-sd3.toml", vec![src(&sd35, "transformer")], vec!["tiny-sd35-q4_0-diffusers.gguf` does not fit", "tiny-sd3/transformer/config.json", "transformer_blocks.0.attn2.to_q.weight"]),
        ("manifests/tiny-flux-schnell.toml", vec![src(&flux, "transformer")], vec!["does not fit", "time_text_embed.guidance_embedder.linear_1.weight", "the config has no such tensor"]),
        ("manifests/tiny-flux-dev.toml", vec![src(&q81, "transformer")], vec!["q8_1.gguf", "double_blocks.0.img_attn.norm.key_norm.scale", "type Q8_1 is not supported", "Q4_K"]),
        (
            "manifests/tiny-sd3.toml",
            vec![sd35_folder.clone(), src(&sd35, "transformer"), "components.transformer.storage_dtype=\"fp8-e4m3\"".into()],
            vec!["components.transformer.storage_dtype", "is a GGUF file"],
        ),
        ("manifests/tiny-sd3.toml", vec![sd35_folder, src(&sd35, "transformer"), "components.transformer.variant=\"fp16\"".into()], vec!["variant `fp16`", "a .gguf file is one file"]),
    ];
    for (manifest, sets, want) in cases {
        let args: Vec<String> = sets.iter().flat_map(|s| ["--set".to_string(), s.clone()]).collect();
        for cmd in ["validate", "plan"] {
            let (code, stdout, stderr) = run(runner().arg(cmd).arg(manifest).args(&args));
            assert_eq!(code, 1, "{manifest} {sets:?}: {stdout}{stderr}");
            assert!(want.iter().all(|w| stderr.contains(w)), "{manifest} {sets:?}: want {want:?} in: {stderr}");
            assert!(!stderr.contains("panicked"), "{stderr}");
        }
    }
}

/// `--keys original` writes the original layout (q, k, v joined, the final modulation's halves
/// swapped), which diffusers' converter (runner's `convert::to_diffusers`) takes back to exactly
/// the source's tensors: same names, shapes, and each tensor's rows the source's quantized bytes.
#[test]
fn quantize_to_original_names_round_trips() {
    use runner::checkpoint::convert;
    use runner::checkpoint::ggml;
    use runner::checkpoint::gguf::{Family, KeyStyle};
    use runner::checkpoint::layout::{resolve_source, Checkpoint, VariantPolicy};
    let dir = tempfile::tempdir().unwrap();
    for (fixture, family, marker) in [("tiny-flux-dev", Family::Flux, "double_blocks.0.img_attn.qkv.weight"), ("tiny-sd35", Family::Sd3, "joint_blocks.0.x_block.attn.qkv.weight")] {
        let src = root().join("tests/fixtures").join(fixture).join("transformer");
        let ck = Checkpoint::open(resolve_source(&src, None, None, VariantPolicy::Require).unwrap()).unwrap();
        for ty in ["q8_0", "q4_1", "f16"] {
            let out = dir.path().join(format!("{fixture}-{ty}.gguf"));
            let (code, stdout, stderr) = run(runner().arg("quantize").arg(&src).args(["--type", ty, "--keys", "original", "--json", "--out"]).arg(&out));
            assert_eq!(code, 0, "{fixture} {ty}: {stderr}");
            assert_eq!(serde_json::from_str::<J>(&stdout).unwrap()["key_style"], "original");
            let f = gguf::read(&out).unwrap();
            assert!(f.tensor(marker).is_some(), "{fixture}: original names");
            let names: Vec<&str> = f.tensors.iter().map(|t| t.name.as_str()).collect();
            assert_eq!(gguf::detect(&names), Some((family, KeyStyle::Original)));
            let shapes = f.tensors.iter().map(|t| (t.name.clone(), t.shape.clone())).collect();
            let back = convert::to_diffusers(family, &shapes).unwrap();
            if ty == "q8_0" {
                let (code, stdout, _) = run(runner().args(["inspect", "--json"]).arg(&out));
                assert_eq!(code, 0);
                let v: J = serde_json::from_str(&stdout).unwrap();
                assert_eq!((v["key_style"].as_str(), v["diffusers_tensors"].as_u64()), (Some("original"), Some(ck.tensors.len() as u64)), "{v}");
                let (_, table, _) = run(runner().arg("inspect").arg(&out));
                assert!(table.contains(&format!("diffusers names: {} tensors after diffusers' conversion", ck.tensors.len())), "{table}");
                assert!(v["conversion_error"].is_null());
            }
            assert_eq!(back.keys().collect::<Vec<_>>(), ck.tensors.keys().collect::<Vec<_>>(), "{fixture}: the same tensors");
            let bytes = std::fs::read(&out).unwrap();
            for (name, piece) in &back {
                let t = f.tensor(&piece.source).unwrap();
                let row_bytes = t.n_bytes / t.shape[0];
                let (first, count) = piece.rows.unwrap_or((0, t.shape[0]));
                let mut got = bytes[(t.start + first * row_bytes) as usize..(t.start + (first + count) * row_bytes) as usize].to_vec();
                if piece.swap_halves {
                    let half = got.len() / 2;
                    got.rotate_left(half);
                }
                let info = &ck.tensors[name].info;
                let mut want_shape = info.shape.clone();
                want_shape[0] = count;
                assert_eq!(want_shape, info.shape, "{fixture}: {name}'s shape");
                let (path, h) = &ck.files[ck.tensors[name].file];
                let raw = std::fs::read(path).unwrap();
                let start = (h.data_start + info.data_offsets.0) as usize;
                let vals: Vec<f32> = raw[start..start + info.nbytes() as usize].chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
                let mut q = vec![];
                ggml::quantize(t.ggml_type, &vals, &mut q).unwrap();
                assert!(got == q, "{fixture} {ty}: {name} from {}", piece.source);
            }
        }
    }
}

/// An original-named safetensors transformer (built here from the diffusers fixture: q, k, v
/// joined, halves swapped) quantizes, with `--keys diffusers`, to the very file the diffusers
/// fixture quantizes to; with its own names kept, to original names.
#[test]
fn quantize_converts_original_names() {
    use runner::checkpoint::convert;
    use runner::checkpoint::gguf::Family;
    use runner::checkpoint::layout::{resolve_source, Checkpoint, VariantPolicy};
    use runner::checkpoint::safetensors::{encode_header, Dtype, TensorInfo};
    let dir = tempfile::tempdir().unwrap();
    for (fixture, family) in [("tiny-flux-dev", Family::Flux), ("tiny-sd35", Family::Sd3)] {
        let src = root().join("tests/fixtures").join(fixture).join("transformer");
        let ck = Checkpoint::open(resolve_source(&src, None, None, VariantPolicy::Require).unwrap()).unwrap();
        let data = |name: &str| -> Vec<u8> {
            let loc = &ck.tensors[name];
            let (path, h) = &ck.files[loc.file];
            let raw = std::fs::read(path).unwrap();
            let start = (h.data_start + loc.info.data_offsets.0) as usize;
            raw[start..start + loc.info.nbytes() as usize].to_vec()
        };
        let names: Vec<&str> = ck.tensors.keys().map(String::as_str).collect();
        let (mut infos, mut body) = (vec![], vec![]);
        for (name, parts, swap) in convert::from_diffusers(family, &names).unwrap() {
            let mut bytes: Vec<u8> = parts.iter().flat_map(|p| data(p)).collect();
            if swap {
                let half = bytes.len() / 2;
                bytes.rotate_left(half);
            }
            let mut shape = ck.tensors[&parts[0]].info.shape.clone();
            shape[0] = parts.iter().map(|p| ck.tensors[p].info.shape[0]).sum();
            let at = body.len() as u64;
            body.extend_from_slice(&bytes);
            infos.push(TensorInfo { name: format!("model.diffusion_model.{name}"), dtype: Dtype::F32, shape, data_offsets: (at, body.len() as u64) });
        }
        infos.sort_by(|a, b| a.name.cmp(&b.name));
        // Offsets must follow the sorted order: rewrite the data in it.
        let mut sorted = vec![];
        for i in infos.iter_mut() {
            let (s, e) = i.data_offsets;
            let at = sorted.len() as u64;
            sorted.extend_from_slice(&body[s as usize..e as usize]);
            i.data_offsets = (at, sorted.len() as u64);
        }
        let original = dir.path().join(format!("{fixture}-original.safetensors"));
        std::fs::write(&original, [encode_header(&infos, &Default::default()), sorted].concat()).unwrap();

        let q = |src: &std::path::Path, out: &str, extra: &[&str]| {
            let p = dir.path().join(out);
            let (code, _, stderr) = run(runner().arg("quantize").arg(src).args(["--type", "q4_0", "--out"]).arg(&p).args(extra));
            assert_eq!(code, 0, "{fixture} {out}: {stderr}");
            std::fs::read(p).unwrap()
        };
        let direct = q(&src, &format!("{fixture}-direct.gguf"), &[]);
        let converted = q(&original, &format!("{fixture}-converted.gguf"), &["--keys", "diffusers"]);
        assert!(direct == converted, "{fixture}: converting the original names gives the diffusers file");
        q(&original, &format!("{fixture}-kept.gguf"), &[]);
        let kept = gguf::read(&dir.path().join(format!("{fixture}-kept.gguf"))).unwrap();
        assert!(kept.tensors.iter().all(|t| !t.name.starts_with("model.")), "the prefix is stripped");
        let names: Vec<&str> = kept.tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(gguf::detect(&names), Some((family, runner::checkpoint::gguf::KeyStyle::Original)));
        // One tensor per original tensor (city96's size rule then applies to the joined q, k, v:
        // at these tiny widths they cross its 1024 elements where the parts do not).
        assert_eq!(kept.tensors.len(), infos.len());
    }
}

/// runner's conversion of original names agrees with diffusers' own converters: the original-named
/// f16 file runner writes from each tiny transformer, converted by runner (`convert::to_diffusers`,
/// rows as byte ranges), gives the tensors diffusers 0.42.1's
/// `convert_flux_transformer_checkpoint_to_diffusers` / `..._sd3_...` made of the same file
/// (tests/fixtures/gguf/converted-*.json, tools/make_gguf_references.py: names, shapes, and the
/// sha256 of each tensor's bytes).
#[test]
fn convert_equals_diffusers_converters() {
    use runner::checkpoint::convert;
    use runner::checkpoint::gguf::Family;
    use sha2::{Digest, Sha256};
    let dir = tempfile::tempdir().unwrap();
    for (fixture, family) in [("tiny-flux-dev", Family::Flux), ("tiny-sd35", Family::Sd3)] {
        let out = dir.path().join(format!("{fixture}.gguf"));
        let (code, _, stderr) = run(runner().arg("quantize").arg(root().join("tests/fixtures").join(fixture).join("transformer")).args(["--type", "f16", "--keys", "original", "--out"]).arg(&out));
        assert_eq!(code, 0, "{stderr}");
        let want: J = serde_json::from_str(&std::fs::read_to_string(root().join(format!("tests/fixtures/gguf/converted-{fixture}.json"))).unwrap()).unwrap();
        let f = gguf::read(&out).unwrap();
        let bytes = std::fs::read(&out).unwrap();
        let got = convert::to_diffusers(family, &f.tensors.iter().map(|t| (t.name.clone(), t.shape.clone())).collect()).unwrap();
        assert_eq!(got.keys().collect::<Vec<_>>(), want.as_object().unwrap().keys().collect::<Vec<_>>(), "{fixture}: diffusers' names");
        for (name, piece) in &got {
            let t = f.tensor(&piece.source).unwrap();
            let rows = t.shape.first().copied().unwrap_or(1);
            let row_bytes = t.n_bytes / rows;
            let (first, count) = piece.rows.unwrap_or((0, rows));
            let mut b = bytes[(t.start + first * row_bytes) as usize..(t.start + (first + count) * row_bytes) as usize].to_vec();
            if piece.swap_halves {
                let half = b.len() / 2;
                b.rotate_left(half);
            }
            let w = &want[name];
            let mut shape = t.shape.clone();
            if let Some(r) = shape.first_mut() {
                *r = count;
            }
            assert_eq!(serde_json::to_value(&shape).unwrap(), w["shape"], "{fixture}: {name}");
            assert_eq!(w["dtype"], if t.ggml_type == GgmlType::F16 { "float16" } else { "float32" }, "{fixture}: {name}");
            assert_eq!(format!("{:x}", Sha256::digest(&b)), w["sha256"].as_str().unwrap(), "{fixture}: {name} from {}", piece.source);
        }
    }
}

/// runner's diffusers-arithmetic dequantization equals diffusers 0.42.1's `dequantize_gguf_tensor`
/// bit for bit on every quantized type (tests/fixtures/gguf/dequantized.json,
/// tools/make_gguf_references.py): fp16 results where diffusers' are fp16, float32 otherwise.
#[test]
fn dequantize_as_diffusers_is_bit_exact() {
    use runner::checkpoint::ggml;
    use sha2::{Digest, Sha256};
    let (f, _) = fixture();
    let want: J = serde_json::from_str(&std::fs::read_to_string(root().join("tests/fixtures/gguf/dequantized.json")).unwrap()).unwrap();
    let bytes = std::fs::read(root().join("tests/fixtures/gguf/types.gguf")).unwrap();
    let mut seen = 0;
    for t in f.tensors.iter().filter(|t| !matches!(t.ggml_type.name(), "F32" | "F16")) {
        let w = &want[&t.name];
        let mut v = vec![];
        ggml::dequantize_as_diffusers(t.ggml_type, &bytes[t.start as usize..(t.start + t.n_bytes) as usize], &mut v).unwrap();
        assert_eq!(v.len() as u64, w["numel"].as_u64().unwrap(), "{}", t.name);
        let f16 = ggml::diffusers_dtype_is_f16(t.ggml_type);
        assert_eq!(w["dtype"], if f16 { "float16" } else { "float32" }, "{}", t.name);
        let le: Vec<u8> = if f16 { v.iter().flat_map(|x| half::f16::from_f32(*x).to_le_bytes()).collect() } else { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
        assert_eq!(format!("{:x}", Sha256::digest(&le)), w["sha256"].as_str().unwrap(), "{}: differs from diffusers' dequantize_gguf_tensor", t.name);
        seen += 1;
    }
    assert_eq!(seen, 13, "every quantized type diffusers loads");
}

/// The GGUF transformers diffusers ran for tests/fixtures/refs/gguf-transformer.safetensors
/// (tools/make_gguf_references.py) are the files `runner quantize` writes today, byte for byte:
/// the references stay tied to what runner makes (and quantize stays deterministic).
#[test]
fn quantize_writes_the_files_the_references_were_made_from() {
    use sha2::{Digest, Sha256};
    let dir = tempfile::tempdir().unwrap();
    let want: J = serde_json::from_str(&std::fs::read_to_string(root().join("tests/fixtures/refs/gguf-transformer.json")).unwrap()).unwrap();
    let files = want["files"].as_object().unwrap();
    assert_eq!(files.len(), 24);
    for (name, sha) in files {
        // <fixture>-<type>-<keys>.gguf
        let stem = name.strip_suffix(".gguf").unwrap();
        let (rest, keys) = stem.rsplit_once('-').unwrap();
        let (fixture, ty) = rest.rsplit_once('-').unwrap();
        let out = dir.path().join(name);
        let (code, _, stderr) = run(runner().arg("quantize").arg(root().join("tests/fixtures").join(fixture).join("transformer")).args(["--type", ty, "--keys", keys, "--out"]).arg(&out));
        assert_eq!(code, 0, "{name}: {stderr}");
        assert_eq!(format!("{:x}", Sha256::digest(std::fs::read(&out).unwrap())), sha.as_str().unwrap(), "{name}");
    }
}
