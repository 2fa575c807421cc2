//! `fanout tail` against a real stream: what an operator without the NATS CLI sees.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::harness::{Relay, nats_url};

/// The workspace's built `fanout` (target/<profile>/fanout, beside this test's deps/).
fn fanout_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let path = exe.parent().and_then(Path::parent).expect("target/<profile>/deps/<test>").join("fanout");
    assert!(
        path.exists(),
        "{} is not built; `cargo nextest run --workspace` builds it (or run `cargo build -p fanout`)",
        path.display()
    );
    path
}

struct Tail(Child);

impl Drop for Tail {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `fanout tail` with `args` and returns its first `n` lines (or fails after 20 s).
async fn tail_lines(relay: &Relay, args: &[&str], n: usize) -> Vec<String> {
    let mut child = Command::new(fanout_binary())
        .arg("tail")
        .args(args)
        .args([
            format!("--nats-url={}", nats_url()),
            format!("--stream-name={}", relay.stream_name),
            format!("--subject-prefix={}", relay.prefix),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("fanout tail starts");
    let stdout = child.stdout.take().expect("piped stdout");
    let _guard = Tail(child);
    let reader = tokio::task::spawn_blocking(move || {
        BufReader::new(stdout).lines().take(n).collect::<Result<Vec<_>, _>>()
    });
    tokio::time::timeout(Duration::from_secs(20), reader)
        .await
        .unwrap_or_else(|_| panic!("fanout tail {args:?} printed fewer than {n} lines in 20 s"))
        .expect("reader task")
        .expect("readable output")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_tail_prints_the_stream_as_readable_lines_and_as_json() {
    let relay = Relay::start().await;
    relay.post_message("accTail", "chatTail", "First words").await;
    relay.post_message("accTail", "chatTail", "Second words").await;

    let lines = tail_lines(&relay, &["--since", "0"], 2).await;
    assert!(lines[0].trim_start().starts_with('1'), "seq first: {}", lines[0]);
    for (line, text) in lines.iter().zip(["First words", "Second words"]) {
        for part in ["message:new", "accTail", "chatTail", "Contact chatTail: ", text] {
            assert!(line.contains(part), "{line:?} shows {part:?}");
        }
    }

    let json = tail_lines(&relay, &["--since", "1", "--json"], 1).await;
    let event: Value = serde_json::from_str(&json[0]).expect("--json prints one envelope per line");
    assert_eq!(event["seq"], 2, "--since 1 starts after sequence 1");
    assert_eq!(event["data"]["message"]["text"], "Second words");

    // A filter narrows to one account: nothing of accTail matches another account.
    relay.post_message("accOther", "chatOther", "Elsewhere").await;
    let filter = format!("{}.accOther.>", relay.prefix);
    let other = tail_lines(&relay, &[&filter, "--since", "0"], 1).await;
    assert!(other[0].contains("Elsewhere") && !other[0].contains("accTail"), "{}", other[0]);

    relay.shutdown().await;
}
