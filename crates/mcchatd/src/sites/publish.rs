//! The link's publisher. With JetStream, every message is acknowledged by the stream, and
//! stored in the order it was sent: when an acknowledgement fails (a stream whose leader
//! moved, a server restarting), nothing new is sent until everything not yet acknowledged
//! has been sent again, in order. Copies of what was stored after all are dropped by the
//! stream's duplicate window (`Nats-Msg-Id`) and by the far sites. Without JetStream, core
//! NATS: at most once.

use std::collections::VecDeque;
use std::time::Duration;

use async_nats::jetstream::{self, context::PublishError};
use bytes::Bytes;
use futures_util::FutureExt as _;
use futures_util::future::BoxFuture;

use super::link::{Shared, update};

/// A message for a room's subject.
#[derive(Clone)]
pub(super) struct Publish {
    pub(super) subject: String,
    pub(super) data: Bytes,
    pub(super) id: Option<String>,
}

/// Messages waiting for their acknowledgement at most; past this the link reads no more
/// (its queue fills, and the driver drops and counts).
pub(super) const MAX_UNACKED: usize = 4096;
/// Rounds of sending again before the oldest message is given up (and counted): about 40 s,
/// within the stream's default duplicate window.
const MAX_ROUNDS: usize = 40;
/// How long a publish waits for the stream's acknowledgement, and between rounds.
const ACK_WAIT: Duration = Duration::from_secs(2);
const ROUND_PAUSE: Duration = Duration::from_millis(250);

type Ack = BoxFuture<'static, Result<(), PublishError>>;

pub(super) struct Publisher {
    client: async_nats::Client,
    js: Option<jetstream::Context>,
    /// Sent and not yet acknowledged, oldest first.
    unacked: VecDeque<(Publish, Ack)>,
    /// Rounds of sending again since the oldest was last acknowledged.
    rounds: usize,
    /// The oldest was refused: everything is to be sent again before anything new.
    failed: bool,
    state: Shared,
}

impl Publisher {
    pub(super) fn new(
        client: &async_nats::Client,
        js: Option<jetstream::Context>,
        state: Shared,
    ) -> Self {
        let js = js.map(|mut js| {
            js.set_timeout(ACK_WAIT);
            js
        });
        Self {
            client: client.clone(),
            js,
            unacked: VecDeque::new(),
            rounds: 0,
            failed: false,
            state,
        }
    }

    /// Whether it takes more now (not while a round of sending again is due).
    pub(super) fn ready(&self) -> bool {
        !self.failed && self.unacked.len() < MAX_UNACKED
    }

    /// Sends `p` now, in order after everything sent before.
    pub(super) async fn send(&mut self, p: Publish) {
        let Some(js) = &self.js else {
            let result = match &p.id {
                Some(id) => {
                    let mut headers = async_nats::HeaderMap::new();
                    headers.insert("Nats-Msg-Id", id.as_str());
                    self.client
                        .publish_with_headers(p.subject, headers, p.data)
                        .await
                }
                None => self.client.publish(p.subject, p.data).await,
            };
            if let Err(error) = result {
                tracing::debug!(%error, "site link: publish failed");
                update(&self.state, |s| s.publish_dropped += 1);
            }
            return;
        };
        let ack = js_send(js, &p).await;
        self.unacked.push_back((p, ack));
    }

    /// Waits for the oldest message's acknowledgement. Acknowledged: it is done. Not: after
    /// a pause, everything unacknowledged is sent again, in order (and the oldest given up
    /// after [`MAX_ROUNDS`]). Never resolves while nothing waits. Cancel-safe (it is one arm
    /// of the link's `select!`): a round cut short is done again whole.
    pub(super) async fn confirm_oldest(&mut self) {
        if self.failed {
            tokio::time::sleep(ROUND_PAUSE).await;
            self.resend().await;
            self.failed = false;
            return;
        }
        let Some((_, ack)) = self.unacked.front_mut() else {
            return std::future::pending().await;
        };
        match ack.await {
            Ok(()) => {
                self.unacked.pop_front();
                self.rounds = 0;
            }
            Err(error) => {
                self.rounds += 1;
                if self.rounds > MAX_ROUNDS {
                    if let Some((p, _)) = self.unacked.pop_front() {
                        tracing::warn!(%error, subject = %p.subject, "site link: a message was not stored by the stream; the far sites will report it lost");
                    }
                    update(&self.state, |s| s.publish_dropped += 1);
                    self.rounds = 0;
                } else {
                    tracing::debug!(%error, round = self.rounds, "site link: no acknowledgement; sending again in order");
                }
                self.failed = true;
            }
        }
    }

    async fn resend(&mut self) {
        let Some(js) = &self.js else { return };
        for (p, ack) in &mut self.unacked {
            *ack = js_send(js, p).await;
        }
    }
}

/// Sends `p` to the stream; the acknowledgement's future (an error at once if it could not
/// be sent).
async fn js_send(js: &jetstream::Context, p: &Publish) -> Ack {
    let mut m = jetstream::message::PublishMessage::build().payload(p.data.clone());
    if let Some(id) = &p.id {
        m = m.message_id(id.as_str());
    }
    match js.send_publish(p.subject.clone(), m).await {
        Ok(ack) => async move { ack.await.map(|_| ()) }.boxed(),
        Err(e) => async move { Err(e) }.boxed(),
    }
}
