//! A binary as PID 1, the way a container runs it: in a PID namespace of its own
//! (`unshare --pid --fork`, which needs root, as CI has). There the kernel drops every
//! signal the process installed no handler for, so a binary that relies on SIGTERM's
//! default action is never stopped by `docker stop`, only killed after the grace period.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Starts `program args` (with `envs`) as PID 1 of a new PID namespace, lets it run for
/// `settle`, sends it SIGTERM and returns how long it took to exit, or `None` when it
/// was still running after `within` (it is then killed).
pub fn time_to_stop_on_sigterm(
    program: &Path,
    args: &[&str],
    envs: &[(&str, &str)],
    settle: Duration,
    within: Duration,
) -> Option<Duration> {
    let mut unshare = Command::new("unshare")
        .args(["--pid", "--fork", "--kill-child"])
        .arg(program)
        .args(args)
        .envs(envs.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("unshare (util-linux) runs");
    std::thread::sleep(settle);
    let children = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", unshare.id()))
        .expect("unshare's children are listed");
    let pid = children.split_whitespace().next().unwrap_or_else(|| {
        let status = unshare.try_wait();
        panic!("{} is not running under unshare (root is needed): {status:?}", program.display())
    });
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let nspid = status.lines().find(|l| l.starts_with("NSpid:")).unwrap_or_default();
    assert!(nspid.trim_end().ends_with("\t1"), "not PID 1 in its namespace: {nspid:?}");

    let sent = Instant::now();
    let killed = Command::new("kill").args(["-TERM", pid]).status().expect("kill runs");
    assert!(killed.success(), "kill -TERM {pid}");
    while sent.elapsed() < within {
        if unshare.try_wait().unwrap().is_some() {
            return Some(sent.elapsed());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = Command::new("kill").args(["-KILL", pid]).status();
    let _ = unshare.kill();
    let _ = unshare.wait();
    None
}
