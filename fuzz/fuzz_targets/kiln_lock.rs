//! Arbitrary bytes as a `kiln.lock`: no panic, an accepted lock renders to
//! text that parses back to it, and every refusal names kiln.lock, a line
//! inside the file and the fix (see the invariants module).
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../crates/kiln-image/tests/invariants_debian/mod.rs"]
mod invariants_debian;

fuzz_target!(|data: &[u8]| {
    invariants_debian::kiln_lock(data);
});
