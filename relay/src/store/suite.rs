//! The store test suite: every backend must pass it (see `store_suite!` at the end).

use std::collections::HashSet;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use super::*;

const HOUR: u64 = 3_600_000;

pub(super) fn open_at(backend: Backend, dir: &Path) -> Arc<dyn Store> {
    let cfg = StoreConfig {
        path: dir.to_owned(),
        cache_bytes: 4 << 20,
    };
    open(backend, cfg).expect("open store")
}

fn q(dest: &str, lane: u8) -> QueueKey {
    QueueKey {
        dest: dest.into(),
        lane,
    }
}

fn later() -> u64 {
    unix_ms() + HOUR
}

fn item(queue: &QueueKey, seq: u64, expires_at_ms: u64, body: &[u8]) -> NewItem {
    NewItem {
        item: Item {
            queue: queue.clone(),
            seq,
            expires_at_ms,
            body: Bytes::copy_from_slice(body),
        },
        dedup: None,
    }
}

fn dedup_item(queue: &QueueKey, seq: u64, exp: u64, origin: &str, id: u8) -> NewItem {
    let mut new = item(queue, seq, exp, format!("{origin}:{id}").as_bytes());
    new.dedup = Some(DedupKey {
        origin: origin.into(),
        id: [id; 16],
    });
    new
}

fn pushes(push: Vec<NewItem>) -> WriteBatch {
    WriteBatch {
        push,
        ..Default::default()
    }
}

fn removes(queue: &QueueKey, seqs: &[u64]) -> WriteBatch {
    WriteBatch {
        remove: seqs.iter().map(|&s| (queue.clone(), s)).collect(),
        ..Default::default()
    }
}

fn seqs(items: &[Item]) -> Vec<u64> {
    items.iter().map(|i| i.seq).collect()
}

fn state(store: &dyn Store, queue: &QueueKey) -> QueueState {
    store
        .recover()
        .unwrap()
        .into_iter()
        .find(|s| &s.queue == queue)
        .expect("queue in recover()")
}

fn stored(n: usize) -> Vec<PushOutcome> {
    vec![PushOutcome::Stored; n]
}

pub(super) fn fifo_per_queue_and_queues_independent(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let store = open_at(backend, dir.path());
    let (a2, a3, b2) = (q("alpha", 2), q("alpha", 3), q("beta-1", 2));
    let exp = later();
    let mut batch = Vec::new();
    for seq in 1..=5 {
        batch.push(item(&a2, seq, exp, format!("a2-{seq}").as_bytes()));
        if seq <= 3 {
            batch.push(item(&b2, seq, exp, format!("b2-{seq}").as_bytes()));
        }
        if seq <= 2 {
            batch.push(item(&a3, seq, exp + seq, format!("a3-{seq}").as_bytes()));
        }
    }
    assert_eq!(store.commit(&pushes(batch)).unwrap(), stored(10));

    let got = store.read(&a2, 0, 100).unwrap();
    assert_eq!(seqs(&got), [1, 2, 3, 4, 5]);
    for it in &got {
        assert_eq!(it.queue, a2);
        assert_eq!(it.expires_at_ms, exp);
        assert_eq!(it.body, format!("a2-{}", it.seq).as_bytes());
    }
    assert_eq!(seqs(&store.read(&b2, 0, 100).unwrap()), [1, 2, 3]);
    let got = store.read(&a3, 0, 100).unwrap();
    assert_eq!(seqs(&got), [1, 2]);
    assert_eq!(got[1].expires_at_ms, exp + 2);
    assert_eq!(got[1].body, &b"a3-2"[..]);
    assert!(store.read(&q("alpha", 1), 0, 100).unwrap().is_empty());
    assert!(store.read(&q("gamma", 2), 0, 100).unwrap().is_empty());

    // Draining one queue leaves the others alone.
    store.commit(&removes(&a2, &[1, 2, 3, 4, 5])).unwrap();
    assert!(store.read(&a2, 0, 100).unwrap().is_empty());
    assert_eq!(seqs(&store.read(&b2, 0, 100).unwrap()), [1, 2, 3]);
    assert_eq!(seqs(&store.read(&a3, 0, 100).unwrap()), [1, 2]);
}

pub(super) fn read_pages_after_seq(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let store = open_at(backend, dir.path());
    let queue = q("pager", 3);
    for chunk in (1..=25u64).collect::<Vec<_>>().chunks(9) {
        let batch = chunk
            .iter()
            .map(|&s| item(&queue, s, later(), b"x"))
            .collect();
        store.commit(&pushes(batch)).unwrap();
    }
    let mut after = 0;
    let mut pages = Vec::new();
    loop {
        let page = store.read(&queue, after, 10).unwrap();
        let Some(last) = page.last() else { break };
        after = last.seq;
        pages.push(seqs(&page));
    }
    let expected: Vec<Vec<u64>> =
        vec![(1..=10).collect(), (11..=20).collect(), (21..=25).collect()];
    assert_eq!(pages, expected);
    assert!(store.read(&queue, 0, 0).unwrap().is_empty());
    assert!(store.read(&queue, u64::MAX, 10).unwrap().is_empty());
    assert_eq!(seqs(&store.read(&queue, 24, 10).unwrap()), [25]);
}

pub(super) fn remove_then_read_and_idempotent(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let store = open_at(backend, dir.path());
    let queue = q("acks", 2);
    let batch = (1..=5).map(|s| item(&queue, s, later(), b"0123")).collect();
    store.commit(&pushes(batch)).unwrap();

    store.commit(&removes(&queue, &[1, 2])).unwrap();
    assert_eq!(seqs(&store.read(&queue, 0, 10).unwrap()), [3, 4, 5]);

    // Absent seqs, repeated seqs and unknown queues are no-ops.
    let mut again = removes(&queue, &[2, 2, 9, 0]);
    again.remove.push((q("nobody", 1), 1));
    assert_eq!(store.commit(&again).unwrap(), []);
    let s = state(&*store, &queue);
    assert_eq!((s.count, s.bytes, s.head_seq, s.next_seq), (3, 12, 3, 6));
    assert!(store.read(&q("nobody", 1), 0, 10).unwrap().is_empty());

    // Out-of-order removal (an expiry in the middle) keeps FIFO for the rest.
    store.commit(&removes(&queue, &[4])).unwrap();
    assert_eq!(seqs(&store.read(&queue, 0, 10).unwrap()), [3, 5]);
    assert_eq!(state(&*store, &queue).count, 2);
}

pub(super) fn dedup_within_and_across_batches(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let store = open_at(backend, dir.path());
    let queue = q("dest", 2);
    let exp = later();
    let first = store
        .commit(&pushes(vec![
            dedup_item(&queue, 1, exp, "origin-a", 1),
            dedup_item(&queue, 2, exp + 10, "origin-a", 1),
            dedup_item(&queue, 3, exp, "origin-a", 2),
            // The same id from another origin is another message.
            dedup_item(&queue, 4, exp, "origin-b", 1),
        ]))
        .unwrap();
    let dup = PushOutcome::Duplicate { expires_at_ms: exp };
    use PushOutcome::Stored;
    assert_eq!(first, [Stored, dup, Stored, Stored]);

    let second = store
        .commit(&pushes(vec![
            dedup_item(&queue, 5, exp + 99, "origin-a", 2),
            dedup_item(&queue, 6, exp, "origin-a", 3),
        ]))
        .unwrap();
    assert_eq!(second, [dup, Stored]);
    assert_eq!(seqs(&store.read(&queue, 0, 10).unwrap()), [1, 3, 4, 6]);
    let s = state(&*store, &queue);
    assert_eq!((s.count, s.next_seq), (4, 7));
}

pub(super) fn dedup_survives_removal(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let store = open_at(backend, dir.path());
    let queue = q("dest", 2);
    let exp = later();
    store
        .commit(&pushes(vec![dedup_item(&queue, 1, exp, "origin", 7)]))
        .unwrap();
    store.commit(&removes(&queue, &[1])).unwrap();
    let again = store
        .commit(&pushes(vec![dedup_item(&queue, 2, exp + 5, "origin", 7)]))
        .unwrap();
    assert_eq!(again, [PushOutcome::Duplicate { expires_at_ms: exp }]);
    assert!(store.read(&queue, 0, 10).unwrap().is_empty());
    // Pruning before the expiry keeps the entry.
    assert_eq!(store.prune_dedup(unix_ms(), 100).unwrap(), 0);
    let third = store
        .commit(&pushes(vec![dedup_item(&queue, 3, exp, "origin", 7)]))
        .unwrap();
    assert_eq!(third, [PushOutcome::Duplicate { expires_at_ms: exp }]);
}

pub(super) fn dedup_forgotten_after_expiry_and_prune(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let store = open_at(backend, dir.path());
    let queue = q("dest", 1);
    let now = unix_ms();
    use PushOutcome::Stored;
    let out = store
        .commit(&pushes(vec![
            dedup_item(&queue, 1, now - 2_000, "origin", 1),
            dedup_item(&queue, 2, now - 1_000, "origin", 2),
            dedup_item(&queue, 3, now + HOUR, "origin", 3),
        ]))
        .unwrap();
    assert_eq!(out, [Stored, Stored, Stored]);
    store.commit(&removes(&queue, &[1, 2, 3])).unwrap();

    assert_eq!(store.prune_dedup(now, 1).unwrap(), 1);
    assert_eq!(store.prune_dedup(now, 100).unwrap(), 1);
    assert_eq!(store.prune_dedup(now, 100).unwrap(), 0);
    let out = store
        .commit(&pushes(vec![
            dedup_item(&queue, 4, now + HOUR, "origin", 1),
            dedup_item(&queue, 5, now + HOUR, "origin", 2),
            dedup_item(&queue, 6, now + HOUR, "origin", 3),
        ]))
        .unwrap();
    let live = PushOutcome::Duplicate {
        expires_at_ms: now + HOUR,
    };
    assert_eq!(out, [Stored, Stored, live]);

    // An entry past its expiry no longer dedups even before a prune, and the prune then
    // must not delete the live entry that replaced it.
    store
        .commit(&pushes(vec![dedup_item(&queue, 7, now - 10, "origin", 9)]))
        .unwrap();
    let out = store
        .commit(&pushes(vec![dedup_item(
            &queue,
            8,
            now + HOUR,
            "origin",
            9,
        )]))
        .unwrap();
    assert_eq!(out, [Stored]);
    assert_eq!(store.prune_dedup(now, 100).unwrap(), 0);
    let out = store
        .commit(&pushes(vec![dedup_item(
            &queue,
            9,
            now + HOUR,
            "origin",
            9,
        )]))
        .unwrap();
    assert_eq!(out, [live]);
}

pub(super) fn expired_lists_queued_items_oldest_first(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let store = open_at(backend, dir.path());
    let (a, b) = (q("alpha", 1), q("beta", 3));
    let t = unix_ms();
    store
        .commit(&pushes(vec![
            item(&a, 1, t + 300, b"a1"),
            item(&a, 2, t + 100, b"a2"),
            item(&b, 1, t + 200, b"b1"),
            item(&b, 2, t + HOUR, b"b2"),
        ]))
        .unwrap();
    assert!(store.expired(t + 99, 10).unwrap().is_empty());
    let due = store.expired(t + 300, 10).unwrap();
    let got: Vec<_> = due.iter().map(|i| (i.queue.clone(), i.seq)).collect();
    assert_eq!(got, [(a.clone(), 2), (b.clone(), 1), (a.clone(), 1)]);
    assert_eq!(due[1].body, &b"b1"[..]);
    assert_eq!(due[1].expires_at_ms, t + 200);
    assert_eq!(seqs(&store.expired(t + 300, 2).unwrap()), [2, 1]);
    assert!(store.expired(t + 300, 0).unwrap().is_empty());

    // Removed (acked) items are no longer listed.
    store.commit(&removes(&b, &[1])).unwrap();
    let due = store.expired(t + 300, 10).unwrap();
    let got: Vec<_> = due.iter().map(|i| (i.queue.clone(), i.seq)).collect();
    assert_eq!(got, [(a.clone(), 2), (a.clone(), 1)]);
    assert_eq!(store.expired(u64::MAX, 10).unwrap().len(), 3);
}

pub(super) fn expiry_removal_and_notice_commit_together(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let store = open_at(backend, dir.path());
    let (dest, origin) = (q("dest", 2), q("origin", 1));
    let t = unix_ms();
    let batch = (1..=3)
        .map(|s| dedup_item(&dest, s, t + 10, "origin", s as u8))
        .collect();
    store.commit(&pushes(batch)).unwrap();
    let due = store.expired(t + 10, 100).unwrap();
    assert_eq!(due.len(), 3);

    let expire = |notice_dest: &str| WriteBatch {
        push: vec![item(&q(notice_dest, 1), 1, t + HOUR, b"expired 1,2,3")],
        remove: due.iter().map(|i| (i.queue.clone(), i.seq)).collect(),
        ..Default::default()
    };
    // A batch that fails applies none of it: the items stay due.
    assert!(matches!(
        store.commit(&expire("NOT VALID")),
        Err(StoreError::Invalid(_))
    ));
    assert_eq!(store.expired(t + 10, 100).unwrap().len(), 3);

    assert_eq!(store.commit(&expire("origin")).unwrap(), stored(1));
    let check = |store: &dyn Store| {
        assert!(store.expired(t + 10, 100).unwrap().is_empty());
        assert!(store.read(&dest, 0, 10).unwrap().is_empty());
        let notice = store.read(&origin, 0, 10).unwrap();
        assert_eq!(notice.len(), 1);
        assert_eq!(notice[0].body, &b"expired 1,2,3"[..]);
        assert_eq!(state(store, &dest).count, 0);
        assert_eq!(state(store, &origin).count, 1);
    };
    check(&*store);
    drop(store);
    check(&*open_at(backend, dir.path()));
}

pub(super) fn recover_counts_and_survives_reopen(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let store = open_at(backend, dir.path());
    assert!(store.recover().unwrap().is_empty());
    let (a, b) = (q("alpha", 2), q("beta", 2));
    let mut batch: Vec<_> = (1..=4).map(|s| item(&a, s, later(), &[7; 10])).collect();
    batch.extend((1..=2).map(|s| item(&b, s, later(), b"abc")));
    store.commit(&pushes(batch)).unwrap();
    store.commit(&removes(&a, &[1, 3])).unwrap();
    store.commit(&removes(&b, &[1, 2])).unwrap();

    let expected = vec![
        QueueState {
            queue: a.clone(),
            count: 2,
            bytes: 20,
            head_seq: 2,
            next_seq: 5,
        },
        QueueState {
            queue: b.clone(),
            count: 0,
            bytes: 0,
            head_seq: 3,
            next_seq: 3,
        },
    ];
    let sorted = |store: &dyn Store| {
        let mut states = store.recover().unwrap();
        states.sort_by(|x, y| x.queue.cmp(&y.queue));
        states
    };
    assert_eq!(sorted(&*store), expected);

    // Dropped without any close, as after a crash of the process.
    drop(store);
    let store = open_at(backend, dir.path());
    assert_eq!(sorted(&*store), expected);
    assert_eq!(seqs(&store.read(&a, 0, 10).unwrap()), [2, 4]);
    store
        .commit(&pushes(vec![item(&a, 5, later(), b"fifth")]))
        .unwrap();
    let s = state(&*store, &a);
    assert_eq!((s.count, s.bytes, s.head_seq, s.next_seq), (3, 25, 2, 6));
}

pub(super) fn every_commit_survives_reopen(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let queue = q("durable", 3);
    {
        let store = open_at(backend, dir.path());
        for seq in 1..=50u64 {
            let mut batch = pushes(vec![dedup_item(&queue, seq, later(), "o", seq as u8)]);
            if seq % 2 == 0 {
                batch.remove.push((queue.clone(), seq - 1));
            }
            store.commit(&batch).unwrap();
        }
    }
    let store = open_at(backend, dir.path());
    let expected: Vec<u64> = (2..=50).step_by(2).collect();
    assert_eq!(seqs(&store.read(&queue, 0, 100).unwrap()), expected);
    let out = store
        .commit(&pushes(vec![dedup_item(&queue, 51, later(), "o", 1)]))
        .unwrap();
    assert!(matches!(out[..], [PushOutcome::Duplicate { .. }]));
    // One process at a time: a second open of the same store is refused.
    assert!(matches!(
        open(backend, StoreConfig::new(dir.path())),
        Err(StoreError::Locked { .. })
    ));
}

pub(super) fn compact_keeps_items_and_returns_space(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let store = open_at(backend, dir.path());
    let (surge, kept) = (q("surge", 3), q("kept", 2));
    store
        .commit(&pushes(vec![item(&kept, 1, later(), b"survivor")]))
        .unwrap();
    let body = vec![0x5a; 4096];
    for chunk in (1..=3000u64).collect::<Vec<_>>().chunks(500) {
        let batch = chunk
            .iter()
            .map(|&s| item(&surge, s, later(), &body))
            .collect();
        store.commit(&pushes(batch)).unwrap();
    }
    let full = store.disk_bytes().unwrap();
    assert!(full > 3000 * 4096, "disk_bytes {full}");
    for chunk in (1..=3000u64).collect::<Vec<_>>().chunks(500) {
        store.commit(&removes(&surge, chunk)).unwrap();
    }
    let compacted = store.compact().unwrap();
    if compacted {
        let after = store.disk_bytes().unwrap();
        assert!(
            after < full / 4,
            "{after} bytes after compaction, {full} before"
        );
    }
    assert_eq!(store.read(&kept, 0, 10).unwrap()[0].body, &b"survivor"[..]);
    assert!(store.read(&surge, 0, 10).unwrap().is_empty());
    let s = state(&*store, &surge);
    assert_eq!((s.count, s.bytes, s.next_seq), (0, 0, 3001));
    store
        .commit(&pushes(vec![item(&kept, 2, later(), b"after")]))
        .unwrap();
    drop(store);
    let store = open_at(backend, dir.path());
    assert_eq!(seqs(&store.read(&kept, 0, 10).unwrap()), [1, 2]);
}

pub(super) fn compact_supported(backend: Backend) -> bool {
    let dir = tempfile::tempdir().unwrap();
    open_at(backend, dir.path()).compact().unwrap()
}

/// Every regular file under `path` (or `path` itself).
fn files_under(path: &Path) -> Vec<std::path::PathBuf> {
    if path.is_file() {
        return vec![path.to_owned()];
    }
    let mut out = Vec::new();
    for entry in std::fs::read_dir(path).unwrap() {
        out.extend(files_under(&entry.unwrap().path()));
    }
    out
}

fn store_with_data(backend: Backend, dir: &Path) -> std::path::PathBuf {
    let store = open_at(backend, dir);
    let queue = q("dest", 2);
    let batch = (1..=100)
        .map(|s| item(&queue, s, later(), &[1; 300]))
        .collect();
    store.commit(&pushes(batch)).unwrap();
    drop(store);
    let entries: Vec<_> = std::fs::read_dir(dir).unwrap().collect();
    assert_eq!(entries.len(), 1, "one data file or directory per store");
    entries.into_iter().next().unwrap().unwrap().path()
}

fn assert_corrupt(backend: Backend, dir: &Path, case: &str) {
    match open(backend, StoreConfig::new(dir)) {
        Err(e @ StoreError::Corrupt { .. }) => {
            assert!(e.to_string().contains("move the file"), "{case}: {e}");
        }
        Err(e) => panic!("{case}: expected Corrupt, got {e:?}"),
        Ok(_) => panic!("{case}: a damaged store opened"),
    }
}

pub(super) fn corrupt_files_are_refused(backend: Backend) {
    // Garbage over every byte.
    let dir = tempfile::tempdir().unwrap();
    let data = store_with_data(backend, dir.path());
    for file in files_under(&data) {
        let len = std::fs::metadata(&file).unwrap().len() as usize;
        let garbage: Vec<u8> = (0..len).map(|i| (i * 7 + 13) as u8).collect();
        std::fs::write(&file, garbage).unwrap();
    }
    assert_corrupt(backend, dir.path(), "garbage");

    // Truncated to nothing.
    let dir = tempfile::tempdir().unwrap();
    let data = store_with_data(backend, dir.path());
    for file in files_under(&data) {
        std::fs::File::options()
            .write(true)
            .open(&file)
            .unwrap()
            .set_len(0)
            .unwrap();
    }
    assert_corrupt(backend, dir.path(), "emptied");
}

pub(super) fn truncated_file_is_refused_or_intact(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let data = store_with_data(backend, dir.path());
    let file = files_under(&data)
        .into_iter()
        .max_by_key(|f| std::fs::metadata(f).unwrap().len())
        .unwrap();
    let len = std::fs::metadata(&file).unwrap().len();
    std::fs::File::options()
        .write(true)
        .open(&file)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    match open(backend, StoreConfig::new(dir.path())) {
        Err(StoreError::Corrupt { .. }) => {}
        Err(e) => panic!("expected Corrupt, got {e:?}"),
        // Opening is acceptable only if nothing was lost.
        Ok(store) => {
            assert_eq!(store.read(&q("dest", 2), 0, 1000).unwrap().len(), 100)
        }
    }
}

pub(super) fn invalid_requests_change_nothing(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let store = open_at(backend, dir.path());
    let good = q("good", 1);
    let bad_batches = [
        pushes(vec![
            item(&good, 1, later(), b"ok"),
            item(&q("", 1), 1, later(), b""),
        ]),
        pushes(vec![item(&q("Upper", 1), 1, later(), b"")]),
        pushes(vec![item(&q(&"x".repeat(33), 1), 1, later(), b"")]),
        pushes(vec![item(&q("a_b", 1), 1, later(), b"")]),
        pushes(vec![item(&good, 0, later(), b"seq 0")]),
        pushes(vec![dedup_item(&good, 1, later(), "Bad Origin", 1)]),
        removes(&q("bad/dest", 1), &[1]),
    ];
    for batch in &bad_batches {
        assert!(
            matches!(store.commit(batch), Err(StoreError::Invalid(_))),
            "{batch:?}"
        );
    }
    assert!(store.recover().unwrap().is_empty());
    assert_eq!(store.commit(&WriteBatch::default()).unwrap(), []);
    let longest = q(&"z".repeat(32), 255);
    store
        .commit(&pushes(vec![item(
            &longest,
            u64::MAX - 1,
            u64::MAX,
            b"edge",
        )]))
        .unwrap();
    assert_eq!(seqs(&store.read(&longest, 0, 10).unwrap()), [u64::MAX - 1]);
    assert_eq!(state(&*store, &longest).next_seq, u64::MAX);
}

pub(super) fn meta_records_commit_with_items_and_survive_reopen(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let queue = q("alpha", 3);
    let b = |s: &str| Bytes::copy_from_slice(s.as_bytes());
    {
        let store = open_at(backend, dir.path());
        let mut batch = pushes(vec![item(&queue, 1, later(), b"chunk")]);
        batch.meta = vec![
            (b("c/1"), Some(b("one"))),
            (b("c/2"), Some(b("two"))),
            (b("d/1"), Some(b("other prefix"))),
            (b("c/3"), Some(b("three"))),
            (b("c/3"), None),
        ];
        assert_eq!(store.commit(&batch).unwrap(), stored(1));
        let found = store.meta_scan(b"c/").unwrap();
        assert_eq!(found, vec![(b("c/1"), b("one")), (b("c/2"), b("two"))]);
        // Overwrite one, delete another, together with the item's removal.
        let mut batch = removes(&queue, &[1]);
        batch.meta = vec![(b("c/1"), Some(b("uno"))), (b("c/2"), None)];
        store.commit(&batch).unwrap();
    }
    let store = open_at(backend, dir.path());
    assert_eq!(store.meta_scan(b"c/").unwrap(), vec![(b("c/1"), b("uno"))]);
    assert_eq!(store.meta_scan(b"").unwrap().len(), 2);
    assert!(store.read(&queue, 0, 10).unwrap().is_empty());
    let too_long = WriteBatch {
        meta: vec![(Bytes::from(vec![b'k'; MAX_META_KEY + 1]), Some(b("v")))],
        ..Default::default()
    };
    assert!(matches!(
        store.commit(&too_long),
        Err(StoreError::Invalid(_))
    ));
}

/// Holds the first commit until released, so that requests pile up behind it.
struct GatedStore {
    inner: Arc<dyn Store>,
    gate: Mutex<Option<std::sync::mpsc::Receiver<()>>>,
    entered: tokio::sync::mpsc::UnboundedSender<()>,
}

impl Store for GatedStore {
    fn commit(&self, batch: &WriteBatch) -> Result<Vec<PushOutcome>, StoreError> {
        let gate = self.gate.lock().unwrap().take();
        if let Some(gate) = gate {
            self.entered.send(()).unwrap();
            gate.recv().unwrap();
        }
        self.inner.commit(batch)
    }
    fn read(&self, q: &QueueKey, after: u64, limit: usize) -> Result<Vec<Item>, StoreError> {
        self.inner.read(q, after, limit)
    }
    fn expired(&self, now_ms: u64, limit: usize) -> Result<Vec<Item>, StoreError> {
        self.inner.expired(now_ms, limit)
    }
    fn prune_dedup(&self, now_ms: u64, limit: usize) -> Result<usize, StoreError> {
        self.inner.prune_dedup(now_ms, limit)
    }
    fn recover(&self) -> Result<Vec<QueueState>, StoreError> {
        self.inner.recover()
    }
    fn compact(&self) -> Result<bool, StoreError> {
        self.inner.compact()
    }
    fn disk_bytes(&self) -> Result<u64, StoreError> {
        self.inner.disk_bytes()
    }
    fn meta_scan(&self, prefix: &[u8]) -> Result<Vec<(Bytes, Bytes)>, StoreError> {
        self.inner.meta_scan(prefix)
    }
}

const WAIT: Duration = Duration::from_secs(20);

pub(super) async fn writer_merges_pending_requests(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let inner = open_at(backend, dir.path());
    let (release, gate) = std::sync::mpsc::channel();
    let (entered_tx, mut entered) = tokio::sync::mpsc::unbounded_channel();
    let store = Arc::new(GatedStore {
        inner: inner.clone(),
        gate: Mutex::new(Some(gate)),
        entered: entered_tx,
    });
    let (writer, thread) = Writer::spawn(store, 64);

    // Each request: a push, a duplicate of it, another push.
    let request = |i: usize| {
        let queue = q(&format!("peer-{i}"), 2);
        pushes(vec![
            dedup_item(&queue, 1, later(), "origin", i as u8),
            dedup_item(&queue, 2, later(), "origin", i as u8),
            item(&queue, 3, later(), b"plain"),
        ])
    };
    let first = tokio::spawn({
        let writer = writer.clone();
        let batch = request(0);
        async move { writer.commit(batch).await }
    });
    tokio::time::timeout(WAIT, entered.recv())
        .await
        .expect("first commit started");
    const REQUESTS: usize = 40;
    let mut tasks = vec![first];
    for i in 1..REQUESTS {
        let writer = writer.clone();
        let batch = request(i);
        tasks.push(tokio::spawn(async move { writer.commit(batch).await }));
    }
    tokio::time::timeout(WAIT, async {
        while writer.queued() < REQUESTS - 1 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await
    .expect("requests queued behind the first commit");
    release.send(()).unwrap();

    let dup_of_first = |outcome: &PushOutcome| matches!(outcome, PushOutcome::Duplicate { .. });
    for task in tasks {
        let outcomes = task.await.unwrap().unwrap();
        assert_eq!(outcomes.len(), 3);
        assert_eq!(outcomes[0], PushOutcome::Stored);
        assert!(dup_of_first(&outcomes[1]), "{outcomes:?}");
        assert_eq!(outcomes[2], PushOutcome::Stored);
    }
    let stats = writer.stats();
    assert_eq!(stats.commits, 2, "{stats:?}");
    assert_eq!(stats.requests, REQUESTS as u64);
    assert_eq!(stats.items, 3 * REQUESTS as u64);
    assert_eq!(stats.last_commit_items, 3 * (REQUESTS as u64 - 1));
    for i in 0..REQUESTS {
        let got = inner.read(&q(&format!("peer-{i}"), 2), 0, 10).unwrap();
        assert_eq!(seqs(&got), [1, 3]);
    }
    drop(writer);
    tokio::task::spawn_blocking(move || thread.join().unwrap())
        .await
        .unwrap();
}

pub(super) async fn writer_serves_concurrent_tasks(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let store = open_at(backend, dir.path());
    let (writer, thread) = Writer::spawn(store.clone(), 8);
    const TASKS: usize = 6;
    const COMMITS: u64 = 40;
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let writer = writer.clone();
        tasks.push(tokio::spawn(async move {
            let queue = q(&format!("task-{t}"), 1);
            let mut seen = HashSet::new();
            for seq in 1..=COMMITS {
                // Every task pushes one item per commit, acks the previous one and
                // repeats one dedup id per task, so outcomes are per request.
                let mut batch = pushes(vec![
                    dedup_item(&queue, seq, later(), &format!("o{t}"), seq as u8),
                    dedup_item(&queue, seq + 1000, later(), &format!("o{t}"), 0),
                ]);
                batch.remove.push((queue.clone(), seq - 1));
                let out = writer.commit(batch).await.unwrap();
                assert_eq!(out[0], PushOutcome::Stored);
                seen.insert(out[1]);
            }
            seen
        }));
    }
    for task in tasks {
        let seen = task.await.unwrap();
        // The id-0 push is stored once per task, a duplicate afterwards.
        assert_eq!(seen.len(), 2, "{seen:?}");
    }
    for t in 0..TASKS {
        let got = store.read(&q(&format!("task-{t}"), 1), 0, 10).unwrap();
        assert_eq!(seqs(&got), [COMMITS, 1001]);
    }
    let stats = writer.stats();
    assert_eq!(stats.requests, TASKS as u64 * COMMITS);
    assert!(stats.commits <= stats.requests, "{stats:?}");
    assert_eq!(stats.failed_commits, 0);
    drop(writer);
    tokio::task::spawn_blocking(move || thread.join().unwrap())
        .await
        .unwrap();
}

/// Runs the whole suite against one backend: `store_suite!(module_name, Backend::X)`.
#[cfg(test)]
macro_rules! store_suite {
    ($name:ident, $backend:expr) => {
        mod $name {
            #[test]
            fn fifo_per_queue_and_queues_independent() {
                super::fifo_per_queue_and_queues_independent($backend);
            }
            #[test]
            fn meta_records_commit_with_items_and_survive_reopen() {
                super::meta_records_commit_with_items_and_survive_reopen($backend);
            }
            #[test]
            fn read_pages_after_seq() {
                super::read_pages_after_seq($backend);
            }
            #[test]
            fn remove_then_read_and_idempotent() {
                super::remove_then_read_and_idempotent($backend);
            }
            #[test]
            fn dedup_within_and_across_batches() {
                super::dedup_within_and_across_batches($backend);
            }
            #[test]
            fn dedup_survives_removal() {
                super::dedup_survives_removal($backend);
            }
            #[test]
            fn dedup_forgotten_after_expiry_and_prune() {
                super::dedup_forgotten_after_expiry_and_prune($backend);
            }
            #[test]
            fn expired_lists_queued_items_oldest_first() {
                super::expired_lists_queued_items_oldest_first($backend);
            }
            #[test]
            fn expiry_removal_and_notice_commit_together() {
                super::expiry_removal_and_notice_commit_together($backend);
            }
            #[test]
            fn recover_counts_and_survives_reopen() {
                super::recover_counts_and_survives_reopen($backend);
            }
            #[test]
            fn every_commit_survives_reopen() {
                super::every_commit_survives_reopen($backend);
            }
            #[test]
            fn compact_keeps_items_and_returns_space() {
                super::compact_keeps_items_and_returns_space($backend);
            }
            #[test]
            fn corrupt_files_are_refused() {
                super::corrupt_files_are_refused($backend);
            }
            #[test]
            fn truncated_file_is_refused_or_intact() {
                super::truncated_file_is_refused_or_intact($backend);
            }
            #[test]
            fn invalid_requests_change_nothing() {
                super::invalid_requests_change_nothing($backend);
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn writer_merges_pending_requests() {
                super::writer_merges_pending_requests($backend).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn writer_serves_concurrent_tasks() {
                super::writer_serves_concurrent_tasks($backend).await;
            }
        }
    };
}

#[cfg(test)]
store_suite!(redb_suite, super::Backend::Redb);

#[cfg(test)]
#[test]
fn redb_compacts() {
    assert!(compact_supported(Backend::Redb));
}

#[cfg(all(test, feature = "sled"))]
store_suite!(sled_suite, super::Backend::Sled);

#[cfg(all(test, feature = "sled"))]
#[test]
fn sled_cannot_compact() {
    assert!(!compact_supported(Backend::Sled));
}
