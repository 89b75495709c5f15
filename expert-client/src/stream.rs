//! [`ChatStream`]: one streamed answer, read under the phase deadlines of [`Timeouts`].

use std::collections::VecDeque;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_core::Stream;
use http_body_util::BodyExt;
use http_body_util::combinators::UnsyncBoxBody;
use tokio::time::Instant;

use crate::Timeouts;
use crate::completion::{Assembler, Fault, Progress, StreamEvent};
use crate::error::{ExpertError, TimeoutPhase};
use crate::sse::{SseDecoder, SseEvent};

/// Error type of the response bodies the stream reads.
pub(crate) type BodyError = Box<dyn std::error::Error + Send + Sync>;
/// A response body as the stream reads it.
pub(crate) type ResponseBody = UnsyncBoxBody<Bytes, BodyError>;

/// After `data: [DONE]`, how long the rest of the body (normally just the end of the chunked
/// encoding) may take before the connection is given up rather than returned to the pool.
pub const DRAIN_GRACE: Duration = Duration::from_millis(250);

/// One streamed answer. Call [`ChatStream::next`] until it returns `None`: it yields the
/// answer's [`StreamEvent::Token`]s in order, then exactly one [`StreamEvent::Done`], or an
/// [`ExpertError`] (after which nothing more). Every wait is bounded by the [`Timeouts`] of the
/// endpoint. Dropping the stream early closes its connection.
pub struct ChatStream {
    expert: Arc<str>,
    body: ResponseBody,
    decoder: SseDecoder,
    assembler: Assembler,
    /// Events decoded but not yet handed out.
    ready: VecDeque<StreamEvent>,
    /// Scratch for the decoder's output.
    decoded: Vec<SseEvent>,
    /// Why the stream stops, reported once `ready` is empty.
    fault: Option<Fault>,
    /// `[DONE]` (or the end of a finished body) was seen: only the drain and `Done` remain.
    finished: bool,
    /// Nothing more will be returned.
    ended: bool,
    tokens_delivered: u32,
    timeouts: Timeouts,
    started_at: Instant,
    /// Arrival of the last token read from the body.
    last_token_at: Option<Instant>,
}

impl fmt::Debug for ChatStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChatStream")
            .field("expert", &self.expert)
            .field("tokens_delivered", &self.tokens_delivered)
            .field("finished", &self.finished)
            .field("ended", &self.ended)
            .finish_non_exhaustive()
    }
}

/// A whole answer, as [`ChatStream::read_to_end`] read it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReadAnswer {
    /// The text, every token's in order.
    pub text: String,
    /// Content deltas (usually one token each).
    pub tokens: u32,
    /// When the first token arrived (`None`: no token).
    pub first_token_at: Option<Instant>,
    /// When the last token arrived.
    pub last_token_at: Option<Instant>,
    /// `stop`, `length`, ...; `None` when the server did not say.
    pub finish_reason: Option<String>,
    /// Token counts, when the server reported them.
    pub usage: Option<crate::Usage>,
    /// The `"qosroute"` extension object, when an expert sent one.
    pub extension: Option<serde_json::Value>,
}

impl ReadAnswer {
    /// Mean seconds between two tokens, first to last; `None` below two tokens.
    pub fn mean_step_s(&self) -> Option<f64> {
        let (first, last) = (self.first_token_at?, self.last_token_at?);
        (self.tokens >= 2).then(|| {
            last.saturating_duration_since(first).as_secs_f64() / f64::from(self.tokens - 1)
        })
    }
}

impl ChatStream {
    pub(crate) fn new(
        expert: Arc<str>,
        body: ResponseBody,
        timeouts: Timeouts,
        started_at: Instant,
    ) -> Self {
        ChatStream {
            expert,
            body,
            decoder: SseDecoder::new(),
            assembler: Assembler::default(),
            ready: VecDeque::new(),
            decoded: Vec::new(),
            fault: None,
            finished: false,
            ended: false,
            tokens_delivered: 0,
            timeouts,
            started_at,
            last_token_at: None,
        }
    }

    /// Tokens handed out so far.
    pub fn tokens_delivered(&self) -> u32 {
        self.tokens_delivered
    }

    /// The next event: `Some(Ok(Token))`…, then `Some(Ok(Done))` or `Some(Err(_))`, then `None`
    /// forever.
    ///
    /// Cancel-safe (usable in `tokio::select!`): a dropped `next` future loses no event; events
    /// are only taken from the body and queued synchronously after a frame arrived.
    pub async fn next(&mut self) -> Option<Result<StreamEvent, ExpertError>> {
        let asked_at = Instant::now();
        loop {
            if let Some(event) = self.ready.pop_front() {
                match &event {
                    StreamEvent::Token { .. } => {
                        self.tokens_delivered = self.tokens_delivered.saturating_add(1);
                    }
                    StreamEvent::Done { .. } => self.ended = true,
                }
                return Some(Ok(event));
            }
            if let Some(fault) = self.fault.take() {
                self.ended = true;
                let error = fault.into_error(self.tokens_delivered);
                tracing::debug!(expert = %self.expert, %error, "answer stream failed");
                return Some(Err(error));
            }
            if self.ended {
                return None;
            }
            if self.finished {
                self.drain().await;
                self.finished = false;
                let done = self.assembler.done();
                self.ready.push_back(done);
                continue;
            }
            self.read(asked_at).await;
        }
    }

    /// Reads the answer to its end: its text, its token count and when its first and last
    /// tokens arrived, with what [`StreamEvent::Done`] said. The first error ends it.
    pub async fn read_to_end(&mut self) -> Result<ReadAnswer, ExpertError> {
        let mut answer = ReadAnswer::default();
        while let Some(event) = self.next().await {
            match event? {
                StreamEvent::Token { text, at } => {
                    answer.first_token_at.get_or_insert(at);
                    answer.last_token_at = Some(at);
                    answer.tokens += 1;
                    answer.text.push_str(&text);
                }
                StreamEvent::Done {
                    finish_reason,
                    usage,
                    extension,
                } => {
                    answer.finish_reason = finish_reason;
                    answer.usage = usage;
                    answer.extension = extension;
                    break;
                }
            }
        }
        Ok(answer)
    }

    /// Turns the stream into a [`futures_core::Stream`] with the same items.
    pub fn into_stream(self) -> impl Stream<Item = Result<StreamEvent, ExpertError>> + Send {
        futures_util::stream::unfold(self, |mut s| async move {
            let item = s.next().await?;
            Some((item, s))
        })
    }

    /// The deadline of the next read and the phase it belongs to.
    fn deadline(&self, asked_at: Instant) -> (Instant, TimeoutPhase) {
        deadline(
            &self.timeouts,
            self.started_at,
            self.last_token_at,
            asked_at,
        )
    }

    /// Reads one frame (or times out, or ends) and files what it says into `ready`/`fault`.
    async fn read(&mut self, asked_at: Instant) {
        let (deadline, phase) = self.deadline(asked_at);
        let frame = match tokio::time::timeout_at(deadline, self.body.frame()).await {
            Err(_) => {
                self.fault = Some(Fault::Timeout(phase));
                return;
            }
            Ok(frame) => frame,
        };
        match frame {
            None => self.end_of_body(),
            Some(Err(error)) => {
                tracing::debug!(expert = %self.expert, error = %crate::error::chain(error.as_ref()), "answer body broke off");
                self.fault = Some(Fault::Closed);
            }
            Some(Ok(frame)) => {
                if let Ok(bytes) = frame.into_data() {
                    let at = Instant::now();
                    let pushed = self.decoder.push_into(&bytes, &mut self.decoded);
                    self.file_decoded(at);
                    if let Err(e) = pushed {
                        self.fault.get_or_insert(Fault::Protocol(e.to_string()));
                    }
                }
            }
        }
    }

    /// Interprets the decoded events, stopping at `[DONE]` or the first fault.
    fn file_decoded(&mut self, at: Instant) {
        let mut tokens = Vec::new();
        for event in self.decoded.drain(..) {
            if self.finished || self.fault.is_some() {
                break;
            }
            match self.assembler.on_event(&event, at, &mut tokens) {
                Ok(Progress::Open) => {}
                Ok(Progress::Finished) => self.finished = true,
                Err(fault) => self.fault = Some(fault),
            }
        }
        self.decoded.clear();
        if !tokens.is_empty() {
            self.last_token_at = Some(at);
        }
        self.ready.extend(tokens);
    }

    fn end_of_body(&mut self) {
        let at = Instant::now();
        match self.decoder.finish() {
            Ok(Some(event)) => {
                self.decoded.push(event);
                self.file_decoded(at);
            }
            Ok(None) => {}
            Err(e) => {
                self.fault.get_or_insert(Fault::Protocol(e.to_string()));
            }
        }
        if self.fault.is_some() {
            return;
        }
        if self.finished || self.assembler.finished() {
            // The body is over, so there is nothing to drain.
            self.finished = false;
            let done = self.assembler.done();
            self.ready.push_back(done);
        } else {
            self.fault = Some(Fault::Closed);
        }
    }

    /// Reads the rest of the body after `[DONE]` so the connection can be reused, for at most
    /// [`DRAIN_GRACE`] (and never past the total deadline).
    async fn drain(&mut self) {
        let total = self.started_at + self.timeouts.total;
        let deadline = (Instant::now() + DRAIN_GRACE).min(total);
        let drained = tokio::time::timeout_at(deadline, async {
            let mut bytes = 0usize;
            while let Some(Ok(frame)) = self.body.frame().await {
                if let Ok(data) = frame.into_data() {
                    bytes = bytes.saturating_add(data.len());
                }
            }
            bytes
        })
        .await;
        match drained {
            Ok(0) => {}
            Ok(bytes) => {
                tracing::debug!(expert = %self.expert, bytes, "ignored bytes after [DONE]")
            }
            Err(_) => {
                tracing::debug!(expert = %self.expert, "the body did not end after [DONE]; connection not reused");
            }
        }
    }
}

/// The deadline of the next read: before the first token, `started_at + first_token`; after,
/// `max(last token, asked_at) + between_tokens`; capped by `started_at + total` (then the phase
/// is `Total`).
pub(crate) fn deadline(
    timeouts: &Timeouts,
    started_at: Instant,
    last_token_at: Option<Instant>,
    asked_at: Instant,
) -> (Instant, TimeoutPhase) {
    let (phase_deadline, phase) = match last_token_at {
        None => (started_at + timeouts.first_token, TimeoutPhase::FirstToken),
        Some(last) => (
            last.max(asked_at) + timeouts.between_tokens,
            TimeoutPhase::BetweenTokens,
        ),
    };
    let total = started_at + timeouts.total;
    if total <= phase_deadline {
        (total, TimeoutPhase::Total)
    } else {
        (phase_deadline, phase)
    }
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use http_body::{Body, Frame};
    use tokio::sync::mpsc;

    use super::*;

    /// A body fed by the test: `Ok(bytes)` frames, `Err` for a broken connection, the end when
    /// the sender is dropped.
    struct ChannelBody(mpsc::UnboundedReceiver<Result<Bytes, String>>);

    impl Body for ChannelBody {
        type Data = Bytes;
        type Error = BodyError;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
            self.0
                .poll_recv(cx)
                .map(|o| o.map(|r| r.map(Frame::data).map_err(BodyError::from)))
        }
    }

    fn timeouts() -> Timeouts {
        Timeouts {
            connect: Duration::from_secs(1),
            first_token: Duration::from_secs(2),
            between_tokens: Duration::from_secs(1),
            total: Duration::from_secs(10),
        }
    }

    fn stream() -> (ChatStream, mpsc::UnboundedSender<Result<Bytes, String>>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let body = UnsyncBoxBody::new(ChannelBody(rx));
        (
            ChatStream::new("test".into(), body, timeouts(), Instant::now()),
            tx,
        )
    }

    fn token(text: &str) -> Result<Bytes, String> {
        Ok(Bytes::from(format!(
            "data: {{\"choices\":[{{\"delta\":{{\"content\":\"{text}\"}}}}]}}\n\n"
        )))
    }

    async fn expect_token(s: &mut ChatStream, text: &str) {
        match s.next().await {
            Some(Ok(StreamEvent::Token { text: t, .. })) => assert_eq!(t, text),
            other => panic!("expected token {text:?}, got {other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn no_token_before_the_first_token_deadline_is_a_first_token_timeout() {
        let (mut s, tx) = stream();
        tx.send(Ok(Bytes::from_static(b": keep-alive\n\n")))
            .unwrap();
        let t0 = Instant::now();
        let r = s.next().await;
        assert_eq!(
            r,
            Some(Err(ExpertError::Timeout {
                phase: TimeoutPhase::FirstToken,
                tokens_delivered: 0
            }))
        );
        assert_eq!(t0.elapsed(), Duration::from_secs(2));
        assert!(s.next().await.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_stall_after_tokens_is_a_between_tokens_timeout_with_the_count() {
        let (mut s, tx) = stream();
        tx.send(token("a")).unwrap();
        tx.send(token("b")).unwrap();
        expect_token(&mut s, "a").await;
        expect_token(&mut s, "b").await;
        // Keep-alive comments do not count as progress.
        tx.send(Ok(Bytes::from_static(b": ping\n\n"))).unwrap();
        let t0 = Instant::now();
        let r = s.next().await;
        assert_eq!(
            r,
            Some(Err(ExpertError::Timeout {
                phase: TimeoutPhase::BetweenTokens,
                tokens_delivered: 2
            }))
        );
        assert_eq!(t0.elapsed(), Duration::from_secs(1));
        drop(tx);
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_consumer_is_not_blamed_on_the_expert() {
        let (mut s, tx) = stream();
        tx.send(token("a")).unwrap();
        expect_token(&mut s, "a").await;
        tokio::time::sleep(Duration::from_secs(5)).await;
        let sender = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(500)).await;
            tx.send(token("b")).unwrap();
            tx
        });
        expect_token(&mut s, "b").await;
        drop(sender.await.unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn the_total_deadline_wins_when_it_comes_first() {
        let (mut s, tx) = stream();
        let feeder = tokio::spawn(async move {
            for _ in 0..20 {
                tx.send(token("x")).unwrap();
                tokio::time::sleep(Duration::from_millis(900)).await;
            }
            tx
        });
        let mut tokens = 0;
        let error = loop {
            match s.next().await {
                Some(Ok(StreamEvent::Token { .. })) => tokens += 1,
                Some(Err(e)) => break e,
                other => panic!("unexpected {other:?}"),
            }
        };
        assert_eq!(
            error,
            ExpertError::Timeout {
                phase: TimeoutPhase::Total,
                tokens_delivered: tokens
            }
        );
        assert_eq!(tokens, 12);
        feeder.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn done_comes_after_done_marker_even_if_the_body_lingers() {
        let (mut s, tx) = stream();
        tx.send(token("a")).unwrap();
        tx.send(Ok(Bytes::from_static(
            b"data: {\"choices\":[{\"delta\":{},\"finish_reason\":\"stop\"}],\"qosroute\":{\"quality\":1}}\n\ndata: [DONE]\n\n",
        )))
        .unwrap();
        expect_token(&mut s, "a").await;
        let t0 = Instant::now();
        match s.next().await {
            Some(Ok(StreamEvent::Done {
                finish_reason,
                extension,
                ..
            })) => {
                assert_eq!(finish_reason.as_deref(), Some("stop"));
                assert_eq!(extension, Some(serde_json::json!({"quality": 1})));
            }
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(t0.elapsed(), DRAIN_GRACE);
        assert!(s.next().await.is_none());
        drop(tx);
    }

    #[tokio::test(start_paused = true)]
    async fn a_finished_body_without_done_marker_still_completes_and_a_cut_one_is_closed() {
        let (mut s, tx) = stream();
        tx.send(Ok(Bytes::from_static(
            b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"},\"finish_reason\":\"stop\"}]}",
        )))
        .unwrap();
        drop(tx);
        expect_token(&mut s, "a").await;
        assert!(matches!(s.next().await, Some(Ok(StreamEvent::Done { .. }))));

        let (mut s, tx) = stream();
        tx.send(token("a")).unwrap();
        tx.send(Err("connection reset".into())).unwrap();
        expect_token(&mut s, "a").await;
        assert_eq!(
            s.next().await,
            Some(Err(ExpertError::Closed {
                tokens_delivered: 1
            }))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn tokens_before_garbage_are_delivered_then_a_protocol_error() {
        let (mut s, tx) = stream();
        let mut bytes = token("a").unwrap().to_vec();
        bytes.extend_from_slice(b"data: {oops\n\n");
        bytes.extend_from_slice(&token("never").unwrap());
        tx.send(Ok(Bytes::from(bytes))).unwrap();
        expect_token(&mut s, "a").await;
        assert!(matches!(
            s.next().await,
            Some(Err(ExpertError::Protocol {
                tokens_delivered: 1,
                ..
            }))
        ));
        assert!(s.next().await.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn next_is_cancel_safe_in_select() {
        let (mut s, tx) = stream();
        let feeder = tokio::spawn(async move {
            for t in ["a", "b", "c"] {
                tokio::time::sleep(Duration::from_millis(300)).await;
                tx.send(token(t)).unwrap();
            }
            tx.send(Ok(Bytes::from_static(b"data: [DONE]\n\n")))
                .unwrap();
        });
        let mut texts = Vec::new();
        let mut cancelled = 0;
        loop {
            tokio::select! {
                event = s.next() => match event {
                    Some(Ok(StreamEvent::Token { text, .. })) => texts.push(text),
                    Some(Ok(StreamEvent::Done { .. })) => break,
                    other => panic!("unexpected {other:?}"),
                },
                () = tokio::time::sleep(Duration::from_millis(100)) => cancelled += 1,
            }
        }
        assert_eq!(texts, ["a", "b", "c"]);
        assert!(
            cancelled >= 6,
            "the select never cancelled next ({cancelled})"
        );
        feeder.await.unwrap();
    }

    #[test]
    fn deadlines_pick_the_phase_and_cap_at_the_total() {
        let t = timeouts();
        let start = Instant::now();
        assert_eq!(
            deadline(&t, start, None, start),
            (start + t.first_token, TimeoutPhase::FirstToken)
        );
        let last = start + Duration::from_secs(3);
        let asked = start + Duration::from_secs(4);
        assert_eq!(
            deadline(&t, start, Some(last), asked),
            (asked + t.between_tokens, TimeoutPhase::BetweenTokens)
        );
        let late = start + Duration::from_secs(9) + Duration::from_millis(500);
        assert_eq!(
            deadline(&t, start, Some(late), late),
            (start + t.total, TimeoutPhase::Total)
        );
    }
}
