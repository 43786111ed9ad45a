//! Pruning of content-addressed cache files (`<stem>-<16 hex><suffix>`).

use std::fs;
use std::path::{Path, PathBuf};

/// Deletes all but the `keep` newest `<stem>-<16 hex><suffix>` files in `dir`.
pub fn prune(dir: &Path, stem: &str, suffix: &str, keep: usize) {
    let Ok(rd) = fs::read_dir(dir) else { return };
    let mut found: Vec<(std::time::SystemTime, PathBuf)> = rd
        .filter_map(Result::ok)
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.strip_prefix(stem)
                .and_then(|r| r.strip_prefix('-'))
                .and_then(|r| r.strip_suffix(suffix))
                .is_some_and(|h| h.len() == 16 && h.chars().all(|c| c.is_ascii_hexdigit()))
        })
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .collect();
    found.sort_by_key(|f| std::cmp::Reverse(f.0));
    for (_, path) in found.into_iter().skip(keep) {
        let _ = fs::remove_file(path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_newest_matching_files_only() {
        let dir = std::env::temp_dir().join(format!("gi-prune-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        for i in 0..4u64 {
            let p = dir.join(format!("img-{i:016x}.ext4"));
            fs::write(&p, "").unwrap();
            let t = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1000 + i);
            fs::File::options()
                .write(true)
                .open(&p)
                .unwrap()
                .set_modified(t)
                .unwrap();
        }
        fs::write(dir.join("img-notahash.ext4"), "").unwrap();
        fs::write(dir.join(format!("img-{:016x}.cpio.gz", 9)), "").unwrap();
        prune(&dir, "img", ".ext4", 2);
        let mut left: Vec<String> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(
            left,
            vec![
                format!("img-{:016x}.ext4", 2),
                format!("img-{:016x}.ext4", 3),
                format!("img-{:016x}.cpio.gz", 9),
                "img-notahash.ext4".to_string(),
            ]
        );
        fs::remove_dir_all(&dir).unwrap();
    }
}
