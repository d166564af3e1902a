//! `kiln image …`: the image store's verbs. Transfers (import, export, push,
//! pull) are in `transfer.rs`.

use std::path::PathBuf;

use anyhow::{Context, bail};
use kiln_engine::Project;
use kiln_image::Store;
use kiln_image::image::descriptor_digest;
use serde::Serialize;

use crate::Outcome;
use crate::cli::{ImageCommand, StoreArgs};
use crate::cmd::build::human_size;
use crate::cmd::key::password_from;
use crate::cmd::transfer;
use crate::output::print_json;

/// Opens the store `args` points at.
pub fn open_store(args: &StoreArgs) -> anyhow::Result<Store> {
    let dir = match &args.store {
        Some(dir) => dir.clone(),
        None => project_dir(&args.project).map_or_else(
            || kiln_engine::project::image_store_dir_for(&args.project),
            |p| p.image_store_dir(),
        ),
    };
    Ok(Store::open(&dir)?)
}

/// The project at `path`, if there is a kiln.toml there.
fn project_dir(path: &std::path::Path) -> Option<Project> {
    let file = if path.is_dir() {
        path.join("kiln.toml")
    } else {
        path.to_path_buf()
    };
    file.is_file().then(|| Project::load(path).ok()).flatten()
}

#[derive(Serialize)]
struct Listed {
    name: String,
    digest: String,
    size: u64,
    layers: usize,
    created: Option<String>,
    signed: bool,
}

pub fn run(cmd: ImageCommand) -> anyhow::Result<Outcome> {
    match cmd {
        ImageCommand::Ls { store, json } => ls(&open_store(&store)?, json),
        ImageCommand::Inspect {
            reference,
            store,
            json,
        } => inspect(&open_store(&store)?, &reference, json),
        ImageCommand::Rm { references, store } => {
            let store = open_store(&store)?;
            for r in &references {
                if !store.untag(r)? {
                    bail!(
                        "no image named `{r}`\n  hint: `kiln image ls` lists the names; blobs are removed by `kiln image gc`"
                    );
                }
                eprintln!("untagged {r}");
            }
            Ok(Outcome::Success)
        }
        ImageCommand::Gc {
            dry_run,
            grace,
            store: args,
        } => gc(&args, dry_run, grace),
        ImageCommand::Verify {
            reference,
            keys,
            store,
        } => verify(&open_store(&store)?, reference.as_deref(), &keys),
        ImageCommand::Sign {
            reference,
            key,
            password_env,
            store,
        } => {
            let store = open_store(&store)?;
            let image = store.image(&reference)?;
            let password = password_from(password_env.as_deref())?;
            let sig = kiln_image::sign::sign(&store, &image, &key, password.as_deref())?;
            println!("{}", sig.path.display());
            eprintln!("signed {} with key {}", image.digest, sig.key_id);
            Ok(Outcome::Success)
        }
        ImageCommand::Sbom { reference, store } => {
            let store = open_store(&store)?;
            let image = store.image(&reference)?;
            let doc = match kiln_image::sbom::read_sbom(&store, &image.digest)? {
                Some(doc) => doc,
                None => kiln_image::sbom::sbom(&store, &image, &Default::default())?,
            };
            print_json(&doc);
            Ok(Outcome::Success)
        }
        ImageCommand::Import { path, name, store } => {
            transfer::import(&open_store(&store)?, &path, name.as_deref())
        }
        ImageCommand::Export {
            reference,
            output,
            format,
            tag,
            store,
        } => transfer::export(
            &open_store(&store)?,
            &reference,
            &output,
            format,
            tag.as_deref(),
        ),
        ImageCommand::Push {
            reference,
            target,
            registry,
            store,
        } => transfer::push(&open_store(&store)?, &reference, &target, &registry),
        ImageCommand::Pull {
            source,
            name,
            registry,
            store,
        } => transfer::pull(&open_store(&store)?, &source, name.as_deref(), &registry),
    }
}

fn ls(store: &Store, json: bool) -> anyhow::Result<Outcome> {
    let mut rows = Vec::new();
    for (name, descriptor) in store.names()? {
        let digest = descriptor_digest(&descriptor)?;
        let image = store
            .load_image(&digest)
            .with_context(|| format!("image `{name}`"))?;
        let size = image.manifest_bytes.len() as u64
            + image.manifest.config().size()
            + image.layers().iter().map(|l| l.size()).sum::<u64>();
        rows.push(Listed {
            name,
            digest: digest.to_string(),
            size,
            layers: image.layers().len(),
            created: image.config.created().clone(),
            signed: kiln_image::sign::signature_path(store, &digest).is_file(),
        });
    }
    if json {
        print_json(&rows);
        return Ok(Outcome::Success);
    }
    if rows.is_empty() {
        eprintln!("No images in {}.", store.root().display());
        return Ok(Outcome::Success);
    }
    println!(
        "{:<24} {:<19} {:>6} {:>10}  SIGNED",
        "NAME", "DIGEST", "LAYERS", "SIZE"
    );
    for r in rows {
        println!(
            "{:<24} {:<19} {:>6} {:>10}  {}",
            r.name,
            format!("sha256:{}", &r.digest[7..19]),
            r.layers,
            human_size(r.size),
            if r.signed { "yes" } else { "no" }
        );
    }
    Ok(Outcome::Success)
}

fn inspect(store: &Store, reference: &str, json: bool) -> anyhow::Result<Outcome> {
    let image = store.image(reference)?;
    if json {
        let manifest: serde_json::Value = serde_json::from_slice(&image.manifest_bytes)?;
        print_json(&serde_json::json!({
            "digest": image.digest.to_string(),
            "manifest": manifest,
            "config_digest": image.config_digest.to_string(),
            "config": image.config,
        }));
        return Ok(Outcome::Success);
    }
    let config = image.config.config().clone().unwrap_or_default();
    println!("digest:      {}", image.digest);
    println!("config:      {}", image.config_digest);
    println!(
        "platform:    {}/{}",
        image.config.os(),
        image.config.architecture()
    );
    if let Some(created) = image.config.created() {
        println!("created:     {created}");
    }
    println!(
        "entrypoint:  {:?}",
        config.entrypoint().clone().unwrap_or_default()
    );
    println!(
        "cmd:         {:?}",
        config.cmd().clone().unwrap_or_default()
    );
    for env in config.env().clone().unwrap_or_default() {
        println!("env:         {env}");
    }
    if let Some(dir) = config.working_dir() {
        println!("workdir:     {dir}");
    }
    for layer in image.layers() {
        println!(
            "layer:       {} {:>10}  {}",
            layer.digest(),
            human_size(layer.size()),
            layer.media_type()
        );
    }
    Ok(Outcome::Success)
}

fn gc(args: &StoreArgs, dry_run: bool, grace: std::time::Duration) -> anyhow::Result<Outcome> {
    let store = open_store(args)?;
    // Every image a retained generation of this project names is a root:
    // rolling back to it must never need a rebuild or a pull.
    let mut roots = Vec::new();
    if let Some(project) = project_dir(&args.project) {
        let db = project.state_dir().join(kiln_state::DB_FILE);
        if db.exists() {
            let state = kiln_state::Store::open(&project.state_dir())?;
            for summary in state.list_generations()? {
                let generation = kiln_engine::project::load_generation(&state, summary.number)?;
                for digest in generation.resolved.images.values() {
                    roots.push(
                        digest
                            .0
                            .parse()
                            .map_err(|e: kiln_image::digest::BadDigest| anyhow::anyhow!(e))?,
                    );
                }
            }
        }
    }
    let report = store.gc_with_grace(&roots, dry_run, grace)?;
    let verb = if dry_run { "would remove" } else { "removed" };
    eprintln!(
        "{verb} {} blob{} ({}), {} unpacked root{}; kept {} reachable blob{} ({} recent, within the grace period)",
        report.removed_blobs.len(),
        if report.removed_blobs.len() == 1 {
            ""
        } else {
            "s"
        },
        human_size(report.freed_bytes),
        report.removed_rootfs.len(),
        if report.removed_rootfs.len() == 1 {
            ""
        } else {
            "s"
        },
        report.reachable,
        if report.reachable == 1 { "" } else { "s" },
        report.kept_recent,
    );
    for d in &report.removed_blobs {
        println!("{d}");
    }
    if !report.missing.is_empty() {
        eprintln!(
            "warning: {} blob(s) needed by retained images are missing; `kiln image verify` lists them",
            report.missing.len()
        );
    }
    Ok(Outcome::Success)
}

fn verify(store: &Store, reference: Option<&str>, keys: &[PathBuf]) -> anyhow::Result<Outcome> {
    if let Some(reference) = reference {
        let image = store.image(reference)?;
        if keys.is_empty() {
            // Loading verified the manifest and config; check the layers too.
            for layer in image.layers() {
                store.read_blob(&descriptor_digest(layer)?)?;
            }
            eprintln!("{reference} ({}) is intact", image.digest);
            return Ok(Outcome::Success);
        }
        let by = kiln_image::sign::verify(store, &image, keys)?;
        eprintln!(
            "{reference} ({}) is signed by trusted key {} ({})",
            image.digest,
            by.key_id,
            by.key_path.display()
        );
        return Ok(Outcome::Success);
    }
    let report = store.verify_all()?;
    eprintln!(
        "checked {} blob{} ({}) and {} image{} in {:.2}s ({}/s)",
        report.blobs,
        if report.blobs == 1 { "" } else { "s" },
        human_size(report.bytes),
        report.images,
        if report.images == 1 { "" } else { "s" },
        report.elapsed.as_secs_f64(),
        human_size(report.bytes_per_sec() as u64),
    );
    for (digest, path) in &report.corrupt {
        println!("corrupt  {digest}  {}", path.display());
    }
    for p in &report.problems {
        println!("problem  {p}");
    }
    if !report.ok() {
        bail!(
            "the image store {} is damaged: {} corrupt blob(s), {} problem(s)\n  hint: remove the damaged images (`kiln image rm`) and rebuild, re-import or re-pull them",
            store.root().display(),
            report.corrupt.len(),
            report.problems.len()
        );
    }
    Ok(Outcome::Success)
}
