//! `deploy/nginx.conf` run by a real nginx (Debian's `nginx-light`; `NGINX_BIN` to use
//! another), outside Docker: the gateway config must load, and its access log must not
//! carry the tokens browsers put in the WebSocket URL.
//!
//! Only what Docker would provide is swapped: the listen port and the log path. The
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

#[test]
fn the_gateway_config_loads_in_nginx_and_keeps_tokens_out_of_its_access_log() {
    let nginx = nginx_bin();
    let dir = std::env::temp_dir().join(format!("gateway-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let d = dir.display();
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();

    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/nginx.conf");
    let gateway = std::fs::read_to_string(&repo).expect("deploy/nginx.conf");
    let gateway = replace_once(&gateway, "listen 80;", &format!("listen 127.0.0.1:{port};"));
    let gateway = replace_once(&gateway, "/var/log/nginx/access.log", &format!("{d}/access.log"));
    std::fs::write(dir.join("gateway.conf"), gateway).unwrap();
    let main = format!(
        "daemon off;\nmaster_process off;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
         events {{}}\n\
         http {{\n  access_log {d}/image-access.log;\n\
         client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
         fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
         include {d}/gateway.conf;\n}}\n"
    );
    std::fs::write(dir.join("nginx.conf"), main).unwrap();
    let args = ["-p".to_owned(), format!("{d}/"), "-c".to_owned(), format!("{d}/nginx.conf")];

    let check = Command::new(&nginx).arg("-t").args(&args).output().expect("nginx -t runs");
    let said = String::from_utf8_lossy(&check.stderr);
    assert!(check.status.success(), "nginx refuses the gateway config:\n{said}");

    let server = Nginx(Command::new(&nginx).args(&args).spawn().expect("nginx starts"));
    let health = get(port, "/gateway-health");
    assert!(health.starts_with("HTTP/1.1 200") && health.ends_with("ok\n"), "{health}");
    // Probes stay inside the Docker network: 404 at the gateway, with a token in the URL.
    let metrics = get(port, &format!("/metrics?token={TOKEN}&since=7"));
    assert!(metrics.starts_with("HTTP/1.1 404"), "{metrics}");
    drop(server);

    let log = read(&dir.join("access.log"));
    assert!(log.contains("\"GET /metrics HTTP/1.1\" 404"), "the request is logged by path:\n{log}");
    assert!(!log.contains(TOKEN), "no token in the gateway's access log:\n{log}");
    let image_log = read(&dir.join("image-access.log"));
    assert!(!image_log.contains(TOKEN), "the image's default access log is replaced:\n{image_log}");
    let _ = std::fs::remove_dir_all(&dir);
}
