//! `kiln history`: the generations of a project, oldest first.

use std::path::Path;

use kiln_engine::Project;
use kiln_state::Store;

use crate::Outcome;
use crate::output::print_json;

/// Opens the project's store only if it exists: read-only commands never
/// create `.kiln/`.
pub fn existing_store(project: &Project) -> anyhow::Result<Option<Store>> {
    let dir = project.state_dir();
    if !dir.join(kiln_state::DB_FILE).exists() {
        return Ok(None);
    }
    Ok(Some(Store::open(&dir)?))
}

pub fn run(path: &Path, json: bool) -> anyhow::Result<Outcome> {
    let generations = match existing_store(&Project::load(path)?)? {
        Some(store) => store.list_generations()?,
        None => Vec::new(),
    };
    if json {
        print_json(&generations);
        return Ok(Outcome::Success);
    }
    if generations.is_empty() {
        eprintln!("No generations yet: nothing has been applied to this project.");
        return Ok(Outcome::Success);
    }
    println!(
        "{:<5} {:<24} {:<9} {:<12} {:<19} MESSAGE",
        "GEN", "CREATED", "ORIGIN", "STATUS", "HASH"
    );
    for g in &generations {
        let origin = match g.rollback_of {
            Some(of) => format!("rollback:{of}"),
            None => g.origin.as_str().to_owned(),
        };
        let status = g.status.map_or("-", |s| s.as_str());
        let hash = g.hash.strip_prefix("sha256:").unwrap_or(&g.hash);
        println!(
            "{:<5} {:<24} {:<9} {:<12} {:<19} {}",
            g.number,
            g.created_at,
            origin,
            status,
            format!("sha256:{}", &hash[..hash.len().min(12)]),
            g.message.as_deref().unwrap_or("")
        );
    }
    Ok(Outcome::Success)
}
