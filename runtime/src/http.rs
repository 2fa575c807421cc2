//! The HTTP server loop both services run: `axum::serve`, plus a deadline on reading
//! request headers.
//!
//! `axum::serve` gives hyper no timer, so hyper's header read timeout never fires: a
//! client that opens a connection and sends half a request line holds a socket (and one
//! of a process's 20,000 files here) forever, and enough of them lock everyone out
//! before the WebSocket connection limit or the request timeout ever sees them. This is
//! the same loop built on hyper-util with a timer and that deadline, counted from the
//! accept (hyper's own starts at the first byte), and HTTP/2 keep-alive pings and a
//! stream cap; the rest matches
//! axum's: HTTP/1 with upgrades (WebSockets) and HTTP/2, and graceful shutdown that
//! stops accepting, lets in-flight requests finish and leaves upgraded connections to
//! their owners.

use std::future::Future;
use std::io;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};

/// How long a client may take to send a request's headers, counted from the accept
/// (also the wait for the next request on an idle keep-alive connection).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(15);
/// HTTP/2: a ping this often on a quiet connection, and the connection closed when the
/// answer takes longer than this.
const H2_KEEP_ALIVE: Duration = Duration::from_secs(20);
/// HTTP/2: streams one connection may have open at once.
const H2_MAX_STREAMS: u32 = 256;

/// Options of [`serve`].
#[derive(Debug, Clone, Copy)]
pub struct ServeOptions {
    /// See [`HEADER_READ_TIMEOUT`].
    pub header_read_timeout: Duration,
    /// Sets `TCP_NODELAY` on accepted sockets: small frames go out at once.
    pub nodelay: bool,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self { header_read_timeout: HEADER_READ_TIMEOUT, nodelay: false }
    }
}

/// Serves `router` on `listener` until `shutdown` resolves, then stops accepting and
/// waits for in-flight requests to finish.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    options: ServeOptions,
    shutdown: impl Future<Output = ()> + Send,
) -> io::Result<()> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(options.header_read_timeout);
    // HTTP/2 WebSockets (RFC 8441), as axum enables them; dead peers found by pings.
    builder
        .http2()
        .timer(TokioTimer::new())
        .enable_connect_protocol()
        .keep_alive_interval(H2_KEEP_ALIVE)
        .keep_alive_timeout(H2_KEEP_ALIVE)
        .max_concurrent_streams(H2_MAX_STREAMS);
    let builder = std::sync::Arc::new(builder);
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let tcp = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(error) => {
                    on_accept_error(error).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        serve_connection(&builder, &graceful, tcp, router.clone(), options);
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

fn serve_connection(
    builder: &std::sync::Arc<auto::Builder<TokioExecutor>>,
    graceful: &GracefulShutdown,
    tcp: TcpStream,
    router: Router,
    options: ServeOptions,
) {
    if options.nodelay
        && let Err(error) = tcp.set_nodelay(true)
    {
        tracing::debug!(%error, "cannot set TCP_NODELAY");
    }
    let (builder, watcher) = (builder.clone(), graceful.watcher());
    tokio::spawn(async move {
        // hyper's header deadline starts at the first byte: a connection that never
        // sends one would hold its socket forever. It gets the same deadline from the
        // accept, and is closed unserved.
        match tokio::time::timeout(options.header_read_timeout, tcp.peek(&mut [0u8; 1])).await {
            Ok(Ok(read)) if read > 0 => {}
            _ => return,
        }
        let connection =
            builder.serve_connection_with_upgrades(TokioIo::new(tcp), TowerToHyperService::new(router));
        // Clients that time out, reset or send garbage end here; nothing to report.
        if let Err(error) = watcher.watch(connection.into_owned()).await {
            tracing::trace!(error = %error, "connection ended with an error");
        }
    });
}

/// Raises the soft open-file limit to the hard one, as Go programs do at start: the
/// default soft limit (1024 in containers, often) would stop a server near a thousand
/// sockets while the hard limit allows far more. Returns the limit now in force.
pub fn raise_open_files_limit() -> u64 {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(files) => files,
        Err(error) => {
            tracing::warn!(%error, "cannot raise the open-file limit");
            rlimit::Resource::NOFILE.get().map(|(soft, _)| soft).unwrap_or(u64::MAX)
        }
    }
}

/// A refused or reset connection is the client's business. Anything else (out of
/// files, say) is worth a log line and a pause, so the loop does not spin on it.
async fn on_accept_error(error: io::Error) {
    if matches!(
        error.kind(),
        io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset
    ) {
        return;
    }
    tracing::error!(%error, "accepting a connection failed; retrying in 1 s");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::get;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn start(
        header_read_timeout: Duration,
    ) -> (std::net::SocketAddr, tokio::sync::oneshot::Sender<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let router = Router::new().route("/", get(|| async { "hello" }));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let options = ServeOptions { header_read_timeout, nodelay: true };
        tokio::spawn(serve(listener, router, options, async move {
            let _ = stopped.await;
        }));
        (addr, stop)
    }

    async fn read_all(tcp: &mut TcpStream) -> String {
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut answer))
            .await
            .expect("the server closes the connection")
            .unwrap();
        String::from_utf8_lossy(&answer).into_owned()
    }

    #[tokio::test]
    async fn a_client_that_never_finishes_its_headers_is_cut_off() {
        let (addr, _stop) = start(Duration::from_millis(300)).await;
        let mut slow = TcpStream::connect(addr).await.unwrap();
        slow.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").await.unwrap();
        let started = std::time::Instant::now();
        let answer = read_all(&mut slow).await;
        assert!(started.elapsed() >= Duration::from_millis(250), "not before the deadline");
        // hyper hangs up without an answer (a 408 would do as well).
        assert!(answer.is_empty() || answer.starts_with("HTTP/1.1 408"), "{answer}");
    }

    #[tokio::test]
    async fn a_prompt_client_is_served_and_shutdown_stops_accepting() {
        let (addr, stop) = start(Duration::from_millis(300)).await;
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
        let answer = read_all(&mut tcp).await;
        assert!(answer.starts_with("HTTP/1.1 200") && answer.ends_with("hello"), "{answer}");
        stop.send(()).unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(TcpStream::connect(addr).await.is_err(), "no longer accepting after shutdown");
    }

    #[tokio::test]
    async fn a_connection_that_never_sends_a_byte_is_closed_at_the_header_deadline() {
        let (addr, _stop) = start(Duration::from_millis(300)).await;
        let mut silent = TcpStream::connect(addr).await.unwrap();
        let started = std::time::Instant::now();
        let answer = read_all(&mut silent).await;
        assert!(answer.is_empty(), "{answer}");
        assert!(started.elapsed() < Duration::from_secs(2), "closed after {:?}", started.elapsed());
    }
}
