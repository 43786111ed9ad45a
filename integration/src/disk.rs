//! Raw disk images for nested runs, made and checked by the VMM's host (L1
//! when nested), for the virtio-blk (`--disk`) and USB (`--usb-storage`,
//! [`crate::usb`]) tests alike.
//!
//! A [`DiskImage`] is created in a scratch directory (sparse, optionally
//! with random data at its start); [`Md5Range`]s print
//! `HOST-MD5 <tag> <md5>` for byte ranges before and after the VMM runs.
//! Guest scenarios print `<BUS>-GUEST-MD5 <tag> <md5>` for the same
//! ranges; [`tagged`] reads both back off the console.
//!
//! [`blk_script`] is the whole host-side script of a virtio-blk run (what
//! [`crate::Harness::run_vmm_script`] runs): create the disks, print the
//! ranges asked for before, run the VMM with a `--disk` per disk, print the
//! ranges asked for after and each image's allocated size
//! (`HOST-BLOCKS <file> <512-byte blocks>`), exit with the VMM's status.

use std::fmt::Write as _;

use crate::l1::sh_quote;

/// Host-side checksum line: `HOST-MD5 <tag> <md5>`.
pub const MARK_HOST_MD5: &str = "HOST-MD5";
/// Allocated 512-byte blocks of an image after the VMM exited.
pub const MARK_HOST_BLOCKS: &str = "HOST-BLOCKS";
/// The VMM's exit status as the host script saw it: `HOST-VMM-RC=<rc>`.
pub const MARK_HOST_VMM_RC: &str = "HOST-VMM-RC=";
/// Guest-side checksum line printed by the `blk-*` scenarios.
pub const MARK_GUEST_MD5_BLK: &str = "BLK-GUEST-MD5";
/// Guest-side checksum line printed by the `usb-*` scenarios.
pub const MARK_GUEST_MD5_USB: &str = "USB-GUEST-MD5";
/// The VMM option of a virtio-blk disk.
pub const OPT_VIRTIO_BLK: &str = "--disk";
/// The VMM option of a USB mass-storage disk.
pub const OPT_USB_STORAGE: &str = "--usb-storage";

/// One raw image in the scratch directory and the VMM option value that
/// attaches it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskImage {
    /// File name in the scratch directory.
    pub file: String,
    pub size_mib: u64,
    /// The serial (`id=`); the VMM defaults it to the file name.
    pub id: Option<String>,
    pub readonly: bool,
    /// MiB of random data written at offset 0 before the VMM starts.
    pub random_head_mib: u64,
    /// `queues=` (virtio-blk only; default: the VMM's, one per vCPU).
    pub queues: Option<u32>,
    /// Root hub port (USB only: 1-4 USB 2, 5-8 USB 3); `None`: the VMM
    /// chooses.
    pub port: Option<u8>,
}

impl DiskImage {
    /// A sparse image of `size_mib` MiB named `file`.
    pub fn new(file: &str, size_mib: u64) -> Self {
        Self {
            file: file.into(),
            size_mib,
            id: None,
            readonly: false,
            random_head_mib: 0,
            queues: None,
            port: None,
        }
    }

    /// `<id>.img` with serial (and API id) `id`.
    pub fn with_id(id: &str, size_mib: u64) -> Self {
        Self::new(&format!("{id}.img"), size_mib).id(id)
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

    pub fn port(mut self, port: u8) -> Self {
        self.port = Some(port);
        self
    }

    /// The image's path under `dir`.
    pub fn path(&self, dir: &str) -> String {
        in_dir(dir, &self.file)
    }

    /// The value of the VMM's `--disk` or `--usb-storage` option.
    pub fn vmm_arg(&self, dir: &str) -> String {
        let mut s = format!("path={}", self.path(dir));
        if let Some(p) = self.port {
            let _ = write!(s, ",port={p}");
        }
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

    /// Shell lines creating the image in `dir` (exit 90/91 on failure).
    pub fn create_lines(&self, dir: &str) -> String {
        let p = sh_quote(&self.path(dir));
        let mut s = format!("rm -f {p}\ntruncate -s {}M {p} || exit 90\n", self.size_mib);
        if self.random_head_mib > 0 {
            let _ = writeln!(
                s,
                "dd if=/dev/urandom of={p} bs=1M count={} conv=notrunc 2>/dev/null || exit 91",
                self.random_head_mib
            );
        }
        s
    }
}

/// `<option> <value>` for each disk, e.g. `--disk path=...`.
pub fn vmm_disk_args(option: &str, dir: &str, disks: &[DiskImage]) -> Vec<String> {
    disks
        .iter()
        .flat_map(|d| [option.to_string(), d.vmm_arg(dir)])
        .collect()
}

fn in_dir(dir: &str, file: &str) -> String {
    format!("{}/{file}", dir.trim_end_matches('/'))
}

/// A MiB-aligned byte range whose md5 the host prints as
/// `HOST-MD5 <tag> <md5>`; without a disk, the md5 of that many zero bytes
/// (the reference for discarded ranges).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Md5Range {
    pub tag: String,
    /// The image's file name in the scratch directory.
    pub file: Option<String>,
    pub off_mib: u64,
    pub len_mib: u64,
}

impl Md5Range {
    /// `len_mib` MiB at `off_mib` of the image `file`.
    pub fn of(tag: &str, file: &str, off_mib: u64, len_mib: u64) -> Self {
        Self {
            tag: tag.into(),
            file: Some(file.into()),
            off_mib,
            len_mib,
        }
    }

    /// `len_mib` MiB of zeroes.
    pub fn zeroes(tag: &str, len_mib: u64) -> Self {
        Self {
            tag: tag.into(),
            file: None,
            off_mib: 0,
            len_mib,
        }
    }

    /// The shell line printing the checksum, tagged `<tag><suffix>`.
    pub fn line(&self, dir: &str, suffix: &str) -> String {
        let src = match &self.file {
            Some(f) => sh_quote(&in_dir(dir, f)),
            None => "/dev/zero".into(),
        };
        format!(
            "echo \"{MARK_HOST_MD5} {}{suffix} $(dd if={src} bs=1M skip={} count={} 2>/dev/null | md5sum | cut -d' ' -f1)\"\n",
            self.tag, self.off_mib, self.len_mib
        )
    }
}

/// The host-side script of a virtio-blk run: create `disks` in `dir`, print
/// `before`, run `vmm_argv` plus a `--disk` per disk, print `after` and
/// each image's allocated blocks, exit with the VMM's status.
pub fn blk_script(
    dir: &str,
    disks: &[DiskImage],
    before: &[Md5Range],
    vmm_argv: &[String],
    after: &[Md5Range],
) -> String {
    let mut s = String::new();
    for d in disks {
        s.push_str(&d.create_lines(dir));
    }
    for r in before {
        s.push_str(&r.line(dir, ""));
    }
    let mut argv: Vec<String> = vmm_argv.to_vec();
    argv.extend(vmm_disk_args(OPT_VIRTIO_BLK, dir, disks));
    let line: Vec<String> = argv.iter().map(|a| sh_quote(a)).collect();
    let _ = writeln!(s, "{} </dev/null\nrc=$?", line.join(" "));
    let _ = writeln!(s, "echo \"{MARK_HOST_VMM_RC}$rc\"");
    for r in after {
        s.push_str(&r.line(dir, ""));
    }
    for d in disks {
        let _ = writeln!(
            s,
            "echo \"{MARK_HOST_BLOCKS} {} $(stat -c %b {})\"",
            d.file,
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
        let d = DiskImage::new("a.img", 64).id("blk-a").readonly().queues(2);
        assert_eq!(
            d.vmm_arg("/tmp/"),
            "path=/tmp/a.img,readonly=on,id=blk-a,queues=2"
        );
        assert_eq!(DiskImage::new("b.img", 8).vmm_arg("/x"), "path=/x/b.img");
        let d = DiskImage::with_id("three", 64).port(5);
        assert_eq!(
            d.vmm_arg("/tmp/usb"),
            "path=/tmp/usb/three.img,port=5,id=three"
        );
        let r = DiskImage::with_id("ro", 16).readonly();
        assert_eq!(
            r.vmm_arg("/tmp/usb"),
            "path=/tmp/usb/ro.img,readonly=on,id=ro"
        );
        assert_eq!(
            vmm_disk_args(OPT_USB_STORAGE, "/d", &[r]),
            ["--usb-storage", "path=/d/ro.img,readonly=on,id=ro"]
        );
    }

    #[test]
    fn tagged_finds_the_last_value() {
        let c = "noise\nBLK-GUEST-MD5 pat abc\n[ 1.0] BLK-GUEST-MD5 pat def trailing\nHOST-MD5 pat 123\n";
        assert_eq!(tagged(c, MARK_GUEST_MD5_BLK, "pat").as_deref(), Some("def"));
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
        let disks = [
            DiskImage::new("a.img", 4).random_head(1),
            DiskImage::new("b.img", 2),
        ];
        let s = blk_script(
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
