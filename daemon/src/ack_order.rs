//! The order in which the gateway acknowledges the requests the broker delivered.
//!
//! MQTT requires a client to send its PUBACKs in the order the PUBLISH packets arrived
//! (MQTT 5.0 §4.6, MQTT-4.6.0-2); mosquitto tolerates any order, rumqttd drops a client that
//! breaks it. The gateway acknowledges a request only when its outcome is final (so a daemon
//! that dies mid-request gets it again from its session), and outcomes become final in any
//! order: [`AckOrder`] holds each acknowledgement until every earlier delivery of the same
//! connection is acknowledged too.
//!
//! A long request would then hold back the acknowledgements of everything after it, and with
//! them the broker's window (the receive maximum). So the front of the line is acknowledged
//! before its outcome is final when it has waited `ack_deadline_s`, or when the line reaches
//! `max_waiting`: a daemon that dies after that loses those requests (their devices time out)
//! instead of having them redelivered. Both are counted.
//!
//! A new connection starts a new line: PUBACKs of the old one mean nothing to the broker. A
//! request of the old connection that ends after the reconnect acknowledges its redelivery
//! (same packet id, DUP flag) on the new one.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// One QoS 1 delivery waiting for its acknowledgement.
#[derive(Debug, Clone, Copy)]
struct Delivery {
    seq: u64,
    pkid: u16,
    dup: bool,
    at: Instant,
    done: bool,
}

/// The deliveries of the current connection not acknowledged yet, in arrival order.
#[derive(Debug, Default)]
pub struct AckOrder {
    line: VecDeque<Delivery>,
    next_seq: u64,
    /// The first sequence number of the current connection.
    connection_start: u64,
    /// Acknowledged before the outcome was final (deadline or full line).
    early: u64,
}

/// Why [`AckOrder::done`] did not queue an acknowledgement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Done {
    /// Marked; it is acknowledged when every earlier delivery is.
    Marked,
    /// A delivery of an earlier connection: its redelivery on this one was marked instead.
    MarkedRedelivery,
    /// Nothing to acknowledge: it was acknowledged early, or its connection is gone and the
    /// broker has not redelivered it.
    Nothing,
}

impl AckOrder {
    /// An empty line.
    pub fn new() -> Self {
        Self::default()
    }

    /// A new connection (CONNACK): the old line is void.
    pub fn connected(&mut self) {
        self.line.clear();
        self.connection_start = self.next_seq;
    }

    /// A publish arrived (`pkid` 0: QoS 0, nothing to acknowledge). Returns its sequence
    /// number, which [`AckOrder::done`] takes.
    pub fn received(&mut self, pkid: u16, dup: bool, at: Instant) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        if pkid != 0 {
            self.line.push_back(Delivery {
                seq,
                pkid,
                dup,
                at,
                done: false,
            });
        }
        seq
    }

    /// The outcome of delivery `seq` (packet id `pkid`) is final.
    pub fn done(&mut self, seq: u64, pkid: u16) -> Done {
        if pkid == 0 {
            return Done::Nothing;
        }
        if seq >= self.connection_start {
            return match self.line.iter_mut().find(|d| d.seq == seq) {
                Some(d) => {
                    d.done = true;
                    Done::Marked
                }
                None => Done::Nothing,
            };
        }
        match self
            .line
            .iter_mut()
            .find(|d| d.dup && !d.done && d.pkid == pkid)
        {
            Some(d) => {
                d.done = true;
                Done::MarkedRedelivery
            }
            None => Done::Nothing,
        }
    }

    /// Takes the packet ids to acknowledge now, in order, into `out`: the done front of the
    /// line, and the front acknowledged early when it has waited `deadline` or the line holds
    /// more than `max_waiting`.
    pub fn due(
        &mut self,
        now: Instant,
        deadline: Duration,
        max_waiting: usize,
        out: &mut Vec<u16>,
    ) {
        while let Some(front) = self.line.front() {
            let overdue = now.saturating_duration_since(front.at) >= deadline;
            if !(front.done || overdue || self.line.len() > max_waiting) {
                break;
            }
            if !front.done {
                self.early += 1;
            }
            out.push(front.pkid);
            self.line.pop_front();
        }
    }

    /// When the front of the line becomes overdue, if it is waiting.
    pub fn next_deadline(&self, deadline: Duration) -> Option<Instant> {
        self.line
            .front()
            .filter(|d| !d.done)
            .map(|d| d.at + deadline)
    }

    /// At DISCONNECT: the packet ids of every done delivery, in order, even behind one that
    /// is not (acknowledged out of order rather than redelivered to the next daemon and
    /// answered twice); the rest stays unacknowledged.
    pub fn done_at_disconnect(&mut self, out: &mut Vec<u16>) {
        out.extend(self.line.iter().filter(|d| d.done).map(|d| d.pkid));
        self.line.retain(|d| !d.done);
    }

    /// Deliveries waiting for their acknowledgement.
    pub fn waiting(&self) -> usize {
        self.line.len()
    }

    /// Deliveries acknowledged before their outcome was final, so far.
    pub fn early(&self) -> u64 {
        self.early
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;
    use proptest::prelude::*;

    const DEADLINE: Duration = Duration::from_secs(10);

    fn due(order: &mut AckOrder, now: Instant) -> Vec<u16> {
        let mut out = Vec::new();
        order.due(now, DEADLINE, 1000, &mut out);
        out
    }

    #[test]
    fn acknowledgements_leave_in_arrival_order() {
        let t = Instant::now();
        let mut order = AckOrder::new();
        let a = order.received(1, false, t);
        let b = order.received(2, false, t);
        let c = order.received(3, false, t);
        assert_eq!(order.done(c, 3), Done::Marked);
        assert_eq!(due(&mut order, t), Vec::<u16>::new());
        assert_eq!(order.done(a, 1), Done::Marked);
        assert_eq!(due(&mut order, t), vec![1]);
        assert_eq!(order.done(b, 2), Done::Marked);
        assert_eq!(due(&mut order, t), vec![2, 3]);
        assert_eq!(order.waiting(), 0);
        assert_eq!(order.early(), 0);
    }

    #[test]
    fn qos0_publishes_are_not_in_the_line() {
        let t = Instant::now();
        let mut order = AckOrder::new();
        let z = order.received(0, false, t);
        let a = order.received(5, false, t);
        assert_eq!(order.done(z, 0), Done::Nothing);
        assert_eq!(order.done(a, 5), Done::Marked);
        assert_eq!(due(&mut order, t), vec![5]);
    }

    #[test]
    fn an_overdue_front_is_acknowledged_early_and_its_late_outcome_acknowledges_nothing() {
        let t = Instant::now();
        let mut order = AckOrder::new();
        let long = order.received(1, false, t);
        let short = order.received(2, false, t + Duration::from_secs(1));
        assert_eq!(order.done(short, 2), Done::Marked);
        assert_eq!(order.next_deadline(DEADLINE), Some(t + DEADLINE));
        assert_eq!(
            due(&mut order, t + Duration::from_secs(9)),
            Vec::<u16>::new()
        );
        assert_eq!(due(&mut order, t + DEADLINE), vec![1, 2]);
        assert_eq!(order.early(), 1);
        // The broker may reuse packet id 1 for a new request: the long one's outcome must not
        // acknowledge it.
        let fresh = order.received(1, false, t + DEADLINE);
        assert_eq!(order.done(long, 1), Done::Nothing);
        assert_eq!(due(&mut order, t + DEADLINE), Vec::<u16>::new());
        assert_eq!(order.done(fresh, 1), Done::Marked);
        assert_eq!(due(&mut order, t + DEADLINE), vec![1]);
    }

    #[test]
    fn a_full_line_acknowledges_its_front_early() {
        let t = Instant::now();
        let mut order = AckOrder::new();
        for pkid in 1..=5 {
            order.received(pkid, false, t);
        }
        let mut out = Vec::new();
        order.due(t, DEADLINE, 3, &mut out);
        assert_eq!(out, vec![1, 2]);
        assert_eq!(order.waiting(), 3);
        assert_eq!(order.early(), 2);
    }

    #[test]
    fn after_a_reconnect_an_old_outcome_acknowledges_its_redelivery() {
        let t = Instant::now();
        let mut order = AckOrder::new();
        let old = order.received(7, false, t);
        let other = order.received(8, false, t);
        order.connected();
        assert_eq!(order.waiting(), 0);
        // The broker redelivers 7 (DUP); the daemon is still serving the original.
        let redelivery = order.received(7, true, t);
        let new = order.received(9, false, t);
        assert_eq!(order.done(new, 9), Done::Marked);
        assert_eq!(due(&mut order, t), Vec::<u16>::new());
        assert_eq!(order.done(old, 7), Done::MarkedRedelivery);
        assert_eq!(due(&mut order, t), vec![7, 9]);
        // The other old one was not redelivered: nothing to acknowledge on this connection.
        assert_eq!(order.done(other, 8), Done::Nothing);
        // The redelivery's own outcome (a duplicate) finds it acknowledged.
        assert_eq!(order.done(redelivery, 7), Done::Nothing);
    }

    #[test]
    fn at_disconnect_done_deliveries_behind_a_waiting_one_are_acknowledged() {
        let t = Instant::now();
        let mut order = AckOrder::new();
        let _stuck = order.received(1, false, t);
        let b = order.received(2, false, t);
        let _c = order.received(3, false, t);
        let d = order.received(4, false, t);
        order.done(b, 2);
        order.done(d, 4);
        let mut out = Vec::new();
        order.done_at_disconnect(&mut out);
        assert_eq!(out, vec![2, 4]);
        assert_eq!(order.waiting(), 2);
    }

    proptest! {
        /// Whatever order outcomes become final in, acknowledgements leave in arrival order,
        /// each delivery exactly once, none before its outcome (no deadline, no limit).
        #[test]
        fn any_completion_order_acknowledges_in_arrival_order_once(
            n in 1usize..60,
            seed in any::<u64>(),
        ) {
            let t = Instant::now();
            let mut order = AckOrder::new();
            let seqs: Vec<(u64, u16)> = (0..n)
                .map(|i| {
                    let pkid = (i % 65_535) as u16 + 1;
                    (order.received(pkid, false, t), pkid)
                })
                .collect();
            // A permutation from the seed.
            let mut perm: Vec<usize> = (0..n).collect();
            let mut s = seed;
            for i in (1..n).rev() {
                s = s.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
                perm.swap(i, (s >> 33) as usize % (i + 1));
            }
            let mut acked = Vec::new();
            let mut finished = vec![false; n];
            for &i in &perm {
                let (seq, pkid) = seqs[i];
                prop_assert_eq!(order.done(seq, pkid), Done::Marked);
                finished[i] = true;
                let before = acked.len();
                order.due(t, Duration::from_secs(3600), usize::MAX, &mut acked);
                prop_assert!(
                    finished[before..acked.len()].iter().all(|f| *f),
                    "acknowledged before its outcome"
                );
            }
            let expected: Vec<u16> = seqs.iter().map(|s| s.1).collect();
            prop_assert_eq!(acked, expected);
            prop_assert_eq!(order.early(), 0);
        }
    }
}
