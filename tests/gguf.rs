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
