//! The subscription index: insert, replace, remove, lookups and deep filters.
#![allow(clippy::unwrap_used)]

use qosmos_mqtt::index::SubscriptionIndex;

fn lookup<'a>(
    index: &'a SubscriptionIndex<&'static str, u8>,
    topic: &str,
) -> Vec<(&'a str, &'static str, u8)> {
    let mut seen = Vec::new();
    index.matches(topic, |filter, key, value| {
        seen.push((filter, *key, *value))
    });
    seen.sort();
    seen
}

#[test]
fn new_index_is_empty() {
    let index: SubscriptionIndex<&str, u8> = SubscriptionIndex::new();
    assert!(index.is_empty());
    assert_eq!(index.len(), 0);
    assert_eq!(index.iter().count(), 0);
    assert!(lookup(&index, "a").is_empty());
    let default: SubscriptionIndex<&str, u8> = SubscriptionIndex::default();
    assert!(default.is_empty());
}

#[test]
fn insert_then_replace() {
    let mut index = SubscriptionIndex::new();
    assert_eq!(index.insert("a/b", "c1", 0), None);
    assert_eq!(index.insert("a/b", "c2", 1), None);
    assert_eq!(index.len(), 2);
    // A repeated SUBSCRIBE replaces the options.
    assert_eq!(index.insert("a/b", "c1", 2), Some(0));
    assert_eq!(index.len(), 2);
    assert_eq!(index.get("a/b", &"c1"), Some(&2));
    assert_eq!(index.get("a/b", &"c2"), Some(&1));
    assert_eq!(index.get("a/b", &"c3"), None);
    assert_eq!(index.get("a", &"c1"), None);
    assert_eq!(index.get("a/b/c", &"c1"), None);
    assert_eq!(index.get("a/+", &"c1"), None);
    assert_eq!(lookup(&index, "a/b"), [("a/b", "c1", 2), ("a/b", "c2", 1)]);

    *index.get_mut("a/b", &"c2").unwrap() = 7;
    assert_eq!(index.get("a/b", &"c2"), Some(&7));
    assert_eq!(index.get_mut("a/#", &"c2"), None);
}

#[test]
fn wildcard_and_exact_filters_are_distinct_entries() {
    let mut index = SubscriptionIndex::new();
    index.insert("a", "c", 1);
    index.insert("a/#", "c", 2);
    index.insert("a/+", "c", 3);
    index.insert("+", "c", 4);
    index.insert("#", "c", 5);
    assert_eq!(index.len(), 5);
    assert_eq!(index.get("a/#", &"c"), Some(&2));
    assert_eq!(index.get("#", &"c"), Some(&5));
    assert_eq!(
        lookup(&index, "a"),
        [("#", "c", 5), ("+", "c", 4), ("a", "c", 1), ("a/#", "c", 2)]
    );
    assert_eq!(
        lookup(&index, "a/x"),
        [("#", "c", 5), ("a/#", "c", 2), ("a/+", "c", 3)]
    );
    assert_eq!(lookup(&index, "a/x/y"), [("#", "c", 5), ("a/#", "c", 2)]);
    assert_eq!(index.remove("a/#", &"c"), Some(2));
    assert_eq!(index.get("a", &"c"), Some(&1));
    assert_eq!(lookup(&index, "a/x/y"), [("#", "c", 5)]);
}

#[test]
fn dollar_topics_skip_root_wildcards_only() {
    let mut index = SubscriptionIndex::new();
    index.insert("#", "all", 0);
    index.insert("+/monitor/Clients", "mon", 0);
    index.insert("$SYS/#", "sys", 0);
    index.insert("$SYS/+/Clients", "sys+", 0);
    assert_eq!(
        lookup(&index, "$SYS/monitor/Clients"),
        [("$SYS/#", "sys", 0), ("$SYS/+/Clients", "sys+", 0)]
    );
    assert_eq!(
        lookup(&index, "x/monitor/Clients"),
        [("#", "all", 0), ("+/monitor/Clients", "mon", 0)]
    );
    assert_eq!(lookup(&index, "$SYS"), [("$SYS/#", "sys", 0)]);
}

#[test]
fn empty_levels_are_levels() {
    let mut index = SubscriptionIndex::new();
    index.insert("/+", "a", 0);
    index.insert("+/+", "b", 0);
    index.insert("+", "c", 0);
    index.insert("a//b", "d", 0);
    index.insert("sport/+", "e", 0);
    index.insert("sport/#", "f", 0);
    assert_eq!(
        lookup(&index, "/finance"),
        [("+/+", "b", 0), ("/+", "a", 0)]
    );
    assert_eq!(lookup(&index, "a//b"), [("a//b", "d", 0)]);
    assert_eq!(
        lookup(&index, "sport"),
        [("+", "c", 0), ("sport/#", "f", 0)]
    );
    assert_eq!(
        lookup(&index, "sport/"),
        [("+/+", "b", 0), ("sport/#", "f", 0), ("sport/+", "e", 0)]
    );
}

#[test]
fn remove_returns_the_value_once() {
    let mut index = SubscriptionIndex::new();
    index.insert("orders/+", "a", 1);
    index.insert("orders/+", "b", 2);
    assert_eq!(index.remove("orders/+", &"a"), Some(1));
    assert_eq!(index.remove("orders/+", &"a"), None);
    assert_eq!(index.remove("orders/#", &"b"), None);
    assert_eq!(index.remove("orders", &"b"), None);
    assert_eq!(index.remove("nothing/here", &"b"), None);
    assert_eq!(index.len(), 1);
    assert_eq!(lookup(&index, "orders/1"), [("orders/+", "b", 2)]);
    assert_eq!(index.remove("orders/+", &"b"), Some(2));
    assert!(index.is_empty());
    assert!(lookup(&index, "orders/1").is_empty());
    // The index is usable again after being emptied.
    index.insert("orders/+", "a", 3);
    assert_eq!(lookup(&index, "orders/1"), [("orders/+", "a", 3)]);
}

#[test]
fn iter_lists_every_entry() {
    let mut index = SubscriptionIndex::new();
    let filters = ["#", "+", "a", "a/b", "a/+/c", "a/#", "/", "$SYS/x"];
    for (i, filter) in filters.iter().enumerate() {
        index.insert(filter, "k1", i as u8);
        index.insert(filter, "k2", i as u8 + 100);
    }
    let iter = index.iter();
    assert_eq!(iter.len(), 16);
    let mut listed: Vec<_> = iter.map(|(f, k, v)| (f.to_owned(), *k, *v)).collect();
    listed.sort();
    let mut expected: Vec<_> = filters
        .iter()
        .enumerate()
        .flat_map(|(i, f)| {
            [
                (f.to_string(), "k1", i as u8),
                (f.to_string(), "k2", i as u8 + 100),
            ]
        })
        .collect();
    expected.sort();
    assert_eq!(listed, expected);
    assert_eq!((&index).into_iter().count(), 16);
    assert!(format!("{index:?}").contains("a/+/c"));
}

#[test]
fn shared_subscriptions_are_stored_by_inner_filter() {
    use qosmos_mqtt::topic::parse_shared;

    // The broker strips `$share/{group}/` and keys the entry by group.
    let mut index: SubscriptionIndex<String, u8> = SubscriptionIndex::new();
    let shared = parse_shared("$share/qosmos/acks/+").unwrap();
    index.insert(shared.filter, format!("$share/{}", shared.group), 1);
    index.insert("acks/+", "dashboard".to_owned(), 0);
    let mut seen = Vec::new();
    index.matches("acks/store-9", |filter, key, _| {
        seen.push((filter, key.clone()))
    });
    seen.sort();
    assert_eq!(
        seen,
        [
            ("acks/+", "$share/qosmos".to_owned()),
            ("acks/+", "dashboard".to_owned())
        ]
    );
}

#[test]
fn many_literal_filters() {
    let mut index = SubscriptionIndex::new();
    let filters: Vec<String> = (0..10_000).map(|i| format!("orders/store-{i}")).collect();
    for (i, filter) in filters.iter().enumerate() {
        index.insert(filter, "s", (i % 3) as u8);
    }
    index.insert("orders/+", "audit", 9);
    assert_eq!(index.len(), 10_001);
    assert_eq!(
        lookup(&index, "orders/store-4242"),
        [("orders/+", "audit", 9), ("orders/store-4242", "s", 0)]
    );
    assert_eq!(
        lookup(&index, "orders/store-10000"),
        [("orders/+", "audit", 9)]
    );
    for filter in &filters {
        assert!(index.remove(filter, &"s").is_some());
    }
    assert_eq!(index.len(), 1);
}

/// A legal filter may have 32768 levels; nothing may recurse per level.
#[test]
fn very_deep_filters_do_not_overflow_the_stack() {
    // Run on a small stack so that a per-level recursion would fail loudly.
    std::thread::Builder::new()
        .stack_size(256 * 1024)
        .spawn(|| {
            let deep_slashes = "/".repeat(65_534);
            let deep_plus = vec!["+"; 32_768].join("/");
            let deep_a = vec!["a"; 32_768].join("/");
            let mut index = SubscriptionIndex::new();
            index.insert(&deep_slashes, "slashes", 0u8);
            index.insert(&deep_plus, "plus", 1);
            index.insert(&format!("{deep_a}/#"), "hash", 2);
            // A comb: a literal and a `+` child at every level along `a/a/a/…`.
            let mut comb = String::new();
            for _ in 0..2_000 {
                comb.push_str("+/");
                index.insert(&format!("{comb}a"), "comb", 3);
            }
            let mut seen = Vec::new();
            index.matches(&deep_a, |_, key, _| seen.push(*key));
            seen.sort();
            // The comb filters have 2 to 2001 levels, so none matches 32768 levels.
            assert_eq!(seen, ["hash", "plus"]);
            let mut count = 0;
            index.matches(&vec!["a"; 2_001].join("/"), |_, _, _| count += 1);
            assert_eq!(count, 1);
            assert_eq!(index.remove(&deep_slashes, &"slashes"), Some(0));
            assert_eq!(index.iter().count(), 2_002);
            drop(index);
        })
        .unwrap()
        .join()
        .unwrap();
}

#[test]
fn keys_can_be_looked_up_by_a_borrowed_form() {
    let mut index: SubscriptionIndex<String, u8> = SubscriptionIndex::new();
    index.insert("a/+", "client-1".to_owned(), 1);
    assert_eq!(index.get("a/+", "client-1"), Some(&1));
    *index.get_mut("a/+", "client-1").unwrap() += 1;
    assert_eq!(index.remove("a/+", "client-1"), Some(2));
    assert!(index.is_empty());
}
