//! Device names as manifests write them: `cpu`, `cuda:N`; also `cuda` (= `cuda:0`) and a bare
//! GPU index `N`, as accelerate's `max_memory = {0: "10GiB"}` spells it.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A device runner can place weights on. Ordered GPUs first, then CPU, as accelerate visits them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Device {
    Cuda(u32),
    Cpu,
}

pub const DEVICE_PATTERN: &str = r"^(cpu|cuda(:[0-9]+)?|[0-9]+)$";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    #[error("unknown device `{0}`: expected `cpu` or `cuda:N` (e.g. `cuda:0`)")]
    Unknown(String),
    #[error("device `{name}` is not supported by runner: use `cpu` or `cuda:N`")]
    Unsupported { name: String },
    #[error("bad GPU index in `{0}`: expected `cuda:N` with N a small non-negative integer")]
    BadIndex(String),
}

impl FromStr for Device {
    type Err = DeviceError;
    fn from_str(input: &str) -> Result<Self, DeviceError> {
        let s = input.trim();
        let lower = s.to_ascii_lowercase();
        let index = |n: &str| n.parse::<u32>().ok().filter(|&i| i < 1024).ok_or_else(|| DeviceError::BadIndex(input.to_string()));
        match lower.as_str() {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            "mps" | "disk" | "meta" | "xpu" | "npu" | "mlu" | "hpu" | "tpu" => Err(DeviceError::Unsupported { name: s.to_string() }),
            _ => {
                if let Some(n) = lower.strip_prefix("cuda:") {
                    index(n).map(Device::Cuda)
                } else if !lower.is_empty() && lower.bytes().all(|b| b.is_ascii_digit()) {
                    index(&lower).map(Device::Cuda)
                } else {
                    Err(DeviceError::Unknown(input.to_string()))
                }
            }
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

impl<'de> Deserialize<'de> for Device {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Device;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a device such as \"cpu\" or \"cuda:0\"")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Device, E> {
                v.to_string().parse().map_err(E::custom)
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Device, E> {
                v.to_string().parse().map_err(E::custom)
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Device, E> {
                v.parse().map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

impl Serialize for Device {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl schemars::JsonSchema for Device {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Device".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "A device: \"cpu\" or \"cuda:N\" (\"cuda\" means cuda:0; a bare integer N means cuda:N, as in accelerate's max_memory).",
            "type": ["string", "integer"],
            "pattern": DEVICE_PATTERN,
            "minimum": 0,
            "examples": ["cuda:0", "cpu"]
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_accelerate_spellings() {
        assert_eq!("cpu".parse(), Ok(Device::Cpu));
        assert_eq!("cuda:1".parse(), Ok(Device::Cuda(1)));
        assert_eq!("CUDA:1".parse(), Ok(Device::Cuda(1)));
        assert_eq!("cuda".parse(), Ok(Device::Cuda(0)));
        assert_eq!("2".parse(), Ok(Device::Cuda(2)));
        assert!(matches!("mps".parse::<Device>(), Err(DeviceError::Unsupported { .. })));
        assert!(matches!("cuda:x".parse::<Device>(), Err(DeviceError::BadIndex(_))));
        assert!(matches!("cuda:99999999999".parse::<Device>(), Err(DeviceError::BadIndex(_))));
        assert!(matches!("gpu0".parse::<Device>(), Err(DeviceError::Unknown(_))));
        assert_eq!(Device::Cuda(3).to_string(), "cuda:3");
        assert!(Device::Cuda(7) < Device::Cpu);
    }
}
