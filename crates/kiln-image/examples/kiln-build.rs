//! Builds every `[image.NAME]` of a project with the library's builder, for
//! benchmarks and for trying the builder before the CLI wires it in.
//!
//! `cargo run --release -p kiln-image --example kiln-build -- PROJECT_DIR STORE_DIR`
//!
//! `SOURCE_DATE_EPOCH` (default 0) is read here, once, as the CLI will.
//! Prints one line per image: name, manifest digest, layers, size, cached.

use std::path::PathBuf;
use std::process::ExitCode;

use kiln_image::Store;
use kiln_image::build::build_all;
use kiln_image::progress::Bars;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [dir, store] = args.as_slice() else {
        eprintln!("usage: kiln-build PROJECT_DIR STORE_DIR");
        return ExitCode::from(2);
    };
    let epoch = match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(v) => match v.parse::<u64>() {
            Ok(n) => n,
            Err(_) => {
                eprintln!("error: SOURCE_DATE_EPOCH={v} is not a number of seconds");
                return ExitCode::from(2);
            }
        },
        Err(_) => 0,
    };
    let dir = PathBuf::from(dir);
    let spec_path = dir.join("kiln.toml");
    let text = match std::fs::read_to_string(&spec_path) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: cannot read {}: {e}", spec_path.display());
            return ExitCode::FAILURE;
        }
    };
    let spec = match kiln_spec::parse(&text, "kiln.toml") {
        Ok(s) => s,
        Err(d) => {
            eprintln!("error: kiln.toml is not valid: {d:?}");
            return ExitCode::FAILURE;
        }
    };
    let result = Store::open(&PathBuf::from(store))
        .and_then(|store| build_all(&store, &spec, &dir, epoch, &mut Bars::stderr()));
    match result {
        Ok(outcomes) => {
            for o in outcomes.values() {
                println!(
                    "{} {} layers={} size={} cached={}",
                    o.name, o.digest, o.layers, o.size, o.cached
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
