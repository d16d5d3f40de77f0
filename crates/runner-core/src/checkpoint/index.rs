//! Shard indexes (`*.safetensors.index.json`): `{"metadata": {"total_size": N}, "weight_map":
//! {tensor: shard file}}`, as huggingface_hub and diffusers write them.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::{MapAccess, Visitor};
use serde::Deserialize;

use super::CheckpointError;

/// A parsed index: which shard file holds each tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct ShardIndex {
    pub path: PathBuf,
    /// `metadata.total_size`: the sum of tensor bytes (not of file sizes), when present.
    pub total_size: Option<u64>,
    pub weight_map: BTreeMap<String, String>,
}

impl ShardIndex {
    /// Shard file names, sorted and unique.
    pub fn shard_names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.weight_map.values().map(String::as_str).collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// Shard paths: shards live beside their index.
    pub fn shard_paths(&self) -> Vec<PathBuf> {
        let dir = self.path.parent().unwrap_or(Path::new("."));
        self.shard_names().into_iter().map(|n| dir.join(n)).collect()
    }
}

/// A JSON object refusing duplicate keys (a tensor mapped to two shards).
struct UniqueMap(BTreeMap<String, String>);

impl<'de> Deserialize<'de> for UniqueMap {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = UniqueMap;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object mapping tensor names to shard file names")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<UniqueMap, A::Error> {
                let mut out = BTreeMap::new();
                while let Some((k, v)) = map.next_entry::<String, String>()? {
                    if let Some(prev) = out.insert(k.clone(), v.clone()) {
                        return Err(serde::de::Error::custom(format!("tensor `{k}` is mapped twice (to `{prev}` and to `{v}`)")));
                    }
                }
                Ok(UniqueMap(out))
            }
        }
        d.deserialize_map(V)
    }
}

#[derive(Deserialize)]
struct RawIndex {
    #[serde(default)]
    metadata: Option<serde_json::Map<String, serde_json::Value>>,
    weight_map: UniqueMap,
}

/// Whether a shard name from an index is a plain file name beside the index. diffusers rejects
/// path separators (`_get_checkpoint_shard_files`); runner also rejects `..`, `.`, empty names
/// and backslashes, which pass upstream on POSIX.
pub fn check_shard_name(index: &Path, name: &str) -> Result<(), CheckpointError> {
    let bad = name.is_empty() || name == "." || name == ".." || name.contains(['/', '\\', '\0']) || Path::new(name).is_absolute();
    if bad {
        return Err(CheckpointError::format(index, format!("shard name {name:?} is not a plain file name: shards must sit beside their index (no path separators or `..`)")));
    }
    Ok(())
}

pub fn read_index(path: &Path) -> Result<ShardIndex, CheckpointError> {
    let text = std::fs::read_to_string(path).map_err(|e| CheckpointError::io(path, e))?;
    parse_index(path, &text)
}

pub fn parse_index(path: &Path, text: &str) -> Result<ShardIndex, CheckpointError> {
    let raw: RawIndex = serde_json::from_str(text).map_err(|e| CheckpointError::format(path, format!("not a valid shard index: {e}")))?;
    for name in raw.weight_map.0.values() {
        check_shard_name(path, name)?;
    }
    let total_size = match raw.metadata.as_ref().and_then(|m| m.get("total_size")) {
        None => None,
        Some(v) => Some(
            v.as_u64()
                .or_else(|| v.as_f64().filter(|f| *f >= 0.0 && f.fract() == 0.0).map(|f| f as u64))
                .ok_or_else(|| CheckpointError::format(path, format!("`metadata.total_size` must be a non-negative integer, found {v}")))?,
        ),
    };
    Ok(ShardIndex { path: path.to_path_buf(), total_size, weight_map: raw.weight_map.0 })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(text: &str) -> Result<ShardIndex, String> {
        parse_index(Path::new("unet/m.safetensors.index.json"), text).map_err(|e| e.to_string())
    }

    #[test]
    fn parses_hub_indexes() {
        let i = p(r#"{"metadata": {"total_size": 30}, "weight_map": {"a": "m-00002-of-00002.safetensors", "b": "m-00001-of-00002.safetensors", "c": "m-00001-of-00002.safetensors"}}"#).unwrap();
        assert_eq!(i.total_size, Some(30));
        assert_eq!(i.shard_names(), ["m-00001-of-00002.safetensors", "m-00002-of-00002.safetensors"]);
        assert_eq!(i.shard_paths()[0], PathBuf::from("unet/m-00001-of-00002.safetensors"));
        // transformers v5 writes total_parameters too, and floats for sizes from Python sums
        let i = p(r#"{"metadata": {"total_size": 30.0, "total_parameters": 7}, "weight_map": {}}"#).unwrap();
        assert_eq!(i.total_size, Some(30));
    }

    #[test]
    fn rejects_bad_indexes() {
        for (text, want) in [
            (r#"{"weight_map": {"a": "../x.safetensors"}}"#, "not a plain file name"),
            (r#"{"weight_map": {"a": "sub/x.safetensors"}}"#, "not a plain file name"),
            (r#"{"weight_map": {"a": "..\\x.safetensors"}}"#, "not a plain file name"),
            (r#"{"weight_map": {"a": "/etc/passwd"}}"#, "not a plain file name"),
            (r#"{"weight_map": {"a": ""}}"#, "not a plain file name"),
            (r#"{"weight_map": {"a": "x", "a": "y"}}"#, "mapped twice"),
            (r#"{"metadata": {"total_size": -1}, "weight_map": {}}"#, "non-negative integer"),
            (r#"{"metadata": {}}"#, "missing field `weight_map`"),
            ("[]", "not a valid shard index"),
        ] {
            let e = p(text).unwrap_err();
            assert!(e.contains(want), "{want:?} not in {e:?}");
            assert!(e.contains("unet/m.safetensors.index.json"), "{e}");
        }
    }
}
