//! `kiln build` of an unchanged project must take at most 50 ms. This
//! measures it on a project with a 20 MB binary and 200 small files:
//!
//! - `no-op rebuild`: open the store, parse the spec, build everything
//!   (every input stat'ed, nothing hashed, the cached image checked);
//! - `cold build`: the same into an empty store (every input hashed, the
//!   layer compressed, config, manifest and SBOM written).
//!
//! Run with `cargo bench -p kiln-image --bench build`.

use std::fs;
use std::path::Path;
use std::time::{Duration, SystemTime};

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use kiln_image::Store;
use kiln_image::build::build_all;
use kiln_image::progress::Quiet;

const SPEC: &str = r#"
[project]
name = "bench"

[image.app]
copy = [
  { src = "target/release/app", dst = "/app/app", mode = 0o755 },
  { src = "static", dst = "/app/static" },
]
entrypoint = ["/app/app"]
"#;

/// Deterministic, poorly compressible bytes (like code sections).
fn pseudo_random(len: usize, mut seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        out.extend_from_slice(&seed.to_le_bytes());
    }
    out.truncate(len);
    // Half of it repetitive, as real binaries are partly.
    for chunk in out.chunks_mut(4096).step_by(2) {
        chunk.fill(0);
    }
    out
}

fn write_project(dir: &Path) {
    fs::create_dir_all(dir.join("target/release")).unwrap();
    fs::write(dir.join("target/release/app"), pseudo_random(20 << 20, 42)).unwrap();
    for i in 0..200 {
        let sub = dir.join(format!("static/d{}", i % 10));
        fs::create_dir_all(&sub).unwrap();
        fs::write(
            sub.join(format!("f{i}.txt")),
            format!("file {i}\n").repeat(50 + i),
        )
        .unwrap();
    }
    fs::write(dir.join("kiln.toml"), SPEC).unwrap();
    // Old inputs, as after a `cargo build` a while ago: the stat cache
    // remembers only files whose times have settled.
    let old = SystemTime::now() - Duration::from_secs(3600);
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                fs::File::options()
                    .write(true)
                    .open(&p)
                    .unwrap()
                    .set_modified(old)
                    .unwrap();
            }
        }
    }
    std::thread::sleep(Duration::from_millis(1100));
}

fn rebuild(dir: &Path, store_dir: &Path) -> bool {
    let store = Store::open(store_dir).unwrap();
    let text = fs::read_to_string(dir.join("kiln.toml")).unwrap();
    let spec = kiln_spec::parse(&text, "kiln.toml").unwrap();
    build_all(&store, &spec, dir, 0, &mut Quiet).unwrap()["app"].cached
}

fn bench(c: &mut Criterion) {
    let project = tempfile::tempdir().unwrap();
    let dir = project.path();
    write_project(dir);
    let store_dir = dir.join(".kiln/images");
    assert!(!rebuild(dir, &store_dir), "the first build is cold");
    assert!(rebuild(dir, &store_dir), "the second build is a hit");

    c.bench_function("no-op rebuild (20 MB binary + 200 files)", |b| {
        b.iter(|| assert!(rebuild(dir, &store_dir)))
    });

    let mut cold = c.benchmark_group("cold");
    cold.sample_size(10);
    cold.bench_function("cold build (20 MB binary + 200 files)", |b| {
        b.iter_batched(
            || tempfile::tempdir_in(dir).unwrap(),
            |fresh| assert!(!rebuild(dir, &fresh.path().join("store"))),
            BatchSize::PerIteration,
        )
    });
    cold.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
