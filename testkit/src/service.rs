//! The one way tests start ingest or fanout: in-process, on a port of their own (0 for
//! any free one), against the real PostgreSQL and NATS, stopped gracefully on
//! [`Service::stop`] or when dropped.
//!
//! Arguments are the service's own flags (`--stream-name=...`), as a user would pass
//! them; the listen address defaults to `127.0.0.1:0`.

use std::time::Duration;

use clap::Parser;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A running service.
pub struct Service {
    pub port: u16,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl Service {
    /// `http://127.0.0.1:{port}{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Tells it to stop (as SIGTERM would) and waits up to `within`; `true` when it
    /// ended, cleanly, in time.
    pub async fn stop(&mut self, within: Duration) -> bool {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.task.take() {
            Some(task) => matches!(tokio::time::timeout(within, task).await, Ok(Ok(Ok(())))),
            None => true,
        }
    }

    /// Waits until `/readyz` answers 200 (panics after 30 s).
    pub async fn wait_ready(&self) {
        let url = self.url("/readyz");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if reqwest::get(&url).await.is_ok_and(|r| r.status().is_success()) {
                return;
            }
            assert!(tokio::time::Instant::now() < deadline, "{url} not ready within 30 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn spawn<F>(port: u16, run: impl FnOnce(oneshot::Receiver<()>) -> F) -> Self
    where
        F: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let (stop, stopped) = oneshot::channel();
        Self { port, stop: Some(stop), task: Some(tokio::spawn(run(stopped))) }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// With `--listen=127.0.0.1:0` first unless the caller gives a listen address.
fn with_listen(program: &str, args: &[String]) -> Vec<String> {
    let mut all = vec![program.to_owned()];
    if !args.iter().any(|a| a.starts_with("--listen")) {
        all.push("--listen=127.0.0.1:0".to_owned());
    }
    all.extend(args.iter().cloned());
    all
}

#[derive(Parser)]
struct IngestArgs {
    #[command(flatten)]
    config: ingest::config::ServeConfig,
}

/// Starts `ingest serve` with these flags (not waiting for readiness: a test of an
/// outage may start it with NATS or PostgreSQL away).
pub async fn ingest(args: &[String]) -> Service {
    let config =
        IngestArgs::try_parse_from(with_listen("ingest", args)).expect("ingest test flags parse").config;
    let app = ingest::startup::Application::build(config).await.expect("ingest builds");
    Service::spawn(app.port(), |stopped| {
        app.run_until_stopped(async move {
            let _ = stopped.await;
        })
    })
}

/// Starts `fanout serve` with these flags and waits until it is ready. A fixed port a
/// replica just released may take a moment to be free again: building is retried.
pub async fn fanout(args: &[String]) -> Service {
    let service = fanout_unready(args).await;
    service.wait_ready().await;
    service
}

/// [`fanout`] without waiting for readiness.
pub async fn fanout_unready(args: &[String]) -> Service {
    let cli = fanout::config::Cli::try_parse_with_default(with_listen("fanout", args))
        .expect("fanout test flags parse");
    let fanout::config::Command::Serve(config) = cli.command else {
        panic!("serve is the default subcommand")
    };
    fanout_with(*config).await
}

/// Starts fanout with a configuration a test built or adjusted, not waiting for
/// readiness.
pub async fn fanout_with(config: fanout::Config) -> Service {
    let mut tries = 0;
    let app = loop {
        match fanout::Application::build(config.clone()).await {
            Ok(app) => break app,
            Err(_) if tries < 50 => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(error) => panic!("fanout builds: {error:#}"),
        }
    };
    Service::spawn(app.port(), |stopped| {
        app.run_until_stopped(async move {
            let _ = stopped.await;
        })
    })
}
