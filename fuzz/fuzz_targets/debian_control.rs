//! Arbitrary bytes as an apt `Packages` index (and a Release text): no
//! panic, deterministic, refusals located on a real line, and what is
//! accepted is well formed, its relations print back to themselves and the
//! resolver closes over it deterministically (see the invariants module).
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../crates/kiln-image/tests/invariants_debian/mod.rs"]
mod invariants_debian;

fuzz_target!(|data: &[u8]| {
    invariants_debian::debian_control(data);
});
