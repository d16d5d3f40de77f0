//! The committed schema is what the serde types generate (cargo-util-schemas' drift test).

use crate::util::{run, runner};

const FIX: &str = "run `make schema` (cargo run -- schema > schemas/manifest.schema.json) and commit the result";

#[test]
fn committed_schema_matches_types() {
    let generated = runner::manifest::schema_json();
    let committed = std::fs::read_to_string(crate::util::root().join("schemas/manifest.schema.json")).unwrap();
    assert!(generated == committed, "schemas/manifest.schema.json is stale: {FIX}");
    assert_eq!(runner::manifest::COMMITTED_SCHEMA, committed, "the binary embeds the committed schema");
}

#[test]
fn schema_command_prints_committed_schema() {
    let (code, stdout, _) = run(runner().arg("schema"));
    assert_eq!(code, 0);
    let committed = std::fs::read_to_string(crate::util::root().join("schemas/manifest.schema.json")).unwrap();
    assert!(stdout == committed, "`runner schema` differs from the committed file: {FIX}");
}

#[test]
fn schema_is_a_valid_2020_12_schema_with_descriptions() {
    let v: serde_json::Value = serde_json::from_str(runner::manifest::COMMITTED_SCHEMA).unwrap();
    assert_eq!(v["$schema"], "https://json-schema.org/draft/2020-12/schema");
    jsonschema::validator_for(&v).expect("valid schema");
    for def in ["Pipeline", "Placement", "Run", "Component"] {
        assert_eq!(v["$defs"][def]["additionalProperties"], false, "{def} denies unknown keys");
    }
    assert!(v["$defs"]["Run"]["properties"]["steps"]["description"].is_string());
}
