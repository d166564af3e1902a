//! `kiln lock`: pin each image's Debian packages in `kiln.lock`.
//!
//! Without `--update`, images already pinned for the same `debian` list keep
//! their entries and only the others are resolved; with `--update`, the
//! package lists are refreshed and every image is resolved again. Either
//! way the change is printed as a diff (`~ db: libpq5 15.8-0+deb12u1 ->
//! 15.10-0+deb12u1`) on stdout, and images that no longer declare packages
//! leave the lock.

use std::path::Path;

use kiln_engine::Project;
use kiln_image::debian::{self, Apt, Lock};

use crate::Outcome;

pub fn run(path: &Path, update: bool) -> anyhow::Result<Outcome> {
    let project = Project::load(path)?;
    let lock_path = debian::lock_path(&project.dir);
    let existing = Lock::read(&lock_path)?;
    let old = existing.clone().unwrap_or_default();
    let wanted: Vec<(&String, &Vec<String>)> = project
        .spec
        .images
        .iter()
        .filter(|(_, image)| !image.debian.is_empty())
        .map(|(name, image)| (name, &image.debian))
        .collect();
    if wanted.is_empty() && existing.is_none() {
        eprintln!(
            "{} declares no `debian` packages: there is nothing to lock.",
            project.spec_path.display()
        );
        return Ok(Outcome::Success);
    }
    let store = project.image_store()?;
    let mut apt = Apt::open(&store.kiln_dir().join("debian"))?;
    if update {
        eprintln!("Refreshing the package lists (apt-get update in a private state)…");
        apt.update()?;
    }
    let mut new = Lock::default();
    for (image, requested) in wanted {
        match old.images.get(image.as_str()) {
            Some(entry) if !update && debian::is_locked(&old, image, requested) => {
                new.images.insert(image.clone(), entry.clone());
            }
            _ => {
                let packages = debian::locked_packages(&mut new, &mut apt, image, requested)?;
                eprintln!("Resolved image `{image}`: {} packages.", packages.len());
            }
        }
    }
    for line in old.diff(&new) {
        println!("{line}");
    }
    if existing.as_ref() == Some(&new) {
        eprintln!("{} is up to date.", lock_path.display());
    } else {
        new.write(&lock_path)?;
        eprintln!("Wrote {}.", lock_path.display());
    }
    Ok(Outcome::Success)
}
