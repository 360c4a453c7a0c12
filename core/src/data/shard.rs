//! The compact binary a server sends a browser tab for its demo shard: the
//! pixels as bytes (a quarter of f32) and the labels, so a shard of a few
//! hundred MNIST images is a few hundred kilobytes.
//!
//! Layout, little endian: magic `ASH1`, then `count`, `channels`, `height`,
//! `width`, `num_classes` as `u32`; `count * channels * height * width`
//! pixel bytes (value / 255); `count` labels as `u16`. Class names are not
//! sent: the tab only trains.

use super::{DataError, Dataset};

const MAGIC: &[u8; 4] = b"ASH1";
const HEADER: usize = 4 + 5 * 4;

/// Encodes a dataset (pixels are rounded to bytes).
pub fn encode_shard(data: &Dataset) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + data.images.len() + 2 * data.len());
    out.extend_from_slice(MAGIC);
    for v in [
        data.len(),
        data.channels,
        data.height,
        data.width,
        data.num_classes(),
    ] {
        out.extend_from_slice(&(v as u32).to_le_bytes());
    }
    out.extend(
        data.images
            .iter()
            .map(|&p| (p.clamp(0.0, 1.0) * 255.0).round() as u8),
    );
    for &label in &data.labels {
        out.extend_from_slice(&(label as u16).to_le_bytes());
    }
    out
}

/// Decodes a shard; class names become their indices.
pub fn decode_shard(bytes: &[u8]) -> Result<Dataset, DataError> {
    if bytes.len() < HEADER || &bytes[..4] != MAGIC {
        return Err(DataError::BadShard(format!(
            "{} bytes without the ASH1 header",
            bytes.len()
        )));
    }
    let word = |i: usize| {
        let b = &bytes[4 + 4 * i..8 + 4 * i];
        u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize
    };
    let (count, channels, height, width, classes) = (word(0), word(1), word(2), word(3), word(4));
    let pixels = count * channels * height * width;
    let expected = HEADER + pixels + 2 * count;
    if bytes.len() != expected {
        return Err(DataError::BadShard(format!(
            "{} bytes, expected {expected} for {count} images of {channels}x{height}x{width}",
            bytes.len()
        )));
    }
    let images = bytes[HEADER..HEADER + pixels]
        .iter()
        .map(|&b| f32::from(b) / 255.0)
        .collect();
    let labels = bytes[HEADER + pixels..]
        .chunks_exact(2)
        .map(|b| u32::from(u16::from_le_bytes([b[0], b[1]])))
        .collect();
    let names = (0..classes).map(|c| c.to_string()).collect();
    Dataset::new(images, labels, channels, height, width, names)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shard_round_trips_to_the_byte() {
        // Prepare: pixels that are whole multiples of 1/255 survive exactly.
        let images: Vec<f32> = (0..3 * 4).map(|i| (i * 20) as f32 / 255.0).collect();
        let data = Dataset::new(
            images,
            vec![0, 2, 1],
            1,
            2,
            2,
            vec!["a".into(), "b".into(), "c".into()],
        )
        .unwrap();

        // Execute
        let bytes = encode_shard(&data);
        let back = decode_shard(&bytes).unwrap();

        // Assert
        assert_eq!(bytes.len(), HEADER + 12 + 6);
        assert_eq!(back.images, data.images);
        assert_eq!(back.labels, data.labels);
        assert_eq!(
            (back.channels, back.height, back.width, back.num_classes()),
            (1, 2, 2, 3)
        );
    }

    #[test]
    fn truncated_or_foreign_bytes_are_refused() {
        let data = Dataset::new(
            vec![0.5; 8],
            vec![0, 1],
            1,
            2,
            2,
            vec!["a".into(), "b".into()],
        )
        .unwrap();
        let bytes = encode_shard(&data);

        let truncated = decode_shard(&bytes[..bytes.len() - 1]).unwrap_err();
        let foreign = decode_shard(b"PNG?....").unwrap_err();

        assert!(truncated.to_string().contains("expected 36"), "{truncated}");
        assert!(foreign.to_string().contains("ASH1"), "{foreign}");
    }
}
