//! The Redis broker's scripts against keys of the wrong type and members they cannot use: each
//! either does its work for every other message or fails before it changed anything, and a
//! message it cannot deliver goes to a dead-letter list rather than vanish. Nothing here can jam
//! the broker for every worker.

use celeriac::broker::{Broker, BrokerOptions, FollowUp, OWN_TAG, RedisBroker, lease_of, now_secs};
use celeriac::protocol::{self, NewTask};
use celeriac_tests::RedisServer;
use redis::Commands;
use serde_json::{Value, json};
use std::time::Duration;

fn envelope(id: &str) -> String {
    let opts = NewTask { id: Some(id.into()), ..NewTask::default() };
    protocol::encode("diagnostics.noop", &json!([id]), &json!({}), "default", &opts).1
}

async fn broker(redis: &RedisServer) -> RedisBroker {
    RedisBroker::connect(&redis.url(0), BrokerOptions::default()).await.unwrap()
}

fn queues(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| s.to_string()).collect()
}

fn dead_letters(c: &mut redis::Connection, queue: &str) -> Vec<Value> {
    let raw: Vec<String> = c.lrange(format!("celeriac:dlq:{queue}"), 0, -1).unwrap();
    raw.iter().map(|r| serde_json::from_str(r).expect("a dead-letter record is JSON")).collect()
}

#[tokio::test]
async fn fetch_takes_nothing_when_unacked_has_the_wrong_type() {
    let redis = RedisServer::start();
    let b = broker(&redis).await;
    let mut c = redis.client(0);
    for id in ["m1", "m2", "m3"] {
        let _: () = c.lpush("default", envelope(id)).unwrap();
    }
    let before: Vec<String> = c.lrange("default", 0, -1).unwrap();
    for (key, spoil) in [("unacked", "lpush"), ("unacked_index", "set"), ("celeriac:leases", "set")]
    {
        let _: () = redis::cmd(spoil).arg(key).arg("not ours").query(&mut c).unwrap();
        let err = b.fetch(&queues(&["default"]), 10, "w.").await.unwrap_err().to_string();
        assert!(err.contains(key) && err.contains("no message was taken"), "{err}");
        let after: Vec<String> = c.lrange("default", 0, -1).unwrap();
        assert_eq!(after, before, "the messages stay in their queue, in their order");
        let _: () = c.del(key).unwrap();
        assert_eq!(c.hlen::<_, u64>("unacked").unwrap(), 0, "nothing is left recorded");
        assert_eq!(c.zcard::<_, u64>("unacked_index").unwrap(), 0);
    }
}

#[tokio::test]
async fn fetch_skips_a_queue_key_that_is_not_a_list() {
    let redis = RedisServer::start();
    let b = broker(&redis).await;
    let mut c = redis.client(0);
    for id in ["m1", "m2"] {
        let _: () = c.lpush("default", envelope(id)).unwrap();
    }
    let _: () = c.hset("low", "f", "v").unwrap();
    // The bad key first and last: either way the good queue is served and nothing is lost.
    let got = b.fetch(&queues(&["low", "default"]), 1, "a.").await.unwrap();
    assert_eq!(got.len(), 1);
    let got = b.fetch(&queues(&["default", "low"]), 10, "b.").await.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(c.hlen::<_, u64>("unacked").unwrap(), 2, "both taken are recorded");
    assert_eq!(c.hget::<_, _, String>("low", "f").unwrap(), "v", "the hash is untouched");
}

#[tokio::test]
async fn an_oversized_message_is_dead_lettered_by_the_fetch_itself() {
    let redis = RedisServer::start();
    let b = broker(&redis).await;
    let mut c = redis.client(0);
    let big = " ".repeat(protocol::MAX_MESSAGE_BYTES + 1);
    let _: () = c.lpush("default", &big).unwrap();
    let _: () = c.lpush("default", envelope("small")).unwrap();
    let got = b.fetch(&queues(&["default"]), 10, "w.").await.unwrap();
    assert_eq!(got.len(), 1, "only the small one reaches the worker");
    assert_eq!(protocol::decode(&got[0].payload).unwrap().id, "small");
    let letters = dead_letters(&mut c, "default");
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0]["reason"], "oversized");
    assert_eq!(letters[0]["message"].as_str().unwrap().len(), big.len(), "kept whole");
    assert_eq!(c.hlen::<_, u64>("unacked").unwrap(), 1);
}

#[tokio::test]
async fn a_scheduled_member_that_cannot_move_is_dead_lettered_and_the_rest_move() {
    let redis = RedisServer::start();
    let b = broker(&redis).await;
    let mut c = redis.client(0);
    let _: () = c.hset("unacked", "someone", "[]").unwrap();
    let (first, child, later) = (envelope("first"), envelope("child"), envelope("later"));
    let _: () = c.zadd("celeriac:scheduled", format!("default\n{first}"), 1).unwrap();
    let _: () = c.zadd("celeriac:scheduled", format!("unacked\n{child}"), 2).unwrap();
    let _: () = c.zadd("celeriac:scheduled", format!("default\n{later}"), 3).unwrap();
    let _: () = c.zadd("celeriac:scheduled", "a member without a queue", 4).unwrap();
    assert_eq!(b.move_due().await.unwrap(), 2);
    assert_eq!(c.llen::<_, u64>("default").unwrap(), 2, "the later retry moved too");
    assert_eq!(c.zcard::<_, u64>("celeriac:scheduled").unwrap(), 0);
    let letters = dead_letters(&mut c, "unacked");
    assert_eq!((letters.len(), &letters[0]["reason"]), (1, &json!("unroutable")));
    assert_eq!(letters[0]["message"], child.as_str());
    assert!(letters[0]["error"].as_str().unwrap().contains("WRONGTYPE"), "{}", letters[0]);
    assert_eq!(dead_letters(&mut c, "unknown").len(), 1);

    // Not even its dead-letter list takes it: it waits a minute instead of blocking the set.
    let _: () = c.set("celeriac:dlq:unacked", "a string").unwrap();
    let stuck = envelope("stuck");
    let _: () = c.zadd("celeriac:scheduled", format!("unacked\n{stuck}"), 5).unwrap();
    let _: () = c.zadd("celeriac:scheduled", format!("default\n{}", envelope("next")), 6).unwrap();
    assert_eq!(b.move_due().await.unwrap(), 1);
    let score: f64 = c.zscore("celeriac:scheduled", format!("unacked\n{stuck}")).unwrap();
    assert!(score > (now_secs() * 1000.0) + 50_000.0, "pushed back: {score}");
    assert_eq!(c.llen::<_, u64>("default").unwrap(), 3);
}

#[tokio::test]
async fn restore_dead_letters_what_it_cannot_put_back_and_always_releases_the_mutex() {
    let redis = RedisServer::start();
    let b = broker(&redis).await;
    let mut c = redis.client(0);
    let long_ago = now_secs() - 7200.0;
    // A Python message with Infinity in its headers (time_limit=float('inf')): Lua's cjson reads
    // it but cannot write it back.
    let python = r#"[{"body": "W10=", "headers": {"task": "t", "id": "py", "timelimit": [Infinity, null]}, "properties": {"priority": 0, "delivery_info": {"exchange": "", "routing_key": "default"}}}, "", "default"]"#;
    let _: () = c.hset("unacked", "python-tag", python).unwrap();
    let _: () = c.zadd("unacked_index", "python-tag", long_ago).unwrap();
    // A poison message a celeriac worker died holding: the entry is not JSON. Its lease is a
    // single tag's, as earlier celeriac versions took them, which the restore still honours.
    let ours = format!("{OWN_TAG}dead.1");
    let _: () = c.hset("unacked", &ours, r#"[this is not json,"","default"]"#).unwrap();
    let _: () = c.zadd("unacked_index", &ours, long_ago).unwrap();
    let _: () = c.zadd("celeriac:leases", &ours, long_ago).unwrap();

    assert_eq!(b.restore_expired().await.unwrap(), Some(0), "nothing could be put back");
    assert!(!c.exists::<_, bool>("unacked_mutex").unwrap(), "the mutex is released");
    let letters = dead_letters(&mut c, "default");
    assert_eq!(letters.len(), 2, "{letters:#?}");
    assert!(letters.iter().all(|l| l["reason"] == "unrestorable"));
    assert!(letters.iter().any(|l| l["message"] == python));
    assert!(letters.iter().any(|l| l["message"] == r#"[this is not json,"","default"]"#));
    assert_eq!(c.hlen::<_, u64>("unacked").unwrap(), 0);

    // Later passes are not blocked: a good expired entry is restored.
    let good = format!(r#"[{},"","default"]"#, envelope("good"));
    let _: () = c.hset("unacked", "python-2", good).unwrap();
    let _: () = c.zadd("unacked_index", "python-2", long_ago).unwrap();
    assert_eq!(b.restore_expired().await.unwrap(), Some(1));
    assert_eq!(c.llen::<_, u64>("default").unwrap(), 1);
}

#[tokio::test]
async fn restore_finds_an_expired_lease_of_ours_behind_ten_thousand_python_entries() {
    let redis = RedisServer::start();
    let lease = Duration::from_secs(30);
    let opts = BrokerOptions { lease, ..BrokerOptions::default() };
    let b = RedisBroker::connect(&redis.url(0), opts).await.unwrap();
    let mut c = redis.client(0);
    // Python workers' deliveries, ten minutes old: within kombu's visibility timeout, so they
    // must stay, and older than our lease, so a scan by age meets them first.
    let ten_minutes_ago = now_secs() - 600.0;
    let mut pipe = redis::pipe();
    let entry = format!(r#"[{},"","default"]"#, envelope("python"));
    for i in 0..10_001 {
        pipe.hset("unacked", format!("py-{i}"), &entry).ignore();
        pipe.zadd("unacked_index", format!("py-{i}"), ten_minutes_ago).ignore();
    }
    let _: () = pipe.query(&mut c).unwrap();
    // Ours: delivered, then its worker died a minute ago.
    let _: () = c.lpush("default", envelope("ours")).unwrap();
    let got = b.fetch(&queues(&["default"]), 1, "dead.").await.unwrap();
    let a_minute_ago = now_secs() - 60.0;
    let _: () = c.zadd("unacked_index", &got[0].tag, a_minute_ago).unwrap();
    let _: () = c.zadd("celeriac:leases", lease_of(&got[0].tag).unwrap(), a_minute_ago).unwrap();

    assert_eq!(b.restore_expired().await.unwrap(), Some(1));
    let back = b.fetch(&queues(&["default"]), 10, "w.").await.unwrap();
    assert_eq!(protocol::decode(&back[0].payload).unwrap().id, "ours");
    assert_eq!(c.hlen::<_, u64>("unacked").unwrap(), 10_002, "the Python entries stay");
}

#[tokio::test]
async fn settle_changes_nothing_when_a_key_it_needs_has_the_wrong_type() {
    let redis = RedisServer::start();
    let b = broker(&redis).await;
    let mut c = redis.client(0);
    let _: () = c.lpush("default", envelope("parent")).unwrap();
    let got = b.fetch(&queues(&["default"]), 1, "w.").await.unwrap();
    let _: () = c.hset("busy", "f", "v").unwrap();
    let publish = |queue: &str| FollowUp::Publish {
        queue: queue.into(),
        priority: 0,
        envelope: envelope("child"),
    };
    let both = [publish("good"), publish("busy")];
    let err = b.settle(&[(got[0].tag.as_str(), &both)]).await.unwrap_err().to_string();
    assert!(err.contains("busy"), "{err}");
    assert_eq!(c.llen::<_, u64>("good").unwrap(), 0, "no part of it was applied");
    assert!(c.hexists::<_, _, bool>("unacked", &got[0].tag).unwrap(), "still unacked");
    let good = [publish("good")];
    b.settle(&[(got[0].tag.as_str(), &good)]).await.unwrap();
    assert_eq!(c.llen::<_, u64>("good").unwrap(), 1, "applied once");
    assert_eq!(c.hlen::<_, u64>("unacked").unwrap(), 0);
    assert_eq!(c.zcard::<_, u64>("celeriac:leases").unwrap(), 0);
}
