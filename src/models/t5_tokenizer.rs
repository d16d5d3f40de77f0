//! The T5 tokenizer (transformers `T5TokenizerFast`) from a folder's `tokenizer.json`, through
//! huggingface's `tokenizers` crate (the library transformers itself runs): SentencePiece unigram
//! with its precompiled normalizer and metaspace pre-tokenizer, `</s>` appended. Called as
//! diffusers' SD3 and FLUX pipelines call it: `padding="max_length"`, `truncation=True`,
//! `max_length=max_sequence_length`, `add_special_tokens=True`.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum T5TokenizerError {
    #[error("`{}`: {msg}", dir.display())]
    Folder { dir: PathBuf, msg: String },
    #[error("`{}`: {msg}", path.display())]
    Format { path: PathBuf, msg: String },
    #[error("T5 tokenizer: {0}")]
    Encode(String),
}

/// One text's ids, padded to the requested length, and what truncation removed.
#[derive(Debug, Clone, PartialEq)]
pub struct T5Encoding {
    pub ids: Vec<i64>,
    /// The text of the tokens dropped by truncation (diffusers warns with it).
    pub truncated: Option<String>,
}

pub struct T5Tokenizer {
    inner: tokenizers::Tokenizer,
    pad_id: u32,
    path: PathBuf,
}

impl T5Tokenizer {
    /// `dir/tokenizer.json` (a folder with only `spiece.model` is refused with what to do).
    pub fn from_folder(dir: &Path) -> Result<T5Tokenizer, T5TokenizerError> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            let msg = if dir.join("spiece.model").is_file() {
                "has `spiece.model` but no `tokenizer.json`: runner reads the fast tokenizer's `tokenizer.json` (write it with transformers: `T5TokenizerFast.from_pretrained(dir).save_pretrained(dir)`)".to_string()
            } else if dir.is_dir() {
                "has neither `tokenizer.json` nor `spiece.model`: it is not a T5 tokenizer folder".to_string()
            } else {
                "is not a folder (the pipeline's T5 tokenizer)".to_string()
            };
            return Err(T5TokenizerError::Folder { dir: dir.to_path_buf(), msg });
        }
        let inner = tokenizers::Tokenizer::from_file(&path).map_err(|e| T5TokenizerError::Format { path: path.clone(), msg: e.to_string() })?;
        let pad_id = inner.token_to_id("<pad>").ok_or_else(|| T5TokenizerError::Format { path: path.clone(), msg: "has no `<pad>` token".into() })?;
        Ok(T5Tokenizer { inner, pad_id, path })
    }

    /// The ids of `text`, special tokens added, truncated to `max_length` (the `</s>` kept) and
    /// padded with `<pad>` to it.
    pub fn encode(&self, text: &str, max_length: usize) -> Result<T5Encoding, T5TokenizerError> {
        let err = |e: tokenizers::Error| T5TokenizerError::Encode(format!("`{}`: {e}", self.path.display()));
        let full = self.inner.encode(text, true).map_err(err)?;
        let full: Vec<u32> = full.get_ids().to_vec();
        let mut tk = self.inner.clone();
        tk.with_truncation(Some(tokenizers::TruncationParams { max_length, ..Default::default() })).map_err(err)?;
        tk.with_padding(Some(tokenizers::PaddingParams { strategy: tokenizers::PaddingStrategy::Fixed(max_length), pad_id: self.pad_id, pad_token: "<pad>".into(), ..Default::default() }));
        let ids: Vec<i64> = tk.encode(text, true).map_err(err)?.get_ids().iter().map(|&i| i as i64).collect();
        // diffusers: the untruncated ids from max_length - 1 up to the final `</s>`, decoded.
        let truncated = if full.len() > max_length { Some(self.inner.decode(&full[max_length - 1..full.len() - 1], true).map_err(err)?) } else { None };
        Ok(T5Encoding { ids, truncated })
    }
}
