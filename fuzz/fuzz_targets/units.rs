//! `kiln_spec::units::parse_duration` and `parse_size` on arbitrary text: no
//! panic, deterministic, and whatever they accept prints back to itself and
//! means the same inside a spec (see the invariants module).
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../crates/kiln-spec/tests/invariants/mod.rs"]
mod invariants;

fuzz_target!(|data: &[u8]| {
    invariants::units(&String::from_utf8_lossy(data));
});
