//! Image JSON documents (manifests, indexes, configs) on arbitrary bytes:
//! no panic, deterministic classification, and every descriptor of an
//! accepted document names a sha256 digest (see the invariants module).
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../crates/kiln-image/tests/invariants/mod.rs"]
mod invariants;

fuzz_target!(|data: &[u8]| {
    invariants::image_json(data);
});
