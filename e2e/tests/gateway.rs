//! `deploy/nginx.conf` run by a real nginx (Debian's `nginx-light`; `NGINX_BIN` to use
//! another), outside Docker: the gateway config must load, its access log must not
//! carry the tokens browsers put in the WebSocket URL, and a fanout replica that
//! answers 503 (not ready, or full) must not turn clients away while another can serve.
//! With real fanout replicas behind it: a rolling restart, WebSocket and all.
//!
//! Only what Docker would provide is swapped: the listen port, the log path and, where
//! a test needs replicas, Docker's DNS name for them (an upstream group instead). The
//! test's own http block stands in for the image's `nginx.conf`, with an http-level
//! access log in nginx's default format as the image has, so the test also shows the
//! gateway's server-level log replaces it rather than adding to it.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

const TOKEN: &str = "eyJhbGciOiJIUzI1NiJ9.must-not-be-logged.sig";

fn nginx_bin() -> PathBuf {
    let bin = PathBuf::from(std::env::var("NGINX_BIN").unwrap_or_else(|_| "/usr/sbin/nginx".into()));
    assert!(
        bin.exists(),
        "nginx is not installed: the gateway test needs it. Install it with \
         `apt-get install -y nginx-light` (or set NGINX_BIN)."
    );
    bin
}

fn replace_once(text: &str, from: &str, to: &str) -> String {
    assert_eq!(text.matches(from).count(), 1, "deploy/nginx.conf has `{from}` once");
    text.replacen(from, to, 1)
}

/// Kills nginx when the test ends, however it ends.
struct Nginx(Child);

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn get(port: u16, path: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut tcp = loop {
        match TcpStream::connect(("127.0.0.1", port)) {
            Ok(tcp) => break tcp,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => panic!("nginx does not listen on {port}: {e}"),
        }
    };
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(tcp, "GET {path} HTTP/1.1\r\nHost: relay.test\r\nConnection: close\r\n\r\n").unwrap();
    let mut answer = String::new();
    tcp.read_to_string(&mut answer).expect("nginx answers");
    answer
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// deploy/nginx.conf running in a real nginx on a free port, in a scratch directory.
struct Gateway {
    port: u16,
    dir: PathBuf,
    server: Option<Nginx>,
}

impl Gateway {
    /// Loads the config with only Docker's parts swapped (the listen port, the log path,
    /// and where `fanout` points when `fanout` is given: an upstream group of these
    /// addresses instead of Docker's DNS), checks it with `nginx -t`, and starts nginx.
    fn start(fanout: &[u16]) -> Self {
        let nginx = nginx_bin();
        let dir = std::env::temp_dir().join(format!("gateway-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let d = dir.display();
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();

        let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/nginx.conf");
        let gateway = std::fs::read_to_string(&repo).expect("deploy/nginx.conf");
        let gateway = replace_once(&gateway, "listen 80;", &format!("listen 127.0.0.1:{port};"));
        let mut gateway = replace_once(&gateway, "/var/log/nginx/access.log", &format!("{d}/access.log"));
        let mut upstream = String::new();
        if !fanout.is_empty() {
            assert!(gateway.contains("set $fanout fanout:8001;"), "deploy/nginx.conf points at fanout:8001");
            gateway = gateway.replace("set $fanout fanout:8001;", "set $fanout fanout_replicas;");
            // `max_fails=0`: like the per-request peers of a name resolved through Docker's
            // DNS, a refused replica is not remembered as down.
            let servers: String =
                fanout.iter().map(|p| format!("server 127.0.0.1:{p} max_fails=0; ")).collect();
            upstream = format!("  upstream fanout_replicas {{ {servers}}}\n");
        }
        std::fs::write(dir.join("gateway.conf"), gateway).unwrap();
        let main = format!(
            "daemon off;\nmaster_process off;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
             events {{}}\n\
             http {{\n  access_log {d}/image-access.log;\n\
             client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
             fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
             {upstream}  include {d}/gateway.conf;\n}}\n"
        );
        std::fs::write(dir.join("nginx.conf"), main).unwrap();
        let args = ["-p".to_owned(), format!("{d}/"), "-c".to_owned(), format!("{d}/nginx.conf")];

        let check = Command::new(&nginx).arg("-t").args(&args).output().expect("nginx -t runs");
        let said = String::from_utf8_lossy(&check.stderr);
        assert!(check.status.success(), "nginx refuses the gateway config:\n{said}");
        let server = Nginx(Command::new(&nginx).args(&args).spawn().expect("nginx starts"));
        Self { port, dir, server: Some(server) }
    }

    /// Stops nginx (flushing its logs) and returns the gateway's and the image's access log.
    fn stop(mut self) -> (String, String) {
        drop(self.server.take());
        (read(&self.dir.join("access.log")), read(&self.dir.join("image-access.log")))
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        drop(self.server.take());
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn the_gateway_config_loads_in_nginx_and_keeps_tokens_out_of_its_access_log() {
    let gateway = Gateway::start(&[]);
    let health = get(gateway.port, "/gateway-health");
    assert!(health.starts_with("HTTP/1.1 200") && health.ends_with("ok\n"), "{health}");
    // Probes stay inside the Docker network: 404 at the gateway, with a token in the URL.
    let metrics = get(gateway.port, &format!("/metrics?token={TOKEN}&since=7"));
    assert!(metrics.starts_with("HTTP/1.1 404"), "{metrics}");

    let (log, image_log) = gateway.stop();
    assert!(log.contains("\"GET /metrics HTTP/1.1\" 404"), "the request is logged by path:\n{log}");
    assert!(!log.contains(TOKEN), "no token in the gateway's access log:\n{log}");
    assert!(!image_log.contains(TOKEN), "the image's default access log is replaced:\n{image_log}");
}

/// A stand-in fanout replica: answers every request with `answer` and counts them.
fn replica(answer: &'static str) -> (u16, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = hits.clone();
    std::thread::spawn(move || {
        for mut tcp in listener.incoming().flatten() {
            let mut request = Vec::new();
            let mut byte = [0u8; 1];
            while !request.ends_with(b"\r\n\r\n") && tcp.read(&mut byte).is_ok_and(|n| n == 1) {
                request.push(byte[0]);
            }
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let _ = tcp.write_all(answer.as_bytes());
        }
    });
    (port, hits)
}

#[test]
fn a_replica_that_answers_503_is_skipped_for_another_one() {
    // One replica not ready yet (filling its window after a start) or full: 503 before
    // any upgrade. The gateway must hand the client to the other replica.
    let not_ready =
        "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 9\r\nConnection: close\r\n\r\nnot ready";
    let ready = "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nready";
    let (busy, busy_hits) = replica(not_ready);
    let (free, free_hits) = replica(ready);
    let gateway = Gateway::start(&[busy, free]);
    for _ in 0..4 {
        let answer = get(gateway.port, &format!("/ws/messages?token={TOKEN}"));
        assert!(answer.starts_with("HTTP/1.1 200") && answer.ends_with("ready"), "{answer}");
    }
    let load = std::sync::atomic::Ordering::SeqCst;
    assert_eq!(free_hits.load(load), 4, "every client reached the ready replica");
    assert!(busy_hits.load(load) >= 1, "round robin did try the busy one");
}

#[test]
fn the_presence_endpoint_under_api_reaches_fanout() {
    // Presence lives in fanout, while the rest of /api/ is ingest's.
    let ready = "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nready";
    let (fanout, hits) = replica(ready);
    let gateway = Gateway::start(&[fanout]);
    let answer = get(gateway.port, "/api/chats/chat_1/presence?account_id=acc");
    assert!(answer.starts_with("HTTP/1.1 200") && answer.ends_with("ready"), "{answer}");
    assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 1, "fanout answered it");
}

/// A replica whose address takes no new connection, as a killed container's address does
/// until the gateway's DNS forgets it (up to `resolver valid=10s`): a listener with a
/// backlog of 0 that never accepts, its one queue slot taken, so the kernel drops every
/// further SYN and a connect hangs.
fn unanswering_replica() -> (u16, socket2::Socket, TcpStream) {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    socket.bind(&"127.0.0.1:0".parse::<std::net::SocketAddr>().unwrap().into()).unwrap();
    socket.listen(0).unwrap();
    let port = socket.local_addr().unwrap().as_socket().unwrap().port();
    let filler = TcpStream::connect(("127.0.0.1", port)).unwrap();
    (port, socket, filler)
}

#[test]
fn a_replica_whose_address_answers_nothing_costs_a_new_connection_about_two_seconds() {
    let (dead, _listener, _filler) = unanswering_replica();
    let probe = std::net::TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], dead)),
        Duration::from_millis(500),
    );
    assert!(probe.is_err(), "the stand-in must not take connections");
    let ready = "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nready";
    let (live, live_hits) = replica(ready);
    let gateway = Gateway::start(&[dead, live]);
    let mut slowest = Duration::ZERO;
    for _ in 0..4 {
        let started = Instant::now();
        let answer = get(gateway.port, &format!("/ws/messages?token={TOKEN}"));
        slowest = slowest.max(started.elapsed());
        assert!(answer.starts_with("HTTP/1.1 200") && answer.ends_with("ready"), "{answer}");
    }
    assert_eq!(live_hits.load(std::sync::atomic::Ordering::SeqCst), 4, "every client reached the live one");
    // proxy_connect_timeout 2s, then the next replica; nginx's default would be 60 s.
    assert!(slowest < Duration::from_secs(4), "a new connection took {slowest:?}");
    assert!(slowest >= Duration::from_millis(1900), "round robin never tried the dead one ({slowest:?})");
}

/// The page sends its token as a WebSocket subprotocol, not in the URL: when a replica
/// fails, nginx's error log (which prints the request line, whatever `log_format` says)
/// names the path and never the token.
#[test]
fn a_failed_upgrade_with_the_token_in_a_subprotocol_leaves_no_token_in_the_error_log() {
    let (dead, _listener, _filler) = unanswering_replica();
    let gateway = Gateway::start(&[dead]);
    let mut tcp = loop {
        match TcpStream::connect(("127.0.0.1", gateway.port)) {
            Ok(tcp) => break tcp,
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        tcp,
        "GET /ws/messages?since=7 HTTP/1.1\r\nHost: relay.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Protocol: relay.v1, bearer.{TOKEN}\r\n\r\n"
    )
    .unwrap();
    // The answer's head only: nginx keeps the connection open after it.
    let mut answer = Vec::new();
    let mut byte = [0u8; 1];
    while !answer.ends_with(b"\r\n\r\n") && tcp.read(&mut byte).is_ok_and(|n| n == 1) {
        answer.push(byte[0]);
    }
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 50"), "the dead replica fails the upgrade: {answer}");
    let errors = read(&gateway.dir.join("error.log"));
    assert!(
        errors.contains("/ws/messages?since=7"),
        "the failure is logged with its request line:\n{errors}"
    );
    assert!(!errors.contains(TOKEN), "no token in the error log:\n{errors}");
}

mod rolling_restart {
    //! A rolling restart through the real gateway config: WebSocket upgrades pass
    //! through nginx, a stopped replica's client is handed to the other one, and the
    //! replica that started after the missed events serves them from memory.

    use std::time::Duration;

    use futures::StreamExt;
    use secrecy::SecretString;
    use serde_json::{Value, json};
    use shared::claims::JwtKeys;
    use shared::envelope::{Envelope, EventType};
    use shared::subjects::Subjects;
    use testkit::{StreamGuard, nats_url};
    use tokio_tungstenite::tungstenite::Message;

    use super::Gateway;

    const SECRET: &str = "gateway-test-secret-0123456789abcdef012";
    type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

    /// A fanout replica on `port`; stops (closing its sockets with 1012) when dropped
    /// or stopped.
    async fn replica(port: u16, stream: &str, prefix: &str) -> testkit::service::Service {
        testkit::service::fanout(&[
            format!("--listen=127.0.0.1:{port}"),
            format!("--jwt-secret={SECRET}"),
            format!("--nats-url={}", nats_url()),
            format!("--stream-name={stream}"),
            format!("--subject-prefix={prefix}"),
            "--shutdown-grace-secs=1".to_owned(),
        ])
        .await
    }

    async fn connect(gateway: u16, token: &str, since: Option<u64>) -> (Ws, Value) {
        let since = since.map(|s| format!("&since={s}")).unwrap_or_default();
        let url = format!("ws://127.0.0.1:{gateway}/ws/messages?token={token}{since}");
        let mut tries = 0;
        let (mut ws, _) = loop {
            match tokio_tungstenite::connect_async(url.as_str()).await {
                Ok(ws) => break ws,
                Err(_) if tries < 100 => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("no WebSocket through the gateway: {e}"),
            }
        };
        let hello = next_json(&mut ws).await;
        assert_eq!(hello["type"], "hello", "{hello}");
        (ws, hello)
    }

    async fn next_json(ws: &mut Ws) -> Value {
        loop {
            let message =
                tokio::time::timeout(Duration::from_secs(10), ws.next()).await.expect("a frame in time");
            match message {
                Some(Ok(Message::Text(text))) => return serde_json::from_str(text.as_str()).unwrap(),
                Some(Ok(Message::Close(frame))) => {
                    return json!({"closed": frame.map(|f| u16::from(f.code)).unwrap_or(0)});
                }
                Some(Ok(_)) => continue,
                other => panic!("socket ended: {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn a_client_of_a_stopped_replica_resumes_through_the_gateway_on_one_started_after_it() {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let (stream, prefix) = (format!("GATEWAY_TEST_{id}"), format!("gatewaytest.{id}"));
        let _guard = StreamGuard::new(nats_url(), stream.as_str());
        let subjects = Subjects::new(prefix.clone()).unwrap();
        let js = async_nats::jetstream::new(async_nats::connect(nats_url()).await.unwrap());
        // Created as ingest creates it: fanout only follows it.
        let spec = shared::stream::StreamSpec::with_defaults(stream.clone(), subjects.clone());
        shared::stream::ensure_stream(&js, &spec).await.expect("creating the stream");
        let publish = |i: u64| {
            let (js, subject) = (js.clone(), subjects.event("acc_a", Some("c"), EventType::MessageNew));
            async move {
                let envelope = Envelope::new(
                    EventType::MessageNew,
                    "acc_a",
                    Some("c".into()),
                    chrono::Utc::now(),
                    json!({"i": i}),
                );
                js.publish(subject, envelope.to_bytes().into()).await.unwrap().await.unwrap().sequence
            }
        };
        // Replica B's port is reserved but closed: B is not running yet.
        let port_b = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut a = replica(0, &stream, &prefix).await;
        let port_a = a.port;
        let gateway = Gateway::start(&[port_a, port_b]);
        let token = JwtKeys::new(&SecretString::from(SECRET)).issue(
            "user-1",
            vec!["acc_a".into()],
            Duration::from_secs(600),
        );

        let (mut ws, _) = connect(gateway.port, &token, None).await;
        let seen = publish(0).await;
        assert_eq!(next_json(&mut ws).await["seq"], seen);

        // A stops (a deploy): its client is told to go elsewhere, then misses three events.
        assert!(a.stop(Duration::from_secs(15)).await, "A stops cleanly");
        assert_eq!(next_json(&mut ws).await["closed"], 1012);
        let mut missed = Vec::new();
        for i in 1..=3 {
            missed.push(publish(i).await);
        }
        // B starts after them, on the port the gateway already lists.
        let _b = replica(port_b, &stream, &prefix).await;

        let (mut ws, hello) = connect(gateway.port, &token, Some(seen)).await;
        assert_eq!(hello["recovered"], true, "{hello}");
        for seq in &missed {
            assert_eq!(next_json(&mut ws).await["seq"], *seq, "exactly the missed events, in order");
        }
        let live = publish(4).await;
        assert_eq!(next_json(&mut ws).await["seq"], live);
        let metrics =
            reqwest::get(format!("http://127.0.0.1:{port_b}/metrics")).await.unwrap().text().await.unwrap();
        assert!(
            metrics.contains("fanout_resumes_total{outcome=\"memory\"} 1"),
            "served from B's window:\n{metrics}"
        );
    }
}
