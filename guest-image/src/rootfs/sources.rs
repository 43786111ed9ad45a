//! Which Debian suite and mirror the root disk comes from: the host's own
//! (the kernel is fetched through the host's apt, so the suite matches it),
//! read from `/etc/os-release` and the apt sources, with Debian's CDN as the
//! fallback mirror.

use std::fs;
use std::path::Path;

/// Used when `/etc/os-release` names no codename.
pub const DEFAULT_SUITE: &str = "bookworm";
/// Used when no apt source carries the suite.
pub const DEFAULT_MIRROR: &str = "http://deb.debian.org/debian";

const OS_RELEASE: &str = "/etc/os-release";
const SOURCES_LIST: &str = "/etc/apt/sources.list";
const SOURCES_DIR: &str = "/etc/apt/sources.list.d";

/// `VERSION_CODENAME` of an os-release file.
pub fn parse_codename(os_release: &str) -> Option<String> {
    os_release.lines().find_map(|l| {
        let v = l
            .strip_prefix("VERSION_CODENAME=")?
            .trim()
            .trim_matches('"');
        (!v.is_empty()).then(|| v.to_string())
    })
}

/// The first plain-http(s) mirror serving exactly `suite` with the `main`
/// component, from one-line `deb URI SUITE COMPONENTS...` sources.
pub fn mirror_from_list(text: &str, suite: &str) -> Option<String> {
    text.lines().find_map(|l| {
        let mut words = l.split_whitespace();
        if words.next()? != "deb" {
            return None;
        }
        let mut uri = words.next()?;
        if uri.starts_with('[') {
            // Options: `deb [arch=amd64 signed-by=...] URI ...`.
            while !uri.ends_with(']') {
                uri = words.next()?;
            }
            uri = words.next()?;
        }
        let s = words.next()?;
        let main = words.any(|c| c == "main");
        (s == suite && main && is_http(uri)).then(|| uri.trim_end_matches('/').to_string())
    })
}

/// The same for deb822 `.sources` stanzas (`Types:`, `URIs:`, `Suites:`,
/// `Components:`).
pub fn mirror_from_deb822(text: &str, suite: &str) -> Option<String> {
    text.split("\n\n").find_map(|stanza| {
        let field = |name: &str| {
            stanza.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                (k.trim().eq_ignore_ascii_case(name)).then(|| v.trim().to_string())
            })
        };
        let types = field("Types")?;
        let suites = field("Suites")?;
        let comps = field("Components")?;
        if !types.split_whitespace().any(|t| t == "deb")
            || !suites.split_whitespace().any(|s| s == suite)
            || !comps.split_whitespace().any(|c| c == "main")
        {
            return None;
        }
        field("URIs")?
            .split_whitespace()
            .find(|u| is_http(u))
            .map(|u| u.trim_end_matches('/').to_string())
    })
}

fn is_http(uri: &str) -> bool {
    uri.starts_with("http://") || uri.starts_with("https://")
}

/// The host's codename, else [`DEFAULT_SUITE`].
pub fn host_suite() -> String {
    fs::read_to_string(OS_RELEASE)
        .ok()
        .and_then(|t| parse_codename(&t))
        .unwrap_or_else(|| DEFAULT_SUITE.to_string())
}

/// The host's mirror for `suite`, else [`DEFAULT_MIRROR`].
pub fn host_mirror(suite: &str) -> String {
    let mut found = fs::read_to_string(SOURCES_LIST)
        .ok()
        .and_then(|t| mirror_from_list(&t, suite));
    if found.is_none() {
        let mut files: Vec<_> = fs::read_dir(Path::new(SOURCES_DIR))
            .map(|rd| rd.filter_map(Result::ok).map(|e| e.path()).collect())
            .unwrap_or_default();
        files.sort();
        found = files.iter().find_map(|p| {
            let text = fs::read_to_string(p).ok()?;
            match p.extension().and_then(|e| e.to_str()) {
                Some("sources") => mirror_from_deb822(&text, suite),
                Some("list") => mirror_from_list(&text, suite),
                _ => None,
            }
        });
    }
    found.unwrap_or_else(|| DEFAULT_MIRROR.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codename() {
        let t = "PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nVERSION_CODENAME=bookworm\n";
        assert_eq!(parse_codename(t).as_deref(), Some("bookworm"));
        assert_eq!(parse_codename("ID=debian\nVERSION_CODENAME=\n"), None);
    }

    #[test]
    fn one_line_sources() {
        let t = "# comment\n\
                 deb https://packages.cloud.google.com/apt cloud-sdk-bookworm main\n\
                 deb-src http://deb.debian.org/debian bookworm main\n\
                 deb [arch=amd64 signed-by=/k.gpg] http://ftp.de.debian.org/debian/ bookworm main contrib\n";
        assert_eq!(
            mirror_from_list(t, "bookworm").as_deref(),
            Some("http://ftp.de.debian.org/debian")
        );
        assert_eq!(mirror_from_list(t, "trixie"), None);
        assert_eq!(
            mirror_from_list("deb file:/mnt bookworm main\n", "bookworm"),
            None
        );
    }

    #[test]
    fn deb822_sources() {
        let t = "Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm bookworm-updates\n\
                 Components: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n\
                 Types: deb\nURIs: http://deb.debian.org/debian-security\nSuites: bookworm-security\n\
                 Components: main\n";
        assert_eq!(
            mirror_from_deb822(t, "bookworm").as_deref(),
            Some("http://deb.debian.org/debian")
        );
        assert_eq!(
            mirror_from_deb822(t, "bookworm-security").as_deref(),
            Some("http://deb.debian.org/debian-security")
        );
        assert_eq!(mirror_from_deb822(t, "trixie"), None);
    }
}
