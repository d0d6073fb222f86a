//! Fuzz target; the check itself is `checks::ctl_frame` in fuzz/checks.rs.
#![no_main]

#[allow(dead_code)] // each target uses one of the checks
#[path = "../checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::ctl_frame(data));
