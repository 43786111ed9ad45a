//! An in-memory initramfs tree written out as a gzip-compressed newc cpio.
//!
//! The tree is ordered (parents before children, insertion order otherwise)
//! so the same inputs always give the same bytes; [`Initramfs::write_cached`]
//! uses that to skip rebuilding an unchanged image.

use std::collections::hash_map::DefaultHasher;
use std::collections::BTreeSet;
use std::fs;
use std::hash::{Hash, Hasher};
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use flate2::write::GzEncoder;
use flate2::Compression;
use thiserror::Error;

use crate::assets::{AssetError, Busybox, Kernel};
use crate::cpio::{CpioError, CpioWriter};
use crate::progress;

/// Where the ordered list of modules to `insmod` is stored in the image.
pub const MODULES_ORDER: &str = "etc/modules.order";

/// Directories every image has.
const BASE_DIRS: &[&str] = &[
    "bin", "sbin", "usr", "usr/bin", "usr/sbin", "dev", "proc", "sys", "tmp", "run", "etc", "lib",
    "mnt", "root", "var",
];

#[derive(Debug, Error)]
pub enum InitramfsError {
    #[error(transparent)]
    Cpio(#[from] CpioError),
    #[error(transparent)]
    Asset(#[from] AssetError),
    #[error("I/O error on {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("initramfs path {0:?} is invalid (empty or contains '..')")]
    BadPath(String),
    #[error("initramfs path {0:?} was added twice")]
    Duplicate(String),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> InitramfsError + '_ {
    move |source| InitramfsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

#[derive(Debug, Hash)]
enum Node {
    Dir,
    File { perm: u32, data: Vec<u8> },
    Symlink(String),
    CharDev { perm: u32, major: u32, minor: u32 },
}

/// An initramfs under construction.
#[derive(Debug)]
pub struct Initramfs {
    nodes: Vec<(String, Node)>,
    names: BTreeSet<String>,
}

impl Default for Initramfs {
    fn default() -> Self {
        Self::new()
    }
}

/// Normalises a destination path: no leading '/', no '..', no empty parts.
fn clean(dst: &str) -> Result<String, InitramfsError> {
    let parts: Vec<&str> = dst
        .split('/')
        .filter(|p| !p.is_empty() && *p != ".")
        .collect();
    if parts.is_empty() || parts.contains(&"..") {
        return Err(InitramfsError::BadPath(dst.to_string()));
    }
    Ok(parts.join("/"))
}

impl Initramfs {
    /// An image with the base directories and `/dev/console` (the kernel
    /// opens it for init's stdio before anything mounts devtmpfs).
    pub fn new() -> Self {
        let mut me = Self {
            nodes: Vec::new(),
            names: BTreeSet::new(),
        };
        for d in BASE_DIRS {
            me.push(d.to_string(), Node::Dir);
        }
        me.push(
            "dev/console".into(),
            Node::CharDev {
                perm: 0o600,
                major: 5,
                minor: 1,
            },
        );
        me
    }

    fn push(&mut self, name: String, node: Node) {
        self.names.insert(name.clone());
        self.nodes.push((name, node));
    }

    fn ensure_parents(&mut self, path: &str) {
        let mut prefix = String::new();
        let parts: Vec<&str> = path.split('/').collect();
        for part in &parts[..parts.len().saturating_sub(1)] {
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(part);
            if !self.names.contains(&prefix) {
                self.push(prefix.clone(), Node::Dir);
            }
        }
    }

    fn add(&mut self, dst: &str, node: Node) -> Result<(), InitramfsError> {
        let dst = clean(dst)?;
        if self.names.contains(&dst) {
            return Err(InitramfsError::Duplicate(dst));
        }
        self.ensure_parents(&dst);
        self.push(dst, node);
        Ok(())
    }

    /// True when `dst` is already in the image.
    pub fn contains(&self, dst: &str) -> bool {
        clean(dst).is_ok_and(|d| self.names.contains(&d))
    }

    /// Adds a regular file from memory.
    pub fn add_bytes(
        &mut self,
        dst: &str,
        perm: u32,
        data: impl Into<Vec<u8>>,
    ) -> Result<(), InitramfsError> {
        self.add(
            dst,
            Node::File {
                perm,
                data: data.into(),
            },
        )
    }

    /// Adds a host file, keeping its permission bits.
    pub fn add_file(&mut self, src: &Path, dst: &str) -> Result<(), InitramfsError> {
        let meta = fs::metadata(src).map_err(io_err(src))?;
        let data = fs::read(src).map_err(io_err(src))?;
        self.add_bytes(dst, meta.permissions().mode() & 0o7777, data)
    }

    /// Adds a dynamically linked host program at `dst` with the shared
    /// libraries `ldd` lists, each at its own absolute path (the dynamic
    /// loader included), skipping libraries already in the image. A static
    /// program gets no libraries.
    pub fn add_host_binary(&mut self, src: &Path, dst: &str) -> Result<(), InitramfsError> {
        self.add_file(src, dst)?;
        for lib in shared_libs(src)? {
            let lib_dst = lib.display().to_string();
            if !self.contains(&lib_dst) {
                // add_file follows symlinks: the library lands as a plain file.
                self.add_file(&lib, &lib_dst)?;
            }
        }
        Ok(())
    }

    /// Adds a symbolic link.
    pub fn add_symlink(&mut self, dst: &str, target: &str) -> Result<(), InitramfsError> {
        self.add(dst, Node::Symlink(target.to_string()))
    }

    /// Adds an empty directory.
    pub fn add_dir(&mut self, dst: &str) -> Result<(), InitramfsError> {
        let dst = clean(dst)?;
        if !self.names.contains(&dst) {
            self.ensure_parents(&dst);
            self.push(dst, Node::Dir);
        }
        Ok(())
    }

    /// Adds `/bin/busybox` and a symlink per applet (asked from the binary
    /// itself, `--list-full`); `/bin/sh` is always there.
    pub fn add_busybox(&mut self, busybox: &Busybox) -> Result<(), InitramfsError> {
        self.add_file(&busybox.path, "bin/busybox")?;
        let list = Command::new(&busybox.path)
            .arg("--list-full")
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        for applet in list.lines().map(str::trim).filter(|l| !l.is_empty()) {
            let Ok(dst) = clean(applet) else { continue };
            if dst == "bin/busybox" || self.names.contains(&dst) {
                continue;
            }
            self.add_symlink(&dst, "/bin/busybox")?;
        }
        if !self.names.contains("bin/sh") {
            self.add_symlink("bin/sh", "busybox")?;
        }
        Ok(())
    }

    /// Adds the modules asked for and their closure (dependencies and soft
    /// dependencies, see [`crate::modules`]) under
    /// `lib/modules/<kver>/`, and [`MODULES_ORDER`]: their absolute paths in
    /// `insmod` order. Returns that list.
    pub fn add_modules<S: AsRef<str>>(
        &mut self,
        kernel: &Kernel,
        wanted: &[S],
    ) -> Result<Vec<String>, InitramfsError> {
        let db = kernel.module_db()?;
        let closure = db.closure(wanted).map_err(AssetError::from)?;
        let mut order = Vec::with_capacity(closure.paths.len());
        for rel in &closure.paths {
            let (rel_plain, data) = kernel.module_bytes(rel)?;
            let dst = format!("lib/modules/{}/{rel_plain}", kernel.kver);
            if !self.contains(&dst) {
                self.add_bytes(&dst, 0o644, data)?;
            }
            order.push(format!("/{dst}"));
        }
        let mut text = order.join("\n");
        text.push('\n');
        if self.contains(MODULES_ORDER) {
            return Err(InitramfsError::Duplicate(MODULES_ORDER.into()));
        }
        self.add_bytes(MODULES_ORDER, 0o644, text)?;
        Ok(order)
    }

    /// Total size of file contents.
    pub fn payload_bytes(&self) -> u64 {
        self.nodes
            .iter()
            .map(|(_, n)| match n {
                Node::File { data, .. } => data.len() as u64,
                _ => 0,
            })
            .sum()
    }

    /// The uncompressed newc archive.
    pub fn to_cpio(&self) -> Result<Vec<u8>, InitramfsError> {
        let mut w = CpioWriter::new(Vec::with_capacity(self.payload_bytes() as usize + 65536));
        for (name, node) in &self.nodes {
            match node {
                Node::Dir => w.dir(name, 0o755)?,
                Node::File { perm, data } => w.file(name, *perm, data)?,
                Node::Symlink(t) => w.symlink(name, t)?,
                Node::CharDev { perm, major, minor } => w.char_dev(name, *perm, *major, *minor)?,
            }
        }
        Ok(w.finish()?)
    }

    /// A content hash, stable for one build of this crate.
    pub fn content_hash(&self) -> u64 {
        let mut h = DefaultHasher::new();
        self.nodes.hash(&mut h);
        h.finish()
    }

    /// Writes the gzip-compressed archive to `out` (atomically, via a
    /// temporary file in the same directory).
    pub fn write_gz(&self, out: &Path) -> Result<u64, InitramfsError> {
        let cpio = self.to_cpio()?;
        if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::create_dir_all(dir).map_err(io_err(dir))?;
        }
        // Unique per writer: threads of one process may build the same image.
        static WRITERS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = WRITERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = out.with_extension(format!("tmp-{}-{n}", std::process::id()));
        let file = fs::File::create(&tmp).map_err(io_err(&tmp))?;
        let mut gz = GzEncoder::new(std::io::BufWriter::new(file), Compression::fast());
        gz.write_all(&cpio).map_err(io_err(&tmp))?;
        let mut inner = gz.finish().map_err(io_err(&tmp))?;
        inner.flush().map_err(io_err(&tmp))?;
        drop(inner);
        fs::rename(&tmp, out).map_err(io_err(out))?;
        let size = fs::metadata(out).map(|m| m.len()).unwrap_or(0);
        progress::step(&format!(
            "wrote {} ({} cpio, {} gzip)",
            out.display(),
            progress::human(cpio.len() as u64),
            progress::human(size)
        ));
        Ok(size)
    }

    /// Writes `<dir>/<stem>-<hash>.cpio.gz` unless an image with the same
    /// content is already there; returns its path.
    pub fn write_cached(&self, dir: &Path, stem: &str) -> Result<PathBuf, InitramfsError> {
        let out = dir.join(format!("{stem}-{:016x}.cpio.gz", self.content_hash()));
        if out.is_file() {
            progress::step(&format!("initramfs cached: {}", out.display()));
            return Ok(out);
        }
        self.write_gz(&out)?;
        crate::cache::prune(dir, stem, ".cpio.gz", KEEP_CACHED);
        Ok(out)
    }
}

/// Shared libraries of a host program, per `ldd` (absolute paths; the
/// vDSO and "not a dynamic executable" give nothing).
pub fn shared_libs(binary: &Path) -> Result<Vec<PathBuf>, InitramfsError> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .map_err(io_err(binary))?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(parse_ldd(&text))
}

/// The library paths of `ldd` output: `libz.so.1 => /lib/.../libz.so.1
/// (0x...)` or `/lib64/ld-linux-x86-64.so.2 (0x...)`.
fn parse_ldd(text: &str) -> Vec<PathBuf> {
    text.lines()
        .filter_map(|l| {
            let l = l.trim();
            let path = match l.split_once("=>") {
                Some((_, rest)) => rest.split_whitespace().next()?,
                None => l.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

/// Cached images kept per stem by [`Initramfs::write_cached`].
const KEEP_CACHED: usize = 4;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpio::{parse, EntryKind};
    use std::io::Read;

    #[test]
    fn ldd_output_parses() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                    \tlibblkid.so.1 => /lib/x86_64-linux-gnu/libblkid.so.1 (0x00007f)\n\
                    \t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n\
                    \tlibgone.so.1 => not found\n";
        assert_eq!(
            parse_ldd(text),
            vec![
                PathBuf::from("/lib/x86_64-linux-gnu/libblkid.so.1"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2")
            ]
        );
        assert!(parse_ldd("\tnot a dynamic executable\n").is_empty());
    }

    #[test]
    fn host_binary_brings_its_libraries_once() {
        let mut img = Initramfs::new();
        img.add_host_binary(Path::new("/bin/sh"), "opt/a/sh")
            .unwrap();
        img.add_host_binary(Path::new("/bin/sh"), "opt/b/sh")
            .unwrap();
        let libs = shared_libs(Path::new("/bin/sh")).unwrap();
        assert!(libs.iter().any(|l| l.to_string_lossy().contains("libc.so")));
        for lib in &libs {
            assert!(img.contains(&lib.display().to_string()), "{lib:?}");
        }
        assert!(img.contains("opt/a/sh") && img.contains("opt/b/sh"));
    }

    #[test]
    fn tree_round_trips_through_gzip() {
        let mut img = Initramfs::new();
        img.add_bytes("/init", 0o755, "#!/bin/sh\n").unwrap();
        img.add_bytes("l2/deep/file.bin", 0o644, vec![7u8; 1000])
            .unwrap();
        img.add_symlink("bin/sh", "busybox").unwrap();
        assert!(matches!(
            img.add_bytes("init", 0o644, ""),
            Err(InitramfsError::Duplicate(_))
        ));
        assert!(matches!(
            img.add_bytes("a/../b", 0o644, ""),
            Err(InitramfsError::BadPath(_))
        ));

        let dir = std::env::temp_dir().join(format!("gi-test-{}", std::process::id()));
        let out = img.write_cached(&dir, "t").unwrap();
        let again = img.write_cached(&dir, "t").unwrap();
        assert_eq!(out, again);
        let mut cpio = Vec::new();
        flate2::read::GzDecoder::new(fs::File::open(&out).unwrap())
            .read_to_end(&mut cpio)
            .unwrap();
        let entries = parse(&cpio).unwrap();
        let names: Vec<_> = entries.iter().map(|e| e.name.as_str()).collect();
        // Parents come before children.
        let l2 = names.iter().position(|n| *n == "l2").unwrap();
        let deep = names.iter().position(|n| *n == "l2/deep").unwrap();
        let file = names.iter().position(|n| *n == "l2/deep/file.bin").unwrap();
        assert!(l2 < deep && deep < file);
        let init = entries.iter().find(|e| e.name == "init").unwrap();
        assert_eq!(init.perm, 0o755);
        assert_eq!(init.kind, EntryKind::File(b"#!/bin/sh\n".to_vec()));
        let console = entries.iter().find(|e| e.name == "dev/console").unwrap();
        assert_eq!(console.kind, EntryKind::CharDev(5, 1));
        fs::remove_dir_all(&dir).unwrap();
    }
}
