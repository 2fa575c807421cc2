//! Test support for the workspace's integration tests (a dev-dependency only).
//!
//! The tests talk to the real services the machine has: PostgreSQL (`DATABASE_URL`,
//! default `postgres://postgres@127.0.0.1:5432/postgres`) and NATS with JetStream
//! (`NATS_URL`, default `nats://127.0.0.1:4222`). A test that needs them fails with a
//! message naming the variable when one is missing; none skips itself.

pub mod pid1;
pub mod service;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use sqlx::{Connection, Executor, PgConnection};
use uuid::Uuid;

/// The NATS server the tests use.
pub fn nats_url() -> String {
    std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned())
}

/// The PostgreSQL server's maintenance database, where test databases are created.
pub fn admin_database_url() -> String {
    std::env::var("DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// A database of one test's own, dropped when this is dropped (also when the test
/// panics), so runs leave nothing behind on the shared PostgreSQL.
#[derive(Debug)]
pub struct TestDatabase {
    pub url: String,
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        // Drop cannot await, and may run inside a runtime: a thread of its own does it.
        let url = std::mem::take(&mut self.url);
        let dropping = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(drop_database(&url));
        });
        let _ = dropping.join();
    }
}

/// Creates an empty database named `test_{label}_{uuid}`; it is dropped with the
/// returned guard.
pub async fn create_database(label: &str) -> TestDatabase {
    let admin = admin_database_url();
    let mut conn = PgConnection::connect(&admin)
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL must be running at {admin} (set DATABASE_URL): {e}"));
    let name = format!("test_{label}_{}", Uuid::new_v4().simple());
    conn.execute(format!(r#"create database "{name}""#).as_str()).await.expect("create test database");
    let (base, _) = admin.rsplit_once('/').expect("DATABASE_URL has a database name");
    TestDatabase { url: format!("{base}/{name}") }
}

/// Drops a database by URL, closing whatever still uses it.
async fn drop_database(database_url: &str) {
    let Some((_, name)) = database_url.rsplit_once('/') else { return };
    if let Ok(mut conn) = PgConnection::connect(&admin_database_url()).await {
        let _ = conn.execute(format!(r#"drop database if exists "{name}" with (force)"#).as_str()).await;
    }
}

/// Deletes a test's JetStream stream when dropped, so a run leaves none behind on the
/// shared NATS, also when the test panics. It works on a runtime of its own: the
/// test's may already be gone.
pub struct StreamGuard {
    url: String,
    name: String,
}

impl StreamGuard {
    pub fn new(url: impl Into<String>, name: impl Into<String>) -> Self {
        Self { url: url.into(), name: name.into() }
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let (url, name) = (self.url.clone(), self.name.clone());
        let cleanup = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
                return;
            };
            runtime.block_on(async {
                let connect =
                    async_nats::ConnectOptions::new().connection_timeout(Duration::from_secs(2)).connect(url);
                if let Ok(Ok(client)) = tokio::time::timeout(Duration::from_secs(3), connect).await {
                    let js = async_nats::jetstream::new(client);
                    let _ = tokio::time::timeout(Duration::from_secs(3), js.delete_stream(&name)).await;
                }
            });
        });
        let _ = cleanup.join();
    }
}

/// A nats-server of the test's own (JetStream, file store) on a free port, so a test can
/// stop and restart it. `NATS_SERVER_BIN` names the binary (default `/usr/sbin/nats-server`).
pub struct NatsServer {
    pub port: u16,
    store: PathBuf,
    child: Option<Child>,
    /// `--user` and `--pass` the server requires, if any.
    auth: Option<(String, String)>,
}

impl NatsServer {
    pub async fn start() -> Self {
        Self::start_with(None).await
    }

    /// A server that takes only clients with this user and password.
    pub async fn start_with_auth(user: &str, password: &str) -> Self {
        Self::start_with(Some((user.to_owned(), password.to_owned()))).await
    }

    async fn start_with(auth: Option<(String, String)>) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let store = std::env::temp_dir().join(format!("nats-test-{}", Uuid::new_v4().simple()));
        let mut server = Self { port, store, child: None, auth };
        server.restart().await;
        server
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Starts the server (again) on the same port and store; waits until it listens.
    pub async fn restart(&mut self) {
        let binary = std::env::var("NATS_SERVER_BIN").unwrap_or_else(|_| "/usr/sbin/nats-server".to_owned());
        let child = Command::new(&binary)
            .args(["-js", "-a", "127.0.0.1", "-p", &self.port.to_string(), "-sd"])
            .arg(&self.store)
            .args(self.auth.iter().flat_map(|(user, password)| ["--user", user, "--pass", password]))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {binary} (set NATS_SERVER_BIN): {e}"));
        self.child = Some(child);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await.is_err() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "nats-server did not start on port {}",
                self.port
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Kills the server (its store stays, for [`NatsServer::restart`]).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.store);
    }
}

/// A JetStream cluster of nats-servers of a test's own, as processes (no Docker):
/// client and route ports free ones, a store each under one temp directory, server
/// names `n1`, `n2`, ..., cluster `relay-test`. A test can kill any of them (a stream's
/// leader, say) with SIGKILL.
pub struct NatsCluster {
    pub nodes: Vec<ClusterNode>,
    dir: PathBuf,
}

/// One server of a [`NatsCluster`].
pub struct ClusterNode {
    pub name: String,
    pub port: u16,
    /// HTTP monitoring (`/jsz`, `/routez`).
    pub monitor_port: u16,
    child: Option<Child>,
}

impl ClusterNode {
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl NatsCluster {
    /// Starts `size` servers routed to each other and waits until JetStream answers
    /// (its meta leader is elected) and every server is part of its meta group.
    pub async fn start(size: usize) -> Self {
        let binary = std::env::var("NATS_SERVER_BIN").unwrap_or_else(|_| "/usr/sbin/nats-server".to_owned());
        let dir = std::env::temp_dir().join(format!("nats-cluster-{}", Uuid::new_v4().simple()));
        let routes: Vec<u16> = (0..size).map(|_| free_port()).collect();
        let route_urls =
            routes.iter().map(|port| format!("nats://127.0.0.1:{port}")).collect::<Vec<_>>().join(",");
        let mut nodes = Vec::with_capacity(size);
        for (i, route) in routes.iter().enumerate() {
            let (name, port, monitor_port) = (format!("n{}", i + 1), free_port(), free_port());
            let child = Command::new(&binary)
                .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-n", &name])
                .args(["-m", &monitor_port.to_string()])
                .arg("-sd")
                .arg(dir.join(&name))
                .args(["--cluster_name", "relay-test", "--cluster", &format!("nats://127.0.0.1:{route}")])
                .args(["--routes", &route_urls])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("cannot run {binary} (set NATS_SERVER_BIN): {e}"));
            nodes.push(ClusterNode { name, port, monitor_port, child: Some(child) });
        }
        let cluster = Self { nodes, dir };
        cluster.wait_ready(size).await;
        cluster
    }

    /// Every running server's URL, comma-separated, as `NATS_URL` takes them.
    pub fn urls(&self) -> String {
        self.nodes.iter().filter(|n| n.is_running()).map(ClusterNode::url).collect::<Vec<_>>().join(",")
    }

    /// Kills the server named `name` with SIGKILL (its store stays).
    pub fn kill(&mut self, name: &str) {
        let node =
            self.nodes.iter_mut().find(|n| n.name == name).unwrap_or_else(|| panic!("no server {name}"));
        if let Some(mut child) = node.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Waits (30 s at most) until JetStream answers through the cluster and its meta
    /// group has `size` members, all current.
    async fn wait_ready(&self, size: usize) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let why = match self.meta_group().await {
                Ok(members) if members >= size => return,
                Ok(members) => format!("{members} of {size} servers in the meta group"),
                Err(e) => e,
            };
            assert!(tokio::time::Instant::now() < deadline, "the NATS cluster did not form in 30 s: {why}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// How many servers the JetStream meta group has (the leader and its current
    /// peers), from the meta leader's monitoring `/jsz` (only the leader lists peers).
    async fn meta_group(&self) -> Result<usize, String> {
        let jsz = |node: &ClusterNode| {
            let url = format!("http://127.0.0.1:{}/jsz", node.monitor_port);
            async move {
                let answer = reqwest::get(&url).await.map_err(|e| format!("{url}: {e}"))?;
                answer.json::<serde_json::Value>().await.map_err(|e| format!("{url}: {e}"))
            }
        };
        let any = self.nodes.iter().find(|n| n.is_running()).ok_or("no server running")?;
        let leader = jsz(any).await?["meta_cluster"]["leader"].as_str().unwrap_or("").to_owned();
        let leader = self
            .nodes
            .iter()
            .find(|n| n.name == leader && n.is_running())
            .ok_or_else(|| format!("no JetStream meta leader yet ({leader:?})"))?;
        let meta = jsz(leader).await?;
        let current = meta["meta_cluster"]["replicas"]
            .as_array()
            .map_or(0, |peers| peers.iter().filter(|p| p["current"].as_bool() == Some(true)).count());
        Ok(current + 1)
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
