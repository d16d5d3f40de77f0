//! The manifest's JSON schema: generated from the serde types, committed as
//! `schemas/manifest.schema.json` (a drift test keeps the two equal), and used to validate
//! manifests with messages that name the key and where its value came from.

use serde_json::Value as J;

use super::{join_key, Provenance, Want};
use crate::device::{Device, DEVICE_PATTERN};
use crate::diag::{did_you_mean, Diagnostic};
use crate::units::{ByteSize, SIZE_PATTERN};

/// The committed schema file, which validation uses.
pub const COMMITTED_SCHEMA: &str = include_str!("../../../../schemas/manifest.schema.json");

const SCHEMA_ID: &str = "https://github.com/runner-rs/runner/schemas/manifest.schema.json";

/// Generates the schema from the serde types (what `schemas/manifest.schema.json` must equal).
pub fn generate_schema() -> J {
    let settings = schemars::generate::SchemaSettings::draft2020_12();
    let schema = settings.into_generator().into_root_schema_for::<super::Manifest>();
    let mut v = serde_json::to_value(schema).expect("schema serializes");
    strip_null(&mut v);
    if let Some(o) = v.as_object_mut() {
        o.insert("$id".into(), J::String(SCHEMA_ID.into()));
    }
    v
}

/// The generated schema as the text committed to `schemas/` (pretty, trailing newline).
pub fn schema_json() -> String {
    serde_json::to_string_pretty(&generate_schema()).expect("schema serializes") + "\n"
}

/// TOML has no null: an `Option` field is simply absent. Drop schemars' null alternatives so
/// that validation errors are about the real type.
fn strip_null(v: &mut J) {
    match v {
        J::Object(o) => {
            if let Some(J::Array(types)) = o.get_mut("type") {
                types.retain(|t| t != "null");
                if types.len() == 1 {
                    let t = types.remove(0);
                    o.insert("type".into(), t);
                }
            }
            if o.get("default") == Some(&J::Null) {
                o.remove("default");
            }
            for key in ["anyOf", "oneOf"] {
                if let Some(J::Array(alts)) = o.get_mut(key) {
                    alts.retain(|a| a.get("type") != Some(&J::String("null".into())));
                    if alts.len() == 1 {
                        let only = alts.remove(0);
                        o.remove(key);
                        if let J::Object(inner) = only {
                            for (k, val) in inner {
                                o.entry(k).or_insert(val);
                            }
                        }
                    }
                }
            }
            for child in o.values_mut() {
                strip_null(child);
            }
        }
        J::Array(a) => a.iter_mut().for_each(strip_null),
        _ => {}
    }
}

fn validator() -> &'static jsonschema::Validator {
    static V: std::sync::OnceLock<jsonschema::Validator> = std::sync::OnceLock::new();
    V.get_or_init(|| {
        let schema: J = serde_json::from_str(COMMITTED_SCHEMA).expect("committed schema is JSON");
        // The committed schema says draft 2020-12 (schemars writes it so), but uses only keywords
        // that draft 7 reads the same way (`reads_the_same_as_draft_7` below): compiled as draft 7
        // it builds in a few milliseconds, where 2020-12 first compiles its own meta-schema and
        // its dynamic references, about 35 ms of every `runner validate`. tests/schema.rs checks
        // the file against the 2020-12 meta-schema.
        jsonschema::options().with_draft(jsonschema::Draft::Draft7).build(&schema).expect("committed schema is a valid JSON schema")
    })
}

fn schema_root() -> &'static J {
    static S: std::sync::OnceLock<J> = std::sync::OnceLock::new();
    S.get_or_init(|| serde_json::from_str(COMMITTED_SCHEMA).expect("committed schema is JSON"))
}

/// The schema node describing the instance at `path` (following `$ref`s).
fn schema_at<'a>(root: &'a J, path: &[String]) -> Option<&'a J> {
    let deref = |mut node: &'a J| {
        while let Some(r) = node.get("$ref").and_then(J::as_str) {
            let name = r.strip_prefix("#/$defs/")?;
            node = root.get("$defs")?.get(name)?;
        }
        Some(node)
    };
    let mut node = deref(root)?;
    for seg in path {
        let next = node
            .get("properties")
            .and_then(|p| p.get(seg))
            .or_else(|| node.get("additionalProperties").filter(|a| a.is_object()))
            .or_else(|| node.get("items").filter(|_| seg.parse::<usize>().is_ok()))
            .or_else(|| node.get("prefixItems").and_then(|p| p.get(seg.parse::<usize>().ok()?)))?;
        node = deref(next)?;
    }
    Some(node)
}

fn pointer_to_path(pointer: &str) -> Vec<String> {
    pointer.split('/').skip(1).map(|s| s.replace("~1", "/").replace("~0", "~")).collect()
}

fn describe(v: &J) -> String {
    match v {
        J::String(s) => format!("{s:?}"),
        J::Number(n) if n.is_f64() => format!("the float {n}"),
        J::Number(n) => format!("the integer {n}"),
        J::Bool(b) => format!("the boolean {b}"),
        J::Array(_) => "an array".into(),
        J::Object(_) => "a table".into(),
        J::Null => "nothing".into(),
    }
}

fn type_name(t: &str) -> &str {
    match t {
        "object" => "a table",
        "array" => "an array",
        "string" => "a string",
        "integer" => "an integer",
        "number" => "a number",
        "boolean" => "a boolean (true or false)",
        other => other,
    }
}

/// Common spellings of dtype and scheduler names that are not runner's.
fn alias_hint(given: &str) -> Option<&'static str> {
    Some(match given.to_ascii_lowercase().replace(['_', ' '], "-").as_str() {
        "float16" | "half" | "torch.float16" | "f16" => "fp16",
        "float32" | "float" | "torch.float32" | "f32" | "full" => "fp32",
        "bfloat16" | "torch.bfloat16" => "bf16",
        "sdxl" | "stable-diffusion-xl-base" | "stablediffusionxlpipeline" => "stable-diffusion-xl",
        "sd" | "sd15" | "sd1.5" | "stablediffusionpipeline" => "stable-diffusion",
        "euler-a" | "eulerancestraldiscretescheduler" => "euler-ancestral",
        "eulerdiscretescheduler" => "euler",
        "dpm++2m" | "dpm++-2m" | "dpmsolvermultistepscheduler" => "dpmpp-2m",
        "dpm++2m-karras" | "dpm++-2m-karras" => "dpmpp-2m-karras",
        "ddimscheduler" => "ddim",
        "pndmscheduler" => "pndm",
        "lmsdiscretescheduler" => "lms",
        "flowmatcheulerdiscretescheduler" | "flow-match" | "flowmatch-euler" => "flow-match-euler",
        _ => return None,
    })
}

/// Validates the merged manifest (as JSON) against the committed schema.
pub(super) fn validate(json: &J, prov: &Provenance) -> Vec<Diagnostic> {
    let root = schema_root();
    let mut out = vec![];
    // A value of the wrong type also fails its enum/pattern/range keywords: report the type only.
    let errors: Vec<_> = validator().iter_errors(json).collect();
    let wrong_type: std::collections::HashSet<&str> = errors.iter().filter(|e| matches!(e.kind, jsonschema::error::ValidationErrorKind::Type { .. })).map(|e| e.instance_path.as_str()).collect();
    for err in &errors {
        if wrong_type.contains(err.instance_path.as_str()) && !matches!(err.kind, jsonschema::error::ValidationErrorKind::Type { .. }) {
            continue;
        }
        let path = pointer_to_path(err.instance_path.as_str());
        let key = join_key(&path);
        let node = schema_at(root, &path);
        let here = |want| prov.locate(&path, want);
        use jsonschema::error::ValidationErrorKind as K;
        let d = match &err.kind {
            K::AdditionalProperties { unexpected } => {
                for name in unexpected {
                    let mut sub = path.clone();
                    sub.push(name.clone());
                    let allowed: Vec<&str> = node.and_then(|n| n.get("properties")).and_then(J::as_object).map(|p| p.keys().map(String::as_str).collect()).unwrap_or_default();
                    let table = if path.is_empty() { "at the top level".to_string() } else { format!("in `[{key}]`") };
                    let mut d = Diagnostic::error(format!("unknown key `{name}` {table}"), prov.locate(&sub, Want::Key)).with_key(join_key(&sub)).with_label("unknown key");
                    if let Some(s) = did_you_mean(name, allowed.iter().copied()) {
                        d = d.with_note(format!("did you mean `{s}`?"));
                    }
                    d = d.with_note(format!("expected one of: {}", allowed.iter().map(|k| format!("`{k}`")).collect::<Vec<_>>().join(", ")));
                    out.push(d);
                }
                continue;
            }
            K::Required { property } => {
                let name = property.as_str().unwrap_or_default();
                let table = if path.is_empty() { "the manifest".to_string() } else { format!("`[{key}]`") };
                let full = join_key(&[path.clone(), vec![name.to_string()]].concat());
                let mut d = Diagnostic::error(format!("missing required key `{full}` in {table}"), here(Want::Key)).with_key(full).with_label(format!("`{name}` is required"));
                if let Some(desc) = node.and_then(|n| n.get("properties")?.get(name)?.get("description")?.as_str()) {
                    d = d.with_note(format!("`{name}`: {desc}"));
                }
                d
            }
            K::Type { kind } => {
                let expected = match kind {
                    jsonschema::error::TypeKind::Single(t) => type_name(&t.to_string()).to_string(),
                    jsonschema::error::TypeKind::Multiple(ts) => ts.iter().map(|t| type_name(&t.to_string()).to_string()).collect::<Vec<_>>().join(" or "),
                };
                Diagnostic::error(format!("`{key}` must be {expected}, found {}", describe(&err.instance)), here(Want::Value)).with_key(key.clone()).with_label(format!("expected {expected}"))
            }
            K::Enum { options } => {
                let opts: Vec<&str> = options.as_array().map(|a| a.iter().filter_map(J::as_str).collect()).unwrap_or_default();
                let given = err.instance.as_str().unwrap_or_default();
                let mut d = Diagnostic::error(format!("invalid value {} for `{key}`", describe(&err.instance)), here(Want::Value))
                    .with_key(key.clone())
                    .with_label(format!("expected one of {}", opts.iter().map(|o| format!("`{o}`")).collect::<Vec<_>>().join(", ")));
                if let Some(s) = alias_hint(given).filter(|s| opts.contains(s)).or_else(|| did_you_mean(given, opts.iter().copied())) {
                    d = d.with_note(format!("did you mean `{s}`?"));
                }
                d
            }
            K::Minimum { limit } | K::ExclusiveMinimum { limit } => {
                let what = if matches!(err.kind, K::Minimum { .. }) { "at least" } else { "more than" };
                Diagnostic::error(format!("`{key}` must be {what} {limit}, found {}", err.instance), here(Want::Value)).with_key(key.clone()).with_label(format!("must be {what} {limit}"))
            }
            K::Maximum { limit } | K::ExclusiveMaximum { limit } => {
                let what = if matches!(err.kind, K::Maximum { .. }) { "at most" } else { "less than" };
                Diagnostic::error(format!("`{key}` must be {what} {limit}, found {}", err.instance), here(Want::Value))
                    .with_key(key.clone())
                    .with_label(format!("must be {what} {limit}"))
                    .with_note(if key == "schema_version" { "this runner reads manifests of schema_version 1".to_string() } else { format!("{limit} is the largest value runner accepts for `{key}`") })
            }
            K::MultipleOf { multiple_of } => {
                let mut d = Diagnostic::error(format!("`{key}` must be a multiple of {multiple_of}, found {}", err.instance), here(Want::Value))
                    .with_key(key.clone())
                    .with_label(format!("not a multiple of {multiple_of}"));
                if let Some(n) = err.instance.as_f64() {
                    let m = *multiple_of;
                    let lower = (n / m).floor() * m;
                    d = d.with_note(format!("the VAE works on 8x8 pixel cells: try {} or {}", lower.max(m), lower + m));
                }
                d
            }
            K::MinLength { .. } => Diagnostic::error(format!("`{key}` must not be empty"), here(Want::Value)).with_key(key.clone()).with_label("empty"),
            K::MaxLength { limit } => Diagnostic::error(format!("`{key}` is longer than {limit} characters"), here(Want::Value)).with_key(key.clone()),
            K::MinItems { limit } | K::MaxItems { limit } => {
                let n = err.instance.as_array().map_or(0, Vec::len);
                Diagnostic::error(format!("`{key}` must have {limit} items, found {n}"), here(Want::Value)).with_key(key.clone()).with_label(format!("expected {limit} items"))
            }
            K::Pattern { pattern } => pattern_diagnostic(pattern, &err.instance, &key, here(Want::Value)),
            K::PropertyNames { error } => {
                // A bad key in a map, e.g. a device name in `placement.max_memory`.
                let name = error.instance.as_str().unwrap_or_default().to_string();
                let mut sub = path.clone();
                sub.push(name.clone());
                match &error.kind {
                    K::Pattern { pattern } => pattern_diagnostic(pattern, &error.instance, &join_key(&sub), prov.locate(&sub, Want::Key)),
                    _ => Diagnostic::error(format!("invalid key `{name}` in `[{key}]`: {error}"), prov.locate(&sub, Want::Key)).with_key(join_key(&sub)),
                }
            }
            _ => Diagnostic::error(format!("invalid value for `{key}`: {err}"), here(Want::Value)).with_key(key.clone()),
        };
        out.push(d);
    }
    out
}

/// Explains a pattern mismatch with the parser that owns the pattern's grammar.
fn pattern_diagnostic(pattern: &str, instance: &J, key: &str, loc: crate::diag::Location) -> Diagnostic {
    let s = instance.as_str().unwrap_or_default();
    let (msg, label) = if pattern == SIZE_PATTERN {
        match s.parse::<ByteSize>() {
            Err(e) => (format!("invalid size for `{key}`: {e}"), "not a size".to_string()),
            Ok(_) => (format!("invalid size {s:?} for `{key}`"), "not a size".to_string()),
        }
    } else if pattern == DEVICE_PATTERN {
        match s.parse::<Device>() {
            Err(e) => (format!("invalid device for `{key}`: {e}"), "not a device".to_string()),
            Ok(_) => (format!("invalid device {s:?} for `{key}`"), "not a device".to_string()),
        }
    } else {
        (format!("invalid value {s:?} for `{key}`: use only letters, digits, `_` and `-`"), format!("does not match {pattern}"))
    };
    Diagnostic::error(msg, loc).with_key(key.to_string()).with_label(label)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every keyword of the committed schema means the same in draft 7 as in 2020-12 (no
    /// `prefixItems`, `unevaluated*`, `dependent*`, `$dynamicRef`; `items` a schema, never a
    /// tuple; beside a `$ref`, annotations only, which draft 7 ignores there), so [`validator`]
    /// may compile it as draft 7.
    #[test]
    fn reads_the_same_as_draft_7() {
        const SAME: &[&str] = &[
            "$schema",
            "$id",
            "$ref",
            "$defs",
            "title",
            "description",
            "default",
            "examples",
            "type",
            "enum",
            "const",
            "format",
            "minimum",
            "maximum",
            "exclusiveMinimum",
            "exclusiveMaximum",
            "multipleOf",
            "minLength",
            "maxLength",
            "pattern",
            "items",
            "minItems",
            "maxItems",
            "uniqueItems",
            "properties",
            "additionalProperties",
            "patternProperties",
            "propertyNames",
            "required",
            "anyOf",
            "oneOf",
            "allOf",
            "not",
        ];
        const ANNOTATIONS: &[&str] = &["description", "default", "title", "examples"];
        fn walk(node: &J, at: &str) {
            let Some(map) = node.as_object() else { return };
            for (k, v) in map {
                assert!(SAME.contains(&k.as_str()), "{at}: keyword `{k}` may differ between drafts 7 and 2020-12");
                match k.as_str() {
                    "properties" | "$defs" | "patternProperties" => v.as_object().unwrap().iter().for_each(|(name, sub)| walk(sub, &format!("{at}/{k}/{name}"))),
                    "items" => {
                        assert!(v.is_object(), "{at}: `items` as a tuple means prefixItems in 2020-12");
                        walk(v, &format!("{at}/items"));
                    }
                    "anyOf" | "oneOf" | "allOf" => v.as_array().unwrap().iter().enumerate().for_each(|(i, sub)| walk(sub, &format!("{at}/{k}/{i}"))),
                    "additionalProperties" | "propertyNames" | "not" => walk(v, &format!("{at}/{k}")),
                    _ => {}
                }
            }
            if map.contains_key("$ref") {
                for k in map.keys().filter(|k| *k != "$ref") {
                    assert!(ANNOTATIONS.contains(&k.as_str()), "{at}: `{k}` beside `$ref` is ignored by draft 7");
                }
            }
        }
        let root: J = serde_json::from_str(COMMITTED_SCHEMA).unwrap();
        walk(&root, "#");
        assert_eq!(root["$schema"], "https://json-schema.org/draft/2020-12/schema");
    }
}
