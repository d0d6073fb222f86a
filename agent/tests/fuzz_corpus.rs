//! Replays the committed fuzz corpus (fuzz/corpus/<target>/) through the same checks the fuzz
//! targets run (fuzz/checks.rs), so every input the fuzzers kept, and every crash they found
//! once (fuzz/corpus/*/regression-*), stays covered by `cargo test` without libFuzzer.

#[path = "../../fuzz/checks.rs"]
mod checks;

use std::path::PathBuf;

fn replay(target: &str, check: fn(&[u8])) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus").join(target);
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.expect("corpus entry").path();
        let data = std::fs::read(&path).expect("corpus file");
        let caught = std::panic::catch_unwind(|| check(&data));
        assert!(caught.is_ok(), "{target}: {} fails the check", path.display());
        n += 1;
    }
    assert!(n >= 3, "{target}: only {n} corpus files in {}", dir.display());
}

#[test]
fn prom_parse_corpus() {
    replay("prom_parse", checks::prom_parse);
}

#[test]
fn ctl_frame_corpus() {
    replay("ctl_frame", checks::ctl_frame);
}

#[test]
fn config_load_corpus() {
    replay("config_load", checks::config_load);
}
