//! Arbitrary bytes as an image layer (tar, or gzip-sniffed tar) unpacked
//! into `tmp/root`: no panic, nothing written outside the root, no device
//! node or FIFO created (see the invariants module).
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../crates/kiln-image/tests/invariants/mod.rs"]
mod invariants;

fuzz_target!(|data: &[u8]| {
    invariants::layer_unpack(data);
});
