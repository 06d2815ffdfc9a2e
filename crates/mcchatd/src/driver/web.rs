//! The driver's side of the web port: what the hub says to web connections goes on their
//! queues (a full queue lets the connection go), and history is read for new views.

use std::sync::Arc;

use mcchat_core::control::HistoryQuery;
use mcchat_core::room::RoomName;
use tokio::sync::mpsc;

use super::Driver;
use crate::history::History;
use crate::hub::web::{ConnId, Joined, PRELOAD, Refusal, WebInput};
use crate::web::protocol::WebFrame;
use crate::web::{ToConn, WebEvent};

impl Driver {
    /// A web connection's event into the hub.
    pub(super) fn on_web(&mut self, ev: WebEvent) {
        let WebEvent {
            conn,
            input,
            tx,
            pending,
        } = ev;
        if let Some(tx) = tx {
            self.web.insert(conn, tx);
        }
        if matches!(input, WebInput::Closed) {
            self.web.remove(&conn);
        }
        let now = self.now();
        self.hub.on_web(conn, input, now);
        // Taken: what it makes goes on the queues at this turn's flush, at most a batch of
        // events later.
        drop(pending);
    }

    /// One frame onto each connection's queue; a connection whose queue is full does not
    /// read, and is let go ("too slow") without anyone waiting for it.
    pub(super) fn send_web(&mut self, to: &[ConnId], frame: &Arc<WebFrame>) {
        for conn in to {
            let full = self.web.get(conn).is_some_and(|tx| {
                matches!(
                    tx.try_send(ToConn::Frame(Arc::clone(frame))),
                    Err(mpsc::error::TrySendError::Full(_))
                )
            });
            if full {
                self.web.remove(conn);
                let now = self.now();
                self.hub.on_web(*conn, WebInput::Closed, now);
            }
        }
    }

    pub(super) fn web_joined(&mut self, conn: ConnId, joined: Joined) {
        // Its history is read next: what was numbered before must be there.
        self.hand_over_records();
        if let Some(tx) = self.web.get(&conn) {
            let _ = tx.try_send(ToConn::Joined(joined));
        }
    }

    pub(super) fn web_refused(&mut self, conn: ConnId, refusal: Refusal, close: bool) {
        if let Some(tx) = self.web.get(&conn) {
            let _ = tx.try_send(ToConn::Refused(refusal, close));
        }
    }

    /// Reads a new view's history off the loop; it comes back as [`WebInput::Preload`].
    pub(super) fn web_preload(&mut self, room: RoomName) {
        self.hand_over_records();
        let Some(reader) = self.history.as_ref().map(History::reader) else {
            return;
        };
        let events = self.web_events.clone();
        let stop = self.token.clone();
        self.tracker.spawn(async move {
            let q = HistoryQuery {
                limit: Some(PRELOAD),
                ..HistoryQuery::new(room.as_str())
            };
            let records = tokio::select! {
                () = stop.cancelled() => return,
                r = reader.query(q) => r.unwrap_or_default(),
            };
            let input = WebInput::Preload { room, records };
            let ev = WebEvent {
                conn: 0,
                input,
                tx: None,
                pending: None,
            };
            let _ = events.send(ev).await;
        });
    }
}
