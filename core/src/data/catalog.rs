//! The named datasets (`mnist`, `fashion-mnist`, `emnist-balanced`, `emnist-letters`) and where they live.
//!
//! Each lives in its own folder under a data directory, as IDX files with the
//! standard names, raw or gzipped:
//! - `mnist/` and `fashion-mnist/`: `train-images-idx3-ubyte[.gz]`,
//!   `train-labels-idx1-ubyte[.gz]`, `t10k-images-idx3-ubyte[.gz]`,
//!   `t10k-labels-idx1-ubyte[.gz]`; `astraea fetch-data` puts them there.
//! - `emnist/`: `emnist-<split>-{train,test}-{images-idx3,labels-idx1}-ubyte[.gz]`,
//!   which users download themselves (EMNIST is on no package registry).

use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::idx::{IdxOptions, load_idx_pair};
use super::{DataError, Dataset};

/// Fashion-MNIST's ten classes, in label order.
pub const FASHION_MNIST_CLASSES: [&str; 10] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
];

/// The lower-case letters EMNIST balanced keeps as classes of their own, after `0-9` and `A-Z`.
const EMNIST_BALANCED_LOWER: &str = "abdefghnqrt";

/// A dataset the catalog knows by name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NamedDataset {
    /// Handwritten digits, 60,000 train and 10,000 test 28x28 images, 10 classes.
    Mnist,
    /// Zalando's clothing images, 60,000 train and 10,000 test 28x28 images, 10 classes.
    FashionMnist,
    /// EMNIST balanced: digits and letters, 47 classes, labels 0..46.
    EmnistBalanced,
    /// EMNIST letters: 26 classes, stored with labels 1..26.
    EmnistLetters,
}

impl NamedDataset {
    /// Every named dataset, in the order they are listed to users.
    pub const ALL: [NamedDataset; 4] = [
        NamedDataset::Mnist,
        NamedDataset::FashionMnist,
        NamedDataset::EmnistBalanced,
        NamedDataset::EmnistLetters,
    ];

    /// The name used on the command line and in configuration.
    pub fn name(self) -> &'static str {
        match self {
            NamedDataset::Mnist => "mnist",
            NamedDataset::FashionMnist => "fashion-mnist",
            NamedDataset::EmnistBalanced => "emnist-balanced",
            NamedDataset::EmnistLetters => "emnist-letters",
        }
    }

    /// The folder under the data directory that holds the files.
    pub fn dir(self, data_dir: &Path) -> PathBuf {
        data_dir.join(match self {
            NamedDataset::Mnist => "mnist",
            NamedDataset::FashionMnist => "fashion-mnist",
            NamedDataset::EmnistBalanced | NamedDataset::EmnistLetters => "emnist",
        })
    }

    /// The class names, in label order.
    pub fn class_names(self) -> Vec<String> {
        let digits = ('0'..='9').map(String::from);
        let upper = ('A'..='Z').map(String::from);
        match self {
            NamedDataset::Mnist => digits.collect(),
            NamedDataset::FashionMnist => FASHION_MNIST_CLASSES.map(String::from).to_vec(),
            NamedDataset::EmnistBalanced => digits
                .chain(upper)
                .chain(EMNIST_BALANCED_LOWER.chars().map(String::from))
                .collect(),
            NamedDataset::EmnistLetters => upper.collect(),
        }
    }

    /// The IDX options: EMNIST images are transposed, EMNIST letters' labels start at 1.
    pub fn idx_options(self) -> IdxOptions {
        match self {
            NamedDataset::Mnist | NamedDataset::FashionMnist => IdxOptions::default(),
            NamedDataset::EmnistBalanced => IdxOptions {
                transposed: true,
                label_offset: 0,
            },
            NamedDataset::EmnistLetters => IdxOptions {
                transposed: true,
                label_offset: 1,
            },
        }
    }

    /// File names (without `.gz`) of train images, train labels, test images, test labels.
    pub fn file_names(self) -> [String; 4] {
        let prefix = match self {
            NamedDataset::Mnist | NamedDataset::FashionMnist => {
                return [
                    "train-images-idx3-ubyte",
                    "train-labels-idx1-ubyte",
                    "t10k-images-idx3-ubyte",
                    "t10k-labels-idx1-ubyte",
                ]
                .map(String::from);
            }
            NamedDataset::EmnistBalanced => "emnist-balanced",
            NamedDataset::EmnistLetters => "emnist-letters",
        };
        [
            "train-images-idx3",
            "train-labels-idx1",
            "test-images-idx3",
            "test-labels-idx1",
        ]
        .map(|part| format!("{prefix}-{part}-ubyte"))
    }

    /// Reads the train and test sets from their folder under `data_dir`.
    pub fn load(self, data_dir: &Path) -> Result<(Dataset, Dataset), DataError> {
        let dir = self.dir(data_dir);
        let [train_x, train_y, test_x, test_y] = self.file_names().map(|f| find(&dir, &f));
        let options = self.idx_options();
        let pair = |x: Result<PathBuf, String>, y: Result<PathBuf, String>| {
            let (x, y) = (
                x.map_err(|f| self.missing(&dir, f))?,
                y.map_err(|f| self.missing(&dir, f))?,
            );
            load_idx_pair(&x, &y, &options, self.class_names())
        };
        Ok((pair(train_x, train_y)?, pair(test_x, test_y)?))
    }

    /// The error for a file `file` not found in `dir`.
    fn missing(self, dir: &Path, file: String) -> DataError {
        let hint = match self {
            NamedDataset::Mnist | NamedDataset::FashionMnist => {
                "run `astraea fetch-data` to download it".to_string()
            }
            NamedDataset::EmnistBalanced | NamedDataset::EmnistLetters => {
                "EMNIST is on no package registry: put its gzipped IDX files there yourself \
                 (`astraea fetch-data` fetches only mnist and fashion-mnist)"
                    .to_string()
            }
        };
        DataError::MissingDataset {
            name: self.name().to_string(),
            dir: dir.to_path_buf(),
            file,
            hint,
        }
    }
}

impl FromStr for NamedDataset {
    type Err = DataError;

    fn from_str(name: &str) -> Result<Self, DataError> {
        NamedDataset::ALL
            .into_iter()
            .find(|d| d.name() == name)
            .ok_or_else(|| DataError::UnknownDataset {
                name: name.to_string(),
                known: NamedDataset::ALL.map(NamedDataset::name).join(", "),
            })
    }
}

impl std::fmt::Display for NamedDataset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Reads the named dataset's `(train, test)` sets from its folder under `data_dir`.
pub fn load_named(name: &str, data_dir: &Path) -> Result<(Dataset, Dataset), DataError> {
    name.parse::<NamedDataset>()?.load(data_dir)
}

/// `dir/file` if present, else `dir/file.gz`; the missing name (`file[.gz]`) otherwise.
fn find(dir: &Path, file: &str) -> Result<PathBuf, String> {
    let raw = dir.join(file);
    let gz = dir.join(format!("{file}.gz"));
    if raw.is_file() {
        Ok(raw)
    } else if gz.is_file() {
        Ok(gz)
    } else {
        Err(format!("{file}[.gz]"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::idx::fixture::{images_bytes, labels_bytes, write};
    use crate::data::test_dir;

    /// Writes a dataset's four files under its folder: one 2x2 image per label per split,
    /// image `i` holding `i` at stored position 1.
    fn write_named(data_dir: &Path, which: NamedDataset, labels: &[u8], gz: bool) {
        let dir = which.dir(data_dir);
        std::fs::create_dir_all(&dir).expect("mkdir");
        let images: Vec<Vec<u8>> = (0..labels.len() as u8).map(|i| vec![0, i, 0, 0]).collect();
        let suffix = if gz { ".gz" } else { "" };
        let [tx, ty, sx, sy] = which.file_names();
        for (x, y) in [(tx, ty), (sx, sy)] {
            write(
                &dir.join(format!("{x}{suffix}")),
                &images_bytes(&images, 2, 2),
                gz,
            );
            write(&dir.join(format!("{y}{suffix}")), &labels_bytes(labels), gz);
        }
    }

    #[test]
    fn missing_dataset_names_the_fetch_command_and_folder() {
        // Prepare
        let data_dir = test_dir("catalog-missing");

        // Execute
        let err = load_named("fashion-mnist", &data_dir).expect_err("nothing there");

        // Assert
        let msg = err.to_string();
        assert!(matches!(err, DataError::MissingDataset { .. }), "{msg}");
        assert!(msg.contains("astraea fetch-data"), "{msg}");
        assert!(
            msg.contains(&data_dir.join("fashion-mnist").display().to_string()),
            "{msg}"
        );
        assert!(msg.contains("train-images-idx3-ubyte[.gz]"), "{msg}");
        let emnist = load_named("emnist-letters", &data_dir).expect_err("nothing there");
        assert!(
            emnist.to_string().contains("astraea fetch-data"),
            "{emnist}"
        );
        std::fs::remove_dir_all(data_dir).ok();
    }

    #[test]
    fn mnist_raw_and_fashion_gz_load() {
        // Prepare
        let data_dir = test_dir("catalog-load");
        write_named(&data_dir, NamedDataset::Mnist, &[9, 0, 5], false);
        write_named(&data_dir, NamedDataset::FashionMnist, &[9, 1], true);

        // Execute
        let (mnist_train, mnist_test) = load_named("mnist", &data_dir).expect("mnist");
        let (fashion_train, _) = load_named("fashion-mnist", &data_dir).expect("fashion");

        // Assert
        assert_eq!((mnist_train.len(), mnist_test.len()), (3, 3));
        assert_eq!(mnist_train.labels, vec![9, 0, 5]);
        assert_eq!(mnist_train.class_names[9], "9");
        assert_eq!(
            fashion_train.class_names[fashion_train.labels[0] as usize],
            "Ankle boot"
        );
        std::fs::remove_dir_all(data_dir).ok();
    }

    #[test]
    fn emnist_letters_are_offset_and_balanced_is_not() {
        // Prepare: both splits share the emnist/ folder.
        let data_dir = test_dir("catalog-emnist");
        write_named(&data_dir, NamedDataset::EmnistLetters, &[1, 26], true);
        write_named(&data_dir, NamedDataset::EmnistBalanced, &[0, 46], true);

        // Execute
        let (letters, _) = load_named("emnist-letters", &data_dir).expect("letters");
        let (balanced, _) = load_named("emnist-balanced", &data_dir).expect("balanced");

        // Assert: letters 1..26 become 0..25; balanced keeps 0..46; both transposed.
        assert_eq!(letters.labels, vec![0, 25]);
        assert_eq!(letters.num_classes(), 26);
        assert_eq!(balanced.labels, vec![0, 46]);
        assert_eq!(balanced.num_classes(), 47);
        assert_eq!(balanced.class_names[46], "t");
        // Stored position 1 is (row 1, col 0) when transposed, so row-major position 2.
        assert_eq!(letters.image(1), &[0.0, 0.0, 1.0 / 255.0, 0.0]);
        std::fs::remove_dir_all(data_dir).ok();
    }

    #[test]
    fn names_parse_and_unknown_is_listed() {
        // Prepare / Execute
        let parsed: Vec<NamedDataset> = NamedDataset::ALL
            .iter()
            .map(|d| d.name().parse().expect("known"))
            .collect();
        let err = "cifar-10".parse::<NamedDataset>().expect_err("unknown");

        // Assert
        assert_eq!(parsed, NamedDataset::ALL.to_vec());
        assert!(
            err.to_string()
                .contains("unknown dataset cifar-10, known: mnist, fashion-mnist"),
            "{err}"
        );
    }
}
