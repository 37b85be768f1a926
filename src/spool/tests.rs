//! The store, its bounds, its recovery from a full disk and from damage; no broker needed.

use super::*;

fn target(spool: &Spool, name: &str) -> Arc<Target> {
    spool.target(
        name,
        Arc::new(Doorbell::new()),
        Arc::new(LinkStats::default()),
    )
}

/// The keys of up to `max` readable rows from `from` on.
fn read_keys(spool: &Spool, t: &Target, from: Option<u64>, max: usize) -> Vec<u64> {
    spool
        .read(t, from, max)
        .unwrap()
        .iter()
        .map(|r| r.0)
        .collect()
}

/// Bounds of a test spool: 1 GiB, `max_messages`, drop the oldest.
fn limits(max_messages: u64) -> Limits {
    Limits {
        max_bytes: 1 << 30,
        max_messages,
        overflow: Overflow::DropOldest,
    }
}

#[tokio::test]
async fn append_read_delete_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let limits = limits(1000);
    {
        let spool = Spool::open(dir.path(), limits).unwrap();
        let t = target(&spool, "b2");
        for k in 0..5 {
            spool.append(&t, MIDDLE + k, vec![k as u8; 10], None);
        }
        spool.append(&t, MIDDLE - 1, vec![9; 10], None);
        spool.sync().await;
        assert_eq!((t.len(), t.bytes()), (6, 60));
        let keys = read_keys(&spool, &t, None, 3);
        assert_eq!(keys, vec![MIDDLE - 1, MIDDLE, MIDDLE + 1]);
        spool.delete(&t, MIDDLE - 1);
        spool.delete(&t, MIDDLE);
        spool.sync().await;
        assert_eq!(t.len(), 4);
        assert_eq!(spool.read(&t, Some(MIDDLE + 4), 10).unwrap().len(), 1);
        // A second bridge on the same data_dir is refused.
        let err = Spool::open(dir.path(), limits).unwrap_err().to_string();
        assert!(err.contains("in use by another process"), "{err}");
        spool.close();
    }
    let spool = Spool::open(dir.path(), limits).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join(FILE_NAME))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "payloads are private");
    }
    let t = target(&spool, "b2");
    assert_eq!((t.len(), t.bytes()), (4, 40), "found again after a reopen");
    assert_eq!(t.key_range(), (MIDDLE + 1, MIDDLE + 5));
    let other = target(&spool, "b3");
    assert_eq!(other.key_range(), (MIDDLE, MIDDLE));
}

#[tokio::test]
async fn held_rows_read_in_key_order_with_disk_rows_and_deleted_without_disk() {
    let dir = tempfile::tempdir().unwrap();
    let limits = limits(1000);
    let spool = Spool::open(dir.path(), limits).unwrap();
    let t = target(&spool, "b2");
    spool.append(&t, MIDDLE, vec![0; 4], None);
    spool.append(&t, MIDDLE + 2, vec![2; 4], None);
    spool.sync().await;
    // As the writer does when a transaction fails: the rows stay pending, held in memory.
    for key in [MIDDLE + 1, MIDDLE + 3] {
        t.pending_rows.fetch_add(1, Ordering::AcqRel);
        t.pending_bytes.fetch_add(4, Ordering::AcqRel);
        assert!(t.hold(key, vec![key as u8; 4], &spool.store.health));
    }
    assert_eq!((t.committed(), t.len()), (4, 4));
    assert_eq!(spool.health().held_messages, 2);
    let keys = read_keys(&spool, &t, None, 10);
    assert_eq!(keys, vec![MIDDLE, MIDDLE + 1, MIDDLE + 2, MIDDLE + 3]);
    let keys = read_keys(&spool, &t, Some(MIDDLE + 1), 2);
    assert_eq!(keys, vec![MIDDLE + 1, MIDDLE + 2]);
    spool.delete(&t, MIDDLE + 1);
    spool.delete(&t, MIDDLE);
    spool.sync().await;
    assert_eq!((t.len(), t.deletes_pending()), (2, 0));
    assert_eq!(spool.health().held_messages, 1);
    let keys = read_keys(&spool, &t, None, 10);
    assert_eq!(keys, vec![MIDDLE + 2, MIDDLE + 3]);
    assert!(!spool.is_failing());
}

/// A spool file damaged on disk (cut short, or garbage written into it) must give an error
/// naming the file and what to do, never a panic (systemd would restart it in a loop).
#[tokio::test]
async fn a_damaged_file_is_an_error_not_a_panic() {
    let limits = limits(100_000);
    type Damage = fn(&mut Vec<u8>);
    let damages: [(&str, Damage); 4] = [
        ("cut to a third", |b| b.truncate(b.len() / 3)),
        ("cut to its header", |b| b.truncate(600)),
        ("garbage after the header", |b| {
            for (i, x) in b.iter_mut().enumerate().skip(4096).take(64 << 10) {
                *x = (i * 7919 % 251) as u8;
            }
        }),
        ("garbage in the header", |b| {
            for x in b.iter_mut().skip(64).take(400) {
                *x = 0xA5;
            }
        }),
    ];
    for (what, damage) in damages {
        let dir = tempfile::tempdir().unwrap();
        {
            let spool = Spool::open(dir.path(), limits).unwrap();
            let t = target(&spool, "b2");
            for k in 0..2000 {
                spool.append(&t, MIDDLE + k, vec![k as u8; 100], None);
            }
            spool.sync().await;
            spool.close();
        }
        let path = dir.path().join(FILE_NAME);
        let mut bytes = std::fs::read(&path).unwrap();
        damage(&mut bytes);
        std::fs::write(&path, bytes).unwrap();
        match Spool::open(dir.path(), limits) {
            Err(e) => {
                let e = e.to_string();
                assert!(
                    e.contains(FILE_NAME) && e.contains("--spool-recover"),
                    "{what}: {e}"
                );
                assert!(!e.contains('\n'), "{what}: one line: {e}");
                // --spool-recover moves it aside and starts empty.
                let spool = Spool::open_recovering(dir.path(), limits).unwrap();
                assert!(target(&spool, "b2").is_empty(), "{what}");
                spool.close();
                let aside = std::fs::read_dir(dir.path())
                    .unwrap()
                    .filter_map(Result::ok)
                    .filter(|e| e.file_name().to_string_lossy().contains(".damaged-"))
                    .count();
                assert_eq!(aside, 1, "{what}: the damaged file is kept aside");
            }
            // redb may repair some damage itself; then the rows it kept are readable.
            Ok(spool) => {
                let t = target(&spool, "b2");
                let _ = spool.read(&t, None, 10_000);
                spool.close();
            }
        }
    }
}

#[tokio::test]
async fn drop_oldest_keeps_the_bound() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path(), limits(3)).unwrap();
    let t = target(&spool, "b1");
    for k in 0..5 {
        spool.append(&t, MIDDLE + k, vec![0; 4], None);
    }
    spool.sync().await;
    assert_eq!(t.len(), 3);
    assert_eq!(t.stats.dropped_overflow.load(Ordering::Relaxed), 2);
    let keys = read_keys(&spool, &t, None, 10);
    assert_eq!(keys, vec![MIDDLE + 2, MIDDLE + 3, MIDDLE + 4]);
    spool.discard(&t);
    spool.sync().await;
    assert!(t.is_empty());
    assert!(spool.read(&t, None, 10).unwrap().is_empty());
}

#[test]
fn overflow_has_one_spelling_everywhere() {
    for o in Overflow::ALL {
        assert_eq!(o.as_str().parse::<Overflow>().unwrap(), o);
        assert_eq!(o.to_string(), o.as_str());
        let json = serde_json::to_string(&o).unwrap();
        assert_eq!(json, format!("\"{}\"", o.as_str()));
        assert_eq!(serde_json::from_str::<Overflow>(&json).unwrap(), o);
    }
    let e = "drop_newest".parse::<Overflow>().unwrap_err().to_string();
    assert!(e.contains("drop_newest") && e.contains("block"), "{e}");
    assert_eq!(Overflow::default(), Overflow::DropOldest);
}
