//! Finding the cgroup2 mount: `/sys/fs/cgroup` on unified hosts, elsewhere on hybrid ones
//! (for example `/sys/fs/cgroup/unified`).

use std::path::PathBuf;

use crate::Error;

pub fn find_cgroup2_mount() -> Result<PathBuf, Error> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
    cgroup2_mount_in(&mountinfo).ok_or(Error::NoCgroup2)
}

/// The mount point of the first cgroup2 mount of the hierarchy's root in `mountinfo` text.
fn cgroup2_mount_in(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (mount, filesystem) = line.split_once(" - ")?;
        if filesystem.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        let mut fields = mount.split_whitespace().skip(3);
        let root = fields.next()?;
        let mount_point = fields.next()?;
        (root == "/").then(|| PathBuf::from(unescape_octal(mount_point)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_octal(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|digits| {
            std::str::from_utf8(digits)
                .ok()
                .and_then(|s| u8::from_str_radix(s, 8).ok())
        });
        match (bytes[i], octal) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                i += 4;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
25 1 0:23 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
26 25 0:24 / /sys/fs/cgroup/unified rw,nosuid shared:5 - cgroup2 cgroup2 rw,nsdelegate
27 25 0:25 / /sys/fs/cgroup/memory rw,nosuid - cgroup cgroup rw,memory
";

    #[test]
    fn finds_the_hybrid_mount() {
        assert_eq!(
            cgroup2_mount_in(HYBRID),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn skips_bind_mounts_of_subtrees_and_unescapes() {
        let info = "\
30 1 0:26 /system.slice /mnt/sub rw - cgroup2 cgroup2 rw
31 1 0:26 / /mnt/cg\\040two rw - cgroup2 cgroup2 rw
";
        assert_eq!(cgroup2_mount_in(info), Some(PathBuf::from("/mnt/cg two")));
    }

    #[test]
    fn none_without_cgroup2() {
        assert_eq!(
            cgroup2_mount_in("27 25 0:25 / /sys/fs/cgroup/memory rw - cgroup cgroup rw\n"),
            None
        );
    }
}
