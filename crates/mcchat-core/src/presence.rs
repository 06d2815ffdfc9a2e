//! Who is in a room, learned from join, leave, heartbeat and message datagrams.
//!
//! Pure state: every call takes the current time, so expiry is tested without waiting. Peers are
//! keyed by instance id, so a restarted peer (new id) is a new member and a renamed one is the
//! same member. Bare datagrams have no id and never enter the roster.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use crate::wire::{InstanceId, Kind};

/// How often a peer says it is still there.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(15);

/// Silence after which a member is considered gone: three missed heartbeats and some slack.
pub const MEMBER_TIMEOUT: Duration = Duration::from_secs(50);

/// Most members tracked, so a flood of made-up instance ids cannot grow memory without bound.
pub const MAX_MEMBERS: usize = 4096;

/// How many departed ids are remembered, so a repeated leave is not announced twice and a
/// late datagram of a departed member does not bring it back.
const DEPARTED_MEMORY: usize = 256;

/// A room member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Its instance id.
    pub instance: InstanceId,
    /// The name it last used.
    pub name: String,
    last_seen: Instant,
}

/// A change worth telling the user about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// `name` joined.
    Joined(String),
    /// `name` left, saying so.
    Left(String),
    /// `name` went silent for [`MEMBER_TIMEOUT`].
    TimedOut(String),
}

/// The members of one room.
#[derive(Debug, Clone)]
pub struct Roster {
    members: HashMap<InstanceId, Member>,
    /// Members that said `leave`, with the sequence number their leave carried.
    departed: VecDeque<(InstanceId, Option<u64>)>,
    /// Members that went silent: announced again when they speak.
    timed_out: HashSet<InstanceId>,
    timeout: Duration,
}

impl Default for Roster {
    fn default() -> Self {
        Self::new(MEMBER_TIMEOUT)
    }
}

impl Roster {
    /// An empty roster that forgets members after `timeout` of silence.
    pub fn new(timeout: Duration) -> Self {
        Self {
            members: HashMap::new(),
            departed: VecDeque::new(),
            timed_out: HashSet::new(),
            timeout,
        }
    }

    /// Records a datagram from `instance` calling itself `name` (carrying `seq`, if any);
    /// returns what to announce.
    pub fn observe(
        &mut self,
        instance: InstanceId,
        name: &str,
        kind: Kind,
        seq: Option<u64>,
        now: Instant,
    ) -> Option<Change> {
        if kind == Kind::Leave {
            self.members.remove(&instance);
            self.timed_out.remove(&instance);
            if self.departed_at(instance).is_some() {
                return None;
            }
            self.remember_departed(instance, seq);
            // A leave from a member we had not heard from yet is still news.
            return Some(Change::Left(name.to_owned()));
        }
        // A NACK comes from listeners too (which are not members), and relay control and
        // unknown kinds say nothing about presence.
        if matches!(kind, Kind::Unknown | Kind::Nack) || kind.is_relay_control() {
            return None;
        }
        if let Some(m) = self.members.get_mut(&instance) {
            m.last_seen = now;
            if m.name != name {
                name.clone_into(&mut m.name);
            }
            return None;
        }
        if self.members.len() >= MAX_MEMBERS {
            return None;
        }
        // A member that speaks after a `leave` is here (the leave may have been forged, or
        // it came back): it is a member again, and announced. What it sent before its leave
        // and arrives after it (held up on the way, or repaired) is not speaking again: a
        // message or heartbeat numbered at most what the leave carried. A join always is.
        let back = match self.departed_at(instance) {
            Some(i) => {
                let (_, left_at) = self.departed[i];
                let old_news =
                    kind != Kind::Join && left_at.is_some_and(|l| seq.is_some_and(|s| s <= l));
                if old_news {
                    return None;
                }
                self.departed.remove(i);
                true
            }
            None => false,
        };
        let returning = self.timed_out.remove(&instance) || back;
        self.members.insert(
            instance,
            Member {
                instance,
                name: name.to_owned(),
                last_seen: now,
            },
        );
        (kind == Kind::Join || returning).then(|| Change::Joined(name.to_owned()))
    }

    /// Removes members silent for longer than the timeout; returns who they were and their
    /// departures.
    pub fn expire(&mut self, now: Instant) -> Vec<(InstanceId, Change)> {
        let timeout = self.timeout;
        let gone: Vec<InstanceId> = self
            .members
            .values()
            .filter(|m| now.saturating_duration_since(m.last_seen) > timeout)
            .map(|m| m.instance)
            .collect();
        let mut changes = Vec::with_capacity(gone.len());
        for id in gone {
            // Not remembered as departed: a member that was only silent (a suspended laptop,
            // lost heartbeats) is welcome back when it speaks again.
            if let Some(m) = self.members.remove(&id) {
                if self.timed_out.len() < MAX_MEMBERS {
                    self.timed_out.insert(id);
                }
                changes.push((id, Change::TimedOut(m.name)));
            }
        }
        changes.sort_by(|a, b| format!("{:?}", a.1).cmp(&format!("{:?}", b.1)));
        changes
    }

    /// How many members there are.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// The name `instance` last used, if it is a member.
    pub fn name_of(&self, instance: InstanceId) -> Option<&str> {
        self.members.get(&instance).map(|m| m.name.as_str())
    }

    /// The members, sorted by name.
    pub fn members(&self) -> Vec<&Member> {
        let mut v: Vec<&Member> = self.members.values().collect();
        v.sort_by(|a, b| a.name.cmp(&b.name).then(a.instance.cmp(&b.instance)));
        v
    }

    /// Where `id` is among the departed, if it is: a scan of at most [`DEPARTED_MEMORY`],
    /// made only for a leave or a datagram from a non-member, never for a member's message.
    fn departed_at(&self, id: InstanceId) -> Option<usize> {
        self.departed.iter().position(|d| d.0 == id)
    }

    fn remember_departed(&mut self, id: InstanceId, seq: Option<u64>) {
        if self.departed.len() >= DEPARTED_MEMORY {
            self.departed.pop_front();
        }
        self.departed.push_back((id, seq));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: InstanceId = InstanceId(1);
    const B: InstanceId = InstanceId(2);

    #[test]
    fn join_heartbeat_leave() {
        let t0 = Instant::now();
        let mut r = Roster::default();
        assert_eq!(
            r.observe(A, "alice", Kind::Join, None, t0),
            Some(Change::Joined("alice".into()))
        );
        assert_eq!(
            r.observe(A, "alice", Kind::Join, None, t0),
            None,
            "duplicate join"
        );
        assert_eq!(
            r.observe(B, "bob", Kind::Heartbeat, None, t0),
            None,
            "learned silently"
        );
        let names: Vec<_> = r.members().iter().map(|m| m.name.clone()).collect();
        assert_eq!(names, ["alice", "bob"]);
        assert_eq!(
            r.observe(A, "alice", Kind::Leave, None, t0),
            Some(Change::Left("alice".into()))
        );
        assert_eq!(
            r.observe(A, "alice", Kind::Leave, None, t0),
            None,
            "duplicate leave"
        );
        // Someone who speaks after a leave (a forged one, or back) is a member again.
        assert_eq!(
            r.observe(A, "alice", Kind::Message, None, t0),
            Some(Change::Joined("alice".into()))
        );
        assert_eq!(
            r.observe(A, "alice", Kind::Leave, None, t0),
            Some(Change::Left("alice".into()))
        );
        assert_eq!(
            r.observe(InstanceId(9), "listener", Kind::Nack, None, t0),
            None
        );
        assert_eq!(r.members().len(), 1, "a NACK does not make a member");
    }

    #[test]
    fn silent_members_time_out() {
        let t0 = Instant::now();
        let mut r = Roster::new(Duration::from_secs(50));
        r.observe(A, "alice", Kind::Join, None, t0);
        r.observe(B, "bob", Kind::Join, None, t0);
        r.observe(
            B,
            "bob",
            Kind::Heartbeat,
            None,
            t0 + Duration::from_secs(30),
        );
        assert!(r.expire(t0 + Duration::from_secs(50)).is_empty());
        assert_eq!(
            r.expire(t0 + Duration::from_secs(51)),
            vec![(A, Change::TimedOut("alice".into()))]
        );
        assert_eq!(r.members().len(), 1);
        assert_eq!(
            r.expire(t0 + Duration::from_secs(81)),
            vec![(B, Change::TimedOut("bob".into()))]
        );
        // A silent member that speaks again is back, and announced.
        let t1 = t0 + Duration::from_secs(90);
        assert_eq!(
            r.observe(A, "alice", Kind::Heartbeat, None, t1),
            Some(Change::Joined("alice".into()))
        );
        assert_eq!(r.observe(A, "alice", Kind::Heartbeat, None, t1), None);
        assert_eq!(r.members().len(), 1);
    }

    #[test]
    fn rename_keeps_member() {
        let t0 = Instant::now();
        let mut r = Roster::default();
        r.observe(A, "alice", Kind::Join, None, t0);
        r.observe(A, "alicia", Kind::Message, None, t0);
        assert_eq!(r.members()[0].name, "alicia");
    }

    #[test]
    fn membership_is_bounded() {
        let t0 = Instant::now();
        let mut r = Roster::default();
        for i in 0..(MAX_MEMBERS as u64 + 10) {
            r.observe(InstanceId(i), "x", Kind::Heartbeat, None, t0);
        }
        assert_eq!(r.members().len(), MAX_MEMBERS);
    }

    #[test]
    fn what_a_member_sent_before_its_leave_does_not_bring_it_back() {
        let t0 = Instant::now();
        let mut r = Roster::default();
        r.observe(A, "alice", Kind::Join, Some(0), t0);
        r.observe(A, "alice", Kind::Message, Some(7), t0);
        assert_eq!(
            r.observe(A, "alice", Kind::Leave, Some(9), t0),
            Some(Change::Left("alice".into()))
        );
        // Messages 8 and 9, and a heartbeat sent before the leave, arriving after it.
        for (kind, seq) in [(Kind::Message, 8), (Kind::Action, 9), (Kind::Heartbeat, 9)] {
            assert_eq!(r.observe(A, "alice", kind, Some(seq), t0), None, "{kind:?}");
        }
        assert!(r.is_empty());
        // Speaking after the leave is coming back: a new message, or a join.
        assert_eq!(
            r.observe(A, "alice", Kind::Message, Some(10), t0),
            Some(Change::Joined("alice".into()))
        );
        r.observe(B, "bob", Kind::Leave, Some(3), t0);
        assert_eq!(
            r.observe(B, "bob", Kind::Join, Some(3), t0),
            Some(Change::Joined("bob".into()))
        );
        assert_eq!(r.len(), 2);
    }
}
