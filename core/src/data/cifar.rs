//! Reader for CIFAR-10 and CIFAR-100 binary batch files.
//!
//! A CIFAR-10 record is one label byte and 3,072 pixel bytes (`[3, 32, 32]`,
//! channel-major); a CIFAR-100 record has two label bytes (coarse, then fine)
//! before the same pixels. A file is a sequence of records, nothing else.

use std::path::{Path, PathBuf};

use super::{DataError, Dataset, read_maybe_gz, to_unit};

/// Channels of a CIFAR image.
pub const CHANNELS: usize = 3;
/// Height and width of a CIFAR image.
pub const SIDE: usize = 32;
/// Pixel bytes in one record.
pub const PIXELS: usize = CHANNELS * SIDE * SIDE;

/// The ten CIFAR-10 classes, in label order (as in `batches.meta.txt`).
pub const CIFAR10_CLASSES: [&str; 10] = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
];

/// Which record layout a file has, and which label to keep.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CifarLabel {
    /// CIFAR-10: one label byte per record.
    Cifar10,
    /// CIFAR-100, keeping the coarse label (20 superclasses).
    Coarse,
    /// CIFAR-100, keeping the fine label (100 classes).
    Fine,
}

impl CifarLabel {
    /// Label bytes before the pixels of each record.
    pub fn label_bytes(self) -> usize {
        match self {
            CifarLabel::Cifar10 => 1,
            CifarLabel::Coarse | CifarLabel::Fine => 2,
        }
    }

    /// Bytes in one record: label bytes plus 3,072 pixel bytes.
    pub fn record_len(self) -> usize {
        self.label_bytes() + PIXELS
    }

    /// Position of the kept label within a record.
    fn label_at(self) -> usize {
        match self {
            CifarLabel::Cifar10 | CifarLabel::Coarse => 0,
            CifarLabel::Fine => 1,
        }
    }
}

/// Reads one or several batch files, in order, into one `[3, 32, 32]` dataset.
///
/// A file (raw or gzipped) whose size is not a whole number of records is
/// rejected, as is a label not below `class_names.len()`.
pub fn load_cifar_batches<P: AsRef<Path>>(
    paths: &[P],
    label: CifarLabel,
    class_names: Vec<String>,
) -> Result<Dataset, DataError> {
    let record = label.record_len();
    let mut images = Vec::new();
    let mut labels = Vec::new();
    for path in paths {
        let path = path.as_ref();
        let bytes = read_maybe_gz(path)?;
        if bytes.len() % record != 0 {
            return Err(DataError::RecordSize {
                path: path.to_path_buf(),
                got: bytes.len(),
                record,
            });
        }
        images.reserve(bytes.len() / record * PIXELS);
        for rec in bytes.chunks_exact(record) {
            labels.push(u32::from(rec[label.label_at()]));
            images.extend(rec[label.label_bytes()..].iter().map(|&b| to_unit(b)));
        }
    }
    Dataset::new(images, labels, CHANNELS, SIDE, SIDE, class_names)
}

/// Reads class names, one per non-empty line (`batches.meta.txt`, `fine_label_names.txt`).
pub fn read_label_names(path: &Path) -> Result<Vec<String>, DataError> {
    let text = std::fs::read_to_string(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect())
}

/// The standard CIFAR-10 binary layout under `dir` (`cifar-10-batches-bin`):
/// the five training batches, then the test batch.
pub fn cifar10_files(dir: &Path) -> (Vec<PathBuf>, PathBuf) {
    let train = (1..=5)
        .map(|i| dir.join(format!("data_batch_{i}.bin")))
        .collect();
    (train, dir.join("test_batch.bin"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::test_dir;

    /// A record whose channel `c` is filled with `base + c` and whose label bytes are `labels`.
    fn record(labels: &[u8], base: u8) -> Vec<u8> {
        let mut rec = labels.to_vec();
        for c in 0..CHANNELS as u8 {
            rec.extend(std::iter::repeat_n(base + c, SIDE * SIDE));
        }
        rec
    }

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("class{i}")).collect()
    }

    #[test]
    fn cifar10_two_batches() {
        // Prepare: two files, three records in all.
        let dir = test_dir("cifar10");
        let (a, b) = (dir.join("data_batch_1.bin"), dir.join("data_batch_2.bin"));
        std::fs::write(&a, [record(&[4], 0), record(&[9], 10)].concat()).expect("write");
        std::fs::write(&b, record(&[0], 20)).expect("write");
        let classes = CIFAR10_CLASSES.iter().map(|s| s.to_string()).collect();

        // Execute
        let data = load_cifar_batches(&[a, b], CifarLabel::Cifar10, classes).expect("load");

        // Assert: labels in order, channel-major pixels.
        assert_eq!(data.labels, vec![4, 9, 0]);
        assert_eq!((data.channels, data.height, data.width), (3, 32, 32));
        let img = data.image(1);
        assert_eq!(img[0], 10.0 / 255.0);
        assert_eq!(img[SIDE * SIDE], 11.0 / 255.0);
        assert_eq!(img[PIXELS - 1], 12.0 / 255.0);
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn cifar100_coarse_and_fine() {
        // Prepare: records with (coarse, fine) = (3, 77) and (19, 5).
        let dir = test_dir("cifar100");
        let path = dir.join("train.bin");
        std::fs::write(&path, [record(&[3, 77], 0), record(&[19, 5], 100)].concat())
            .expect("write");

        // Execute
        let coarse = load_cifar_batches(&[&path], CifarLabel::Coarse, names(20)).expect("coarse");
        let fine = load_cifar_batches(&[&path], CifarLabel::Fine, names(100)).expect("fine");

        // Assert
        assert_eq!(coarse.labels, vec![3, 19]);
        assert_eq!(fine.labels, vec![77, 5]);
        assert_eq!(fine.image(1)[0], 100.0 / 255.0);
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn partial_record_is_rejected() {
        // Prepare: a CIFAR-100 file read as CIFAR-10 (3,074 bytes is not a multiple of 3,073).
        let dir = test_dir("cifar-size");
        let path = dir.join("train.bin");
        std::fs::write(&path, record(&[3, 77], 0)).expect("write");

        // Execute
        let err = load_cifar_batches(&[&path], CifarLabel::Cifar10, names(10)).expect_err("size");

        // Assert
        assert!(
            matches!(
                err,
                DataError::RecordSize {
                    got: 3074,
                    record: 3073,
                    ..
                }
            ),
            "{err}"
        );
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn label_names_skip_blank_lines() {
        // Prepare
        let dir = test_dir("cifar-names");
        let path = dir.join("batches.meta.txt");
        std::fs::write(&path, "airplane\nautomobile\n\n").expect("write");

        // Execute
        let names = read_label_names(&path).expect("read");

        // Assert
        assert_eq!(names, vec!["airplane", "automobile"]);
        std::fs::remove_dir_all(dir).ok();
    }
}
