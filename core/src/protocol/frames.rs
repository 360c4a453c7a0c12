//! Weights as binary WebSocket frames.
//!
//! A model is split into chunks so no frame exceeds the peer's limit. Each
//! frame is a 16-byte header — round, hop, chunk index, chunk count, all
//! `u32` little endian — followed by the values, `f32` or `f16` little
//! endian. The receiver reassembles them with [`WeightAssembler`], which
//! refuses anything out of order, oversized, of the wrong total length or
//! non-finite before a single value reaches the model.

use half::f16;
use serde::{Deserialize, Serialize};

/// Bytes of a chunk's header.
pub const HEADER_BYTES: usize = 16;

/// How values are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum WeightEncoding {
    /// 4 bytes a value, exact.
    #[default]
    F32,
    /// 2 bytes a value: half the traffic, about 3 significant digits.
    F16,
    /// 4 bytes a value: a masked fixed-point ring element (`u32`, secure
    /// aggregation's masked result, `crate::secagg`), not a number. The
    /// assembler hands these on as `f32::from_bits` patterns without the
    /// finiteness check; [`masked_values`] turns them back.
    Masked,
}

impl WeightEncoding {
    /// Bytes per value.
    pub fn value_bytes(self) -> usize {
        match self {
            WeightEncoding::F32 | WeightEncoding::Masked => 4,
            WeightEncoding::F16 => 2,
        }
    }
}

/// Errors while reassembling weights.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum FrameError {
    /// A frame is larger than allowed.
    #[error("frame has {got} bytes, the limit is {limit}")]
    TooLarge {
        /// Bytes received.
        got: usize,
        /// The limit.
        limit: usize,
    },
    /// A frame is shorter than its header or its payload is ragged.
    #[error("frame has {got} bytes, not a {HEADER_BYTES}-byte header plus whole values")]
    Ragged {
        /// Bytes received.
        got: usize,
    },
    /// The chunk belongs to another transfer or comes out of order.
    #[error(
        "chunk for round {round} hop {hop} index {index}/{count}, expected round {expected_round} hop {expected_hop} index {expected_index}/{expected_count}"
    )]
    OutOfOrder {
        /// Round in the header.
        round: u32,
        /// Hop in the header.
        hop: u32,
        /// Index in the header.
        index: u32,
        /// Count in the header.
        count: u32,
        /// Round expected.
        expected_round: u32,
        /// Hop expected.
        expected_hop: u32,
        /// Index expected.
        expected_index: u32,
        /// Count expected.
        expected_count: u32,
    },
    /// More or fewer values than the model has.
    #[error("weights have {got} parameters, expected {expected}")]
    WrongLength {
        /// Values received (so far, when too many).
        got: usize,
        /// Parameters of the model.
        expected: usize,
    },
    /// A value is NaN or infinite.
    #[error("weights have a non-finite value at index {index}")]
    NonFinite {
        /// Index of the first bad value.
        index: usize,
    },
}

/// The header of one chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    /// Round of the transfer.
    pub round: u32,
    /// Hop of the transfer.
    pub hop: u32,
    /// This chunk's index, from 0.
    pub index: u32,
    /// Chunks in the transfer.
    pub count: u32,
}

impl ChunkHeader {
    fn write(&self, out: &mut Vec<u8>) {
        for v in [self.round, self.hop, self.index, self.count] {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }

    /// Reads the header at the start of a frame.
    pub fn read(frame: &[u8]) -> Option<Self> {
        let word = |i: usize| {
            frame
                .get(i * 4..i * 4 + 4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        };
        Some(Self {
            round: word(0)?,
            hop: word(1)?,
            index: word(2)?,
            count: word(3)?,
        })
    }
}

/// Values that fit in one frame of `max_frame_bytes`.
fn values_per_chunk(encoding: WeightEncoding, max_frame_bytes: usize) -> usize {
    (max_frame_bytes.saturating_sub(HEADER_BYTES) / encoding.value_bytes()).max(1)
}

/// Number of chunks `params` values need.
pub fn chunk_count(params: usize, encoding: WeightEncoding, max_frame_bytes: usize) -> u32 {
    params
        .div_ceil(values_per_chunk(encoding, max_frame_bytes))
        .max(1) as u32
}

/// Rounds `values` in place as `encoding` carries them: f16 keeps about
/// three significant digits (round to nearest even); f32 and the masked
/// encoding carry them exactly. What a simulated hop does to the weights
/// the real wire would round.
pub fn round_as_sent(values: &mut [f32], encoding: WeightEncoding) {
    if encoding == WeightEncoding::F16 {
        for v in values {
            *v = f16::from_f32(*v).to_f32();
        }
    }
}

/// Splits `values` into binary frames of at most `max_frame_bytes`.
pub fn encode_chunks(
    round: u32,
    hop: u32,
    values: &[f32],
    encoding: WeightEncoding,
    max_frame_bytes: usize,
) -> Vec<Vec<u8>> {
    let per = values_per_chunk(encoding, max_frame_bytes);
    let count = chunk_count(values.len(), encoding, max_frame_bytes);
    let mut frames = Vec::with_capacity(count as usize);
    let mut pieces: Vec<&[f32]> = values.chunks(per).collect();
    if pieces.is_empty() {
        pieces.push(&[]);
    }
    for (index, piece) in pieces.into_iter().enumerate() {
        let width = encoding.value_bytes();
        let mut frame = Vec::with_capacity(HEADER_BYTES + piece.len() * width);
        ChunkHeader {
            round,
            hop,
            index: index as u32,
            count,
        }
        .write(&mut frame);
        // Whole slices at once: a push per value checked the capacity each
        // time (10 % of a 1,000-client round, `astraea bench rounds`). A
        // masked value's f32 bit pattern is its ring element.
        match encoding {
            WeightEncoding::F32 | WeightEncoding::Masked => extend_le(&mut frame, piece),
            WeightEncoding::F16 => {
                let halves: Vec<u16> = piece.iter().map(|v| f16::from_f32(*v).to_bits()).collect();
                extend_le(&mut frame, &halves);
            }
        }
        frames.push(frame);
    }
    frames
}

/// Appends `values` to `frame`, little endian: their bytes as they lie on
/// a little-endian machine (wasm32, x86, ARM as run), value by value on
/// another.
fn extend_le<T: bytemuck::Pod + ToLe>(frame: &mut Vec<u8>, values: &[T]) {
    if cfg!(target_endian = "little") {
        frame.extend_from_slice(bytemuck::cast_slice(values));
    } else {
        values.iter().for_each(|v| v.push_le(frame));
    }
}

/// A value that writes itself little endian.
trait ToLe {
    fn push_le(&self, frame: &mut Vec<u8>);
}

impl ToLe for f32 {
    fn push_le(&self, frame: &mut Vec<u8>) {
        frame.extend_from_slice(&self.to_le_bytes());
    }
}

impl ToLe for u16 {
    fn push_le(&self, frame: &mut Vec<u8>) {
        frame.extend_from_slice(&self.to_le_bytes());
    }
}

/// Masked ring elements (`u32`) as the `f32` bit patterns
/// [`encode_chunks`] takes with [`WeightEncoding::Masked`].
pub fn masked_bits(values: &[u32]) -> Vec<f32> {
    values.iter().map(|&v| f32::from_bits(v)).collect()
}

/// The ring elements an assembler of [`WeightEncoding::Masked`] returned.
pub fn masked_values(bits: &[f32]) -> Vec<u32> {
    bits.iter().map(|v| v.to_bits()).collect()
}

/// Collects the chunks of one announced transfer.
#[derive(Debug)]
pub struct WeightAssembler {
    round: u32,
    hop: u32,
    count: u32,
    next: u32,
    expected: usize,
    encoding: WeightEncoding,
    max_frame_bytes: usize,
    values: Vec<f32>,
    /// The first error: a transfer that failed stays failed, so no later
    /// chunk can complete a vector holding a refused value.
    failed: Option<FrameError>,
}

/// Values reserved up front at most: the rest grows as chunks arrive, so a
/// peer announcing a huge model cannot make the receiver allocate it all
/// before sending a byte.
const MAX_RESERVED_VALUES: usize = 1 << 20;

impl WeightAssembler {
    /// Expects `count` chunks of `expected` values in all for `round`/`hop`.
    pub fn new(
        round: u32,
        hop: u32,
        count: u32,
        expected: usize,
        encoding: WeightEncoding,
        max_frame_bytes: usize,
    ) -> Self {
        Self {
            round,
            hop,
            count,
            next: 0,
            expected,
            encoding,
            max_frame_bytes,
            values: Vec::with_capacity(expected.min(MAX_RESERVED_VALUES)),
            failed: None,
        }
    }

    /// Takes the next frame; returns the weights once the last chunk is in.
    /// After an error every later frame gets the same error.
    pub fn push(&mut self, frame: &[u8]) -> Result<Option<Vec<f32>>, FrameError> {
        if let Some(error) = &self.failed {
            return Err(error.clone());
        }
        let outcome = self.accept(frame);
        if let Err(error) = &outcome {
            self.failed = Some(error.clone());
        }
        outcome
    }

    fn accept(&mut self, frame: &[u8]) -> Result<Option<Vec<f32>>, FrameError> {
        if frame.len() > self.max_frame_bytes {
            return Err(FrameError::TooLarge {
                got: frame.len(),
                limit: self.max_frame_bytes,
            });
        }
        let width = self.encoding.value_bytes();
        let header = ChunkHeader::read(frame).ok_or(FrameError::Ragged { got: frame.len() })?;
        if !(frame.len() - HEADER_BYTES).is_multiple_of(width) {
            return Err(FrameError::Ragged { got: frame.len() });
        }
        if (header.round, header.hop, header.index, header.count)
            != (self.round, self.hop, self.next, self.count)
        {
            return Err(FrameError::OutOfOrder {
                round: header.round,
                hop: header.hop,
                index: header.index,
                count: header.count,
                expected_round: self.round,
                expected_hop: self.hop,
                expected_index: self.next,
                expected_count: self.count,
            });
        }
        let payload = &frame[HEADER_BYTES..];
        let arriving = payload.len() / width;
        if self.values.len() + arriving > self.expected {
            return Err(FrameError::WrongLength {
                got: self.values.len() + arriving,
                expected: self.expected,
            });
        }
        let start = self.values.len();
        match self.encoding {
            // The bytes copied whole into the (aligned) values on a
            // little-endian machine: value by value was 4 % of a
            // 1,000-client round (`astraea bench rounds`).
            WeightEncoding::F32 | WeightEncoding::Masked if cfg!(target_endian = "little") => {
                self.values.resize(start + arriving, 0.0);
                bytemuck::cast_slice_mut::<f32, u8>(&mut self.values[start..])
                    .copy_from_slice(&payload[..arriving * 4]);
            }
            WeightEncoding::F32 | WeightEncoding::Masked => self.values.extend(
                payload
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            ),
            WeightEncoding::F16 => self.values.extend(
                payload
                    .chunks_exact(2)
                    .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32()),
            ),
        }
        // One branch-free pass (it vectorises); only a bad chunk pays for
        // finding the index.
        let arrived = &self.values[start..];
        if self.encoding != WeightEncoding::Masked
            && !arrived.iter().fold(true, |all, v| all & v.is_finite())
        {
            let offset = arrived.iter().position(|v| !v.is_finite()).unwrap_or(0);
            return Err(FrameError::NonFinite {
                index: start + offset,
            });
        }
        self.next += 1;
        if self.next < self.count {
            return Ok(None);
        }
        if self.values.len() != self.expected {
            return Err(FrameError::WrongLength {
                got: self.values.len(),
                expected: self.expected,
            });
        }
        Ok(Some(std::mem::take(&mut self.values)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assemble(
        frames: &[Vec<u8>],
        expected: usize,
        encoding: WeightEncoding,
        limit: usize,
    ) -> Result<Vec<f32>, FrameError> {
        let count = ChunkHeader::read(&frames[0]).unwrap().count;
        let mut assembler = WeightAssembler::new(2, 5, count, expected, encoding, limit);
        let mut out = None;
        for frame in frames {
            out = assembler.push(frame)?;
        }
        Ok(out.expect("last chunk completes the transfer"))
    }

    #[test]
    fn f32_weights_split_under_the_limit_and_come_back_exactly() {
        // Prepare: 1,000 values, frames of at most 16 + 400 bytes (100 values).
        let values: Vec<f32> = (0..1000).map(|i| i as f32 * 0.001 - 0.3).collect();

        // Execute
        let frames = encode_chunks(2, 5, &values, WeightEncoding::F32, 416);
        let back = assemble(&frames, 1000, WeightEncoding::F32, 416).unwrap();

        // Assert
        assert_eq!(frames.len(), 10);
        assert!(frames.iter().all(|f| f.len() <= 416));
        assert_eq!(back, values);
    }

    #[test]
    fn f16_halves_the_bytes_and_keeps_three_digits() {
        let values: Vec<f32> = (0..300).map(|i| (i as f32 - 150.0) / 97.0).collect();

        let frames = encode_chunks(2, 5, &values, WeightEncoding::F16, 1 << 20);
        let back = assemble(&frames, 300, WeightEncoding::F16, 1 << 20).unwrap();

        assert_eq!(frames[0].len(), HEADER_BYTES + 600);
        for (a, b) in values.iter().zip(&back) {
            assert!((a - b).abs() <= 1e-3 * a.abs().max(1.0), "{a} vs {b}");
        }
    }

    #[test]
    fn wrong_length_non_finite_oversized_and_foreign_chunks_are_refused() {
        let limit = 1 << 20;
        let short = encode_chunks(2, 5, &[1.0; 9], WeightEncoding::F32, limit);
        let nan = encode_chunks(2, 5, &[1.0, f32::NAN, 1.0], WeightEncoding::F32, limit);
        let other_hop = encode_chunks(2, 4, &[1.0; 3], WeightEncoding::F32, limit);
        let mut assembler = WeightAssembler::new(2, 5, 1, 3, WeightEncoding::F32, 64);

        assert_eq!(
            assemble(&short, 10, WeightEncoding::F32, limit),
            Err(FrameError::WrongLength {
                got: 9,
                expected: 10
            })
        );
        assert_eq!(
            assemble(&nan, 3, WeightEncoding::F32, limit),
            Err(FrameError::NonFinite { index: 1 })
        );
        assert!(matches!(
            assemble(&other_hop, 3, WeightEncoding::F32, limit),
            Err(FrameError::OutOfOrder {
                hop: 4,
                expected_hop: 5,
                ..
            })
        ));
        assert_eq!(
            assembler.push(&[0u8; 65]),
            Err(FrameError::TooLarge { got: 65, limit: 64 })
        );
        // A failed transfer stays failed, whatever comes next.
        assert_eq!(
            assembler.push(&[0u8; 5]),
            Err(FrameError::TooLarge { got: 65, limit: 64 })
        );
        assert_eq!(
            WeightAssembler::new(2, 5, 1, 3, WeightEncoding::F32, limit).push(&[0u8; 5]),
            Err(FrameError::Ragged { got: 5 })
        );
        assert_eq!(
            WeightAssembler::new(2, 5, 1, 3, WeightEncoding::F32, limit).push(&short[0]),
            Err(FrameError::WrongLength {
                got: 9,
                expected: 3
            })
        );
    }
}
