//! `kiln diff A B`: field-level differences between two generations.

use std::path::Path;

use anyhow::{Context, bail};
use kiln_engine::Project;
use kiln_engine::project::{decode_generation, load_generation};
use kiln_plan::{Generation, diff_values};
use serde::Serialize;

use crate::Outcome;
use crate::cmd::history::existing_store;
use crate::output::print_json;

#[derive(Serialize)]
struct DiffOutput<'a> {
    a: &'a str,
    b: &'a str,
    a_hash: String,
    b_hash: String,
    changes: Vec<kiln_plan::Change>,
}

fn side(project: &Project, which: &str) -> anyhow::Result<(String, Generation)> {
    if which == "spec" {
        return Ok(("the spec on disk".into(), project.generation()?));
    }
    let Some(store) = existing_store(project)? else {
        bail!(
            "no generations yet, so there is no `{which}` to compare\n  hint: compare against `spec` or apply first"
        );
    };
    let record = match which {
        "active" => store.active_generation()?.with_context(
            || "no generation is active\n  hint: `kiln history` lists the generations",
        )?,
        "latest" => store
            .latest_generation()?
            .with_context(|| "no generation exists yet")?,
        number => {
            let n: u64 = number.parse().map_err(|_| {
                anyhow::anyhow!("`{number}` is not a generation\n  hint: use a number from `kiln history`, `active`, `latest` or `spec`")
            })?;
            return Ok((format!("generation {n}"), load_generation(&store, n)?));
        }
    };
    Ok((
        format!("generation {}", record.number),
        decode_generation(&store, &record)?,
    ))
}

pub fn run(path: &Path, a: &str, b: &str, json: bool, color: bool) -> anyhow::Result<Outcome> {
    let project = Project::load(path)?;
    let (a_name, a_gen) = side(&project, a)?;
    let (b_name, b_gen) = side(&project, b)?;
    let changes = diff_values(&a_gen, &b_gen);
    if json {
        print_json(&DiffOutput {
            a,
            b,
            a_hash: a_gen.content_hash().0,
            b_hash: b_gen.content_hash().0,
            changes,
        });
        return Ok(Outcome::Success);
    }
    let paint = |code: &str, text: String| {
        if color {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text
        }
    };
    println!("{a_name} → {b_name}");
    if changes.is_empty() {
        println!("No differences.");
        return Ok(Outcome::Success);
    }
    let show =
        |v: &Option<serde_json::Value>| v.as_ref().map_or_else(String::new, |v| v.to_string());
    for c in &changes {
        let line = match (&c.old, &c.new) {
            (None, Some(_)) => paint("32", format!("  + {} = {}", c.path, show(&c.new))),
            (Some(_), None) => paint("31", format!("  - {} = {}", c.path, show(&c.old))),
            _ => paint(
                "33",
                format!("  ~ {}: {} → {}", c.path, show(&c.old), show(&c.new)),
            ),
        };
        println!("{line}");
    }
    println!(
        "{} change{}.",
        changes.len(),
        if changes.len() == 1 { "" } else { "s" }
    );
    Ok(Outcome::Success)
}
