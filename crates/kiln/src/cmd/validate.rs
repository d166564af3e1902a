//! `kiln validate [PATH]`: exit 0 when the spec is valid, 1 with every
//! problem otherwise.

use std::path::Path;

use crate::Outcome;
use crate::output::print_json;

pub fn run(path: &Path, json: bool, _color_err: bool) -> anyhow::Result<Outcome> {
    let (file, spec) = kiln_spec::load(path)?;
    if json {
        print_json(&spec);
    } else {
        eprintln!(
            "{} is valid: {} image{}, {} service{}, {} volume{}, {} route{}",
            file.display(),
            spec.images.len(),
            plural(spec.images.len()),
            spec.services.len(),
            plural(spec.services.len()),
            spec.volumes.len(),
            plural(spec.volumes.len()),
            spec.routes.len(),
            plural(spec.routes.len()),
        );
    }
    Ok(Outcome::Success)
}

pub fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}
