//! The API thread's side of a cluster-wide `GET /api/channels` ([`crate::broker::census`] has
//! the whole exchange): which nodes the request reached, which of their parts arrived, and
//! whether the answer is complete. The channel counts themselves are merged by
//! [`routes`](super::routes) with this node's own.

use std::collections::{BTreeSet, HashMap};
use std::time::Instant;

use crate::broker::census::{Part, MAX_NODES, WAIT};

/// Most censuses one node's API runs at once; more requests get 429. Each one makes every node
/// send up to `census::NODE_ANSWER_BYTES` to this one.
pub const MAX_CENSUSES: usize = 2;

/// One census under way.
#[derive(Debug)]
pub struct Gather {
    /// When the answer goes out with what has arrived.
    pub until: Instant,
    /// How many other nodes got the request (Redis' count less this node), once Redis
    /// answered the publish; or why the request could not be sent.
    reached: Option<Result<usize, String>>,
    /// Answering nodes by id: how many reactors each said it has, and which of them answered.
    nodes: HashMap<String, Answer>,
}

#[derive(Debug)]
struct Answer {
    reactors: u32,
    got: BTreeSet<u32>,
}

impl Answer {
    fn whole(&self) -> bool {
        self.got.len() == self.reactors as usize
    }
}

impl Gather {
    pub fn new(now: Instant) -> Gather {
        Gather {
            until: now + WAIT,
            reached: None,
            nodes: HashMap::new(),
        }
    }

    /// Redis answered the publish of the request: `subscribers` got it, this node's own
    /// subscription of the control channel among them.
    pub fn sent(&mut self, result: Result<u64, String>) {
        self.reached = Some(result.map(|n| usize::try_from(n.saturating_sub(1)).unwrap_or(0)));
    }

    /// Takes one part of another node's answer; `true` when it is new and its channels are to
    /// be merged (a repeated part, one from a node past [`MAX_NODES`] or one whose reactor
    /// count contradicts its node's first part is not).
    pub fn take(&mut self, part: &Part) -> bool {
        if !self.nodes.contains_key(&part.node) && self.nodes.len() >= MAX_NODES {
            return false;
        }
        let answer = self.nodes.entry(part.node.clone()).or_insert(Answer {
            reactors: part.reactors,
            got: BTreeSet::new(),
        });
        answer.reactors == part.reactors && answer.got.insert(part.reactor)
    }

    /// Other nodes whose every reactor answered.
    pub fn answered(&self) -> usize {
        self.nodes.values().filter(|a| a.whole()).count()
    }

    /// Nothing more to wait for: every node the request reached answered in full (or the
    /// request could not be sent at all).
    pub fn settled(&self) -> bool {
        match &self.reached {
            Some(Ok(n)) => self.answered() >= *n,
            Some(Err(_)) => true,
            None => false,
        }
    }

    /// `complete`, `nodes` (in the answer, this one included) and `nodes_expected` (the
    /// request reached, this one included; `None` when it could not be sent or Redis did not
    /// say in time) for the response.
    pub fn summary(&self) -> (bool, usize, Option<usize>) {
        let nodes = 1 + self.answered();
        match &self.reached {
            Some(Ok(n)) => (self.answered() >= *n, nodes, Some(n + 1)),
            _ => (false, nodes, None),
        }
    }

    /// Why the request could not reach the other nodes, when it could not.
    pub fn failure(&self) -> Option<&str> {
        match &self.reached {
            Some(Err(why)) => Some(why),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(node: &str, reactor: u32, reactors: u32) -> Part {
        Part {
            req: 1,
            node: node.into(),
            reactor,
            reactors,
            channels: vec![],
            truncated: false,
        }
    }

    #[test]
    fn settles_when_every_reached_node_answered_in_full() {
        let mut g = Gather::new(Instant::now());
        // Parts may come before Redis' count does.
        assert!(g.take(&part("a", 0, 2)));
        assert!(!g.take(&part("a", 0, 2)), "a repeated part");
        assert!(!g.take(&part("a", 1, 3)), "a contradicting reactor count");
        assert!(!g.settled());
        g.sent(Ok(3));
        assert_eq!(g.summary(), (false, 1, Some(3)));
        assert!(g.take(&part("a", 1, 2)));
        assert!(g.take(&part("b", 0, 1)));
        assert!(g.settled());
        assert_eq!(g.summary(), (true, 3, Some(3)));
    }

    #[test]
    fn a_request_that_was_not_sent_settles_incomplete() {
        let mut g = Gather::new(Instant::now());
        g.sent(Err("redis unavailable".into()));
        assert!(g.settled());
        assert_eq!(g.summary(), (false, 1, None));
        assert_eq!(g.failure(), Some("redis unavailable"));
    }

    #[test]
    fn nodes_are_bounded() {
        let mut g = Gather::new(Instant::now());
        for i in 0..MAX_NODES {
            assert!(g.take(&part(&format!("n{i}"), 0, 1)));
        }
        assert!(!g.take(&part("one-more", 0, 1)));
        assert_eq!(g.answered(), MAX_NODES);
    }
}
