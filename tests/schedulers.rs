//! Scheduler parity with diffusers 0.42.1 on the committed pipeline references
//! (tests/fixtures/refs/<case>.{json,safetensors}, tools/make_references.py): schedules, and a
//! replay of each run's denoising loop fed with the recorded guided noise predictions (the
//! velocity, for the SD3 / SD3.5 flow-matching references).
//! (src/schedulers/*.rs test more configurations against tests/fixtures/refs/schedulers.json.)

use runner::checkpoint::layout::{resolve_source, Checkpoint, VariantPolicy};
use runner::checkpoint::load::{load, LoadOptions, TensorStore};
use runner::manifest::SchedulerKind;
use runner::schedulers::{build, build_with_mu, calculate_shift, dynamic_shift_mu, parse_config, Scheduler, SchedulerError};
use serde_json::Value;
use tch::{Device, Kind, Tensor};

use crate::util::root;

/// The reference cases, with the runner scheduler that `tools/make_references.py` swapped in
/// (`None`: the pipeline's own scheduler).
const CASES: &[(&str, Option<SchedulerKind>)] = &[
    ("sd15-pndm", Some(SchedulerKind::Pndm)),
    ("sd15-euler", Some(SchedulerKind::Euler)),
    ("sd15-euler-ancestral", Some(SchedulerKind::EulerAncestral)),
    ("sd15-ddim", Some(SchedulerKind::Ddim)),
    ("sd15-dpmpp-2m", Some(SchedulerKind::DpmPP2M)),
    ("sd15-dpmpp-2m-karras", Some(SchedulerKind::DpmPP2MKarras)),
    ("sd15-pndm-noguidance-batch2", Some(SchedulerKind::Pndm)),
    ("sdxl-euler", None),
    ("sdxl-euler-noneg", None),
];

fn refs(case: &str) -> (Value, TensorStore) {
    let dir = crate::util::refs_path("");
    // Lenient: the DPM-Solver configs hold `"lambda_min_clipped": -Infinity`.
    let meta = parse_config(&std::fs::read_to_string(dir.join(format!("{case}.json"))).unwrap()).unwrap();
    let ck = Checkpoint::open(resolve_source(&dir.join(format!("{case}.safetensors")), None, None, VariantPolicy::Require).unwrap()).unwrap();
    let store = load(&ck, None, LoadOptions { float_kind: None, device: Device::Cpu, populate: false }).unwrap();
    (meta, store)
}

fn values(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(&t.to_kind(Kind::Double).contiguous().view(-1)).unwrap()
}

use runner::parity::{check, max_abs, rel, rel_to, SCHEDULE, SCHEDULER_STEP};

fn rel_t(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    rel(&values(a), &values(b))
}

/// A step's result against the reference, relative to the step's operands: the latents before
/// it and after it (src/parity.rs SCHEDULER_STEP says why).
fn rel_step(before: &Tensor, got: &Tensor, want: &Tensor) -> f64 {
    assert_eq!(got.size(), want.size());
    let w = values(want);
    rel_to(&values(got), &w, max_abs(&values(before)).max(max_abs(&w)))
}

/// Checks the schedule; returns the largest relative difference.
fn check_schedule(case: &str, s: &dyn Scheduler, store: &TensorStore) -> f64 {
    let ts = rel(s.timesteps(), &values(store.get("scheduler.timesteps").unwrap()));
    check(&format!("{case}: {} timesteps", s.name()), ts, SCHEDULE);
    let ac = rel(s.alphas_cumprod(), &values(store.get("scheduler.alphas_cumprod").unwrap()));
    check(&format!("{case}: {} alphas_cumprod", s.name()), ac, SCHEDULE);
    let sig = match (s.sigmas(), store.get("scheduler.sigmas")) {
        (Some(mine), Some(theirs)) => rel(mine, &values(theirs)),
        (None, None) => 0.0,
        (mine, theirs) => panic!("{case}: sigmas {mine:?} vs {theirs:?}"),
    };
    check(&format!("{case}: {} sigmas", s.name()), sig, SCHEDULE);
    ts.max(ac).max(sig)
}

/// Replays the pipeline loop: returns the largest relative difference of the scaled initial
/// latents, the model inputs and the latents after each step (relative to the step's
/// operands), or an error when the initial draw differs (a concurrent draw: retried).
fn replay(case: &str, meta: &Value, s: &mut dyn Scheduler, store: &TensorStore) -> Result<f64, String> {
    let init = store.get("latents.init").unwrap();
    let drawn = if s.name() == "EulerAncestralDiscreteScheduler" {
        // Its step noise comes from the generator that drew the latents: draw them the same way.
        tch::manual_seed(meta["seed"].as_i64().unwrap());
        // Equal up to the kernel path (ATen's vectorised and scalar `randn` differ in the last
        // bits); far off means a concurrent draw: retried.
        let d = rel_t(&Tensor::randn(init.size(), (Kind::Float, Device::Cpu)), init);
        if d > 1e-3 {
            return Err(format!("{case}: initial draw differs by {d:e}"));
        }
        check(&format!("{case}: initial draw"), d, runner::parity::NOISE);
        init.copy()
    } else {
        init.copy()
    };
    let mut latents = &drawn * s.init_noise_sigma();
    let mut worst = rel_t(&latents, store.get("latents.init_scaled").unwrap());
    let batch = init.size()[0];
    for i in 0..s.timesteps().len() {
        let x = s.scale_model_input(&latents, i);
        // CFG runs duplicate the batch: [uncond; cond]; both halves are the same input.
        let unet_in = store.get(&format!("step{i}.unet_input")).unwrap().narrow(0, 0, batch);
        let d_in = rel_t(&x, &unet_in);
        let next = s.step(store.get(&format!("step{i}.noise_pred")).unwrap(), i, &latents);
        let want = store.get(&format!("step{i}.latents")).unwrap();
        let d_out = rel_step(&latents, &next, want);
        // The next step starts from the recorded latents: each step is measured on its own.
        latents = want.copy();
        worst = worst.max(d_in).max(d_out);
    }
    assert!(store.get(&format!("step{}.latents", s.timesteps().len())).is_none(), "{case}: the reference has more steps than {}", s.timesteps().len());
    assert!(latents.equal(store.get("latents.final").unwrap()), "{case}: latents.final is the last step's");
    Ok(worst)
}

fn run_case(case: &str, meta: &Value, config: &Value, kind: Option<SchedulerKind>, store: &TensorStore) -> (f64, f64) {
    let steps = meta["steps"].as_u64().unwrap() as usize;
    let mk = || build(config, kind, steps).unwrap_or_else(|e| panic!("{case}: {e}"));
    let s = mk();
    assert_eq!(s.name(), meta["scheduler"].as_str().unwrap(), "{case}");
    assert_eq!(s.timesteps().len() as u64, meta["unet_calls"].as_u64().unwrap(), "{case}: UNet calls");
    let sched = check_schedule(case, s.as_ref(), store);
    // The ancestral replay shares libtorch's global generator with every other test in this
    // binary: a concurrent draw can interleave, so a miss is retried before it counts.
    let mut last = String::new();
    for _ in 0..3 {
        match replay(case, meta, mk().as_mut(), store) {
            Ok(d) => {
                check(&format!("{case}: {} replayed loop", meta["scheduler"].as_str().unwrap_or("?")), d, SCHEDULER_STEP);
                return (sched, d);
            }
            Err(e) => last = e,
        }
    }
    panic!("{last}");
}

/// Every reference case, with the scheduler built from the recorded config (its `_class_name`)
/// and, for the swapped-in schedulers, from the pipeline's own scheduler_config.json plus the
/// runner kind (diffusers `X.from_config(pipe.scheduler.config)`).
#[test]
fn schedulers_match_diffusers_references() {
    crate::util::set_threads();
    for &(case, kind) in CASES {
        let (meta, store) = refs(case);
        let (a, b) = run_case(case, &meta, &meta["scheduler_config"], None, &store);
        eprintln!("{case} ({}): schedule {a:e}, loop {b:e}", meta["scheduler"].as_str().unwrap());
        if let Some(kind) = kind {
            let pipeline = meta["pipeline"].as_str().unwrap();
            let path = root().join(format!("tests/fixtures/{pipeline}/scheduler/scheduler_config.json"));
            let own = parse_config(&std::fs::read_to_string(path).unwrap()).unwrap();
            let (c, d) = run_case(case, &meta, &own, Some(kind), &store);
            eprintln!("{case} (from {pipeline}'s config, kind {kind:?}): schedule {c:e}, loop {d:e}");
        }
    }
}

fn err(config: &str, kind: Option<SchedulerKind>, steps: usize) -> String {
    match build(&parse_config(config).unwrap(), kind, steps) {
        Ok(s) => panic!("{config}: built {}", s.name()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn unsupported_class_is_named_with_the_supported_ones() {
    let e = err(r#"{"_class_name": "KDPM2AncestralDiscreteScheduler", "beta_schedule": "scaled_linear"}"#, None, 20);
    assert!(e.contains("`KDPM2AncestralDiscreteScheduler`"), "{e}");
    for supported in ["PNDMScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "DDIMScheduler", "DPMSolverMultistepScheduler", "LMSDiscreteScheduler"] {
        assert!(e.contains(supported), "{e}");
    }
    assert!(e.starts_with("scheduler_config.json"), "{e}");
    assert!(matches!(build(&parse_config(r#"{"beta_start": 0.1}"#).unwrap(), None, 4), Err(SchedulerError::MissingClass)));
}

#[test]
fn non_finite_configs_parse() {
    let v = parse_config(r#"{"_class_name": "DPMSolverMultistepScheduler", "lambda_min_clipped": -Infinity, "note": "-Infinity in a string", "x": [NaN, Infinity]}"#).unwrap();
    assert_eq!(v["note"], "-Infinity in a string");
    let s = build(&v, None, 10).unwrap();
    assert_eq!(s.timesteps().len(), 10);
    assert!(serde_json::from_str::<Value>(r#"{"a": -Infinity}"#).is_err(), "serde_json got lenient: the workaround can go");
    assert!(parse_config("{\"a\": 1,}").unwrap_err().to_string().starts_with("scheduler_config.json: not valid JSON"));
}

#[test]
fn bad_values_name_the_class_and_key() {
    let sd = |extra: &str| format!(r#"{{"_class_name": "PNDMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "skip_prk_steps": true{extra}}}"#);
    let e = err(&sd(r#", "beta_schedule": "cosine""#), None, 4);
    assert!(e.contains("PNDMScheduler") && e.contains("`beta_schedule`") && e.contains("\"cosine\"") && e.contains("squaredcos_cap_v2"), "{e}");
    let e = err(&sd(r#", "prediction_type": "sample""#), Some(SchedulerKind::Euler), 4);
    assert!(e.contains("EulerDiscreteScheduler") && e.contains("`prediction_type`"), "{e}");
    let e = err(&sd(r#", "skip_prk_steps": false"#), None, 4);
    assert!(e.contains("`skip_prk_steps`"), "{e}");
    let e = err(&sd(r#", "steps_offset": "one""#), None, 4);
    assert!(e.contains("`steps_offset`") && e.contains("integer"), "{e}");
    let e = err(&sd(r#", "timestep_spacing": "karras""#), Some(SchedulerKind::DpmPP2M), 4);
    assert!(e.contains("DPMSolverMultistepScheduler") && e.contains("`timestep_spacing`") && e.contains("\"trailing\""), "{e}");
    let e = err(&sd(r#", "algorithm_type": "sde-dpmsolver++", "_class_name": "DPMSolverMultistepScheduler""#), None, 4);
    assert!(e.contains("`algorithm_type`") && e.contains("sde-dpmsolver++"), "{e}");
    let e = err(&sd(""), None, 0);
    assert!(e.contains("PNDMScheduler") && e.contains("0 inference steps"), "{e}");
    // 1000 "leading" steps with steps_offset 1 reach timestep 1000: diffusers' IndexError, an error here.
    let e = err(&sd(r#", "steps_offset": 1"#), Some(SchedulerKind::Ddim), 1000);
    assert!(e.contains("DDIMScheduler") && e.contains("timestep 1000"), "{e}");
}

/// `kind` keeps the config's shared values (spacing, offset, betas), as `from_config` does, and
/// the `dpmpp-2m*` kinds set what their names say.
#[test]
fn kind_overrides_the_class_and_keeps_shared_values() {
    let pndm = parse_config(&std::fs::read_to_string(root().join("tests/fixtures/tiny-sd15/scheduler/scheduler_config.json")).unwrap()).unwrap();
    let euler = build(&pndm, Some(SchedulerKind::Euler), 4).unwrap();
    assert_eq!(euler.name(), "EulerDiscreteScheduler");
    assert_eq!(euler.timesteps(), [751.0, 501.0, 251.0, 1.0]);
    let karras = build(&pndm, Some(SchedulerKind::DpmPP2MKarras), 4).unwrap();
    assert_eq!(karras.timesteps(), [999.0, 687.0, 146.0, 0.0]);
    // dpmpp-2m turns Karras sigmas off again on a Karras config.
    let mut cfg = pndm.clone();
    cfg["_class_name"] = "DPMSolverMultistepScheduler".into();
    cfg["use_karras_sigmas"] = true.into();
    assert_eq!(build(&cfg, None, 4).unwrap().timesteps(), [999.0, 687.0, 146.0, 0.0]);
    assert_eq!(build(&cfg, Some(SchedulerKind::DpmPP2M), 4).unwrap().timesteps(), [801.0, 601.0, 401.0, 201.0]);
    let pndm6 = build(&pndm, None, 6).unwrap();
    assert_eq!(pndm6.timesteps(), [831.0, 665.0, 665.0, 499.0, 333.0, 167.0, 1.0]);
}

/// The SD3 / SD3.5 pipeline references: FlowMatchEulerDiscreteScheduler's schedule equal to
/// diffusers' in float32, each step equal given the recorded latents and guided velocity, and
/// the whole loop replayed to `latents.final`.
#[test]
fn flow_match_matches_sd3_references() {
    crate::util::set_threads();
    for case in ["sd3-cfg", "sd3-long-prompt-msl16", "sd3-negative-nonsquare", "sd3-no-t5", "sd35-cfg", "sd35-noguidance"] {
        let (meta, store) = refs(case);
        let steps = meta["steps"].as_u64().unwrap() as usize;
        let pipeline = meta["pipeline"].as_str().unwrap();
        let own = parse_config(&std::fs::read_to_string(root().join(format!("tests/fixtures/{pipeline}/scheduler/scheduler_config.json"))).unwrap()).unwrap();
        for (config, kind) in [(&meta["scheduler_config"], None), (&own, Some(SchedulerKind::FlowMatchEuler))] {
            let mut s = build(config, kind, steps).unwrap_or_else(|e| panic!("{case}: {e}"));
            assert_eq!(s.name(), "FlowMatchEulerDiscreteScheduler");
            assert_eq!(s.timesteps().len() as u64, meta["transformer_calls"].as_u64().unwrap(), "{case}");
            assert_eq!(s.timesteps(), values(store.get("scheduler.timesteps").unwrap()), "{case}: timesteps");
            assert_eq!(s.sigmas().unwrap(), values(store.get("scheduler.sigmas").unwrap()), "{case}: sigmas");
            assert!(s.alphas_cumprod().is_empty());
            let init = store.get("latents.init").unwrap();
            let batch = init.size()[0];
            let mut chained = init * s.init_noise_sigma();
            assert!(chained.equal(init), "{case}: init_noise_sigma is 1");
            let mut worst = 0f64;
            for i in 0..steps {
                let t = store.get(&format!("step{i}.timestep")).unwrap();
                assert!(values(t).iter().all(|&x| x == s.timesteps()[i]), "{case}: step {i}: timestep {t:?}");
                let prev = if i == 0 { init.shallow_clone() } else { store.get(&format!("step{}.latents", i - 1)).unwrap().shallow_clone() };
                // The transformer's input is the latents as they are (twice under CFG).
                let input = store.get(&format!("step{i}.transformer_input")).unwrap();
                assert!(s.scale_model_input(&prev, i).equal(&input.narrow(0, 0, batch)), "{case}: step {i}: model input");
                let v = store.get(&format!("step{i}.noise_pred")).unwrap();
                // One step from the recorded latents (a scheduler of its own, at step i), and the
                // chained loop's.
                let mut fresh = build(config, kind, steps).unwrap();
                let one = fresh.step(v, i, &prev);
                chained = s.step(v, i, &chained);
                let want = store.get(&format!("step{i}.latents")).unwrap();
                let (d1, d2) = (rel_step(&prev, &one, want), rel_step(&prev, &chained, want));
                check(&format!("{case}: flow match step {i} (from the recorded latents)"), d1, SCHEDULER_STEP);
                check(&format!("{case}: flow match step {i} (chained)"), d2, SCHEDULER_STEP);
                worst = worst.max(d1).max(d2);
            }
            let d = rel_t(&chained, store.get("latents.final").unwrap());
            check(&format!("{case}: flow match final latents"), d, SCHEDULER_STEP);
            eprintln!("{case} ({}): schedule equal, loop {:e}", if kind.is_some() { "kind over the pipeline's config" } else { "recorded config" }, worst.max(d));
        }
    }
}

fn flow_err(extra: &str, mu: Option<f64>) -> String {
    let sd3 = std::fs::read_to_string(root().join("tests/fixtures/tiny-sd3/scheduler/scheduler_config.json")).unwrap();
    let mut v = parse_config(&sd3).unwrap();
    let extra = parse_config(&format!("{{{extra}}}")).unwrap();
    for (k, x) in extra.as_object().unwrap() {
        v[k] = x.clone();
    }
    match build_with_mu(&v, None, 4, mu) {
        Ok(_) => panic!("{extra}: built"),
        Err(e) => e.to_string(),
    }
}

/// Keys runner does not implement are refused by name, never ignored; dynamic shifting needs the
/// pipeline's mu.
#[test]
fn flow_match_unsupported_values_name_the_key() {
    for (extra, key) in [
        (r#""invert_sigmas": true"#, "`invert_sigmas`"),
        (r#""use_karras_sigmas": true"#, "`use_karras_sigmas`"),
        (r#""use_exponential_sigmas": true"#, "`use_exponential_sigmas`"),
        (r#""use_beta_sigmas": true"#, "`use_beta_sigmas`"),
        (r#""stochastic_sampling": true"#, "`stochastic_sampling`"),
        (r#""shift_terminal": 0.1"#, "`shift_terminal`"),
        (r#""time_shift_type": "cubic""#, "`time_shift_type`"),
        (r#""shift": "3""#, "`shift`"),
        (r#""shift": -1.0"#, "`shift`"),
        (r#""num_train_timesteps": 1.5"#, "`num_train_timesteps`"),
        (r#""use_dynamic_shifting": true"#, "`use_dynamic_shifting`"),
    ] {
        let e = flow_err(extra, None);
        assert!(e.contains("FlowMatchEulerDiscreteScheduler") && e.contains(key), "{extra}: {e}");
    }
    assert!(flow_err(r#""use_dynamic_shifting": true"#, None).contains("mu"));
    assert!(flow_err(r#""use_dynamic_shifting": true"#, Some(f64::NAN)).contains("mu = NaN"));
    assert!(flow_err(r#""use_dynamic_shifting": true, "time_shift_type": "linear""#, Some(0.0)).contains("mu = 0"));
    // Defaults (and 0.0, which diffusers' `if shift_terminal:` skips) build.
    let sd3 = parse_config(&std::fs::read_to_string(root().join("tests/fixtures/tiny-sd3/scheduler/scheduler_config.json")).unwrap()).unwrap();
    let mut v = sd3.clone();
    v["shift_terminal"] = 0.0.into();
    assert_eq!(build(&v, None, 4).unwrap().timesteps().len(), 4);
    // mu is unused without use_dynamic_shifting, as in diffusers.
    assert_eq!(build_with_mu(&sd3, None, 4, Some(3.0)).unwrap().timesteps(), build(&sd3, None, 4).unwrap().timesteps());
}

/// The pipeline's mu: calculate_shift of the config's values under use_dynamic_shifting, none otherwise.
#[test]
fn flow_match_dynamic_shift_mu() {
    let sd3 = parse_config(&std::fs::read_to_string(root().join("tests/fixtures/tiny-sd3/scheduler/scheduler_config.json")).unwrap()).unwrap();
    assert_eq!(dynamic_shift_mu(&sd3, 4096).unwrap(), None);
    let mut flux = sd3.clone();
    flux["use_dynamic_shifting"] = true.into();
    assert_eq!(dynamic_shift_mu(&flux, 4096).unwrap(), Some(calculate_shift(4096, 256, 4096, 0.5, 1.15)));
    assert!((dynamic_shift_mu(&flux, 256).unwrap().unwrap() - 0.5).abs() < 1e-12);
    let mu = dynamic_shift_mu(&flux, 1024).unwrap();
    let s = build_with_mu(&flux, None, 4, mu).unwrap();
    // Shifted less than SD3's static shift of 3 at 1024 tokens (mu = 0.63, exp(mu) = 1.88).
    assert!(s.timesteps()[1] < build(&sd3, None, 4).unwrap().timesteps()[1]);
    let mut bad = flux.clone();
    bad["base_shift"] = Value::Null;
    let e = dynamic_shift_mu(&bad, 1024).unwrap_err().to_string();
    assert!(e.contains("`base_shift`"), "{e}");
    bad = flux.clone();
    bad["max_image_seq_len"] = 256.into();
    assert!(dynamic_shift_mu(&bad, 1024).unwrap_err().to_string().contains("`max_image_seq_len`"));
}

/// A noise-prediction scheduler refuses a flow-matching config and the reverse, naming both.
#[test]
fn flow_matching_and_noise_prediction_do_not_mix() {
    let sd3 = parse_config(&std::fs::read_to_string(root().join("tests/fixtures/tiny-sd3/scheduler/scheduler_config.json")).unwrap()).unwrap();
    let sd15 = parse_config(&std::fs::read_to_string(root().join("tests/fixtures/tiny-sd15/scheduler/scheduler_config.json")).unwrap()).unwrap();
    for kind in [SchedulerKind::Euler, SchedulerKind::Pndm, SchedulerKind::DpmPP2MKarras] {
        let e = build(&sd3, Some(kind), 4).err().unwrap();
        assert!(matches!(e, SchedulerError::Incompatible { .. }), "{e}");
        assert!(e.to_string().contains("`FlowMatchEulerDiscreteScheduler` config") && e.to_string().contains("flow-matching"), "{e}");
    }
    let e = build(&sd15, Some(SchedulerKind::FlowMatchEuler), 4).err().unwrap().to_string();
    assert!(e.contains("`FlowMatchEulerDiscreteScheduler` cannot run from a `PNDMScheduler` config"), "{e}");
    // mu belongs to flow matching only (diffusers' other set_timesteps take none).
    let e = build_with_mu(&sd15, None, 4, Some(1.0)).err().unwrap().to_string();
    assert!(e.contains("PNDMScheduler") && e.contains("mu"), "{e}");
    assert_eq!(build(&sd15, Some(SchedulerKind::Euler), 4).unwrap().name(), "EulerDiscreteScheduler");
}
