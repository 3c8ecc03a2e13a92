//! An accepted connection as the HTTP/2 layer sees it: one that does not take vectored writes,
//! so that a small answer leaves in one `write` instead of two.
//!
//! h2 copies a DATA frame's payload into its write buffer only below a threshold: 256 bytes on a
//! connection that takes vectored writes, 1 KiB on one that does not. A larger payload is chained
//! behind the buffer and must be written out before the next frame is encoded, so a unary answer
//! of 256 bytes to 1 KiB (a subject read is one) went out as a `writev` of headers and message,
//! then a second write of the trailers: two system calls and two wake-ups of the client for each
//! call. Without vectored writes the whole answer — and the answers of other calls finished at
//! the same time — is copied into one buffer and written once. Payloads of 1 KiB or more (long
//! lookups, audit pages) are written as buffer, then payload: one call more than `writev` (over
//! TLS, one record more), on answers large enough for it not to matter. TLS connections are
//! wrapped too (tokio-rustls takes vectored writes as well): `kluis-bench --tls` measured `get`
//! over TLS at 99.5 % of plaintext with the wrapper.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;

/// `T` with vectored writes hidden (`is_write_vectored` keeps tokio's default, `false`).
#[derive(Debug)]
pub struct Unvectored<T>(pub T);

impl<T: AsyncRead + Unpin> AsyncRead for Unvectored<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Unvectored<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl<T: Connected> Connected for Unvectored<T> {
    type ConnectInfo = T::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.0.connect_info()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::{TcpListener, TcpStream},
    };
    use tonic::transport::server::TcpConnectInfo;

    use super::*;

    #[tokio::test]
    async fn a_wrapped_connection_refuses_vectored_writes_and_carries_bytes_and_peer_unchanged() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        assert!(
            accepted.is_write_vectored(),
            "tokio's TcpStream writes vectored"
        );
        let mut server = Unvectored(accepted);
        assert!(!server.is_write_vectored());

        let info: TcpConnectInfo = server.connect_info();
        assert_eq!(info.remote_addr(), Some(client.local_addr().unwrap()));
        assert_eq!(info.local_addr(), Some(listener.local_addr().unwrap()));

        // A vectored write takes the first slice only (tokio's default), as h2 expects of a
        // connection that does not write vectored; the rest follows in a plain write.
        let parts = [io::IoSlice::new(b"head"), io::IoSlice::new(b"-payload")];
        assert_eq!(server.write_vectored(&parts).await.unwrap(), 4);
        server.write_all(b"-payload").await.unwrap();
        server.flush().await.unwrap();
        let mut got = [0u8; 12];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"head-payload");

        client.write_all(b"ping").await.unwrap();
        let mut back = [0u8; 4];
        server.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"ping");

        server.shutdown().await.unwrap();
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        assert!(
            rest.is_empty(),
            "shutdown reaches the peer as end of stream"
        );
    }
}
