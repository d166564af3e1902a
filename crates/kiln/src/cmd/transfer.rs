//! `kiln image import|export|push|pull`: moving images in and out.

use std::fs::File;
use std::io::{BufReader, BufWriter, Write};
use std::path::Path;

use anyhow::{Context, bail};
use kiln_image::Store;
use kiln_image::registry::{Credentials, Reference, TransferOptions};

use crate::Outcome;
use crate::cli::{ExportFormat, RegistryArgs};

pub fn import(store: &Store, path: &Path, name: Option<&str>) -> anyhow::Result<Outcome> {
    let images = if path.is_dir() {
        store.import_oci_layout(path, None)?
    } else {
        let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        store.import_docker_archive(BufReader::new(file))?
    };
    if images.is_empty() {
        bail!("{} holds no image", path.display());
    }
    if let Some(name) = name {
        if images.len() != 1 {
            bail!(
                "{} holds {} images; --name needs exactly one",
                path.display(),
                images.len()
            );
        }
        store.tag(name, &images[0].1.descriptor())?;
    }
    for (image_name, image) in &images {
        let shown = name.or(image_name.as_deref()).unwrap_or("(unnamed)");
        println!("{}  {shown}", image.digest);
    }
    Ok(Outcome::Success)
}

pub fn export(
    store: &Store,
    reference: &str,
    output: &Path,
    format: ExportFormat,
    tag: Option<&str>,
) -> anyhow::Result<Outcome> {
    let image = store.image(reference)?;
    let default_tag = format!("kiln:{}", image.digest.short());
    match format {
        ExportFormat::Oci => {
            let name = tag.unwrap_or(if reference.starts_with("sha256:") {
                "latest"
            } else {
                reference
            });
            store.export_oci_layout(&image, output, name)?;
            eprintln!(
                "exported {} to OCI layout {} as `{name}`",
                image.digest,
                output.display()
            );
        }
        ExportFormat::Docker => {
            let repo_tag = tag.map_or(default_tag, str::to_owned);
            let file = File::create(output)
                .with_context(|| format!("cannot create {}", output.display()))?;
            let mut out = BufWriter::new(file);
            store.export_docker_archive(&image, &repo_tag, &mut out)?;
            out.flush()
                .with_context(|| format!("cannot write {}", output.display()))?;
            eprintln!(
                "exported {} to {} as {repo_tag} (docker load -i {})",
                image.digest,
                output.display(),
                output.display()
            );
        }
    }
    Ok(Outcome::Success)
}

fn options(args: &RegistryArgs) -> anyhow::Result<TransferOptions<'static>> {
    let credentials = match &args.username {
        None => None,
        Some(user) => {
            let password = std::env::var(&args.password_env).map_err(|_| {
                anyhow::anyhow!(
                    "--username needs a password in ${}\n  hint: export {}=…",
                    args.password_env,
                    args.password_env
                )
            })?;
            Some(Credentials {
                username: user.clone(),
                password,
            })
        }
    };
    Ok(TransferOptions {
        insecure: args.insecure,
        credentials,
        progress: None,
    })
}

pub fn push(
    store: &Store,
    reference: &str,
    target: &str,
    args: &RegistryArgs,
) -> anyhow::Result<Outcome> {
    let image = store.image(reference)?;
    let target: Reference = target.parse()?;
    let report = kiln_image::registry::push(store, &image, &target, options(args)?)?;
    println!("{}", report.reference);
    eprintln!(
        "pushed {}: {} blob(s) uploaded, {} already there{}",
        image.digest,
        report.blobs_uploaded,
        report.blobs_existing,
        report
            .signature
            .map(|s| format!(", signature at {s}"))
            .unwrap_or_default()
    );
    Ok(Outcome::Success)
}

pub fn pull(
    store: &Store,
    source: &str,
    name: Option<&str>,
    args: &RegistryArgs,
) -> anyhow::Result<Outcome> {
    let source: Reference = source.parse()?;
    let local = name.map(str::to_owned).unwrap_or_else(|| {
        source
            .repository
            .rsplit('/')
            .next()
            .unwrap_or(&source.repository)
            .to_owned()
    });
    let image = kiln_image::registry::pull(store, &source, Some(&local), options(args)?)?;
    println!("{}  {local}", image.digest);
    Ok(Outcome::Success)
}
