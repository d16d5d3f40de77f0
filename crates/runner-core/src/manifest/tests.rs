use super::*;

fn write(dir: &Path, text: &str) -> PathBuf {
    let p = dir.join("m.toml");
    std::fs::write(&p, text).unwrap();
    p
}

const MINIMAL: &str = "schema_version = 1\nname = \"t\"\n[pipeline]\nkind = \"stable-diffusion\"\nsource = \".\"\n";

#[test]
fn defaults_apply() {
    let dir = tempfile::tempdir().unwrap();
    let m = load(&write(dir.path(), MINIMAL), &Overrides::default()).unwrap();
    assert_eq!(m.manifest.pipeline.dtype, Dtype::Fp32);
    assert_eq!(m.manifest.placement.strategy, Strategy::Balanced);
    assert_eq!(m.manifest.placement.offload, Offload::None);
    assert!(m.manifest.components.is_empty());
    assert_eq!(m.manifest.run, Run::default());
}

#[test]
fn layers_in_order_with_origins() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), &format!("{MINIMAL}[run]\nsteps = 10\nseed = 1\nwidth = 64\n"));
    let o = Overrides { env: vec![("RUNNER_RUN__STEPS".into(), "20".into()), ("RUNNER_RUN__SEED".into(), "2".into())], sets: vec!["run.seed=3".into()], ..Default::default() };
    let m = load(&path, &o).unwrap();
    assert_eq!((m.manifest.run.steps, m.manifest.run.seed, m.manifest.run.width), (Some(20), Some(3), Some(64)));
    assert_eq!(m.origin("run.steps"), Some(Origin::Env("RUNNER_RUN__STEPS".into())));
    assert_eq!(m.origin("run.seed"), Some(Origin::Cli("--set run.seed=3".into())));
    assert_eq!(m.origin("run.width"), Some(Origin::File(path.clone())));
}

#[test]
fn every_error_of_a_file_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), &format!("{MINIMAL}bogus = 1\n[run]\nsteps = 0\nwidth = 7\n[components.unet]\ndevice = \"cuda:3\"\n[placement]\nmax_memory = {{ \"cuda:0\" = \"1GB\" }}\n"));
    let diags = load(&path, &Overrides::default()).unwrap_err();
    let keys: Vec<_> = diags.iter().filter(|d| d.is_error()).filter_map(|d| d.key.clone()).collect();
    for k in ["pipeline.bogus", "run.steps", "run.width", "components.unet.device"] {
        assert!(keys.contains(&k.to_string()), "{k} not in {keys:?}");
    }
}

#[test]
fn spans_point_at_values_keys_and_headers() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!("{MINIMAL}[run]\nsteps = 0\n[components.unett]\n");
    let path = write(dir.path(), &text);
    let diags = load(&path, &Overrides::default()).unwrap_err();
    let at = |key: &str| {
        let d = diags.iter().find(|d| d.key.as_deref() == Some(key)).unwrap_or_else(|| panic!("{key}: {diags:?}"));
        match &d.location {
            Location::File { span, .. } => text[span.clone()].to_string(),
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(at("run.steps"), "0");
    assert_eq!(at("components.unett"), "unett");
}

#[test]
fn normalize_paths() {
    assert_eq!(normalize(Path::new("manifests/../models/x")), PathBuf::from("models/x"));
    assert_eq!(normalize(Path::new("../a/./b")), PathBuf::from("../a/b"));
    assert_eq!(normalize(Path::new("/../a")), PathBuf::from("/a"));
    assert_eq!(normalize(Path::new("a/..")), PathBuf::from("."));
}

#[test]
fn join_key_quotes_when_needed() {
    assert_eq!(join_key(&split_key("run.steps")), "run.steps");
    assert_eq!(join_key(&["placement".into(), "max_memory".into(), "cuda:0".into()]), "placement.max_memory.\"cuda:0\"");
}
