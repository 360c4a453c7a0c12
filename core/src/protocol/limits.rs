//! The protocol's bounds on what a client may send, checked where a message
//! enters the server: every number, string and list has a documented limit,
//! so nothing a client claims can overflow the server's arithmetic, swell its
//! memory or its status page, or buy its update more weight than its data.
//!
//! `docs/PROTOCOL.md` lists the same limits for outside implementers.

use super::messages::{ClientMessage, DataSource, LifecycleReport, UpdateSpec};

/// Longest `join.backend` string, in bytes.
pub const MAX_BACKEND_BYTES: usize = 64;
/// Longest `join.resume` token, in bytes (the server's are 32 hex digits).
pub const MAX_RESUME_BYTES: usize = 64;
/// Largest `POST /api/lifecycle` body, in bytes.
pub const MAX_LIFECYCLE_BYTES: usize = 256;
/// Longest `error.message` string a client may send, in bytes.
pub const MAX_MESSAGE_BYTES: usize = 1024;
/// Most classes a label-count list may have (the model fixes the exact
/// number; this bounds the list before the model is consulted).
pub const MAX_CLASSES: usize = 4096;
/// Most samples one client may hold, summed over its classes, before or
/// after the data plan.
pub const MAX_CLIENT_SAMPLES: u64 = 10_000_000;
/// Most batches a `progress` message may count.
pub const MAX_PROGRESS_BATCHES: u64 = 100_000_000;
/// Largest measured speed (`join.speed`), in samples per second.
pub const MAX_SPEED: f64 = 1e9;
/// Largest `update.seconds`: one week.
pub const MAX_UPDATE_SECONDS: f64 = 604_800.0;
/// Largest magnitude of any weight the server accepts, adopts or sends.
///
/// It sits well inside f16's range (65,504), so weights sent as f16 stay
/// finite, and far above what Adam at the protocol's learning rates moves a
/// weight to.
pub const MAX_ABS_WEIGHT: f32 = 1.0e4;
/// Samples a client may add beyond its known data (digits a volunteer draws
/// on the page), summed over classes, before a report counts as inflated.
pub const ADDED_SAMPLES_ALLOWANCE: u64 = 1000;

/// Why a message breaks the protocol's limits.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LimitError {
    /// A string is longer than its limit.
    #[error("{field} has {got} bytes, at most {max} allowed")]
    TooLong {
        /// The field.
        field: &'static str,
        /// Its length in bytes.
        got: usize,
        /// The limit.
        max: usize,
    },
    /// A string holds control characters.
    #[error("{field} holds a control character")]
    ControlCharacter {
        /// The field.
        field: &'static str,
    },
    /// A list has more entries than its limit.
    #[error("{field} has {got} entries, at most {max} allowed")]
    TooMany {
        /// The field.
        field: &'static str,
        /// Entries sent.
        got: usize,
        /// The limit.
        max: usize,
    },
    /// A number lies outside its range (or is not finite).
    #[error("{field} is {value}, outside {range}")]
    OutOfRange {
        /// The field.
        field: &'static str,
        /// The value, printed.
        value: String,
        /// The allowed range, printed.
        range: &'static str,
    },
    /// A byte string (a `hex` field) is not of its one allowed length.
    #[error("{field} has {got} bytes, exactly {want} expected")]
    WrongLength {
        /// The field.
        field: &'static str,
        /// Its length in bytes, as received.
        got: usize,
        /// The length it must have.
        want: usize,
    },
}

fn check_string(field: &'static str, s: &str, max: usize) -> Result<(), LimitError> {
    if s.len() > max {
        return Err(LimitError::TooLong {
            field,
            got: s.len(),
            max,
        });
    }
    if s.chars().any(char::is_control) {
        return Err(LimitError::ControlCharacter { field });
    }
    Ok(())
}

fn check_f64(field: &'static str, v: f64, max: f64, range: &'static str) -> Result<(), LimitError> {
    if v.is_finite() && (0.0..=max).contains(&v) {
        Ok(())
    } else {
        Err(LimitError::OutOfRange {
            field,
            value: v.to_string(),
            range,
        })
    }
}

/// The total of a label-count list, checked: at most [`MAX_CLASSES`]
/// entries and [`MAX_CLIENT_SAMPLES`] samples in all (no overflow however
/// large the entries).
///
/// # Errors
/// [`LimitError::TooMany`] or [`LimitError::OutOfRange`].
pub fn checked_total(counts: &[usize]) -> Result<u64, LimitError> {
    if counts.len() > MAX_CLASSES {
        return Err(LimitError::TooMany {
            field: "counts",
            got: counts.len(),
            max: MAX_CLASSES,
        });
    }
    let total = counts
        .iter()
        .try_fold(0u64, |acc, &c| acc.checked_add(u64::try_from(c).ok()?))
        .filter(|&t| t <= MAX_CLIENT_SAMPLES);
    total.ok_or_else(|| LimitError::OutOfRange {
        field: "counts",
        value: format!("a total over {MAX_CLIENT_SAMPLES}"),
        range: "0..=10000000 samples in all",
    })
}

fn check_update(update: &UpdateSpec) -> Result<(), LimitError> {
    if update.samples > MAX_CLIENT_SAMPLES {
        return Err(LimitError::OutOfRange {
            field: "update.samples",
            value: update.samples.to_string(),
            range: "0..=10000000",
        });
    }
    if !update.loss.is_finite() || update.loss < 0.0 {
        return Err(LimitError::OutOfRange {
            field: "update.loss",
            value: update.loss.to_string(),
            range: "a finite value >= 0",
        });
    }
    check_f64(
        "update.seconds",
        update.seconds,
        MAX_UPDATE_SECONDS,
        "0..=604800",
    )
}

impl LifecycleReport {
    /// Checks the token against the protocol's limits.
    ///
    /// # Errors
    /// The token is too long or holds control characters.
    pub fn validate(&self) -> Result<(), LimitError> {
        check_string("lifecycle.resume", &self.resume, MAX_RESUME_BYTES)
    }
}

impl ClientMessage {
    /// Checks every field against the protocol's limits (this module's
    /// constants). What it cannot know — whether counts match the data the
    /// server assigned, or samples the counts reported — the server checks
    /// against its own records.
    ///
    /// # Errors
    /// The first field out of its limits.
    pub fn validate(&self) -> Result<(), LimitError> {
        match self {
            ClientMessage::Join {
                backend,
                speed,
                data,
                resume,
                ..
            } => {
                check_string("join.backend", backend, MAX_BACKEND_BYTES)?;
                if let Some(resume) = resume {
                    check_string("join.resume", resume, MAX_RESUME_BYTES)?;
                }
                if let Some(speed) = speed {
                    check_f64("join.speed", *speed, MAX_SPEED, "0..=1e9")?;
                }
                if let DataSource::Own { counts } = data {
                    checked_total(counts)?;
                }
                Ok(())
            }
            ClientMessage::Ready { counts } => checked_total(counts).map(drop),
            ClientMessage::Progress { done, total, .. } => {
                let (done, total) = (*done as u64, *total as u64);
                if total > MAX_PROGRESS_BATCHES || done > total {
                    return Err(LimitError::OutOfRange {
                        field: "progress.done",
                        value: format!("{done} of {total}"),
                        range: "done <= total <= 100000000",
                    });
                }
                Ok(())
            }
            ClientMessage::Update(update) => check_update(update),
            ClientMessage::Error { message, .. } => {
                check_string("error.message", message, MAX_MESSAGE_BYTES)
            }
            ClientMessage::Leave => Ok(()),
            ClientMessage::SecureKeys { keys, .. } => check_slot("secure-keys.slot", keys.slot),
            ClientMessage::SecureShares { shares, .. } => {
                check_count("secure-shares.shares", shares.len())?;
                for share in shares {
                    check_slot("secure-shares.from", share.from)?;
                    check_slot("secure-shares.to", share.to)?;
                    check_len(
                        "secure-shares.ciphertext",
                        share.ciphertext.len(),
                        crate::secagg::SHARE_CIPHERTEXT_BYTES,
                    )?;
                }
                Ok(())
            }
            ClientMessage::SecureReveal { shares, .. } => {
                // At most one share per masker: of its self mask if it
                // survived, of its mask key if it dropped.
                check_count("secure-reveal.shares", shares.len())?;
                for share in shares {
                    check_slot("secure-reveal.of", share.of)?;
                    check_len(
                        "secure-reveal.share",
                        share.share.len(),
                        crate::secagg::SHARE_BYTES,
                    )?;
                }
                Ok(())
            }
        }
    }
}

fn check_slot(field: &'static str, slot: u32) -> Result<(), LimitError> {
    if slot == 0 || slot > crate::secagg::MAX_MASKERS {
        return Err(LimitError::OutOfRange {
            field,
            value: slot.to_string(),
            range: "1..=255",
        });
    }
    Ok(())
}

fn check_count(field: &'static str, got: usize) -> Result<(), LimitError> {
    let max = crate::secagg::MAX_MASKERS as usize;
    if got > max {
        return Err(LimitError::TooMany { field, got, max });
    }
    Ok(())
}

fn check_len(field: &'static str, got: usize, want: usize) -> Result<(), LimitError> {
    if got != want {
        return Err(LimitError::WrongLength { field, got, want });
    }
    Ok(())
}

/// The most samples of each class a client can hold after the data plan
/// `ratios`, given the counts the server knows it held before: a class kept
/// with probability R < 1 cannot grow, and an augmented class (R >= 1) adds
/// at most ceil(R - 1) copies per original. Saturates instead of
/// overflowing.
///
/// # Shapes
/// `raw` and `ratios` have one entry per class; so does the result (a
/// missing ratio counts as 1).
pub fn planned_upper_bounds(raw: &[usize], ratios: Option<&[f64]>) -> Vec<u64> {
    raw.iter()
        .enumerate()
        .map(|(y, &n)| {
            let n = n as u64;
            let ratio = ratios.and_then(|r| r.get(y)).copied().unwrap_or(1.0);
            if ratio.is_finite() && ratio > 1.0 {
                let copies = (ratio - 1.0).ceil().min(u32::MAX as f64) as u64;
                n.saturating_mul(copies.saturating_add(1))
            } else {
                n
            }
        })
        .collect()
}

/// Samples a report claims beyond what the client can hold (`upper`, from
/// [`planned_upper_bounds`]), summed over classes; a report is inflated when
/// this exceeds [`ADDED_SAMPLES_ALLOWANCE`].
///
/// # Shapes
/// `reported` and `upper` have one entry per class; extra entries on either
/// side count in full.
pub fn excess_over(reported: &[usize], upper: &[u64]) -> u64 {
    let len = reported.len().max(upper.len());
    (0..len)
        .map(|y| {
            let got = reported.get(y).map_or(0, |&c| c as u64);
            got.saturating_sub(upper.get(y).copied().unwrap_or(0))
        })
        .fold(0u64, u64::saturating_add)
}

/// Whether every weight is finite and at most [`MAX_ABS_WEIGHT`] in
/// magnitude: `Err(index)` of the first that is not.
pub fn check_weights(values: &[f32]) -> Result<(), usize> {
    // NaN fails `is_within` as it fails every comparison. One branch-free
    // pass; only a bad vector pays for finding the index.
    let is_within = |v: &f32| v.abs() <= MAX_ABS_WEIGHT;
    let all_within = values.iter().fold(true, |acc, v| acc & is_within(v));
    if all_within {
        Ok(())
    } else {
        Err(values.iter().position(|v| !is_within(v)).unwrap_or(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{ErrorCode, WeightEncoding};

    fn update(samples: u64, loss: f64, seconds: f64) -> ClientMessage {
        ClientMessage::Update(UpdateSpec {
            round: 1,
            hop: 1,
            samples,
            loss,
            seconds,
            encoding: WeightEncoding::F32,
            chunks: 1,
        })
    }

    #[test]
    fn every_field_out_of_its_limits_is_refused() {
        // Prepare: one message per limit, each a step past it.
        let refused = [
            ClientMessage::Join {
                version: 1,
                backend: "x".repeat(MAX_BACKEND_BYTES + 1),
                speed: None,
                data: DataSource::Demo,
                resume: None,
            },
            ClientMessage::Join {
                version: 1,
                backend: "flex\u{7}".into(),
                speed: None,
                data: DataSource::Demo,
                resume: None,
            },
            ClientMessage::Join {
                version: 1,
                backend: "flex".into(),
                speed: Some(f64::NAN),
                data: DataSource::Demo,
                resume: None,
            },
            ClientMessage::Join {
                version: 1,
                backend: "flex".into(),
                speed: None,
                data: DataSource::Own {
                    counts: vec![usize::MAX, 1],
                },
                resume: None,
            },
            ClientMessage::Ready {
                counts: vec![0; MAX_CLASSES + 1],
            },
            ClientMessage::Ready {
                counts: vec![MAX_CLIENT_SAMPLES as usize, 1],
            },
            ClientMessage::Progress {
                round: 1,
                hop: 1,
                done: 3,
                total: 2,
            },
            update(u64::MAX, 0.5, 1.0),
            update(10, f64::INFINITY, 1.0),
            update(10, 0.5, -1.0),
            ClientMessage::Error {
                code: ErrorCode::Internal,
                message: "e".repeat(MAX_MESSAGE_BYTES + 1),
            },
        ];

        // Execute
        let outcomes: Vec<_> = refused.iter().map(ClientMessage::validate).collect();

        // Assert
        for (message, outcome) in refused.iter().zip(&outcomes) {
            assert!(outcome.is_err(), "accepted {message:?}");
        }
    }

    #[test]
    fn messages_within_the_limits_pass() {
        let fine = [
            ClientMessage::Join {
                version: 1,
                backend: "x".repeat(MAX_BACKEND_BYTES),
                speed: Some(1200.0),
                data: DataSource::Own {
                    counts: vec![5, 0, 7],
                },
                resume: None,
            },
            ClientMessage::Ready {
                counts: vec![MAX_CLIENT_SAMPLES as usize],
            },
            update(MAX_CLIENT_SAMPLES, 0.0, MAX_UPDATE_SECONDS),
            ClientMessage::Leave,
        ];
        for message in &fine {
            assert_eq!(message.validate(), Ok(()), "{message:?}");
        }
    }

    #[test]
    fn planned_bounds_follow_the_plan_and_saturate() {
        // Prepare: one class downsampled, one kept, one augmented 2.3x.
        let raw = [10, 10, 10, usize::MAX];
        let ratios = [0.5, 1.0, 2.3, 1e300];

        // Execute
        let upper = planned_upper_bounds(&raw, Some(&ratios));

        // Assert: R = 2.3 adds at most 2 copies per original.
        assert_eq!(upper[..3], [10, 10, 30]);
        assert_eq!(upper[3], u64::MAX);
        assert_eq!(planned_upper_bounds(&raw[..2], None), vec![10, 10]);
    }

    #[test]
    fn excess_counts_only_what_lies_above_the_bounds() {
        assert_eq!(excess_over(&[5, 12, 0], &[10, 10, 10]), 2);
        assert_eq!(excess_over(&[5, 12, 7], &[10, 10]), 9);
        assert_eq!(excess_over(&[usize::MAX, usize::MAX], &[0, 0]), u64::MAX);
    }

    #[test]
    fn weights_past_the_cap_or_non_finite_are_found() {
        assert_eq!(
            check_weights(&[0.0, -MAX_ABS_WEIGHT, MAX_ABS_WEIGHT]),
            Ok(())
        );
        assert_eq!(check_weights(&[0.0, 1e35]), Err(1));
        assert_eq!(check_weights(&[f32::NAN]), Err(0));
        assert_eq!(check_weights(&[1.0, f32::NEG_INFINITY]), Err(1));
    }
}
