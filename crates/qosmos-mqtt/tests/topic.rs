//! Topic names and filters: the examples of section 4.7 of MQTT 3.1.1 and 5.0, every
//! validation rule, shared subscriptions, and the index against brute-force matching.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;
use qosmos_mqtt::index::SubscriptionIndex;
use qosmos_mqtt::topic::{
    SharedFilter, TopicError, is_wildcard, matches, parse_shared, validate_topic_filter,
    validate_topic_name,
};

#[track_caller]
fn yes(filter: &str, topic: &str) {
    validate_topic_filter(filter).unwrap();
    validate_topic_name(topic).unwrap();
    assert!(matches(filter, topic), "{filter:?} should match {topic:?}");
}

#[track_caller]
fn no(filter: &str, topic: &str) {
    validate_topic_filter(filter).unwrap();
    validate_topic_name(topic).unwrap();
    assert!(
        !matches(filter, topic),
        "{filter:?} should not match {topic:?}"
    );
}

// 4.7.1.2 Multi-level wildcard.
#[test]
fn spec_multi_level_wildcard() {
    yes("sport/tennis/player1/#", "sport/tennis/player1");
    yes("sport/tennis/player1/#", "sport/tennis/player1/ranking");
    yes(
        "sport/tennis/player1/#",
        "sport/tennis/player1/score/wimbledon",
    );
    no("sport/tennis/player1/#", "sport/tennis/player2");
    no("sport/tennis/player1/#", "sport/tennis");
    yes("sport/#", "sport");
    yes("sport/#", "sport/");
    yes("sport/#", "sport/a/b");
    yes("#", "sport");
    yes("#", "/");
    yes("#", "sport/tennis/player1");
    assert_eq!(validate_topic_filter("sport/tennis/#"), Ok(()));
    assert_eq!(
        validate_topic_filter("sport/tennis#"),
        Err(TopicError::MisplacedMultiLevelWildcard)
    );
    assert_eq!(
        validate_topic_filter("sport/tennis/#/ranking"),
        Err(TopicError::MisplacedMultiLevelWildcard)
    );
}

// 4.7.1.3 Single-level wildcard.
#[test]
fn spec_single_level_wildcard() {
    yes("sport/tennis/+", "sport/tennis/player1");
    yes("sport/tennis/+", "sport/tennis/player2");
    no("sport/tennis/+", "sport/tennis/player1/ranking");
    no("sport/+", "sport");
    yes("sport/+", "sport/");
    yes("+", "sport");
    yes("+/tennis/#", "sport/tennis");
    yes("+/tennis/#", "sport/tennis/player1");
    no("+/tennis/#", "sport/football");
    yes("sport/+/player1", "sport/tennis/player1");
    yes("+/+", "/finance");
    yes("/+", "/finance");
    no("+", "/finance");
    for valid in ["+", "+/tennis/#", "sport/+/player1"] {
        assert_eq!(validate_topic_filter(valid), Ok(()), "{valid}");
    }
    assert_eq!(
        validate_topic_filter("sport+"),
        Err(TopicError::MisplacedSingleLevelWildcard)
    );
}

// 4.7.2 Topics beginning with $.
#[test]
fn spec_dollar_topics() {
    no("#", "$SYS/broker/clients/total");
    no("#", "$SYS");
    no("+/monitor/Clients", "$SYS/monitor/Clients");
    no("+", "$SYS");
    no("+/#", "$SYS/a");
    yes("$SYS/#", "$SYS/broker/clients/total");
    yes("$SYS/#", "$SYS");
    yes("$SYS/monitor/+", "$SYS/monitor/Clients");
    yes("$/+", "$/a");
    // Only the first level counts.
    yes("a/+", "a/$SYS");
    yes("a/#", "a/$SYS/x");
    yes("+/$x", "a/$x");
}

// 4.7.3 Topic semantic and usage.
#[test]
fn spec_levels_and_case() {
    yes("ACCOUNTS", "ACCOUNTS");
    no("ACCOUNTS", "Accounts");
    no("accounts", "ACCOUNTS");
    yes("Accounts payable", "Accounts payable");
    yes("/finance", "/finance");
    no("finance", "/finance");
    no("/finance", "finance");
    yes("a//b", "a//b");
    no("a/b", "a//b");
    yes("a/+/b", "a//b");
    yes("/", "/");
    yes("+/+", "/");
}

#[test]
fn exact_matches_only_exact() {
    yes("a/b", "a/b");
    no("a/b", "a/b/c");
    no("a/b/c", "a/b");
    no("a/b", "a/");
    no("a", "a/");
    yes("a/#", "a");
    no("a/b/#", "a");
}

#[test]
fn common_invalid_rules() {
    for check in [validate_topic_name, validate_topic_filter] {
        assert_eq!(check(""), Err(TopicError::Empty));
        assert_eq!(check("a\0b"), Err(TopicError::NullCharacter));
        assert_eq!(check("\0"), Err(TopicError::NullCharacter));
        let max = "a".repeat(65_535);
        assert_eq!(check(&max), Ok(()));
        let long = "a".repeat(65_536);
        assert_eq!(check(&long), Err(TopicError::TooLong { len: 65_536 }));
        // The limit is in bytes, not characters.
        let long_chars = "é".repeat(32_768);
        assert_eq!(check(&long_chars), Err(TopicError::TooLong { len: 65_536 }));
        assert_eq!(check("/"), Ok(()));
        assert_eq!(check("$SYS/x"), Ok(()));
        assert_eq!(check("ümlaut/テスト"), Ok(()));
    }
}

#[test]
fn invalid_names() {
    for name in ["+", "#", "a/+", "a/#", "a+", "a#b", "sport/tennis/+"] {
        assert_eq!(
            validate_topic_name(name),
            Err(TopicError::WildcardInName),
            "{name}"
        );
    }
    // A shared subscription prefix is nothing special in a name.
    assert_eq!(validate_topic_name("$share/g/a"), Ok(()));
}

#[test]
fn invalid_filters() {
    use TopicError::{MisplacedMultiLevelWildcard as Hash, MisplacedSingleLevelWildcard as Plus};
    for (filter, err) in [
        ("a#", Hash),
        ("#a", Hash),
        ("##", Hash),
        ("a/#/b", Hash),
        ("#/", Hash),
        ("#/a", Hash),
        ("a/b#", Hash),
        ("a+", Plus),
        ("+a", Plus),
        ("++", Plus),
        ("a/+b/c", Plus),
        ("a/b+", Plus),
        ("+#", Hash),
    ] {
        assert_eq!(validate_topic_filter(filter), Err(err), "{filter}");
    }
    for filter in [
        "#", "+", "+/+", "/#", "+/#", "a//#", "/+/", "//", "$SYS/#", "a/+/+/#",
    ] {
        assert_eq!(validate_topic_filter(filter), Ok(()), "{filter}");
    }
}

#[test]
fn shared_filters() {
    assert_eq!(validate_topic_filter("$share/g/a/b"), Ok(()));
    assert_eq!(
        parse_shared("$share/g/a/b"),
        Some(SharedFilter {
            group: "g",
            filter: "a/b"
        })
    );
    assert_eq!(validate_topic_filter("$share/qosmos/acks/+"), Ok(()));
    assert_eq!(
        parse_shared("$share/qosmos/acks/+"),
        Some(SharedFilter {
            group: "qosmos",
            filter: "acks/+"
        })
    );
    assert_eq!(validate_topic_filter("$share/g/#"), Ok(()));
    assert_eq!(parse_shared("$share/g/#").map(|s| s.filter), Some("#"),);
    assert_eq!(validate_topic_filter("$share/g//"), Ok(()));
    assert_eq!(parse_shared("$share/g//").map(|s| s.filter), Some("/"));

    assert_eq!(
        validate_topic_filter("$share/g"),
        Err(TopicError::EmptySharedFilter)
    );
    assert_eq!(
        validate_topic_filter("$share/g/"),
        Err(TopicError::EmptySharedFilter)
    );
    assert_eq!(
        validate_topic_filter("$share/"),
        Err(TopicError::InvalidShareName)
    );
    assert_eq!(
        validate_topic_filter("$share//a"),
        Err(TopicError::InvalidShareName)
    );
    assert_eq!(
        validate_topic_filter("$share/g+/a"),
        Err(TopicError::InvalidShareName)
    );
    assert_eq!(
        validate_topic_filter("$share/+/a"),
        Err(TopicError::InvalidShareName)
    );
    assert_eq!(
        validate_topic_filter("$share/g#/a"),
        Err(TopicError::InvalidShareName)
    );
    assert_eq!(
        validate_topic_filter("$share/#"),
        Err(TopicError::InvalidShareName)
    );
    assert_eq!(
        validate_topic_filter("$share/g/a#"),
        Err(TopicError::MisplacedMultiLevelWildcard)
    );
    assert_eq!(
        validate_topic_filter("$share/g/a/+b"),
        Err(TopicError::MisplacedSingleLevelWildcard)
    );

    // Not shared: no slash after `$share`, or a different prefix.
    assert_eq!(validate_topic_filter("$share"), Ok(()));
    assert_eq!(parse_shared("$share"), None);
    assert_eq!(parse_shared("$SHARE/g/a"), None);
    assert_eq!(parse_shared("a/$share/g/a"), None);
    assert_eq!(parse_shared("$share/g"), None);
}

#[test]
fn wildcard_detection() {
    assert!(is_wildcard("#"));
    assert!(is_wildcard("+"));
    assert!(is_wildcard("a/+/b"));
    assert!(is_wildcard("a/#"));
    assert!(is_wildcard("$share/g/a/+"));
    assert!(!is_wildcard("a/b"));
    assert!(!is_wildcard("$share/g/a"));
    assert!(!is_wildcard("/"));
}

#[test]
fn errors_display() {
    assert_eq!(TopicError::Empty.to_string(), "topic is empty");
    assert!(
        TopicError::TooLong { len: 70_000 }
            .to_string()
            .contains("70000")
    );
}

// Property tests: the index must agree exactly with `matches` over every inserted filter.

fn topic_level() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec!["a", "b", "", "$", "$a"])
}

fn topic_name() -> impl Strategy<Value = String> {
    prop::collection::vec(topic_level(), 1..5)
        .prop_map(|levels| levels.join("/"))
        .prop_filter("valid topic name", |t| validate_topic_name(t).is_ok())
}

fn topic_filter() -> impl Strategy<Value = String> {
    (
        prop::collection::vec(prop::sample::select(vec!["a", "b", "", "$", "+"]), 0..5),
        any::<bool>(),
    )
        .prop_map(|(mut levels, hash)| {
            if hash {
                levels.push("#");
            }
            levels.join("/")
        })
        .prop_filter("valid topic filter", |f| validate_topic_filter(f).is_ok())
}

type Entry = (String, u8);

fn index_matches(index: &SubscriptionIndex<u8, u32>, topic: &str) -> Vec<(Entry, u32)> {
    let mut seen = Vec::new();
    index.matches(topic, |filter, key, value| {
        seen.push(((filter.to_owned(), *key), *value));
    });
    seen.sort();
    seen
}

fn brute_force(model: &BTreeMap<Entry, u32>, topic: &str) -> Vec<(Entry, u32)> {
    model
        .iter()
        .filter(|((filter, _), _)| matches(filter, topic))
        .map(|(entry, value)| (entry.clone(), *value))
        .collect()
}

fn check_agrees(
    index: &SubscriptionIndex<u8, u32>,
    model: &BTreeMap<Entry, u32>,
    topics: &[String],
) {
    assert_eq!(index.len(), model.len());
    for topic in topics {
        let got = index_matches(index, topic);
        let unique: BTreeSet<_> = got.iter().map(|(entry, _)| entry.clone()).collect();
        assert_eq!(
            unique.len(),
            got.len(),
            "an entry was visited twice for {topic:?}"
        );
        assert_eq!(got, brute_force(model, topic), "topic {topic:?}");
    }
    for ((filter, key), value) in model {
        assert_eq!(index.get(filter, key), Some(value));
    }
    let mut listed: Vec<_> = index
        .iter()
        .map(|(filter, key, value)| ((filter.to_owned(), *key), *value))
        .collect();
    listed.sort();
    let expected: Vec<_> = model.iter().map(|(e, v)| (e.clone(), *v)).collect();
    assert_eq!(listed, expected);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn index_agrees_with_matches(
        inserts in prop::collection::vec((topic_filter(), 0u8..3, any::<u32>()), 0..40),
        removals in prop::collection::vec((any::<prop::sample::Index>(), any::<bool>()), 0..40),
        topics in prop::collection::vec(topic_name(), 1..12),
    ) {
        let mut index = SubscriptionIndex::new();
        let mut model = BTreeMap::new();
        for (filter, key, value) in &inserts {
            let old = index.insert(filter, *key, *value);
            prop_assert_eq!(old, model.insert((filter.clone(), *key), *value));
        }
        check_agrees(&index, &model, &topics);

        for (pick, present) in &removals {
            if inserts.is_empty() {
                break;
            }
            let (filter, key, _) = &inserts[pick.index(inserts.len())];
            // Sometimes remove a key that was never subscribed to that filter.
            let key = if *present { *key } else { key + 10 };
            let removed = index.remove(filter, &key);
            prop_assert_eq!(removed, model.remove(&(filter.clone(), key)));
            prop_assert_eq!(index.get(filter, &key), None);
        }
        check_agrees(&index, &model, &topics);

        // Removing everything leaves an empty index that matches nothing.
        for (filter, key) in model.keys() {
            prop_assert!(index.remove(filter, key).is_some());
        }
        prop_assert!(index.is_empty());
        for topic in &topics {
            prop_assert!(index_matches(&index, topic).is_empty());
        }
    }

    #[test]
    fn validated_filters_match_consistently(filter in topic_filter(), topic in topic_name()) {
        // A `#` filter matches whatever its parent matches, and a few invariants of `matches`.
        if let Some(parent) = filter.strip_suffix("/#")
            && matches(parent, &topic) {
                prop_assert!(matches(&filter, &topic));
            }
        if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
            prop_assert!(!matches(&filter, &topic));
        }
        if !is_wildcard(&filter) {
            prop_assert_eq!(matches(&filter, &topic), filter == topic);
        }
    }
}
