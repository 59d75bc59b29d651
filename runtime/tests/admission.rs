//! The memory-budget admission primitive at its boundaries.

use std::time::Duration;

use klein_runtime::budget::{AdmissionError, MemoryBudget};
use tokio::time::timeout;

const SHORT: Duration = Duration::from_millis(50);

#[tokio::test]
async fn immediate_admission_boundaries() {
    // (capacity, already reserved, request, expected outcome)
    #[derive(Debug, PartialEq)]
    enum Want {
        Admit,
        Wait,
        NeverFits,
    }
    let cases: &[(u64, u64, u64, Want)] = &[
        (100, 0, 0, Want::Admit),
        (100, 0, 100, Want::Admit),
        (100, 0, 101, Want::NeverFits),
        (100, 40, 60, Want::Admit),
        (100, 40, 61, Want::Wait),
        (100, 100, 1, Want::Wait),
        (100, 100, 0, Want::Admit),
        (0, 0, 0, Want::Admit),
        (0, 0, 1, Want::NeverFits),
        (u64::MAX, u64::MAX - 1, 1, Want::Admit),
    ];
    for (capacity, held, request, want) in cases {
        let budget = MemoryBudget::new("test", *capacity, 4);
        let _held = budget.reserve(*held).await.unwrap();
        let got = match timeout(SHORT, budget.reserve(*request)).await {
            Ok(Ok(_)) => Want::Admit,
            Ok(Err(AdmissionError::NeverFits {
                requested,
                capacity: cap,
                ..
            })) => {
                assert_eq!((requested, cap), (*request, *capacity));
                Want::NeverFits
            }
            Ok(Err(other)) => panic!("unexpected {other}"),
            Err(_) => Want::Wait,
        };
        assert_eq!(
            &got, want,
            "capacity {capacity}, held {held}, request {request}"
        );
        // After the probe, nothing may stay reserved or queued beyond what we still hold.
        let snap = budget.snapshot();
        assert_eq!(
            (snap.reserved, snap.queued),
            (*held, 0),
            "cleanup for {capacity}/{held}/{request}"
        );
    }
}

#[tokio::test]
async fn queue_bound_is_exact() {
    for max_queue in [0usize, 1, 3] {
        let budget = MemoryBudget::new("test", 10, max_queue);
        let _full = budget.reserve(10).await.unwrap();
        let mut waiting = Vec::new();
        for _ in 0..max_queue {
            let b = budget.clone();
            waiting.push(tokio::spawn(async move {
                b.reserve(5).await.map(|r| r.bytes())
            }));
        }
        while budget.snapshot().queued < max_queue {
            tokio::task::yield_now().await;
        }
        let err = budget.reserve(1).await.unwrap_err();
        assert_eq!(
            err,
            AdmissionError::QueueFull {
                budget: "test".into(),
                depth: max_queue
            },
            "max_queue {max_queue}"
        );
        let status = tonic::Status::from(err);
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        for w in waiting {
            w.abort();
        }
    }
}

#[tokio::test]
async fn release_grants_waiters_in_fifo_order() {
    let budget = MemoryBudget::new("test", 10, 8);
    let first = budget.reserve(10).await.unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    // A big request queued first must not be overtaken by smaller ones behind it.
    for (name, bytes) in [("big", 8u64), ("small-a", 2), ("small-b", 2)] {
        let b = budget.clone();
        let tx = tx.clone();
        let queued_before = budget.snapshot().queued;
        tokio::spawn(async move {
            let r = b.reserve(bytes).await.unwrap();
            tx.send(name).unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
            drop(r);
        });
        while budget.snapshot().queued == queued_before {
            tokio::task::yield_now().await;
        }
    }
    drop(first);
    // big (8) and small-a (2) fit together; small-b must wait for a release.
    assert_eq!(rx.recv().await, Some("big"));
    assert_eq!(rx.recv().await, Some("small-a"));
    assert!(
        timeout(Duration::from_millis(30), rx.recv()).await.is_err(),
        "small-b must still wait"
    );
    assert_eq!(
        timeout(Duration::from_secs(2), rx.recv()).await.unwrap(),
        Some("small-b")
    );
}

#[tokio::test]
async fn a_cancelled_waiter_frees_its_slot_and_unblocks_the_queue() {
    let budget = MemoryBudget::new("test", 10, 1);
    let held = budget.reserve(6).await.unwrap();
    // The head waiter needs 8 (blocked); cancel it via timeout.
    assert!(timeout(SHORT, budget.reserve(8)).await.is_err());
    let snap = budget.snapshot();
    assert_eq!((snap.reserved, snap.queued), (6, 0));
    // Its slot is free again, and a request that fits now is admitted immediately.
    let small = timeout(SHORT, budget.reserve(4))
        .await
        .expect("admitted")
        .unwrap();
    assert_eq!(budget.snapshot().reserved, 10);
    drop(small);
    drop(held);
    assert_eq!(budget.snapshot().reserved, 0);
}

#[tokio::test]
async fn dropping_reservations_returns_every_byte() {
    let budget = MemoryBudget::new("test", 1000, 64);
    let mut tasks = Vec::new();
    for i in 0..50u64 {
        let b = budget.clone();
        tasks.push(tokio::spawn(async move {
            let r = b.reserve(100 + i).await.unwrap();
            tokio::task::yield_now().await;
            drop(r);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let snap = budget.snapshot();
    assert_eq!((snap.reserved, snap.queued), (0, 0));
}

#[tokio::test]
async fn try_reserve_never_queues() {
    let budget = MemoryBudget::new("test", 10, 4);
    let a = budget.try_reserve(7).expect("fits");
    assert!(budget.try_reserve(4).is_none());
    assert_eq!(budget.snapshot().queued, 0);
    drop(a);
    assert!(budget.try_reserve(10).is_some());
}
