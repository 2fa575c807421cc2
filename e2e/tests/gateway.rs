//! `deploy/nginx.conf` run by a real nginx (Debian's `nginx-light`; `NGINX_BIN` to use
//! another), outside Docker: the gateway config must load, its access log must not
//! carry the tokens browsers put in the WebSocket URL, and a fanout replica that
//! answers 503 (not ready, or full) must not turn clients away while another can serve.
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
            let servers: String = fanout.iter().map(|p| format!("server 127.0.0.1:{p}; ")).collect();
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
