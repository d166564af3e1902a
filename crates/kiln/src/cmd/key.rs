//! `kiln key generate`: minisign key pairs for signing images.

use crate::Outcome;
use crate::cli::KeyCommand;

pub fn run(cmd: KeyCommand) -> anyhow::Result<Outcome> {
    match cmd {
        KeyCommand::Generate {
            name,
            dir,
            password_env,
        } => {
            let password = password_from(password_env.as_deref())?;
            let pair = kiln_image::sign::generate_keypair(&dir, &name, password.as_deref())?;
            println!("{}", pair.public_key.display());
            eprintln!(
                "key {} generated: secret {} (keep it private), public {} (list it in [policy] trusted_keys)",
                pair.key_id,
                pair.secret_key.display(),
                pair.public_key.display()
            );
            Ok(Outcome::Success)
        }
    }
}

/// Reads a password from the named environment variable, if one is named.
pub fn password_from(var: Option<&str>) -> anyhow::Result<Option<String>> {
    match var {
        None => Ok(None),
        Some(var) => match std::env::var(var) {
            Ok(p) => Ok(Some(p)),
            Err(_) => anyhow::bail!(
                "environment variable `{var}` is not set\n  hint: export {var}=… or leave out --password-env"
            ),
        },
    }
}
