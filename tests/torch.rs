//! libtorch is linked, found at run time through the baked rpath, and computes.

use crate::util::{run, runner};

#[test]
fn tensors_compute_in_the_test_binary() {
    runner::runtime::init();
    tch::set_num_threads(1);
    let t = tch::Tensor::from_slice(&[1.0f32, 2.0, 3.0]);
    assert_eq!((&t * 2).sum(tch::Kind::Float).double_value(&[]), 12.0);
    runner::runtime::smoke_test().unwrap();
}

#[test]
fn info_reports_libtorch() {
    let (code, stdout, stderr) = run(runner().args(["info", "--json"]));
    assert_eq!(code, 0, "{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert!(v["libtorch_version"].as_str().unwrap().starts_with("2.11.0"), "{v}");
    assert!(v["cuda_device_count"].as_i64().unwrap() >= 0);
}
