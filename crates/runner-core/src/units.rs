//! Byte sizes written by people: `"1.5GB"`, `"512MiB"`, `17179869184`.
//!
//! One grammar covers what accelerate (`convert_file_size_to_int`) and huggingface_hub
//! (`parse_size_to_int`) accept, minus the one spelling on which they disagree:
//!
//! ```text
//! size   := number [spaces] [unit]          a bare number is bytes
//! number := digits ["." digits]             no sign, no exponent
//! unit   := "B"
//!         | ("K"|"M"|"G"|"T") "B"          decimal: 10^3, 10^6, 10^9, 10^12
//!         | ("K"|"M"|"G"|"T") "iB"         binary:  2^10, 2^20, 2^30, 2^40
//! ```
//! The prefix letter and the `i` may be any case; the final `B` must be a capital: accelerate
//! reads a lowercase `b` as bits (`"5Gb"` = 625,000,000 bytes) while huggingface_hub reads it as
//! bytes, so `"5Gb"` is refused rather than guessed. Fractions are floored to whole bytes, as
//! accelerate's `int(float(...) * unit)` does.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A number of bytes parsed from a size string or an integer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ByteSize(pub u64);

/// The regular expression the JSON schema uses for size strings; [`ByteSize::from_str`] is the
/// authority and gives the precise message when a string does not match.
pub const SIZE_PATTERN: &str = r"^[0-9]+(\.[0-9]+)?( ?([kKmMgGtT][iI]?)?B)?$";

/// Why a size string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    #[error("empty size: write a number of bytes or a number with a unit, e.g. `5GB` or `512MiB`")]
    Empty,
    #[error("negative size `{0}`: sizes are counts of bytes")]
    Negative(String),
    #[error("`{0}` does not start with a number: write e.g. `5GB`, `1.5GiB` or `512MiB`")]
    NotANumber(String),
    #[error("unknown unit `{unit}` in `{input}`: expected one of B, KB, MB, GB, TB, KiB, MiB, GiB, TiB")]
    UnknownUnit { input: String, unit: String },
    #[error(
        "ambiguous unit `{unit}` in `{input}`: a lowercase `b` means bits to accelerate and bytes to \
         huggingface_hub; write `{suggest}` for bytes"
    )]
    LowercaseB { input: String, unit: String, suggest: String },
    #[error("size `{0}` is too large (the limit is 2^64 - 1 bytes)")]
    Overflow(String),
}

impl FromStr for ByteSize {
    type Err = SizeError;

    fn from_str(input: &str) -> Result<Self, SizeError> {
        let s = input.trim();
        if s.is_empty() {
            return Err(SizeError::Empty);
        }
        if s.starts_with('-') {
            return Err(SizeError::Negative(input.to_string()));
        }
        let num_end = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
        let (num, unit) = (&s[..num_end], s[num_end..].trim_start());
        let (int_part, frac_part) = match num.split_once('.') {
            Some((i, f)) => (i, f),
            None => (num, ""),
        };
        let digits_ok = |d: &str| d.chars().all(|c| c.is_ascii_digit());
        if int_part.is_empty() || !digits_ok(int_part) || !digits_ok(frac_part) || (num.contains('.') && frac_part.is_empty()) {
            return Err(SizeError::NotANumber(input.to_string()));
        }
        let multiplier = unit_multiplier(input, unit)?;

        // Exact decimal arithmetic: value = (int . frac) * multiplier, floored.
        let overflow = || SizeError::Overflow(input.to_string());
        let frac_digits = frac_part.len().min(30) as u32;
        let scale = 10u128.checked_pow(frac_digits).ok_or_else(overflow)?;
        let int: u128 = int_part.parse().map_err(|_| overflow())?;
        let frac: u128 = if frac_digits == 0 { 0 } else { frac_part[..frac_digits as usize].parse().map_err(|_| overflow())? };
        let mantissa = int.checked_mul(scale).and_then(|v| v.checked_add(frac)).ok_or_else(overflow)?;
        let bytes = mantissa.checked_mul(multiplier as u128).ok_or_else(overflow)? / scale;
        u64::try_from(bytes).map(ByteSize).map_err(|_| overflow())
    }
}

fn unit_multiplier(input: &str, unit: &str) -> Result<u64, SizeError> {
    if unit.is_empty() {
        return Ok(1);
    }
    let bad = || SizeError::UnknownUnit { input: input.to_string(), unit: unit.to_string() };
    let mut chars: Vec<char> = unit.chars().collect();
    let last = chars.pop().ok_or_else(bad)?;
    if last != 'B' && last != 'b' {
        return Err(bad());
    }
    let (prefix, binary) = match chars.as_slice() {
        [] => (None, false),
        [p] => (Some(*p), false),
        [p, 'i' | 'I'] => (Some(*p), true),
        _ => return Err(bad()),
    };
    let power = match prefix.map(|p| p.to_ascii_uppercase()) {
        None => 0,
        Some('K') => 1,
        Some('M') => 2,
        Some('G') => 3,
        Some('T') => 4,
        Some(_) => return Err(bad()),
    };
    if last == 'b' {
        let suggest = format!("{}{}B", prefix.map(|p| p.to_ascii_uppercase().to_string()).unwrap_or_default(), if binary { "i" } else { "" });
        let number = input.trim().trim_end_matches(unit).trim_end();
        return Err(SizeError::LowercaseB { input: input.to_string(), unit: unit.to_string(), suggest: format!("{number}{suggest}") });
    }
    Ok(if binary { 1u64 << (10 * power) } else { 1000u64.pow(power) })
}

impl ByteSize {
    pub fn bytes(self) -> u64 {
        self.0
    }

    /// Decimal units with up to two decimals (`5.13 GB`), the way model cards state sizes.
    pub fn display_decimal(self) -> String {
        const UNITS: [(&str, u64); 4] = [("TB", 1_000_000_000_000), ("GB", 1_000_000_000), ("MB", 1_000_000), ("KB", 1_000)];
        for (name, scale) in UNITS {
            if self.0 >= scale {
                return format!("{} {name}", trim_decimals(self.0 as f64 / scale as f64));
            }
        }
        format!("{} B", self.0)
    }
}

impl ByteSize {
    /// A size string for a manifest that is at least this many bytes: decimal units, rounded up
    /// at two decimals, no space (`"10.85GB"`), so that a suggested budget always suffices.
    pub fn manifest_at_least(self) -> String {
        const UNITS: [(&str, u64); 4] = [("TB", 1_000_000_000_000), ("GB", 1_000_000_000), ("MB", 1_000_000), ("KB", 1_000)];
        for (name, scale) in UNITS {
            if self.0 >= scale {
                let hundredths = (self.0 as u128 * 100).div_ceil(scale as u128);
                return format!("{}{name}", trim_decimals(hundredths as f64 / 100.0));
            }
        }
        format!("{}", self.0)
    }
}

fn trim_decimals(v: f64) -> String {
    let s = format!("{v:.2}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.display_decimal())
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a size such as \"5GB\", \"512MiB\" or a number of bytes")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v).map(ByteSize).map_err(|_| E::custom(SizeError::Negative(v.to_string())))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<ByteSize, E> {
                v.parse().map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.0)
    }
}

impl schemars::JsonSchema for ByteSize {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "ByteSize".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "A size: a number of bytes, or a string with a unit. Decimal units KB, MB, GB, TB are powers of 1000; binary units KiB, MiB, GiB, TiB powers of 1024; decimals allowed (\"1.5GB\"), floored to whole bytes. The final B must be a capital (a lowercase b means bits to accelerate and bytes to huggingface_hub, so it is refused).",
            "type": ["string", "integer"],
            "pattern": SIZE_PATTERN,
            "minimum": 0,
            "examples": ["24GiB", "1.5GB", "512MiB"]
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggested_sizes_round_up_and_parse() {
        for b in [1u64, 999, 1_000, 1_234_567, 10_844_000_001, 10_840_000_000, 5_134_927_368, u64::MAX / 1000] {
            let s = ByteSize(b).manifest_at_least();
            let back: ByteSize = s.parse().unwrap();
            assert!(back.0 >= b && back.0 - b <= b / 100 + 1, "{b} -> {s} -> {}", back.0);
        }
        assert_eq!(ByteSize(10_844_000_001).manifest_at_least(), "10.85GB");
        assert_eq!(ByteSize(10_840_000_000).manifest_at_least(), "10.84GB");
    }

    fn p(s: &str) -> Result<u64, SizeError> {
        s.parse::<ByteSize>().map(|b| b.0)
    }

    #[test]
    fn units_follow_accelerate_and_hub() {
        assert_eq!(p("5GB"), Ok(5_000_000_000));
        assert_eq!(p("5GiB"), Ok(5 << 30));
        assert_eq!(p("512MiB"), Ok(512 << 20));
        assert_eq!(p("1.5GB"), Ok(1_500_000_000));
        assert_eq!(p("1.5 GiB"), Ok(1_610_612_736));
        assert_eq!(p("10KB"), Ok(10_000));
        assert!(p("kB").is_err());
        assert_eq!(p("3kB"), Ok(3_000));
        assert_eq!(p("2TB"), Ok(2_000_000_000_000));
        assert_eq!(p("1TiB"), Ok(1 << 40));
        assert_eq!(p("100"), Ok(100));
        assert_eq!(p("100B"), Ok(100));
        assert_eq!(p("0"), Ok(0));
        // floors like accelerate's int(float * unit)
        assert_eq!(p("0.1KiB"), Ok(102));
        assert_eq!(p("1.3GiB"), Ok(1_395_864_371));
    }

    #[test]
    fn refuses_bad_sizes() {
        assert!(matches!(p("5XB"), Err(SizeError::UnknownUnit { .. })));
        assert!(matches!(p("-1GB"), Err(SizeError::Negative(_))));
        assert!(matches!(p("GB"), Err(SizeError::NotANumber(_))));
        assert!(matches!(p("1.GB"), Err(SizeError::NotANumber(_))));
        assert!(matches!(p("1e9"), Err(SizeError::UnknownUnit { .. })));
        assert!(matches!(p(""), Err(SizeError::Empty)));
        assert!(matches!(p("20000000TB"), Err(SizeError::Overflow(_))));
        assert!(matches!(p("99999999999999999999999999999999999999999"), Err(SizeError::Overflow(_))));
        let e = p("5Gb").unwrap_err();
        assert_eq!(e.to_string(), "ambiguous unit `Gb` in `5Gb`: a lowercase `b` means bits to accelerate and bytes to huggingface_hub; write `5GB` for bytes");
    }

    #[test]
    fn pattern_agrees_with_parser_on_shape() {
        let re = regex_lite(SIZE_PATTERN);
        for ok in ["5GB", "1.5GiB", "512 MiB", "100", "3kB", "7B"] {
            assert!(re(ok), "{ok}");
        }
        for bad in ["5XB", "-1GB", "1e9", "GB", "5G", "5Gi", "5Gb", "1.GB"] {
            assert!(!re(bad), "{bad}");
        }
    }

    proptest::proptest! {
        /// Every size the schema accepts, runner accepts (a schema-valid manifest never fails on
        /// a size at run time).
        #[test]
        fn what_the_schema_accepts_parses(s in "[0-9]{1,4}(\\.[0-9]{0,2})? ?[kKmMgGtTxX]?[iI]?[bB]?") {
            let re = regex_lite(SIZE_PATTERN);
            if re(&s) {
                proptest::prop_assert!(s.parse::<ByteSize>().is_ok(), "{:?} passes the schema but not the parser", s);
            }
        }
    }

    // The schema's pattern is checked through the same engine the validator uses.
    fn regex_lite(pattern: &str) -> impl Fn(&str) -> bool {
        let schema = serde_json::json!({"type": "string", "pattern": pattern});
        let v = jsonschema::validator_for(&schema).unwrap();
        move |s| v.is_valid(&serde_json::json!(s))
    }

    #[test]
    fn display() {
        assert_eq!(ByteSize(5_134_927_368).to_string(), "5.13 GB");
        assert_eq!(ByteSize(1_000_000).to_string(), "1 MB");
        assert_eq!(ByteSize(12).to_string(), "12 B");
    }
}
