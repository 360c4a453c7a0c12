//! Datasets in memory and the loaders that read them from disk (IDX, CIFAR binary, image folders).
//!
//! # Layout
//! - `mod.rs`: [`Dataset`], the one in-memory form every loader returns, and [`DataError`].
//! - [`idx`]: MNIST-style IDX files, raw or gzipped, with EMNIST's quirks as options.
//! - [`cifar`]: CIFAR-10 and CIFAR-100 binary batches.
//! - [`folder`]: one folder of PNG images per class.
//! - [`catalog`]: the named datasets (`mnist`, `fashion-mnist`, EMNIST) and where they live.
//!
//! Design decision: every loader decodes to `f32` in `[0, 1]`, channel-major, so the
//! training code never sees a file format. Files are read whole; a gzip stream is
//! recognised by its magic bytes, never by the file name.

pub mod catalog;
pub mod cifar;
pub mod folder;
pub mod idx;
pub mod shard;

use std::io::Read;
use std::path::{Path, PathBuf};

/// What can go wrong while reading a dataset.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A file could not be opened, read or decompressed.
    #[error("cannot read {}: {source}", path.display())]
    Io {
        /// The file that failed.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A file does not start with the magic number of its format.
    #[error("{} has magic number {got:#010x}, expected {expected:#010x}", path.display())]
    BadMagic {
        /// The file read.
        path: PathBuf,
        /// The magic number found.
        got: u32,
        /// The magic number the format requires.
        expected: u32,
    },
    /// A file is shorter than its header promises.
    #[error("{} is truncated: {got} bytes, expected {expected}", path.display())]
    Truncated {
        /// The file read.
        path: PathBuf,
        /// Bytes present (after decompression).
        got: usize,
        /// Bytes the header requires.
        expected: usize,
    },
    /// A file of fixed-size records has a size that is not a whole number of records.
    #[error("{} has {got} bytes, not a multiple of the {record}-byte record", path.display())]
    RecordSize {
        /// The file read.
        path: PathBuf,
        /// Its size in bytes.
        got: usize,
        /// The record size in bytes.
        record: usize,
    },
    /// The images file and the labels file disagree on the number of samples.
    #[error("{} holds {images} images but {} holds {labels} labels", images_path.display(), labels_path.display())]
    CountMismatch {
        /// The images file.
        images_path: PathBuf,
        /// Number of images in it.
        images: usize,
        /// The labels file.
        labels_path: PathBuf,
        /// Number of labels in it.
        labels: usize,
    },
    /// The pixel buffer does not hold one sample per label.
    #[error(
        "{got} pixel values for {labels} labels of {sample_len} values each, expected {expected}"
    )]
    ImagesLength {
        /// Values present.
        got: usize,
        /// Number of labels.
        labels: usize,
        /// Values per sample.
        sample_len: usize,
        /// Values required.
        expected: usize,
    },
    /// A label is not below the number of classes (or below a label offset).
    #[error("label {label} of sample {index} is out of range for {num_classes} classes")]
    LabelOutOfRange {
        /// Index of the sample.
        index: usize,
        /// The label as stored in the file.
        label: u32,
        /// Number of classes.
        num_classes: usize,
    },
    /// A named dataset is not on disk.
    #[error("dataset {name}: no {file} in {}; {hint}", dir.display())]
    MissingDataset {
        /// The dataset's name.
        name: String,
        /// The folder looked in.
        dir: PathBuf,
        /// The first file not found there.
        file: String,
        /// How to get it (always names `astraea fetch-data`).
        hint: String,
    },
    /// A dataset name the catalog does not know.
    #[error("unknown dataset {name}, known: {known}")]
    UnknownDataset {
        /// The name asked for.
        name: String,
        /// The names the catalog knows, comma separated.
        known: String,
    },
    /// An image folder that cannot be used (no classes, an empty class, a size mismatch).
    #[error("image folder {}: {reason}", path.display())]
    BadFolder {
        /// The folder or file concerned.
        path: PathBuf,
        /// What is wrong, with the numbers.
        reason: String,
    },
    /// A demo shard's bytes are not a shard.
    #[error("shard: {0}")]
    BadShard(String),
    /// An image file could not be decoded.
    #[error("cannot decode image {}: {source}", path.display())]
    Decode {
        /// The image file.
        path: PathBuf,
        /// The decoder's error.
        #[source]
        source: image::ImageError,
    },
}

/// Labelled images in memory.
///
/// # Shapes
/// `images` is `[len, channels, height, width]` flattened, sample-major then
/// channel-major; values are in `[0, 1]`. `labels` is `[len]`, each below
/// `class_names.len()`.
#[derive(Clone, Debug, PartialEq)]
pub struct Dataset {
    /// Pixel values of all samples, one after another, each `[channels, height, width]`.
    pub images: Vec<f32>,
    /// The class of each sample, an index into `class_names`.
    pub labels: Vec<u32>,
    /// Colour channels per image (1 for grayscale, 3 for RGB).
    pub channels: usize,
    /// Image height in pixels.
    pub height: usize,
    /// Image width in pixels.
    pub width: usize,
    /// Human-readable class names; their count is the number of classes.
    pub class_names: Vec<String>,
}

impl Dataset {
    /// Builds a dataset, checking that `images` holds one sample per label and
    /// that every label names a class.
    pub fn new(
        images: Vec<f32>,
        labels: Vec<u32>,
        channels: usize,
        height: usize,
        width: usize,
        class_names: Vec<String>,
    ) -> Result<Self, DataError> {
        let sample_len = channels * height * width;
        let expected = labels.len() * sample_len;
        if images.len() != expected {
            return Err(DataError::ImagesLength {
                got: images.len(),
                labels: labels.len(),
                sample_len,
                expected,
            });
        }
        let num_classes = class_names.len();
        if let Some((index, &label)) = labels
            .iter()
            .enumerate()
            .find(|&(_, &l)| l as usize >= num_classes)
        {
            return Err(DataError::LabelOutOfRange {
                index,
                label,
                num_classes,
            });
        }
        Ok(Self {
            images,
            labels,
            channels,
            height,
            width,
            class_names,
        })
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether the dataset has no samples.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Number of classes (the length of `class_names`).
    pub fn num_classes(&self) -> usize {
        self.class_names.len()
    }

    /// Values per sample: `channels * height * width`.
    pub fn sample_len(&self) -> usize {
        self.channels * self.height * self.width
    }

    /// The pixel values of sample `i`, `[channels, height, width]` flattened.
    ///
    /// # Panics
    /// If `i >= self.len()`.
    pub fn image(&self, i: usize) -> &[f32] {
        let n = self.sample_len();
        &self.images[i * n..(i + 1) * n]
    }

    /// A new dataset holding copies of the samples at `indices`, in that order.
    ///
    /// # Panics
    /// If an index is out of range.
    pub fn subset(&self, indices: &[usize]) -> Dataset {
        let mut images = Vec::with_capacity(indices.len() * self.sample_len());
        let mut labels = Vec::with_capacity(indices.len());
        for &i in indices {
            images.extend_from_slice(self.image(i));
            labels.push(self.labels[i]);
        }
        Dataset {
            images,
            labels,
            channels: self.channels,
            height: self.height,
            width: self.width,
            class_names: self.class_names.clone(),
        }
    }

    /// Number of samples of each class, indexed by label (length `num_classes`).
    pub fn label_counts(&self) -> Vec<usize> {
        let mut counts = vec![0; self.num_classes()];
        for &l in &self.labels {
            counts[l as usize] += 1;
        }
        counts
    }
}

/// Reads a whole file, decompressing it when it starts with the gzip magic bytes `1f 8b`.
pub(crate) fn read_maybe_gz(path: &Path) -> Result<Vec<u8>, DataError> {
    let io = |source| DataError::Io {
        path: path.to_path_buf(),
        source,
    };
    let raw = std::fs::read(path).map_err(io)?;
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::MultiGzDecoder::new(raw.as_slice())
            .read_to_end(&mut out)
            .map_err(io)?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

/// Converts a byte to a pixel value in `[0, 1]`.
pub(crate) fn to_unit(b: u8) -> f32 {
    f32::from(b) / 255.0
}

/// A fresh, empty temporary folder for one test.
#[cfg(test)]
pub(crate) fn test_dir(name: &str) -> PathBuf {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let unique = format!(
        "astraea-data-{name}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    let dir = std::env::temp_dir().join(unique);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create test dir");
    dir
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| i.to_string()).collect()
    }

    #[test]
    fn new_checks_lengths_and_labels() {
        // Prepare: two 1x2x2 samples.
        let images = vec![0.0; 8];

        // Execute
        let ok = Dataset::new(images.clone(), vec![0, 2], 1, 2, 2, names(3));
        let short = Dataset::new(images[..7].to_vec(), vec![0, 2], 1, 2, 2, names(3));
        let bad_label = Dataset::new(images, vec![0, 3], 1, 2, 2, names(3));

        // Assert
        assert_eq!(ok.expect("valid").len(), 2);
        assert!(matches!(
            short,
            Err(DataError::ImagesLength {
                got: 7,
                expected: 8,
                ..
            })
        ));
        let err = bad_label.expect_err("label 3 of 3 classes");
        assert!(matches!(
            err,
            DataError::LabelOutOfRange {
                index: 1,
                label: 3,
                num_classes: 3
            }
        ));
        assert_eq!(
            err.to_string(),
            "label 3 of sample 1 is out of range for 3 classes"
        );
    }

    #[test]
    fn subset_image_and_counts() {
        // Prepare: three 1x1x2 samples whose pixels name their index.
        let images = vec![0.0, 0.0, 1.0, 1.0, 2.0, 2.0];
        let data = Dataset::new(images, vec![1, 0, 1], 1, 1, 2, names(3)).expect("valid");

        // Execute
        let sub = data.subset(&[2, 0]);

        // Assert
        assert_eq!(data.sample_len(), 2);
        assert_eq!(data.image(1), &[1.0, 1.0]);
        assert_eq!(data.label_counts(), vec![1, 2, 0]);
        assert_eq!(sub.images, vec![2.0, 2.0, 0.0, 0.0]);
        assert_eq!(sub.labels, vec![1, 1]);
        assert_eq!(
            (sub.channels, sub.height, sub.width, sub.num_classes()),
            (1, 1, 2, 3)
        );
        assert!(!sub.is_empty());
        assert!(data.subset(&[]).is_empty());
    }
}
