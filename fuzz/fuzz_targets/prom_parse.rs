//! Fuzz target; the check itself is `checks::prom_parse` in fuzz/checks.rs.
#![no_main]

#[allow(dead_code)] // each target uses one of the checks
#[path = "../checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::prom_parse(data));
