//! The crate graph is the architecture (docs/architecture.md): each workspace crate may depend
//! only on the crates its row below names, and no production crate depends on the simulator
//! (`sim`) or the evaluation lab (`lab`) except the daemon, optionally, behind its `simulate` and
//! `lab` features, which the packaged build leaves off. Read from `cargo metadata` and `cargo
//! tree`, as firecracker's `verify_dependencies.rs` reads its graph.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

/// Each workspace crate and the workspace crates it may depend on (normal and build edges).
const ALLOWED: &[(&str, &[&str])] = &[
    ("objectives", &[]),
    ("proto", &["objectives"]),
    ("gpu", &[]),
    ("vllm-metrics", &[]),
    ("store", &[]),
    ("loadgen", &["objectives"]),
    ("governor", &["objectives", "store", "vllm-metrics"]),
    ("advisor", &["objectives", "vllm-metrics"]),
    ("tuner", &["loadgen", "objectives", "proto", "store", "vllm-metrics"]),
    (
        "gpu-agent",
        &[
            "advisor",
            "governor",
            "gpu",
            "loadgen",
            "objectives",
            "proto",
            "store",
            "tuner",
            "vllm-metrics",
            "sim",
            "lab",
        ],
    ),
    ("agentctl", &["proto"]),
    ("sim", &["gpu", "loadgen", "objectives", "tuner", "vllm-metrics"]),
    ("lab", &["advisor", "governor", "gpu", "loadgen", "objectives", "sim", "tuner", "vllm-metrics"]),
    ("e2e-tests", &[]),
];

/// What the simulator and the lab are; no production crate may need them.
const NOT_PRODUCTION: &[&str] = &["sim", "lab", "e2e-tests"];

/// The daemon's features that bring in crates production must not need, and what they bring.
const OPTIONAL_EDGES: &[(&str, &str)] = &[("sim", "simulate"), ("lab", "lab")];

fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(workspace_root());
    c
}

fn metadata() -> Value {
    let out = cargo()
        .args(["metadata", "--format-version", "1", "--no-deps", "--offline"])
        .output()
        .expect("run cargo metadata");
    assert!(out.status.success(), "cargo metadata: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("cargo metadata prints JSON")
}

/// Workspace package -> its dependencies on other workspace packages: (name, kind, optional).
fn workspace_edges() -> BTreeMap<String, Vec<(String, String, bool)>> {
    let meta = metadata();
    let packages = meta["packages"].as_array().expect("packages");
    let names: BTreeSet<String> = packages.iter().map(|p| p["name"].as_str().expect("name").to_string()).collect();
    packages
        .iter()
        .map(|p| {
            let deps = p["dependencies"]
                .as_array()
                .expect("dependencies")
                .iter()
                .filter(|d| names.contains(d["name"].as_str().unwrap_or("")))
                .map(|d| {
                    let kind = d["kind"].as_str().unwrap_or("normal").to_string();
                    (d["name"].as_str().expect("name").to_string(), kind, d["optional"].as_bool().unwrap_or(false))
                })
                .collect();
            (p["name"].as_str().expect("name").to_string(), deps)
        })
        .collect()
}

#[test]
fn every_crate_depends_only_on_what_its_row_allows() {
    let allowed: BTreeMap<&str, &[&str]> = ALLOWED.iter().copied().collect();
    let mut wrong = Vec::new();
    for (pkg, deps) in workspace_edges() {
        let Some(ok) = allowed.get(pkg.as_str()) else {
            wrong.push(format!("{pkg} is not in the ALLOWED table: give it a row (and one in docs/architecture.md)"));
            continue;
        };
        for (dep, kind, _) in &deps {
            let runtime = kind != "dev";
            if runtime && pkg != "e2e-tests" && !ok.contains(&dep.as_str()) {
                wrong.push(format!("{pkg} -> {dep} ({kind})"));
            }
        }
    }
    assert!(wrong.is_empty(), "edges the architecture does not allow:\n{}", wrong.join("\n"));
}

#[test]
fn no_production_crate_needs_the_simulator_or_the_lab() {
    let mut wrong = Vec::new();
    for (pkg, deps) in workspace_edges() {
        if NOT_PRODUCTION.contains(&pkg.as_str()) {
            continue;
        }
        for (dep, kind, optional) in &deps {
            if kind == "dev" || !NOT_PRODUCTION.contains(&dep.as_str()) {
                continue;
            }
            let behind_feature = *optional && pkg == "gpu-agent" && OPTIONAL_EDGES.iter().any(|(d, _)| d == dep);
            if !behind_feature {
                wrong.push(format!("{pkg} -> {dep} ({kind}{})", if *optional { ", optional" } else { "" }));
            }
        }
    }
    assert!(wrong.is_empty(), "production crates that need the simulator or the lab:\n{}", wrong.join("\n"));

    // The features that bring them are exactly the documented ones.
    let meta = metadata();
    let agent =
        meta["packages"].as_array().expect("packages").iter().find(|p| p["name"] == "gpu-agent").expect("gpu-agent");
    for (dep, feature) in OPTIONAL_EDGES {
        let enables: Vec<String> = agent["features"][*feature]
            .as_array()
            .expect("feature")
            .iter()
            .map(|v| v.as_str().unwrap_or("").to_string())
            .collect();
        assert!(enables.contains(&format!("dep:{dep}")), "feature `{feature}` of gpu-agent brings {dep}: {enables:?}");
    }
}

#[test]
fn the_packaged_daemon_contains_neither_the_simulator_nor_the_lab() {
    // The build the packages ship (README, "Install from a package"; tests/tests/packages.rs).
    let out = cargo()
        .args([
            "tree",
            "--offline",
            "-p",
            "gpu-agent",
            "--no-default-features",
            "--features",
            "nvml",
            "-e",
            "normal,build",
            "--prefix",
            "none",
            "--format",
            "{p}",
        ])
        .output()
        .expect("run cargo tree");
    assert!(out.status.success(), "cargo tree: {}", String::from_utf8_lossy(&out.stderr));
    let tree = String::from_utf8_lossy(&out.stdout);
    let crates: BTreeSet<&str> = tree.lines().filter_map(|l| l.split_whitespace().next()).collect();
    assert!(crates.contains("governor") && crates.contains("nvml-wrapper"), "the tree is the daemon's: {crates:?}");
    for c in NOT_PRODUCTION {
        assert!(!crates.contains(c), "the packaged daemon links {c}");
    }
    // And the default build (the quick start) does link both.
    let out = cargo()
        .args(["tree", "--offline", "-p", "gpu-agent", "-e", "normal", "--prefix", "none", "--format", "{p}"])
        .output()
        .expect("run cargo tree");
    let tree = String::from_utf8_lossy(&out.stdout);
    assert!(tree.lines().any(|l| l.starts_with("sim ")) && tree.lines().any(|l| l.starts_with("lab ")), "{tree}");
}
