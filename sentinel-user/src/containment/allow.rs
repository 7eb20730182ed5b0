//! Allowed executables as the kernel names them: (device, inode) of the file each allowed path
//! leads to, symlinks followed. A package upgrade replaces a file with a new inode; the
//! directories holding the allowed files are watched, so the new inode is listed as soon as
//! the rename lands.

use std::{collections::BTreeSet, os::unix::fs::MetadataExt, path::PathBuf};

use sentinel_common::AllowedExecutable;

/// The allowed files of policy `policy` that exist now; the paths that lead to no regular
/// file are returned apart, to be reported.
pub(super) fn resolve(
    policy: u32,
    paths: &[PathBuf],
    allowed: &mut BTreeSet<AllowedExecutable>,
) -> Vec<PathBuf> {
    let mut missing = Vec::new();
    for path in paths {
        match std::fs::metadata(path) {
            Ok(meta) if meta.is_file() => {
                allowed.insert(AllowedExecutable {
                    policy,
                    _pad: 0,
                    dev: kernel_dev(meta.dev()),
                    ino: meta.ino(),
                });
            }
            _ => missing.push(path.clone()),
        }
    }
    missing
}

/// `st_dev` as the kernel keeps it in `super_block.s_dev`: `MKDEV(major, minor)`, the minor
/// in the low 20 bits.
pub(super) fn kernel_dev(st_dev: u64) -> u64 {
    (u64::from(libc::major(st_dev)) << 20) | u64::from(libc::minor(st_dev))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("sentinel-allow-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn symlinks_lead_to_their_file_and_a_replaced_file_gets_its_new_inode() {
        let dir = scratch("replace");
        let real = dir.join("tool");
        std::fs::write(&real, b"v1").unwrap();
        let link = dir.join("link");
        symlink(&real, &link).unwrap();
        let mut first = BTreeSet::new();
        assert!(resolve(3, std::slice::from_ref(&link), &mut first).is_empty());
        let old_inode = std::fs::metadata(&real).unwrap().ino();
        assert_eq!(
            first.iter().map(|a| (a.policy, a.ino)).collect::<Vec<_>>(),
            [(3, old_inode)]
        );

        // An upgrade: the new version written beside, then renamed over the old one.
        let staged = dir.join("tool.new");
        std::fs::write(&staged, b"v2").unwrap();
        std::fs::rename(&staged, &real).unwrap();
        let mut second = BTreeSet::new();
        assert!(resolve(3, &[link], &mut second).is_empty());
        let new_inode = std::fs::metadata(&real).unwrap().ino();
        assert_ne!(new_inode, old_inode);
        assert_eq!(
            second.iter().map(|a| a.ino).collect::<Vec<_>>(),
            [new_inode]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn missing_files_and_directories_are_set_apart() {
        let dir = scratch("missing");
        let mut allowed = BTreeSet::new();
        let missing = resolve(0, &[dir.join("absent"), dir.clone()], &mut allowed);
        assert_eq!(missing, [dir.join("absent"), dir.clone()]);
        assert!(allowed.is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_kernel_keeps_the_minor_in_the_low_twenty_bits() {
        // /dev/vda1 style: major 254, minor 1; and a minor above 255 (encoded apart by glibc).
        assert_eq!(kernel_dev(libc::makedev(254, 1)), (254 << 20) | 1);
        assert_eq!(kernel_dev(libc::makedev(8, 300)), (8 << 20) | 300);
    }
}
