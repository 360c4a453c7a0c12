//! Pace steering (Bonawitz et al., "Towards Federated Learning at Scale:
//! System Design", SysML 2019, §2.3): the server tells its clients over
//! how long a stretch to come back if they lose it, so that a server
//! that dies (or a gateway behind a load balancer) is not met by all of
//! them at once when it, or the next one, answers. The server's side is
//! [`rejoin_window`]; every client's, native and in the tab, is
//! [`rejoin_delay`].

use std::time::Duration;

/// The longest window a server asks for: past it a client's hop (and the
/// volunteer's patience) is lost anyway.
pub const MAX_REJOIN_WINDOW: Duration = Duration::from_secs(120);

/// The shortest wait between a client's failed attempts, and where its
/// exponential back-off starts.
pub const BASE_BACKOFF: Duration = Duration::from_millis(250);

/// The longest back-off a client reaches on its own (a longer window from
/// the server lengthens it).
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The window, in milliseconds, over which `clients` returning clients
/// arrive at `rate` joins a second: `clients / rate`, at most
/// [`MAX_REJOIN_WINDOW`]. A rate that is not a positive finite number asks
/// for no window (0).
pub fn rejoin_window(clients: usize, rate: f64) -> u64 {
    if !(rate.is_finite() && rate > 0.0) {
        return 0;
    }
    let ms = clients as f64 / rate * 1000.0;
    ms.min(MAX_REJOIN_WINDOW.as_millis() as f64) as u64
}

/// How long a client waits before its next attempt to join, after
/// `failures` failed attempts since it last held a session (0: the first
/// attempt after losing one), given the latest window its server asked
/// for (`window_ms`, 0 when none) and `draw`, a uniform draw in `[0, 1)`.
///
/// The wait is `draw` times the larger of the window and the exponential
/// back-off `BASE_BACKOFF * 2^failures` capped at [`MAX_BACKOFF`] (full
/// jitter: Brooker, "Exponential Backoff And Jitter", AWS Architecture
/// Blog, 2015): clients that lost one server together spread over the
/// window on every attempt, however long the server stays away, instead of
/// retrying in step. A draw outside `[0, 1)` is clamped into it.
pub fn rejoin_delay(window_ms: u64, failures: u32, draw: f64) -> Duration {
    let backoff = BASE_BACKOFF
        .saturating_mul(1u32.checked_shl(failures.min(16)).unwrap_or(u32::MAX))
        .min(MAX_BACKOFF);
    let window = Duration::from_millis(window_ms).min(MAX_REJOIN_WINDOW);
    let draw = if draw.is_finite() {
        draw.clamp(0.0, 1.0)
    } else {
        0.0
    };
    window.max(backoff).mul_f64(draw)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_is_the_clients_over_the_rate_and_bounded() {
        assert_eq!(rejoin_window(1000, 100.0), 10_000);
        assert_eq!(rejoin_window(0, 100.0), 0);
        assert_eq!(rejoin_window(1_000_000, 100.0), 120_000);
        for rate in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            assert_eq!(rejoin_window(1000, rate), 0, "{rate}");
        }
    }

    #[test]
    fn a_delay_spreads_over_the_window_or_the_backoff_whichever_is_longer() {
        // The first attempt after a loss, no window: within the base back-off.
        assert_eq!(rejoin_delay(0, 0, 0.5), Duration::from_millis(125));
        // A window longer than the back-off spreads every attempt over it.
        assert_eq!(rejoin_delay(3000, 0, 0.5), Duration::from_millis(1500));
        assert_eq!(rejoin_delay(3000, 3, 0.999), Duration::from_millis(2997));
        // The back-off grows to its cap, never past it.
        assert_eq!(rejoin_delay(0, 2, 1.0), Duration::from_secs(1));
        assert_eq!(rejoin_delay(0, 10, 1.0), MAX_BACKOFF);
        assert_eq!(rejoin_delay(0, u32::MAX, 1.0), MAX_BACKOFF);
        // Nothing the server says waits longer than the largest window.
        assert_eq!(rejoin_delay(u64::MAX, 0, 1.0), MAX_REJOIN_WINDOW);
        // Draws out of range stay in it.
        assert_eq!(rejoin_delay(3000, 0, -1.0), Duration::ZERO);
        assert_eq!(rejoin_delay(3000, 0, f64::NAN), Duration::ZERO);
        assert_eq!(rejoin_delay(3000, 0, 7.0), Duration::from_secs(3));
    }
}
