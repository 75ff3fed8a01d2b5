//! Builds the example task components and the test fixtures for `wasm32-wasip2`, so that a plain
//! `cargo build` or `cargo test` leaves ready-to-load `.wasm` files in `target/tasks` and
//! `target/fixtures`. The nested cargo uses its own target folder: sharing the outer one would
//! deadlock on cargo's build lock.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Component crates and the folder under `target/` their `.wasm` goes to.
const COMPONENTS: &[(&str, &str, &str)] = &[
    ("celeriac-task-indexing", "indexing", "tasks"),
    ("celeriac-task-deletion", "deletion", "tasks"),
    ("celeriac-task-cleanup", "cleanup", "tasks"),
    ("celeriac-task-summarize", "summarize", "tasks"),
    ("celeriac-task-diagnostics", "diagnostics", "tasks"),
    ("celeriac-fixture-hostile", "hostile", "fixtures"),
    // The hot-deploy tests' component, in a folder of its own (both versions serve the same
    // tasks, so they cannot share a modules folder): v1.wasm here, v2.wasm built below.
    ("celeriac-fixture-deploy", "deploy", "fixtures/deploy"),
];

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let root = manifest.parent().unwrap().to_path_buf();
    for watched in ["sdk", "wit", "tasks", "tests/fixtures", "Cargo.toml", "Cargo.lock"] {
        println!("cargo:rerun-if-changed={}", root.join(watched).display());
    }
    println!("cargo:rerun-if-env-changed=CELERIAC_SKIP_TASK_BUILD");
    let out = root.join("target");
    println!("cargo:rustc-env=CELERIAC_BUILT_TASKS_DIR={}", out.join("tasks").display());
    println!("cargo:rustc-env=CELERIAC_BUILT_FIXTURES_DIR={}", out.join("fixtures").display());
    if std::env::var_os("CELERIAC_SKIP_TASK_BUILD").is_some() {
        return;
    }

    ensure_wasm_target();
    let build_dir = out.join("wasm-build");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&root)
        .args(["build", "--profile", "wasm-tasks", "--target", "wasm32-wasip2", "--target-dir"])
        .arg(&build_dir);
    for (package, _, _) in COMPONENTS {
        cmd.args(["-p", package]);
    }
    // Settings meant for the outer (native) build must not leak into the wasm build.
    for var in [
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTFLAGS",
        "CARGO_BUILD_TARGET",
        "CARGO_TARGET_DIR",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTC_WRAPPER",
        "CARGO_PRIMARY_PACKAGE",
    ] {
        cmd.env_remove(var);
    }
    let status = cmd.status().expect("run cargo to build the task components");
    assert!(
        status.success(),
        "building the task components for wasm32-wasip2 failed (is the target installed? \
         `rustup target add wasm32-wasip2`)"
    );

    let built = |lib: &str| build_dir.join("wasm32-wasip2/wasm-tasks").join(format!("{lib}.wasm"));
    for (_, lib, dest) in COMPONENTS {
        let to_dir = out.join(dest);
        std::fs::create_dir_all(&to_dir).unwrap();
        let name = if *lib == "deploy" { "v1" } else { lib };
        copy_if_changed(&built(lib), &to_dir.join(format!("{name}.wasm")));
    }
    // The same crate with its `v2` feature: a second build, since one build unifies features.
    // cargo keeps both artifacts apart, so neither rebuilds when nothing changed.
    cmd.args(["--features", "celeriac-fixture-deploy/v2"]);
    let status = cmd.status().expect("run cargo to build the deploy fixture's second version");
    assert!(status.success(), "building the deploy fixture with its v2 feature failed");
    copy_if_changed(&built("deploy"), &out.join("fixtures/deploy/v2.wasm"));
}

/// rustup installs the toolchain file's targets only when it installs the toolchain itself; on a
/// machine that already had 1.95.0 the wasm target may be missing, so add it here rather than
/// make every new user run a second command.
fn ensure_wasm_target() {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let sysroot = Command::new(&rustc).args(["--print", "sysroot"]).output().ok();
    let installed = sysroot
        .map(|o| {
            PathBuf::from(String::from_utf8_lossy(&o.stdout).trim())
                .join("lib/rustlib/wasm32-wasip2")
                .is_dir()
        })
        .unwrap_or(false);
    if !installed {
        let _ = Command::new("rustup").args(["target", "add", "wasm32-wasip2"]).status();
    }
}

/// Copies only when the content changed, so a running worker's watcher sees no spurious change.
fn copy_if_changed(from: &Path, to: &Path) {
    let new = std::fs::read(from).unwrap_or_else(|e| panic!("read {}: {e}", from.display()));
    if std::fs::read(to).ok().as_deref() != Some(&new[..]) {
        let tmp = to.with_extension("wasm.tmp");
        std::fs::write(&tmp, &new).unwrap();
        std::fs::rename(&tmp, to).unwrap();
    }
}
