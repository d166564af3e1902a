//! An image's `users` and `dirs`: what the maintainer scripts of Debian
//! packages would have created, which kiln never runs.
//!
//! With `users`, the layer gets `/etc/passwd` (a `root` line, then one line
//! per user, in spec order) and `/etc/group` (`root`, then a group per user
//! with the user's name and gid); no `/etc/shadow`: the accounts have no
//! password (`x`), an image has nobody to log in. Without `users` neither
//! file is written, so a base image's stay.
//!
//! `dirs` are directories with their mode and owner, added after packages
//! and copies: one that a package or a copy already has takes the declared
//! mode and owner; missing parents are 0755 and owned by root (the layer's
//! rule). A `dirs` path that the layer already has as a file or a link is
//! an error, as is one under a file.

use kiln_spec::model::Image;

use crate::layer::{EntryKind, Layer, LayerEntry, normalize};

/// `/etc/passwd` for `image.users`.
pub fn passwd(image: &Image) -> String {
    let mut out = String::from("root:x:0:0:root:/root:/bin/sh\n");
    for u in &image.users {
        out.push_str(&format!(
            "{}:x:{}:{}::{}:{}\n",
            u.name, u.uid, u.gid, u.home, u.shell
        ));
    }
    out
}

/// `/etc/group` for `image.users`.
pub fn group(image: &Image) -> String {
    let mut out = String::from("root:x:0:\n");
    for u in &image.users {
        out.push_str(&format!("{}:x:{}:\n", u.name, u.gid));
    }
    out
}

/// Adds the image's users and dirs to `layer`. The error says what is in
/// the way.
pub fn add_users_and_dirs(layer: &mut Layer, image: &Image) -> Result<(), String> {
    if !image.users.is_empty() {
        layer.insert("/etc/passwd", LayerEntry::bytes(passwd(image), 0o644))?;
        layer.insert("/etc/group", LayerEntry::bytes(group(image), 0o644))?;
    }
    for d in &image.dirs {
        let Some(path) = normalize(&d.path).map_err(|why| format!("`dirs`: {why}"))? else {
            return Err("`dirs` cannot change `/`".into());
        };
        if let Some(e) = layer.get(&path)
            && e.kind != EntryKind::Dir
        {
            return Err(format!(
                "`dirs` declares /{path}, which the image already has as a {}",
                match e.kind {
                    EntryKind::Symlink(_) => "symbolic link",
                    _ => "file",
                }
            ));
        }
        layer.insert(
            &path,
            LayerEntry {
                uid: u64::from(d.uid),
                gid: u64::from(d.gid),
                ..LayerEntry::dir(d.mode)
            },
        )?;
    }
    layer.check()
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_spec::model::{ImageDir, ImageSource, User};

    fn image() -> Image {
        Image {
            from: ImageSource::Scratch,
            copy: vec![],
            closure: false,
            debian: vec![],
            entrypoint: None,
            cmd: None,
            env: Default::default(),
            workdir: None,
            user: None,
            labels: Default::default(),
            expose: vec![],
            users: vec![User {
                name: "postgres".into(),
                uid: 999,
                gid: 998,
                home: "/var/lib/postgresql".into(),
                shell: "/bin/bash".into(),
            }],
            dirs: vec![ImageDir {
                path: "/var/lib/postgresql".into(),
                mode: 0o700,
                uid: 999,
                gid: 998,
            }],
        }
    }

    #[test]
    fn users_give_passwd_and_group_after_root() {
        let img = image();
        assert_eq!(
            passwd(&img),
            "root:x:0:0:root:/root:/bin/sh\npostgres:x:999:998::/var/lib/postgresql:/bin/bash\n"
        );
        assert_eq!(group(&img), "root:x:0:\npostgres:x:998:\n");
        let mut layer = Layer::new();
        add_users_and_dirs(&mut layer, &img).unwrap();
        let dir = layer.get("/var/lib/postgresql").unwrap();
        assert_eq!((dir.mode, dir.uid, dir.gid), (0o700, 999, 998));
        assert!(layer.get("/etc/passwd").is_some() && layer.get("/etc/group").is_some());
        assert!(layer.get("/etc/shadow").is_none());
        // Parents are implied: 0755, root.
        let all = layer.with_parents();
        assert_eq!(
            (all["var/lib"].mode, all["var/lib"].uid),
            (0o755, 0),
            "{all:?}"
        );
    }

    #[test]
    fn no_users_no_passwd_and_dirs_restate_existing_directories() {
        let mut img = image();
        img.users.clear();
        let mut layer = Layer::new();
        layer
            .insert("/var/lib/postgresql", LayerEntry::dir(0o755))
            .unwrap();
        add_users_and_dirs(&mut layer, &img).unwrap();
        assert!(layer.get("/etc/passwd").is_none());
        assert_eq!(layer.get("/var/lib/postgresql").unwrap().mode, 0o700);
    }

    #[test]
    fn a_dir_where_the_image_has_a_file_is_an_error() {
        let img = image();
        let mut layer = Layer::new();
        layer
            .insert("/var/lib/postgresql", LayerEntry::symlink("/srv"))
            .unwrap();
        let err = add_users_and_dirs(&mut layer, &img).unwrap_err();
        assert!(err.contains("symbolic link"), "{err}");
        let mut layer = Layer::new();
        layer
            .insert("/var/lib", LayerEntry::bytes("x", 0o644))
            .unwrap();
        let err = add_users_and_dirs(&mut layer, &img).unwrap_err();
        assert!(err.contains("not a directory"), "{err}");
    }
}
