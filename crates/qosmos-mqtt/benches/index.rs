//! Subscription index lookups with 100,000 filters of a realistic shape.
#![allow(missing_docs, clippy::unwrap_used)]

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use qosmos_mqtt::index::SubscriptionIndex;
use qosmos_mqtt::topic::matches;

const STORES: usize = 99_600;

/// 99,600 literal `orders/store-{i}` filters and 400 wildcard filters.
fn filters() -> Vec<String> {
    let mut filters: Vec<String> = (0..STORES).map(|i| format!("orders/store-{i}")).collect();
    filters.push("orders/+".to_owned());
    filters.push("+/status/#".to_owned());
    filters.push("$SYS/#".to_owned());
    filters.push("#".to_owned());
    for i in 0..99 {
        filters.push(format!("orders/store-{i}/#"));
        filters.push(format!("+/store-{i}"));
        filters.push(format!("region-{i}/+/status"));
        filters.push(format!("acks/+/order-{i}/+"));
    }
    assert_eq!(filters.len(), 100_000);
    filters
}

fn index(filters: &[String]) -> SubscriptionIndex<u32, u8> {
    let mut index = SubscriptionIndex::new();
    for (i, filter) in filters.iter().enumerate() {
        index.insert(filter, i as u32, 1);
    }
    index
}

fn count(index: &SubscriptionIndex<u32, u8>, topic: &str) -> usize {
    let mut n = 0;
    index.matches(topic, |_, _, qos| n += usize::from(*qos));
    n
}

fn lookup(c: &mut Criterion) {
    let filters = filters();
    let index = index(&filters);
    // orders/store-4242, orders/+, # : three matches.
    assert_eq!(count(&index, "orders/store-4242"), 3);
    // orders/store-42, orders/+, +/store-42, orders/store-42/#, # : five.
    assert_eq!(count(&index, "orders/store-42"), 5);
    // +/status/#, # : two.
    assert_eq!(count(&index, "store-9/status/door/left"), 2);

    let mut group = c.benchmark_group("index_100k");
    for topic in [
        "orders/store-4242",
        "orders/store-42",
        "store-9/status/door/left",
        "nobody/listens/here",
        "$SYS/broker/load",
    ] {
        group.bench_function(topic, |b| b.iter(|| count(&index, black_box(topic))));
    }
    group.finish();

    // The baseline the index avoids: one `matches` per filter.
    c.bench_function("brute_force_100k/orders/store-4242", |b| {
        b.iter(|| {
            let topic = black_box("orders/store-4242");
            filters.iter().filter(|f| matches(f, topic)).count()
        })
    });
}

fn build(c: &mut Criterion) {
    let filters = filters();
    let mut group = c.benchmark_group("build");
    group.sample_size(10);
    group.bench_function("insert_100k", |b| b.iter(|| index(black_box(&filters))));
    group.finish();
}

criterion_group!(benches, lookup, build);
criterion_main!(benches);
