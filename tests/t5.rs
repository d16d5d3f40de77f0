//! The T5 tokenizer against transformers' `T5TokenizerFast` ids (tests/fixtures/refs/t5-tokenizer.json)
//! and the T5 encoder against transformers' hidden states (refs/t5-encoder.safetensors), both on
//! tests/fixtures/tiny-sd3 (tools/make_fixtures_sd3.py, tools/make_references.py).

use runner::checkpoint::layout::{resolve_folder, resolve_source, Checkpoint, Library, VariantPolicy};
use runner::checkpoint::load::{load, LoadOptions};
use runner::models::t5::{T5Config, T5EncoderModel};
use runner::models::t5_tokenizer::{T5Tokenizer, T5TokenizerError};
use tch::{Device, Kind, Tensor};

use crate::util::root;

fn tiny_sd3(rel: &str) -> std::path::PathBuf {
    root().join("tests/fixtures/tiny-sd3").join(rel)
}

#[test]
fn token_ids_equal_transformers_fast_tokenizer() {
    let tok = T5Tokenizer::from_folder(&tiny_sd3("tokenizer_3")).unwrap();
    let refs: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(crate::util::refs_path("t5-tokenizer.json")).unwrap()).unwrap();
    let cases = refs["cases"].as_array().unwrap();
    assert!(cases.len() > 100);
    for c in cases {
        let text = c["text"].as_str().unwrap();
        let max_length = c["max_length"].as_u64().unwrap() as usize;
        let want: Vec<i64> = c["ids"].as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect();
        let got = tok.encode(text, max_length).unwrap();
        assert_eq!(got.ids, want, "{text:?} at {max_length}");
        // Truncated exactly when the text (with `</s>`) is longer than the limit.
        let long = tok.encode(text, 4096).unwrap().ids;
        let full = long.len() - long.iter().rev().take_while(|&&i| i == 0).count();
        assert_eq!(got.truncated.is_some(), full > max_length, "{text:?} at {max_length}: {:?}", got.truncated);
    }
    let long = tok.encode("one two three four five six seven eight nine ten", 5).unwrap();
    assert_eq!(long.ids.len(), 5);
    assert_eq!(*long.ids.last().unwrap(), 1, "`</s>` survives truncation");
    assert!(long.truncated.as_deref().unwrap().contains("nine"), "{:?}", long.truncated);
}

#[test]
fn a_tokenizer_folder_without_tokenizer_json_says_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let e = T5Tokenizer::from_folder(dir.path()).err().unwrap().to_string();
    assert!(e.contains("has neither `tokenizer.json` nor `spiece.model`"), "{e}");
    std::fs::copy(tiny_sd3("tokenizer_3/spiece.model"), dir.path().join("spiece.model")).unwrap();
    let e = T5Tokenizer::from_folder(dir.path()).err().unwrap();
    assert!(matches!(e, T5TokenizerError::Folder { .. }));
    assert!(e.to_string().contains("has `spiece.model` but no `tokenizer.json`"), "{e}");
    std::fs::write(dir.path().join("tokenizer.json"), "{").unwrap();
    let e = T5Tokenizer::from_folder(dir.path()).err().unwrap().to_string();
    assert!(e.contains("tokenizer.json"), "{e}");
}

fn config() -> T5Config {
    let path = tiny_sd3("text_encoder_3/config.json");
    T5Config::from_json(&serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap(), &path).unwrap()
}

fn checkpoint() -> Checkpoint {
    Checkpoint::open(resolve_folder(&tiny_sd3("text_encoder_3"), Some(Library::Transformers), None, VariantPolicy::Require).unwrap()).unwrap()
}

#[test]
fn the_sharded_encoder_matches_transformers() {
    crate::util::set_threads();
    let ck = checkpoint();
    assert!(ck.files.len() >= 2, "the fixture's T5 is sharded with an index");
    let model = T5EncoderModel::load(&config(), &ck, Device::Cpu, Kind::Float).unwrap();
    let path = crate::util::refs_path("t5-encoder.safetensors");
    let refs =
        load(&Checkpoint::open(resolve_source(&path, None, None, VariantPolicy::Require).unwrap()).unwrap(), None, LoadOptions { float_kind: None, device: Device::Cpu, populate: false }).unwrap();
    let out = model.forward(refs.get("input_ids").unwrap()).unwrap();
    let want = refs.get("last_hidden_state").unwrap();
    runner::parity::check("t5-encoder: last_hidden_state", crate::util::rel(&out, want), runner::parity::MODEL);
}

#[test]
fn fp16_keeps_wo_in_fp32_like_transformers() {
    crate::util::set_threads();
    let model = T5EncoderModel::load(&config(), &checkpoint(), Device::Cpu, Kind::Half).unwrap();
    for (name, t) in model.varstore().variables() {
        let want = if name.ends_with("DenseReluDense.wo.weight") { Kind::Float } else { Kind::Half };
        assert_eq!(t.kind(), want, "{name}");
    }
    let ids = Tensor::from_slice(&[10i64, 127, 999, 42, 1, 0, 0, 0]).unsqueeze(0);
    let out = model.forward(&ids).unwrap();
    assert_eq!(out.size(), [1, 8, 24]);
    let f32 = T5EncoderModel::load(&config(), &checkpoint(), Device::Cpu, Kind::Float).unwrap().forward(&ids).unwrap();
    let diff = (out.to_kind(Kind::Float) - &f32).abs().max().double_value(&[]) / f32.abs().max().double_value(&[]);
    assert!(diff < 1e-2, "fp16 within fp16 precision of fp32: {diff}");
}

#[test]
fn unsupported_feed_forward_is_an_error_naming_the_key() {
    let path = tiny_sd3("text_encoder_3/config.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    v["feed_forward_proj"] = "gated-mystery".into();
    v.as_object_mut().unwrap().remove("dense_act_fn");
    let e = T5Config::from_json(&v, &path).unwrap_err().to_string();
    assert!(e.contains("config.json") && e.contains("`dense_act_fn` = \"mystery\""), "{e}");
    v["feed_forward_proj"] = 3.into();
    assert!(T5Config::from_json(&v, &path).unwrap_err().to_string().contains("feed_forward_proj"));
}
