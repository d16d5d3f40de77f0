//! CLIP BPE tokenizer giving transformers' `CLIPTokenizer` ids.
//!
//! transformers 5's `CLIPTokenizer` (models/clip/tokenization_clip.py) is a `tokenizers` pipeline,
//! mirrored step by step here:
//! 1. added tokens (the special tokens, `normalized=False`) are cut out of the raw text first
//!    (`AddedVocabulary::extract_and_normalize`, leftmost-longest);
//! 2. the rest is normalized: NFC, `\s+` -> `" "`, per-char lowercase;
//! 3. pre-tokenized: `Split(CLIP regex, invert=True, behavior="removed")` keeps the matches and
//!    drops the rest (whitespace), then `ByteLevel(add_prefix_space=False, use_regex=True)`
//!    splits each piece again with GPT-2's regex and maps bytes to the printable byte alphabet;
//! 4. each word goes through BPE (`tokenizers::models::bpe::Word::merge_all`) with `</w>` on its
//!    last symbol;
//! 5. `RobertaProcessing` wraps in bos/eos; `padding="max_length", truncation=True` does the rest.

use std::collections::{BinaryHeap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use regex::Regex;
use serde_json::Value;
use unicode_normalization::UnicodeNormalization;

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("cannot read `{}`: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("`{}`: {msg}", path.display())]
    Format { path: PathBuf, msg: String },
    #[error("tokenizer folder `{}`: {msg}", dir.display())]
    Folder { dir: PathBuf, msg: String },
}

fn format_err(path: &Path, msg: impl Into<String>) -> TokenizerError {
    TokenizerError::Format { path: path.to_path_buf(), msg: msg.into() }
}

/// `tokenizers::AddedToken`: matched in the text before the model sees it.
#[derive(Debug, Clone)]
struct AddedToken {
    content: String,
    id: i64,
    single_word: bool,
    lstrip: bool,
    rstrip: bool,
    /// Matched in the normalized text rather than the raw one.
    normalized: bool,
}

/// Ids of one prompt, as the pipeline feeds them to the text encoder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoding {
    /// `[bos] + tokens[..max_length - 2] + [eos]`, padded to `max_length` with the pad id.
    pub ids: Vec<i64>,
    /// The dropped tokens decoded, as diffusers' "The following part of your input was
    /// truncated..." warning shows them; `None` when nothing was dropped.
    pub truncated: Option<String>,
}

/// BPE merges: (left id, right id) -> (rank, merged id), as `tokenizers` keys them.
type Merges = HashMap<(i64, i64), (u32, i64)>;

/// `tokenizers`' BPE cache capacity (`DEFAULT_CACHE_CAPACITY`): further words are not cached.
const CACHE_CAPACITY: usize = 10_000;

const END_OF_WORD: &str = "</w>";

pub struct ClipTokenizer {
    vocab: HashMap<String, i64>,
    id_to_token: HashMap<i64, String>,
    merges: Merges,
    added: Vec<AddedToken>,
    byte_chars: [char; 256],
    char_bytes: HashMap<char, u8>,
    /// CLIP's pre-tokenizer regex (the `Split` step).
    split: Regex,
    /// GPT-2's regex (the `ByteLevel` step).
    byte_level: Regex,
    whitespace: Regex,
    word_char: Regex,
    max_length: usize,
    bos: i64,
    eos: i64,
    pad: i64,
    unk: Option<i64>,
    cache: Mutex<HashMap<String, Vec<i64>>>,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("vocab", &self.vocab.len())
            .field("merges", &self.merges.len())
            .field("max_length", &self.max_length)
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("pad", &self.pad)
            .finish()
    }
}

/// Python's `str.isspace` (what `str.strip` removes): Unicode White_Space plus the
/// information separators U+001C..U+001F.
fn py_isspace(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// GPT-2's `bytes_to_unicode`: printable bytes map to themselves, the others to U+0100 onwards.
fn bytes_to_unicode() -> [char; 256] {
    let mut out = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..=255u8 {
        let printable = (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
        out[b as usize] = if printable {
            char::from(b)
        } else {
            n += 1;
            char::from_u32(255 + n).unwrap_or('\u{FFFD}')
        };
    }
    out
}

fn read_text(path: &Path) -> Result<String, TokenizerError> {
    std::fs::read_to_string(path).map_err(|source| TokenizerError::Io { path: path.to_path_buf(), source })
}

fn read_json(path: &Path) -> Result<Value, TokenizerError> {
    serde_json::from_str(&read_text(path)?).map_err(|e| format_err(path, format!("invalid JSON: {e}")))
}

/// A special token as transformers saves it: a string or an `AddedToken` dict with `content`.
fn token_content(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

fn added_from_json(v: &Value, id: i64) -> Option<AddedToken> {
    let flag = |k: &str| v.get(k).and_then(Value::as_bool).unwrap_or(false);
    Some(AddedToken { content: token_content(v)?, id, single_word: flag("single_word"), lstrip: flag("lstrip"), rstrip: flag("rstrip"), normalized: flag("normalized") })
}

fn json_id(path: &Path, what: &str, v: &Value) -> Result<i64, TokenizerError> {
    v.as_i64().ok_or_else(|| format_err(path, format!("{what}: id `{v}` is not an integer")))
}

/// A `vocab.json` object, or `tokenizer.json`'s `model.vocab`.
fn parse_vocab(path: &Path, v: &Value) -> Result<HashMap<String, i64>, TokenizerError> {
    let obj = v.as_object().ok_or_else(|| format_err(path, "the vocabulary is not a JSON object of token -> id"))?;
    obj.iter().map(|(k, id)| Ok((k.clone(), json_id(path, &format!("token `{k}`"), id)?))).collect()
}

/// Merge pairs in rank order to the id map, as `tokenizers`' `BPE::new` checks them.
fn build_merges(path: &Path, pairs: Vec<(usize, String, String)>, vocab: &HashMap<String, i64>) -> Result<Merges, TokenizerError> {
    let mut merges = Merges::with_capacity(pairs.len());
    for (rank, (line, a, b)) in pairs.into_iter().enumerate() {
        let id = |t: &str| vocab.get(t).copied().ok_or_else(|| format_err(path, format!("merge {line} (`{a} {b}`): `{t}` is not in the vocabulary")));
        let (ia, ib, inew) = (id(&a)?, id(&b)?, id(&format!("{a}{b}"))?);
        // A repeated pair keeps its last rank (`HashMap::collect` in `tokenizers`).
        merges.insert((ia, ib), (rank as u32, inew));
    }
    Ok(merges)
}

/// A CLIP BPE without merges would tokenize every prompt character by character: a broken
/// download, refused (`tokenizers` would take it and the images would quietly be wrong).
fn non_empty(path: &Path, merges: Merges) -> Result<Merges, TokenizerError> {
    if merges.is_empty() {
        return Err(format_err(path, "holds no merges: a CLIP tokenizer without them splits prompts into single characters (a truncated download?)"));
    }
    Ok(merges)
}

/// `merges.txt`: `#version` lines skipped, then one `left right` pair a line.
fn parse_merges_txt(path: &Path, text: &str) -> Result<Vec<(usize, String, String)>, TokenizerError> {
    let mut out = vec![];
    for (i, line) in text.lines().enumerate() {
        if line.starts_with("#version") || line.is_empty() {
            continue;
        }
        let parts: Vec<&str> = line.split(' ').collect();
        if parts.len() != 2 {
            return Err(format_err(path, format!("line {}: expected `left right`, got `{line}`", i + 1)));
        }
        out.push((i + 1, parts[0].to_string(), parts[1].to_string()));
    }
    Ok(out)
}

/// `tokenizer.json`'s `model.merges`: `"left right"` strings (older) or `[left, right]` pairs.
fn parse_merges_json(path: &Path, v: &Value) -> Result<Vec<(usize, String, String)>, TokenizerError> {
    let arr = v.as_array().ok_or_else(|| format_err(path, "`model.merges` is not a list"))?;
    arr.iter()
        .enumerate()
        .map(|(i, m)| {
            let pair = match m {
                Value::String(s) => s.split_once(' ').map(|(a, b)| (a.to_string(), b.to_string())),
                Value::Array(p) if p.len() == 2 => p[0].as_str().zip(p[1].as_str()).map(|(a, b)| (a.to_string(), b.to_string())),
                _ => None,
            };
            pair.map(|(a, b)| (i, a, b)).ok_or_else(|| format_err(path, format!("`model.merges[{i}]` is not a merge pair: {m}")))
        })
        .collect()
}

/// One symbol of a word being merged (`tokenizers::models::bpe::word::Symbol`).
#[derive(Clone, Copy)]
struct Symbol {
    id: i64,
    prev: isize,
    next: isize,
    /// 0 once merged into its left neighbour.
    len: usize,
}

/// A candidate merge, popped lowest rank first and, among equal ranks, leftmost first.
#[derive(PartialEq, Eq)]
struct Merge {
    pos: usize,
    rank: u32,
    new_id: i64,
}

impl Ord for Merge {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        other.rank.cmp(&self.rank).then_with(|| other.pos.cmp(&self.pos))
    }
}

impl PartialOrd for Merge {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl ClipTokenizer {
    /// Loads a pipeline's tokenizer folder: `tokenizer.json` when present, else `vocab.json` +
    /// `merges.txt`; `tokenizer_config.json` and `special_tokens_map.json` give the special
    /// tokens and `model_max_length` (transformers' `from_pretrained`).
    pub fn from_folder(dir: &Path) -> Result<ClipTokenizer, TokenizerError> {
        if !dir.is_dir() {
            return Err(TokenizerError::Folder { dir: dir.to_path_buf(), msg: "is not a folder".into() });
        }
        let opt_json = |name: &str| -> Result<Value, TokenizerError> {
            let p = dir.join(name);
            if p.is_file() {
                read_json(&p)
            } else {
                Ok(Value::Null)
            }
        };
        let config = opt_json("tokenizer_config.json")?;
        let special_map = opt_json("special_tokens_map.json")?;

        let mut added: Vec<AddedToken> = vec![];
        let tokenizer_json = dir.join("tokenizer.json");
        let (vocab, merges) = if tokenizer_json.is_file() {
            let p = &tokenizer_json;
            let j = read_json(p)?;
            let model = j.get("model").ok_or_else(|| format_err(p, "no `model`"))?;
            if let Some(t) = model.get("type").and_then(Value::as_str).filter(|t| *t != "BPE") {
                return Err(format_err(p, format!("`model.type` is `{t}`; a CLIP tokenizer is `BPE`")));
            }
            let vocab = parse_vocab(p, model.get("vocab").unwrap_or(&Value::Null))?;
            let merges = non_empty(p, build_merges(p, parse_merges_json(p, model.get("merges").unwrap_or(&Value::Null))?, &vocab)?)?;
            for t in j.get("added_tokens").and_then(Value::as_array).into_iter().flatten() {
                let id = json_id(p, "added_tokens", t.get("id").unwrap_or(&Value::Null))?;
                added.extend(added_from_json(t, id));
            }
            (vocab, merges)
        } else {
            let (vp, mp) = (dir.join("vocab.json"), dir.join("merges.txt"));
            let missing: Vec<&str> = [("vocab.json", &vp), ("merges.txt", &mp)].iter().filter(|(_, p)| !p.is_file()).map(|(n, _)| *n).collect();
            if !missing.is_empty() {
                return Err(TokenizerError::Folder { dir: dir.to_path_buf(), msg: format!("has neither `tokenizer.json` nor `vocab.json` + `merges.txt` (missing: {})", missing.join(", ")) });
            }
            let vocab = parse_vocab(&vp, &read_json(&vp)?)?;
            let merges = non_empty(&mp, build_merges(&mp, parse_merges_txt(&mp, &read_text(&mp)?)?, &vocab)?)?;
            (vocab, merges)
        };
        if vocab.is_empty() {
            return Err(TokenizerError::Folder { dir: dir.to_path_buf(), msg: "the vocabulary is empty".into() });
        }

        // `added_tokens_decoder` (transformers >= 4.34 saves it in tokenizer_config.json).
        if let Some(dec) = config.get("added_tokens_decoder").and_then(Value::as_object) {
            let p = dir.join("tokenizer_config.json");
            for (id, t) in dec {
                let id: i64 = id.parse().map_err(|_| format_err(&p, format!("added_tokens_decoder: id `{id}` is not an integer")))?;
                if !added.iter().any(|a| a.id == id) {
                    added.extend(added_from_json(t, id));
                }
            }
        }

        // Special tokens: tokenizer_config.json, then special_tokens_map.json, then
        // `CLIPTokenizer.__init__`'s defaults.
        let special = |key: &str, default: &str| -> String { config.get(key).and_then(token_content).or_else(|| special_map.get(key).and_then(token_content)).unwrap_or_else(|| default.to_string()) };
        let (bos_s, eos_s, pad_s, unk_s) =
            (special("bos_token", "<|startoftext|>"), special("eos_token", "<|endoftext|>"), special("pad_token", "<|endoftext|>"), special("unk_token", "<|endoftext|>"));
        let mut next_id = vocab.values().chain(added.iter().map(|a| &a.id)).copied().max().unwrap_or(-1) + 1;
        let mut extra: Vec<String> = vec![bos_s.clone(), eos_s.clone(), unk_s.clone(), pad_s.clone()];
        for key in ["additional_special_tokens", "extra_special_tokens"] {
            for src in [&config, &special_map] {
                extra.extend(src.get(key).and_then(Value::as_array).into_iter().flatten().filter_map(token_content));
            }
        }
        // transformers registers every special token as an added token (`normalized=False`),
        // taking its vocabulary id, or a new one past the end when the vocabulary lacks it.
        for content in extra {
            if added.iter().any(|a| a.content == content) {
                continue;
            }
            let id = vocab.get(&content).copied().unwrap_or_else(|| {
                next_id += 1;
                next_id - 1
            });
            added.push(AddedToken { content, id, single_word: false, lstrip: false, rstrip: false, normalized: false });
        }
        let id_of = |s: &str| added.iter().find(|a| a.content == s).map(|a| a.id).or_else(|| vocab.get(s).copied());
        let (bos, eos, pad) = (id_of(&bos_s).unwrap_or(0), id_of(&eos_s).unwrap_or(0), id_of(&pad_s).unwrap_or(0));
        let unk = id_of(&unk_s);

        // diffusers pads to `tokenizer.model_max_length`; a missing or "unlimited" (1e30) value
        // falls back to CLIP's 77 positions.
        let max_length = config
            .get("model_max_length")
            .and_then(|v| v.as_u64().or_else(|| v.as_f64().filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f < 1e9).map(|f| f as u64)))
            .filter(|&n| (2..=1 << 20).contains(&n))
            .unwrap_or(77) as usize;

        let mut id_to_token: HashMap<i64, String> = vocab.iter().map(|(k, &v)| (v, k.clone())).collect();
        for a in &added {
            id_to_token.insert(a.id, a.content.clone());
        }
        let byte_chars = bytes_to_unicode();
        let char_bytes = byte_chars.iter().enumerate().map(|(b, &c)| (c, b as u8)).collect();
        let re = |s: &str| Regex::new(s).expect("constant regex");
        Ok(ClipTokenizer {
            vocab,
            id_to_token,
            merges,
            added,
            byte_chars,
            char_bytes,
            split: re(r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"),
            // GPT-2's `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`: its
            // pieces here never hold whitespace (the Split step removed it), so the look-ahead
            // alternative (unsupported by `regex`) can never match and is left out.
            byte_level: re(r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+"),
            whitespace: re(r"\s+"),
            word_char: re(r"^\w"),
            max_length,
            bos,
            eos,
            pad,
            unk,
            cache: Mutex::new(HashMap::new()),
        })
    }

    pub fn max_length(&self) -> usize {
        self.max_length
    }
    pub fn pad_id(&self) -> i64 {
        self.pad
    }
    pub fn eos_id(&self) -> i64 {
        self.eos
    }
    pub fn bos_id(&self) -> i64 {
        self.bos
    }

    /// Padded to max_length; truncated like transformers (`padding="max_length", truncation=True`).
    pub fn encode(&self, text: &str) -> Encoding {
        let tokens = self.tokenize(text);
        let room = self.max_length.saturating_sub(2);
        // diffusers `encode_prompt`: `batch_decode(untruncated_ids[:, model_max_length - 1 : -1])`,
        // i.e. the content tokens past the first `max_length - 2`.
        let truncated = (tokens.len() > room).then(|| self.decode(&tokens[room..]));
        let mut ids = Vec::with_capacity(self.max_length.max(2));
        ids.push(self.bos);
        ids.extend_from_slice(&tokens[..tokens.len().min(room)]);
        ids.push(self.eos);
        ids.resize(self.max_length.max(ids.len()), self.pad);
        Encoding { ids, truncated }
    }

    /// The ids of `text` without bos/eos, untruncated.
    pub fn tokenize(&self, text: &str) -> Vec<i64> {
        let mut ids = vec![];
        for (piece, added) in self.split_added(text, false) {
            if let Some(id) = added {
                ids.push(id);
                continue;
            }
            let normalized = self.normalize(piece);
            for (piece, added) in self.split_added(&normalized, true) {
                match added {
                    Some(id) => ids.push(id),
                    None => self.tokenize_normalized(piece, &mut ids),
                }
            }
        }
        ids
    }

    /// `tokenizers`' decode with the `ByteLevel` decoder, then `CLIPTokenizer`'s wrapper:
    /// `</w>` -> space, stripped. Special tokens are kept (diffusers' `batch_decode` default).
    pub fn decode(&self, ids: &[i64]) -> String {
        let mut bytes = vec![];
        for tok in ids.iter().filter_map(|id| self.id_to_token.get(id)) {
            // A token with a char outside the byte alphabet is taken as its UTF-8 bytes.
            match tok.chars().map(|c| self.char_bytes.get(&c).copied()).collect::<Option<Vec<u8>>>() {
                Some(b) => bytes.extend(b),
                None => bytes.extend_from_slice(tok.as_bytes()),
            }
        }
        String::from_utf8_lossy(&bytes).replace(END_OF_WORD, " ").trim_matches(py_isspace).to_string()
    }

    /// `normalizers.Sequence([NFC(), Replace(Regex(r"\s+"), " "), Lowercase()])`; the lowercase
    /// is per char (`NormalizedString::lowercase`), so a final `Σ` becomes `σ`, not `ς`.
    fn normalize(&self, text: &str) -> String {
        let nfc: String = text.nfc().collect();
        self.whitespace.replace_all(&nfc, " ").chars().flat_map(char::to_lowercase).collect()
    }

    /// Splits out the added tokens matched on raw (`normalized == false`) or normalized text:
    /// `AddedVocabulary::find_matches` (leftmost-longest, then `single_word`/`lstrip`/`rstrip`).
    fn split_added<'a>(&self, text: &'a str, normalized: bool) -> Vec<(&'a str, Option<i64>)> {
        let tokens: Vec<&AddedToken> = self.added.iter().filter(|a| a.normalized == normalized && !a.content.is_empty()).collect();
        let mut out = vec![];
        let (mut start_offset, mut i) = (0, 0);
        while i < text.len() {
            let best = tokens.iter().filter(|a| text[i..].starts_with(a.content.as_str())).max_by_key(|a| a.content.len());
            let Some(tok) = best else {
                i += text[i..].chars().next().map_or(1, char::len_utf8);
                continue;
            };
            let (mut start, mut stop) = (i, i + tok.content.len());
            i = stop;
            if tok.single_word {
                let ends_word = text[..start].chars().next_back().is_some_and(|c| self.word_char.is_match(c.encode_utf8(&mut [0; 4])));
                let starts_word = self.word_char.is_match(&text[stop..]);
                if ends_word || starts_word {
                    continue;
                }
            }
            if tok.lstrip {
                let trimmed = text[..start].trim_end_matches(char::is_whitespace).len();
                start = trimmed.max(start_offset);
            }
            if tok.rstrip {
                stop = text.len() - text[stop..].trim_start_matches(char::is_whitespace).len();
                i = stop;
            }
            if start_offset < start {
                out.push((&text[start_offset..start], None));
            }
            out.push((&text[start..stop], Some(tok.id)));
            start_offset = stop;
        }
        if start_offset < text.len() {
            out.push((&text[start_offset..], None));
        }
        out
    }

    /// Pre-tokenizes normalized text and appends the BPE ids of each word.
    fn tokenize_normalized(&self, text: &str, ids: &mut Vec<i64>) {
        for piece in self.split.find_iter(text) {
            for word in self.byte_level.find_iter(piece.as_str()) {
                let mapped: String = word.as_str().bytes().map(|b| self.byte_chars[b as usize]).collect();
                ids.extend(self.bpe_cached(&mapped));
            }
        }
    }

    fn bpe_cached(&self, word: &str) -> Vec<i64> {
        if let Some(ids) = self.cache.lock().ok().and_then(|c| c.get(word).cloned()) {
            return ids;
        }
        let ids = self.bpe(word);
        if let Ok(mut c) = self.cache.lock() {
            if c.len() < CACHE_CAPACITY {
                c.insert(word.to_string(), ids.clone());
            }
        }
        ids
    }

    /// `BPE::merge_word` + `Word::merge_all` (no dropout): chars to ids (`</w>` on the last),
    /// unknown chars to the unk token (unfused), then merges lowest rank first, leftmost first.
    fn bpe(&self, word: &str) -> Vec<i64> {
        let chars: Vec<char> = word.chars().collect();
        let mut syms: Vec<Symbol> = Vec::with_capacity(chars.len());
        let push = |syms: &mut Vec<Symbol>, id: i64, len: usize| {
            let n = syms.len() as isize;
            syms.push(Symbol { id, prev: n - 1, next: n + 1, len });
        };
        let mut pending_unk: Option<(i64, usize)> = None;
        for (i, c) in chars.iter().enumerate() {
            let mut s = c.to_string();
            if i + 1 == chars.len() {
                s.push_str(END_OF_WORD);
            }
            match self.vocab.get(&s) {
                Some(&id) => {
                    if let Some((u, l)) = pending_unk.take() {
                        push(&mut syms, u, l);
                    }
                    push(&mut syms, id, c.len_utf8());
                }
                None => {
                    if let Some((u, l)) = pending_unk.take() {
                        push(&mut syms, u, l);
                    }
                    pending_unk = self.unk.map(|u| (u, c.len_utf8()));
                }
            }
        }
        if let Some((u, l)) = pending_unk {
            push(&mut syms, u, l);
        }
        if let Some(last) = syms.last_mut() {
            last.next = -1;
        }

        let mut queue: BinaryHeap<Merge> = syms.windows(2).enumerate().filter_map(|(pos, w)| self.merges.get(&(w[0].id, w[1].id)).map(|&(rank, new_id)| Merge { pos, rank, new_id })).collect();
        while let Some(top) = queue.pop() {
            let cur = syms[top.pos];
            if cur.len == 0 || cur.next == -1 {
                continue;
            }
            let right = syms[cur.next as usize];
            // Stale entry: one side has been merged since it was queued.
            if self.merges.get(&(cur.id, right.id)).is_none_or(|&(_, id)| id != top.new_id) {
                continue;
            }
            syms[top.pos] = Symbol { id: top.new_id, prev: cur.prev, next: right.next, len: cur.len + right.len };
            syms[cur.next as usize].len = 0;
            if right.next > -1 && (right.next as usize) < syms.len() {
                syms[right.next as usize].prev = top.pos as isize;
            }
            let merged = syms[top.pos];
            if merged.prev >= 0 {
                let prev = syms[merged.prev as usize];
                if let Some(&(rank, new_id)) = self.merges.get(&(prev.id, merged.id)) {
                    queue.push(Merge { pos: merged.prev as usize, rank, new_id });
                }
            }
            if merged.next >= 0 && (merged.next as usize) < syms.len() {
                let next = syms[merged.next as usize];
                if let Some(&(rank, new_id)) = self.merges.get(&(merged.id, next.id)) {
                    queue.push(Merge { pos: top.pos, rank, new_id });
                }
            }
        }
        syms.iter().filter(|s| s.len > 0).map(|s| s.id).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_alphabet_is_a_bijection() {
        let b = bytes_to_unicode();
        let set: std::collections::HashSet<char> = b.iter().copied().collect();
        assert_eq!(set.len(), 256);
        assert_eq!(b[b'a' as usize], 'a');
        assert_eq!(b[b' ' as usize], '\u{120}');
    }

    #[test]
    fn merges_txt_skips_the_version_line() {
        let m = parse_merges_txt(Path::new("merges.txt"), "#version: 0.2\ni n\nt h\n").unwrap();
        assert_eq!(m, vec![(2, "i".into(), "n".into()), (3, "t".into(), "h".into())]);
        let e = parse_merges_txt(Path::new("merges.txt"), "#version: 0.2\nbad\n").unwrap_err().to_string();
        assert!(e.contains("merges.txt") && e.contains("line 2"), "{e}");
    }
}
