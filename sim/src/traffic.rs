//! Bytes a real run would move, counted the way the WebSocket protocol sends
//! them: weights as f32 (or f16) little-endian binary frames plus a small
//! JSON control frame around each transfer.

use astraea_core::protocol::WeightEncoding;

/// Upper bound on one JSON control frame (task or update header) in bytes.
/// The real frames (round, hop, sample count, loss, timings) stay below it.
pub const CONTROL_FRAME_BYTES: u64 = 256;

/// Bytes for one model transfer in one direction, weights as `encoding`.
pub fn model_transfer_bytes(num_params: usize, encoding: WeightEncoding) -> u64 {
    (encoding.value_bytes() * num_params) as u64 + CONTROL_FRAME_BYTES
}

/// Bytes of a label-count report (up) or a plan (down) for `num_classes`
/// classes, sent once per client when it joins.
pub fn plan_exchange_bytes(num_classes: usize) -> u64 {
    8 * num_classes as u64 + CONTROL_FRAME_BYTES
}

/// Running totals of traffic in both directions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Traffic {
    /// Clients to server.
    pub up: u64,
    /// Server to clients.
    pub down: u64,
}

impl Traffic {
    /// One hop: the model goes down to a client and its update comes back.
    pub fn add_hop(&mut self, num_params: usize, encoding: WeightEncoding) {
        let bytes = model_transfer_bytes(num_params, encoding);
        self.down += bytes;
        self.up += bytes;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hop_moves_the_model_both_ways() {
        let mut traffic = Traffic::default();
        traffic.add_hop(1000, WeightEncoding::F32);
        assert_eq!(
            traffic,
            Traffic {
                up: 4256,
                down: 4256
            }
        );
        traffic.add_hop(1000, WeightEncoding::F16);
        assert_eq!(traffic.up, 4256 + 2256);
    }
}
