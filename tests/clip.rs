//! The CLIP tokenizer against transformers' ids (tests/fixtures/refs/tokenizer.json, from
//! tools/make_tokenizer_refs.py) and the CLIP text encoders against diffusers' recorded
//! activations (tests/fixtures/refs/<case>.safetensors, from tools/make_references.py).

use std::path::{Path, PathBuf};

use runner::checkpoint::layout::{resolve_source, Checkpoint, VariantPolicy};
use runner::checkpoint::load::{load, LoadOptions, TensorStore};
use runner::checkpoint::safetensors::{encode_header, read_header, TensorInfo};
use runner::models::clip::{ClipTextConfig, ClipTextModel};
use runner::models::tokenizer::ClipTokenizer;
use tch::{Device, Kind, Tensor};

use crate::util::root;

fn fixture(rel: &str) -> PathBuf {
    root().join("tests/fixtures").join(rel)
}

fn refs(case: &str) -> TensorStore {
    let path = crate::util::refs_path(&format!("{case}.safetensors"));
    let ck = Checkpoint::open(resolve_source(&path, None, None, VariantPolicy::Require).unwrap()).unwrap();
    load(&ck, None, LoadOptions { float_kind: None, device: Device::Cpu, populate: false }).unwrap()
}

fn ids_of(t: &Tensor) -> Vec<i64> {
    Vec::<i64>::try_from(t.flatten(0, -1)).unwrap()
}

use crate::util::rel as rel_diff;

// ---- tokenizer ----

#[test]
fn tokenizer_matches_transformers_on_every_reference() {
    let refs: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixture("refs/tokenizer.json")).unwrap()).unwrap();
    let cases = refs["cases"].as_array().unwrap();
    assert!(cases.len() >= 60, "{} cases", cases.len());
    let mut failures = vec![];
    let mut compared = 0;
    for name in refs["tokenizers"].as_array().unwrap() {
        let name = name.as_str().unwrap();
        let tok = ClipTokenizer::from_folder(&fixture(name)).unwrap();
        for case in cases {
            let text = case["text"].as_str().unwrap();
            let want_ids: Vec<i64> = case[name]["ids"].as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect();
            let want_trunc = case[name]["truncated"].as_str().map(str::to_string);
            let got = tok.encode(text);
            compared += 1;
            if got.ids != want_ids || got.truncated != want_trunc {
                failures.push(format!("{name} {text:?}:\n  got  {:?} {:?}\n  want {:?} {:?}", got.ids, got.truncated, want_ids, want_trunc));
            }
        }
    }
    assert!(failures.is_empty(), "{} of {compared} differ:\n{}", failures.len(), failures.join("\n"));
    eprintln!("tokenizer: {compared} of {compared} encodings equal transformers'");
}

#[test]
fn tokenizer_special_tokens_follow_the_config() {
    let sd = ClipTokenizer::from_folder(&fixture("tiny-sd15/tokenizer")).unwrap();
    assert_eq!((sd.max_length(), sd.bos_id(), sd.eos_id(), sd.pad_id()), (77, 49406, 49407, 49407));
    let xl2 = ClipTokenizer::from_folder(&fixture("tiny-sdxl/tokenizer_2")).unwrap();
    assert_eq!((xl2.max_length(), xl2.bos_id(), xl2.eos_id(), xl2.pad_id()), (77, 49406, 49407, 0));
    let e = xl2.encode("a photo of a cat");
    assert_eq!(&e.ids[..8], &[49406, 320, 1125, 539, 320, 2368, 49407, 0]);
    assert_eq!((e.ids.len(), e.truncated), (77, None));
    // Repeated words come from the cache, unchanged.
    assert_eq!(xl2.encode("a photo of a cat").ids, e.ids);
}

#[test]
fn tokenizer_reports_the_dropped_text() {
    let tok = ClipTokenizer::from_folder(&fixture("tiny-sd15/tokenizer")).unwrap();
    let e = tok.encode(&format!("{}the end", "a ".repeat(75)));
    assert_eq!(e.ids.len(), 77);
    assert_eq!(e.truncated.as_deref(), Some("the end"));
    assert_eq!(tok.encode(&"a ".repeat(75)).truncated, None);
}

#[test]
fn tokenizer_reads_tokenizer_json() {
    // The same vocabulary as tokenizer.json (merges as `[left, right]` pairs, tokenizers >= 0.20).
    let src = fixture("tiny-sdxl/tokenizer_2");
    let dir = tempfile::tempdir().unwrap();
    let vocab: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(src.join("vocab.json")).unwrap()).unwrap();
    let merges: Vec<serde_json::Value> = std::fs::read_to_string(src.join("merges.txt"))
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| {
            let (a, b) = l.split_once(' ').unwrap();
            serde_json::json!([a, b])
        })
        .collect();
    let tj = serde_json::json!({
        "added_tokens": [{"id": 49406, "content": "<|startoftext|>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}],
        "model": {"type": "BPE", "end_of_word_suffix": "</w>", "vocab": vocab, "merges": merges},
    });
    std::fs::write(dir.path().join("tokenizer.json"), tj.to_string()).unwrap();
    std::fs::copy(src.join("tokenizer_config.json"), dir.path().join("tokenizer_config.json")).unwrap();
    let from_json = ClipTokenizer::from_folder(dir.path()).unwrap();
    let from_files = ClipTokenizer::from_folder(&src).unwrap();
    for text in ["a photo of a cat!!", "Caf\u{e9} <|startoftext|> it's 2024 \u{1f431}", &"long prompt ".repeat(40)] {
        assert_eq!(from_json.encode(text), from_files.encode(text), "{text:?}");
    }
}

#[test]
fn tokenizer_folder_without_vocab_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(fixture("tiny-sd15/tokenizer/tokenizer_config.json"), dir.path().join("tokenizer_config.json")).unwrap();
    let e = ClipTokenizer::from_folder(dir.path()).unwrap_err().to_string();
    assert!(e.contains(&dir.path().display().to_string()) && e.contains("vocab.json") && e.contains("merges.txt"), "{e}");

    // A merge whose parts are not in the vocabulary names merges.txt and the line.
    std::fs::write(dir.path().join("vocab.json"), r#"{"a</w>": 0, "b</w>": 1}"#).unwrap();
    std::fs::write(dir.path().join("merges.txt"), "#version: 0.2\na b</w>\n").unwrap();
    let e = ClipTokenizer::from_folder(dir.path()).unwrap_err().to_string();
    assert!(e.contains("merges.txt") && e.contains("merge 2") && e.contains("`a`"), "{e}");

    // Issue 24 item 19: an empty merges.txt (or one with the version line only) was taken, and
    // prompts tokenized character by character.
    std::fs::copy(fixture("tiny-sd15/tokenizer/vocab.json"), dir.path().join("vocab.json")).unwrap();
    for empty in ["", "#version: 0.2\n"] {
        std::fs::write(dir.path().join("merges.txt"), empty).unwrap();
        let e = ClipTokenizer::from_folder(dir.path()).unwrap_err().to_string();
        assert!(e.contains("merges.txt") && e.contains("holds no merges"), "{e}");
    }

    std::fs::write(dir.path().join("vocab.json"), "[1, 2").unwrap();
    let e = ClipTokenizer::from_folder(dir.path()).unwrap_err().to_string();
    assert!(e.contains("vocab.json") && e.contains("invalid JSON"), "{e}");

    let e = ClipTokenizer::from_folder(&dir.path().join("nope")).unwrap_err().to_string();
    assert!(e.contains("nope") && e.contains("not a folder"), "{e}");
}

// ---- text encoders ----

fn text_encoder(rel: &str) -> ClipTextModel {
    ClipTextModel::from_folder(&fixture(rel), None, Device::Cpu, Kind::Float).unwrap()
}

/// Checks every recorded tensor of `prefix` and returns the largest relative difference.
fn compare(store: &TensorStore, prefix: &str, model: &ClipTextModel, ids: &Tensor, report: &mut Vec<String>) -> f64 {
    let out = model.forward(ids).unwrap();
    let mut checks: Vec<(String, Tensor)> = out.hidden_states.iter().enumerate().map(|(i, h)| (format!("{prefix}.hidden_states.{i}"), h.get(0))).collect();
    checks.push((format!("{prefix}.last_hidden_state"), out.last_hidden_state.get(0)));
    checks.push((format!("{prefix}.pooler_output"), out.pooled.get(0)));
    if let Some(t) = &out.text_embeds {
        checks.push((format!("{prefix}.text_embeds"), t.get(0)));
    }
    let mut worst = 0f64;
    let mut seen = 0;
    for (name, got) in checks {
        let Some(want) = store.get(&name) else { continue };
        seen += 1;
        let d = rel_diff(&got, want);
        runner::parity::check(&name, d, runner::parity::MODEL);
        report.push(format!("{name}: {d:.2e}"));
        worst = worst.max(d);
    }
    assert!(seen >= model.config().num_hidden_layers as usize + 2, "{prefix}: only {seen} reference tensors");
    worst
}

#[test]
fn sd15_text_encoder_matches_diffusers() {
    crate::util::set_threads();
    let store = refs("sd15-pndm");
    let tok = ClipTokenizer::from_folder(&fixture("tiny-sd15/tokenizer")).unwrap();
    let ids = store.get("tokens.prompt.input_ids").unwrap();
    assert_eq!(tok.encode("a photo of a cat").ids, ids_of(ids));
    assert_eq!(tok.encode("blurry").ids, ids_of(store.get("tokens.negative.input_ids").unwrap()));
    let te = text_encoder("tiny-sd15/text_encoder");
    assert!(!te.config().with_projection);
    let mut report = vec![];
    let worst = compare(&store, "text_encoder", &te, ids, &mut report);
    eprintln!("sd15 text_encoder max relative difference {worst:.2e}\n  {}", report.join("\n  "));
    // A [T] input is a batch of one; a batch of two gives each row its own result.
    let single = te.forward(ids).unwrap();
    let neg = store.get("tokens.negative.input_ids").unwrap();
    let batch = te.forward(&Tensor::stack(&[ids, neg], 0)).unwrap();
    assert_eq!(batch.last_hidden_state.size(), [2, 77, 8]);
    assert!(rel_diff(&batch.last_hidden_state.get(0), &single.last_hidden_state.get(0)) < 1e-6);
    // The last hidden state is the last layer's output through final_layer_norm (clip_skip).
    let again = te.apply_final_layer_norm(single.hidden_states.last().unwrap()).unwrap();
    assert_eq!(rel_diff(&again, &single.last_hidden_state), 0.0);
    assert!(te.apply_final_layer_norm(&Tensor::zeros([1, 77, 5], (Kind::Float, Device::Cpu))).is_err());
}

#[test]
fn sdxl_text_encoders_match_diffusers() {
    crate::util::set_threads();
    let store = refs("sdxl-euler");
    let prompt = "a cute dog running on the grass";
    let tok = ClipTokenizer::from_folder(&fixture("tiny-sdxl/tokenizer")).unwrap();
    let tok2 = ClipTokenizer::from_folder(&fixture("tiny-sdxl/tokenizer_2")).unwrap();
    let ids = store.get("tokens.prompt.input_ids").unwrap();
    let ids2 = store.get("tokens.prompt.input_ids_2").unwrap();
    assert_eq!(tok.encode(prompt).ids, ids_of(ids));
    assert_eq!(tok2.encode(prompt).ids, ids_of(ids2));
    assert_eq!(tok.encode("blurry").ids, ids_of(store.get("tokens.negative.input_ids").unwrap()));
    assert_eq!(tok2.encode("blurry").ids, ids_of(store.get("tokens.negative.input_ids_2").unwrap()));

    let mut report = vec![];
    let te = text_encoder("tiny-sdxl/text_encoder");
    let w1 = compare(&store, "text_encoder", &te, ids, &mut report);
    let te2 = text_encoder("tiny-sdxl/text_encoder_2");
    assert!(te2.config().with_projection);
    let w2 = compare(&store, "text_encoder_2", &te2, ids2, &mut report);
    assert!(store.get("text_encoder_2.text_embeds").is_some());
    eprintln!("sdxl max relative difference: text_encoder {w1:.2e}, text_encoder_2 {w2:.2e}\n  {}", report.join("\n  "));
}

#[test]
fn text_encoder_rejects_bad_input_ids() {
    crate::util::set_threads();
    let te = text_encoder("tiny-sd15/text_encoder");
    let too_long = Tensor::zeros([1, 78], (Kind::Int64, Device::Cpu));
    let e = te.forward(&too_long).unwrap_err().to_string();
    assert!(e.contains("CLIPTextModel") && e.contains("78") && e.contains("max_position_embeddings"), "{e}");
    let e = te.forward(&Tensor::from_slice(&[49406i64, 49408])).unwrap_err().to_string();
    assert!(e.contains("0..49408"), "{e}");
    let e = te.forward(&Tensor::zeros([1, 2, 3], (Kind::Int64, Device::Cpu))).unwrap_err().to_string();
    assert!(e.contains("dimensions"), "{e}");
    let e = te.forward(&Tensor::zeros([1, 4], (Kind::Float, Device::Cpu))).unwrap_err().to_string();
    assert!(e.contains("integers"), "{e}");
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

#[test]
fn text_encoder_checkpoint_mismatches_are_listed() {
    crate::util::set_threads();
    let src = fixture("tiny-sd15/text_encoder");
    let dir = tempfile::tempdir().unwrap();
    let load_err = |d: &Path| ClipTextModel::from_folder(d, None, Device::Cpu, Kind::Float).unwrap_err().to_string();

    // Renamed: the model's key missing, the checkpoint's unexpected.
    let d = dir.path().join("renamed");
    edited_copy(&src, &d, |ts| {
        let t = ts.iter_mut().find(|(t, _)| t.name == "final_layer_norm.weight").unwrap();
        t.0.name = "final_layer_norm.gamma".into();
    });
    let e = load_err(&d);
    assert!(e.contains("CLIPTextModel") && e.contains(&d.join("model.safetensors").display().to_string()), "{e}");
    assert!(e.contains("missing key(s) in state_dict (1): \"final_layer_norm.weight\""), "{e}");
    assert!(e.contains("unexpected key(s) in state_dict (1): \"final_layer_norm.gamma\""), "{e}");

    // Extra: unexpected, except the optional `position_ids` buffer transformers 4 saved.
    let d = dir.path().join("extra");
    edited_copy(&src, &d, |ts| {
        let (mut t, b) = ts.iter().find(|(t, _)| t.name == "final_layer_norm.bias").unwrap().clone();
        t.name = "encoder.layers.3.layer_norm1.bias".into();
        ts.push((t, b));
    });
    let e = load_err(&d);
    assert!(e.contains("unexpected key(s) in state_dict (1): \"encoder.layers.3.layer_norm1.bias\"") && !e.contains("missing"), "{e}");

    // Mis-shaped: the size mismatch names both shapes.
    let d = dir.path().join("shape");
    edited_copy(&src, &d, |ts| {
        let t = ts.iter_mut().find(|(t, _)| t.name == "encoder.layers.1.mlp.fc1.bias").unwrap();
        t.0.shape = vec![8];
        t.1.truncate(8 * 4);
    });
    let e = load_err(&d);
    assert!(e.contains("size mismatch for encoder.layers.1.mlp.fc1.bias: copying a param with shape [8] from checkpoint, the shape in current model is [16]"), "{e}");
}

#[test]
fn text_encoder_loads_both_key_layouts() {
    crate::util::set_threads();
    // transformers 4 (and SD's original files) saved `text_model.`-prefixed keys and the
    // `position_ids` buffer; both load into the same model.
    let src = fixture("tiny-sd15/text_encoder");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("legacy");
    edited_copy(&src, &d, |ts| {
        for (t, _) in ts.iter_mut() {
            t.name = format!("text_model.{}", t.name);
        }
        let pos: Vec<u8> = (0..77i64).flat_map(i64::to_le_bytes).collect();
        let info = TensorInfo { name: "text_model.embeddings.position_ids".into(), dtype: runner::checkpoint::safetensors::Dtype::I64, shape: vec![1, 77], data_offsets: (0, 0) };
        ts.push((info, pos));
    });
    let ids = Tensor::from_slice(&[49406i64, 320, 1125, 49407]);
    let a = text_encoder("tiny-sd15/text_encoder").forward(&ids).unwrap();
    let b = ClipTextModel::from_folder(&d, None, Device::Cpu, Kind::Float).unwrap().forward(&ids).unwrap();
    assert_eq!(rel_diff(&a.pooled, &b.pooled), 0.0);

    // The config decides the model; its errors name the file.
    std::fs::write(d.join("config.json"), r#"{"hidden_act": "nope"}"#).unwrap();
    let e = ClipTextConfig::from_file(&d.join("config.json")).unwrap_err().to_string();
    assert!(e.contains(&d.join("config.json").display().to_string()) && e.contains("nope"), "{e}");
}
