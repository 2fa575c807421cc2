//! `loadgen floor` end to end: the real binary, its reading child process and real
//! loopback sockets.

use std::process::Command;

#[test]
fn floor_delivers_every_message_and_reports_both_sides() {
    let output = Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args(["floor", "--connections", "40", "--events", "3", "--interval-ms", "20", "--senders", "2"])
        .output()
        .expect("loadgen runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "loadgen floor failed: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // 40 connections × 3 messages, each one latency sample; 3 rounds.
    assert!(stdout.contains("delivery latency (every message): p50="), "{stdout}");
    assert!(stdout.contains("(n=120)"), "every message arrives once: {stdout}");
    assert!(stdout.contains("time until the last connection had a message"), "{stdout}");
    assert!(stdout.contains("(n=3)"), "one slowest delivery per round: {stdout}");
    assert!(stdout.contains("writing side:") && stdout.contains("reading side:"), "{stdout}");
}

#[test]
fn floor_refuses_more_connections_than_one_process_may_hold() {
    let output = Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args(["floor", "--connections", "25000"])
        .output()
        .expect("loadgen runs");
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("between 1 and 19000"));
}
