//! `kiln plan`: resolve the spec, read what runs, print what applying would
//! do. Reads the store if it exists and never writes anything.

use std::path::Path;

use kiln_engine::Project;
use kiln_plan::{Observed, plan, render::render_plan};
use serde::Serialize;

use crate::Outcome;
use crate::cmd::history::existing_store;
use crate::output::print_json;

#[derive(Serialize)]
struct PlanOutput<'a> {
    project: &'a str,
    summary: kiln_plan::Summary,
    #[serde(flatten)]
    plan: &'a kiln_plan::Plan,
}

pub fn run(path: &Path, json: bool, detailed: bool, color: bool) -> anyhow::Result<Outcome> {
    let project = Project::load(path)?;
    let generation = project.generation()?;
    let observed = match existing_store(&project)? {
        Some(store) => kiln_engine::project::observed(&store)?,
        None => Observed::default(),
    };
    let plan = plan(&generation, &observed);
    if json {
        print_json(&PlanOutput {
            project: &project.spec.project.name,
            summary: plan.summary(),
            plan: &plan,
        });
    } else {
        print!("{}", render_plan(&plan, color));
    }
    Ok(if detailed && !plan.is_empty() {
        Outcome::Changes
    } else {
        Outcome::Success
    })
}
