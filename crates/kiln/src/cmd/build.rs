//! `kiln build`: build every `[image.NAME]` (reproducible, cached).

use std::path::Path;

use kiln_engine::Project;
use kiln_engine::images::source_date_epoch;
use kiln_image::progress::Bars;

use crate::Outcome;
use crate::output::print_json;

pub fn run(path: &Path, json: bool) -> anyhow::Result<Outcome> {
    let project = Project::load(path)?;
    let store = project.image_store()?;
    let epoch = source_date_epoch().map_err(anyhow::Error::msg)?;
    let mut bars = Bars::stderr();
    let outcomes =
        kiln_image::build::build_all(&store, &project.spec, &project.dir, epoch, &mut bars)?;
    if json {
        print_json(&outcomes.values().collect::<Vec<_>>());
        return Ok(Outcome::Success);
    }
    if outcomes.is_empty() {
        eprintln!(
            "{} declares no [image.NAME]: nothing to build.",
            project.spec_path.display()
        );
        return Ok(Outcome::Success);
    }
    println!(
        "{:<20} {:<71} {:>6} {:>10}  BUILD",
        "IMAGE", "DIGEST", "LAYERS", "SIZE"
    );
    for o in outcomes.values() {
        println!(
            "{:<20} {:<71} {:>6} {:>10}  {}",
            o.name,
            o.digest.to_string(),
            o.layers,
            human_size(o.size),
            if o.cached { "cached" } else { "built" }
        );
    }
    Ok(Outcome::Success)
}

/// `1.5 MiB`-style sizes for tables.
pub fn human_size(bytes: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < units.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", units[unit])
    }
}
