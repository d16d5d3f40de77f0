// With the `torch` feature (the default):
// 1. Bakes libtorch's library folder into the rpath of every binary, test and bench of this
//    crate: tch's build script passes its rpath as `rustc-link-arg`, which cargo does not
//    propagate to dependents. torch-sys (`links = "tch"`) exports the folder.
// 2. Records the libtorch version (from the wheel's torch/version.py) for `runner info`, and
//    warns when it is not the one tch 0.24 was written for.
use std::path::Path;

const EXPECTED_TORCH: &str = "2.11.0";

fn main() {
    // Without the `torch` feature (the light `runner` alone) there is no libtorch to find.
    if std::env::var_os("CARGO_FEATURE_TORCH").is_none() {
        return;
    }
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        println!("cargo:warning=torch-sys exported no libtorch_lib: binaries will need LD_LIBRARY_PATH");
        println!("cargo:rustc-env=RUNNER_LIBTORCH_VERSION=unknown");
        return;
    };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");

    // 3. The allocator-statistics shim (C++ against libtorch's headers: tch exposes no memory
    //    stats); the symbols it calls are in the libtorch libraries torch-sys links.
    let include = Path::new(&lib).join("../include");
    println!("cargo:rerun-if-changed=src/exec/shim/allocator_stats.cpp");
    cc::Build::new()
        .cpp(true)
        .file("src/exec/shim/allocator_stats.cpp")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag("-D_GLIBCXX_USE_CXX11_ABI=1")
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .warnings(false)
        .compile("runner_allocator_stats");

    let version_py = Path::new(&lib).join("../version.py");
    println!("cargo:rerun-if-changed={}", version_py.display());
    let version = std::fs::read_to_string(&version_py)
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("__version__ = ").map(|v| v.trim_matches(['\'', '"']).to_string())))
        .unwrap_or_else(|| "unknown".into());
    if version.split('+').next() != Some(EXPECTED_TORCH) {
        println!("cargo:warning=libtorch at {lib} is version {version}, tch 0.24 expects {EXPECTED_TORCH}: run `make setup`");
    }
    println!("cargo:rustc-env=RUNNER_LIBTORCH_VERSION={version}");
}
