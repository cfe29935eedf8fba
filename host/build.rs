//! With the `bundled-examples` feature, builds the guest examples of
//! `guest-examples/` for wasm32-wasip2 (a nested cargo build) and tells the
//! crate where the components are (`TERRAPHIM_GUEST_DIR`, used by
//! `src/examples.rs`). Without the feature it does nothing.

use std::env;
use std::ffi::OsString;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const WASM_TARGET: &str = "wasm32-wasip2";

/// The components `src/examples.rs` embeds.
const GUESTS: &[&str] = &[
    "echo_agent",
    "crasher_agent",
    "fuel_burner_agent",
    "memory_hog_agent",
    "sleeper_agent",
    "failing_init_agent",
    "exit_agent",
    "sandbox_probe_agent",
    "hostile_agent",
    "moody_agent",
    "caller_agent",
    "llm_agent",
    "legacy_agent",
];

/// Variables that would leak the outer build's settings into the nested one.
const LEAKY_VARS: &[&str] = &[
    "RUSTFLAGS",
    "CARGO_ENCODED_RUSTFLAGS",
    "CARGO_BUILD_RUSTFLAGS",
    "CARGO_BUILD_TARGET",
    "CARGO_TARGET_DIR",
    "CARGO_BUILD_TARGET_DIR",
    "RUSTC_WORKSPACE_WRAPPER",
    "CARGO_BUILD_RUSTC_WORKSPACE_WRAPPER",
];
const LEAKY_PREFIXES: &[&str] = &["CARGO_PROFILE_", "CARGO_FEATURE_", "CARGO_CFG_", "DEP_"];

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if env::var_os("CARGO_FEATURE_BUNDLED_EXAMPLES").is_none() {
        return;
    }

    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").unwrap());
    let repo = manifest_dir.parent().expect("host/ has a parent directory");
    let guests = repo.join("guest-examples");
    let target_dir = outer_target_dir().join("wasm-guests");

    rerun_if_changed(&guests, repo);
    ensure_wasm_target();
    build_guests(&guests, &target_dir);

    let out = target_dir.join(WASM_TARGET).join("release");
    for guest in GUESTS {
        let wasm = out.join(format!("{guest}.wasm"));
        if !wasm.is_file() {
            fail(&format!(
                "the guest build succeeded but {} is missing",
                wasm.display()
            ));
        }
    }
    println!("cargo:rustc-env=TERRAPHIM_GUEST_DIR={}", out.display());
}

/// The outer build's target directory. `OUT_DIR` is
/// `<target>/[<triple>/]<profile>/build/<pkg>-<hash>/out`: the parent of the
/// `<profile>` directory holding `build/`. Sharing `<target>/wasm-guests`
/// across profiles avoids rebuilding the guests, and a separate target
/// directory keeps the nested cargo off the outer build's lock.
fn outer_target_dir() -> PathBuf {
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").unwrap());
    out_dir
        .ancestors()
        .find(|dir| dir.file_name().is_some_and(|name| name == "build"))
        .and_then(|build| build.parent()?.parent())
        .map(Path::to_path_buf)
        .unwrap_or(out_dir)
}

fn rerun_if_changed(guests: &Path, repo: &Path) {
    println!("cargo:rerun-if-changed={}", repo.join("wit").display());
    for file in ["Cargo.toml", "Cargo.lock"] {
        println!("cargo:rerun-if-changed={}", guests.join(file).display());
    }
    let crates = std::fs::read_dir(guests)
        .unwrap_or_else(|e| fail(&format!("cannot read {}: {e}", guests.display())));
    for entry in crates.flatten() {
        let dir = entry.path();
        if dir.join("Cargo.toml").is_file() {
            println!(
                "cargo:rerun-if-changed={}",
                dir.join("Cargo.toml").display()
            );
            println!("cargo:rerun-if-changed={}", dir.join("src").display());
        }
    }
}

/// Installs the wasm32-wasip2 target through rustup when it is missing.
/// Without rustup, the build itself will say whether the target is there.
fn ensure_wasm_target() {
    let Ok(installed) = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .stderr(Stdio::inherit())
        .output()
    else {
        return;
    };
    if !installed.status.success()
        || String::from_utf8_lossy(&installed.stdout)
            .lines()
            .any(|line| line.trim() == WASM_TARGET)
    {
        return;
    }
    println!(
        "cargo:warning=installing the {WASM_TARGET} target with rustup for the guest examples"
    );
    let added = Command::new("rustup")
        .args(["target", "add", WASM_TARGET])
        .stdout(Stdio::from(io::stderr()))
        .status();
    if !added.is_ok_and(|status| status.success()) {
        fail(&format!(
            "the Rust target {WASM_TARGET} is not installed and `rustup target add {WASM_TARGET}` failed.\n\
             The `bundled-examples` feature builds the guest examples for it. Either run\n\
             \n    rustup target add {WASM_TARGET}\n\n\
             and build again, or build without the examples: `--no-default-features`."
        ));
    }
}

fn build_guests(guests: &Path, target_dir: &Path) {
    let cargo = env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"));
    let mut cmd = Command::new(cargo);
    cmd.args([
        "build",
        "--release",
        "--target",
        WASM_TARGET,
        "--manifest-path",
    ])
    .arg(guests.join("Cargo.toml"))
    .arg("--target-dir")
    .arg(target_dir)
    // Cargo parses the build script's stdout: keep the child's off it.
    .stdout(Stdio::from(io::stderr()))
    .stderr(Stdio::inherit());
    for (key, _) in env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        if LEAKY_VARS.contains(&key) || LEAKY_PREFIXES.iter().any(|p| key.starts_with(p)) {
            cmd.env_remove(key);
        }
    }
    match cmd.status() {
        Ok(status) if status.success() => {}
        Ok(status) => fail(&format!(
            "building the guest examples failed ({status}); see the cargo output above.\n\
             To build without them: `--no-default-features`."
        )),
        Err(e) => fail(&format!(
            "cannot run cargo to build the guest examples: {e}"
        )),
    }
}

/// Fails the build script; cargo shows its stderr.
fn fail(message: &str) -> ! {
    eprintln!("error: {message}");
    std::process::exit(1);
}
