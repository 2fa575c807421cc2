//! `loadgen simulate` is the compose file's demo service: as PID 1 it must stop on
//! SIGTERM (`docker stop`), not wait out the grace period.

use std::path::Path;
use std::time::Duration;

#[test]
fn simulate_stops_within_a_second_on_sigterm_as_pid_1() {
    let took = testkit::pid1::time_to_stop_on_sigterm(
        Path::new(env!("CARGO_BIN_EXE_loadgen")),
        &["simulate", "--url", "http://127.0.0.1:9", "--rate", "5"],
        &[("WEBHOOK_SECRET", "signals-test-secret-0123456789abcdef0123")],
        Duration::from_millis(800),
        Duration::from_secs(1),
    );
    assert!(took.is_some(), "loadgen simulate ignored SIGTERM as PID 1");
}
