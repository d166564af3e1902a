//! Arbitrary bytes as a `.deb` unpacked into a temporary directory: no
//! panic, nothing written but numbered plain files, and what is accepted is
//! consistent (see the invariants module).
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../crates/kiln-image/tests/invariants_deb/mod.rs"]
mod invariants_deb;

fuzz_target!(|data: &[u8]| {
    invariants_deb::deb_unpack(data);
});
