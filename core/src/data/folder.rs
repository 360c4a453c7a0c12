//! Reader for an image folder: `root/<class_name>/*.png`, one subfolder per class.
//!
//! Classes are the subfolders sorted by name (hidden ones skipped); images within
//! a class are read in file-name order, and files that are not PNGs are ignored.
//! All images must have the same size. The dataset is grayscale (1 channel) when
//! every image is, RGB (3 channels) otherwise; alpha is dropped.

use std::path::{Path, PathBuf};

use image::DynamicImage;

use super::{DataError, Dataset, to_unit};

/// Reads every PNG under `root/<class_name>/` into one dataset, label = class index.
pub fn load_image_folder(root: &Path) -> Result<Dataset, DataError> {
    let classes = sorted_entries(root, |p| p.is_dir())?;
    if classes.is_empty() {
        return Err(bad(root, "holds no class subfolders".into()));
    }
    let mut acc = Accumulator::default();
    let mut class_names = Vec::with_capacity(classes.len());
    for (label, class_dir) in classes.iter().enumerate() {
        let files = sorted_entries(class_dir, is_png)?;
        if files.is_empty() {
            return Err(bad(class_dir, "class folder holds no .png images".into()));
        }
        for file in &files {
            let img = image::open(file).map_err(|source| DataError::Decode {
                path: file.clone(),
                source,
            })?;
            acc.push(file, &img, label as u32)?;
        }
        class_names.push(file_name(class_dir));
    }
    let Some((width, height)) = acc.size else {
        return Err(bad(root, "holds no images".into()));
    };
    Dataset::new(
        acc.images,
        acc.labels,
        acc.channels,
        height,
        width,
        class_names,
    )
}

/// Images decoded so far, with the size and channel count they share.
#[derive(Default)]
struct Accumulator {
    /// Pixel values, `[n, channels, height, width]` flattened.
    images: Vec<f32>,
    /// One label per image.
    labels: Vec<u32>,
    /// Channels of the images so far: 1 while all were grayscale, then 3.
    channels: usize,
    /// `(width, height)` of the first image; every other must match it.
    size: Option<(usize, usize)>,
}

impl Accumulator {
    /// Appends one image, widening everything read so far to RGB if it is the first colour one.
    fn push(&mut self, path: &Path, img: &DynamicImage, label: u32) -> Result<(), DataError> {
        let size = (img.width() as usize, img.height() as usize);
        match self.size {
            None => {
                self.size = Some(size);
                self.channels = 1;
            }
            Some(expected) if expected != size => {
                let reason = format!(
                    "image is {}x{}, expected {}x{} like the first one",
                    size.0, size.1, expected.0, expected.1
                );
                return Err(bad(path, reason));
            }
            Some(_) => {}
        }
        if img.color().has_color() && self.channels == 1 {
            self.widen_to_rgb();
        }
        if self.channels == 1 {
            self.images
                .extend(img.to_luma8().as_raw().iter().map(|&b| to_unit(b)));
        } else {
            // RGB interleaved [h, w, 3] becomes channel-major [3, h, w].
            let rgb = img.to_rgb8();
            for c in 0..3 {
                self.images
                    .extend(rgb.as_raw().iter().skip(c).step_by(3).map(|&b| to_unit(b)));
            }
        }
        self.labels.push(label);
        Ok(())
    }

    /// Repeats each grayscale sample's single plane three times.
    fn widen_to_rgb(&mut self) {
        let plane = self.size.map_or(0, |(w, h)| w * h);
        let mut wide = Vec::with_capacity(self.images.len() * 3);
        for sample in self.images.chunks_exact(plane.max(1)) {
            for _ in 0..3 {
                wide.extend_from_slice(sample);
            }
        }
        self.images = wide;
        self.channels = 3;
    }
}

/// The entries of `dir` that pass `keep`, sorted by path, hidden ones skipped.
fn sorted_entries(dir: &Path, keep: fn(&Path) -> bool) -> Result<Vec<PathBuf>, DataError> {
    let io = |source| DataError::Io {
        path: dir.to_path_buf(),
        source,
    };
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let path = entry.map_err(io)?.path();
        if !file_name(&path).starts_with('.') && keep(&path) {
            out.push(path);
        }
    }
    out.sort();
    Ok(out)
}

/// Whether `path` is a file ending in `.png` (any case).
fn is_png(path: &Path) -> bool {
    path.is_file()
        && path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("png"))
}

/// The last component of `path`, lossily as UTF-8.
fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// A [`DataError::BadFolder`] for `path`.
fn bad(path: &Path, reason: String) -> DataError {
    DataError::BadFolder {
        path: path.to_path_buf(),
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::test_dir;
    use image::{GrayImage, Luma, Rgb, RgbImage};

    fn gray(dir: &Path, name: &str, value: u8, w: u32, h: u32) {
        GrayImage::from_pixel(w, h, Luma([value]))
            .save(dir.join(name))
            .expect("save png");
    }

    #[test]
    fn grayscale_folder() {
        // Prepare: classes "b" (2 images) and "a" (1 image), plus a stray text file.
        let root = test_dir("folder-gray");
        for class in ["a", "b"] {
            std::fs::create_dir(root.join(class)).expect("mkdir");
        }
        gray(&root.join("b"), "1.png", 51, 4, 2);
        gray(&root.join("b"), "0.png", 0, 4, 2);
        gray(&root.join("a"), "x.png", 255, 4, 2);
        std::fs::write(root.join("a").join("notes.txt"), "ignored").expect("write");

        // Execute
        let data = load_image_folder(&root).expect("load");

        // Assert: classes sorted by name, files sorted within a class.
        assert_eq!(data.class_names, vec!["a", "b"]);
        assert_eq!(data.labels, vec![0, 1, 1]);
        assert_eq!((data.channels, data.height, data.width), (1, 2, 4));
        assert_eq!(data.image(0), &[1.0; 8]);
        assert_eq!(data.image(1), &[0.0; 8]);
        assert_eq!(data.image(2)[0], 0.2);
        std::fs::remove_dir_all(root).ok();
    }

    #[test]
    fn colour_image_makes_everything_rgb() {
        // Prepare: a grayscale image first, then a colour one.
        let root = test_dir("folder-rgb");
        let class = root.join("only");
        std::fs::create_dir(&class).expect("mkdir");
        gray(&class, "0.png", 255, 2, 3);
        RgbImage::from_pixel(2, 3, Rgb([255, 0, 51]))
            .save(class.join("1.png"))
            .expect("save");

        // Execute
        let data = load_image_folder(&root).expect("load");

        // Assert: both are [3, 3, 2], channel-major.
        assert_eq!((data.channels, data.height, data.width), (3, 3, 2));
        assert_eq!(data.image(0), &[1.0; 18]);
        let img = data.image(1);
        assert_eq!(&img[..6], &[1.0; 6]);
        assert_eq!(&img[6..12], &[0.0; 6]);
        assert_eq!(&img[12..], &[0.2; 6]);
        std::fs::remove_dir_all(root).ok();
    }

    #[test]
    fn mismatched_sizes_and_empty_folders_are_rejected() {
        // Prepare
        let root = test_dir("folder-bad");
        let empty = test_dir("folder-empty");
        let class = root.join("c");
        std::fs::create_dir(&class).expect("mkdir");
        gray(&class, "0.png", 0, 4, 4);
        gray(&class, "1.png", 0, 4, 5);

        // Execute
        let size_err = load_image_folder(&root).expect_err("4x5 after 4x4");
        let empty_err = load_image_folder(&empty).expect_err("no classes");

        // Assert
        assert!(
            size_err.to_string().contains("image is 4x5, expected 4x4"),
            "{size_err}"
        );
        assert!(
            matches!(empty_err, DataError::BadFolder { .. }),
            "{empty_err}"
        );
        std::fs::remove_dir_all(root).ok();
        std::fs::remove_dir_all(empty).ok();
    }

    #[test]
    fn undecodable_png_is_a_decode_error() {
        // Prepare
        let root = test_dir("folder-decode");
        let class = root.join("c");
        std::fs::create_dir(&class).expect("mkdir");
        std::fs::write(class.join("broken.png"), b"not a png").expect("write");

        // Execute
        let err = load_image_folder(&root).expect_err("garbage");

        // Assert
        assert!(matches!(err, DataError::Decode { .. }), "{err}");
        std::fs::remove_dir_all(root).ok();
    }
}
