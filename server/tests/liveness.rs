//! Volunteers as they really are: a client that freezes mid-hop with its
//! socket open (a phone whose screen locked, a frozen tab) costs its chain
//! the stall timeout, not the hop deadline; a slow client that keeps
//! reporting progress gets its time. A real server on 127.0.0.1:0 with
//! honest native clients beside one scripted client.

mod support;

use std::time::Duration;

use astraea_core::protocol::AckOutcome;
use support::{Answer, with_three_honest};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_frozen_mid_hop_is_skipped_after_the_stall_timeout_not_the_deadline() {
    // The bug: a client that stopped answering mid-hop without closing
    // its socket held its chain for the whole hop deadline (120 s here;
    // the helper gives the run 240 s), every round it was drawn.
    let (error, _, running) = with_three_honest(
        1,
        |c| {
            c.hop_deadline = Duration::from_secs(120);
            c.stall_timeout = Duration::from_secs(2);
        },
        // Silent for 30 s, socket open, then it answers (too late).
        |_, w| Answer {
            values: w,
            samples: 50,
            delay: Duration::from_secs(30),
            ..Answer::default()
        },
    )
    .await;

    assert!(error.is_none(), "the client was sent away: {error:?}");
    let status = running.state.status();
    assert_eq!(status.history.len(), 1);
    assert_eq!(status.skipped_hops, 1);
    let first_round = status.history[0].wall_s;
    assert!(
        first_round < 60.0,
        "round 1 waited {first_round:.1} s for the frozen client"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_client_that_keeps_reporting_progress_is_waited_for() {
    // A client slower than the stall timeout, but sending its heartbeat,
    // is not a frozen one.
    let (error, acks, running) = with_three_honest(
        1,
        |c| {
            c.stall_timeout = Duration::from_secs(2);
        },
        |_, w| Answer {
            values: w,
            samples: 50,
            delay: Duration::from_secs(5),
            heartbeat: true,
            ..Answer::default()
        },
    )
    .await;

    assert!(error.is_none(), "the client was sent away: {error:?}");
    assert_eq!(acks, vec![AckOutcome::Accepted]);
    assert_eq!(running.state.status().skipped_hops, 0);
}
