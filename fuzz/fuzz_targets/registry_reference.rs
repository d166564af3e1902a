//! `kiln_image::registry::Reference` parsing on arbitrary text: no panic,
//! deterministic, and whatever it accepts prints back to itself (see the
//! invariants module).
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../crates/kiln-image/tests/invariants_registry/mod.rs"]
mod invariants_registry;

fuzz_target!(|data: &[u8]| {
    invariants_registry::registry_reference(&String::from_utf8_lossy(data));
});
