//! Reader for IDX files (MNIST, Fashion-MNIST, EMNIST), raw or gzipped.
//!
//! An IDX file is a big-endian header (magic `0x00000803` for `u8` images with
//! three dimensions, `0x00000801` for `u8` labels with one) followed by the
//! bytes. EMNIST stores each image transposed and its letters split labels
//! from 1; [`IdxOptions`] undoes both.

use std::path::Path;

use super::{DataError, Dataset, read_maybe_gz, to_unit};

/// Magic number of an IDX file of `u8` images: `[count, rows, cols]`.
pub const IMAGES_MAGIC: u32 = 0x0000_0803;
/// Magic number of an IDX file of `u8` labels: `[count]`.
pub const LABELS_MAGIC: u32 = 0x0000_0801;

/// How to interpret a pair of IDX files.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IdxOptions {
    /// Images are stored transposed: pixel `(r, c)` is at `c * rows + r` (EMNIST).
    pub transposed: bool,
    /// Subtracted from every stored label (1 for EMNIST letters, whose labels start at 1).
    pub label_offset: u32,
}

/// Images read from an IDX file.
///
/// # Shapes
/// `pixels` is `[count, rows, cols]` flattened, values in `[0, 1]`.
#[derive(Clone, Debug, PartialEq)]
pub struct IdxImages {
    /// Pixel values, image after image, row-major.
    pub pixels: Vec<f32>,
    /// Number of images.
    pub count: usize,
    /// Rows (height) of each image.
    pub rows: usize,
    /// Columns (width) of each image.
    pub cols: usize,
}

/// Reads an IDX images file (magic `0x00000803`), undoing a transposed layout if asked.
pub fn read_idx_images(path: &Path, transposed: bool) -> Result<IdxImages, DataError> {
    let bytes = read_maybe_gz(path)?;
    let dims = header(path, &bytes, IMAGES_MAGIC, 3)?;
    let (count, rows, cols) = (dims[0], dims[1], dims[2]);
    let body = body(path, &bytes, 16, count * rows * cols)?;
    let plane = rows * cols;
    let mut pixels = Vec::with_capacity(body.len());
    for image in body.chunks_exact(plane.max(1)).take(count) {
        if transposed {
            for r in 0..rows {
                pixels.extend((0..cols).map(|c| to_unit(image[c * rows + r])));
            }
        } else {
            pixels.extend(image.iter().map(|&b| to_unit(b)));
        }
    }
    Ok(IdxImages {
        pixels,
        count,
        rows,
        cols,
    })
}

/// Reads an IDX labels file (magic `0x00000801`) as stored, without any offset.
pub fn read_idx_labels(path: &Path) -> Result<Vec<u32>, DataError> {
    let bytes = read_maybe_gz(path)?;
    let count = header(path, &bytes, LABELS_MAGIC, 1)?[0];
    Ok(body(path, &bytes, 8, count)?
        .iter()
        .map(|&b| u32::from(b))
        .collect())
}

/// Reads an images file and its labels file into one grayscale [`Dataset`].
///
/// `class_names` fixes the number of classes; a label (after subtracting
/// `options.label_offset`) outside it is an error.
pub fn load_idx_pair(
    images_path: &Path,
    labels_path: &Path,
    options: &IdxOptions,
    class_names: Vec<String>,
) -> Result<Dataset, DataError> {
    let images = read_idx_images(images_path, options.transposed)?;
    let raw = read_idx_labels(labels_path)?;
    if raw.len() != images.count {
        return Err(DataError::CountMismatch {
            images_path: images_path.to_path_buf(),
            images: images.count,
            labels_path: labels_path.to_path_buf(),
            labels: raw.len(),
        });
    }
    let num_classes = class_names.len();
    let labels = raw
        .iter()
        .enumerate()
        .map(|(index, &label)| {
            label
                .checked_sub(options.label_offset)
                .ok_or(DataError::LabelOutOfRange {
                    index,
                    label,
                    num_classes,
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Dataset::new(
        images.pixels,
        labels,
        1,
        images.rows,
        images.cols,
        class_names,
    )
}

/// Checks the magic number and returns the `ndims` big-endian dimensions that follow it.
fn header(path: &Path, bytes: &[u8], magic: u32, ndims: usize) -> Result<Vec<usize>, DataError> {
    let header_len = 4 + 4 * ndims;
    let truncated = || DataError::Truncated {
        path: path.to_path_buf(),
        got: bytes.len(),
        expected: header_len,
    };
    let word = |i: usize| {
        bytes
            .get(i..i + 4)
            .map(|w| u32::from_be_bytes([w[0], w[1], w[2], w[3]]))
    };
    // The magic number is checked first: a wrong file is a clearer error than a short one.
    let got = word(0).ok_or_else(truncated)?;
    if got != magic {
        return Err(DataError::BadMagic {
            path: path.to_path_buf(),
            got,
            expected: magic,
        });
    }
    if bytes.len() < header_len {
        return Err(truncated());
    }
    Ok((0..ndims)
        .map(|d| word(4 + 4 * d).unwrap_or(0) as usize)
        .collect())
}

/// The `len` data bytes after a header of `offset` bytes; trailing bytes are ignored.
fn body<'a>(
    path: &Path,
    bytes: &'a [u8],
    offset: usize,
    len: usize,
) -> Result<&'a [u8], DataError> {
    let expected = offset + len;
    if bytes.len() < expected {
        return Err(DataError::Truncated {
            path: path.to_path_buf(),
            got: bytes.len(),
            expected,
        });
    }
    Ok(&bytes[offset..expected])
}

/// Writes IDX files for tests, raw or gzipped.
#[cfg(test)]
pub(crate) mod fixture {
    use std::io::Write;
    use std::path::Path;

    /// The bytes of an images file holding `images`, each `rows x cols`.
    pub fn images_bytes(images: &[Vec<u8>], rows: u32, cols: u32) -> Vec<u8> {
        let mut out = Vec::new();
        for word in [super::IMAGES_MAGIC, images.len() as u32, rows, cols] {
            out.extend_from_slice(&word.to_be_bytes());
        }
        images.iter().for_each(|img| out.extend_from_slice(img));
        out
    }

    /// The bytes of a labels file holding `labels`.
    pub fn labels_bytes(labels: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        for word in [super::LABELS_MAGIC, labels.len() as u32] {
            out.extend_from_slice(&word.to_be_bytes());
        }
        out.extend_from_slice(labels);
        out
    }

    /// Writes `bytes` to `path`, gzipped when `gz` is set.
    pub fn write(path: &Path, bytes: &[u8], gz: bool) {
        let data = if gz {
            let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            enc.write_all(bytes).expect("gzip");
            enc.finish().expect("gzip")
        } else {
            bytes.to_vec()
        };
        std::fs::write(path, data).expect("write fixture");
    }
}

#[cfg(test)]
mod tests {
    use super::fixture::{images_bytes, labels_bytes, write};
    use super::*;
    use crate::data::test_dir;

    fn digits() -> Vec<String> {
        (0..10).map(|i| i.to_string()).collect()
    }

    /// Writes two 2x3 images (pixels 0..6 and 250..255) with labels 3 and 7, the
    /// images under a name that says nothing about compression.
    fn write_pair(dir: &Path, gz: bool, labels: &[u8]) -> (std::path::PathBuf, std::path::PathBuf) {
        let imgs = vec![(0..6).collect::<Vec<u8>>(), (250..=255).collect()];
        let (ip, lp) = (dir.join("images-idx3-ubyte"), dir.join("labels-idx1-ubyte"));
        write(&ip, &images_bytes(&imgs, 2, 3), gz);
        write(&lp, &labels_bytes(labels), gz);
        (ip, lp)
    }

    #[test]
    fn raw_and_gz_round_trip() {
        for gz in [false, true] {
            // Prepare
            let dir = test_dir("idx-round-trip");
            let (ip, lp) = write_pair(&dir, gz, &[3, 7]);

            // Execute
            let data = load_idx_pair(&ip, &lp, &IdxOptions::default(), digits()).expect("load");

            // Assert
            assert_eq!(
                (data.len(), data.channels, data.height, data.width),
                (2, 1, 2, 3)
            );
            assert_eq!(data.labels, vec![3, 7]);
            let expected: Vec<f32> = [0u8, 1, 2, 3, 4, 5]
                .iter()
                .map(|&b| f32::from(b) / 255.0)
                .collect();
            assert_eq!(data.image(0), expected.as_slice(), "gz = {gz}");
            assert_eq!(data.image(1)[5], 1.0);
            std::fs::remove_dir_all(dir).ok();
        }
    }

    #[test]
    fn emnist_transposition_and_label_offset() {
        // Prepare: one 2x3 image stored transposed (3 rows of 2): stored[c*2 + r] = 10*r + c.
        let dir = test_dir("idx-emnist");
        let stored = vec![0u8, 10, 1, 11, 2, 12];
        let (ip, lp) = (dir.join("i.gz"), dir.join("l.gz"));
        write(&ip, &images_bytes(&[stored], 2, 3), true);
        write(&lp, &labels_bytes(&[26]), true);
        let letters: Vec<String> = ('A'..='Z').map(String::from).collect();
        let options = IdxOptions {
            transposed: true,
            label_offset: 1,
        };

        // Execute
        let data = load_idx_pair(&ip, &lp, &options, letters).expect("load");

        // Assert: row-major again, and label 26 ('Z', 1-based) becomes 25.
        let expected: Vec<f32> = [0u8, 1, 2, 10, 11, 12]
            .iter()
            .map(|&b| f32::from(b) / 255.0)
            .collect();
        assert_eq!(data.image(0), expected.as_slice());
        assert_eq!(data.labels, vec![25]);
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn label_zero_with_offset_is_out_of_range() {
        // Prepare
        let dir = test_dir("idx-offset");
        let (ip, lp) = write_pair(&dir, false, &[1, 0]);
        let options = IdxOptions {
            transposed: false,
            label_offset: 1,
        };

        // Execute
        let err = load_idx_pair(&ip, &lp, &options, digits()).expect_err("label 0 below offset");

        // Assert
        assert!(
            matches!(
                err,
                DataError::LabelOutOfRange {
                    index: 1,
                    label: 0,
                    ..
                }
            ),
            "{err}"
        );
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn wrong_magic_is_rejected() {
        // Prepare: a labels file given where images are expected.
        let dir = test_dir("idx-magic");
        let (_, lp) = write_pair(&dir, true, &[3, 7]);

        // Execute
        let err = read_idx_images(&lp, false).expect_err("labels are not images");

        // Assert
        assert!(
            matches!(
                err,
                DataError::BadMagic {
                    got: 0x801,
                    expected: 0x803,
                    ..
                }
            ),
            "{err}"
        );
        assert!(
            err.to_string()
                .contains("magic number 0x00000801, expected 0x00000803"),
            "{err}"
        );
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn truncated_file_is_rejected() {
        // Prepare: the two-image file cut one byte short, and a header cut in half.
        let dir = test_dir("idx-truncated");
        let full = images_bytes(&[vec![0; 6], vec![0; 6]], 2, 3);
        let (cut, tiny) = (dir.join("cut"), dir.join("tiny"));
        write(&cut, &full[..full.len() - 1], true);
        write(&tiny, &full[..10], false);

        // Execute
        let cut_err = read_idx_images(&cut, false).expect_err("short body");
        let tiny_err = read_idx_images(&tiny, false).expect_err("short header");

        // Assert
        assert!(
            matches!(
                cut_err,
                DataError::Truncated {
                    got: 27,
                    expected: 28,
                    ..
                }
            ),
            "{cut_err}"
        );
        assert!(
            matches!(
                tiny_err,
                DataError::Truncated {
                    got: 10,
                    expected: 16,
                    ..
                }
            ),
            "{tiny_err}"
        );
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn count_mismatch_is_rejected() {
        // Prepare
        let dir = test_dir("idx-count");
        let (ip, lp) = write_pair(&dir, false, &[3, 7, 1]);

        // Execute
        let err = load_idx_pair(&ip, &lp, &IdxOptions::default(), digits()).expect_err("3 labels");

        // Assert
        assert!(
            matches!(
                err,
                DataError::CountMismatch {
                    images: 2,
                    labels: 3,
                    ..
                }
            ),
            "{err}"
        );
        std::fs::remove_dir_all(dir).ok();
    }
}
