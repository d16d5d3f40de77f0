//! GGUF files (llama.cpp's format; city96's quantized FLUX.1 and SD3.5 transformers): the header,
//! the metadata and the tensor infos, read and checked without reading a byte of tensor data, and
//! written (tests, `runner quantize`).
//!
//! Layout (gguf-py 0.19 `gguf_reader.py` / `gguf_writer.py`; ggml's `gguf.cpp`), little-endian:
//! `u32 magic "GGUF"`, `u32 version` (2 or 3), `u64 tensor_count`, `u64 kv_count`; the metadata
//! (`string key`, `u32 value type`, value; strings are `u64 len` + UTF-8, arrays `u32 elem type`,
//! `u64 n`, elements); the tensor infos (`string name`, `u32 n_dims`, `u64 dims[n_dims]` in
//! ggml's order, fastest dimension first, `u32 ggml type`, `u64 offset` from the data section);
//! then the data section at the next multiple of `general.alignment` (default 32). A quantized
//! tensor's rows are runs of blocks along its last (torch) dimension.

use std::collections::{BTreeMap, HashSet};
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::CheckpointError;

/// `"GGUF"` as a little-endian u32.
pub const MAGIC: u32 = 0x4655_4747;
/// The versions gguf-py reads (`READER_SUPPORTED_VERSIONS`).
pub const VERSIONS: [u32; 2] = [2, 3];
/// `GGUF_DEFAULT_ALIGNMENT`.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml's `GGML_MAX_DIMS`.
pub const MAX_DIMS: usize = 4;
/// The longest string runner reads from a header (64 MiB).
const MAX_STRING: u64 = 64 << 20;

/// A ggml tensor type: its id, name, block of elements and bytes per block (gguf-py's
/// `GGMLQuantizationType` and `GGML_QUANT_SIZES`), and whether diffusers 0.42 dequantizes it
/// (`SUPPORTED_GGUF_QUANT_TYPES` plus the plain F32 / F16).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(into = "&'static str")]
pub struct GgmlType {
    pub id: u32,
}

/// (id, name, block size, type size, diffusers dequantizes it)
const TYPES: &[(u32, &str, u64, u64, bool)] = &[
    (0, "F32", 1, 4, true),
    (1, "F16", 1, 2, true),
    (2, "Q4_0", 32, 18, true),
    (3, "Q4_1", 32, 20, true),
    (6, "Q5_0", 32, 22, true),
    (7, "Q5_1", 32, 24, true),
    (8, "Q8_0", 32, 34, true),
    (9, "Q8_1", 32, 40, false),
    (10, "Q2_K", 256, 84, true),
    (11, "Q3_K", 256, 110, true),
    (12, "Q4_K", 256, 144, true),
    (13, "Q5_K", 256, 176, true),
    (14, "Q6_K", 256, 210, true),
    (15, "Q8_K", 256, 292, false),
    (16, "IQ2_XXS", 256, 66, false),
    (17, "IQ2_XS", 256, 74, false),
    (18, "IQ3_XXS", 256, 98, false),
    (19, "IQ1_S", 256, 50, false),
    (20, "IQ4_NL", 32, 18, true),
    (21, "IQ3_S", 256, 110, false),
    (22, "IQ2_S", 256, 82, false),
    (23, "IQ4_XS", 256, 136, true),
    (24, "I8", 1, 1, false),
    (25, "I16", 1, 2, false),
    (26, "I32", 1, 4, false),
    (27, "I64", 1, 8, false),
    (28, "F64", 1, 8, false),
    (29, "IQ1_M", 256, 56, false),
    (30, "BF16", 1, 2, true),
    (34, "TQ1_0", 256, 54, false),
    (35, "TQ2_0", 256, 66, false),
    (39, "MXFP4", 32, 17, false),
    (40, "NVFP4", 64, 36, false),
    (41, "Q1_0", 128, 18, false),
];

impl GgmlType {
    pub const F32: GgmlType = GgmlType { id: 0 };
    pub const F16: GgmlType = GgmlType { id: 1 };
    pub const Q4_0: GgmlType = GgmlType { id: 2 };
    pub const Q4_1: GgmlType = GgmlType { id: 3 };
    pub const Q5_0: GgmlType = GgmlType { id: 6 };
    pub const Q5_1: GgmlType = GgmlType { id: 7 };
    pub const Q8_0: GgmlType = GgmlType { id: 8 };
    pub const Q2_K: GgmlType = GgmlType { id: 10 };
    pub const Q3_K: GgmlType = GgmlType { id: 11 };
    pub const Q4_K: GgmlType = GgmlType { id: 12 };
    pub const Q5_K: GgmlType = GgmlType { id: 13 };
    pub const Q6_K: GgmlType = GgmlType { id: 14 };
    pub const IQ4_NL: GgmlType = GgmlType { id: 20 };
    pub const IQ4_XS: GgmlType = GgmlType { id: 23 };
    pub const BF16: GgmlType = GgmlType { id: 30 };

    /// The type of a ggml type id, if ggml has one.
    pub fn from_id(id: u32) -> Option<GgmlType> {
        TYPES.iter().any(|t| t.0 == id).then_some(GgmlType { id })
    }

    /// The type named `name` (`Q4_0`, `q4_0`, `bf16`, ...).
    pub fn from_name(name: &str) -> Option<GgmlType> {
        TYPES.iter().find(|t| t.1.eq_ignore_ascii_case(name)).map(|t| GgmlType { id: t.0 })
    }

    fn row(self) -> &'static (u32, &'static str, u64, u64, bool) {
        TYPES.iter().find(|t| t.0 == self.id).expect("GgmlType holds known ids only")
    }

    pub fn name(self) -> &'static str {
        self.row().1
    }
    /// Elements per block (1 for the plain types).
    pub fn block_size(self) -> u64 {
        self.row().2
    }
    /// Bytes per block.
    pub fn type_size(self) -> u64 {
        self.row().3
    }
    /// Whether diffusers 0.42 loads it (and so runner).
    pub fn supported(self) -> bool {
        self.row().4
    }
    /// A quantized type (blocks of more than one element), whose Linear weights stay quantized.
    pub fn quantized(self) -> bool {
        self.block_size() > 1
    }
    /// The types diffusers loads, by name.
    pub fn supported_names() -> Vec<&'static str> {
        TYPES.iter().filter(|t| t.4).map(|t| t.1).collect()
    }
}

impl From<GgmlType> for &'static str {
    fn from(t: GgmlType) -> Self {
        t.name()
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A metadata value. Arrays keep their element type and length, and their values when there are
/// at most [`Value::KEPT`] of them. As JSON: the value, an array as a list, a longer one as
/// `{"elem_type": T, "len": N}`.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Uint(u64),
    Int(i64),
    Float(f64),
    Bool(bool),
    Str(String),
    Array { elem_type: u32, len: u64, values: Option<Vec<Value>> },
}

impl Serialize for Value {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        match self {
            Value::Uint(v) => s.serialize_u64(*v),
            Value::Int(v) => s.serialize_i64(*v),
            Value::Float(v) => s.serialize_f64(*v),
            Value::Bool(v) => s.serialize_bool(*v),
            Value::Str(v) => s.serialize_str(v),
            Value::Array { values: Some(v), .. } => v.serialize(s),
            Value::Array { elem_type, len, values: None } => {
                let mut m = s.serialize_map(Some(2))?;
                m.serialize_entry("elem_type", elem_type)?;
                m.serialize_entry("len", len)?;
                m.end()
            }
        }
    }
}

impl Value {
    /// Arrays longer than this keep their length only (a tokenizer's vocabulary, say).
    pub const KEPT: u64 = 64;

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::Uint(v) => Some(v),
            Value::Int(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }
}

/// One tensor's info: its name, torch-order shape (ggml's dims reversed), type, and where its
/// bytes are in the file.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TensorInfo {
    pub name: String,
    pub shape: Vec<u64>,
    #[serde(rename = "type")]
    pub ggml_type: GgmlType,
    /// Absolute offset of the first byte in the file.
    pub start: u64,
    pub n_bytes: u64,
}

impl TensorInfo {
    pub fn numel(&self) -> u64 {
        self.shape.iter().product()
    }
    /// The shape of its bytes, as gguf-py and diffusers hold a quantized tensor: the rows, then
    /// the bytes of one row (`quant_shape_to_byte_shape`).
    pub fn byte_shape(&self) -> Vec<u64> {
        let mut s = self.shape.clone();
        if let Some(last) = s.last_mut() {
            *last = *last / self.ggml_type.block_size() * self.ggml_type.type_size();
        }
        s
    }
}

/// A GGUF file's header, metadata and tensor infos.
#[derive(Debug, Clone, Serialize)]
pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    pub alignment: u64,
    /// Absolute offset of the data section.
    pub data_start: u64,
    pub file_len: u64,
    pub metadata: BTreeMap<String, Value>,
    /// In file order.
    pub tensors: Vec<TensorInfo>,
}

impl GgufFile {
    /// `general.architecture` (`flux`, `sd3`, ...), where the file has it (stable-diffusion.cpp's do not).
    pub fn architecture(&self) -> Option<&str> {
        self.metadata.get("general.architecture").and_then(Value::as_str)
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// Bytes of tensor data (without alignment padding).
    pub fn data_bytes(&self) -> u64 {
        self.tensors.iter().map(|t| t.n_bytes).sum()
    }

    /// The tensors of types diffusers cannot load: an error naming the first few and the
    /// supported types.
    pub fn check_supported(&self) -> Result<(), CheckpointError> {
        let bad: Vec<&TensorInfo> = self.tensors.iter().filter(|t| !t.ggml_type.supported()).collect();
        match bad.first() {
            None => Ok(()),
            Some(t) => Err(CheckpointError::tensor(
                &self.path,
                &t.name,
                format!(
                    "type {} is not supported{}; supported: {}",
                    t.ggml_type,
                    if bad.len() > 1 { format!(" ({} tensors have unsupported types)", bad.len()) } else { String::new() },
                    GgmlType::supported_names().join(", ")
                ),
            )),
        }
    }
}

/// Reads and checks a GGUF file's header, metadata and tensor infos: the magic and version, every
/// count and length against the file's size, a known type for every tensor with rows of whole
/// blocks, unique names, and tensor data within the file without overlaps. Reads no tensor data.
pub fn read(path: &Path) -> Result<GgufFile, CheckpointError> {
    let file = std::fs::File::open(path).map_err(|e| CheckpointError::io(path, e))?;
    let meta = file.metadata().map_err(|e| CheckpointError::io(path, e))?;
    if !meta.is_file() {
        return Err(CheckpointError::format(path, "not a regular file"));
    }
    let mut r = Reader { inner: BufReader::with_capacity(1 << 16, file), pos: 0, len: meta.len(), path };
    let magic = r.u32("the magic number")?;
    if magic != MAGIC {
        return Err(r.bad(format!("not a GGUF file (its first bytes are {:?}, not \"GGUF\")", String::from_utf8_lossy(&magic.to_le_bytes()))));
    }
    let version = r.u32("the version")?;
    if !VERSIONS.contains(&version) {
        return Err(r.bad(format!("GGUF version {version} is not supported (versions 2 and 3 are)")));
    }
    let tensor_count = r.u64("the tensor count")?;
    let kv_count = r.u64("the metadata count")?;
    // Each metadata pair takes at least 12 bytes and each tensor info 24: counts the file cannot hold are refused before anything is allocated.
    r.fits(kv_count, 12, "metadata entries")?;
    r.fits(tensor_count, 24, "tensor infos")?;
    let mut metadata = BTreeMap::new();
    for _ in 0..kv_count {
        let key = r.string("a metadata key")?;
        let vtype = r.u32(&format!("the type of metadata `{key}`"))?;
        let value = r.value(vtype, &key)?;
        if metadata.insert(key.clone(), value).is_some() {
            return Err(r.bad(format!("metadata key `{key}` appears twice")));
        }
    }
    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(Value::Uint(a)) if *a > 0 && a.is_power_of_two() => *a,
        Some(v) => return Err(r.bad(format!("`general.alignment` is {v:?}: expected a power of two (an unsigned integer)"))),
    };
    let mut tensors = Vec::with_capacity(tensor_count.min(1 << 20) as usize);
    let mut names = HashSet::new();
    for _ in 0..tensor_count {
        let name = r.string("a tensor name")?;
        let n_dims = r.u32(&format!("tensor `{name}`'s number of dimensions"))? as usize;
        if n_dims > MAX_DIMS {
            return Err(CheckpointError::tensor(path, &name, format!("{n_dims} dimensions: ggml has at most {MAX_DIMS}")));
        }
        let mut ne = Vec::with_capacity(n_dims);
        for _ in 0..n_dims {
            ne.push(r.u64(&format!("tensor `{name}`'s dimensions"))?);
        }
        let type_id = r.u32(&format!("tensor `{name}`'s type"))?;
        let offset = r.u64(&format!("tensor `{name}`'s offset"))?;
        let ggml_type = GgmlType::from_id(type_id).ok_or_else(|| CheckpointError::tensor(path, &name, format!("unknown GGML type id {type_id}")))?;
        if !names.insert(name.clone()) {
            return Err(CheckpointError::tensor(path, &name, "appears twice"));
        }
        let shape: Vec<u64> = ne.iter().rev().copied().collect();
        let n_bytes = byte_size(&ne, ggml_type).map_err(|msg| CheckpointError::tensor(path, &name, msg))?;
        tensors.push((TensorInfo { name, shape, ggml_type, start: 0, n_bytes }, offset));
    }
    let data_start = r.pos.div_ceil(alignment) * alignment;
    let file_len = r.len;
    let mut out = Vec::with_capacity(tensors.len());
    for (mut t, offset) in tensors {
        if offset % alignment != 0 {
            return Err(CheckpointError::tensor(path, &t.name, format!("data offset {offset} is not a multiple of the alignment {alignment}")));
        }
        let end = data_start.checked_add(offset).and_then(|s| s.checked_add(t.n_bytes));
        match end {
            Some(end) if end <= file_len => t.start = data_start + offset,
            _ => return Err(CheckpointError::tensor(path, &t.name, format!("data (offset {offset}, {} bytes) lies beyond the end of the file ({file_len} bytes): truncated?", t.n_bytes))),
        }
        out.push(t);
    }
    let mut by_start: Vec<&TensorInfo> = out.iter().filter(|t| t.n_bytes > 0).collect();
    by_start.sort_by_key(|t| t.start);
    for w in by_start.windows(2) {
        if w[0].start + w[0].n_bytes > w[1].start {
            return Err(CheckpointError::tensor(path, &w[1].name, format!("data overlaps tensor `{}`'s", w[0].name)));
        }
    }
    Ok(GgufFile { path: path.to_path_buf(), version, alignment, data_start, file_len, metadata, tensors: out })
}

/// Bytes of a tensor of ggml dims `ne` (fastest first): its rows must be whole blocks.
fn byte_size(ne: &[u64], t: GgmlType) -> Result<u64, String> {
    let row = ne.first().copied().unwrap_or(1);
    if row % t.block_size() != 0 {
        return Err(format!("rows of {row} elements are not a whole number of {t} blocks of {} elements", t.block_size()));
    }
    ne.iter().skip(1).try_fold((row / t.block_size()).checked_mul(t.type_size()), |acc, &d| Some(acc?.checked_mul(d))).flatten().ok_or_else(|| format!("dimensions {ne:?} overflow a 64-bit size"))
}

struct Reader<'a> {
    inner: BufReader<std::fs::File>,
    pos: u64,
    len: u64,
    path: &'a Path,
}

impl Reader<'_> {
    fn bad(&self, msg: impl Into<String>) -> CheckpointError {
        CheckpointError::format(self.path, msg)
    }

    fn bytes<const N: usize>(&mut self, what: &str) -> Result<[u8; N], CheckpointError> {
        let mut b = [0u8; N];
        if self.pos + N as u64 > self.len {
            return Err(self.bad(format!("the file ends (at {} bytes) inside {what}: truncated?", self.len)));
        }
        self.inner.read_exact(&mut b).map_err(|e| CheckpointError::io(self.path, e))?;
        self.pos += N as u64;
        Ok(b)
    }
    fn u32(&mut self, what: &str) -> Result<u32, CheckpointError> {
        self.bytes::<4>(what).map(u32::from_le_bytes)
    }
    fn u64(&mut self, what: &str) -> Result<u64, CheckpointError> {
        self.bytes::<8>(what).map(u64::from_le_bytes)
    }

    /// That `count` items of at least `min` bytes each fit in what is left of the file.
    fn fits(&self, count: u64, min: u64, what: &str) -> Result<(), CheckpointError> {
        if count.saturating_mul(min) > self.len - self.pos {
            return Err(self.bad(format!("{count} {what} cannot fit in the {} bytes left of the file: corrupt or truncated", self.len - self.pos)));
        }
        Ok(())
    }

    fn string(&mut self, what: &str) -> Result<String, CheckpointError> {
        let n = self.u64(what)?;
        if n > self.len - self.pos {
            return Err(self.bad(format!("{what}: a string of {n} bytes is longer than the {} bytes left of the file", self.len - self.pos)));
        }
        // Names and metadata strings are short (a chat template is kilobytes): a corrupt length
        // within a many-gigabyte file must not become an allocation of that size.
        if n > MAX_STRING {
            return Err(self.bad(format!("{what}: a string of {n} bytes (more than {MAX_STRING}): corrupt?")));
        }
        let mut b = vec![0u8; n as usize];
        self.inner.read_exact(&mut b).map_err(|e| CheckpointError::io(self.path, e))?;
        self.pos += n;
        String::from_utf8(b).map_err(|_| self.bad(format!("{what} is not UTF-8")))
    }

    fn skip(&mut self, n: u64, what: &str) -> Result<(), CheckpointError> {
        if n > self.len - self.pos {
            return Err(self.bad(format!("the file ends inside {what}: truncated?")));
        }
        self.inner.seek(SeekFrom::Current(n as i64)).map_err(|e| CheckpointError::io(self.path, e))?;
        self.pos += n;
        Ok(())
    }

    /// A metadata value of GGUF value type `t`.
    fn value(&mut self, t: u32, key: &str) -> Result<Value, CheckpointError> {
        let what = format!("metadata `{key}`");
        Ok(match t {
            0 => Value::Uint(self.bytes::<1>(&what)?[0] as u64),
            1 => Value::Int(self.bytes::<1>(&what)?[0] as i8 as i64),
            2 => Value::Uint(u16::from_le_bytes(self.bytes(&what)?) as u64),
            3 => Value::Int(i16::from_le_bytes(self.bytes(&what)?) as i64),
            4 => Value::Uint(self.u32(&what)? as u64),
            5 => Value::Int(i32::from_le_bytes(self.bytes(&what)?) as i64),
            6 => Value::Float(f32::from_le_bytes(self.bytes(&what)?) as f64),
            7 => Value::Bool(self.bytes::<1>(&what)?[0] != 0),
            8 => Value::Str(self.string(&what)?),
            10 => Value::Uint(self.u64(&what)?),
            11 => Value::Int(i64::from_le_bytes(self.bytes(&what)?)),
            12 => Value::Float(f64::from_le_bytes(self.bytes(&what)?)),
            9 => {
                let elem_type = self.u32(&what)?;
                let len = self.u64(&what)?;
                let fixed = match elem_type {
                    0 | 1 | 7 => Some(1),
                    2 | 3 => Some(2),
                    4..=6 => Some(4),
                    10..=12 => Some(8),
                    8 => None,
                    9 => return Err(self.bad(format!("{what}: arrays of arrays are not supported"))),
                    other => return Err(self.bad(format!("{what}: unknown array element type {other}"))),
                };
                self.fits(len, fixed.unwrap_or(8), &format!("elements of {what}"))?;
                if len > Value::KEPT {
                    match fixed {
                        Some(size) => self.skip(len * size, &what)?,
                        None => {
                            for _ in 0..len {
                                let n = self.u64(&what)?;
                                self.skip(n, &what)?;
                            }
                        }
                    }
                    Value::Array { elem_type, len, values: None }
                } else {
                    let values = (0..len).map(|_| self.value(elem_type, key)).collect::<Result<Vec<_>, _>>()?;
                    Value::Array { elem_type, len, values: Some(values) }
                }
            }
            other => return Err(self.bad(format!("{what}: unknown value type {other}"))),
        })
    }
}

/// A metadata value to write.
#[derive(Debug, Clone)]
pub enum WriteValue {
    U32(u32),
    Str(String),
}

/// One tensor to write: its name, torch-order shape, type and bytes (a quantized tensor's blocks,
/// row after row).
pub struct WriteTensor<'a> {
    pub name: &'a str,
    pub shape: &'a [u64],
    pub ggml_type: GgmlType,
    pub n_bytes: u64,
}

/// The bytes before the data section of a GGUF v3 file holding `metadata` and `tensors` (in that
/// order, each tensor's data at the next multiple of `alignment`), and each tensor's offset in the
/// data section. Errors name a tensor whose rows are not whole blocks or whose size disagrees.
pub fn encode_header(metadata: &[(&str, WriteValue)], tensors: &[WriteTensor], alignment: u64) -> Result<(Vec<u8>, Vec<u64>), String> {
    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(&(s.len() as u64).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
    }
    let mut out = Vec::new();
    out.extend_from_slice(&MAGIC.to_le_bytes());
    out.extend_from_slice(&3u32.to_le_bytes());
    out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    out.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (k, v) in metadata {
        string(&mut out, k);
        match v {
            WriteValue::U32(x) => {
                out.extend_from_slice(&4u32.to_le_bytes());
                out.extend_from_slice(&x.to_le_bytes());
            }
            WriteValue::Str(s) => {
                out.extend_from_slice(&8u32.to_le_bytes());
                string(&mut out, s);
            }
        }
    }
    let mut offsets = Vec::with_capacity(tensors.len());
    let mut offset = 0u64;
    for t in tensors {
        let ne: Vec<u64> = t.shape.iter().rev().copied().collect();
        let size = byte_size(&ne, t.ggml_type).map_err(|e| format!("tensor `{}`: {e}", t.name))?;
        if size != t.n_bytes {
            return Err(format!("tensor `{}`: {} bytes given, its shape {:?} as {} takes {size}", t.name, t.n_bytes, t.shape, t.ggml_type));
        }
        string(&mut out, t.name);
        out.extend_from_slice(&(ne.len() as u32).to_le_bytes());
        for d in &ne {
            out.extend_from_slice(&d.to_le_bytes());
        }
        out.extend_from_slice(&t.ggml_type.id.to_le_bytes());
        out.extend_from_slice(&offset.to_le_bytes());
        offsets.push(offset);
        offset = (offset + size).div_ceil(alignment) * alignment;
    }
    out.resize((out.len() as u64).div_ceil(alignment) as usize * alignment as usize, 0);
    Ok((out, offsets))
}

/// How a checkpoint names its tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyStyle {
    /// diffusers' module names (`transformer_blocks.0.attn.to_q.weight`).
    Diffusers,
    /// The original checkpoint's (BFL FLUX `double_blocks.N...`, SAI SD3 `joint_blocks.N...`),
    /// with or without a `model.diffusion_model.` prefix.
    Original,
}

/// The transformer families a GGUF file can hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    Flux,
    Sd3,
}

impl Family {
    pub fn as_str(self) -> &'static str {
        match self {
            Family::Flux => "flux",
            Family::Sd3 => "sd3",
        }
    }
}

/// The prefix an original checkpoint's keys may carry (city96's files have it stripped).
pub fn strip_prefix(name: &str) -> &str {
    name.strip_prefix("model.diffusion_model.").unwrap_or(name)
}

/// The family and key style the tensor names show, as diffusers' `infer_diffusers_model_type`
/// detects them (FLUX: `double_blocks.0.img_attn.norm.key_norm.scale`; SD3:
/// `joint_blocks.0.context_block.adaLN_modulation.1.bias`) or, for diffusers' names, by the
/// modules only one family has.
pub fn detect(names: &[&str]) -> Option<(Family, KeyStyle)> {
    let has = |k: &str| names.iter().any(|n| strip_prefix(n) == k);
    let starts = |p: &str| names.iter().any(|n| n.starts_with(p));
    if has("double_blocks.0.img_attn.norm.key_norm.scale") {
        Some((Family::Flux, KeyStyle::Original))
    } else if has("joint_blocks.0.context_block.adaLN_modulation.1.bias") || has("joint_blocks.0.x_block.attn.qkv.weight") {
        Some((Family::Sd3, KeyStyle::Original))
    } else if starts("single_transformer_blocks.") && starts("transformer_blocks.") {
        Some((Family::Flux, KeyStyle::Diffusers))
    } else if has("pos_embed.proj.weight") && starts("transformer_blocks.") {
        Some((Family::Sd3, KeyStyle::Diffusers))
    } else {
        None
    }
}

/// `runner inspect FILE.gguf`: what the file holds.
#[derive(Debug, Serialize)]
pub struct Report {
    pub path: PathBuf,
    pub format: &'static str,
    pub version: u32,
    pub alignment: u64,
    /// `general.architecture`, where the file says.
    pub architecture: Option<String>,
    /// The family its tensor names show.
    pub detected: Option<Family>,
    pub key_style: Option<KeyStyle>,
    pub tensors: usize,
    pub data_bytes: u64,
    pub file_bytes: u64,
    pub parameters: u64,
    /// Per type: tensors, elements and bytes, in type-id order.
    pub types: Vec<TypeCount>,
    /// The types diffusers (and runner) cannot load, if any.
    pub unsupported: Vec<GgmlType>,
    /// For a FLUX or SD3 transformer: its diffusers tensors (after converting original names, as
    /// diffusers' `from_single_file` does)...
    pub diffusers_tensors: Option<usize>,
    /// ... or why original names do not convert.
    pub conversion_error: Option<String>,
    pub metadata: BTreeMap<String, Value>,
}

#[derive(Debug, Serialize)]
pub struct TypeCount {
    #[serde(rename = "type")]
    pub ggml_type: GgmlType,
    pub tensors: usize,
    pub parameters: u64,
    pub bytes: u64,
}

pub fn inspect(path: &Path) -> Result<Report, CheckpointError> {
    let f = read(path)?;
    let mut types: BTreeMap<GgmlType, TypeCount> = BTreeMap::new();
    for t in &f.tensors {
        let c = types.entry(t.ggml_type).or_insert(TypeCount { ggml_type: t.ggml_type, tensors: 0, parameters: 0, bytes: 0 });
        c.tensors += 1;
        c.parameters += t.numel();
        c.bytes += t.n_bytes;
    }
    let names: Vec<&str> = f.tensors.iter().map(|t| t.name.as_str()).collect();
    let detected = detect(&names);
    let converted = detected.map(|(family, style)| match style {
        KeyStyle::Diffusers => Ok(f.tensors.len()),
        KeyStyle::Original => super::convert::to_diffusers(family, &f.tensors.iter().map(|t| (t.name.clone(), t.shape.clone())).collect()).map(|m| m.len()),
    });
    Ok(Report {
        diffusers_tensors: converted.as_ref().and_then(|c| c.as_ref().ok().copied()),
        conversion_error: converted.and_then(Result::err),
        path: f.path.clone(),
        format: "gguf",
        version: f.version,
        alignment: f.alignment,
        architecture: f.architecture().map(str::to_string),
        detected: detected.map(|d| d.0),
        key_style: detected.map(|d| d.1),
        tensors: f.tensors.len(),
        data_bytes: f.data_bytes(),
        file_bytes: f.file_len,
        parameters: f.tensors.iter().map(TensorInfo::numel).sum(),
        unsupported: types.keys().copied().filter(|t| !t.supported()).collect(),
        types: types.into_values().collect(),
        metadata: f.metadata,
    })
}

pub fn render_table(r: &Report) -> String {
    use std::fmt::Write;
    let gb = |b: u64| crate::units::ByteSize(b).to_string();
    let mut s = String::new();
    let _ = writeln!(s, "{} (GGUF v{}, alignment {})", r.path.display(), r.version, r.alignment);
    let arch = match (&r.architecture, r.detected, r.key_style) {
        (a, Some(d), Some(k)) => {
            format!("{} ({} key names{})", d.as_str(), if k == KeyStyle::Diffusers { "diffusers" } else { "original" }, a.as_ref().map(|a| format!("; general.architecture = {a}")).unwrap_or_default())
        }
        (Some(a), _, _) => format!("{a} (general.architecture; not a FLUX or SD3 transformer by its tensor names)"),
        (None, _, _) => "unknown (no general.architecture; not a FLUX or SD3 transformer by its tensor names)".into(),
    };
    let _ = writeln!(s, "architecture: {arch}");
    match (r.diffusers_tensors, &r.conversion_error, r.key_style) {
        (Some(n), _, Some(KeyStyle::Original)) => {
            let _ = writeln!(s, "diffusers names: {n} tensors after diffusers' conversion (q, k, v split along rows)");
        }
        (_, Some(e), _) => {
            let _ = writeln!(s, "diffusers names: cannot convert: {e}");
        }
        _ => {}
    }
    let _ = writeln!(s, "{} tensors, {} parameters, {} of data ({} file)\n", r.tensors, count(r.parameters), gb(r.data_bytes), gb(r.file_bytes));
    let _ = writeln!(s, "{:<8} {:>8} {:>16} {:>12}", "type", "tensors", "parameters", "bytes");
    for t in &r.types {
        let _ = writeln!(s, "{:<8} {:>8} {:>16} {:>12}{}", t.ggml_type.name(), t.tensors, t.parameters, gb(t.bytes), if t.ggml_type.supported() { "" } else { "  (not supported)" });
    }
    if !r.unsupported.is_empty() {
        let _ = writeln!(
            s,
            "\nnot loadable: types {} are not among diffusers' GGUF types ({})",
            r.unsupported.iter().map(|t| t.name()).collect::<Vec<_>>().join(", "),
            GgmlType::supported_names().join(", ")
        );
    }
    s
}

/// A parameter count for people: 11.9 B, 81.9 M, 29824.
pub fn count(n: u64) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.2} B", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.2} M", n as f64 / 1e6),
        n => n.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file of `tensors` (zero data) after `metadata`, as [`encode_header`] writes it.
    fn write(dir: &Path, name: &str, metadata: &[(&str, WriteValue)], tensors: &[(&str, &[u64], GgmlType)]) -> PathBuf {
        let ts: Vec<WriteTensor> = tensors
            .iter()
            .map(|(n, s, t)| {
                let ne: Vec<u64> = s.iter().rev().copied().collect();
                WriteTensor { name: n, shape: s, ggml_type: *t, n_bytes: byte_size(&ne, *t).unwrap() }
            })
            .collect();
        let (mut bytes, offsets) = encode_header(metadata, &ts, DEFAULT_ALIGNMENT).unwrap();
        let end = offsets.last().map(|o| o + ts.last().unwrap().n_bytes).unwrap_or(0);
        bytes.resize(bytes.len() + end as usize, 0);
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    fn err(p: &Path) -> String {
        read(p).err().unwrap_or_else(|| panic!("{} read", p.display())).to_string()
    }

    #[test]
    fn reads_what_it_writes() {
        let d = tempfile::tempdir().unwrap();
        let p = write(
            d.path(),
            "a.gguf",
            &[("general.architecture", WriteValue::Str("flux".into())), ("general.quantization_version", WriteValue::U32(2))],
            &[("img_in.weight", &[64, 64], GgmlType::Q8_0), ("img_in.bias", &[64], GgmlType::F32), ("x", &[4, 512], GgmlType::Q4_K), ("y", &[3, 32], GgmlType::BF16)],
        );
        let f = read(&p).unwrap();
        assert_eq!((f.version, f.alignment, f.architecture()), (3, 32, Some("flux")));
        assert_eq!(f.metadata["general.quantization_version"], Value::Uint(2));
        let t = f.tensor("img_in.weight").unwrap();
        assert_eq!((t.shape.clone(), t.ggml_type, t.n_bytes, t.byte_shape()), (vec![64, 64], GgmlType::Q8_0, 64 * 2 * 34, vec![64, 68]));
        assert_eq!(f.data_start % 32, 0);
        assert_eq!(t.start, f.data_start);
        assert_eq!(f.tensor("x").unwrap().n_bytes, 4 * 2 * 144);
        assert_eq!(f.tensor("y").unwrap().byte_shape(), vec![3, 64]);
        assert!(f.tensors.windows(2).all(|w| w[1].start >= w[0].start + w[0].n_bytes && w[1].start % 32 == 0));
        f.check_supported().unwrap();
        assert_eq!(detect(&["double_blocks.0.img_attn.norm.key_norm.scale"]), Some((Family::Flux, KeyStyle::Original)));
        assert_eq!(detect(&["model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"]), Some((Family::Sd3, KeyStyle::Original)));
        assert_eq!(detect(&["transformer_blocks.0.attn.to_q.weight", "single_transformer_blocks.0.proj_out.weight"]), Some((Family::Flux, KeyStyle::Diffusers)));
        assert_eq!(detect(&["transformer_blocks.0.attn.to_q.weight", "pos_embed.proj.weight"]), Some((Family::Sd3, KeyStyle::Diffusers)));
        assert_eq!(detect(&["unet.conv_in.weight"]), None);
        // An original-named FLUX file missing most of itself: inspect says what does not convert.
        let p = write(d.path(), "part.gguf", &[], &[("double_blocks.0.img_attn.norm.key_norm.scale", &[128], GgmlType::F32)]);
        let r = inspect(&p).unwrap();
        assert_eq!((r.detected, r.key_style, r.diffusers_tensors), (Some(Family::Flux), Some(KeyStyle::Original), None));
        assert!(r.conversion_error.as_deref().is_some_and(|e| e.contains("tensor `time_in.in_layer.weight` is missing")), "{r:?}");
        assert!(render_table(&r).contains("diffusers names: cannot convert: tensor `time_in.in_layer.weight` is missing"));
    }

    #[test]
    fn bad_files_are_named_errors() {
        let d = tempfile::tempdir().unwrap();
        let good = write(d.path(), "good.gguf", &[("general.architecture", WriteValue::Str("sd3".into()))], &[("a", &[2, 32], GgmlType::Q8_0), ("b", &[8], GgmlType::F32)]);
        let bytes = std::fs::read(&good).unwrap();
        let variant = |name: &str, f: &dyn Fn(&mut Vec<u8>)| {
            let mut b = bytes.clone();
            f(&mut b);
            let p = d.path().join(name);
            std::fs::write(&p, b).unwrap();
            p
        };
        let e = err(&variant("magic.gguf", &|b| b[..4].copy_from_slice(b"GGML")));
        assert!(e.contains("magic.gguf") && e.contains("not a GGUF file"), "{e}");
        let e = err(&variant("v1.gguf", &|b| b[4..8].copy_from_slice(&1u32.to_le_bytes())));
        assert!(e.contains("version 1 is not supported"), "{e}");
        let e = err(&variant("short.gguf", &|b| b.truncate(10)));
        assert!(e.contains("truncated"), "{e}");
        let e = err(&variant("count.gguf", &|b| b[8..16].copy_from_slice(&u64::MAX.to_le_bytes())));
        assert!(e.contains("tensor infos cannot fit"), "{e}");
        let e = err(&variant("kvs.gguf", &|b| b[16..24].copy_from_slice(&(1u64 << 40).to_le_bytes())));
        assert!(e.contains("metadata entries cannot fit"), "{e}");
        // The first key's length.
        let e = err(&variant("strlen.gguf", &|b| b[24..32].copy_from_slice(&(1u64 << 50).to_le_bytes())));
        assert!(e.contains("longer than the"), "{e}");
        let big = variant("bigstr.gguf", &|b| b[24..32].copy_from_slice(&(100u64 << 20).to_le_bytes()));
        std::fs::OpenOptions::new().write(true).open(&big).unwrap().set_len(200 << 20).unwrap(); // sparse
        assert!(err(&big).contains("more than 67108864"), "{}", err(&big));
        let e = err(&variant("data.gguf", &|b| b.truncate(b.len() - 10)));
        assert!(e.contains("tensor `b`") && e.contains("beyond the end of the file"), "{e}");

        let e = err(&write(d.path(), "dup.gguf", &[], &[("a", &[32], GgmlType::F32), ("a", &[32], GgmlType::F32)]));
        assert!(e.contains("tensor `a`: appears twice"), "{e}");
        let e = err(&write(d.path(), "dims.gguf", &[], &[("a", &[1, 1, 1, 1, 32], GgmlType::F32)]));
        assert!(e.contains("5 dimensions"), "{e}");
        // Rows not whole blocks: written by hand (encode_header refuses them).
        let mut b = bytes.clone();
        let at = b.windows(1 + 8 + 4 + 8).position(|w| w[..1] == *b"a" && w[1..5] == 2u32.to_le_bytes()).unwrap() + 5;
        b[at..at + 8].copy_from_slice(&40u64.to_le_bytes());
        std::fs::write(d.path().join("blocks.gguf"), &b).unwrap();
        let e = err(&d.path().join("blocks.gguf"));
        assert!(e.contains("tensor `a`") && e.contains("not a whole number of Q8_0 blocks"), "{e}");
        let mut b = bytes.clone();
        let ty = at + 16;
        b[ty..ty + 4].copy_from_slice(&99u32.to_le_bytes());
        std::fs::write(d.path().join("type.gguf"), &b).unwrap();
        let e = err(&d.path().join("type.gguf"));
        assert!(e.contains("tensor `a`: unknown GGML type id 99"), "{e}");
        // Overlap: b's offset moved onto a's data.
        let mut b = bytes.clone();
        let at_b = b.windows(1 + 8 + 4).position(|w| w[..1] == *b"b" && w[1..5] == 1u32.to_le_bytes()).unwrap() + 5 + 8 + 4;
        b[at_b..at_b + 8].copy_from_slice(&32u64.to_le_bytes());
        std::fs::write(d.path().join("overlap.gguf"), &b).unwrap();
        let e = err(&d.path().join("overlap.gguf"));
        assert!(e.contains("overlaps tensor `a`"), "{e}");
        let e = err(&write(d.path(), "align.gguf", &[("general.alignment", WriteValue::U32(24))], &[]));
        assert!(e.contains("power of two"), "{e}");

        let q = write(d.path(), "iq2.gguf", &[], &[("w", &[2, 256], GgmlType::from_name("IQ2_XXS").unwrap()), ("v", &[2, 256], GgmlType::Q4_K)]);
        let e = read(&q).unwrap().check_supported().unwrap_err().to_string();
        assert!(e.contains("iq2.gguf") && e.contains("tensor `w`: type IQ2_XXS is not supported") && e.contains("Q4_K, Q5_K"), "{e}");
        assert!(err(d.path()).contains("not a regular file"));
    }
}
