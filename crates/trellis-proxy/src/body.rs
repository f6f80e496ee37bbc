use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt as _;
use http_body_util::combinators::UnsyncBoxBody;
use trellis_resilience::BoxError;
use trellis_resilience::retry::TryCloneBody;

/// A request or response body that is either fully buffered — and so can be sent
/// again by a retry or a hedge — or a stream passed through as it arrives.
#[derive(Debug)]
pub struct ProxyBody {
    inner: Inner,
}

enum Inner {
    Full(Option<Bytes>),
    Stream(UnsyncBoxBody<Bytes, BoxError>),
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Full(b) => f
                .debug_tuple("Full")
                .field(&b.as_ref().map(Bytes::len))
                .finish(),
            Self::Stream(_) => f.write_str("Stream"),
        }
    }
}

impl ProxyBody {
    /// An empty body.
    pub fn empty() -> Self {
        Self::full(Bytes::new())
    }

    /// A buffered body.
    pub fn full(bytes: impl Into<Bytes>) -> Self {
        Self {
            inner: Inner::Full(Some(bytes.into())),
        }
    }

    /// A streamed body.
    pub fn stream<B>(body: B) -> Self
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        Self {
            inner: Inner::Stream(body.map_err(Into::into).boxed_unsync()),
        }
    }

    /// Whether the body is buffered (replayable).
    pub fn is_buffered(&self) -> bool {
        matches!(self.inner, Inner::Full(_))
    }

    /// Buffers a streamed body of at most `limit` bytes so it can be replayed.
    /// A body over the limit is returned unbuffered — already-read bytes first — so
    /// nothing is lost; it just can't be retried.
    ///
    /// # Errors
    /// If reading the stream fails.
    pub async fn buffer(self, limit: usize) -> Result<Self, BoxError> {
        let Inner::Stream(mut stream) = self.inner else {
            return Ok(self);
        };
        if stream.size_hint().lower() > limit as u64 {
            return Ok(Self {
                inner: Inner::Stream(stream),
            });
        }
        let mut buffered = bytes::BytesMut::new();
        while let Some(frame) = stream.frame().await {
            let frame = frame?;
            if let Ok(data) = frame.into_data() {
                buffered.extend_from_slice(&data);
                if buffered.len() > limit {
                    // Too big to replay: put what was read back in front of the rest.
                    let head = http_body_util::Full::new(buffered.freeze())
                        .map_err(|never| match never {});
                    let rest = StreamRest {
                        head: Some(head),
                        rest: stream,
                    };
                    return Ok(Self::stream(rest));
                }
            }
            // Trailers are dropped when buffering; request trailers are vanishingly rare.
        }
        Ok(Self::full(buffered.freeze()))
    }
}

/// A body whose first part was already read.
struct StreamRest<H> {
    head: Option<H>,
    rest: UnsyncBoxBody<Bytes, BoxError>,
}

impl<H> Body for StreamRest<H>
where
    H: Body<Data = Bytes, Error = BoxError> + Unpin,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(head) = self.head.as_mut() {
            match Pin::new(head).poll_frame(cx) {
                Poll::Ready(Some(frame)) => return Poll::Ready(Some(frame)),
                Poll::Ready(None) => self.head = None,
                Poll::Pending => return Poll::Pending,
            }
        }
        Pin::new(&mut self.rest).poll_frame(cx)
    }
}

impl Default for ProxyBody {
    fn default() -> Self {
        Self::empty()
    }
}

impl From<Bytes> for ProxyBody {
    fn from(bytes: Bytes) -> Self {
        Self::full(bytes)
    }
}

impl TryCloneBody for ProxyBody {
    fn try_clone_body(&self) -> Option<Self> {
        match &self.inner {
            Inner::Full(Some(bytes)) => Some(Self::full(bytes.clone())),
            Inner::Full(None) => Some(Self::empty()),
            Inner::Stream(_) => None,
        }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut self.get_mut().inner {
            Inner::Full(bytes) => Poll::Ready(
                bytes
                    .take()
                    .filter(|b| !b.is_empty())
                    .map(|b| Ok(Frame::data(b))),
            ),
            Inner::Stream(stream) => Pin::new(stream).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Full(bytes) => bytes.as_ref().is_none_or(Bytes::is_empty),
            Inner::Stream(stream) => stream.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Full(bytes) => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
            Inner::Stream(stream) => stream.size_hint(),
        }
    }
}

#[cfg(test)]
mod test {
    use http_body_util::BodyExt as _;

    use super::*;

    fn chunks(parts: &[&'static str]) -> ProxyBody {
        let frames: Vec<Result<Frame<Bytes>, BoxError>> = parts
            .iter()
            .map(|p| Ok(Frame::data(Bytes::from_static(p.as_bytes()))))
            .collect();
        ProxyBody::stream(http_body_util::StreamBody::new(futures_util::stream::iter(
            frames,
        )))
    }

    #[tokio::test]
    async fn buffering_makes_small_bodies_replayable() {
        let body = chunks(&["hel", "lo"]).buffer(16).await.expect("buffer");
        assert!(body.is_buffered());
        let copy = body.try_clone_body().expect("replayable");
        assert_eq!(copy.collect().await.expect("read").to_bytes(), "hello");
        assert_eq!(body.collect().await.expect("read").to_bytes(), "hello");
    }

    #[tokio::test]
    async fn big_bodies_stream_through_unchanged() {
        let body = chunks(&["aaaa", "bbbb", "cccc"])
            .buffer(6)
            .await
            .expect("buffer");
        assert!(!body.is_buffered());
        assert!(body.try_clone_body().is_none());
        assert_eq!(
            body.collect().await.expect("read").to_bytes(),
            "aaaabbbbcccc"
        );
    }
}
