//! The configuration applied to a fresh debootstrap tree: host name, fstab
//! for the virtio disk, a root account with an empty password (login prompt
//! on the serial console, no autologin), the test hook that reboots when the
//! kernel command line asks for it, and no first-boot wizard. Everything
//! written is listed in [`Recipe::files`] and [`Recipe::symlinks`], so the
//! image's cache key covers it.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use super::RootfsError;

/// Bump when the recipe changes in a way its file list does not show.
pub const RECIPE_VERSION: u32 = 1;
/// The guest's host name.
pub const HOSTNAME: &str = "vmm-guest";
/// The root device as the guest sees it (first virtio-blk disk).
pub const ROOT_DEVICE: &str = "/dev/vda";
/// Kernel command line word that enables the reboot hook.
pub const AUTOREBOOT_PARAM: &str = "vmm.autoreboot=1";
/// Console line the hook prints before rebooting.
pub const MARK_AUTOREBOOT: &str = "VMM-AUTOREBOOT";

const AUTOREBOOT_UNIT: &str = include_str!("../../rootfs/vmm-autoreboot.service");
const AUTOREBOOT_SCRIPT: &str = include_str!("../../rootfs/vmm-autoreboot");
const UNIT_DIR: &str = "etc/systemd/system";
/// Units masked (linked to /dev/null): the first-boot wizard would prompt
/// on the console; getty-static starts gettys on tty1-6, which nobody sees
/// on a serial-only machine; e2scrub_reap only cleans up after e2scrub; and
/// the early `modprobe@` loads of modules this machine has no use for at
/// boot (device mapper, EFI pstore, FUSE, loop; `modprobe` still loads them
/// on demand). Each is a process start, costly on one nested vCPU.
const MASKED: &[&str] = &[
    "systemd-firstboot.service",
    "getty-static.service",
    "e2scrub_reap.service",
    "modprobe@dm_mod.service",
    "modprobe@efi_pstore.service",
    "modprobe@fuse.service",
    "modprobe@loop.service",
];

/// Files and links written into the tree (paths relative to its root).
#[derive(Clone, Debug, Hash)]
pub struct Recipe {
    /// `(path, mode, contents)`.
    pub files: Vec<(String, u32, String)>,
    /// `(path, target)`.
    pub symlinks: Vec<(String, String)>,
}

impl Default for Recipe {
    fn default() -> Self {
        let fstab = format!(
            "# <file system> <mount point> <type> <options> <dump> <pass>\n\
             {ROOT_DEVICE} / ext4 rw,errors=remount-ro 0 1\n"
        );
        let hosts = format!("127.0.0.1\tlocalhost\n127.0.1.1\t{HOSTNAME}\n");
        Self {
            files: vec![
                ("etc/hostname".into(), 0o644, format!("{HOSTNAME}\n")),
                ("etc/hosts".into(), 0o644, hosts),
                ("etc/fstab".into(), 0o644, fstab),
                (
                    format!("{UNIT_DIR}/vmm-autoreboot.service"),
                    0o644,
                    AUTOREBOOT_UNIT.into(),
                ),
                (
                    "usr/local/sbin/vmm-autoreboot".into(),
                    0o755,
                    AUTOREBOOT_SCRIPT.into(),
                ),
            ],
            symlinks: vec![(
                format!("{UNIT_DIR}/multi-user.target.wants/vmm-autoreboot.service"),
                "/etc/systemd/system/vmm-autoreboot.service".into(),
            )]
            .into_iter()
            .chain(
                MASKED
                    .iter()
                    .map(|u| (format!("{UNIT_DIR}/{u}"), "/dev/null".into())),
            )
            .collect(),
        }
    }
}

/// `/etc/shadow` with root's password field emptied: `login` on the
/// console accepts root with no password (Debian's pam_unix has `nullok`).
pub fn shadow_without_root_password(shadow: &str) -> String {
    let mut out = String::with_capacity(shadow.len());
    for line in shadow.lines() {
        match line.strip_prefix("root:").and_then(|r| r.split_once(':')) {
            Some((_, rest)) => {
                out.push_str("root::");
                out.push_str(rest);
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> RootfsError + '_ {
    move |source| RootfsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl Recipe {
    /// Writes the recipe into the tree at `root`.
    pub fn apply(&self, root: &Path) -> Result<(), RootfsError> {
        for (rel, mode, text) in &self.files {
            let path = root.join(rel);
            if let Some(dir) = path.parent() {
                fs::create_dir_all(dir).map_err(io_err(dir))?;
            }
            // A symlink left by a package would be followed by fs::write.
            let _ = fs::remove_file(&path);
            fs::write(&path, text).map_err(io_err(&path))?;
            fs::set_permissions(&path, fs::Permissions::from_mode(*mode)).map_err(io_err(&path))?;
        }
        for (rel, target) in &self.symlinks {
            let path = root.join(rel);
            if let Some(dir) = path.parent() {
                fs::create_dir_all(dir).map_err(io_err(dir))?;
            }
            let _ = fs::remove_file(&path);
            std::os::unix::fs::symlink(target, &path).map_err(io_err(&path))?;
        }
        let shadow = root.join("etc/shadow");
        let text = fs::read_to_string(&shadow).map_err(io_err(&shadow))?;
        fs::write(&shadow, shadow_without_root_password(&text)).map_err(io_err(&shadow))?;
        // Downloaded .debs are not part of the system (apt-get clean).
        let archives = root.join("var/cache/apt/archives");
        if let Ok(rd) = fs::read_dir(&archives) {
            for e in rd.filter_map(Result::ok) {
                if e.path().extension().is_some_and(|x| x == "deb") {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_password_is_emptied_only_for_root() {
        let s = "root:*:20783:0:99999:7:::\nroots:!:1::::::\ndaemon:*:20783:0:99999:7:::\n";
        assert_eq!(
            shadow_without_root_password(s),
            "root::20783:0:99999:7:::\nroots:!:1::::::\ndaemon:*:20783:0:99999:7:::\n"
        );
    }

    #[test]
    fn recipe_writes_files_links_and_shadow() {
        let dir = std::env::temp_dir().join(format!("rootfs-recipe-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("etc")).unwrap();
        fs::write(dir.join("etc/shadow"), "root:*:1:0:99999:7:::\n").unwrap();
        fs::create_dir_all(dir.join("var/cache/apt/archives")).unwrap();
        fs::write(dir.join("var/cache/apt/archives/a_1_amd64.deb"), "x").unwrap();
        Recipe::default().apply(&dir).unwrap();
        assert_eq!(
            fs::read_to_string(dir.join("etc/shadow")).unwrap(),
            "root::1:0:99999:7:::\n"
        );
        let fstab = fs::read_to_string(dir.join("etc/fstab")).unwrap();
        assert!(fstab.contains("/dev/vda / ext4 rw,errors=remount-ro 0 1"));
        let unit =
            fs::read_to_string(dir.join(format!("{UNIT_DIR}/vmm-autoreboot.service"))).unwrap();
        assert!(unit.contains(&format!("ConditionKernelCommandLine={AUTOREBOOT_PARAM}")));
        let script = dir.join("usr/local/sbin/vmm-autoreboot");
        assert_eq!(
            fs::metadata(&script).unwrap().permissions().mode() & 0o777,
            0o755
        );
        assert!(fs::read_to_string(&script)
            .unwrap()
            .contains(MARK_AUTOREBOOT));
        let link = dir.join(format!(
            "{UNIT_DIR}/multi-user.target.wants/vmm-autoreboot.service"
        ));
        assert_eq!(
            fs::read_link(link).unwrap(),
            Path::new("/etc/systemd/system/vmm-autoreboot.service")
        );
        assert!(!dir.join("var/cache/apt/archives/a_1_amd64.deb").exists());
        fs::remove_dir_all(&dir).unwrap();
    }
}
