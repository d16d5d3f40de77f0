//! The safetensors format, read from headers alone: 8-byte little-endian header length N, N
//! bytes of JSON (`{"__metadata__": {..}, "name": {"dtype", "shape", "data_offsets"}}`), then
//! the data. Validation follows the safetensors crate (`Metadata::validate`, read_metadata in
//! safetensors/src/tensor.rs) and is stricter where it is silent: duplicate tensor names are an
//! error here (upstream keeps the last one).

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::de::{MapAccess, Visitor};
use serde::{Deserialize, Serialize};

use super::CheckpointError;

/// Upstream's `MAX_HEADER_SIZE`: a header claiming more is refused before anything is read.
pub const MAX_HEADER_SIZE: u64 = 100_000_000;

/// Element types, by their safetensors names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[allow(non_camel_case_types, clippy::upper_case_acronyms)]
pub enum Dtype {
    BOOL,
    F4,
    F6_E2M3,
    F6_E3M2,
    U8,
    I8,
    F8_E5M2,
    F8_E4M3,
    F8_E8M0,
    F8_E4M3FNUZ,
    F8_E5M2FNUZ,
    I16,
    U16,
    F16,
    BF16,
    I32,
    U32,
    F32,
    C64,
    F64,
    I64,
    U64,
}

impl Dtype {
    pub const ALL: [Dtype; 22] = [
        Dtype::BOOL,
        Dtype::F4,
        Dtype::F6_E2M3,
        Dtype::F6_E3M2,
        Dtype::U8,
        Dtype::I8,
        Dtype::F8_E5M2,
        Dtype::F8_E4M3,
        Dtype::F8_E8M0,
        Dtype::F8_E4M3FNUZ,
        Dtype::F8_E5M2FNUZ,
        Dtype::I16,
        Dtype::U16,
        Dtype::F16,
        Dtype::BF16,
        Dtype::I32,
        Dtype::U32,
        Dtype::F32,
        Dtype::C64,
        Dtype::F64,
        Dtype::I64,
        Dtype::U64,
    ];

    pub fn bits(self) -> u64 {
        use Dtype::*;
        match self {
            F4 => 4,
            F6_E2M3 | F6_E3M2 => 6,
            BOOL | U8 | I8 | F8_E5M2 | F8_E4M3 | F8_E8M0 | F8_E4M3FNUZ | F8_E5M2FNUZ => 8,
            I16 | U16 | F16 | BF16 => 16,
            I32 | U32 | F32 => 32,
            C64 | F64 | I64 | U64 => 64,
        }
    }

    /// Whether a module-wide `.to(dtype)` converts tensors of this type (torch converts floating
    /// point parameters and buffers and leaves integer ones, e.g. CLIP's `position_ids`).
    pub fn is_float(self) -> bool {
        use Dtype::*;
        matches!(self, F4 | F6_E2M3 | F6_E3M2 | F8_E5M2 | F8_E4M3 | F8_E8M0 | F8_E4M3FNUZ | F8_E5M2FNUZ | F16 | BF16 | F32 | F64)
    }

    pub fn name(self) -> &'static str {
        use Dtype::*;
        match self {
            BOOL => "BOOL",
            F4 => "F4",
            F6_E2M3 => "F6_E2M3",
            F6_E3M2 => "F6_E3M2",
            U8 => "U8",
            I8 => "I8",
            F8_E5M2 => "F8_E5M2",
            F8_E4M3 => "F8_E4M3",
            F8_E8M0 => "F8_E8M0",
            F8_E4M3FNUZ => "F8_E4M3FNUZ",
            F8_E5M2FNUZ => "F8_E5M2FNUZ",
            I16 => "I16",
            U16 => "U16",
            F16 => "F16",
            BF16 => "BF16",
            I32 => "I32",
            U32 => "U32",
            F32 => "F32",
            C64 => "C64",
            F64 => "F64",
            I64 => "I64",
            U64 => "U64",
        }
    }

    pub fn from_name(s: &str) -> Option<Dtype> {
        Dtype::ALL.into_iter().find(|d| d.name() == s)
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One tensor's entry in a header.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<u64>,
    /// Byte range within the data section (after the header).
    pub data_offsets: (u64, u64),
}

impl TensorInfo {
    pub fn numel(&self) -> u64 {
        self.shape.iter().product()
    }
    pub fn nbytes(&self) -> u64 {
        self.data_offsets.1 - self.data_offsets.0
    }
    /// Bytes this tensor takes once a module is cast to a float dtype of `bytes_per_element`.
    pub fn nbytes_as(&self, float_bytes: u64) -> u64 {
        if self.dtype.is_float() {
            self.numel() * float_bytes
        } else {
            self.nbytes()
        }
    }
}

/// A parsed, validated header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Tensors in file (data offset) order.
    pub tensors: Vec<TensorInfo>,
    pub metadata: BTreeMap<String, String>,
    /// Offset of the data section from the start of the file (8 + N).
    pub data_start: u64,
    /// Length of the data section.
    pub data_len: u64,
}

impl Header {
    pub fn get(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }
    pub fn total_bytes(&self) -> u64 {
        self.tensors.iter().map(TensorInfo::nbytes).sum()
    }
}

/// Opens a checkpoint file for reading: a regular file, or an error. Opened non-blocking and
/// checked on the descriptor, so a FIFO or device named `*.safetensors` is refused at once
/// instead of hanging `open()` or a read.
pub fn open_regular(path: &Path) -> Result<File, CheckpointError> {
    use std::os::unix::fs::OpenOptionsExt;
    if path.is_dir() {
        return Err(CheckpointError::format(path, "is a directory, expected a .safetensors file"));
    }
    let file = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(path).map_err(|e| CheckpointError::io(path, e))?;
    let meta = file.metadata().map_err(|e| CheckpointError::io(path, e))?;
    if !meta.is_file() {
        return Err(CheckpointError::format(path, "is not a regular file (a FIFO, device or socket): checkpoints are read from files"));
    }
    Ok(file)
}

/// Reads and validates a file's header without reading its data.
pub fn read_header(path: &Path) -> Result<Header, CheckpointError> {
    let io = |source| CheckpointError::Io { path: path.to_path_buf(), source };
    let mut file = open_regular(path)?;
    let file_len = file.metadata().map_err(io)?.len();
    let mut len_bytes = [0u8; 8];
    if file_len < 8 {
        return Err(CheckpointError::format(path, format!("truncated: {file_len} bytes, too short for the 8-byte header length")));
    }
    file.read_exact(&mut len_bytes).map_err(io)?;
    let n = u64::from_le_bytes(len_bytes);
    check_header_len(path, n, file_len)?;
    let mut buf = vec![0u8; n as usize];
    file.read_exact(&mut buf).map_err(io)?;
    parse_header(path, &buf, file_len)
}

fn check_header_len(path: &Path, n: u64, file_len: u64) -> Result<(), CheckpointError> {
    if n > MAX_HEADER_SIZE {
        return Err(CheckpointError::format(path, format!("header length {n} bytes is over the 100 MB safetensors limit: not a safetensors file, or corrupt")));
    }
    if 8 + n > file_len {
        return Err(CheckpointError::format(path, format!("truncated: header length {n} bytes runs past the end of the file ({file_len} bytes)")));
    }
    Ok(())
}

/// Parses a whole safetensors file held in memory (used by the fuzz/property tests and by
/// callers that already mapped the file).
pub fn parse_file_bytes(path: &Path, bytes: &[u8]) -> Result<Header, CheckpointError> {
    let file_len = bytes.len() as u64;
    if file_len < 8 {
        return Err(CheckpointError::format(path, format!("truncated: {file_len} bytes, too short for the 8-byte header length")));
    }
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
    check_header_len(path, n, file_len)?;
    parse_header(path, &bytes[8..8 + n as usize], file_len)
}

/// Header JSON entries in file order, refusing duplicate names.
struct RawHeader(Vec<(String, serde_json::Value)>);

impl<'de> Deserialize<'de> for RawHeader {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawHeader;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object of tensor entries")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawHeader, A::Error> {
                let mut seen = std::collections::HashSet::new();
                let mut out = vec![];
                while let Some((k, v)) = map.next_entry::<String, serde_json::Value>()? {
                    if !seen.insert(k.clone()) {
                        return Err(serde::de::Error::custom(format!("tensor `{k}` appears twice in the header")));
                    }
                    out.push((k, v));
                }
                Ok(RawHeader(out))
            }
        }
        d.deserialize_map(V)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTensor {
    dtype: String,
    shape: Vec<u64>,
    data_offsets: (u64, u64),
}

/// Validates header JSON `buf` of a file of `file_len` bytes.
pub fn parse_header(path: &Path, buf: &[u8], file_len: u64) -> Result<Header, CheckpointError> {
    let text = std::str::from_utf8(buf).map_err(|e| CheckpointError::format(path, format!("header is not UTF-8: {e}")))?;
    let raw: RawHeader = serde_json::from_str(text).map_err(|e| CheckpointError::format(path, format!("header is not valid safetensors JSON: {e}")))?;
    let mut metadata = BTreeMap::new();
    let mut tensors = Vec::with_capacity(raw.0.len());
    for (name, value) in raw.0 {
        if name == "__metadata__" {
            if value.is_null() {
                continue;
            }
            metadata = serde_json::from_value(value).map_err(|e| CheckpointError::format(path, format!("`__metadata__` must map strings to strings: {e}")))?;
            continue;
        }
        let t: RawTensor = serde_json::from_value(value).map_err(|e| CheckpointError::tensor(path, &name, format!("bad header entry: {e}")))?;
        let dtype = Dtype::from_name(&t.dtype).ok_or_else(|| CheckpointError::tensor(path, &name, format!("unknown dtype `{}` (known: {})", t.dtype, Dtype::ALL.map(Dtype::name).join(", "))))?;
        tensors.push(TensorInfo { name, dtype, shape: t.shape, data_offsets: t.data_offsets });
    }

    // Contiguous from 0, no gaps or overlaps, sizes matching shapes (safetensors' validate).
    tensors.sort_by(|a, b| a.data_offsets.cmp(&b.data_offsets).then_with(|| a.name.cmp(&b.name)));
    let mut end = 0u64;
    for t in &tensors {
        let (s, e) = t.data_offsets;
        if e < s {
            return Err(CheckpointError::tensor(path, &t.name, format!("data_offsets [{s}, {e}] end before they start")));
        }
        if s != end {
            let what = if s < end { "overlaps the previous tensor" } else { "leaves a gap after the previous tensor" };
            return Err(CheckpointError::tensor(path, &t.name, format!("data_offsets [{s}, {e}] {what} (expected to start at {end})")));
        }
        let bits = t
            .shape
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .and_then(|n| n.checked_mul(t.dtype.bits()))
            .ok_or_else(|| CheckpointError::tensor(path, &t.name, format!("shape {:?} overflows", t.shape)))?;
        if bits % 8 != 0 {
            return Err(CheckpointError::tensor(path, &t.name, format!("{} elements of {} do not fill whole bytes", bits / t.dtype.bits(), t.dtype)));
        }
        if e - s != bits / 8 {
            return Err(CheckpointError::tensor(path, &t.name, format!("shape {:?} of {} needs {} bytes but data_offsets [{s}, {e}] hold {}", t.shape, t.dtype, bits / 8, e - s)));
        }
        end = e;
    }
    let data_start = 8 + buf.len() as u64;
    let data_len = file_len - data_start;
    if end != data_len {
        let msg = if end > data_len {
            format!("truncated: tensors need {end} bytes of data but the file holds {data_len}")
        } else {
            format!("{} bytes after the last tensor are not covered by the header", data_len - end)
        };
        return Err(CheckpointError::format(path, msg));
    }
    Ok(Header { tensors, metadata, data_start, data_len })
}

/// A safetensors file mapped into memory (read-only), with its validated header.
pub struct MappedFile {
    pub path: PathBuf,
    pub header: Header,
    // Dropped before the mapping: see [`super::sigbus`].
    _watch: super::sigbus::Watch,
    map: memmap2::Mmap,
}

impl MappedFile {
    pub fn open(path: &Path) -> Result<MappedFile, CheckpointError> {
        let io = |source| CheckpointError::Io { path: path.to_path_buf(), source };
        let file = open_regular(path)?;
        // SAFETY: the map is read-only; a file truncated under us by another process faults, and
        // the watch turns that into an error naming the file.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        let _watch = super::sigbus::watch(map.as_ptr(), map.len(), path);
        let header = parse_file_bytes(path, &map)?;
        Ok(MappedFile { path: path.to_path_buf(), header, _watch, map })
    }

    /// The bytes of one tensor.
    pub fn data(&self, t: &TensorInfo) -> &[u8] {
        let start = (self.header.data_start + t.data_offsets.0) as usize;
        &self.map[start..start + t.nbytes() as usize]
    }

    /// Unmaps the whole pages of a tensor that has been consumed, so that streaming through a
    /// large file keeps resident memory bounded (the data stays in the page cache). Takes
    /// `&mut self`: no slice from [`MappedFile::data`] may be alive.
    pub fn release(&mut self, t: &TensorInfo) {
        let page = 4096;
        let start = (self.header.data_start + t.data_offsets.0) as usize;
        let (s, e) = (start.div_ceil(page) * page, (start + t.nbytes() as usize) / page * page);
        if e > s {
            // SAFETY: no borrow of the mapping is alive (`&mut self`); a shared read-only file
            // mapping refaults the same bytes from the file if the range is read again.
            let _ = unsafe { self.map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, s, e - s) };
        }
    }
}

/// Serializes a header the way the safetensors crate does (`prepare`): compact JSON,
/// `__metadata__` first, tensors in the given order, padded with spaces to a multiple of 8 so
/// the data section is 8-byte aligned. Returns the 8-byte length prefix + header.
pub fn encode_header(tensors: &[TensorInfo], metadata: &BTreeMap<String, String>) -> Vec<u8> {
    use serde_json::{Map, Value};
    let mut out = String::from("{");
    let mut first = true;
    let mut push = |k: &str, v: Value| {
        if !first {
            out.push(',');
        }
        first = false;
        out.push_str(&serde_json::to_string(k).expect("string"));
        out.push(':');
        out.push_str(&v.to_string());
    };
    if !metadata.is_empty() {
        push("__metadata__", Value::Object(metadata.iter().map(|(k, v)| (k.clone(), Value::String(v.clone()))).collect::<Map<_, _>>()));
    }
    for t in tensors {
        push(&t.name, serde_json::json!({"dtype": t.dtype.name(), "shape": t.shape, "data_offsets": [t.data_offsets.0, t.data_offsets.1]}));
    }
    out.push('}');
    let mut bytes = out.into_bytes();
    let padded = bytes.len().div_ceil(8) * 8;
    bytes.resize(padded, b' ');
    let mut with_len = (bytes.len() as u64).to_le_bytes().to_vec();
    with_len.extend(bytes);
    with_len
}

#[cfg(test)]
mod tests {
    use super::*;

    type Entry<'a> = (&'a str, &'a str, &'a [u64], (u64, u64));

    fn file(tensors: &[Entry], data_len: usize) -> Vec<u8> {
        let mut h = serde_json::Map::new();
        for (name, dtype, shape, off) in tensors {
            h.insert(name.to_string(), serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [off.0, off.1]}));
        }
        let text = serde_json::to_string(&h).unwrap();
        let mut out = (text.len() as u64).to_le_bytes().to_vec();
        out.extend(text.as_bytes());
        out.extend(vec![0u8; data_len]);
        out
    }

    fn parse(bytes: &[u8]) -> Result<Header, String> {
        parse_file_bytes(Path::new("m.safetensors"), bytes).map_err(|e| e.to_string())
    }

    #[test]
    fn valid_file() {
        let b = file(&[("a", "F32", &[2, 2], (0, 16)), ("b", "I64", &[1], (16, 24)), ("s", "F16", &[], (24, 26)), ("z", "F32", &[0, 3], (26, 26))], 26);
        let h = parse(&b).unwrap();
        assert_eq!(h.tensors.len(), 4);
        assert_eq!(h.total_bytes(), 26);
        let a = h.get("a").unwrap();
        assert_eq!(a.nbytes_as(2), 8);
        assert_eq!(h.get("b").unwrap().nbytes_as(2), 8, "integer tensors keep their dtype");
    }

    #[test]
    fn rejects_bad_headers() {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (vec![1, 2, 3], "truncated: 3 bytes"),
            (
                {
                    let mut b = file(&[("a", "F32", &[1], (0, 4))], 4);
                    b.truncate(b.len() - 2);
                    b
                },
                "truncated: tensors need 4 bytes",
            ),
            ((u64::MAX).to_le_bytes().to_vec(), "over the 100 MB"),
            (
                {
                    let mut b = 1000u64.to_le_bytes().to_vec();
                    b.extend(b"{}");
                    b
                },
                "runs past the end",
            ),
            (
                {
                    let mut b = 4u64.to_le_bytes().to_vec();
                    b.extend(b"nope");
                    b
                },
                "not valid safetensors JSON",
            ),
            (file(&[("a", "F33", &[1], (0, 4))], 4), "unknown dtype `F33`"),
            (file(&[("a", "F32", &[2], (0, 4))], 4), "needs 8 bytes"),
            (file(&[("a", "F32", &[1], (0, 4)), ("b", "F32", &[1], (2, 6))], 6), "overlaps"),
            (file(&[("a", "F32", &[1], (0, 4)), ("b", "F32", &[1], (8, 12))], 12), "leaves a gap"),
            (file(&[("a", "F32", &[1], (4, 0))], 4), "end before they start"),
            (file(&[("a", "F32", &[1], (0, 4))], 8), "4 bytes after the last tensor"),
            (file(&[("a", "F32", &[u64::MAX, 2], (0, 4))], 4), "overflows"),
            (file(&[("a", "F4", &[3], (0, 2))], 2), "do not fill whole bytes"),
        ];
        for (bytes, want) in cases {
            let err = parse(&bytes).unwrap_err();
            assert!(err.contains(want), "want {want:?} in {err:?}");
            assert!(err.contains("m.safetensors"), "{err}");
        }
        let mut dup = b"{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}".to_vec();
        let mut b = (dup.len() as u64).to_le_bytes().to_vec();
        b.append(&mut dup);
        b.extend([0u8; 4]);
        assert!(parse(&b).unwrap_err().contains("appears twice"));
    }

    #[test]
    fn encode_roundtrips_and_aligns() {
        let ts =
            vec![TensorInfo { name: "w".into(), dtype: Dtype::F16, shape: vec![3], data_offsets: (0, 6) }, TensorInfo { name: "b".into(), dtype: Dtype::F32, shape: vec![1], data_offsets: (6, 10) }];
        let md = BTreeMap::from([("format".to_string(), "pt".to_string())]);
        let mut bytes = encode_header(&ts, &md);
        assert_eq!((bytes.len() - 8) % 8, 0);
        bytes.extend([0u8; 10]);
        let h = parse(&bytes).unwrap();
        assert_eq!(h.tensors, ts);
        assert_eq!(h.metadata, md);
    }

    proptest::proptest! {
        // Header parsing never panics on arbitrary input (the fuzz target of the checkpoint issue).
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
            let _ = parse(&bytes);
        }

        #[test]
        fn arbitrary_json_headers_never_panic(json in "\\{(\"[a-c]\":\\{\"dtype\":\"(F32|F16|BOOL|F4|I64)\",\"shape\":\\[[0-9]{0,3}(,[0-9]{1,2})?\\],\"data_offsets\":\\[[0-9]{1,2},[0-9]{1,2}\\]\\},?){0,3}\\}", pad in 0usize..64) {
            let mut b = (json.len() as u64).to_le_bytes().to_vec();
            b.extend(json.as_bytes());
            b.extend(vec![0u8; pad]);
            let _ = parse(&b);
        }
    }
}
