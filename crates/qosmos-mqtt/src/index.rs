//! A subscription index: which subscriptions match a topic, among many filters.
//!
//! See [`SubscriptionIndex`].

use std::borrow::Borrow;
use std::collections::HashMap;
use std::collections::hash_map;
use std::fmt;
use std::hash::Hash;
use std::iter::FusedIterator;

/// Subscriptions keyed by topic filter and subscriber, looked up by topic name.
///
/// It is a trie over topic levels: each node has a map of literal child levels and separate
/// slots for a `+` child and for the subscriptions that end in `#`. A lookup therefore walks the
/// topic's levels (following the literal level and `+` at each step, and collecting `#` on the
/// way) instead of scanning filters: with 100,000 filters it costs a few hash lookups.
///
/// There is one entry per (filter, key) pair. `K` identifies the subscriber (a client
/// identifier, say) and `V` is what the broker needs to deliver (the subscription options).
/// Inserting the same (filter, key) again replaces the value, as a repeated SUBSCRIBE replaces
/// the subscription.
///
/// # What it does not do
///
/// - It does not validate filters or topics: check them with
///   [`validate_topic_filter`](crate::topic::validate_topic_filter) and
///   [`validate_topic_name`](crate::topic::validate_topic_name) first. An invalid filter can be
///   inserted and removed again, but which topics it matches is unspecified.
/// - Shared subscriptions are not special: a `$share/…` string would be stored as a literal
///   filter. The broker splits it with [`parse_shared`](crate::topic::parse_shared), inserts
///   the inner filter, and keeps the group in `V` (or in `K`, if one entry per group is
///   wanted) so that it can pick one member per group among the matches.
/// - It does not remember which filters a subscriber has; the broker tracks that per session
///   to remove them when the session ends.
///
/// Lookups, removal and drop work without recursion, so a filter with tens of thousands of
/// levels (legal: 65535 bytes of `/`) cannot overflow the stack. Literal levels are hashed with
/// the standard library's randomly keyed hasher, because subscribers choose them.
///
/// # Example
///
/// ```
/// use qosmos_mqtt::index::SubscriptionIndex;
///
/// let mut index = SubscriptionIndex::new();
/// index.insert("orders/store-1", "store-1", 1u8);
/// index.insert("orders/+", "audit", 0);
/// index.insert("+/status/#", "monitor", 0);
///
/// let mut seen = Vec::new();
/// index.matches("orders/store-1", |filter, key, qos| seen.push((filter, *key, *qos)));
/// seen.sort();
/// assert_eq!(seen, [("orders/+", "audit", 0), ("orders/store-1", "store-1", 1)]);
///
/// assert_eq!(index.remove("orders/+", &"audit"), Some(0));
/// assert_eq!(index.len(), 2);
/// ```
pub struct SubscriptionIndex<K, V> {
    root: Node<K, V>,
    len: usize,
}

/// One level of the trie.
struct Node<K, V> {
    /// Children for literal levels (including the empty level).
    literal: HashMap<Box<str>, Node<K, V>>,
    /// The child for a `+` level.
    plus: Option<Box<Node<K, V>>>,
    /// Subscriptions whose filter ends with `#` right below this node.
    hash: Option<Box<Leaf<K, V>>>,
    /// Subscriptions whose filter ends at this node.
    exact: Option<Leaf<K, V>>,
}

/// The subscriptions of one filter.
struct Leaf<K, V> {
    filter: Box<str>,
    entries: HashMap<K, V>,
}

/// Where one level of a filter leads from a node.
#[derive(Clone, Copy)]
enum Step<'f> {
    Literal(&'f str),
    Plus,
}

/// A filter split into the steps to its last node, and whether it ends in `#` there.
///
/// `#` only counts as the multi-level wildcard as the last level; anywhere else (an invalid
/// filter) it is stored as a literal level, which keeps such a filter removable.
fn split_filter(filter: &str) -> (impl Iterator<Item = Step<'_>>, bool) {
    let (path, hash) = match filter.strip_suffix('#') {
        Some("") => (None, true),
        Some(parent) => match parent.strip_suffix('/') {
            Some(parent) => (Some(parent), true),
            None => (Some(filter), false),
        },
        None => (Some(filter), false),
    };
    let steps = path.into_iter().flat_map(|p| p.split('/')).map(|level| {
        if level == "+" {
            Step::Plus
        } else {
            Step::Literal(level)
        }
    });
    (steps, hash)
}

/// Splits the first level off a topic: `Some(rest)` when more levels follow (possibly one empty
/// level), `None` when this was the last.
fn next_level(topic: &str) -> (&str, Option<&str>) {
    match topic.split_once('/') {
        Some((level, rest)) => (level, Some(rest)),
        None => (topic, None),
    }
}

impl<K, V> Node<K, V> {
    fn new() -> Self {
        Node {
            literal: HashMap::new(),
            plus: None,
            hash: None,
            exact: None,
        }
    }

    /// Whether this node only leads on to one child and holds nothing itself.
    fn is_pass_through(&self) -> bool {
        self.literal.len() + usize::from(self.plus.is_some()) == 1
            && self.hash.is_none()
            && self.exact.is_none()
    }

    fn child(&self, step: Step<'_>) -> Option<&Node<K, V>> {
        match step {
            Step::Literal(level) => self.literal.get(level),
            Step::Plus => self.plus.as_deref(),
        }
    }

    fn child_mut(&mut self, step: Step<'_>) -> Option<&mut Node<K, V>> {
        match step {
            Step::Literal(level) => self.literal.get_mut(level),
            Step::Plus => self.plus.as_deref_mut(),
        }
    }

    fn child_or_insert(&mut self, step: Step<'_>) -> &mut Node<K, V> {
        match step {
            Step::Literal(level) => self.literal.entry(level.into()).or_insert_with(Node::new),
            Step::Plus => self.plus.get_or_insert_with(|| Box::new(Node::new())),
        }
    }

    /// Detaches a child; the caller drops it.
    fn take_child(&mut self, step: Step<'_>) -> Option<Node<K, V>> {
        match step {
            Step::Literal(level) => self.literal.remove(level),
            Step::Plus => self.plus.take().map(|b| *b),
        }
    }

    fn leaf(&self, hash: bool) -> Option<&Leaf<K, V>> {
        if hash {
            self.hash.as_deref()
        } else {
            self.exact.as_ref()
        }
    }
}

impl<K, V> Drop for Node<K, V> {
    // The derived drop would recurse once per level; a filter may have 32768 levels.
    fn drop(&mut self) {
        if self.literal.is_empty() && self.plus.is_none() {
            return;
        }
        let mut stack: Vec<Node<K, V>> = Vec::new();
        stack.extend(std::mem::take(&mut self.literal).into_values());
        stack.extend(self.plus.take().map(|b| *b));
        while let Some(mut node) = stack.pop() {
            stack.extend(std::mem::take(&mut node.literal).into_values());
            stack.extend(node.plus.take().map(|b| *b));
            // `node` is dropped here with no children left.
        }
    }
}

impl<K, V> SubscriptionIndex<K, V> {
    /// An empty index.
    pub fn new() -> Self {
        SubscriptionIndex {
            root: Node::new(),
            len: 0,
        }
    }

    /// The number of (filter, key) entries.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the index holds no entry.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// All entries as (filter, key, value), in no particular order; for admin listings.
    pub fn iter(&self) -> Iter<'_, K, V> {
        Iter {
            nodes: vec![&self.root],
            leaves: Vec::new(),
            current: None,
            remaining: self.len,
        }
    }

    /// Calls `f` with (filter, key, value) for every subscription whose filter matches
    /// `topic`, once each, in no particular order.
    ///
    /// A topic that starts with `$` is not matched by filters whose first level is `+` or `#`
    /// [MQTT-4.7.2-1]. `topic` should be a valid topic name; the lookup allocates nothing
    /// unless the trie branches into both a literal and a `+` child at more than 16 levels of
    /// the same topic.
    pub fn matches<'a, F>(&'a self, topic: &str, mut f: F)
    where
        F: FnMut(&'a str, &'a K, &'a V),
    {
        let mut visit = |leaf: &'a Leaf<K, V>| {
            for (key, value) in &leaf.entries {
                f(&leaf.filter, key, value);
            }
        };

        // The root is handled apart for the `$` rule.
        let dollar = topic.starts_with('$');
        if !dollar && let Some(leaf) = self.root.hash.as_deref() {
            visit(leaf);
        }
        let (level, rest) = next_level(topic);
        let mut pending = Pending::new();
        if let Some(child) = self.root.literal.get(level) {
            pending.push(child, rest);
        }
        if !dollar && let Some(child) = self.root.plus.as_deref() {
            pending.push(child, rest);
        }

        // Depth first: follow one branch in the loop, keep the other (if any) for later.
        while let Some((mut node, mut rest)) = pending.pop() {
            loop {
                if let Some(leaf) = node.hash.as_deref() {
                    visit(leaf);
                }
                let Some(remaining) = rest else {
                    if let Some(leaf) = &node.exact {
                        visit(leaf);
                    }
                    break;
                };
                let (level, next) = next_level(remaining);
                match (node.literal.get(level), node.plus.as_deref()) {
                    (Some(literal), Some(plus)) => {
                        pending.push(plus, next);
                        node = literal;
                    }
                    (Some(child), None) | (None, Some(child)) => node = child,
                    (None, None) => break,
                }
                rest = next;
            }
        }
    }
}

impl<K: Eq + Hash, V> SubscriptionIndex<K, V> {
    /// Adds the subscription of `key` to `filter`, or replaces its value; returns the value it
    /// replaced.
    ///
    /// `filter` should be valid and without a `$share/{group}/` prefix (see the type docs).
    pub fn insert(&mut self, filter: &str, key: K, value: V) -> Option<V> {
        let (steps, hash) = split_filter(filter);
        let mut node = &mut self.root;
        for step in steps {
            node = node.child_or_insert(step);
        }
        let leaf = if hash {
            node.hash.get_or_insert_with(|| Box::new(Leaf::new(filter)))
        } else {
            node.exact.get_or_insert_with(|| Leaf::new(filter))
        };
        let old = leaf.entries.insert(key, value);
        if old.is_none() {
            self.len += 1;
        }
        old
    }

    /// The value of the subscription of `key` to `filter`, if there is one.
    ///
    /// Like [`HashMap::get`], `key` may be any borrowed form of `K` (a `&str` for `String`
    /// keys, say).
    pub fn get<Q>(&self, filter: &str, key: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let (steps, hash) = split_filter(filter);
        let mut node = &self.root;
        for step in steps {
            node = node.child(step)?;
        }
        node.leaf(hash)?.entries.get(key)
    }

    /// The value of the subscription of `key` to `filter`, mutably, if there is one.
    pub fn get_mut<Q>(&mut self, filter: &str, key: &Q) -> Option<&mut V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let (steps, hash) = split_filter(filter);
        let mut node = &mut self.root;
        for step in steps {
            node = node.child_mut(step)?;
        }
        let leaf = if hash {
            node.hash.as_deref_mut()
        } else {
            node.exact.as_mut()
        };
        leaf?.entries.get_mut(key)
    }

    /// Removes the subscription of `key` to `filter` and returns its value.
    ///
    /// Nodes left without subscriptions or children are freed, so an index whose entries
    /// were all removed holds no memory beyond its root.
    pub fn remove<Q>(&mut self, filter: &str, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        // First pass, read-only: find the entry, and the highest edge below which the path
        // exists only for this filter: the subtree to cut if the end node empties.
        let (steps, hash) = split_filter(filter);
        let mut node = &self.root;
        let mut cut: Option<(usize, Step<'_>)> = None;
        for (depth, step) in steps.enumerate() {
            if depth > 0 && !node.is_pass_through() {
                cut = None;
            }
            if cut.is_none() {
                cut = Some((depth, step));
            }
            node = node.child(step)?;
        }
        let leaf = node.leaf(hash)?;
        if !leaf.entries.contains_key(key) {
            return None;
        }
        let other_leaf = if hash {
            node.exact.is_some()
        } else {
            node.hash.is_some()
        };
        let empties_node = leaf.entries.len() == 1
            && !other_leaf
            && node.literal.is_empty()
            && node.plus.is_none();

        // Second pass: remove the entry, detaching the chain that would be left empty.
        let (mut steps, _) = split_filter(filter);
        let mut node = &mut self.root;
        let value = match cut.filter(|_| empties_node) {
            Some((cut_depth, cut_step)) => {
                for step in steps.by_ref().take(cut_depth) {
                    node = node.child_mut(step)?;
                }
                let mut chain = node.take_child(cut_step)?;
                steps.next();
                let mut end = &mut chain;
                for step in steps {
                    end = end.child_mut(step)?;
                }
                remove_from_node(end, hash, key)
                // `chain` is dropped here.
            }
            None => {
                for step in steps {
                    node = node.child_mut(step)?;
                }
                remove_from_node(node, hash, key)
            }
        };
        if value.is_some() {
            self.len -= 1;
        }
        value
    }
}

/// Removes `key` from the exact or `#` leaf of `node`, dropping the leaf if it empties.
fn remove_from_node<K, V, Q>(node: &mut Node<K, V>, hash: bool, key: &Q) -> Option<V>
where
    K: Eq + Hash + Borrow<Q>,
    Q: Hash + Eq + ?Sized,
{
    if hash {
        let leaf = node.hash.as_deref_mut()?;
        let value = leaf.entries.remove(key)?;
        if leaf.entries.is_empty() {
            node.hash = None;
        }
        Some(value)
    } else {
        let leaf = node.exact.as_mut()?;
        let value = leaf.entries.remove(key)?;
        if leaf.entries.is_empty() {
            node.exact = None;
        }
        Some(value)
    }
}

impl<K, V> Leaf<K, V> {
    fn new(filter: &str) -> Self {
        Leaf {
            filter: filter.into(),
            entries: HashMap::new(),
        }
    }
}

impl<K, V> Default for SubscriptionIndex<K, V> {
    fn default() -> Self {
        SubscriptionIndex::new()
    }
}

impl<K: fmt::Debug, V: fmt::Debug> fmt::Debug for SubscriptionIndex<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl<'a, K, V> IntoIterator for &'a SubscriptionIndex<K, V> {
    type Item = (&'a str, &'a K, &'a V);
    type IntoIter = Iter<'a, K, V>;

    fn into_iter(self) -> Iter<'a, K, V> {
        self.iter()
    }
}

/// The iterator of [`SubscriptionIndex::iter`]: (filter, key, value) for every entry.
pub struct Iter<'a, K, V> {
    nodes: Vec<&'a Node<K, V>>,
    leaves: Vec<&'a Leaf<K, V>>,
    current: Option<(&'a str, hash_map::Iter<'a, K, V>)>,
    remaining: usize,
}

impl<'a, K, V> Iterator for Iter<'a, K, V> {
    type Item = (&'a str, &'a K, &'a V);

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some((filter, entries)) = &mut self.current {
                if let Some((key, value)) = entries.next() {
                    self.remaining -= 1;
                    return Some((filter, key, value));
                }
                self.current = None;
            }
            if let Some(leaf) = self.leaves.pop() {
                self.current = Some((&leaf.filter, leaf.entries.iter()));
                continue;
            }
            let node = self.nodes.pop()?;
            self.leaves.extend(node.exact.as_ref());
            self.leaves.extend(node.hash.as_deref());
            self.nodes.extend(node.literal.values());
            self.nodes.extend(node.plus.as_deref());
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.remaining, Some(self.remaining))
    }
}

impl<K, V> ExactSizeIterator for Iter<'_, K, V> {}
impl<K, V> FusedIterator for Iter<'_, K, V> {}

/// A branch still to walk: a node and the topic levels left below it.
type Branch<'a, 't, K, V> = (&'a Node<K, V>, Option<&'t str>);

/// A small stack of branches still to walk, on the call stack unless the walk is unusual.
struct Pending<'a, 't, K, V> {
    inline: [Option<Branch<'a, 't, K, V>>; 16],
    len: usize,
    spill: Vec<Branch<'a, 't, K, V>>,
}

impl<'a, 't, K, V> Pending<'a, 't, K, V> {
    fn new() -> Self {
        Pending {
            inline: [None; 16],
            len: 0,
            spill: Vec::new(),
        }
    }

    fn push(&mut self, node: &'a Node<K, V>, rest: Option<&'t str>) {
        match self.inline.get_mut(self.len) {
            Some(slot) => *slot = Some((node, rest)),
            None => self.spill.push((node, rest)),
        }
        self.len += 1;
    }

    fn pop(&mut self) -> Option<Branch<'a, 't, K, V>> {
        self.len = self.len.checked_sub(1)?;
        match self.inline.get_mut(self.len) {
            Some(slot) => slot.take(),
            None => self.spill.pop(),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use proptest::prelude::*;

    /// Nodes below the root, and leaves, counted without recursion.
    fn counts<K, V>(index: &SubscriptionIndex<K, V>) -> (usize, usize) {
        let mut nodes = 0;
        let mut leaves = 0;
        let mut stack = vec![&index.root];
        while let Some(node) = stack.pop() {
            leaves += usize::from(node.exact.is_some()) + usize::from(node.hash.is_some());
            for child in node.literal.values().chain(node.plus.as_deref()) {
                nodes += 1;
                stack.push(child);
            }
        }
        (nodes, leaves)
    }

    #[test]
    fn prunes_only_the_unused_chain() {
        let mut index = SubscriptionIndex::new();
        index.insert("a/b/c/d", 1, ());
        index.insert("a/b", 1, ());
        index.insert("a/+/x/#", 1, ());
        assert_eq!(counts(&index), (6, 3));

        // a/b stays (it holds a subscription), c and d go.
        assert_eq!(index.remove("a/b/c/d", &1), Some(()));
        assert_eq!(counts(&index), (4, 2));

        // The `#` leaf goes, and with it x and +; a and b stay.
        assert_eq!(index.remove("a/+/x/#", &1), Some(()));
        assert_eq!(counts(&index), (2, 1));

        assert_eq!(index.remove("a/b", &1), Some(()));
        assert_eq!(counts(&index), (0, 0));
    }

    #[test]
    fn keeps_nodes_with_other_subscribers_or_leaves() {
        let mut index = SubscriptionIndex::new();
        index.insert("a/b", 1, ());
        index.insert("a/b", 2, ());
        index.insert("a/b/#", 1, ());
        index.remove("a/b", &1);
        assert_eq!(counts(&index), (2, 2));
        index.remove("a/b", &2);
        assert_eq!(counts(&index), (2, 1));
        index.remove("a/b/#", &1);
        assert_eq!(counts(&index), (0, 0));

        index.insert("#", 1, ());
        index.insert("+", 1, ());
        assert_eq!(counts(&index), (1, 2));
        index.remove("+", &1);
        index.remove("#", &1);
        assert_eq!(counts(&index), (0, 0));
    }

    #[test]
    fn removing_a_missing_entry_changes_nothing() {
        let mut index = SubscriptionIndex::new();
        index.insert("a/b", 1, ());
        assert_eq!(index.remove("a/b", &2), None);
        assert_eq!(index.remove("a/b/c", &1), None);
        assert_eq!(index.remove("a/#", &1), None);
        assert_eq!(index.remove("a", &1), None);
        assert_eq!(counts(&index), (2, 1));
        assert_eq!(index.len(), 1);
    }

    #[test]
    fn pending_spills_past_its_inline_slots() {
        let mut pending: Pending<'_, '_, (), ()> = Pending::new();
        let node = Node::new();
        for _ in 0..40 {
            pending.push(&node, Some("x"));
        }
        let mut popped = 0;
        while pending.pop().is_some() {
            popped += 1;
        }
        assert_eq!(popped, 40);
        assert!(pending.pop().is_none());
    }

    fn filter() -> impl Strategy<Value = String> {
        (
            prop::collection::vec(prop::sample::select(vec!["a", "b", "", "+"]), 0..5),
            any::<bool>(),
        )
            .prop_map(|(mut levels, hash)| {
                if hash || levels.is_empty() {
                    levels.push("#");
                }
                levels.join("/")
            })
    }

    proptest! {
        #[test]
        fn removing_everything_frees_every_node(
            entries in prop::collection::vec((filter(), 0u8..3), 0..30),
            order in any::<prop::sample::Index>(),
        ) {
            let mut index = SubscriptionIndex::new();
            for (filter, key) in &entries {
                index.insert(filter, *key, ());
            }
            let mut entries = entries;
            entries.sort();
            entries.dedup();
            if !entries.is_empty() {
                let at = order.index(entries.len());
                entries.rotate_left(at);
            }
            for (filter, key) in &entries {
                prop_assert_eq!(index.remove(filter, key), Some(()));
            }
            prop_assert_eq!(counts(&index), (0, 0));
            prop_assert!(index.is_empty());
        }
    }
}
