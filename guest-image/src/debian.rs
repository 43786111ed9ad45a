//! Fetching and unpacking Debian packages with the ordinary apt clients:
//! `apt-cache` to resolve names and versions, `apt-get download` for the
//! `.deb`, `dpkg-deb -x` to unpack it. Each unpacked package is cached under
//! `<build>/debian/<package>_<version>/root`, so a second run only asks the
//! local apt cache for the candidate version.

use std::fs;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use thiserror::Error;

use crate::progress;

/// Marker written once a package is fully unpacked (and post-processed).
const DONE_STAMP: &str = ".complete";

#[derive(Debug, Error)]
pub enum DebianError {
    #[error("cannot run {cmd} (is it installed? run scripts/setup.sh)")]
    Spawn {
        cmd: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{cmd} failed with {status}: {stderr}")]
    Failed {
        cmd: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error("package {0:?} has no installation candidate, even after apt-get update")]
    NoCandidate(String),
    #[error("{0:?} has no linux-image-* dependency in `apt-cache depends`")]
    NoKernelDependency(String),
    #[error("apt-get download left no .deb for {0:?} in {1}")]
    NoDeb(String, PathBuf),
    #[error("I/O error on {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> DebianError + '_ {
    move |source| DebianError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Runs a command and returns its stdout; stderr is kept for the error.
fn capture(cmd: &mut Command) -> Result<String, DebianError> {
    let name = format!("{cmd:?}");
    let out = cmd.output().map_err(|source| DebianError::Spawn {
        cmd: name.clone(),
        source,
    })?;
    if !out.status.success() {
        return Err(DebianError::Failed {
            cmd: name,
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs a command with its output shown on our stderr (progress).
pub(crate) fn run_visible(cmd: &mut Command) -> Result<(), DebianError> {
    let name = format!("{cmd:?}");
    let spawn_err = |source| DebianError::Spawn {
        cmd: name.clone(),
        source,
    };
    let stdout = std::io::stderr()
        .as_fd()
        .try_clone_to_owned()
        .map_err(spawn_err)?;
    let out = cmd
        .stdout(Stdio::from(stdout))
        .stderr(Stdio::piped())
        .output()
        .map_err(|source| DebianError::Spawn {
            cmd: name.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(DebianError::Failed {
            cmd: name,
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// Parses `apt-cache policy` output for the candidate version.
pub fn parse_candidate(policy: &str) -> Option<String> {
    policy
        .lines()
        .find_map(|l| l.trim().strip_prefix("Candidate:"))
        .map(str::trim)
        .filter(|v| !v.is_empty() && *v != "(none)")
        .map(str::to_string)
}

/// Parses `apt-cache depends linux-image-amd64` output for the versioned
/// kernel image package it depends on.
pub fn parse_kernel_dependency(depends: &str) -> Option<String> {
    depends.lines().find_map(|l| {
        let dep = l
            .trim()
            .trim_start_matches('|')
            .strip_prefix("Depends:")?
            .trim();
        (dep.starts_with("linux-image-") && !dep.starts_with('<')).then(|| dep.to_string())
    })
}

/// Parses the `Size:` field of `apt-cache show` output (bytes).
pub fn parse_size(show: &str) -> Option<u64> {
    show.lines()
        .find_map(|l| l.strip_prefix("Size:"))
        .and_then(|s| s.trim().parse().ok())
}

fn apt_update() -> Result<(), DebianError> {
    progress::step("apt-get update (package lists missing or stale)");
    run_visible(Command::new("apt-get").args(["update", "-q"]))
}

/// Candidate version of a package, running `apt-get update` once if apt
/// knows no candidate yet (fresh machine).
pub fn candidate_version(package: &str) -> Result<String, DebianError> {
    let policy = || capture(Command::new("apt-cache").args(["policy", package]));
    if let Some(v) = parse_candidate(&policy()?) {
        return Ok(v);
    }
    apt_update()?;
    parse_candidate(&policy()?).ok_or_else(|| DebianError::NoCandidate(package.to_string()))
}

/// The package `meta` (e.g. `linux-image-amd64`) depends on, never a
/// hard-coded ABI number.
pub fn kernel_package(meta: &str) -> Result<String, DebianError> {
    let depends = || capture(Command::new("apt-cache").args(["depends", meta]));
    if let Some(p) = parse_kernel_dependency(&depends().unwrap_or_default()) {
        return Ok(p);
    }
    apt_update()?;
    parse_kernel_dependency(&depends()?).ok_or_else(|| DebianError::NoKernelDependency(meta.into()))
}

/// A package unpacked in the cache.
#[derive(Clone, Debug)]
pub struct Unpacked {
    pub package: String,
    pub version: String,
    pub root: PathBuf,
    /// True when this call did the download (false: served from the cache).
    pub fresh: bool,
}

/// Downloads and unpacks `package` at its candidate version under
/// `<build>/debian/`, unless already there. `post` runs on the freshly
/// unpacked root (e.g. depmod) before it is published.
pub fn fetch_unpacked(
    build: &Path,
    package: &str,
    post: impl FnOnce(&Path) -> Result<(), DebianError>,
) -> Result<Unpacked, DebianError> {
    let version = candidate_version(package)?;
    // ':' (epoch) is valid in a path but awkward in shells; keep it readable.
    let key = format!("{package}_{}", version.replace(':', "%3a"));
    let dir = build.join("debian").join(&key);
    let root = dir.join("root");
    if dir.join(DONE_STAMP).exists() {
        progress::step(&format!(
            "{package} {version}: cached in {}",
            root.display()
        ));
        return Ok(Unpacked {
            package: package.into(),
            version,
            root,
            fresh: false,
        });
    }
    fs::create_dir_all(&dir).map_err(io_err(&dir))?;
    let dl = dir.join(format!("download-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dl);
    fs::create_dir_all(&dl).map_err(io_err(&dl))?;
    let spec = format!("{package}={version}");
    let size = capture(Command::new("apt-cache").args(["show", &spec]))
        .ok()
        .and_then(|s| parse_size(&s));
    progress::step(&format!(
        "downloading {package} {version}{}",
        size.map(|s| format!(" ({})", progress::human(s)))
            .unwrap_or_default()
    ));
    run_visible(
        Command::new("apt-get")
            .args(["download", "-q", &spec])
            .current_dir(&dl),
    )?;
    let deb = fs::read_dir(&dl)
        .map_err(io_err(&dl))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .ok_or_else(|| DebianError::NoDeb(package.into(), dl.clone()))?;
    let tmp_root = dir.join(format!("root.tmp-{}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp_root);
    progress::step(&format!("unpacking {}", deb.display()));
    capture(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tmp_root))?;
    post(&tmp_root)?;
    let _ = fs::remove_dir_all(&root);
    fs::rename(&tmp_root, &root).map_err(io_err(&root))?;
    fs::write(dir.join(DONE_STAMP), format!("{spec}\n")).map_err(io_err(&dir))?;
    let _ = fs::remove_dir_all(&dl);
    Ok(Unpacked {
        package: package.into(),
        version,
        root,
        fresh: true,
    })
}

/// Runs `depmod -b <root> <kver>`.
pub fn depmod(root: &Path, kver: &str) -> Result<(), DebianError> {
    progress::step(&format!("depmod -b {} {kver}", root.display()));
    let mut cmd = Command::new("depmod");
    // depmod lives in /usr/sbin, which is not on every user's PATH.
    if let Ok(path) = std::env::var("PATH") {
        cmd.env("PATH", format!("{path}:/usr/sbin:/sbin"));
    }
    capture(cmd.arg("-b").arg(root).arg(kver)).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_apt_outputs() {
        let policy =
            "linux-image-amd64:\n  Installed: (none)\n  Candidate: 6.1.192-2\n  Version table:\n";
        assert_eq!(parse_candidate(policy).as_deref(), Some("6.1.192-2"));
        assert_eq!(parse_candidate("x:\n  Candidate: (none)\n"), None);
        let depends = "linux-image-amd64\n  Depends: linux-image-6.1.0-56-amd64\n";
        assert_eq!(
            parse_kernel_dependency(depends).as_deref(),
            Some("linux-image-6.1.0-56-amd64")
        );
        assert_eq!(parse_kernel_dependency("x\n  Depends: <foo>\n"), None);
        assert_eq!(parse_size("Package: a\nSize: 70550672\n"), Some(70550672));
    }
}
