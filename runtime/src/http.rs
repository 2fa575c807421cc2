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
//!
//! Closing is lingering (RFC 9112 §9.6, [`LingeringClose`]): hyper answers early (a 413
//! before the body is read, say) and closes, and a socket closed with unread input is
//! answered by the kernel with a reset, which lets the client's stack discard the
//! answer before the client reads it. hyper has no option for this (it drains at most
//! one buffered chunk of an unread body), so the socket is wrapped: after hyper's last
//! write the write side is shut (FIN) and input is read and discarded until the client
//! closes too, for at most [`LINGER_TIME`] and [`LINGER_MAX_BYTES`].

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

/// How long a client may take to send a request's headers, counted from the accept
/// (also the wait for the next request on an idle keep-alive connection).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(15);
/// HTTP/2: a ping this often on a quiet connection, and the connection closed when the
/// answer takes longer than this.
pub const H2_KEEP_ALIVE: Duration = Duration::from_secs(20);
/// HTTP/2: streams one connection may have open at once.
pub const H2_MAX_STREAMS: u32 = 256;
/// Longest a closing connection keeps reading (and discarding) after its last answer,
/// waiting for the client to close too: enough for a client still sending to read the
/// answer, short enough that lingering costs a socket for seconds, not minutes.
pub const LINGER_TIME: Duration = Duration::from_secs(2);
/// Most input discarded while lingering; a client that sends more is reset.
pub const LINGER_MAX_BYTES: usize = 4 << 20;

/// Options of [`serve`].
#[derive(Debug, Clone, Copy)]
pub struct ServeOptions {
    /// See [`HEADER_READ_TIMEOUT`].
    pub header_read_timeout: Duration,
    /// Sets `TCP_NODELAY` on accepted sockets: small frames go out at once.
    pub nodelay: bool,
    /// HTTP/2: how quiet a connection may be before it is pinged, and how long the
    /// answer may take before the connection is closed. See [`H2_KEEP_ALIVE`].
    pub h2_keep_alive: Duration,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self { header_read_timeout: HEADER_READ_TIMEOUT, nodelay: false, h2_keep_alive: H2_KEEP_ALIVE }
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
        .keep_alive_interval(options.h2_keep_alive)
        .keep_alive_timeout(options.h2_keep_alive)
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
        let tcp = LingeringClose::new(tcp);
        let connection =
            builder.serve_connection_with_upgrades(TokioIo::new(tcp), TowerToHyperService::new(router));
        // Clients that time out, reset or send garbage end here; nothing to report.
        if let Err(error) = watcher.watch(connection.into_owned()).await {
            tracing::trace!(error = %error, "connection ended with an error");
        }
    });
}

/// An accepted socket whose shutdown is a lingering close (RFC 9112 §9.6): hyper calls
/// `poll_shutdown` once it has written its last answer on a connection it closes (after
/// `Connection: close`, an early answer to an unread body, an idle keep-alive timeout
/// or a graceful shutdown), and so does the owner of an upgraded connection. Instead of
/// returning as soon as the FIN is queued, it then reads and discards input until the
/// client closes its side (EOF) or resets, [`LINGER_TIME`] passes or
/// [`LINGER_MAX_BYTES`] were discarded; only then is the socket closed. A client that
/// closes promptly (every HTTP client does on a FIN) costs nothing more.
pub struct LingeringClose {
    tcp: TcpStream,
    time: Duration,
    max_bytes: usize,
    /// Set once the write side is shut: lingering has begun.
    linger: Option<Linger>,
}

struct Linger {
    until: Pin<Box<tokio::time::Sleep>>,
    discarded: usize,
}

impl LingeringClose {
    /// Lingering for [`LINGER_TIME`] and [`LINGER_MAX_BYTES`] at most.
    pub fn new(tcp: TcpStream) -> Self {
        Self::with_bounds(tcp, LINGER_TIME, LINGER_MAX_BYTES)
    }

    /// Lingering for `time` and `max_bytes` at most.
    pub fn with_bounds(tcp: TcpStream, time: Duration, max_bytes: usize) -> Self {
        Self { tcp, time, max_bytes, linger: None }
    }
}

impl AsyncRead for LingeringClose {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for LingeringClose {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.linger.is_none() {
            ready!(Pin::new(&mut this.tcp).poll_shutdown(cx))?;
            this.linger = Some(Linger { until: Box::pin(tokio::time::sleep(this.time)), discarded: 0 });
        }
        let Some(linger) = this.linger.as_mut() else { unreachable!("set above") };
        let mut scratch = [0u8; 8192];
        while linger.discarded < this.max_bytes {
            let mut buf = ReadBuf::new(&mut scratch);
            match Pin::new(&mut this.tcp).poll_read(cx, &mut buf) {
                // The client closed too (or reset): nothing is left to protect.
                Poll::Ready(Ok(())) if buf.filled().is_empty() => return Poll::Ready(Ok(())),
                Poll::Ready(Err(_)) => return Poll::Ready(Ok(())),
                Poll::Ready(Ok(())) => linger.discarded += buf.filled().len(),
                Poll::Pending => return linger.until.as_mut().poll(cx).map(Ok),
            }
        }
        Poll::Ready(Ok(()))
    }
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
        start_with(ServeOptions { header_read_timeout, nodelay: true, ..Default::default() }).await
    }

    async fn start_with(options: ServeOptions) -> (std::net::SocketAddr, tokio::sync::oneshot::Sender<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let router = Router::new().route("/", get(|| async { "hello" }));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
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

    /// Reads one HTTP/2 frame: (type, flags, payload); `None` at the end of the stream.
    async fn read_frame(tcp: &mut TcpStream) -> Option<(u8, u8, Vec<u8>)> {
        let mut head = [0u8; 9];
        tcp.read_exact(&mut head).await.ok()?;
        let length = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let mut payload = vec![0u8; length];
        tcp.read_exact(&mut payload).await.ok()?;
        Some((head[3], head[4], payload))
    }

    const SETTINGS: u8 = 0x4;
    const PING: u8 = 0x6;
    const GOAWAY: u8 = 0x7;
    const ACK: u8 = 0x1;

    /// HTTP/2 with prior knowledge, as a raw client sees it: the server announces its
    /// stream cap in its SETTINGS, pings a quiet connection, and closes it when the ping
    /// goes unanswered.
    #[tokio::test]
    async fn http2_announces_its_stream_cap_and_closes_a_connection_that_stops_answering_pings() {
        let keep_alive = Duration::from_millis(300);
        let (addr, _stop) =
            start_with(ServeOptions { h2_keep_alive: keep_alive, nodelay: true, ..Default::default() }).await;
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.unwrap();
        tcp.write_all(&[0, 0, 0, SETTINGS, 0, 0, 0, 0, 0]).await.unwrap();

        let (kind, flags, settings) = read_frame(&mut tcp).await.expect("the server's SETTINGS");
        assert_eq!((kind, flags), (SETTINGS, 0));
        let cap = settings
            .chunks(6)
            .find(|entry| entry[..2] == [0, 3])
            .map(|entry| u32::from_be_bytes([entry[2], entry[3], entry[4], entry[5]]));
        assert_eq!(cap, Some(H2_MAX_STREAMS), "SETTINGS_MAX_CONCURRENT_STREAMS");
        tcp.write_all(&[0, 0, 0, SETTINGS, ACK, 0, 0, 0, 0]).await.unwrap();

        // Then silence from the client: a ping comes, and, unanswered, the end.
        let started = std::time::Instant::now();
        let mut pinged = false;
        let ended = tokio::time::timeout(Duration::from_secs(5), async {
            while let Some((kind, flags, _)) = read_frame(&mut tcp).await {
                pinged |= kind == PING && flags & ACK == 0;
                if kind == GOAWAY {
                    break;
                }
            }
        })
        .await;
        assert!(ended.is_ok(), "the connection is still open after {:?}", started.elapsed());
        assert!(pinged, "no PING on a quiet connection");
        assert!(started.elapsed() >= keep_alive, "not before the keep-alive interval");
    }

    /// A connected pair: the client's end, and the server's end wrapped for lingering.
    async fn lingering_pair(time: Duration, max_bytes: usize) -> (TcpStream, LingeringClose) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (client, LingeringClose::with_bounds(server, time, max_bytes))
    }

    #[tokio::test]
    async fn lingering_ends_as_soon_as_the_client_closes_and_the_client_sees_a_clean_end() {
        let (mut client, mut server) = lingering_pair(Duration::from_secs(10), 1 << 20).await;
        client.write_all(&[b'x'; 50_000]).await.unwrap();
        server.write_all(b"answer").await.unwrap();
        let started = std::time::Instant::now();
        let closing = tokio::spawn(async move { server.shutdown().await });
        let mut answer = Vec::new();
        client.read_to_end(&mut answer).await.expect("a FIN, not a reset");
        assert_eq!(answer, b"answer");
        client.write_all(b"more of the body").await.expect("still read by the server");
        drop(client);
        closing.await.unwrap().unwrap();
        assert!(started.elapsed() < Duration::from_secs(2), "took {:?}", started.elapsed());
    }

    #[tokio::test]
    async fn lingering_is_bounded_in_time_for_a_client_that_never_closes() {
        let (mut client, mut server) = lingering_pair(Duration::from_millis(300), 1 << 20).await;
        let started = std::time::Instant::now();
        server.shutdown().await.unwrap();
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(250) && took < Duration::from_secs(2), "took {took:?}");
        let mut answer = Vec::new();
        client.read_to_end(&mut answer).await.expect("the client saw the FIN");
    }

    #[tokio::test]
    async fn lingering_is_bounded_in_bytes_for_a_client_that_keeps_sending() {
        let (mut client, mut server) = lingering_pair(Duration::from_secs(10), 64 * 1024).await;
        let sending = tokio::spawn(async move {
            let chunk = [b'x'; 16 * 1024];
            while client.write_all(&chunk).await.is_ok() {}
        });
        let started = std::time::Instant::now();
        server.shutdown().await.unwrap();
        assert!(started.elapsed() < Duration::from_secs(2), "took {:?}", started.elapsed());
        drop(server);
        tokio::time::timeout(Duration::from_secs(5), sending).await.expect("the client is reset").unwrap();
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
