//! Disk images for virtio-blk runs, made and checked by the VMM's host.
//!
//! [`script`] writes the POSIX sh that [`crate::Harness::run_vmm_script`]
//! runs where the VMM runs (L1 when nested): it creates each [`Disk`] in
//! the scratch directory (sparse, optionally with random data at its
//! start), prints `HOST-MD5 <tag> <md5>` for byte ranges before the VMM
//! runs, runs the VMM with a `--disk` per disk, then prints the ranges
//! asked for afterwards and each image's allocated size
//! (`HOST-BLOCKS <name> <512-byte blocks>`), and exits with the VMM's
//! status. Guest scenarios print `BLK-GUEST-MD5 <tag> <md5>` for the same
//! ranges; [`tagged`] reads both back off the console.

use std::fmt::Write as _;

use crate::l1::sh_quote;

/// Host-side checksum line: `HOST-MD5 <tag> <md5>`.
pub const MARK_HOST_MD5: &str = "HOST-MD5";
/// Allocated 512-byte blocks of an image after the VMM exited.
pub const MARK_HOST_BLOCKS: &str = "HOST-BLOCKS";
/// The VMM's exit status inside the script.
pub const MARK_HOST_VMM_RC: &str = "HOST-VMM-RC";
/// Guest-side checksum line printed by the `blk-*` scenarios.
pub const MARK_GUEST_MD5: &str = "BLK-GUEST-MD5";

/// One raw image the VMM gets as `--disk`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Disk {
    /// File name in the scratch directory.
    pub name: String,
    pub size_mib: u64,
    /// The serial (`id=`); the VMM defaults it to the file name.
    pub id: Option<String>,
    pub readonly: bool,
    /// MiB of random data written at offset 0 before the VMM starts.
    pub random_head_mib: u64,
    /// `queues=` (default: the VMM's, one per vCPU).
    pub queues: Option<u32>,
}

impl Disk {
    /// A sparse image of `size_mib` MiB named `name`.
    pub fn new(name: &str, size_mib: u64) -> Self {
        Self {
            name: name.into(),
            size_mib,
            id: None,
            readonly: false,
            random_head_mib: 0,
            queues: None,
        }
    }

    pub fn id(mut self, id: &str) -> Self {
        self.id = Some(id.into());
        self
    }

    pub fn readonly(mut self) -> Self {
        self.readonly = true;
        self
    }

    pub fn random_head(mut self, mib: u64) -> Self {
        self.random_head_mib = mib;
        self
    }

    pub fn queues(mut self, n: u32) -> Self {
        self.queues = Some(n);
        self
    }

    /// The image's path under `dir`.
    pub fn path(&self, dir: &str) -> String {
        format!("{}/{}", dir.trim_end_matches('/'), self.name)
    }

    /// The value of the VMM's `--disk` option.
    pub fn vmm_arg(&self, dir: &str) -> String {
        let mut s = format!("path={}", self.path(dir));
        if self.readonly {
            s.push_str(",readonly=on");
        }
        if let Some(id) = &self.id {
            let _ = write!(s, ",id={id}");
        }
        if let Some(q) = self.queues {
            let _ = write!(s, ",queues={q}");
        }
        s
    }

    /// Shell lines creating the image.
    fn create(&self, dir: &str) -> String {
        create_image_lines(&self.path(dir), self.size_mib, self.random_head_mib)
    }
}

/// Shell lines that create a sparse raw image of `size_mib` MiB at `path`
/// whose first `random_head_mib` MiB are random (exit 90/91 on failure).
pub fn create_image_lines(path: &str, size_mib: u64, random_head_mib: u64) -> String {
    let p = sh_quote(path);
    let mut s = format!("rm -f {p}\ntruncate -s {size_mib}M {p} || exit 90\n");
    if random_head_mib > 0 {
        let _ = writeln!(
            s,
            "dd if=/dev/urandom of={p} bs=1M count={random_head_mib} conv=notrunc 2>/dev/null || exit 91"
        );
    }
    s
}

/// A MiB-aligned byte range whose md5 the script prints as
/// `HOST-MD5 <tag> <md5>`; without a disk, the md5 of that many zero bytes
/// (the reference for discarded ranges).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Md5Range {
    pub tag: String,
    pub disk: Option<String>,
    pub off_mib: u64,
    pub len_mib: u64,
}

impl Md5Range {
    /// `len_mib` MiB at `off_mib` of the disk named `disk`.
    pub fn of(tag: &str, disk: &str, off_mib: u64, len_mib: u64) -> Self {
        Self {
            tag: tag.into(),
            disk: Some(disk.into()),
            off_mib,
            len_mib,
        }
    }

    /// `len_mib` MiB of zeroes.
    pub fn zeroes(tag: &str, len_mib: u64) -> Self {
        Self {
            tag: tag.into(),
            disk: None,
            off_mib: 0,
            len_mib,
        }
    }

    fn line(&self, dir: &str) -> String {
        let src = match &self.disk {
            Some(d) => sh_quote(&format!("{}/{d}", dir.trim_end_matches('/'))),
            None => "/dev/zero".into(),
        };
        format!(
            "echo \"{MARK_HOST_MD5} {} $(dd if={src} bs=1M skip={} count={} 2>/dev/null | md5sum | cut -d' ' -f1)\"\n",
            self.tag, self.off_mib, self.len_mib
        )
    }
}

/// The host-side script: create `disks` in `dir`, print `before`, run
/// `vmm_argv` plus a `--disk` per disk, print `after` and each image's
/// allocated blocks, exit with the VMM's status.
pub fn script(
    dir: &str,
    disks: &[Disk],
    before: &[Md5Range],
    vmm_argv: &[String],
    after: &[Md5Range],
) -> String {
    let mut s = String::new();
    for d in disks {
        s.push_str(&d.create(dir));
    }
    for r in before {
        s.push_str(&r.line(dir));
    }
    let mut argv: Vec<String> = vmm_argv.to_vec();
    for d in disks {
        argv.push("--disk".into());
        argv.push(d.vmm_arg(dir));
    }
    let line: Vec<String> = argv.iter().map(|a| sh_quote(a)).collect();
    let _ = writeln!(s, "{} </dev/null\nrc=$?", line.join(" "));
    let _ = writeln!(s, "echo \"{MARK_HOST_VMM_RC}=$rc\"");
    for r in after {
        s.push_str(&r.line(dir));
    }
    for d in disks {
        let _ = writeln!(
            s,
            "echo \"{MARK_HOST_BLOCKS} {} $(stat -c %b {})\"",
            d.name,
            sh_quote(&d.path(dir))
        );
    }
    s.push_str("exit $rc\n");
    s
}

/// The word after `<mark> <tag> ` on the last console line carrying it.
pub fn tagged(console: &str, mark: &str, tag: &str) -> Option<String> {
    let key = format!("{mark} {tag} ");
    console.lines().rev().find_map(|l| {
        let rest = &l[l.find(&key)? + key.len()..];
        rest.split_whitespace().next().map(str::to_string)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn disk_args() {
        let d = Disk::new("a.img", 64).id("blk-a").readonly().queues(2);
        assert_eq!(
            d.vmm_arg("/tmp/"),
            "path=/tmp/a.img,readonly=on,id=blk-a,queues=2"
        );
        assert_eq!(Disk::new("b.img", 8).vmm_arg("/x"), "path=/x/b.img");
    }

    #[test]
    fn tagged_finds_the_last_value() {
        let c = "noise\nBLK-GUEST-MD5 pat abc\n[ 1.0] BLK-GUEST-MD5 pat def trailing\nHOST-MD5 pat 123\n";
        assert_eq!(tagged(c, MARK_GUEST_MD5, "pat").as_deref(), Some("def"));
        assert_eq!(tagged(c, MARK_HOST_MD5, "pat").as_deref(), Some("123"));
        assert_eq!(tagged(c, MARK_HOST_MD5, "pa"), None);
    }

    /// The script itself on this host, with `cat` standing in for the VMM
    /// (it reads /dev/null and exits 0) and a head of random data.
    #[test]
    fn script_creates_checks_and_reports() {
        let dir = std::env::temp_dir().join(format!("disk-script-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let dir_s = dir.display().to_string();
        let disks = [Disk::new("a.img", 4).random_head(1), Disk::new("b.img", 2)];
        let s = script(
            &dir_s,
            &disks,
            &[Md5Range::of("head", "a.img", 0, 1)],
            &["true".to_string()],
            &[
                Md5Range::of("head", "a.img", 0, 1),
                Md5Range::of("tail", "a.img", 1, 3),
                Md5Range::of("b", "b.img", 0, 2),
                Md5Range::zeroes("z3", 3),
                Md5Range::zeroes("z2", 2),
            ],
        );
        let out = Command::new("sh").arg("-c").arg(&s).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(0), "{s}\n{text}");
        assert!(text.contains("HOST-VMM-RC=0"), "{text}");
        let get = |t| tagged(&text, MARK_HOST_MD5, t).unwrap();
        assert_eq!(get("head").len(), 32);
        assert_ne!(get("head"), get("z3"));
        assert_eq!(get("tail"), get("z3"));
        assert_eq!(get("b"), get("z2"));
        assert_eq!(std::fs::metadata(dir.join("a.img")).unwrap().len(), 4 << 20);
        assert!(tagged(&text, MARK_HOST_BLOCKS, "a.img").is_some());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
