//! One conformance suite, run against both brokers: the Redis broker (a real `redis-server` of
//! the test's own) and the in-memory one behave the same.

use celeriac::broker::{
    Broker, BrokerOptions, FollowUp, MemoryBroker, RedisBroker, lease_of, now_ms, now_secs,
};
use celeriac::protocol::{self, NewTask};
use redis::Commands;
use serde_json::json;
use std::time::Duration;

const LEASE: Duration = Duration::from_secs(30);

fn message(id: &str, queue: &str, priority: u8) -> FollowUp {
    let opts = NewTask { id: Some(id.into()), priority: Some(priority), ..NewTask::default() };
    let (_, envelope) =
        protocol::encode("diagnostics.noop", &json!([id]), &json!({}), queue, &opts);
    FollowUp::Publish { queue: queue.into(), priority, envelope }
}

fn ids(deliveries: &[celeriac::broker::Delivery]) -> Vec<String> {
    deliveries.iter().map(|d| protocol::decode(&d.payload).unwrap().id).collect()
}

fn queues(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| s.to_string()).collect()
}

async fn fetch_serves_queues_in_strict_order_then_priority_then_fifo<B: Broker>(b: B) {
    for (id, q, p) in [
        ("low-0", "low", 0),
        ("high-9", "high", 9),
        ("high-0a", "high", 0),
        ("high-5", "high", 5),
        ("high-0b", "high", 0),
        ("low-3", "low", 3),
    ] {
        b.send(&[message(id, q, p)]).await.unwrap();
    }
    let mut order = Vec::new();
    for round in 0.. {
        let got = b.fetch(&queues(&["high", "low"]), 2, &format!("r{round}.")).await.unwrap();
        if got.is_empty() {
            break;
        }
        assert!(got.iter().all(|d| d.queue == "high" || d.queue == "low"));
        order.extend(ids(&got));
    }
    assert_eq!(order, ["high-0a", "high-0b", "high-5", "high-9", "low-0", "low-3"]);
}

async fn settle_acks_and_applies_follow_ups_together<B: Broker>(b: B) {
    b.send(&[message("a", "q", 0)]).await.unwrap();
    let got = b.fetch(&queues(&["q"]), 10, "t.").await.unwrap();
    assert_eq!(got.len(), 1);
    let follow_ups = vec![
        message("child", "q", 0),
        FollowUp::Schedule {
            queue: "q".into(),
            priority: 0,
            envelope: "{}".into(),
            due_ms: now_ms() + 60_000,
        },
        FollowUp::DeadLetter { queue: "q".into(), record: r#"{"id":"a"}"#.into() },
    ];
    b.settle(&[(got[0].tag.as_str(), follow_ups.as_slice())]).await.unwrap();
    assert_eq!(b.queue_len("q").await.unwrap(), 1);
    assert_eq!(b.scheduled_len().await.unwrap(), 1);
    assert_eq!(b.dlq_records("q", 10).await.unwrap(), vec![r#"{"id":"a"}"#.to_string()]);
    assert_eq!(b.dlq_queues().await.unwrap(), vec!["q".to_string()]);
    // Acked: nothing to restore even with its lease ended.
    b.expire_leases(&[got[0].tag.clone()]).await.unwrap();
    assert_eq!(b.restore_expired().await.unwrap(), Some(0));
}

async fn an_expired_lease_returns_the_message_first_in_line_marked_redelivered<B: Broker>(b: B) {
    b.send(&[message("first", "q", 0), message("second", "q", 0)]).await.unwrap();
    let got = b.fetch(&queues(&["q"]), 1, "t.").await.unwrap();
    assert_eq!(ids(&got), ["first"]);
    assert_eq!(b.restore_expired().await.unwrap(), Some(0), "a live lease is left alone");
    b.renew(&[got[0].tag.clone()]).await.unwrap();
    b.expire_leases(&[got[0].tag.clone()]).await.unwrap();
    assert_eq!(b.restore_expired().await.unwrap(), Some(1));
    let again = b.fetch(&queues(&["q"]), 10, "u.").await.unwrap();
    assert_eq!(ids(&again), ["first", "second"], "restored ahead of what waited");
    let m = protocol::decode(&again[0].payload).unwrap();
    assert_eq!(m.envelope()["headers"]["redelivered"], true);
}

async fn due_messages_move_once_and_future_ones_wait<B: Broker>(b: B) {
    let now = now_ms();
    let (_, envelope) = protocol::encode("t", &json!([]), &json!({}), "q", &NewTask::default());
    b.send(&[
        FollowUp::Schedule {
            queue: "q".into(),
            priority: 0,
            envelope: envelope.clone(),
            due_ms: now - 1,
        },
        FollowUp::Schedule {
            queue: "q".into(),
            priority: 6,
            envelope: envelope.replace("\"t\"", "\"u\""),
            due_ms: now - 1,
        },
        FollowUp::Schedule {
            queue: "q".into(),
            priority: 0,
            envelope: envelope.replace("\"t\"", "\"v\""),
            due_ms: now + 60_000,
        },
    ])
    .await
    .unwrap();
    let (a, c) = tokio::join!(b.move_due(), b.move_due());
    assert_eq!(a.unwrap() + c.unwrap(), 2, "two movers, each message moved once");
    assert_eq!(b.queue_len("q").await.unwrap(), 2);
    assert_eq!(b.scheduled_len().await.unwrap(), 1);
}

async fn revocations_expire_and_terminate_is_separate<B: Broker>(b: B) {
    b.revoke(&["x".into()], Duration::from_secs(60), false).await.unwrap();
    b.revoke(&["y".into()], Duration::from_secs(60), true).await.unwrap();
    b.revoke(&["old".into()], Duration::from_millis(1), false).await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(b.revoked_among(&["x", "y", "old", "z"]).await.unwrap(), [true, true, false, false]);
    assert_eq!(b.revoked_count().await.unwrap(), 2, "the expired revocation is pruned");
    assert_eq!(b.terminating(&["x", "y", "z"]).await.unwrap(), [false, true, false]);
}

async fn the_token_bucket_allows_a_burst_then_gives_each_message_its_slot<B: Broker>(b: B) {
    let ids = ["a", "b", "c", "d", "e", "f", "g"];
    let start = std::time::Instant::now();
    let waits = b.take_tokens("task", 10.0, 4.0, &ids).await.unwrap();
    assert_eq!(waits[..4], [None; 4], "a burst of the capacity");
    let ms: Vec<u64> = waits[4..].iter().map(|w| w.unwrap().as_millis() as u64).collect();
    // Slots 100 ms apart, in order (a millisecond may pass between the refill and now).
    for (k, w) in ms.iter().enumerate() {
        let slot = 100 * (k as u64 + 1);
        assert!(slot - 5 <= *w && *w <= slot, "{ms:?}");
    }
    // A message asking again before its slot keeps it, and takes no other token.
    let again = b.take_tokens("task", 10.0, 4.0, &["g"]).await.unwrap()[0].unwrap();
    assert!(again.as_millis() as u64 <= ms[2], "{again:?}");
    tokio::time::sleep(Duration::from_millis(ms[0] + 5)).await;
    assert_eq!(b.take_tokens("task", 10.0, 4.0, &["e"]).await.unwrap(), [None], "at its slot");
    // A newcomer queues behind every slot taken: its slot is the fourth after the burst.
    let asked = start.elapsed();
    let late = b.take_tokens("task", 10.0, 4.0, &["h"]).await.unwrap()[0].unwrap();
    let slot = (asked + late).as_millis() as u64;
    assert!((390..=410).contains(&slot), "{slot} ms after the burst");
}

async fn a_dead_letter_replays_once<B: Broker>(b: B) {
    let record = r#"{"id":"d"}"#;
    b.send(&[FollowUp::DeadLetter { queue: "q".into(), record: record.into() }]).await.unwrap();
    let (x, y) = tokio::join!(
        b.dlq_replay("q", record, "q", 0, "{}"),
        b.dlq_replay("q", record, "q", 0, "{}")
    );
    assert_eq!([x.unwrap(), y.unwrap()].iter().filter(|m| **m).count(), 1);
    assert_eq!(b.queue_len("q").await.unwrap(), 1);
    b.send(&[FollowUp::DeadLetter { queue: "q".into(), record: "{}".into() }]).await.unwrap();
    assert_eq!(b.dlq_purge("q").await.unwrap(), 1);
    assert!(b.dlq_records("q", 10).await.unwrap().is_empty());
}

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod redis_broker {
            use super::*;
            $(
                #[tokio::test]
                async fn $name() {
                    let redis = celeriac_tests::RedisServer::start();
                    let opts = BrokerOptions { lease: LEASE, ..BrokerOptions::default() };
                    super::$name(RedisBroker::connect(&redis.url(0), opts).await.unwrap()).await;
                }
            )*
        }
        mod memory_broker {
            use super::*;
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(MemoryBroker::new(LEASE)).await;
                }
            )*
        }
    };
}

conformance!(
    fetch_serves_queues_in_strict_order_then_priority_then_fifo,
    settle_acks_and_applies_follow_ups_together,
    an_expired_lease_returns_the_message_first_in_line_marked_redelivered,
    due_messages_move_once_and_future_ones_wait,
    revocations_expire_and_terminate_is_separate,
    the_token_bucket_allows_a_burst_then_gives_each_message_its_slot,
    a_dead_letter_replays_once,
);

/// Our deliveries are renewed in kombu's `unacked_index`, and their fetch's lease in celeriac's
/// lease set: the messages of a fetch whose lease missed its renewals are restored, a Python
/// worker's entry of the same age is left until kombu's visibility timeout (its task may still be
/// running), and a renewal keeps a fetch of ours in place.
#[tokio::test]
async fn only_our_entries_are_restored_before_the_visibility_timeout() {
    let redis = celeriac_tests::RedisServer::start();
    let opts = BrokerOptions {
        lease: Duration::from_secs(10),
        visibility_timeout: Duration::from_secs(100),
        ..BrokerOptions::default()
    };
    let b = RedisBroker::connect(&redis.url(0), opts).await.unwrap();
    b.send(&[message("ours", "q", 0), message("renewed", "q", 0)]).await.unwrap();
    let mut got = b.fetch(&queues(&["q"]), 1, "w1.").await.unwrap();
    got.extend(b.fetch(&queues(&["q"]), 1, "w1b.").await.unwrap());
    assert!(got.iter().all(|d| d.tag.starts_with(celeriac::broker::OWN_TAG)));
    // A Python worker's delivery, as kombu records it: its envelope under a UUID tag.
    let (_, envelope) =
        protocol::encode("py.task", &json!([]), &json!({}), "q", &NewTask::default());
    let mut c = redis.client(0);
    let entry = format!(r#"[{envelope},"","q"]"#);
    let _: () = c.hset("unacked", "5d0b3e0c-python-tag", entry).unwrap();
    // All three were delivered 50 s ago: past the lease, within the visibility timeout.
    let old = now_secs() - 50.0;
    for tag in [got[0].tag.as_str(), got[1].tag.as_str(), "5d0b3e0c-python-tag"] {
        let _: () = c.zadd("unacked_index", tag, old).unwrap();
    }
    for d in &got {
        let _: () = c.zadd("celeriac:leases", lease_of(&d.tag).unwrap(), old).unwrap();
    }
    b.renew(&[got[1].tag.clone()]).await.unwrap();
    assert_eq!(b.restore_expired().await.unwrap(), Some(1));
    assert_eq!(ids(&b.fetch(&queues(&["q"]), 10, "w2.").await.unwrap()), ["ours"]);
    assert!(c.hexists::<_, _, bool>("unacked", "5d0b3e0c-python-tag").unwrap());
    assert!(c.hexists::<_, _, bool>("unacked", &got[1].tag).unwrap());
    // Past the visibility timeout the Python worker's entry is restored too.
    let _: () = c.zadd("unacked_index", "5d0b3e0c-python-tag", now_secs() - 101.0).unwrap();
    assert_eq!(b.restore_expired().await.unwrap(), Some(1));
    let back = b.fetch(&queues(&["q"]), 10, "w3.").await.unwrap();
    assert_eq!(protocol::decode(&back[0].payload).unwrap().task, "py.task");
}

/// A fetch takes one lease for all its messages. The lease stays while any of them is unsettled
/// and goes with the last settlement; if the worker dies, the restore brings back exactly the
/// messages of that fetch that were never settled.
#[tokio::test]
async fn a_fetch_holds_one_lease_until_its_last_message_is_settled() {
    let redis = celeriac_tests::RedisServer::start();
    let opts = BrokerOptions { lease: Duration::from_secs(10), ..BrokerOptions::default() };
    let b = RedisBroker::connect(&redis.url(0), opts).await.unwrap();
    let mut c = redis.client(0);
    b.send(&[message("a", "q", 0), message("b", "q", 0), message("c", "q", 0)]).await.unwrap();
    let got = b.fetch(&queues(&["q"]), 8, "w1.").await.unwrap();
    assert_eq!(got.len(), 3);
    let lease = lease_of(&got[0].tag).unwrap();
    assert!(got.iter().all(|d| lease_of(&d.tag) == Some(lease)));
    let leases: Vec<String> = c.zrange("celeriac:leases", 0, -1).unwrap();
    assert_eq!(leases, [lease], "one lease for the fetch");

    b.settle(&[(got[0].tag.as_str(), &[]), (got[1].tag.as_str(), &[])]).await.unwrap();
    assert_eq!(c.zcard::<_, u64>("celeriac:leases").unwrap(), 1, "one message is still out");
    b.settle(&[(got[2].tag.as_str(), &[])]).await.unwrap();
    assert_eq!(c.zcard::<_, u64>("celeriac:leases").unwrap(), 0, "the last settlement ends it");

    // A worker that dies after settling one of three: the other two come back, once each.
    b.send(&[message("d", "q", 0), message("e", "q", 0), message("f", "q", 0)]).await.unwrap();
    let got = b.fetch(&queues(&["q"]), 8, "w2.").await.unwrap();
    b.settle(&[(got[1].tag.as_str(), &[])]).await.unwrap();
    let lease = lease_of(&got[0].tag).unwrap();
    let _: () = c.zadd("celeriac:leases", lease, now_secs() - 60.0).unwrap();
    assert_eq!(b.restore_expired().await.unwrap(), Some(2));
    assert_eq!(ids(&b.fetch(&queues(&["q"]), 8, "w3.").await.unwrap()), ["d", "f"]);
    assert!(
        !c.zrange::<_, Vec<String>>("celeriac:leases", 0, -1).unwrap().contains(&lease.to_string())
    );
    assert_eq!(b.restore_expired().await.unwrap(), Some(0), "nothing comes back twice");
}
