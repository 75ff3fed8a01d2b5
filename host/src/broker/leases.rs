//! The fetch leases of a Redis broker: one entry in `celeriac:leases` per fetch, not per message,
//! named by the prefix the fetch's tags share (`celeriac.<worker>.<fetch>.<max>.`; its tags
//! end in `1..=max`, one for each message it got). A worker renews the lease of every fetch that still has a task running,
//! and a dead worker's leases lead the restore to its messages.
//!
//! The lease should leave the set when the last delivery of its fetch is settled, or it would
//! expire, and each restore pass would look up its tags for nothing. [`OpenLeases`] counts, per
//! fetch, the deliveries not yet settled, so the settlement of the last one can take the lease
//! with it. The count is only an economy: a lease it misses (a settlement that failed, a count
//! forgotten) expires and is cleared by the restore, and restoring a settled tag does nothing.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::redis::OWN_TAG;

/// The lease a delivery tag of ours was fetched under: the tag up to and including its last
/// dot. `None` for a tag of another worker (kombu's are UUIDs).
pub fn lease_of(tag: &str) -> Option<&str> {
    if !tag.starts_with(OWN_TAG) {
        return None;
    }
    tag.rfind('.').map(|i| &tag[..=i])
}

/// The distinct leases of `tags`, in first-seen order.
pub fn leases_of<'a>(tags: impl IntoIterator<Item = &'a str>) -> Vec<&'a str> {
    let mut out: Vec<&str> = Vec::new();
    for lease in tags.into_iter().filter_map(lease_of) {
        if !out.contains(&lease) {
            out.push(lease);
        }
    }
    out
}

/// How long a count no running task refers to is kept before it is dropped as forgotten.
const FORGET_AFTER: Duration = Duration::from_secs(60);

/// Unsettled deliveries per fetch lease of this process.
#[derive(Debug, Clone, Default)]
pub struct OpenLeases {
    open: Arc<Mutex<HashMap<String, Open>>>,
}

#[derive(Debug)]
struct Open {
    unsettled: usize,
    since: Instant,
}

/// Counts taken by a settlement in flight: given back if it fails.
#[derive(Debug, Default)]
pub struct Taken {
    counts: Vec<(String, usize)>,
    /// Leases whose last deliveries this settlement settles: to be removed with it.
    pub ending: Vec<String>,
}

impl OpenLeases {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Open>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A fetch took `count` deliveries under `lease`.
    pub fn opened(&self, lease: &str, count: usize) {
        self.lock().insert(lease.to_string(), Open { unsettled: count, since: Instant::now() });
    }

    /// Takes the deliveries of `tags` off their leases' counts before they are settled, and
    /// says which leases that ends.
    pub fn settling<'a>(&self, tags: impl IntoIterator<Item = &'a str>) -> Taken {
        let mut per_lease: Vec<(&str, usize)> = Vec::new();
        for lease in tags.into_iter().filter_map(lease_of) {
            match per_lease.iter_mut().find(|(l, _)| *l == lease) {
                Some((_, n)) => *n += 1,
                None => per_lease.push((lease, 1)),
            }
        }
        let mut open = self.lock();
        let mut taken = Taken::default();
        for (lease, n) in per_lease {
            let Some(entry) = open.get_mut(lease) else { continue };
            let n = n.min(entry.unsettled);
            entry.unsettled -= n;
            taken.counts.push((lease.to_string(), n));
            if entry.unsettled == 0 {
                open.remove(lease);
                taken.ending.push(lease.to_string());
            }
        }
        taken
    }

    /// Gives back what a settlement that failed took: its deliveries are still unsettled.
    pub fn failed(&self, taken: Taken) {
        let mut open = self.lock();
        for (lease, n) in taken.counts {
            open.entry(lease).or_insert(Open { unsettled: 0, since: Instant::now() }).unsettled +=
                n;
        }
    }

    /// Drops counts that no running delivery refers to any more (handed back at shutdown, or
    /// lost to a bug) once they are old enough not to belong to a fetch still being handed out.
    pub fn forget_all_but(&self, live: &[&str]) {
        self.lock().retain(|lease, open| {
            live.contains(&lease.as_str()) || open.since.elapsed() < FORGET_AFTER
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_ends_with_the_settlement_of_its_last_delivery() {
        assert_eq!(lease_of("celeriac.w1.7.3.2"), Some("celeriac.w1.7.3."));
        assert_eq!(lease_of("5d0b3e0c-python-tag"), None);
        assert_eq!(
            leases_of(["celeriac.a.1.2.1", "x", "celeriac.a.1.2.2", "celeriac.a.2.1.1"]),
            ["celeriac.a.1.2.", "celeriac.a.2.1."]
        );

        let leases = OpenLeases::default();
        leases.opened("celeriac.a.1.3.", 3);
        let first = leases.settling(["celeriac.a.1.3.1", "celeriac.a.1.3.2"]);
        assert!(first.ending.is_empty());
        // The last one fails once, then goes through: the lease ends with it, and only then.
        let last = leases.settling(["celeriac.a.1.3.3"]);
        assert_eq!(last.ending, ["celeriac.a.1.3."]);
        leases.failed(last);
        assert_eq!(leases.settling(["celeriac.a.1.3.3"]).ending, ["celeriac.a.1.3."]);
        // Nothing is known of a lease this process did not open: it is left to expire.
        assert!(leases.settling(["celeriac.b.1.1.1"]).ending.is_empty());
    }

    #[test]
    fn counts_of_running_fetches_and_young_ones_are_kept() {
        let leases = OpenLeases::default();
        leases.opened("celeriac.a.1.2.", 2);
        leases.forget_all_but(&[]);
        assert_eq!(leases.settling(["celeriac.a.1.2.1", "celeriac.a.1.2.2"]).ending.len(), 1);
    }
}
