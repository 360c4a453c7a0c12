//! The wire protocol between the server and its clients (native or a browser
//! tab), version [`PROTOCOL_VERSION`].
//!
//! Control messages travel as JSON text frames ([`ClientMessage`],
//! [`ServerMessage`]); weights travel as binary frames ([`frames`]) that
//! follow the message announcing them. `docs/PROTOCOL.md` describes the flow.
//!
//! - [`messages`]: the JSON messages.
//! - [`frames`]: weight chunks (f32 or f16, little endian) and their
//!   reassembly with size, shape and finiteness checks.
//! - [`limits`]: the bounds on every number, string and list a client
//!   sends, checked where a message enters the server.
//! - [`session`]: the client's side as a state machine without I/O.
//! - `fuzz` (feature `fuzz`): structure-aware fuzzing of the decoders and
//!   the session, for tests and `astraea bench fuzz`.

pub mod frames;
#[cfg(feature = "fuzz")]
pub mod fuzz;
pub mod limits;
pub mod messages;
pub mod pace;
pub mod session;

pub use frames::{
    ChunkHeader, FrameError, WeightAssembler, WeightEncoding, chunk_count, encode_chunks,
    masked_bits, masked_values, round_as_sent,
};
pub use messages::{
    AckOutcome, ChainPlace, ClientMessage, DataSource, ErrorCode, LifecycleReport, LifecycleState,
    ModelPrivacySpec, ModelSpec, PrivacySpec, ServerMessage, ShardSpec, TaskSpec, UpdateSpec,
};
pub use session::{ClientAction, ClientSession, progress_message};

/// Version spoken by this build; a server refuses a join with another.
/// Version 2 added the `ack` message, the `invalid` error code and the
/// limits of [`limits`]; version 3 made `progress` the client's heartbeat
/// during a hop (`task.stall_ms`); version 4 added `welcome.privacy` (a
/// client of version 3 would ignore it and report exact counts); version 5
/// added secure aggregation (`secure-*` messages, `task.secure_weight`,
/// the `masked` encoding); version 6 added `task.secure_clip` (secure
/// aggregation with client-level DP: a client of version 5 would mask its
/// result unclipped); version 7 added `task.secure_noise` (distributed DP:
/// a client of version 6 would mask its result without the noise).
pub const PROTOCOL_VERSION: u32 = 7;

/// Default largest WebSocket frame either side sends or accepts (1 MiB).
pub const DEFAULT_MAX_FRAME_BYTES: usize = 1 << 20;
